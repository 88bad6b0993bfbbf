"""Floods any client can cause, through an in-process Proxy on real loopback sockets: handshake
failures and unreachable members log a few lines and then one summary per window (``ratelog``), a
client leaving mid-handshake is logged with a readable cause, and failed handshakes leave nothing
behind in reference cycles (counted with the cyclic GC off)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct

import pytest

from l4proxy.ratelog import RateLog

from ..kit import PKI, client_hello, eventually, make_config, refused_address, running, upstreams

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
    async with running(make_config([refused_address()], retries=0)) as (proxy, log):
        proxy.warnings.ratelog = RateLog(burst=5, window=WINDOW)
        for _ in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        await log.wait_for(100)
        await eventually(lambda: bool(lines(caplog, "... and ")), timeout=5)
    # three refused connects take the member DOWN (fall 3); after that no connect is even tried
    assert len(lines(caplog, "connect to ")) == 3
    assert len(lines(caplog, "no upstream for ")) == 5
    assert lines(caplog, "... and ") == [f"... and 95 more clients with no upstream in the last {WINDOW:g} s"]
    assert proxy.pools["default"].no_upstream == 100


def _left_in_cycles() -> dict[str, int]:
    """Objects of the kinds a failed handshake creates that the cyclic GC could find right now."""
    kinds = ("Session", "Pump", "Drive", "SSLObject", "SSLProtocol", "SSLError", "frame", "coroutine")
    counts = dict.fromkeys(kinds, 0)
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in counts:
            counts[name] += 1
    return counts


async def test_failed_handshakes_leave_no_reference_cycles(pki: PKI) -> None:
    """Unbroken, each failed handshake would leave its session, pump, SSL objects, coroutine and traceback
    frames in cycles, freed only by the cyclic GC: with the collector off, nothing may pile up."""
    failures = 100
    async with upstreams(1) as [server], running(make_config([server.address], tls=pki.server_tls())) as (proxy, _):
        port = proxy.port()

        async def garbage() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await writer.wait_closed()

        for _ in range(5):  # warm up: first-use caches, the loop's free lists
            await garbage()
        await eventually(lambda: proxy.tls_failures == 5)
        gc.collect()
        gc.disable()
        try:
            before = _left_in_cycles()
            for _ in range(failures):
                await garbage()
            await eventually(lambda: proxy.tls_failures == 5 + failures)
            await asyncio.sleep(0)  # the closing transports' last callbacks
            after = _left_in_cycles()
        finally:
            gc.enable()
    grown = {kind: after[kind] - before[kind] for kind in before if after[kind] - before[kind] >= failures // 2}
    assert not grown, f"after {failures} failed handshakes, left for the cyclic GC: {grown}"
