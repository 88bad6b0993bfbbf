"""TLS through an in-process Proxy on real loopback sockets: termination, origination, mTLS both ways,
retries past upstreams that fail verification, handshake timeouts and garbage handshakes, and
byte-exact integrity of a large transfer through each kind of TLS side.

RELIABILITY.md cases 3 (close_notify is a TLS side's EOF; every combination of half-closed sides is in
``test_tls_halfclose.py``), 24, 25, 26 and 27, plus 5 and 11 with a TLS side. Certificates come from trustme.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import socket
import ssl
import time
from pathlib import Path

import pytest

from l4proxy import Address
from l4proxy.config import ServerTLSConfig, UpstreamTLSConfig

from ..kit import (
    PKI,
    Upstream,
    client_hello,
    close,
    eventually,
    make_config,
    open_tls,
    running,
    tls_upstream,
    upstreams,
)

TIMEOUT = 5.0


# --- servers and clients ---------------------------------------------------------------------------


async def tls_exchange(port: int, ctx: ssl.SSLContext, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``payload`` over TLS and read back as many bytes (asyncio's TLS streams cannot half-close)."""
    reader, writer = await open_tls(port, ctx, host)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT)
    finally:
        await close(writer)


async def plain_exchange(port: int, payload: bytes) -> bytes:
    """Like ``tls_exchange`` for a plain client: no half-close, since asyncio's TLS servers close at
    close_notify."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT)
    finally:
        await close(writer)


async def rejected(port: int, ctx: ssl.SSLContext) -> bool:
    """True when the proxy refuses this TLS client: the handshake fails, or (TLS 1.3, where the server
    judges the client certificate after the client is done) the first read fails or hits EOF."""
    try:
        reader, writer = await open_tls(port, ctx)
    except (ssl.SSLError, ConnectionError):
        return True
    try:
        writer.write(b"ping")
        return await asyncio.wait_for(reader.read(100), TIMEOUT) == b""
    except (ssl.SSLError, ConnectionError):
        return True
    finally:
        await close(writer)


async def seconds_until_closed(reader: asyncio.StreamReader) -> float:
    """Read and discard until the proxy closes the connection (EOF or reset); how long it took."""
    start = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(4096), TIMEOUT):
            pass
    return time.monotonic() - start


def handshake_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("TLS handshake with ")]


def client_port(writer: asyncio.StreamWriter) -> int:
    return int(writer.get_extra_info("sockname")[1])


# --- termination -----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("alpn", [(), ("h2", "http/1.1")])
async def test_termination_relays_bytes_and_logs_tls_facts(pki: PKI, host: str, alpn: tuple[str, ...]) -> None:
    payload = os.urandom(200_000)
    async with upstreams(1) as [server], running(
        make_config([server.address], Address(host, 0), tls=pki.server_tls(alpn=alpn))
    ) as (proxy, log):
        ctx = pki.client_ctx(alpn=["http/1.1"] if alpn else None)
        reader, writer = await open_tls(proxy.port(), ctx, host)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == ("http/1.1" if alpn else None)
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT) == payload
        await close(writer)
        await log.wait_for(1)
    line = log.lines[0]
    assert f"in={len(payload)} out={len(payload)}" in line
    assert f"upstream={server.address} " in line
    assert " tls_sni=localhost " in line and " tls_version=TLSv1.3 " in line and " tls_cipher=TLS_" in line
    assert (" tls_alpn=http/1.1" in line) == bool(alpn)
    assert "tls_peer_cn=" not in line  # no client certificate was asked for
    assert proxy.tls_failures == 0


async def test_openssl_s_client_through_termination(pki: PKI) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is not installed"
    async with upstreams(1) as [server], running(make_config([server.address], tls=pki.server_tls())) as (proxy, log):
        proc = await asyncio.create_subprocess_exec(
            openssl, "s_client", "-connect", f"127.0.0.1:{proxy.port()}", "-servername", "localhost",
            "-CAfile", pki["ca.pem"], "-verify_return_error", "-quiet",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"hello through the proxy\n")
            assert await asyncio.wait_for(proc.stdout.readline(), TIMEOUT) == b"hello through the proxy\n"
        finally:
            if proc.returncode is None:
                proc.kill()
            await asyncio.wait_for(proc.wait(), TIMEOUT)
        await log.wait_for(1)
    assert " tls_sni=localhost " in log.lines[0]
    assert proxy.tls_failures == 0


async def test_tls_client_close_notify_reaches_the_upstream_as_a_fin(pki: PKI) -> None:
    """Case 3: a TLS client's close_notify is its EOF. The upstream gets every byte and then a FIN, and
    its close ends the session cleanly."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(await reader.read())  # returns at the FIN the proxy forwards

    payload = os.urandom(300_000)
    async with Upstream(collect) as server, running(make_config([server.address], tls=pki.server_tls())) as (
        proxy,
        log,
    ):
        _reader, writer = await open_tls(proxy.port(), pki.client_ctx())
        writer.write(payload)
        await close(writer)  # flushes, then sends close_notify
        assert await asyncio.wait_for(got, TIMEOUT) == payload
        await log.wait_for(1)
    assert log.sessions[0].bytes_in == len(payload)
    assert log.sessions[0].end_cause == "eof"


