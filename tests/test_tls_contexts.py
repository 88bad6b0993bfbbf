"""l4proxy.tls: precise ConfigErrors for bad files, and real handshakes on loopback for every context option.

Handshakes run a blocking ``ssl`` server in a thread against a blocking client; one test repeats the
server-side SNI capture on asyncio and uvloop SSL transports, one checks interop with ``openssl s_client``.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
import uvloop
from cryptography.hazmat.primitives import serialization

from l4proxy import tls
from l4proxy.config import ServerTLSConfig, UpstreamTLSConfig
from l4proxy.errors import ConfigError

TIMEOUT = 5.0
Facts = dict[str, str | None]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")


# --- fixtures: a PKI on disk -----------------------------------------------------------------------


@dataclass
class PKI:
    """Paths of certificate material under one tmp dir, by short name (see ``pki``)."""

    dir: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        return str(self.paths[name]) if name in self.paths else str(self.dir / name)

    def write(self, name: str, data: bytes) -> str:
        self.paths[name] = self.dir / name
        self.paths[name].write_bytes(data)
        return str(self.paths[name])


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    """``ca`` signs ``server`` (localhost, 127.0.0.1, ::1) and ``client`` (CN l4proxy-client); ``other_ca``
    signs ``other_server`` and ``other_client``; ``localhost_only`` has no IP SANs; plus broken files."""
    p = PKI(tmp_path)
    ca, other_ca = trustme.CA(), trustme.CA()
    leaves = {
        "server": ca.issue_cert("localhost", "127.0.0.1", "::1"),
        "client": ca.issue_cert("l4proxy-client", common_name="l4proxy-client"),
        "localhost_only": ca.issue_cert("localhost"),
        "other_server": other_ca.issue_cert("localhost", "127.0.0.1"),
        "other_client": other_ca.issue_cert("intruder", common_name="intruder"),
    }
    p.write("ca.pem", ca.cert_pem.bytes())
    p.write("other_ca.pem", other_ca.cert_pem.bytes())
    for name, leaf in leaves.items():
        p.write(f"{name}.pem", b"".join(c.bytes() for c in leaf.cert_chain_pems))
        p.write(f"{name}.key", leaf.private_key_pem.bytes())
    key = serialization.load_pem_private_key(leaves["server"].private_key_pem.bytes(), None)
    encrypted = serialization.BestAvailableEncryption(b"secret")
    p.write(
        "encrypted.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encrypted)
    )
    p.write("garbage", b"hello, I am not a certificate\n")
    p.write("empty", b"")
    p.write("bad_base64.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    p.write("bad_key.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    (tmp_path / "a_dir").mkdir()
    return p


def server_cfg(p: PKI, **overrides: object) -> ServerTLSConfig:
    values: dict[str, object] = {"cert": p["server.pem"], "key": p["server.key"], **overrides}
    return ServerTLSConfig(**values)  # type: ignore[arg-type]


def trusting_client(p: PKI, ca: str = "ca.pem") -> ssl.SSLContext:
    return tls.client_context(UpstreamTLSConfig(ca=p[ca]))


# --- a handshake on loopback -----------------------------------------------------------------------


@dataclass
class Outcome:
    """Each side's ``describe()`` after a ping/pong exchange, or the exception that side raised."""

    server: Facts | BaseException | None = None
    client: Facts | BaseException | None = None

    @property
    def ok(self) -> bool:
        return isinstance(self.server, dict) and isinstance(self.client, dict)


def exchange(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    server_hostname: str | None,
    host: str = "127.0.0.1",
) -> Outcome:
    """Handshake, then the client sends ``ping`` and the server answers ``pong``.

    The round trip matters: with TLS 1.3 a server rejects a client certificate *after* the client has
    finished its handshake, so the client only sees the rejection when it reads.
    """
    outcome = Outcome()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as listener:
        listener.settimeout(TIMEOUT)
        thread = threading.Thread(target=_serve_once, args=(listener, server_ctx, outcome))
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as conn,
            ):
                conn.sendall(b"ping")
                assert _read_exactly(conn, 4) == b"pong"
                outcome.client = tls.describe(conn)
        except (OSError, AssertionError) as exc:
            outcome.client = exc
        finally:
            thread.join(TIMEOUT)
    assert not thread.is_alive()
    return outcome


