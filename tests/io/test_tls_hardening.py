"""TLS hardening on a real listener: the cipher policy, session resumption, several certificates chosen
by SNI, and certificate dates. OpenSSL's own ``s_client`` and Python's ``ssl`` are the clients; the
proxy runs in process in front of an echo member. Certificates come from trustme, with chosen dates.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme

from l4proxy import Address, ServerTLSConfig, UpstreamTLSConfig, tls
from l4proxy.errors import ConfigError

from ..kit import make_config, running, upstreams
from ..servers import PING, Command, RedisServer, free_port, run_command, started

TIMEOUT = 5.0
OPENSSL = shutil.which("openssl") or "openssl"
NOW = datetime.now(UTC)


@dataclass
class PKI:
    """Certificate files by short name (``NAME.pem``/``NAME.key``) and the CA file that signs them all."""

    dir: Path
    ca: trustme.CA = field(default_factory=trustme.CA)

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)

    def issue(self, name: str, *identities: str, **options: object) -> None:
        leaf = self.ca.issue_cert(*identities, common_name=identities[0], **options)  # type: ignore[arg-type]
        (self.dir / f"{name}.pem").write_bytes(b"".join(c.bytes() for c in leaf.cert_chain_pems))
        (self.dir / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())

    def server_tls(self, *names: str, **settings: object) -> ServerTLSConfig:
        values: dict[str, object] = {
            "cert": tuple(self[f"{n}.pem"] for n in names),
            "key": tuple(self[f"{n}.key"] for n in names),
            **settings,
        }
        return ServerTLSConfig(**values)  # type: ignore[arg-type]

    def client(self, max_version: ssl.TLSVersion | None = None, check_hostname: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self["ca.pem"])
        ctx.check_hostname = check_hostname
        if max_version is not None:
            ctx.maximum_version = max_version
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """``default`` (localhost, 127.0.0.1, ::1), ``rsa`` (the same names, an RSA key), ``a`` (a.test and
    *.wild.test), ``b`` (b.test), ``shadowed`` (a.test again), ``client`` (CN good-client); dated ones:
    ``expired``, ``future``, ``soon`` (5 days left), ``month`` (30 days left)."""
    p = PKI(tmp_path_factory.mktemp("pki"))
    (p.dir / "ca.pem").write_bytes(p.ca.cert_pem.bytes())
    p.issue("default", "localhost", "127.0.0.1", "::1")
    p.issue("rsa", "localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    p.issue("a", "a.test", "*.wild.test")
    p.issue("b", "b.test")
    p.issue("shadowed", "a.test")
    p.issue("client", "good-client")
    p.issue("expired", "localhost", not_before=NOW - timedelta(days=90), not_after=NOW - timedelta(days=1))
    p.issue("future", "localhost", not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=90))
    p.issue("soon", "localhost", not_before=NOW - timedelta(days=80), not_after=NOW + timedelta(days=5, hours=1))
    p.issue("month", "localhost", not_before=NOW - timedelta(days=60), not_after=NOW + timedelta(days=30))
    return p


@dataclass
class SClient:
    """What one ``openssl s_client`` run printed, and whether a line made it through the proxy and back."""

    output: str
    echoed: bool

    @property
    def cipher(self) -> str | None:
        for line in self.output.splitlines():
            if line.startswith(("New, ", "Reused, ")) and "Cipher is " in line:
                return line.split("Cipher is ", 1)[1].strip()
        return None

    @property
    def subject_cn(self) -> str | None:
        """The CN of the certificate the server presented."""
        for line in self.output.splitlines():
            if line.startswith("subject=") and ", CN = " in line:
                return line.rsplit(", CN = ", 1)[1].strip()
        return None

    @property
    def reused(self) -> bool:
        return any(line.startswith("Reused, ") for line in self.output.splitlines())


async def s_client(port: int, *args: str, servername: str = "localhost", host: str = "127.0.0.1") -> SClient:
    """Connect with ``openssl s_client``, send a line and wait for its echo (so the session tickets a
    TLS 1.3 server sends after the handshake have arrived), then close stdin and collect the output."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    proc = await asyncio.create_subprocess_exec(
        OPENSSL, "s_client", "-connect", target, "-servername", servername, "-CAfile", str(Path(args[0])),
        *args[1:], stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    output = b""
    try:
        # a refused handshake may end s_client before the line is written: its pipe is then closed
        with contextlib.suppress(ConnectionError, RuntimeError):
            proc.stdin.write(b"ping through the proxy\n")
            await proc.stdin.drain()
        while b"\nping through the proxy\n" not in output:
            chunk = await asyncio.wait_for(proc.stdout.read(4096), TIMEOUT)
            if not chunk:
                break
            output += chunk
        echoed = b"\nping through the proxy\n" in output
        proc.stdin.close()
        output += await asyncio.wait_for(proc.stdout.read(), TIMEOUT)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.wait_for(proc.wait(), TIMEOUT)
    return SClient(output.decode(errors="replace"), echoed)


