"""certs/generate.py: its output loads into l4proxy's TLS contexts and completes an mTLS handshake."""

from __future__ import annotations

import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from l4proxy import tls
from l4proxy.config import ServerTLSConfig, UpstreamTLSConfig

GENERATE = Path(__file__).resolve().parents[2] / "certs" / "generate.py"
FILES = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the generator twice into the same directory: the second run must simply overwrite."""
    out = tmp_path_factory.mktemp("certs") / "out"
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, str(GENERATE), "--out", str(out)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
    for name in FILES:
        assert f"{name}" in result.stdout and str(out / name) in result.stdout
    return out


def test_writes_every_file_and_keeps_keys_private(generated: Path) -> None:
    assert sorted(p.name for p in generated.iterdir()) == sorted(FILES)
    for name in ("server.key", "client.key"):
        assert stat.S_IMODE((generated / name).stat().st_mode) == 0o600


def _contexts(out: Path) -> tuple[ssl.SSLContext, UpstreamTLSConfig]:
    server = tls.server_context(
        ServerTLSConfig(cert=str(out / "server.pem"), key=str(out / "server.key"), client_ca=str(out / "ca.pem"))
    )
    upstream = UpstreamTLSConfig(ca=str(out / "ca.pem"), cert=str(out / "client.pem"), key=str(out / "client.key"))
    return server, upstream


def _ipv6() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(
    ("bind", "member"),
    [
        ("127.0.0.1", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        pytest.param("::1", "::1", marks=pytest.mark.skipif(not _ipv6(), reason="no IPv6 loopback")),
    ],
)
def test_generated_files_complete_an_mtls_handshake(generated: Path, bind: str, member: str) -> None:
    server_ctx, upstream = _contexts(generated)
    client_ctx = tls.client_context(upstream)
    seen: dict[str, str | None] = {}
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.create_server((bind, 0), family=family) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            raw, _ = listener.accept()
            raw.settimeout(TIMEOUT)
            with server_ctx.wrap_socket(raw, server_side=True) as conn:
                seen.update(tls.describe(conn))
                conn.sendall(conn.recv(4))

        thread = threading.Thread(target=serve)
        thread.start()
        name = tls.server_hostname(upstream, member)
        with (
            socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT) as raw,
            client_ctx.wrap_socket(raw, server_hostname=name) as conn,
        ):
            conn.sendall(b"ping")
            assert conn.recv(4) == b"ping"
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert seen["peer_cn"] == "l4proxy-client"
    assert seen["sni"] == (member if member == "localhost" else None)
