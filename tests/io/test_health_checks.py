"""Member health on real loopback sockets: active probes, hysteresis, failure kinds. Clients' failed
connects eject members instead (``test_ejection.py``).

RELIABILITY.md cases 16, 19, 20 and 21.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from l4proxy import HealthConfig
from l4proxy.health import Status

from ..kit import Upstream, blackhole, connect, eventually, make_config, refused_address, roundtrip, running, upstreams

PROBES = HealthConfig(enabled=True, interval=0.05, timeout=0.2, rise=2, fall=2)
REDIS_PROBES = HealthConfig(enabled=True, interval=0.05, timeout=0.2, rise=2, fall=2, send=b"PING\r\n", expect=b"+PONG")


class RedisLike:
    """Answers ``PING`` with ``+PONG`` while ``healthy``, else ``-ERR``; any other line comes back as
    ``name:line``, so a client sees which member serves it."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.healthy = True
        self.sessions = 0  # connections that sent something other than PING: real clients

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False
        while line := await reader.readline():
            if line == b"PING\r\n":
                writer.write(b"+PONG\r\n" if self.healthy else b"-ERR not ready\r\n")
            else:
                if not counted:
                    self.sessions, counted = self.sessions + 1, True
                writer.write(self.name + b":" + line)
            await writer.drain()


def health_changes(caplog: pytest.LogCaptureFixture, word: str) -> dict[str, str]:
    """``{member: reason}`` for every 'is DOWN' or 'is UP' line the pool logged."""
    changes: dict[str, str] = {}
    for record in caplog.records:
        if record.name == "l4proxy.health" and f" is {word}: " in record.getMessage():
            assert isinstance(record.args, tuple)
            changes[str(record.args[1])] = str(record.args[2])
    return changes


def dial_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        str(r.args[0])
        for r in caplog.records
        if r.name == "l4proxy.dialer" and isinstance(r.args, tuple) and r.getMessage().startswith("connect to ")
    ]


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line)
    return await asyncio.wait_for(reader.readline(), 5)