async def peer_of(port: int, ctx: ssl.SSLContext, server_name: str | None, host: str = "127.0.0.1") -> dict[str, str]:
    """The subject of the certificate the proxy serves for ``server_name``, over a Python ssl connection
    that also relays a line through to the echo member and back."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_name), TIMEOUT
    )
    try:
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), TIMEOUT) == b"hello"
        cert = writer.get_extra_info("peercert")
        return {key: value for rdn in cert["subject"] for key, value in rdn}
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer.wait_closed(), TIMEOUT)


# --- the cipher policy -----------------------------------------------------------------------------

ACCEPTED, REFUSED = True, False


@pytest.mark.parametrize(("cert", "cipher", "outcome"), [
    ("rsa", "ECDHE-RSA-AES128-GCM-SHA256", ACCEPTED),
    ("rsa", "ECDHE-RSA-AES256-GCM-SHA384", ACCEPTED),
    ("rsa", "ECDHE-RSA-CHACHA20-POLY1305", ACCEPTED),
    ("rsa", "ECDHE-RSA-AES128-SHA256", REFUSED),  # CBC, which Python's own default list accepts
    ("rsa", "ECDHE-RSA-AES256-SHA384", REFUSED),  # CBC
    ("rsa", "ECDHE-RSA-AES128-SHA", REFUSED),  # CBC with SHA-1
    ("rsa", "AES128-GCM-SHA256", REFUSED),  # RSA key exchange: no forward secrecy
    ("rsa", "DHE-RSA-AES128-GCM-SHA256", REFUSED),  # finite-field DHE
    ("default", "ECDHE-ECDSA-AES128-GCM-SHA256", ACCEPTED),
    ("default", "ECDHE-ECDSA-CHACHA20-POLY1305", ACCEPTED),
    ("default", "ECDHE-ECDSA-AES256-SHA384", REFUSED),  # CBC
])  # fmt: skip
async def test_tls12_accepts_only_ecdhe_with_aead(
    pki: PKI, cert: str, cipher: str, outcome: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async with upstreams(1) as [server], running(make_config([server.address], tls=pki.server_tls(cert))) as (
        proxy,
        _,
    ):
        result = await s_client(proxy.port(), pki["ca.pem"], "-tls1_2", "-cipher", f"{cipher}:@SECLEVEL=0")
    if outcome is ACCEPTED:
        assert result.echoed and result.cipher == cipher, result.output
        assert proxy.tls_failures == 0
    else:
        assert not result.echoed and result.cipher in (None, "(NONE)"), result.output
        assert proxy.tls_failures == 1
        assert "failed: NO_SHARED_CIPHER" in caplog.text


async def test_tls_ciphers_replaces_the_tls12_list(pki: PKI) -> None:
    tls_config = pki.server_tls("rsa", ciphers="ECDHE-RSA-AES256-SHA384")
    async with upstreams(1) as [server], running(make_config([server.address], tls=tls_config)) as (proxy, _):
        chosen = await s_client(proxy.port(), pki["ca.pem"], "-tls1_2", "-cipher", "ECDHE-RSA-AES256-SHA384")
        default = await s_client(proxy.port(), pki["ca.pem"], "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
        tls13 = await s_client(proxy.port(), pki["ca.pem"])  # TLS 1.3 keeps OpenSSL's suites
    assert chosen.echoed and chosen.cipher == "ECDHE-RSA-AES256-SHA384", chosen.output
    assert not default.echoed, default.output
    assert tls13.echoed and (tls13.cipher or "").startswith("TLS_"), tls13.output


@pytest.mark.parametrize(("offered", "chosen"), [
    # the server's order wins...
    ("ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"),
    ("ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305", "ECDHE-RSA-AES256-GCM-SHA384"),
    # ...except for a client that puts ChaCha20 first (no AES instructions)
    ("ECDHE-RSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"),
])  # fmt: skip
async def test_server_chooses_the_cipher_but_honours_a_chacha_first_client(pki: PKI, offered: str, chosen: str) -> None:
    async with upstreams(1) as [server], running(make_config([server.address], tls=pki.server_tls("rsa"))) as (
        proxy,
        log,
    ):
        ctx = pki.client(ssl.TLSVersion.TLSv1_2)
        ctx.set_ciphers(offered)
        await peer_of(proxy.port(), ctx, "localhost")
        await log.wait_for(1)
    assert f" tls_cipher={chosen}" in log.lines[0], log.lines[0]


def test_default_policy_on_the_context(pki: PKI) -> None:
    ctx = tls.server_context(pki.server_tls("rsa"))
    tls12 = sorted(c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2")
    assert tls12 == sorted(tls.INTERMEDIATE_CIPHERS.split(":"))
    assert all(c["aead"] and c["kea"] == "kx-ecdhe" for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2")
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_cipher_list_openssl_does_not_know_is_a_config_error(pki: PKI) -> None:
    with pytest.raises(ConfigError) as info:
        tls.server_context(pki.server_tls("default", ciphers="NO-SUCH-CIPHER"))
    assert str(info.value) == "ciphers 'NO-SUCH-CIPHER': OpenSSL knows no TLS 1.2 cipher in this list"


# --- session resumption ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", [["-tls1_3"], ["-tls1_2"], ["-tls1_2", "-no_ticket"]],
                         ids=["TLS 1.3 ticket", "TLS 1.2 ticket", "TLS 1.2 session cache"])  # fmt: skip
async def test_a_returning_client_resumes_until_a_reload_renews_the_keys(
    pki: PKI, tmp_path: Path, how: list[str]
) -> None:
    session = str(tmp_path / "session.pem")
    async with upstreams(1) as [server], running(make_config([server.address], tls=pki.server_tls("default"))) as (
        proxy,
        _,
    ):
        first = await s_client(proxy.port(), pki["ca.pem"], *how, "-sess_out", session)
        again = await s_client(proxy.port(), pki["ca.pem"], *how, "-sess_in", session)
        assert proxy.reload_tls() == []
        after_reload = await s_client(proxy.port(), pki["ca.pem"], *how, "-sess_in", session)
    assert first.echoed and not first.reused, first.output
    assert again.echoed and again.reused, again.output
    assert after_reload.echoed and not after_reload.reused, after_reload.output  # a new context, a new key


async def test_resumption_with_a_certificate_chosen_by_sni(pki: PKI, tmp_path: Path) -> None:
    """Tickets are sealed with the listener's (the default certificate's) key, whichever certificate served."""
    session = str(tmp_path / "session.pem")
    async with upstreams(1) as [server], running(
        make_config([server.address], tls=pki.server_tls("default", "a", "b"))
    ) as (proxy, _):
        first = await s_client(proxy.port(), pki["ca.pem"], "-sess_out", session, servername="b.test")
        again = await s_client(proxy.port(), pki["ca.pem"], "-sess_in", session, servername="b.test")
    assert first.echoed and first.subject_cn == "b.test", first.output
    assert again.echoed and again.reused, again.output


# --- several certificates chosen by SNI ------------------------------------------------------------

SNI_CASES = [  # (server name sent, CN of the certificate served)
    ("a.test", "a.test"),
    ("A.Test", "a.test"),
    ("x.wild.test", "a.test"),  # *.wild.test
    ("b.test", "b.test"),
    ("localhost", "localhost"),
    ("unknown.test", "localhost"),  # no match: the default
    ("wild.test", "localhost"),  # a wildcard needs a label in front
    ("y.x.wild.test", "localhost"),  # and covers only one
]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_each_name_gets_its_certificate_and_unknown_names_the_default(pki: PKI, host: str) -> None:
    async with upstreams(1) as [server], running(
        make_config([server.address], Address(host, 0), tls=pki.server_tls("default", "a", "b", "shadowed"))
    ) as (proxy, log):
        for name, common_name in SNI_CASES:
            result = await s_client(proxy.port(), pki["ca.pem"], "-verify_return_error", servername=name, host=host)
            assert result.echoed and result.subject_cn == common_name, (name, result.output)
            subject = await peer_of(proxy.port(), pki.client(check_hostname=False), name, host)
            assert subject["commonName"] == common_name, name
        no_sni = await peer_of(proxy.port(), pki.client(check_hostname=False), None, host)
        assert no_sni["commonName"] == "localhost"
        # verification by name succeeds wherever a certificate has the name
        assert (await peer_of(proxy.port(), pki.client(), "x.wild.test", host))["commonName"] == "a.test"
        await log.wait_for(2 * len(SNI_CASES) + 2)
    assert sum(" tls_sni=x.wild.test " in line for line in log.lines) == 3
    assert sum(" tls_sni=A.Test " in line for line in log.lines) == 2  # the name as the client sent it


async def test_client_certificates_are_required_whichever_certificate_serves(pki: PKI) -> None:
    async with upstreams(1) as [server], running(
        make_config([server.address], tls=pki.server_tls("default", "b", client_ca=pki["ca.pem"]))
    ) as (proxy, log):
        with_cert = pki.client()
        with_cert.load_cert_chain(pki["client.pem"], pki["client.key"])
        assert (await peer_of(proxy.port(), with_cert, "b.test"))["commonName"] == "b.test"
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await peer_of(proxy.port(), pki.client(), "b.test")
        await log.wait_for(1)
    assert " tls_peer_cn=good-client" in log.lines[0]


def test_one_certificate_installs_no_selection(pki: PKI) -> None:
    """The SNI callback of a one-certificate listener only records the name, as it did before selection
    existed; a listener with two or more gets the selector."""
    assert not isinstance(tls.server_context(pki.server_tls("default")).sni_callback, tls._Selector)
    assert isinstance(tls.server_context(pki.server_tls("default", "a")).sni_callback, tls._Selector)


def test_a_certificate_no_name_selects_is_a_warning(pki: PKI) -> None:
    warnings: list[ConfigError] = []
    tls.server_context(pki.server_tls("default", "a", "shadowed", "b"), warnings.append)
    assert [(w.path, w.value) for w in warnings] == [("cert[2]", pki["shadowed.pem"])]
    assert warnings[0].problem == "no SNI name selects it: it has no DNS names, or earlier certificates serve them all"


async def test_reload_renews_each_certificate_and_keeps_a_broken_one(pki: PKI, tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("one.pem", "one.key", "two.pem", "two.key")}
    for name, path in files.items():
        path.write_bytes(Path(pki[name.replace("one", "default").replace("two", "a")]).read_bytes())
    tls_config = ServerTLSConfig(
        cert=(str(files["one.pem"]), str(files["two.pem"])), key=(str(files["one.key"]), str(files["two.key"]))
    )
    loose = pki.client(check_hostname=False)
    async with upstreams(1) as [server], running(make_config([server.address], tls=tls_config)) as (proxy, _):
        # the default's files now hold b.test's certificate; the second's are broken
        files["one.pem"].write_bytes(Path(pki["b.pem"]).read_bytes())
        files["one.key"].write_bytes(Path(pki["b.key"]).read_bytes())
        files["two.pem"].write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        problems = proxy.reload_tls()
        assert [(p.path, p.value, p.problem) for p in problems] == [
            ("listeners[0].tls.cert[1]", str(files["two.pem"]), "is not a PEM certificate")
        ]
        assert (await peer_of(proxy.port(), loose, "unknown.test"))["commonName"] == "b.test"  # renewed
        assert (await peer_of(proxy.port(), loose, "a.test"))["commonName"] == "a.test"  # kept, names too
        assert (await peer_of(proxy.port(), loose, "b.test"))["commonName"] == "b.test"

        default = proxy.server_tls[0]
        files["one.pem"].write_bytes(b"")  # now the default breaks: the listener keeps its context
        files["two.pem"].write_bytes(Path(pki["b.pem"]).read_bytes())
        files["two.key"].write_bytes(Path(pki["b.key"]).read_bytes())
        assert [p.path for p in proxy.reload_tls()] == ["listeners[0].tls.cert[0]"]
        assert proxy.server_tls[0] is default
        assert (await peer_of(proxy.port(), loose, "a.test"))["commonName"] == "b.test"  # a.test is gone: default


# --- certificate dates -----------------------------------------------------------------------------


def _period(pki: PKI, name: str) -> str:
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(Path(pki[f"{name}.pem"]).read_bytes())
    stamp = "%Y-%m-%d %H:%M UTC"
    return f"valid from {leaf.not_valid_before_utc:{stamp}} to {leaf.not_valid_after_utc:{stamp}}"


@pytest.mark.parametrize(("name", "problem"), [
    ("expired", "expired on {after} ({period})"),
    ("future", "is not valid yet ({period})"),
])  # fmt: skip
def test_a_certificate_outside_its_dates_is_refused(pki: PKI, name: str, problem: str) -> None:
    period = _period(pki, name)
    expected = problem.format(period=period, after=period.rsplit(" to ", 1)[1])
    with pytest.raises(ConfigError) as info:
        tls.server_context(pki.server_tls(name))
    assert (info.value.path, info.value.value, info.value.problem) == ("cert", pki[f"{name}.pem"], expected)
    with pytest.raises(ConfigError) as info:  # second of several: the message says which
        tls.server_context(pki.server_tls("default", name))
    assert (info.value.path, info.value.problem) == ("cert[1]", expected)
    with pytest.raises(ConfigError) as info:  # a client certificate presented to upstreams, too
        tls.client_context(UpstreamTLSConfig(cert=pki[f"{name}.pem"], key=pki[f"{name}.key"]))
    assert (info.value.path, info.value.problem) == ("cert", expected)


def test_a_certificate_that_expires_within_14_days_is_a_warning(pki: PKI) -> None:
    after = _period(pki, "soon").rsplit(" to ", 1)[1]
    warnings: list[ConfigError] = []
    tls.server_context(pki.server_tls("soon"), warnings.append)
    tls.client_context(UpstreamTLSConfig(cert=pki["soon.pem"], key=pki["soon.key"]), warnings.append)
    assert [(w.path, w.value, w.problem) for w in warnings] == [
        ("cert", pki["soon.pem"], f"expires in 5 days, on {after}")
    ] * 2
    warnings.clear()
    tls.server_context(pki.server_tls("month"), warnings.append)  # 30 days left: nothing to say yet
    assert warnings == []


# --- the l4proxy command ---------------------------------------------------------------------------


def _served_cn(port: int, pki: PKI, server_name: str) -> str:
    """PING through the command's listener, asking for ``server_name``; the CN of the certificate served."""
    ctx = pki.client(check_hostname=False)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, ctx.wrap_socket(
        raw, server_hostname=server_name
    ) as conn:
        conn.sendall(PING)
        assert conn.recv(100) == b"+PONG\r\n"
        return str(dict(rdn[0] for rdn in conn.getpeercert()["subject"])["commonName"])


