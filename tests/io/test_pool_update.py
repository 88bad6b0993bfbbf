"""``Pool.update``: members change in place while the proxy runs, matched by key (``host:port``).

Added members take new sessions and get probes; removed members get no new sessions, lose their probes
and keep the sessions they have until those end (bytes still flow); members that stay keep their
health state. RELIABILITY.md cases 21 (a member out of the pick keeps its existing sessions) and 35/37
(pools that change under live traffic lose nothing), the single-process side; the workers' side lives
in ``test_workers.py``.
"""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from l4proxy import HealthConfig, MemberConfig
from l4proxy.errors import ConfigError
from l4proxy.health import Event, Status

from ..kit import eventually, make_config, open_session, refused_address, roundtrip, running, upstreams


async def test_an_added_member_takes_new_sessions(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "l4proxy.health")
    async with upstreams(2) as [a, b], running(make_config([a.address])) as (proxy, log):
        pool = proxy.pools["default"]
        first = pool.members[0]
        added, removed = pool.update([a.address, b.address])
        assert ([m.key for m in added], removed) == ([str(b.address)], [])
        assert pool.members[0] is first
        for i in range(4):
            assert await roundtrip(proxy.port(), b"hi %d" % i) == b"hi %d" % i
            await log.wait_for(i + 1)
    assert (a.accepted, b.accepted) == (2, 2)  # idle members share new sessions evenly
    assert [s.member.key for s in log.sessions].count(str(b.address)) == 2
    assert f"pool default updated: added {b.address}; removed none; 2 in all" in caplog.messages


async def test_a_removed_member_keeps_its_session_and_gets_no_new_ones(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "l4proxy.health")
    async with upstreams(2) as servers, running(make_config([s.address for s in servers])) as (proxy, log):
        pool = proxy.pools["default"]
        reader, writer, leaving = await open_session(proxy, b"first ")
        gone = next(s for s in servers if s.address == leaving.address)
        staying = next(s for s in servers if s is not gone)
        pool.update([staying.address])
        assert [m.address for m in pool.members] == [staying.address]
        assert leaving.draining and pool.balancer.draining == {leaving.key: leaving}
        for i in range(3):  # new clients go to the member that stays
            assert await roundtrip(proxy.port(), b"new %d" % i) == b"new %d" % i
            await log.wait_for(i + 1)
        assert gone.accepted == 1
        writer.write(b"still flowing")  # the removed member's session keeps working
        assert await asyncio.wait_for(reader.readexactly(13), 5) == b"still flowing"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await log.wait_for(4)
        assert leaving.active == 0
    record = log.sessions[-1]
    assert (record.member, record.client.nbytes, record.upstream.nbytes) == (leaving, 19, 19)
    assert f"pool default updated: added none; removed {leaving.name}; 1 in all" in caplog.messages


async def test_a_member_that_stays_keeps_its_ejection() -> None:
    """A member ejected (here by a failed client connect, for a long time) is still ejected, the same
    object with the same ejection state, after an update that adds another member."""
    dead = refused_address()
    async with (
        upstreams(2) as [live, new],
        running(make_config([dead, live.address], eject_after=1, eject_time=60.0)) as (proxy, log),
    ):
        pool = proxy.pools["default"]
        member = pool.members[0]
        for i in range(2):  # the first client's first attempt may go to the dead member: it is ejected
            assert await roundtrip(proxy.port(), b"x") == b"x"
            await log.wait_for(i + 1)
        assert member.ejected
        outlier = member.outlier
        pool.update([dead, live.address, new.address])
        assert pool.members[0] is member and member.outlier is outlier and member.ejected
        assert pool.outliers.members[member.key] is outlier and pool.outliers.ejected == 1
        for i in range(2, 6):
            assert await roundtrip(proxy.port(), b"y") == b"y"
            await log.wait_for(i + 1)
        assert member.total == 1  # the one failed attempt: nothing since
        assert (live.accepted, new.accepted) == (4, 2)


