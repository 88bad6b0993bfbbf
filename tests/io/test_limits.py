"""Listener limits, socket options and closing on member down, on real sockets: ``--max-connections``
(RELIABILITY.md case 30), TCP keepalive and TCP_NODELAY on both sides of a session, and
``--on-member-down close`` ending exactly the sessions of the member marked DOWN."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

import pytest

from l4proxy import HealthConfig
from l4proxy.health import Event
from l4proxy.listener import default_max_connections

from ..kit import connect, eventually, make_config, running, upstreams
from .test_retries import CLOCK_SLACK


async def echoed(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client whose session is up: one byte echoed through the proxy."""
    reader, writer = await connect(port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
    return reader, writer


async def test_at_max_connections_new_clients_wait_in_the_backlog_and_are_served_as_sessions_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "l4proxy.listener")
    async with upstreams(1) as [server], running(make_config([server.address], max_connections=3)) as (proxy, _):
        clients = [await echoed(proxy.port()) for _ in range(3)]
        listener = proxy.listeners[0]
        assert listener.full and listener.full_episodes == 1
        reader, writer = await connect(proxy.port())  # the kernel completes the handshake: in the backlog
        writer.write(b"waiting")
        await asyncio.sleep(0)  # nothing to wait on: the point is that it is *not* served
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 0.3)
        assert server.active == 3 and listener.sessions == 3
        clients[0][1].close()  # one session ends: the waiting client is accepted and its bytes delivered
        assert await asyncio.wait_for(reader.readexactly(7), 5) == b"waiting"
        await eventually(lambda: listener.full)  # back at the limit with the one that waited
        assert listener.full_episodes == 2 and server.peak == 3
        full = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
        assert len(full) == 2 and "(--max-connections 3)" in full[0]
        for _, other in [*clients[1:], (reader, writer)]:
            other.close()
        await eventually(lambda: listener.sessions == 0 and not listener.full)


async def test_sessions_that_fail_give_their_place_back() -> None:
    """A client closed for want of an upstream is done too: the limit does not leak."""
    from ..kit import refused_address

    async with running(make_config([refused_address()], max_connections=2, retries=0)) as (proxy, log):
        for _ in range(6):
            reader, writer = await connect(proxy.port())
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        await log.wait_for(6)
        listener = proxy.listeners[0]
        await eventually(lambda: listener.sessions == 0 and not listener.full)


def test_the_default_limit_is_what_the_open_files_limit_has_room_for() -> None:
    cases = [((1024, 2), 504), ((1024, 8), 126), ((65536, 2), 32760), ((10, 2), 1)]
    assert [default_max_connections(*args) for args, _ in cases] == [want for _, want in cases]