def test_command_serves_repeated_certificates_by_sni_and_warns_of_expiry_at_start_and_reload(
    tmp_path: Path, pki: PKI
) -> None:
    redis = RedisServer(tmp_path)
    pairs = [arg for name in ("default", "a", "soon") for arg in ("--tls-cert", pki[f"{name}.pem"])]
    keys = [arg for name in ("default", "a", "soon") for arg in ("--tls-key", pki[f"{name}.key"])]
    proxy = Command("--upstream", f"127.0.0.1:{redis.port}", *pairs, *keys)
    with started(redis, proxy):
        assert [_served_cn(proxy.port, pki, name) for name in ("a.test", "z.wild.test", "b.test", "localhost")] == [
            "a.test", "a.test", "localhost", "localhost"
        ]
        proxy.signal(signal.SIGHUP)
        proxy.wait_log("SIGHUP: TLS certificates and keys reloaded")
        assert _served_cn(proxy.port, pki, "a.test") == "a.test"
        assert proxy.stop() == 0
    expiring = f"--tls-cert {pki['soon.pem']!r}: expires in 5 days, on "
    warnings = [line for line in proxy.stderr.splitlines() if expiring in line]
    assert len(warnings) == 2 and all(" WARNING " in line for line in warnings), proxy.stderr
    assert "SIGHUP: " not in warnings[0] and "SIGHUP: " in warnings[1]
    unreachable = [line for line in proxy.stderr.splitlines() if "no SNI name selects it" in line]
    assert len(unreachable) == 2, proxy.stderr  # soon.pem's only name, localhost, is the default's


