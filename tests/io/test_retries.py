"""Connection-level retries on real loopback sockets: refused, blackholed and exhausted members.

RELIABILITY.md cases 12, 13, 14 and 15 (case 12 also on ``::1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from l4proxy import Address, HealthConfig

from ..kit import (
    RecordingLog,
    blackhole,
    connect,
    eventually,
    make_config,
    refused_address,
    roundtrip,
    running,
    upstreams,
)

CONNECT_TIMEOUT = 0.3
# libuv (uvloop) keeps loop time in whole milliseconds, so a timer may fire up to 1 ms before the
# wall-clock delay; measured lower bounds allow for that much.
CLOCK_SLACK = 0.005


async def closed_by_proxy(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """What the client reads until the proxy closes it; a reset counts as a close with no bytes."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


async def closed_after(port: int, log: RecordingLog) -> float:
    """Seconds from a client's connect until the proxy closes it with no bytes; its session is logged."""
    started = time.monotonic()
    reader, writer = await connect(port)
    assert await closed_by_proxy(reader) == b""
    elapsed = time.monotonic() - started
    await log.wait_for(1)
    writer.close()
    return elapsed


def failed_attempts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The member names of every failed connect attempt the dialer logged, in order."""
    return [
        str(r.args[0])
        for r in caplog.records
        if r.name == "l4proxy.dialer" and r.getMessage().startswith("connect to ") and isinstance(r.args, tuple)
    ]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_refused_member_is_skipped_and_the_next_one_serves(host: str, caplog: pytest.LogCaptureFixture) -> None:
    """Case 12: the first pick refuses; the retry reaches the live member, invisibly to the client."""
    caplog.set_level(logging.WARNING, logger="l4proxy.dialer")
    dead = refused_address(host)
    async with (
        upstreams(1, host=host) as [live],
        running(make_config([dead, live.address], Address(host, 0), retries=2)) as (proxy, log),
    ):
        echoed = await roundtrip(proxy.port(), b"hello through a retry", host=host)
        await log.wait_for(1)
    assert echoed == b"hello through a retry"
    assert failed_attempts(caplog) == [str(dead)]  # the refused member was tried first
    assert live.accepted == 1
    session = log.sessions[0]
    assert (session.member.address, session.end_cause) == (live.address, "eof")
    assert f"upstream={live.address} " in log.lines[0]
    assert "end=eof" in log.lines[0]
    assert proxy.pools["default"].no_upstream == 0


async def test_refused_member_without_retries_closes_the_client() -> None:
    """Case 12: retries=0 gives one attempt; its failure closes the client and names the cause."""
    dead = refused_address()
    async with running(make_config([dead], retries=0)) as (proxy, log):
        reader, writer = await connect(proxy.port())
        writer.write(b"anyone there?")
        assert await closed_by_proxy(reader) == b""
        await log.wait_for(1)
        writer.close()
    session = log.sessions[0]
    assert session.member is None
    assert session.end_cause == "no_upstream (refused)"
    assert "upstream=- " in log.lines[0]
    assert log.lines[0].endswith('end="no_upstream (refused)"')
    assert proxy.pools["default"].no_upstream == 1


async def test_blackholed_member_times_out_then_another_serves(caplog: pytest.LogCaptureFixture) -> None:
    """Case 13: a SYN that is never answered costs exactly one connect timeout, then the next member."""
    caplog.set_level(logging.WARNING, logger="l4proxy.dialer")
    with blackhole() as silent:
        async with (
            upstreams(1) as [live],
            running(make_config([silent, live.address], retries=2, connect_timeout=CONNECT_TIMEOUT)) as (proxy, log),
        ):
            started = time.monotonic()
            echoed = await roundtrip(proxy.port(), b"late but whole")
            elapsed = time.monotonic() - started
            await log.wait_for(1)
    assert echoed == b"late but whole"
    assert CONNECT_TIMEOUT - CLOCK_SLACK <= elapsed < CONNECT_TIMEOUT + 2.0
    assert [r.getMessage().rsplit(": ", 1)[1] for r in caplog.records if r.name == "l4proxy.dialer"] == ["timeout"]
    assert failed_attempts(caplog) == [str(silent)]
    assert log.sessions[0].member.address == live.address
    assert f"upstream={live.address} " in log.lines[0]


async def test_retry_budget_is_bounded_and_each_attempt_is_a_new_member(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Case 14: five refusing members and retries=2 give exactly three attempts, all distinct."""
    caplog.set_level(logging.WARNING, logger="l4proxy.dialer")
    dead = [refused_address() for _ in range(5)]
    async with running(make_config(dead, retries=2)) as (proxy, log):
        reader, writer = await connect(proxy.port())
        assert await closed_by_proxy(reader) == b""
        await log.wait_for(1)
        writer.close()
    pool = proxy.pools["default"]
    attempts = failed_attempts(caplog)
    assert len(attempts) == 3
    assert len(set(attempts)) == 3
    assert {m.name for m in pool.members if m.outlier.streak == 1} == set(attempts)
    assert sum(m.outlier.streak for m in pool.members) == 3
    assert pool.no_upstream == 1
    assert log.sessions[0].end_cause == "no_upstream (refused)"