def _options(sock: socket.socket) -> tuple[int, int, int, int, int]:
    get = sock.getsockopt
    return (
        get(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        get(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        get(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        get(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        get(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


KEEPALIVE_CASES = [(None, (1, 1, 60, 20, 6)), (0.0, (1, 0)), (30.0, (1, 1, 30, 10, 6))]  # the default is 60 s


@pytest.mark.parametrize(("keepalive", "expected"), KEEPALIVE_CASES)
async def test_keepalive_and_nodelay_are_set_on_both_sockets(
    keepalive: float | None, expected: tuple[int, ...]
) -> None:
    settings = {} if keepalive is None else {"tcp_keepalive": keepalive}
    async with upstreams(1) as [server], running(make_config([server.address], **settings)) as (proxy, _):
        _reader, writer = await echoed(proxy.port())
        [session] = proxy.sessions
        await eventually(lambda: not session.unprobed)
        for pump in (session.client, session.upstream):
            assert pump is not None and pump.transport is not None
            sock = pump.transport.get_extra_info("socket")
            got = _options(sock)  # type: ignore[arg-type]  # a socket-like object with getsockopt
            assert got[: len(expected)] == expected
        writer.close()


async def test_on_member_down_close_ends_exactly_that_members_sessions_spread_over_a_second() -> None:
    quiet = HealthConfig(enabled=False, fall=1)
    async with upstreams(2) as servers, running(
        make_config([s.address for s in servers], health=quiet, on_member_down="close")
    ) as (proxy, log):
        clients = [await echoed(proxy.port()) for _ in range(8)]
        by_member = {session.client_address: session.member for session in proxy.sessions}
        pool = proxy.pools["default"]
        down = pool.members[0]
        doomed = [c for c in clients if by_member[c[1].get_extra_info("sockname")] is down]
        kept = [c for c in clients if c not in doomed]
        assert len(doomed) == len(kept) == 4
        started = time.monotonic()
        pool.report(down, Event.PROBE_FAIL, "check failed: refused")  # what a failed probe reports
        closed_at = []
        for reader, _ in doomed:
            assert await asyncio.wait_for(reader.read(), 5) == b""
            closed_at.append(time.monotonic() - started)
        for reader, writer in kept:  # the other member's sessions carry on
            writer.write(b"y")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"y"
        await log.wait_for(4)
        assert [s.end_cause for s in log.sessions] == ["member_down"] * 4
        assert proxy.table.closed_member_down == 4
        assert max(closed_at) >= 0.75 - CLOCK_SLACK and max(closed_at) < 2  # spread: 0, 1/4, 1/2, 3/4 s
        for _, writer in clients:
            writer.close()


async def test_on_member_down_keep_leaves_the_sessions_alone() -> None:
    quiet = HealthConfig(enabled=False, fall=1)
    async with upstreams(1) as [server], running(make_config([server.address], health=quiet)) as (proxy, _):
        reader, writer = await echoed(proxy.port())
        pool = proxy.pools["default"]
        pool.report(pool.members[0], Event.PROBE_FAIL, "check failed: refused")
        assert not pool.members[0].up
        writer.write(b"y")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"y"
        assert proxy.table.closed_member_down == 0
        writer.close()


async def test_an_ejection_is_not_down_and_leaves_the_sessions_alone_even_with_close() -> None:
    """Outlier ejection keeps new sessions away; the member's sessions go on, --on-member-down close
    or not (it acts on DOWN by the checks only)."""
    quiet = HealthConfig(enabled=False)
    async with upstreams(1) as [server]:
        config = make_config([server.address], health=quiet, on_member_down="close", eject_after=1)
        async with running(config) as (proxy, _):
            reader, writer = await echoed(proxy.port())
            pool = proxy.pools["default"]
            pool.report(pool.members[0], Event.TRAFFIC_FAIL, "connect failed: refused")
            assert pool.members[0].ejected and pool.members[0].up
            other_reader, other_writer = await connect(proxy.port())  # no new session: the only member is out
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(other_reader.read(), 5) == b""
            other_writer.close()
            writer.write(b"y")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"y"
            assert proxy.table.closed_member_down == 0
            writer.close()


async def test_sessions_older_than_the_max_duration_close_when_quiet_or_at_its_jitter_at_the_latest() -> None:
    duration = 0.4
    async with upstreams(1) as [server], running(
        make_config([server.address], max_session_duration=duration)
    ) as (proxy, log):
        started = time.monotonic()
        quiet_reader, quiet = await echoed(proxy.port())
        busy_reader, busy = await echoed(proxy.port())

        async def chatter() -> float:  # never quiet for a tick: a byte every 5 ms until closed
            while True:
                busy.write(b"z")
                try:
                    got = await asyncio.wait_for(busy_reader.read(1), 5)
                except ConnectionError:
                    got = b""
                if not got:
                    return time.monotonic() - started
                await asyncio.sleep(0.005)

        talker = asyncio.create_task(chatter())
        assert await asyncio.wait_for(quiet_reader.read(), 5) == b""
        quiet_at = time.monotonic() - started
        busy_at = await asyncio.wait_for(talker, 5)
        await log.wait_for(2)
        quiet.close()
        busy.close()
    assert [s.end_cause for s in log.sessions] == ["max_session_duration"] * 2
    assert proxy.table.closed_old == 2
    tick = duration / 20
    assert duration - CLOCK_SLACK <= quiet_at < duration + 3 * tick + 0.2
    assert duration - CLOCK_SLACK <= busy_at < duration * 1.1 + 3 * tick + 0.2