@pytest.mark.parametrize(("flags", "message"), [
    (["--tls-cert", "<expired.pem>", "--tls-key", "<expired.key>"], "--tls-cert '<expired.pem>': expired on {after}"),
    (["--tls-cert", "<default.pem>", "--tls-cert", "<future.pem>", "--tls-key", "<default.key>",
      "--tls-key", "<future.key>"], "--tls-cert '<future.pem>': is not valid yet"),
    (["--tls-cert", "<default.pem>", "--tls-cert", "<a.pem>", "--tls-key", "<default.key>"],
     "--tls-key: expected one key per certificate, in the same order; got 2 certificates and 1 key"),
    (["--tls-cert", "<default.pem>", "--tls-cert", "<a.pem>", "--tls-key", "<a.key>", "--tls-key", "<default.key>"],
     "--tls-key '<a.key>': key does not match the certificate '<default.pem>'"),
])  # fmt: skip
def test_command_start_up_errors(pki: PKI, flags: list[str], message: str) -> None:
    def fill(text: str) -> str:
        return re.sub(r"<([\w.]+)>", lambda m: pki[m.group(1)], text)

    out = run_command("--listen", f"127.0.0.1:{free_port()}", "--upstream", "127.0.0.1:1", *map(fill, flags))
    period = _period(pki, "future" if "future" in message else "expired")
    expected = fill(message).format(after=period.rsplit(" to ", 1)[1])
    if "valid" in message or "expired" in message:
        expected += f" ({period})"
    assert (out.returncode, out.stderr, out.stdout) == (2, f"l4proxy: error: {expected}\n", "")


def test_check_names_an_expiring_certificate_of_a_config_file_by_line(tmp_path: Path, pki: PKI) -> None:
    config = tmp_path / "l4proxy.toml"
    config.write_text(
        '[listeners.web]\naddress = "127.0.0.1:7000"\npool = "p"\n[listeners.web.tls]\n'
        f'cert = ["{pki["default.pem"]}", "{pki["soon.pem"]}"]\nkey = ["{pki["default.key"]}", "{pki["soon.key"]}"]\n'
        '[pools.p]\nmembers = ["127.0.0.1:7001"]\n'
    )
    out = run_command("check", "--config", str(config))
    after = _period(pki, "soon").rsplit(" to ", 1)[1]
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        f"warning: {config}:5: listeners.web.tls.cert[1]: expires in 5 days, on {after} (got {pki['soon.pem']!r})",
        f"warning: {config}:5: listeners.web.tls.cert[1]: no SNI name selects it: it has no DNS names, or earlier"
        f" certificates serve them all (got {pki['soon.pem']!r})",
    ]
