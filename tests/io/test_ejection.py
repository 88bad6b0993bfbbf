"""Outlier ejection on real loopback sockets: clients' failed connects, and upstreams that accept and
reset before a byte, eject a member, for a time that grows and caps, within max_ejected_percent, until
its deadline or a passing active check.

RELIABILITY.md case 16 (repeated connect failures take a member out; it returns after its ejection
time or when active checks pass). The table itself is ``tests/unit/test_outlier.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from l4proxy import HealthConfig
from l4proxy.balancer import Member
from l4proxy.config import UpstreamTLSConfig
from l4proxy.snapshot import state_of

from ..kit import (
    PKI,
    Upstream,
    connect,
    eventually,
    make_config,
    refused_address,
    reset_at_once,
    resets_every_other,
    roundtrip,
    running,
    tls_upstream,
    upstreams,
)

QUIET = HealthConfig(enabled=False)


def ejection_lines(caplog: pytest.LogCaptureFixture, word: str = "") -> list[str]:
    """The pool's ejection lines (``ejected for``, ``back from ejection``, ``held in``), in order."""
    found = []
    for record in caplog.records:
        message = record.getMessage()
        if record.name == "l4proxy.health" and ("eject" in message) and word in message:
            found.append(message)
    return found


async def refused_client(port: int) -> None:
    """A client the proxy closes without a byte: its dials were refused, or no member was eligible."""
    reader, writer = await connect(port)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def answer_or_reset(port: int, line: bytes) -> bytes:
    """One client: send ``line``, half-close, read to the end; b"" when the proxy closes or resets it
    (its upstream reset: the session is already attached, so no retry)."""
    with contextlib.suppress(ConnectionResetError):
        return await roundtrip(port, line)
    return b""


async def test_resets_before_the_first_byte_eject_the_member_though_every_connect_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """eject_after=3: a member that accepts every connect and resets it at once is ejected after three
    sessions (counted at that server), though each connect succeeded; the healthy member serves every
    other client, before and after."""
    caplog.set_level(logging.INFO, logger="l4proxy")
    async with Upstream(reset_at_once) as bad, upstreams(1) as [good]:
        config = make_config([bad.address, good.address], health=QUIET, eject_after=3)
        async with running(config) as (proxy, log):
            member = proxy.pools["default"].members[0]
            answered = 0
            for i in range(20):
                answer = await answer_or_reset(proxy.port(), b"client %d" % i)
                answered += answer == b"client %d" % i
                assert answer in (b"", b"client %d" % i)
                if member.ejected:
                    break
            assert member.ejected and bad.accepted == 3 and answered == i + 1 - 3
            assert member.total == 3 and sum(member.stats.connect_failures.values()) == 0  # every connect succeeded
            for j in range(10):
                assert await roundtrip(proxy.port(), b"after %d" % j) == b"after %d" % j
            await log.wait_for(i + 11)
        assert [s.end_cause for s in log.sessions if s.member.address == bad.address] == ["upstream_reset"] * 3
    assert bad.accepted == 3, "an ejected member was dialed"
    assert good.accepted == answered + 10
    assert ejection_lines(caplog) == [
        f"pool default member {bad.address} ejected for 30s after 3 failures in a row: reset before the first byte"
    ]


async def test_a_member_that_resets_only_sometimes_between_served_sessions_is_not_ejected() -> None:
    """The only member resets every other session at once and echoes the others: eject_after=2 is never
    reached, because each session that got bytes clears the streak a connect alone cannot."""
    async with Upstream(resets_every_other()) as flaky:
        async with running(make_config([flaky.address], health=QUIET, eject_after=2)) as (proxy, log):
            member = proxy.pools["default"].members[0]
            streaks = []
            for i in range(20):
                answer = await answer_or_reset(proxy.port(), b"client %d" % i)
                assert answer == (b"" if i % 2 == 0 else b"client %d" % i)
                streaks.append(member.outlier.streak)
            await log.wait_for(20)
            assert not member.ejected and member.stats.ejections == 0
        assert streaks == [1, 0] * 10  # each reset counted, each served session cleared it
        causes = [s.end_cause for s in log.sessions]
        assert causes.count("upstream_reset") == 10
    assert flaky.accepted == 20