async def test_upstream_that_writes_then_closes_reaches_the_tls_client_whole(pki: PKI) -> None:
    """Case 5 with a TLS client side: every byte arrives before the proxy's close_notify."""
    blob = os.urandom(1_000_000)

    async def dump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(blob)
        await writer.drain()

    async with Upstream(dump) as server, running(make_config([server.address], tls=pki.server_tls())) as (
        proxy,
        log,
    ):
        reader, writer = await open_tls(proxy.port(), pki.client_ctx())
        received = await asyncio.wait_for(reader.read(), TIMEOUT)  # until close_notify/EOF
        await close(writer)
        await log.wait_for(1)
    assert received == blob
    assert log.sessions[0].bytes_out == len(blob)


# --- mTLS on the listener ---------------------------------------------------------------------------


async def test_client_certificates_are_required_and_checked(pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    """Case 26: no certificate, or one from another CA, is rejected before any upstream is dialed; a
    session already open and a later valid client are unaffected; the peer CN is logged."""
    mtls = pki.server_tls(client_ca=pki["ca.pem"])
    async with upstreams(1) as [server], running(make_config([server.address], tls=mtls)) as (proxy, log):
        port = proxy.port()
        reader, writer = await open_tls(port, pki.client_ctx(cert="client"))  # stays open throughout
        writer.write(b"first")
        assert await asyncio.wait_for(reader.readexactly(5), TIMEOUT) == b"first"

        assert await rejected(port, pki.client_ctx())
        assert await rejected(port, pki.client_ctx(cert="other_client"))
        await eventually(lambda: proxy.tls_failures == 2)
        assert server.accepted == 1  # only the good client reached the upstream

        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), TIMEOUT) == b"still here"
        assert await tls_exchange(port, pki.client_ctx(cert="client"), b"another") == b"another"
        await close(writer)
        await log.wait_for(2)
    assert all(" tls_peer_cn=good-client" in line for line in log.lines)
    assert len(log.lines) == 2  # rejected handshakes are not sessions
    failures = handshake_failures(caplog)
    assert len(failures) == 2, failures
    assert "CERTIFICATE_REQUIRED" in failures[0] or "DID_NOT_RETURN_A_CERTIFICATE" in failures[0], failures
    assert "CERTIFICATE_VERIFY_FAILED" in failures[1], failures


# --- origination -----------------------------------------------------------------------------------


async def test_origination_to_openssl_s_server(pki: PKI) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is not installed"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", pki["server.pem"], "-key",
        pki["server.key"], "-rev", "-naccept", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        while b"ACCEPT" not in await asyncio.wait_for(proc.stdout.readline(), TIMEOUT):
            pass
        upstream_tls = UpstreamTLSConfig(ca=pki["ca.pem"])  # verifies 127.0.0.1 against the IP SAN
        async with running(make_config([Address("127.0.0.1", port)], upstream_tls=upstream_tls)) as (proxy, log):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
            writer.write(b"hello world\n")
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"dlrow olleh\n"
            writer.close()
            await log.wait_for(1)
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), TIMEOUT)
    assert log.lines[0].count(f"upstream=127.0.0.1:{port} ") == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_origination_verifies_and_sends_sni_and_alpn(pki: PKI, host: str) -> None:
    ctx = pki.upstream_server_ctx()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    payload = os.urandom(200_000)
    async with tls_upstream(ctx, host=host) as server:
        upstream_tls = UpstreamTLSConfig(ca=pki["ca.pem"], sni="localhost", alpn=("http/1.1",))
        async with running(make_config([server.address], Address(host, 0), upstream_tls=upstream_tls)) as (
            proxy,
            log,
        ):
            reader, writer = await asyncio.open_connection(host, proxy.port())
            writer.write(payload)
            assert await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT) == payload
            writer.close()
            await log.wait_for(1)
    assert (server.sni, server.alpn) == (["localhost"], ["http/1.1"])
    assert f"in={len(payload)} out={len(payload)}" in log.lines[0]
    assert "tls_" not in log.lines[0]  # the client side is plain


