"""Least-connections balancing on real loopback sockets through a real Proxy.

RELIABILITY.md case 17 (retries are in test_retries.py, health in test_health_checks.py).
"""

from __future__ import annotations

import asyncio
import collections

from ..kit import connect, echo, eventually, make_config, roundtrip, running, upstreams

Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def whoami_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Greet with the server's own port (so the client knows which member it reached), then echo."""
    writer.write(b"%d\n" % writer.get_extra_info("sockname")[1])
    await echo(reader, writer)


async def open_session(port: int) -> tuple[int, Client]:
    """A client through the proxy and the port of the member that serves it."""
    reader, writer = await connect(port)
    greeting = await asyncio.wait_for(reader.readline(), 5)
    return int(greeting), (reader, writer)


async def close_all(clients: list[Client]) -> None:
    for _reader, writer in clients:
        writer.close()
    for reader, _writer in clients:
        await asyncio.wait_for(reader.read(), 5)


async def test_idle_members_share_sequential_sessions_evenly() -> None:
    """Ties between idle members rotate: 30 sessions, one after another, give each of 3 members 10."""
    async with upstreams(3) as servers, running(make_config([s.address for s in servers])) as (proxy, log):
        for i in range(30):
            assert await roundtrip(proxy.port(), b"short %d" % i) == b"short %d" % i
            await log.wait_for(i + 1)  # the session has ended and released its member
        members = proxy.pools["default"].members
        assert [m.active for m in members] == [0, 0, 0]
    assert [s.accepted for s in servers] == [10, 10, 10]
    assert [m.total for m in members] == [10, 10, 10]
    chosen = [s.member.index for s in log.sessions]
    assert all(chosen[i] != chosen[i + 1] for i in range(29))  # never the same member twice running


async def test_new_sessions_avoid_the_busy_member() -> None:
    """A member holding 5 long sessions gets none of the next 6, which split 3/3 over the idle two."""
    async with (
        upstreams(3, whoami_echo) as servers,
        running(make_config([s.address for s in servers])) as (
            proxy,
            log,
        ),
    ):
        a, b, c = (s.port for s in servers)
        members = proxy.pools["default"].members
        first = [await open_session(proxy.port()) for _ in range(15)]
        by_member = collections.defaultdict(list)
        for member_port, client in first:
            by_member[member_port].append(client)
        assert {p: len(cs) for p, cs in by_member.items()} == {a: 5, b: 5, c: 5}

        await close_all(by_member[b] + by_member[c])
        await eventually(lambda: [m.active for m in members] == [5, 0, 0])

        second = await asyncio.gather(*(open_session(proxy.port()) for _ in range(6)))
        assert collections.Counter(p for p, _ in second) == {b: 3, c: 3}
        assert [m.active for m in members] == [5, 3, 3]

        for reader, writer in by_member[a]:  # A's old sessions were never disturbed
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"

        await close_all(by_member[a] + [client for _, client in second])
        await log.wait_for(21)
        await eventually(lambda: [m.active for m in members] == [0, 0, 0])
    assert [s.accepted for s in servers] == [5, 8, 8]
    assert [m.total for m in members] == [5, 8, 8]