async def test_n_refused_connects_in_a_row_eject_the_member_and_new_clients_skip_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """eject_after=3: the third refused dial ejects the member (health stays UP: no probe failed), and
    no later client dials it. Refused dials cannot be counted at a server that is not there, so they
    are counted as the proxy's connect attempts at the member."""
    caplog.set_level(logging.INFO, logger="l4proxy")
    dead = refused_address()
    async with (
        upstreams(1) as [live],
        running(make_config([dead, live.address], retries=2, health=QUIET, eject_after=3)) as (proxy, log),
    ):
        member = proxy.pools["default"].members[0]
        served = 0
        while not member.ejected:
            assert served < 10, "never ejected"
            served += 1
            assert await roundtrip(proxy.port(), b"client %d" % served) == b"client %d" % served
        assert member.total == 3 and member.stats.connect_failures["refused"] == 3
        assert (member.health.up, member.eligible, state_of(member)) == (True, False, "EJECTED")
        assert member.stats.ejections == 1
        for more in range(10):
            assert await roundtrip(proxy.port(), b"more %d" % more) == b"more %d" % more
        await log.wait_for(served + 10)
        assert member.total == 3, "an ejected member was dialed"
    assert live.accepted == served + 10
    assert ejection_lines(caplog) == [
        f"pool default member {dead} ejected for 30s after 3 failures in a row: connect failed: refused"
    ]


async def test_a_failed_tls_handshake_counts_and_the_dials_are_counted_at_the_member(pki: PKI) -> None:
    """A member that accepts and hangs up at once fails every TLS handshake: eject_after=2 such dials,
    counted by the member itself, eject it; the good member serves everyone, before and after."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())  # no half-close: asyncio's TLS transports have none
        await writer.drain()

    async def ask(port: int, line: bytes) -> bytes:
        reader, writer = await connect(port)
        writer.write(line)
        try:
            return await asyncio.wait_for(reader.readline(), 5)
        finally:
            writer.close()

    tls = UpstreamTLSConfig(ca=pki["ca.pem"])
    async with Upstream(hang_up) as bad, tls_upstream(pki.upstream_server_ctx(), answer) as good:
        config = make_config([bad.address, good.address], upstream_tls=tls, retries=2, health=QUIET, eject_after=2)
        async with running(config) as (proxy, log):
            member = proxy.pools["default"].members[0]
            for i in range(20):
                assert await ask(proxy.port(), b"%d\n" % i) == b"%d\n" % i
                if member.ejected:
                    break
            assert member.ejected and bad.accepted == 2 and member.stats.connect_failures["reset"] == 2
            for j in range(10):
                assert await ask(proxy.port(), b"after %d\n" % j) == b"after %d\n" % j
            await log.wait_for(i + 11)
        assert bad.accepted == 2, "an ejected member was dialed"
        assert {s.member.address for s in log.sessions} == {good.address}


async def test_ejections_in_a_row_grow_by_the_base_time_and_stop_at_the_cap(caplog: pytest.LogCaptureFixture) -> None:
    """Base 0.2s, cap 0.5s, one failure ejects: a member that fails again as soon as it is back is out
    for 0.2, 0.4, 0.5 and 0.5s (measured, and logged); each return is at its deadline, by the pool's
    timer, with no client or probe to trigger it. One member may always be ejected, even the only one."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    dead = refused_address()
    config = make_config([dead], retries=0, health=QUIET, eject_after=1, eject_time=0.2, max_eject_time=0.5)
    out_for = []
    async with running(config) as (proxy, log):
        member = proxy.pools["default"].members[0]
        for k in range(1, 5):
            await refused_client(proxy.port())
            assert member.ejected and member.total == k  # one dial per ejection
            began = time.monotonic()
            await refused_client(proxy.port())  # while ejected: closed at once, not dialed
            assert member.total == k
            await eventually(lambda: not member.ejected, timeout=2, interval=0.002)
            out_for.append(time.monotonic() - began)
        await log.wait_for(8)
    expected = [0.2, 0.4, 0.5, 0.5]
    for got, want in zip(out_for, expected, strict=True):
        assert want - 0.02 <= got < want + 0.25, (out_for, expected)
    ejected = ejection_lines(caplog, "ejected for")
    assert [line.split(" ejected for ")[1].split("s ")[0] for line in ejected] == ["0.2", "0.4", "0.5", "0.5"]
    assert ", ejection 3 in a row" in ejected[2] and ", ejection 3 in a row" in ejected[3]  # k stops at the cap
    returned = f"pool default member {dead} back from ejection: ejection over"
    assert ejection_lines(caplog, "back from ejection") == [returned] * 4
    assert member.stats.ejections == 4
    assert [s.end_cause.split(" ")[0] for s in log.sessions] == ["no_upstream"] * 8