def _serve_once(listener: socket.socket, ctx: ssl.SSLContext, outcome: Outcome) -> None:
    try:
        raw, _ = listener.accept()
        raw.settimeout(TIMEOUT)
        with ctx.wrap_socket(raw, server_side=True) as conn:
            assert _read_exactly(conn, 4) == b"ping"
            outcome.server = tls.describe(conn)
            conn.sendall(b"pong")
    except (OSError, AssertionError) as exc:
        outcome.server = exc


def _read_exactly(conn: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


# --- bad files: exact messages ---------------------------------------------------------------------

NOT_FOUND = "file not found"
IS_DIR = "is a directory, not a file"
NOT_CERT = "is not a PEM certificate"
NOT_KEY = "is not a PEM private key"
NOT_CA = "is not a valid CA bundle (no PEM certificate found)"
MISMATCH = "key does not match the certificate {cert}"

SERVER_FIELDS = {"cert": "cert", "key": "key", "client_ca": "client_ca"}
BAD_SERVER = [  # (config attribute, file given, problem); the message names the field and that file
    ("cert", "nope.pem", NOT_FOUND),
    ("cert", "a_dir", IS_DIR),
    ("cert", "garbage", NOT_CERT),
    ("cert", "empty", NOT_CERT),
    ("cert", "server.key", NOT_CERT),
    ("cert", "bad_base64.pem", NOT_CERT),
    ("key", "nope.key", NOT_FOUND),
    ("key", "a_dir", IS_DIR),
    ("key", "garbage", NOT_KEY),
    ("key", "server.pem", NOT_KEY),
    ("key", "bad_key.pem", "is not a valid PEM private key"),
    ("key", "encrypted.key", "is encrypted; give an unencrypted key"),
    ("key", "other_server.key", MISMATCH),
    ("client_ca", "nope.pem", NOT_FOUND),
    ("client_ca", "a_dir", IS_DIR),
    ("client_ca", "garbage", NOT_CA),
    ("client_ca", "empty", NOT_CA),
    ("client_ca", "server.key", NOT_CA),
]

UPSTREAM_FIELDS = {"ca": "ca", "cert": "cert", "key": "key"}
BAD_UPSTREAM = [
    ("ca", "nope.pem", NOT_FOUND),
    ("ca", "a_dir", IS_DIR),
    ("ca", "garbage", NOT_CA),
    ("ca", "bad_base64.pem", NOT_CA),
    ("cert", "nope.pem", NOT_FOUND),
    ("cert", "garbage", NOT_CERT),
    ("key", "nope.key", NOT_FOUND),
    ("key", "server.key", MISMATCH),
]


def _case_id(case: tuple[str, str, str]) -> str:
    return f"{case[0]}={case[1]}"


@pytest.mark.parametrize(("attr", "file", "problem"), BAD_SERVER, ids=map(_case_id, BAD_SERVER))
def test_server_context_bad_files(pki: PKI, attr: str, file: str, problem: str) -> None:
    cfg = server_cfg(pki, **{attr: pki[file]})
    with pytest.raises(ConfigError) as info:
        tls.server_context(cfg)
    field_name = SERVER_FIELDS[attr]
    assert str(info.value) == f"{field_name} {pki[file]!r}: {problem.format(cert=repr(cfg.pairs[0][0]))}"
    assert info.value.path == field_name


@pytest.mark.parametrize(("attr", "file", "problem"), BAD_UPSTREAM, ids=map(_case_id, BAD_UPSTREAM))
def test_client_context_bad_files(pki: PKI, attr: str, file: str, problem: str) -> None:
    pair = {"cert": pki["client.pem"], "key": pki["client.key"]} if attr in ("cert", "key") else {}
    cfg = UpstreamTLSConfig(**{**pair, attr: pki[file]})
    with pytest.raises(ConfigError) as info:
        tls.client_context(cfg)
    field_name = UPSTREAM_FIELDS[attr]
    assert str(info.value) == f"{field_name} {pki[file]!r}: {problem.format(cert=repr(cfg.cert))}"
    assert info.value.path == field_name


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(pki: PKI) -> None:
    os.chmod(pki["server.key"], 0)
    with pytest.raises(ConfigError) as info:
        tls.server_context(server_cfg(pki))
    assert str(info.value) == f"key {pki['server.key']!r}: not readable (permission denied)"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: tls.server_context(server_cfg(p, alpn=("x" * 256,))),
            "alpn {}: an ALPN protocol name must be 1 to 255 bytes".format(repr("x" * 256)),
        ),
        (
            lambda p: tls.client_context(UpstreamTLSConfig(alpn=("",))),
            "alpn '': an ALPN protocol name must be 1 to 255 bytes",
        ),
    ],
    ids=["server too long", "upstream empty"],
)
def test_bad_alpn(pki: PKI, make: Callable[[PKI], object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(pki)
    assert str(info.value) == message


# --- termination -----------------------------------------------------------------------------------


def test_server_context_handshake_and_describe(pki: PKI) -> None:
    server = tls.server_context(server_cfg(pki, alpn=("h2", "http/1.1")))
    client = tls.client_context(UpstreamTLSConfig(ca=pki["ca.pem"], alpn=("h2",)))
    out = exchange(server, client, "localhost")
    assert out.ok, out
    assert isinstance(out.server, dict) and isinstance(out.client, dict)
    assert out.server["sni"] == "localhost"
    assert out.server["version"] == "TLSv1.3"
    assert out.server["alpn"] == "h2"
    assert out.server["cipher"]
    assert out.server["peer_cn"] is None  # no client certificate asked for
    assert out.client == {**out.server, "peer_cn": None}  # the client sees the same facts
    assert server.verify_mode == ssl.CERT_NONE
    assert server.options & ssl.OP_NO_COMPRESSION
    assert server.options & ssl.OP_NO_RENEGOTIATION


def test_server_context_defaults_to_tls12_floor(pki: PKI) -> None:
    server = tls.server_context(server_cfg(pki))
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    old_client = trusting_client(pki)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    out = exchange(server, old_client, "localhost")
    assert out.ok, out
    assert isinstance(out.server, dict) and out.server["version"] == "TLSv1.2"
    assert out.server["sni"] == "localhost"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_server_context_rejects_tls11_client(pki: PKI) -> None:
    ancient = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ancient.check_hostname, ancient.verify_mode = False, ssl.CERT_NONE
    try:
        ancient.minimum_version = ancient.maximum_version = ssl.TLSVersion.TLSv1_1
        ancient.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot offer TLS 1.1")
    out = exchange(tls.server_context(server_cfg(pki)), ancient, "localhost")
    assert isinstance(out.server, ssl.SSLError) and isinstance(out.client, ssl.SSLError)


def test_min_version_13_rejects_tls12_only_client(pki: PKI) -> None:
    server = tls.server_context(server_cfg(pki, min_version="1.3"))
    old_client = trusting_client(pki)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    out = exchange(server, old_client, "localhost")
    assert isinstance(out.server, ssl.SSLError), out
    assert isinstance(out.client, ssl.SSLError), out
    assert exchange(server, trusting_client(pki), "localhost").ok


def test_server_records_no_sni_when_client_sends_none(pki: PKI) -> None:
    client = tls.client_context(UpstreamTLSConfig(insecure=True))
    out = exchange(tls.server_context(server_cfg(pki)), client, None)
    assert out.ok, out
    assert isinstance(out.server, dict) and out.server["sni"] is None


# --- mTLS on the listener --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_cert", "max_version", "accepted"),
    [
        (None, ssl.TLSVersion.TLSv1_3, False),
        (None, ssl.TLSVersion.TLSv1_2, False),
        ("client", ssl.TLSVersion.TLSv1_3, True),
        ("client", ssl.TLSVersion.TLSv1_2, True),
        ("other_client", ssl.TLSVersion.TLSv1_3, False),
        ("other_client", ssl.TLSVersion.TLSv1_2, False),
    ],
)
def test_mtls(pki: PKI, client_cert: str | None, max_version: ssl.TLSVersion, accepted: bool) -> None:
    server = tls.server_context(server_cfg(pki, client_ca=pki["ca.pem"]))
    assert server.verify_mode == ssl.CERT_REQUIRED
    client = trusting_client(pki)
    client.maximum_version = max_version
    if client_cert:
        client.load_cert_chain(pki[f"{client_cert}.pem"], pki[f"{client_cert}.key"])
    out = exchange(server, client, "localhost")
    if accepted:
        assert out.ok, out
        assert isinstance(out.server, dict) and out.server["peer_cn"] == "l4proxy-client"
    else:
        assert isinstance(out.server, ssl.SSLError), out
        assert isinstance(out.client, OSError), out


def test_mtls_does_not_trust_system_cas(pki: PKI) -> None:
    server = tls.server_context(server_cfg(pki, client_ca=pki["ca.pem"]))
    assert server.cert_store_stats()["x509_ca"] == 1


def test_upstream_client_certificate(pki: PKI) -> None:
    server = tls.server_context(server_cfg(pki, client_ca=pki["ca.pem"]))
    cfg = UpstreamTLSConfig(ca=pki["ca.pem"], cert=pki["client.pem"], key=pki["client.key"])
    out = exchange(server, tls.client_context(cfg), tls.server_hostname(cfg, "localhost"))
    assert out.ok, out
    assert isinstance(out.server, dict) and out.server["peer_cn"] == "l4proxy-client"
    assert isinstance(out.client, dict) and out.client["peer_cn"] is None  # trustme leaves have no CN


# --- origination -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "name", "error"),
    [
        ({"ca": "ca.pem"}, "localhost", None),
        ({"ca": "other_ca.pem"}, "localhost", "certificate verify failed: unable to get local issuer"),
        ({"ca": "ca.pem"}, "example.com", "Hostname mismatch, certificate is not valid for 'example.com'"),
        ({}, "localhost", "certificate verify failed: unable to get local issuer"),  # system store
        ({"insecure": True}, "example.com", None),
        ({"insecure": True, "ca": "other_ca.pem"}, "localhost", None),
    ],
    ids=["trusted", "untrusted CA", "wrong name", "system store", "insecure", "insecure ignores ca"],
)
def test_client_context_verification(pki: PKI, upstream: dict[str, object], name: str, error: str | None) -> None:
    values = {k: pki[v] if k == "ca" else v for k, v in upstream.items()}
    client = tls.client_context(UpstreamTLSConfig(**values))  # type: ignore[arg-type]
    out = exchange(tls.server_context(server_cfg(pki)), client, name)
    if error is None:
        assert out.ok, out
    else:
        assert isinstance(out.client, ssl.SSLCertVerificationError), out
        assert error in str(out.client)


