"""Routing in a pool with a ``*-primary`` check, against real redis-servers: new sessions go only to
the one primary; two masters at once route to none (clients closed at once, logged once, counted)
until one alone claims the role; ``split_brain = "prefer-newest"`` routes to the one promoted last.
RELIABILITY.md case 39 (routing)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy import Address, Config, HealthConfig
from l4proxy.proxy import Proxy

from ..kit import eventually, make_config, running
from ..servers import RedisServer, redis_servers


def fast(check: str) -> HealthConfig:
    return HealthConfig(enabled=True, interval=0.05, timeout=1.0, rise=1, fall=1, check=check)


def changes(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "l4proxy.health" and text in r.getMessage()]


@pytest.fixture
def two_masters(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    with redis_servers(tmp_path, 2) as (a, b):
        yield a, b


def primary_pool(a: RedisServer, b: RedisServer, split_brain: str = "fail-closed") -> Config:
    config = make_config([Address("127.0.0.1", a.port), Address("127.0.0.1", b.port)], health=fast("redis-primary"))
    return dataclasses.replace(config, pools=(dataclasses.replace(config.pools[0], split_brain=split_brain),))


async def served_by(proxy: Proxy) -> str | None:
    """The member a new client is served by (it sends PING), or None when it is closed at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
    try:
        writer.write(b"PING\r\n")
        reply = await asyncio.wait_for(reader.readline(), 5)
        if not reply:
            return None
        assert reply == b"+PONG\r\n"
        [member] = [s.member for s in proxy.sessions if s.member is not None]
        return member.name
    finally:
        writer.close()
        await eventually(lambda: not proxy.sessions)


async def test_two_masters_route_to_none_until_one_alone_claims_the_role(
    two_masters: tuple[RedisServer, RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    a, b = two_masters
    async with running(primary_pool(a, b)) as (proxy, _):
        pool = proxy.pools["default"]
        [prober] = proxy.probers
        await eventually(lambda: prober.split_brain is not None and prober.split_brain.active)
        refused = pool.no_upstream
        assert await served_by(proxy) is None  # closed at once, not after a timeout
        assert await served_by(proxy) is None
        assert pool.no_upstream == refused + 2
        b.cli("REPLICAOF", "127.0.0.1", str(a.port))
        await eventually(lambda: prober.split_brain is not None and not prober.split_brain.active)
        assert await served_by(proxy) == pool.members[0].name
    assert prober.split_brain is not None and prober.split_brain.episodes == 1
    assert len(changes(caplog, "split brain: 2 members claim the primary role")) == 1
    assert len(changes(caplog, "split brain over")) == 1


async def test_only_the_primary_gets_sessions_and_a_replica_never_does(
    two_masters: tuple[RedisServer, RedisServer],
) -> None:
    a, b = two_masters
    b.cli("REPLICAOF", "127.0.0.1", str(a.port))
    async with running(primary_pool(a, b)) as (proxy, _):
        pool = proxy.pools["default"]
        first, second = pool.members
        await eventually(lambda: pool.balancer.allowed == {first})
        assert {await served_by(proxy) for _ in range(4)} == {first.name}
        assert not second.health.up


async def test_prefer_newest_routes_to_the_member_promoted_last(two_masters: tuple[RedisServer, RedisServer]) -> None:
    a, b = two_masters
    b.cli("REPLICAOF", "127.0.0.1", str(a.port))
    async with running(primary_pool(a, b, "prefer-newest")) as (proxy, _):
        pool = proxy.pools["default"]
        first, second = pool.members
        [prober] = proxy.probers
        await eventually(lambda: pool.balancer.allowed == {first})
        assert await served_by(proxy) == first.name
        b.cli("REPLICAOF", "NO", "ONE")  # promoted while the old primary still claims the role
        await eventually(lambda: prober.split_brain is not None and prober.split_brain.active)
        assert await served_by(proxy) == second.name


async def test_a_primary_pool_routes_to_none_before_a_probe_passes(
    two_masters: tuple[RedisServer, RedisServer],
) -> None:
    a, b = two_masters
    proxy = Proxy(primary_pool(a, b))
    [prober] = proxy.probers
    prober.start()
    try:
        assert proxy.pools["default"].balancer.allowed == frozenset()
        assert proxy.pools["default"].balancer.pick() is None
    finally:
        await prober.stop()