async def test_max_ejected_percent_holds_and_the_held_member_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """Four members, three refusing, max_ejected_percent 50: two are ejected, the third reaches
    eject_after but stays in (one line, however many more failures), and every client is served by
    the live member."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    dead = [refused_address() for _ in range(3)]
    async with upstreams(1) as [live]:
        config = make_config([*dead, live.address], retries=3, health=QUIET, eject_after=1, max_ejected_percent=50)
        async with running(config) as (proxy, log):
            members = proxy.pools["default"].members
            for i in range(12):
                assert await roundtrip(proxy.port(), b"%d" % i) == b"%d" % i
            await log.wait_for(12)
            ejected = [m for m in members if m.ejected]
            held = [m for m in members[:3] if not m.ejected]
            assert len(ejected) == 2 and len(held) == 1 and proxy.pools["default"].outliers.ejected == 2
            assert held[0].total > 1  # it kept failing, and kept trying to go
    assert live.accepted == 12
    assert sorted(ejection_lines(caplog, "ejected for")) == sorted(
        f"pool default member {m.name} ejected for 30s after 1 failure in a row: connect failed: refused"
        for m in ejected
    )
    assert ejection_lines(caplog, "not ejected") == [
        f"pool default member {held[0].name} held in after 1 failure in a row: connect failed: refused;"
        " not ejected: 2 of 4 members already out (max_ejected_percent 50)"
    ]


async def test_a_passing_active_check_ends_an_ejection_early(caplog: pytest.LogCaptureFixture) -> None:
    """An ejection of 30s ends at the first probe that passes once the member listens again (the probes
    failed meanwhile, but fall=100 keeps it UP, so only the ejection keeps it out); then it serves."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    dead = refused_address()
    probes = HealthConfig(enabled=True, interval=0.05, timeout=0.2, rise=1, fall=100)
    async with upstreams(1) as [live]:
        config = make_config([dead, live.address], retries=1, health=probes, eject_after=1, eject_time=30.0)
        async with running(config) as (proxy, log):
            member: Member = proxy.pools["default"].members[0]
            for i in range(4):
                assert await roundtrip(proxy.port(), b"%d" % i) == b"%d" % i
                if member.ejected:
                    break
            assert member.ejected and member.health.up
            revived = await Upstream().start(port=dead.port)
            try:
                began = time.monotonic()
                await eventually(lambda: not member.ejected, timeout=5, interval=0.005)
                assert time.monotonic() - began < 2
                for j in range(6):
                    assert await roundtrip(proxy.port(), b"back %d" % j) == b"back %d" % j
                await log.wait_for(i + 7)
            finally:
                await revived.stop()
    assert [s.member.address for s in log.sessions[i + 1 :]].count(dead) == 3  # idle members alternate
    assert ejection_lines(caplog, "back from ejection") == [
        f"pool default member {dead} back from ejection: active check passed"
    ]


async def test_a_served_connect_clears_the_failure_streak() -> None:
    """Failures count in a row: eject_after-1 refused connects, one served, then eject_after-1 again
    leave the member in (without the reset it would go at the third); the third in a row ejects it."""
    flaky = refused_address()
    async with running(make_config([flaky], retries=0, health=QUIET, eject_after=3)) as (proxy, log):
        member = proxy.pools["default"].members[0]
        for done in (1, 2):
            await refused_client(proxy.port())
            await log.wait_for(done)
        assert (member.outlier.streak, member.ejected) == (2, False)
        server = await Upstream().start(port=flaky.port)
        try:
            assert await roundtrip(proxy.port(), b"one success") == b"one success"
        finally:
            await server.stop()
        await log.wait_for(3)
        assert member.outlier.streak == 0
        for done in (4, 5):
            await refused_client(proxy.port())
            await log.wait_for(done)
        assert (member.outlier.streak, member.ejected) == (2, False)
        await refused_client(proxy.port())  # the third failure in a row
        assert member.ejected
    assert server.accepted == 1