def test_client_context_defaults() -> None:
    ctx = tls.client_context(UpstreamTLSConfig())
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    insecure = tls.client_context(UpstreamTLSConfig(insecure=True))
    assert (insecure.verify_mode, insecure.check_hostname) == (ssl.CERT_NONE, False)


@pytest.mark.parametrize(
    ("sni", "member", "expected"),
    [
        (None, "redis.internal", "redis.internal"),
        (None, "redis.internal.", "redis.internal"),
        ("api.example.com", "10.0.0.7", "api.example.com"),
        ("api.example.com", "redis.internal", "api.example.com"),
        (None, "10.0.0.7", "10.0.0.7"),
        (None, "::1", "::1"),
        (None, "fe80::1%eth0", "fe80::1"),
        (None, "", None),
    ],
)
def test_server_hostname(sni: str | None, member: str, expected: str | None) -> None:
    assert tls.server_hostname(UpstreamTLSConfig(sni=sni), member) == expected


@pytest.mark.parametrize(
    ("host", "cert", "ok"),
    [
        ("127.0.0.1", "server", True),
        ("127.0.0.1", "localhost_only", False),
        pytest.param("::1", "server", True, marks=needs_ipv6),
        pytest.param("::1", "localhost_only", False, marks=needs_ipv6),
    ],
)
def test_ip_member_verifies_ip_san_and_sends_no_sni(pki: PKI, host: str, cert: str, ok: bool) -> None:
    cfg = UpstreamTLSConfig(ca=pki["ca.pem"])
    server = tls.server_context(server_cfg(pki, cert=pki[f"{cert}.pem"], key=pki[f"{cert}.key"]))
    out = exchange(server, tls.client_context(cfg), tls.server_hostname(cfg, host), host=host)
    if ok:
        assert out.ok, out
        assert isinstance(out.server, dict) and out.server["sni"] is None  # IP literals are never sent
        assert isinstance(out.client, dict) and out.client["sni"] is None
    else:
        assert isinstance(out.client, ssl.SSLCertVerificationError), out
        assert f"IP address mismatch, certificate is not valid for '{host}'" in str(out.client)