async def test_active_checks_bring_a_member_back_once_it_listens_again(caplog: pytest.LogCaptureFixture) -> None:
    """Case 16: a DOWN member returns after ``rise`` passing probes once its port accepts again, and
    then takes new sessions."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    dead = refused_address()
    probes = HealthConfig(enabled=True, interval=0.1, timeout=0.2, rise=2, fall=2)
    async with upstreams(1) as [live], running(make_config([dead, live.address], health=probes)) as (proxy, log):
        member = proxy.pools["default"].members[0]
        await eventually(lambda: member.health.status is Status.DOWN)
        for i in range(2):
            await roundtrip(proxy.port(), b"x")
            await log.wait_for(i + 1)
        assert {s.member.address for s in log.sessions} == {live.address}
        revived = await Upstream().start(port=dead.port)
        try:
            await eventually(lambda: member.health.status is Status.UP)
            for i in range(2, 6):
                assert await roundtrip(proxy.port(), b"back %d" % i) == b"back %d" % i
                await log.wait_for(i + 1)
        finally:
            await revived.stop()
        assert revived.address == dead
    assert health_changes(caplog, "DOWN") == {str(dead): "check failed: refused"}
    assert health_changes(caplog, "UP") == {str(dead): "check passed"}
    assert [s.member.address for s in log.sessions[2:]].count(dead) == 2  # idle members alternate


async def test_flapping_member_does_not_change_state_on_every_probe(caplog: pytest.LogCaptureFixture) -> None:
    """Case 19: with rise=2/fall=2, alternating results never flip the status; two in a row do.

    The server answers each probe from a script and records the member's status as each probe
    arrives (the previous probe's result is applied by then), so the whole history is checked."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    script = "FPFPFP" + "FF" + "PFPFPF" + "PP" + "P"
    seen: list[Status] = []
    status: list[Callable[[], Status]] = []

    async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"PING\r\n"
        turn = len(seen)
        seen.append(status[0]())
        passing = turn >= len(script) or script[turn] == "P"
        writer.write(b"+PONG\r\n" if passing else b"-ERR\r\n")
        await writer.drain()
        await reader.read()  # until the prober hangs up

    async with (
        Upstream(scripted) as server,
        running(make_config([server.address], health=REDIS_PROBES)) as (
            proxy,
            _,
        ),
    ):
        member = proxy.pools["default"].members[0]
        status.append(lambda: member.health.status)
        await eventually(lambda: len(seen) >= len(script))
    up, down = Status.UP, Status.DOWN
    assert seen[: len(script)] == [up] * 8 + [down] * 8 + [up]
    assert health_changes(caplog, "DOWN") == {
        str(server.address): "check failed: bad reply: b'-ERR\\r', expected b'+PONG'"
    }
    assert health_changes(caplog, "UP") == {str(server.address): "check passed"}
    assert sum(" is DOWN: " in r.getMessage() for r in caplog.records) == 1
    assert sum(" is UP: " in r.getMessage() for r in caplog.records) == 1


async def test_probe_failure_kinds_are_told_apart_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """Case 20: refused, timeout, wrong reply and no reply each give their own reason."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")

    async def wrong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"-ERR unknown command\r\n")
        await writer.drain()
        await reader.read()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # read the PING, then close without a word

    refused = refused_address()
    with blackhole() as silent:
        async with (
            Upstream(wrong) as liar,
            Upstream(hang_up) as mute,
            running(make_config([refused, silent, liar.address, mute.address], health=REDIS_PROBES)) as (proxy, _),
        ):
            pool = proxy.pools["default"]
            await eventually(lambda: not pool.balancer.any_up)
    assert health_changes(caplog, "DOWN") == {
        str(refused): "check failed: refused",
        str(silent): "check failed: timeout",
        str(liar.address): "check failed: bad reply: b'-ERR ', expected b'+PONG'",
        str(mute.address): "check failed: bad reply: b'', expected b'+PONG'",
    }
    assert all(m.total == 0 for m in pool.members)  # probes are not sessions


async def test_member_failing_checks_keeps_its_sessions_and_gets_no_new_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Case 21: once A fails its probes it is DOWN; a session already on A keeps working, new
    sessions all go to B, and A's active count falls to 0 only when its session ends."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    a, b = RedisLike("A"), RedisLike("B")
    async with (
        Upstream(a) as server_a,
        Upstream(b) as server_b,
        running(make_config([server_a.address, server_b.address], health=REDIS_PROBES)) as (proxy, log),
    ):
        member_a, member_b = proxy.pools["default"].members
        old_reader, old_writer = await connect(proxy.port())
        assert await ask(old_reader, old_writer, b"first\r\n") == b"A:first\r\n"

        a.healthy = False
        await eventually(lambda: member_a.health.status is Status.DOWN)
        assert await ask(old_reader, old_writer, b"still here\r\n") == b"A:still here\r\n"

        clients = [await connect(proxy.port()) for _ in range(4)]
        for i, (reader, writer) in enumerate(clients):
            assert await ask(reader, writer, b"new %d\r\n" % i) == b"B:new %d\r\n" % i
        assert (member_a.active, member_b.active) == (1, 4)
        assert await ask(old_reader, old_writer, b"and now\r\n") == b"A:and now\r\n"

        for _reader, writer in [*clients, (old_reader, old_writer)]:
            writer.close()
        await log.wait_for(5)
        await eventually(lambda: member_a.active == member_b.active == 0)
    assert (a.sessions, b.sessions) == (1, 4)
    assert health_changes(caplog, "DOWN") == {
        str(server_a.address): "check failed: bad reply: b'-ERR ', expected b'+PONG'"
    }
    assert [s.member.name for s in log.sessions].count(member_a.name) == 1


async def test_probes_alone_never_count_as_sessions() -> None:
    """Probes open real connections, yet the member's active and total counts stay at 0."""
    async with upstreams(2) as servers, running(make_config([s.address for s in servers], health=PROBES)) as (proxy, _):
        await eventually(lambda: all(s.accepted >= 3 for s in servers))
        assert all((m.active, m.total) == (0, 0) for m in proxy.pools["default"].members)
        assert all(m.health.status is Status.UP for m in proxy.pools["default"].members)