async def test_probes_start_for_added_members_and_stop_for_removed_ones(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "l4proxy.health")
    probes = HealthConfig(enabled=True, interval=0.05, timeout=1.0)
    async with upstreams(2) as [a, b], running(make_config([a.address], health=probes)) as (proxy, _log):
        pool = proxy.pools["default"]
        [prober] = proxy.probers
        await eventually(lambda: a.accepted >= 2)  # a is probed
        assert b.accepted == 0
        [old] = pool.members
        old_task = prober.tasks[old]
        pool.update([b.address])
        assert list(prober.tasks) == pool.members and old not in prober.tasks
        await eventually(old_task.done)
        await eventually(lambda: a.active == 0)
        seen = a.accepted
        await eventually(lambda: b.accepted >= 3)  # b is probed, a is not any more
        assert a.accepted == seen
    line = re.compile(rf"probe of {re.escape(str(b.address))} in pool default: check passed \(\d+\.\d ms\)")
    assert any(line.fullmatch(m) for m in caplog.messages), caplog.messages[:5]


async def test_a_member_removed_and_added_back_while_draining_is_the_same_member() -> None:
    async with upstreams(2) as [a, b], running(make_config([a.address, b.address])) as (proxy, log):
        pool = proxy.pools["default"]
        _reader, writer, member = await open_session(proxy, b"hold")
        others = [m.address for m in pool.members if m is not member]
        pool.update(others)
        added, _ = pool.update([*others, member.address])
        assert added == [member] and not member.draining and member.active == 1
        assert pool.balancer.pick() is not member  # its open session still counts
        writer.close()
        await log.wait_for(1)
        assert member.active == 0


async def test_an_empty_update_is_refused_and_changes_nothing() -> None:
    async with upstreams(1) as [a], running(make_config([a.address])) as (proxy, _log):
        pool = proxy.pools["default"]
        before = list(pool.members)
        with pytest.raises(ConfigError, match="at least one upstream is required"):
            pool.update([])
        assert pool.members == before and pool.config.members == (MemberConfig(a.address),)
        assert await roundtrip(proxy.port(), b"ok") == b"ok"


async def test_an_ejected_member_removed_and_added_back_starts_afresh() -> None:
    """Removing an ejected member forgets its ejection (its place under max_ejected_percent is free at
    once); added back while its session still drains, it is the same member, in, with no history."""
    async with (
        upstreams(2) as [a, b],
        running(make_config([a.address, b.address], eject_after=1, eject_time=60.0)) as (proxy, log),
    ):
        pool = proxy.pools["default"]
        _reader, writer, member = await open_session(proxy, b"hold")
        pool.report(member, Event.TRAFFIC_FAIL, "connect failed: refused")
        assert member.ejected and pool.outliers.ejected == 1
        others = [m.address for m in pool.members if m is not member]
        pool.update(others)
        assert pool.outliers.ejected == 0 and member.key not in pool.outliers.members
        pool.update([*others, member.address])
        assert pool.members[-1] is member and not member.ejected and member.outlier.streak == 0
        assert member.outlier is pool.outliers.members[member.key]
        writer.close()
        await log.wait_for(1)


async def test_a_new_address_gets_no_session_before_its_first_probe_passes(caplog: pytest.LogCaptureFixture) -> None:
    """``set_members(check_first=...)``, as discovery calls it for an address a name moved to: the member
    is DOWN until one probe passes (probed at once, not after the jitter), and only then takes clients."""
    caplog.set_level(logging.INFO, "l4proxy.health")
    slow = HealthConfig(interval=60, timeout=1, rise=3)  # no probe would come in time but the first one
    async with upstreams(2) as [old, new], running(make_config([old.address], health=slow)) as (proxy, log):
        pool = proxy.pools["default"]
        before = new.accepted
        added, _ = pool.set_members([old.address, new.address], check_first={str(new.address)})
        [member] = added
        assert member.health.status is Status.DOWN and new.accepted == before
        line = f"pool default updated: added {new.address} (waits for a probe); removed none; 2 in all"
        assert line in caplog.messages
        await eventually(lambda: member.health.up)  # one passing probe, although rise is 3
        assert new.accepted == 1  # that probe: no client was sent before it
        for i in range(2):
            assert await roundtrip(proxy.port(), b"hi") == b"hi"
            await log.wait_for(i + 1)
        assert new.accepted == 2
    assert f"pool default member {new.address} is UP: check passed" in caplog.messages


async def test_without_health_checks_a_new_address_is_eligible_at_once() -> None:
    async with upstreams(2) as [old, new], running(make_config([old.address])) as (proxy, _log):
        added, _ = proxy.pools["default"].set_members([old.address, new.address], check_first={str(new.address)})
        assert added[0].health.up  # nothing would probe it; failed connects still take it out
