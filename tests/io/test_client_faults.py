"""Floods any client can cause, through an in-process Proxy on real loopback sockets: handshake
failures and unreachable members log a few lines and then one summary per window (``ratelog``), a
client leaving mid-handshake is logged with a readable cause, and failed handshakes leave nothing
behind in reference cycles (counted with the cyclic GC off)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import struct
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from l4proxy.config import UpstreamTLSConfig
from l4proxy.ratelog import RateLog

from ..kit import (
    PKI,
    client_hello,
    close,
    eventually,
    make_config,
    open_tls,
    refused_address,
    running,
    tls_upstream,
    upstreams,
)

WINDOW = 0.5


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def reset_mid_handshake(port: int, hello: bytes) -> None:
    """Half a ClientHello, then a reset (SO_LINGER 0)."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(hello[: len(hello) // 2])
    await writer.drain()
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def close_mid_handshake(port: int, hello: bytes) -> None:
    """Half a ClientHello, then a FIN; read until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(hello[: len(hello) // 2])
    writer.write_eof()
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()


async def test_a_handshake_failure_storm_logs_five_lines_and_a_summary(
    pki: PKI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hello = client_hello()
    async with upstreams(1) as [server], running(make_config([server.address], tls=pki.server_tls())) as (proxy, _):
        proxy.warnings.ratelog = RateLog(burst=5, window=WINDOW)
        for _ in range(200):
            await reset_mid_handshake(proxy.port(), hello)
        await eventually(lambda: proxy.tls_failures == 200)
        await eventually(lambda: bool(lines(caplog, "more TLS handshake failures")), timeout=5)
    failures = lines(caplog, "TLS handshake with ")
    assert len(failures) == 5, failures
    assert all(f.endswith("failed: the client reset the connection during the handshake") for f in failures), failures
    summaries = lines(caplog, "more TLS handshake failures")
    assert summaries == [f"... and 195 more TLS handshake failures in the last {WINDOW:g} s"]
    assert proxy.warnings.count("TLS handshake failures") == 200
    assert server.accepted == 0


async def test_a_client_closing_mid_handshake_is_named_as_such(
    pki: PKI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with upstreams(1) as [server], running(make_config([server.address], tls=pki.server_tls())) as (proxy, _):
        await close_mid_handshake(proxy.port(), client_hello())
        await eventually(lambda: proxy.tls_failures == 1)
    failures = lines(caplog, "TLS handshake with ")
    assert len(failures) == 1 and failures[0].endswith(
        "failed: the client closed the connection during the handshake"
    ), failures


async def test_every_member_down_logs_five_lines_and_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    async with running(make_config([refused_address()], retries=0, eject_after=3)) as (proxy, log):
        proxy.warnings.ratelog = RateLog(burst=5, window=WINDOW)
        for _ in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        await log.wait_for(100)
        await eventually(lambda: bool(lines(caplog, "... and ")), timeout=5)
    # three refused connects eject the member (eject_after 3); after that no connect is even tried
    assert len(lines(caplog, "connect to ")) == 3
    assert len(lines(caplog, "no upstream for ")) == 5
    assert lines(caplog, "... and ") == [f"... and 95 more clients with no upstream in the last {WINDOW:g} s"]
    assert proxy.pools["default"].no_upstream == 100


# Kinds of object one TLS connection creates. Left in a reference cycle, each waits for the cyclic GC,
# which the CLI's GC tuning delays by minutes, and holds the connection's buffers (uvloop gives every
# TLS transport a 256 KiB read buffer) until then: RSS then grows with the rate of connections.
CYCLE_KINDS = ("Session", "Pump", "Dial", "Drive", "SSLObject", "SSLProtocol", "_SSLProtocolTransport",
               "SSLError", "traceback", "frame", "coroutine")
TIMED_OUT = 0.2  # the handshake timeout of the "timeout" clients, in seconds


def _left_in_cycles() -> dict[str, int]:
    """The objects of those kinds that only the cyclic GC would free, by kind: what a collection finds
    unreachable now (kept aside with DEBUG_SAVEALL to be counted). Objects a test still refers to, such
    as the sessions a RecordingLog keeps, are not garbage and are not counted."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
    finally:
        gc.set_debug(0)
    counts = Counter(type(obj).__name__ for obj in gc.garbage)
    gc.garbage.clear()
    return {kind: counts[kind] for kind in CYCLE_KINDS if counts[kind]}


