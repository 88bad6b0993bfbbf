"""DNS discovery against a real DNS server (dnsmasq on loopback) whose records change under live traffic.

RELIABILITY.md case 37: a member whose DNS name moves gets its new address checked before that address
gets sessions, and the sessions on the old address keep working until they end. The system-resolver
path runs through the ``getaddrinfo`` seam answered by dnsmasq, and once through the real system
resolver with a temporary /etc/hosts entry (as root only); the SRV path through dnspython.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from l4proxy import Address, HealthConfig, Proxy
from l4proxy.config import Config, Service
from l4proxy.health import Status

from ..dnsserver import Dnsmasq, Recording, discovering, pair
from ..kit import RecordingLog, connect, eventually, open_session, roundtrip


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def proxy_on(config: Config, dns: Dnsmasq) -> AsyncIterator[Proxy]:
    proxy = Proxy(config, RecordingLog())
    [resolver] = proxy.resolvers
    resolver.getaddrinfo, resolver.dns = dns.getaddrinfo, dns.resolver()
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.drain()


def keys(proxy: Proxy) -> list[str]:
    return [m.key for m in proxy.pools["default"].members]


async def test_a_name_that_moves_keeps_its_sessions_and_probes_the_new_address_first(dnsmasq: Dnsmasq) -> None:
    dnsmasq.set_hosts({"redis.test": ["127.0.0.2"]})
    async with pair() as (old, new):
        port = old.port
        async with proxy_on(discovering([Address("redis.test", port)]), dnsmasq) as proxy:
            await moves_under_traffic(proxy, dnsmasq, new, port)


async def moves_under_traffic(proxy: Proxy, dnsmasq: Dnsmasq, new: Recording, port: int) -> None:
    assert keys(proxy) == [f"redis.test@127.0.0.2:{port}"]  # resolved before the first client
    reader, writer, first = await open_session(proxy)
    stop = asyncio.Event()
    replies: list[bytes] = []

    async def clients() -> None:  # new clients all through the move
        while not stop.is_set():
            replies.append(await roundtrip(proxy.port(), b"ping-pong"))

    traffic = asyncio.create_task(clients())
    await eventually(lambda: len(replies) >= 3)
    dnsmasq.set_hosts({"redis.test": ["127.0.0.3"]})
    await eventually(lambda: keys(proxy) == [f"redis.test@127.0.0.3:{port}"])  # the old one drained
    served = len(replies)
    await eventually(lambda: len(replies) >= served + 3)
    stop.set()
    await traffic
    assert set(replies) == {b"ping-pong"}  # no client refused or cut during the move
    assert proxy.pools["default"].no_upstream == 0
    assert new.kinds[0] == "probe" and "client" in new.kinds  # checked first, then used
    assert first.draining
    writer.write(b"still here")  # the session on the old address keeps flowing
    assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
    writer.close()


async def test_a_failed_lookup_keeps_the_last_good_set(dnsmasq: Dnsmasq, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "l4proxy.discovery")
    dnsmasq.set_hosts({"db.test": ["127.0.0.2", "::1"]})
    config = discovering([Address("db.test", 5432)], HealthConfig(enabled=False))
    async with proxy_on(config, dnsmasq) as proxy:
        expected = ["db.test@127.0.0.2:5432", "db.test@[::1]:5432"]
        assert keys(proxy) == expected  # resolved before the first client, A and AAAA
        [resolver] = proxy.resolvers
        dnsmasq.stop()  # lookups now time out
        await eventually(lambda: resolver.failures >= 2)
        assert keys(proxy) == expected
        dnsmasq.start()
        rounds = resolver.rounds
        await eventually(lambda: resolver.rounds > rounds + 1)
        assert keys(proxy) == expected
    failures = [m for m in caplog.messages if "looking up db.test:5432 failed" in m]
    assert len(failures) == 1 and failures[0].endswith("; keeping its 2 addresses")  # once per streak
    assert any("db.test:5432 works again after" in m for m in caplog.messages)


async def test_an_empty_answer_counts_only_once_it_lasts(dnsmasq: Dnsmasq, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "l4proxy.discovery")
    dnsmasq.set_hosts({"gone.test": ["127.0.0.2"], "other.test": ["127.0.0.9"]})
    config = discovering([Address("gone.test", 7000)], HealthConfig(enabled=False), resolve_empty_after=0.6)
    async with proxy_on(config, dnsmasq) as proxy:
        [resolver] = proxy.resolvers
        dnsmasq.set_hosts({"other.test": ["127.0.0.9"]})  # gone.test: NXDOMAIN
        await eventually(lambda: resolver.empty >= 2)
        assert keys(proxy) == ["gone.test@127.0.0.2:7000"]  # kept for now
        await eventually(lambda: keys(proxy) == [])  # every answer empty for 0.6 s: the pool is empty
        reader, writer = await connect(proxy.port())
        assert await asyncio.wait_for(reader.read(), 5) == b""  # a client is closed at once: nothing to dial
        writer.close()
        assert proxy.pools["default"].no_upstream == 1
        dnsmasq.set_hosts({"gone.test": ["127.0.0.4"]})
        await eventually(lambda: keys(proxy) == ["gone.test@127.0.0.4:7000"])
    assert any("gone.test:7000 has had no address for 0.6s; its members drain" in m for m in caplog.messages)


async def test_literal_ips_are_never_resolved(dnsmasq: Dnsmasq) -> None:
    config = discovering([Address("127.0.0.2", 7000)])
    proxy = Proxy(config, RecordingLog())
    assert proxy.resolvers == []


async def test_srv_records_give_members_ports_and_weights(dnsmasq: Dnsmasq) -> None:
    async with pair() as (old, _new):
        port = old.port
        dnsmasq.set_srv(
            [
                ("_redis._tcp.cache.test", "r0.cache.test", port, 10, 60),
                ("_redis._tcp.cache.test", "r1.cache.test", port, 10, 0),
                ("_redis._tcp.cache.test", "backup.cache.test", port, 20, 1),  # next priority: ignored
            ]
        )
        dnsmasq.set_hosts(
            {"r0.cache.test": ["127.0.0.2"], "r1.cache.test": ["127.0.0.3"], "backup.cache.test": ["127.0.0.4"]}
        )
        async with proxy_on(discovering([Service("_redis._tcp.cache.test")]), dnsmasq) as proxy:
            members = proxy.pools["default"].members
            assert [(m.key, m.weight) for m in members] == [
                (f"r0.cache.test@127.0.0.2:{port}", 60),
                (f"r1.cache.test@127.0.0.3:{port}", 1),  # weight 0 counts as 1
            ]
            assert await roundtrip(proxy.port(), b"via srv") == b"via srv"
            dnsmasq.set_hosts({"r0.cache.test": ["127.0.0.3"], "r1.cache.test": ["127.0.0.3"]})  # r0 moves
            moved_keys = [f"r0.cache.test@127.0.0.3:{port}", f"r1.cache.test@127.0.0.3:{port}"]
            await eventually(lambda: sorted(keys(proxy)) == moved_keys)
            await eventually(lambda: all(m.health.status is Status.UP for m in proxy.pools["default"].members))
            served = old.kinds.count("client")
            for _ in range(3):
                assert await roundtrip(proxy.port(), b"moved") == b"moved"
            assert old.kinds.count("client") == served  # r0's old address gets no new client


@pytest.mark.skipif(os.geteuid() != 0, reason="writes a temporary /etc/hosts entry, which needs root")
async def test_the_system_resolver_follows_etc_hosts() -> None:
    """The default resolver is the system's (``loop.getaddrinfo``): /etc/hosts applies. A unique name
    is added for this test and removed in any case."""
    hosts = Path("/etc/hosts")
    original = hosts.read_text()
    name = f"l4proxy-{uuid.uuid4().hex[:12]}.test"
    try:
        hosts.write_text(original + f"127.0.0.2 {name}\n")
        async with pair() as (_old, new):
            config = discovering([Address(name, new.port)])
            async with Proxy(config, RecordingLog()) as proxy:
                assert keys(proxy) == [f"{name}@127.0.0.2:{new.port}"]
                hosts.write_text(original + f"127.0.0.3 {name}\n")
                await eventually(lambda: keys(proxy) == [f"{name}@127.0.0.3:{new.port}"])
                await eventually(lambda: proxy.pools["default"].members[0].health.up)
                assert await roundtrip(proxy.port(), b"hosts") == b"hosts"
                assert new.kinds == ["probe", *new.kinds[1:]] and "client" in new.kinds
    finally:
        hosts.write_text(original)


async def test_a_reload_that_leaves_the_members_alone_keeps_the_addresses_found(dnsmasq: Dnsmasq) -> None:
    """A reload that changes another setting of a pool with a DNS-named member keeps the addresses
    discovery found, and their sessions: the pool does not fall back to the bare name until the next
    lookup (a minute here), nor are its sessions closed at the drain timeout. Waiting that timeout out
    is the point of the last step."""
    dnsmasq.set_hosts({"redis.test": ["127.0.0.2"]})
    async with pair() as (old, _new):
        config = dataclasses.replace(discovering([Address("redis.test", old.port)], resolve_interval=60),
                                     drain_timeout=0.2)  # fmt: skip
        async with proxy_on(config, dnsmasq) as proxy:
            found = [f"redis.test@127.0.0.2:{old.port}"]
            assert keys(proxy) == found
            reader, writer, member = await open_session(proxy)
            try:
                pool = dataclasses.replace(config.pools[0], connect_timeout=2.0)
                steps, problems = await proxy.reconfigure(dataclasses.replace(config, pools=(pool,)))
                assert (steps.pools_updated, steps.members_changed, problems) == (("default",), (), [])
                assert keys(proxy) == found and proxy.pools["default"].members == [member]
                await asyncio.sleep(0.4)
                writer.write(b"still")
                assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
            finally:
                writer.close()