async def test_a_member_found_by_name_is_dialed_by_ip_and_verified_by_its_name(pki: PKI) -> None:
    """Discovery turns ``localhost`` into its addresses; the certificate is still checked against, and
    SNI still names, ``localhost``, as when the name was dialed itself."""
    async with tls_upstream(pki.upstream_server_ctx()) as server:
        upstream_tls = UpstreamTLSConfig(ca=pki["ca.pem"])
        config = make_config([Address("localhost", server.port)], upstream_tls=upstream_tls)
        async with running(config) as (proxy, log):
            assert f"localhost@127.0.0.1:{server.port}" in [m.key for m in proxy.pools["default"].members]
            assert await plain_exchange(proxy.port(), b"by name") == b"by name"
            await log.wait_for(1)
    assert server.sni == ["localhost"]
    assert log.sessions[0].member.key == f"localhost@127.0.0.1:{server.port}"


async def test_origination_presents_a_client_certificate(pki: PKI) -> None:
    async with tls_upstream(pki.upstream_server_ctx(client_ca="ca.pem")) as server:
        upstream_tls = UpstreamTLSConfig(ca=pki["ca.pem"], cert=pki["client.pem"], key=pki["client.key"])
        async with running(make_config([server.address], upstream_tls=upstream_tls)) as (proxy, _):
            assert await plain_exchange(proxy.port(), b"mutual") == b"mutual"
    assert server.peer_cn == ["good-client"]


