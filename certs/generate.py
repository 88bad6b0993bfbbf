"""Write a development CA and certificates for trying l4proxy's TLS options on this machine.

Usage: ``python certs/generate.py [--out certs/out]``. Every run overwrites the previous files, so it
is safe to repeat. The CA signs everything; trust ``ca.pem`` on both sides. These are for development
and tests only: the CA key is not written, and the private keys stay out of git (``certs/out/`` is
ignored).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import trustme

SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
CLIENT_CN = "l4proxy-client"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write atomically; private keys are created 0600 so no other user can read them, even briefly."""
    tmp = path.with_name(path.name + ".tmp")
    mode = 0o600 if private else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # also when a stale .tmp existed with other permissions
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def generate(out: Path) -> dict[str, Path]:
    """Create ``out`` if needed and write the CA, server and client files; return them by name."""
    out.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="l4proxy development CA")
    server = ca.issue_cert(*SERVER_NAMES, common_name="localhost")
    client = ca.issue_cert(CLIENT_CN, common_name=CLIENT_CN)
    files = {
        "ca.pem": (ca.cert_pem.bytes(), False),
        "server.pem": (b"".join(p.bytes() for p in server.cert_chain_pems), False),
        "server.key": (server.private_key_pem.bytes(), True),
        "client.pem": (b"".join(p.bytes() for p in client.cert_chain_pems), False),
        "client.key": (client.private_key_pem.bytes(), True),
    }
    for name, (data, private) in files.items():
        _write(out / name, data, private)
    return {name: out / name for name in files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(__file__).resolve().parent / "out"
    parser.add_argument("--out", type=Path, default=default_out, help=f"directory (default {default_out})")
    args = parser.parse_args()
    for name, path in generate(args.out).items():
        print(f"{name:<11} {path}")


if __name__ == "__main__":
    main()
