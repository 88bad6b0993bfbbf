"""A failover in a pool with a ``*-primary`` check, against real redis-servers: a client that connects
while no member claims the primary role waits in the pool's queue and is served by the new primary,
its early bytes delivered there; past ``queue_timeout`` it is closed and counted; a split brain is
still refused at once. A demoted primary's sessions are closed by default (``on_member_down`` is
``close`` for these pools), at safe moments with ``--drain-at safe``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l4proxy import Address, Config, HealthConfig
from l4proxy.balancer import NO_PRIMARY, SPLIT_BRAIN
from l4proxy.causes import MEMBER_DOWN
from l4proxy.checks import Failure
from l4proxy.safeclose import DRAINED

from ..kit import eventually, make_config, running
from ..servers import RedisServer, redis_servers

PING = b"*1\r\n$4\r\nPING\r\n"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """``a`` the primary, ``b`` its replica."""
    with redis_servers(tmp_path, 2) as (a, b):
        b.cli("REPLICAOF", "127.0.0.1", str(a.port))
        yield a, b


def primary_pool(a: RedisServer, b: RedisServer, fall: int = 1, drain_at: str = "now", **pool: Any) -> Config:
    health = HealthConfig(enabled=True, interval=0.05, timeout=1.0, rise=1, fall=fall, check="redis-primary")
    members = [Address("127.0.0.1", a.port), Address("127.0.0.1", b.port)]
    config = make_config(members, health=health, drain_at=drain_at, drain_timeout=10.0)
    return dataclasses.replace(config, pools=(dataclasses.replace(config.pools[0], **pool),))


async def test_a_client_that_connects_during_a_failover_is_served_by_the_new_primary(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    a, b = pair
    async with running(primary_pool(a, b, queue_timeout=10.0)) as (proxy, _):
        pool = proxy.pools["default"]
        first, second = pool.members
        await eventually(lambda: pool.balancer.allowed == {first})
        a.cli("REPLICAOF", "127.0.0.1", str(b.port))  # demoted: no primary now, and no split brain
        await eventually(lambda: pool.balancer.allowed == frozenset())
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
        try:
            writer.write(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$15\r\nduring-failover\r\n" + PING)
            await eventually(lambda: pool.queue.length == 1)
            b.cli("REPLICAOF", "NO", "ONE")  # promoted: the waiting client is connected to it
            assert await asyncio.wait_for(reader.readline(), 5) == b"+OK\r\n"
            assert await asyncio.wait_for(reader.readline(), 5) == b"+PONG\r\n"
            assert [s.member for s in proxy.sessions] == [second]
        finally:
            writer.close()
    assert b.cli("GET", "k") == "during-failover"
    assert (pool.queue.served, pool.queue.no_primary, pool.no_upstream) == (1, 0, 0)


async def test_a_client_waits_for_a_primary_at_most_the_queue_timeout(pair: tuple[RedisServer, RedisServer]) -> None:
    a, b = pair
    a.cli("REPLICAOF", "127.0.0.1", str(b.port))  # both replicas: no primary
    async with running(primary_pool(a, b, queue_timeout=0.3)) as (proxy, access):
        pool = proxy.pools["default"]
        [prober] = proxy.probers
        await eventually(lambda: all(prober.failures[m.key, Failure.WRONG_ROLE] for m in pool.members))
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
        try:
            writer.write(PING)
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
        await access.wait_for(1)
    assert access.sessions[0].end_cause == f"no_upstream ({NO_PRIMARY}; waited 0.3s in the queue (queue_timeout))"
    assert (pool.queue.no_primary, pool.queue.timeouts, pool.queue.served) == (1, 0, 0)


async def test_a_split_brain_is_refused_at_once_and_never_queued(pair: tuple[RedisServer, RedisServer]) -> None:
    a, b = pair
    b.cli("REPLICAOF", "NO", "ONE")  # two masters
    async with running(primary_pool(a, b, queue_timeout=30.0)) as (proxy, access):
        pool = proxy.pools["default"]
        [prober] = proxy.probers
        await eventually(lambda: prober.split_brain is not None and prober.split_brain.active)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
        try:
            writer.write(PING)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # far sooner than the queue's 30 s
        finally:
            writer.close()
        await access.wait_for(1)
    assert access.sessions[0].end_cause == f"no_upstream ({SPLIT_BRAIN})"
    assert (pool.queue.served, pool.queue.no_primary, pool.queue.timeouts) == (0, 0, 0)


async def test_a_demoted_primary_loses_its_sessions_by_default(
    pair: tuple[RedisServer, RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """``fall`` is high, so the old primary stays UP: its sessions close because it lost the role."""
    caplog.set_level(logging.WARNING, logger="l4proxy")
    a, b = pair
    async with running(primary_pool(a, b, fall=50)) as (proxy, access):
        pool = proxy.pools["default"]
        first, second = pool.members
        assert pool.config.on_member_down == "close"
        await eventually(lambda: pool.balancer.allowed == {first})
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
        try:
            writer.write(PING)
            assert await asyncio.wait_for(reader.readline(), 5) == b"+PONG\r\n"
            a.cli("REPLICAOF", "127.0.0.1", str(b.port))
            b.cli("REPLICAOF", "NO", "ONE")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed: its client reconnects
        finally:
            writer.close()
        await access.wait_for(1)
        assert access.sessions[0].end_cause == MEMBER_DOWN
        assert first.health.up and proxy.table.closed_member_down == 1
        await eventually(lambda: pool.balancer.allowed == {second})
    closing = f"pool default member {first.name} is no longer the primary: closing its 1 sessions over 1s"
    assert [r.getMessage() for r in caplog.records if "closing its" in r.getMessage()] == [
        closing + " (--on-member-down close)"
    ]


async def test_with_drain_at_safe_a_demoted_primarys_session_closes_at_its_safe_moment(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    a, b = pair
    async with running(primary_pool(a, b, drain_at="safe")) as (proxy, access):
        pool = proxy.pools["default"]
        first, _ = pool.members
        await eventually(lambda: pool.balancer.allowed == {first})
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
        try:
            writer.write(b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b":1\r\n"
            a.cli("REPLICAOF", "127.0.0.1", str(b.port))
            b.cli("REPLICAOF", "NO", "ONE")
            await eventually(lambda: not first.health.up)  # DOWN by fall 1: its sessions are watched
            assert proxy.sessions, "closed before a safe moment"
            for _ in range(2):  # the watch finds its start in the first answer, the second is safe
                writer.write(PING)
                assert await asyncio.wait_for(reader.readline(), 5) == b"+PONG\r\n"
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
        await access.wait_for(1)
    assert access.sessions[0].end_cause == DRAINED
