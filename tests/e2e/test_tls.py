"""End to end with TLS: the real ``l4proxy`` command, real redis-servers and redis-cli, OpenSSL's
own clients, and certificate files on disk.

Covers TLS origination to a TLS-only redis (with TLS health probes), termination in front of a plain
redis, mTLS in both directions, SIGHUP certificate reload (a good reload serves the new certificate to
new clients while open sessions continue; a broken file keeps the old one and says why), and the
one-line start-up errors for TLS flags. RELIABILITY.md cases 26, 27 and 32 (the TLS part of reload).
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from ..servers import PING, Certs, Command, RedisServer, free_port, redis_cli, run_command, started, tls_ping, tls_redis


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    out = tmp_path_factory.mktemp("certs")
    for suffix, ca in (("", trustme.CA()), ("2", trustme.CA())):
        (out / f"ca{suffix}.pem").write_bytes(ca.cert_pem.bytes())
        leaves = {
            f"server{suffix}": ca.issue_cert("localhost", "127.0.0.1", common_name="localhost"),
            f"client{suffix}": ca.issue_cert(f"client{suffix}", common_name=f"client{suffix}"),
        }
        for name, leaf in leaves.items():
            (out / f"{name}.pem").write_bytes(b"".join(c.bytes() for c in leaf.cert_chain_pems))
            (out / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())
    return Certs(out)


def refused(port: int, ca: str, cert: str | None = None, key: str | None = None) -> bool:
    """True when the proxy rejects this client: the handshake fails, or (TLS 1.3, where the server
    judges a client certificate after the client finished) the PING gets no reply."""
    try:
        return tls_ping(port, ca, cert, key) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def access_lines(proxy: Command) -> list[str]:
    return [line for line in proxy.stdout.splitlines() if " client=" in line]


# --- origination and termination with redis ----------------------------------------------------------


def test_plain_redis_cli_through_tls_origination_to_tls_only_redis(tmp_path: Path, certs: Certs) -> None:
    redis = tls_redis(tmp_path, certs)
    proxy = Command(
        "--upstream", f"127.0.0.1:{redis.port}", "--upstream-tls", "--upstream-ca", certs["ca.pem"],
        "--health-send", r"PING\r\n", "--health-expect", "+PONG", "--health-interval", "100ms", "--fall", "1",
    )  # fmt: skip
    with started(redis, proxy):
        assert redis_cli(proxy.port, "PING") == "PONG"
        assert redis_cli(proxy.port, "SET", "k", "over tls") == "OK"
        assert redis_cli(proxy.port, "GET", "k") == "over tls"
        time.sleep(0.5)  # the behaviour under test: several more TLS probe rounds, none failing
        assert proxy.stop() == 0
    lines = access_lines(proxy)
    assert len(lines) == 3 and all(f"upstream=127.0.0.1:{redis.port} " in line for line in lines), lines
    assert "tls_" not in proxy.stdout  # the client side is plain
    # the TLS health probes (one every 100 ms, fall 1) never failed while the clients ran
    assert "is DOWN" not in proxy.stderr and "Traceback" not in proxy.stderr, proxy.stderr


def test_redis_cli_tls_through_termination_to_plain_redis(tmp_path: Path, certs: Certs) -> None:
    redis = RedisServer(tmp_path)
    proxy = Command("--upstream", f"127.0.0.1:{redis.port}", "--tls-cert", certs["server.pem"],
                             "--tls-key", certs["server.key"])
    with started(redis, proxy):
        tls = ["--tls", "--cacert", certs["ca.pem"], "--sni", "localhost"]
        assert redis_cli(proxy.port, *tls, "PING") == "PONG"
        assert redis_cli(proxy.port, *tls, "SET", "k", "terminated") == "OK"
        assert redis.cli("GET", "k") == "terminated"  # it reached the plain redis
        assert proxy.stop() == 0
    lines = access_lines(proxy)
    assert len(lines) == 2, lines
    assert all(" tls_sni=localhost " in line and " tls_version=TLSv1.3 " in line for line in lines), lines
    assert "TLS handshake" not in proxy.stderr and "Traceback" not in proxy.stderr


def test_mtls_on_both_sides_with_redis(tmp_path: Path, certs: Certs) -> None:
    """Case 26 with real clients: the proxy requires client certificates from ``ca`` and presents its
    own to a redis that requires them too."""
    redis = tls_redis(tmp_path, certs, auth_clients="yes")
    proxy = Command(
        "--upstream", f"127.0.0.1:{redis.port}", "--no-health-checks",
        "--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"], "--tls-client-ca", certs["ca.pem"],
        "--upstream-tls", "--upstream-ca", certs["ca.pem"],
        "--upstream-cert", certs["client.pem"], "--upstream-key", certs["client.key"],
    )  # fmt: skip
    with started(redis, proxy):
        good = ["--tls", "--cacert", certs["ca.pem"], "--cert", certs["client.pem"], "--key", certs["client.key"]]
        assert redis_cli(proxy.port, *good, "PING") == "PONG"
        assert refused(proxy.port, certs["ca.pem"])  # no client certificate
        assert refused(proxy.port, certs["ca.pem"], certs["client2.pem"], certs["client2.key"])  # another CA
        assert tls_ping(proxy.port, certs["ca.pem"], certs["client.pem"], certs["client.key"]) == b"+PONG\r\n"
        proxy.wait_log("TLS handshake with", timeout=5)
        assert proxy.stop() == 0
    lines = access_lines(proxy)
    assert len(lines) == 2 and all(" tls_peer_cn=client " in line + " " for line in lines), lines
    assert proxy.stderr.count("TLS handshake with 127.0.0.1:") == 2
    assert "Traceback" not in proxy.stderr


def test_upstream_insecure_warns_at_start_up_and_skips_verification(tmp_path: Path, certs: Certs) -> None:
    redis = tls_redis(tmp_path, certs)
    proxy = Command("--upstream", f"127.0.0.1:{redis.port}", "--upstream-tls", "--upstream-insecure",
                             "--no-health-checks")
    with started(redis, proxy):
        assert redis_cli(proxy.port, "PING") == "PONG"  # ca.pem is in no trust store: only insecure allows it
        assert proxy.stop() == 0
    warnings = [line for line in proxy.stderr.splitlines() if "--upstream-insecure" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0] and "NOT verified" in warnings[0], warnings


# --- SIGHUP reload -----------------------------------------------------------------------------------


def test_sighup_reloads_certificates_and_keeps_them_when_the_files_are_broken(tmp_path: Path, certs: Certs) -> None:
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    cert.write_bytes(Path(certs["server.pem"]).read_bytes())
    key.write_bytes(Path(certs["server.key"]).read_bytes())
    redis = RedisServer(tmp_path)
    proxy = Command("--upstream", f"127.0.0.1:{redis.port}", "--tls-cert", str(cert), "--tls-key", str(key))
    with started(redis, proxy):
        ctx = ssl.create_default_context(cafile=certs["ca.pem"])
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, ctx.wrap_socket(
            raw, server_hostname="localhost"
        ) as session:  # opened under the first certificate, kept across both reloads
            session.sendall(PING)
            assert session.recv(100) == b"+PONG\r\n"

            cert.write_bytes(Path(certs["server2.pem"]).read_bytes())
            key.write_bytes(Path(certs["server2.key"]).read_bytes())
            proxy.signal(signal.SIGHUP)
            proxy.wait_log("SIGHUP: TLS certificates and keys reloaded")
            assert redis_cli(proxy.port, "--tls", "--cacert", certs["ca2.pem"], "PING") == "PONG"
            with pytest.raises(ssl.SSLCertVerificationError):
                tls_ping(proxy.port, certs["ca.pem"])  # new clients get the new certificate
            session.sendall(PING)
            assert session.recv(100) == b"+PONG\r\n"

            cert.write_text("-----BEGIN CERTIFICATE-----\nthis is not base64\n-----END CERTIFICATE-----\n")
            proxy.signal(signal.SIGHUP)
            proxy.wait_log("kept the previous TLS files")
            assert tls_ping(proxy.port, certs["ca2.pem"]) == b"+PONG\r\n"
            session.sendall(PING)
            assert session.recv(100) == b"+PONG\r\n"
        assert proxy.poll() is None
        assert proxy.stop() == 0
    kept = [line for line in proxy.stderr.splitlines() if "kept the previous TLS files" in line]
    assert len(kept) == 1 and f"--tls-cert {str(cert)!r}: is not a PEM certificate" in kept[0], kept
    assert "Traceback" not in proxy.stderr


def test_sighup_without_tls_says_there_is_nothing_to_reload(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    proxy = Command("--upstream", f"127.0.0.1:{redis.port}")
    with started(redis, proxy):
        proxy.signal(signal.SIGHUP)
        proxy.wait_log("SIGHUP: no TLS configured, nothing to reload")
        assert redis_cli(proxy.port, "PING") == "PONG"
        assert proxy.stop() == 0
    assert "reloaded" not in proxy.stderr, proxy.stderr


# --- start-up errors ---------------------------------------------------------------------------------

START_UP_ERRORS = [
    (["--tls-cert", "<server.pem>"], "--tls-key: required with --tls-cert"),
    (["--tls-key", "<server.key>"], "--tls-cert: required with --tls-key"),
    (["--tls-cert", "<missing.pem>", "--tls-key", "<server.key>"], "--tls-cert '<missing.pem>': file not found"),
    (["--tls-cert", "<server.pem>", "--tls-key", "<server2.key>"],
     "--tls-key '<server2.key>': key does not match the certificate '<server.pem>'"),
    (["--tls-cert", "<server.pem>", "--tls-key", "<ca.pem>"], "--tls-key '<ca.pem>': is not a PEM private key"),
    (["--tls-client-ca", "<ca.pem>"], "--tls-client-ca '<ca.pem>': needs --tls-cert and --tls-key"),
    (["--upstream-ca", "<ca.pem>"], "--upstream-ca '<ca.pem>': needs --upstream-tls"),
    (["--upstream-tls", "--upstream-ca", "<missing.pem>"], "--upstream-ca '<missing.pem>': file not found"),
    (["--upstream-tls", "--upstream-ca", "<server.key>"],
     "--upstream-ca '<server.key>': is not a valid CA bundle (no PEM certificate found)"),
    (["--upstream-tls", "--upstream-cert", "<client.pem>"],
     "--upstream-key: required with --upstream-cert"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "message"), START_UP_ERRORS)
def test_tls_start_up_error_is_one_line_and_exit_2(certs: Certs, flags: list[str], message: str) -> None:
    """Flags and messages name files as ``<name>``, a file of the ``certs`` fixture (``missing.pem`` is not
    written)."""

    def fill(text: str) -> str:
        return re.sub(r"<([\w.]+)>", lambda m: certs[m.group(1)], text)

    out = run_command("--listen", f"127.0.0.1:{free_port()}", "--upstream", "127.0.0.1:1", *map(fill, flags))
    assert out.returncode == 2, out
    assert out.stderr == f"l4proxy: error: {fill(message)}\n"
    assert out.stdout == ""