async def test_plain_client_eof_towards_a_tls_upstream_is_close_notify(pki: PKI) -> None:
    """Case 3, origination side: the client's FIN becomes close_notify towards the upstream, which sees
    every byte then EOF. This upstream (asyncio's TLS server) closes at close_notify, and the client's
    session ends with it; one that replies first is in ``test_tls_halfclose.py``."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(await reader.read())  # returns at close_notify

    payload = os.urandom(300_000)
    async with tls_upstream(pki.upstream_server_ctx(), collect) as server, running(
        make_config([server.address], upstream_tls=UpstreamTLSConfig(ca=pki["ca.pem"]))
    ) as (proxy, log):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
        writer.write(payload)
        writer.write_eof()
        assert await asyncio.wait_for(got, TIMEOUT) == payload
        assert await seconds_until_closed(reader) < 2.0
        writer.close()
        await log.wait_for(1)
    assert log.sessions[0].bytes_in == len(payload)
    assert log.sessions[0].end_cause == "eof"


@pytest.mark.parametrize(
    ("bad_cert", "why"),
    [("other_server", "unable to get local issuer certificate"), ("db_only", "Hostname mismatch")],
    ids=["untrusted-ca", "wrong-name"],
)
async def test_failed_verification_retries_the_next_member(
    pki: PKI, caplog: pytest.LogCaptureFixture, bad_cert: str, why: str
) -> None:
    """Case 27: a member whose certificate fails verification is a failed attempt; the next serves."""
    async with tls_upstream(pki.upstream_server_ctx(bad_cert)) as bad, tls_upstream(
        pki.upstream_server_ctx()
    ) as good:
        upstream_tls = UpstreamTLSConfig(ca=pki["ca.pem"], sni="localhost")
        config = make_config([bad.address, good.address], upstream_tls=upstream_tls, retries=1)
        async with running(config) as (proxy, log):
            assert await plain_exchange(proxy.port(), b"via the good one") == b"via the good one"
            await log.wait_for(1)
    assert f"upstream={good.address} " in log.lines[0]
    assert log.sessions[0].end_cause in ("eof", "client_closed", "upstream_closed")
    dial_logs = [r.getMessage() for r in caplog.records if r.name == "l4proxy.dialer"]
    assert len(dial_logs) == 1 and f"connect to {bad.address} " in dial_logs[0] and "tls: " in dial_logs[0]
    assert why in dial_logs[0], dial_logs
    assert proxy.pools["default"].no_upstream == 0


async def test_when_every_member_fails_verification_the_client_is_closed(pki: PKI) -> None:
    async with tls_upstream(pki.upstream_server_ctx("other_server")) as a, tls_upstream(
        pki.upstream_server_ctx("db_only")
    ) as b:
        upstream_tls = UpstreamTLSConfig(ca=pki["ca.pem"], sni="localhost")
        async with running(make_config([a.address, b.address], upstream_tls=upstream_tls, retries=1)) as (
            proxy,
            log,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
            writer.write(b"anyone?")
            assert await seconds_until_closed(reader) < 2.0
            writer.close()
            await log.wait_for(1)
    assert log.sessions[0].member is None
    assert log.sessions[0].end_cause.startswith("no_upstream (tls: ")
    assert 'end="no_upstream (tls: ' in log.lines[0]
    assert proxy.pools["default"].no_upstream == 1


# --- handshake timeout and garbage ------------------------------------------------------------------


async def test_silent_and_dribbling_clients_are_closed_at_the_handshake_timeout(
    pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """Case 24: the timeout covers the whole handshake, so a ClientHello sent a byte at a time does not
    keep the connection alive."""
    hello = client_hello()
    async with upstreams(1) as [server], running(
        make_config([server.address], tls=pki.server_tls(handshake_timeout=0.3))
    ) as (proxy, _):
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", proxy.port())
        dribble_reader, dribbler = await asyncio.open_connection("127.0.0.1", proxy.port())

        async def dribble() -> None:
            for i in range(len(hello) - 1):  # never the last byte; ~25 s at this pace: the proxy cuts first
                dribbler.write(hello[i : i + 1])
                await asyncio.sleep(0.05)

        task = asyncio.create_task(dribble())
        try:
            *waited, echoed = await asyncio.gather(
                seconds_until_closed(silent_reader),
                seconds_until_closed(dribble_reader),
                tls_exchange(proxy.port(), pki.client_ctx(), b"served meanwhile"),
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        ports = client_port(silent), client_port(dribbler)
        silent.close()
        dribbler.close()
        assert all(0.25 <= w < 1.5 for w in waited), waited
        assert echoed == b"served meanwhile"
        await eventually(lambda: proxy.tls_failures == 2)
    assert server.accepted == 1  # the good client only
    failures = handshake_failures(caplog)
    assert len(failures) == 2, failures
    for port in ports:
        assert sum(f"127.0.0.1:{port} failed: " in f for f in failures) == 1, failures


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.0\r\n\r\n", b"\x00" + random.Random(25).randbytes(600)],
    ids=["plaintext-http", "random-bytes"],
)
async def test_garbage_handshake_fails_fast_alone(
    pki: PKI, caplog: pytest.LogCaptureFixture, garbage: bytes
) -> None:
    """Case 25: bytes that cannot be a ClientHello fail at once (not at the 5 s handshake timeout), are
    logged once without a traceback, and a good TLS client at the same time is served."""
    async with upstreams(1) as [server], running(
        make_config([server.address], tls=pki.server_tls(handshake_timeout=5.0))
    ) as (proxy, _):
        good_reader, good = await open_tls(proxy.port(), pki.client_ctx())
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
        writer.write(garbage)
        assert await seconds_until_closed(reader) < 1.0
        port = client_port(writer)
        writer.close()
        good.write(b"unaffected")
        assert await asyncio.wait_for(good_reader.readexactly(10), TIMEOUT) == b"unaffected"
        await close(good)
        await eventually(lambda: proxy.tls_failures == 1)
    assert server.accepted == 1
    failures = handshake_failures(caplog)
    assert failures == [f for f in failures if f"127.0.0.1:{port} failed: " in f] and len(failures) == 1, failures
    assert not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in caplog.text


async def test_drain_closes_clients_still_in_their_handshake(pki: PKI) -> None:
    """Case 9 with a TLS listener: a client mid-handshake when the proxy drains is closed then, and
    cannot finish its handshake afterwards and be relayed by a proxy that has stopped."""
    async with upstreams(1) as [server]:
        async with running(make_config([server.address], tls=pki.server_tls(handshake_timeout=5.0))) as (proxy, log):
            _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
            await eventually(lambda: proxy.listeners[0].accepted == 1)
        assert not proxy.sessions
        try:
            await asyncio.wait_for(writer.start_tls(pki.client_ctx(), server_hostname="localhost"), 1.0)
        except (ssl.SSLError, ConnectionError):
            pass  # the proxy had closed the socket
        else:
            pytest.fail("the TLS handshake completed after the proxy drained")
        writer.close()
        await asyncio.sleep(0.1)
        assert server.accepted == 0 and not proxy.sessions and log.sessions == []


# --- byte-exact integrity of a large transfer --------------------------------------------------------

BIG = 50 * 1024 * 1024


async def pump_and_hash(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> tuple[str, str]:
    """Write ``size`` random-ish bytes while reading the echo; the sha256 of what was sent and received."""
    sent, received = hashlib.sha256(), hashlib.sha256()
    chunk_source = os.urandom(1 << 20)

    async def send() -> None:
        rng = random.Random(size)
        left = size
        while left:
            n = min(left, rng.randint(1, 256 * 1024))
            start = rng.randrange(len(chunk_source) - n + 1)
            chunk = chunk_source[start : start + n]
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()
            left -= n

    async def receive() -> None:
        got = 0
        while got < size:
            data = await reader.read(1 << 20)
            assert data, f"EOF after {got} of {size} bytes"
            received.update(data)
            got += len(data)

    await asyncio.wait_for(asyncio.gather(send(), receive()), 30)
    return sent.hexdigest(), received.hexdigest()


async def test_large_transfer_through_termination_is_byte_exact(pki: PKI) -> None:
    async with upstreams(1) as [server], running(make_config([server.address], tls=pki.server_tls())) as (proxy, log):
        reader, writer = await open_tls(proxy.port(), pki.client_ctx())
        sent, received = await pump_and_hash(reader, writer, BIG)
        await close(writer)
        await log.wait_for(1)
    assert sent == received
    assert (log.sessions[0].bytes_in, log.sessions[0].bytes_out) == (BIG, BIG)


async def test_large_transfer_through_origination_is_byte_exact(pki: PKI) -> None:
    async with tls_upstream(pki.upstream_server_ctx()) as server, running(
        make_config([server.address], upstream_tls=UpstreamTLSConfig(ca=pki["ca.pem"]))
    ) as (proxy, log):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
        sent, received = await pump_and_hash(reader, writer, BIG)
        writer.close()
        await log.wait_for(1)
    assert sent == received
    assert (log.sessions[0].bytes_in, log.sessions[0].bytes_out) == (BIG, BIG)


async def test_reload_swaps_good_files_in_and_keeps_the_context_on_broken_ones(pki: PKI, tmp_path: Path) -> None:
    """Proxy.reload_tls (what SIGHUP calls): a good reload serves the new certificate to new clients;
    a broken file is reported once, by config field, and the previous context keeps serving."""
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    cert.write_bytes(Path(pki["server.pem"]).read_bytes())
    key.write_bytes(Path(pki["server.key"]).read_bytes())
    async with upstreams(1) as [server], running(
        make_config([server.address], tls=ServerTLSConfig(cert=str(cert), key=str(key)))
    ) as (proxy, _):
        reader, writer = await open_tls(proxy.port(), pki.client_ctx())  # open across both reloads
        cert.write_bytes(Path(pki["other_server.pem"]).read_bytes())
        key.write_bytes(Path(pki["other_server.key"]).read_bytes())
        assert proxy.reload_tls() == []
        assert await tls_exchange(proxy.port(), pki.client_ctx(ca="other_ca.pem"), b"new cert") == b"new cert"
        assert await rejected(proxy.port(), pki.client_ctx())  # the old CA no longer matches

        live = proxy.server_tls[0]
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        problems = proxy.reload_tls()
        assert [(p.path, p.problem) for p in problems] == [("listeners[0].tls.cert", "is not a PEM certificate")]
        assert proxy.server_tls[0] is live
        assert await tls_exchange(proxy.port(), pki.client_ctx(ca="other_ca.pem"), b"kept") == b"kept"

        writer.write(b"old session")
        assert await asyncio.wait_for(reader.readexactly(11), TIMEOUT) == b"old session"
        await close(writer)