async def test_retry_skips_tried_members_even_when_they_look_least_loaded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Case 14: after two refusals the idle-looking dead members are not picked again; the busy live
    member serves the third attempt."""
    caplog.set_level(logging.WARNING, logger="l4proxy.dialer")
    dead = [refused_address() for _ in range(2)]
    quiet = HealthConfig(enabled=False)
    async with (
        upstreams(1) as [live],
        running(make_config([*dead, live.address], retries=2, health=quiet, eject_after=10)) as (
            proxy,
            log,
        ),
    ):
        busy_reader, busy_writer = await connect(proxy.port())  # holds the live member (load 1)
        busy_writer.write(b"hold")
        assert await asyncio.wait_for(busy_reader.readexactly(4), 5) == b"hold"
        caplog.clear()
        assert await roundtrip(proxy.port(), b"third attempt") == b"third attempt"
        assert sorted(failed_attempts(caplog)) == sorted(str(a) for a in dead)
        busy_writer.close()
        await log.wait_for(2)
    assert [s.member.address for s in log.sessions] == [live.address, live.address]
    assert proxy.pools["default"].no_upstream == 0


async def test_attempts_cover_every_member_before_any_repeats(caplog: pytest.LogCaptureFixture) -> None:
    """Case 14: with more retries than members, each member is tried once before any is tried again."""
    caplog.set_level(logging.WARNING, logger="l4proxy.dialer")
    dead = [refused_address() for _ in range(3)]
    quiet = HealthConfig(enabled=False)
    async with running(make_config(dead, retries=4, health=quiet, eject_after=10)) as (proxy, log):
        reader, writer = await connect(proxy.port())
        assert await closed_by_proxy(reader) == b""
        await log.wait_for(1)
        writer.close()
    attempts = failed_attempts(caplog)
    assert len(attempts) == 5
    assert sorted(attempts[:3]) == sorted(str(a) for a in dead)
    assert proxy.pools["default"].no_upstream == 1


async def test_single_member_pool_retries_its_only_member(caplog: pytest.LogCaptureFixture) -> None:
    """Case 14: with one member, retries=2 means three attempts at that member, then the client is closed."""
    caplog.set_level(logging.WARNING, logger="l4proxy.dialer")
    dead = refused_address()
    quiet = HealthConfig(enabled=False)
    async with running(make_config([dead], retries=2, health=quiet, eject_after=10)) as (proxy, log):  # stays in
        reader, writer = await connect(proxy.port())
        assert await closed_by_proxy(reader) == b""
        await log.wait_for(1)
        writer.close()
    assert failed_attempts(caplog) == [str(dead)] * 3
    member = proxy.pools["default"].members[0]
    assert (member.outlier.streak, member.total, member.active) == (3, 3, 0)
    assert log.sessions[0].end_cause == "no_upstream (refused)"


async def test_all_members_unhealthy_closes_the_client_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """Case 15: blackholed members marked DOWN by probes are not dialled: no wait for the connect timeout."""
    caplog.set_level(logging.WARNING, logger="l4proxy.dialer")
    probes = HealthConfig(enabled=True, interval=0.05, timeout=0.2, rise=2, fall=2)
    with contextlib.ExitStack() as stack:
        silent = [stack.enter_context(blackhole()) for _ in range(2)]
        async with running(make_config(silent, retries=2, connect_timeout=3.0, health=probes)) as (proxy, log):
            pool = proxy.pools["default"]
            await eventually(lambda: not pool.balancer.any_up)
            elapsed = await closed_after(proxy.port(), log)
    assert elapsed < 0.5  # a dial would have waited 3 s
    assert pool.no_upstream == 1
    assert all(m.total == 0 for m in pool.members)  # no attempt was made
    assert failed_attempts(caplog) == []
    assert log.sessions[0].end_cause == "no_upstream (no healthy upstream)"
    assert log.lines[0].endswith('end="no_upstream (no healthy upstream)"')


async def test_all_members_refusing_closes_the_client_promptly() -> None:
    """Case 15: members that refuse (not yet marked DOWN) fail fast; the client is closed and counted."""
    dead = [refused_address() for _ in range(2)]
    async with running(make_config(dead, retries=5, connect_timeout=3.0)) as (proxy, log):
        for _ in range(2):
            started = time.monotonic()
            reader, writer = await connect(proxy.port())
            assert await closed_by_proxy(reader) == b""
            assert time.monotonic() - started < 1.0
            writer.close()
        await log.wait_for(2)
    assert proxy.pools["default"].no_upstream == 2
    assert [s.end_cause.split(" ")[0] for s in log.sessions] == ["no_upstream", "no_upstream"]