def test_describe_none() -> None:
    assert tls.describe(None) == dict.fromkeys(("sni", "version", "alpn", "cipher", "peer_cn"))


# --- asyncio / uvloop transports -------------------------------------------------------------------


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_describe_from_event_loop_transport(pki: PKI, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """The SNI recorded by the sni_callback is found again through ``get_extra_info('ssl_object')``."""
    server_ctx = tls.server_context(server_cfg(pki, client_ca=pki["ca.pem"], alpn=("redis",)))
    upstream = UpstreamTLSConfig(ca=pki["ca.pem"], cert=pki["client.pem"], key=pki["client.key"], alpn=("redis",))

    async def main() -> tuple[Facts, Facts]:
        seen: asyncio.Future[Facts] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.set_result(tls.describe(writer.get_extra_info("ssl_object")))
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection(
                "127.0.0.1",
                port,
                ssl=tls.client_context(upstream),
                server_hostname=tls.server_hostname(upstream, "localhost"),
            )
            client_facts = tls.describe(writer.get_extra_info("ssl_object"))
            server_facts = await asyncio.wait_for(seen, TIMEOUT)
            writer.close()
        return server_facts, client_facts

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        server_facts, client_facts = runner.run(main())
    assert server_facts["sni"] == client_facts["sni"] == "localhost"
    assert server_facts["alpn"] == client_facts["alpn"] == "redis"
    assert server_facts["peer_cn"] == "l4proxy-client"
    assert server_facts["version"] == "TLSv1.3"


# --- interop with OpenSSL's own client -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
@pytest.mark.parametrize("with_client_cert", [False, True], ids=["server auth", "mTLS"])
def test_openssl_s_client_interop(pki: PKI, with_client_cert: bool) -> None:
    client_ca = pki["ca.pem"] if with_client_cert else None
    server = tls.server_context(server_cfg(pki, client_ca=client_ca, alpn=("h2",)))
    received: list[bytes | Facts | BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        thread = threading.Thread(target=_serve_line, args=(listener, server, received))
        thread.start()
        port = listener.getsockname()[1]
        cmd = [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            "-CAfile",
            pki["ca.pem"],
            "-verify_return_error",
            "-alpn",
            "h2",
            "-brief",
        ]
        if with_client_cert:
            cmd += ["-cert", pki["client.pem"], "-key", pki["client.key"]]
        result = subprocess.run(cmd, input=b"hello\n", capture_output=True, timeout=TIMEOUT * 2)
        thread.join(TIMEOUT)
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    assert "Verification: OK" in output
    assert "Protocol version: TLSv1.3" in output
    facts, line = received
    assert line == b"hello\n"
    assert isinstance(facts, dict)
    assert (facts["sni"], facts["alpn"]) == ("localhost", "h2")
    assert facts["peer_cn"] == ("l4proxy-client" if with_client_cert else None)


def _serve_line(listener: socket.socket, ctx: ssl.SSLContext, received: list[bytes | Facts | BaseException]) -> None:
    try:
        raw, _ = listener.accept()
        raw.settimeout(TIMEOUT)
        with ctx.wrap_socket(raw, server_side=True) as conn:
            received.append(tls.describe(conn))
            received.append(conn.makefile("rb").readline())
            with contextlib.suppress(OSError):  # close_notify: s_client sees a clean end, not "unexpected eof"
                conn.unwrap()
    except OSError as exc:
        received.append(exc)


# --- module rules ----------------------------------------------------------------------------------


def test_tls_module_does_no_io_of_its_own() -> None:
    """tls.py builds contexts; sockets and the event loop belong to the listener and dialer."""
    tree = ast.parse(Path(tls.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    assert not imported & {"asyncio", "socket", "selectors", "uvloop", "threading"}