async def _garbage(port: int, _pki: PKI) -> None:
    """Plain HTTP to a TLS listener: the handshake fails with an SSL error."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()


async def _stalled(port: int, _pki: PKI) -> None:
    """The first bytes of a ClientHello and then nothing (slowloris): closed at the handshake timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(client_hello()[:5])
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()


async def _untrusting(port: int, certs: PKI) -> None:
    """A client that does not trust the proxy's certificate aborts the handshake with an alert. It runs
    its TLS in memory, so the failure leaves none of the client's own objects in cycles to be counted."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ctx = ssl.create_default_context(cafile=certs["other_ca.pem"])
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(10):
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
                data = await asyncio.wait_for(reader.read(65536), 5)
                if not data:
                    break
                incoming.write(data)
            except ssl.SSLCertVerificationError:
                writer.write(outgoing.read())  # the alert
                break
        else:
            raise AssertionError("the handshake neither failed nor ended")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _reset(port: int, _pki: PKI) -> None:
    await reset_mid_handshake(port, client_hello())


async def _fin(port: int, _pki: PKI) -> None:
    await close_mid_handshake(port, client_hello())


FAILED_HANDSHAKES = {"garbage": _garbage, "reset": _reset, "fin": _fin, "timeout": _stalled, "untrusting": _untrusting}


async def _in_waves(client: Callable[[int, PKI], Awaitable[None]], port: int, certs: PKI, count: int) -> None:
    """``count`` clients, ten at a time (the stalled ones each take a handshake timeout)."""
    for _ in range(count // 10):
        await asyncio.gather(*(client(port, certs) for _ in range(10)))


@pytest.mark.parametrize("kind", list(FAILED_HANDSHAKES))
async def test_failed_handshakes_leave_no_reference_cycles(pki: PKI, kind: str) -> None:
    """Each way a client's handshake can fail must leave nothing for the cyclic GC: unbroken, a failure
    leaves its session, pump, SSL objects, coroutine and traceback frames in cycles (about 20 objects),
    so RSS grows under a stream of such clients. Counted with the collector off."""
    failures = 60
    client = FAILED_HANDSHAKES[kind]
    tls = pki.server_tls(handshake_timeout=TIMED_OUT)
    async with upstreams(1) as [server], running(make_config([server.address], tls=tls)) as (proxy, _):
        port = proxy.port()
        for _ in range(5):  # warm up: first-use caches, the loop's free lists
            await client(port, pki)
        await eventually(lambda: proxy.tls_failures == 5)
        gc.collect()
        gc.disable()
        try:
            await _in_waves(client, port, pki, failures)
            await eventually(lambda: proxy.tls_failures == 5 + failures)
            await eventually(lambda: not proxy.table.opening)
            await asyncio.sleep(0)  # the closing transports' last callbacks
            left = _left_in_cycles()
        finally:
            gc.enable()
    assert server.accepted == 0
    piled = {k: n for k, n in left.items() if n >= failures // 2}
    assert not piled, f"after {failures} {kind} handshakes, left for the cyclic GC: {piled}"


@pytest.mark.parametrize("ending", ["close", "reset"])
async def test_tls_sessions_both_ways_leave_no_reference_cycles(pki: PKI, ending: str) -> None:
    """Sessions that terminate TLS from the client and originate TLS to the member, ended by a close
    or a reset, are freed by reference counting alone."""
    sessions = 40
    upstream_tls = UpstreamTLSConfig(ca=pki["ca.pem"])
    async with tls_upstream(pki.upstream_server_ctx()) as server, running(
        make_config([server.address], tls=pki.server_tls(), upstream_tls=upstream_tls)
    ) as (proxy, log):
        port = proxy.port()

        async def one() -> None:
            reader, writer = await open_tls(port, pki.client_ctx())
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            if ending == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                await close(writer)

        for _ in range(5):
            await one()
        await log.wait_for(5)
        gc.collect()
        gc.disable()
        try:
            await asyncio.gather(*(one() for _ in range(sessions)))
            await log.wait_for(5 + sessions)
            await asyncio.sleep(0)
            left = _left_in_cycles()
        finally:
            gc.enable()
    piled = {k: n for k, n in left.items() if n >= sessions // 2}
    assert not piled, f"after {sessions} TLS sessions ended by a {ending}, left for the cyclic GC: {piled}"
