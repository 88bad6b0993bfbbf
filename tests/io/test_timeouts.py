"""Idle and half-closed timeouts on real loopback sessions through a real Proxy.

RELIABILITY.md cases 23 (idle timeout closes both sides, also with bytes stuck in buffers; a session
that keeps trading bytes is left alone) and 4 (a half-closed session is reaped by its own, shorter timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest

from l4proxy import Proxy
from l4proxy.relay import Session

from ..kit import ENGINES, Upstream, connect, eventually, make_config, read_until_closed, running

pytestmark = pytest.mark.parametrize("relay", ENGINES)

IDLE = 0.3


def assert_no_leaks(proxy: Proxy, *servers: Upstream) -> None:
    assert not proxy.sessions
    assert [m.active for m in proxy.pools["default"].members] == [0] * len(proxy.pools["default"].members)
    assert [s.active for s in servers] == [0] * len(servers)


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read and discard until the proxy goes away; never write, never close first."""
    while await reader.read(65536):
        pass


async def test_idle_session_is_closed_on_both_sides_at_the_idle_timeout(relay: str) -> None:
    async with Upstream(silent) as server, running(make_config([server.address], idle_timeout=IDLE, relay=relay)) as (
        proxy,
        log,
    ):
        reader, writer = await connect(proxy.port())
        writer.write(b"hello")
        await eventually(lambda: server.active == 1)
        began = time.monotonic()
        assert await read_until_closed(reader) == b""
        waited = time.monotonic() - began
        await log.wait_for(1)
        await eventually(lambda: server.active == 0)
        assert_no_leaks(proxy, server)
        writer.close()
    assert IDLE * 0.8 <= waited <= IDLE + 1.0, waited
    assert log.sessions[0].end_cause == "idle_timeout"
    assert log.sessions[0].bytes_in == 5
    assert "end=idle_timeout" in log.lines[0]


async def flood(writer: asyncio.StreamWriter) -> None:
    """Write 64 KiB chunks as fast as the connection takes them; stops when the connection is cut."""
    chunk = b"x" * 65536
    with contextlib.suppress(ConnectionError):
        for _ in range(10_000):
            writer.write(chunk)
            await writer.drain()


async def last_progress(proxy: Proxy, moved: Callable[[Session], int]) -> float:
    """Watch the one session's relayed byte count until the session is gone; when it last grew.

    This is when the proxy stopped moving bytes. The flooding peer may go on filling kernel buffers
    for a while after that (in bursts, as TCP grows its buffers), which is not activity either."""
    await eventually(lambda: len(proxy.sessions) == 1)
    (session,) = proxy.sessions
    seen, changed = -1, time.monotonic()
    while proxy.sessions:
        if moved(session) != seen:
            seen, changed = moved(session), time.monotonic()
        await asyncio.sleep(0.005)
    return changed


@pytest.mark.parametrize("toward", ["client", "upstream"])
async def test_session_with_bytes_stuck_in_buffers_is_still_reaped(toward: str, relay: str) -> None:
    """One side floods, the other never reads: the proxy pauses, buffers stay full and nothing
    moves. Bytes waiting in buffers are not activity; the session is reaped at the idle timeout."""
    reaped = asyncio.Event()

    def moved(session: Session) -> int:
        return session.bytes_out if toward == "client" else session.bytes_in

    async def upstream_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if toward == "client":
            await flood(writer)
        else:
            await reaped.wait()  # never read while the session lives
            with contextlib.suppress(ConnectionError):
                while await reader.read(1 << 20):
                    pass

    async with Upstream(upstream_side) as server, running(
        make_config([server.address], idle_timeout=IDLE, buffer_size=16384, relay=relay)
    ) as (proxy, log):
        _reader, writer = await connect(proxy.port())
        flooder = None
        if toward == "upstream":
            flooder = asyncio.create_task(flood(writer))
        stopped_moving = await asyncio.wait_for(last_progress(proxy, moved), 10)
        waited = time.monotonic() - stopped_moving
        await log.wait_for(1, timeout=5)
        reaped.set()
        if flooder is not None:
            await asyncio.wait_for(flooder, 5)
        await eventually(lambda: server.active == 0)
        assert_no_leaks(proxy, server)
        writer.transport.abort()
    session = log.sessions[0]
    assert session.end_cause == "idle_timeout"
    assert waited <= IDLE + 2.0, waited
    assert moved(session) >= 16384  # bytes did flow before everything stalled


async def test_session_trading_bytes_more_often_than_the_timeout_stays_open(relay: str) -> None:
    """Ten exchanges 0.1 s apart (1 s in all, over three idle timeouts) keep the session alive."""
    async with Upstream() as server, running(
        make_config([server.address], idle_timeout=IDLE, relay=relay)
    ) as (proxy, log):
        reader, writer = await connect(proxy.port())
        began = time.monotonic()
        for i in range(10):
            writer.write(b"ping %d\n" % i)
            assert await asyncio.wait_for(reader.readline(), 2) == b"ping %d\n" % i
            await asyncio.sleep(IDLE / 3)
        assert time.monotonic() - began >= 3 * IDLE
        assert len(proxy.sessions) == 1 and not log.sessions
        writer.write_eof()
        assert await read_until_closed(reader) == b""
        await log.wait_for(1)
        await eventually(lambda: server.active == 0)
        assert_no_leaks(proxy, server)
        writer.close()
    assert log.sessions[0].end_cause == "eof"


async def test_one_way_trickle_counts_as_activity(relay: str) -> None:
    """Only the client talks (the echo is never read back by it until the end): still not idle."""
    async with Upstream(silent) as server, running(make_config([server.address], idle_timeout=IDLE, relay=relay)) as (
        proxy,
        log,
    ):
        _reader, writer = await connect(proxy.port())
        for _ in range(8):
            writer.write(b".")
            await asyncio.sleep(IDLE / 3)
        assert len(proxy.sessions) == 1 and not log.sessions
        writer.close()
        await log.wait_for(1)
        await eventually(lambda: server.active == 0)
        assert_no_leaks(proxy, server)
    assert log.sessions[0].bytes_in == 8


async def test_half_closed_session_is_reaped_by_its_own_timeout(relay: str) -> None:
    """Case 4: the client sends FIN; the upstream neither answers nor closes. The idle timeout is an
    hour, so only the half-closed timeout (0.3 s) can end it."""
    got_eof = asyncio.Event()

    reaped = asyncio.Event()
    peer_gone: list[bool] = []

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.read() == b"request"
        got_eof.set()
        await reaped.wait()
        # Only now, after the proxy logged the session, write: the proxy's side must be gone (RST).
        try:
            for _ in range(100):
                writer.write(b"too late")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            peer_gone.append(True)
            raise

    async with Upstream(never_answers) as server, running(
        make_config([server.address], idle_timeout=3600.0, half_closed_timeout=IDLE, relay=relay)
    ) as (proxy, log):
        reader, writer = await connect(proxy.port())
        writer.write(b"request")
        writer.write_eof()
        await asyncio.wait_for(got_eof.wait(), 5)
        began = time.monotonic()
        assert await read_until_closed(reader) == b""
        waited = time.monotonic() - began
        await log.wait_for(1)
        reaped.set()
        await eventually(lambda: server.active == 0)
        assert_no_leaks(proxy, server)
        writer.close()
    assert peer_gone == [True]
    assert IDLE * 0.8 <= waited <= IDLE + 1.0, waited
    assert log.sessions[0].end_cause == "half_closed_timeout"
    assert "end=half_closed_timeout" in log.lines[0]
