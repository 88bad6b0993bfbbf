"""Traffic control on real sockets: weights, max_conns, backups and slow start.

Sessions are counted where they land, at the upstream servers (``Upstream.active`` and ``peak``), not
in the proxy's own books. Health probes are off in these tests so that only clients' sessions reach
the upstreams. RELIABILITY.md cases 18 (max_conns together with least-connections and weights) and 40
(max_conns never exceeded under concurrent connects across workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from l4proxy.config import Address, Config, HealthConfig, MemberConfig, PoolConfig
from l4proxy.health import Event
from l4proxy.pool import Pool
from l4proxy.table import SharedTable, WorkerView
from l4proxy.workers import Follower

from ..kit import Upstream, connect, eventually, make_config, running, upstreams
from .test_workers import serving, supervised


async def held(port: int, count: int, batch: int = 100) -> tuple[list[asyncio.StreamWriter], int]:
    """Open ``count`` clients, ``batch`` at a time concurrently, each sending one byte; returns the
    writers of the clients that got their byte back (a session is up) and the number the proxy closed."""
    writers: list[asyncio.StreamWriter] = []
    refused = 0

    async def one() -> asyncio.StreamWriter | None:
        reader, writer = await connect(port)
        writer.write(b"x")
        with contextlib.suppress(ConnectionResetError):  # closed with the byte unread: a reset
            if await asyncio.wait_for(reader.read(1), 10) == b"x":
                return writer
        writer.close()
        return None

    for start in range(0, count, batch):
        for writer in await asyncio.gather(*(one() for _ in range(min(batch, count - start)))):
            if writer is None:
                refused += 1
            else:
                writers.append(writer)
    return writers, refused


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()


def pooled(servers: list[Upstream], *specs: dict[str, Any], **settings: Any) -> PoolConfig:
    """A pool of ``servers`` with member options ``specs`` (one each), probes off, and no queue unless
    ``max_queue`` is given (a client beyond the caps is refused at once: the cap itself is tested)."""
    settings.setdefault("max_queue", 0)
    members = tuple(MemberConfig(s.address, **spec) for s, spec in zip(servers, specs, strict=True))
    return PoolConfig(members=members, health=HealthConfig(enabled=False), **settings)


def with_pool(pool: PoolConfig) -> Config:
    return replace(make_config([Address("127.0.0.1", 1)]), pools=(pool,))


# --- weights ---------------------------------------------------------------------------------------

TOLERANCE = 10  # sessions of 1,000 (1%); in one process the split is exact, ±1 from rounding


async def test_weights_split_held_sessions_in_proportion() -> None:
    async with upstreams(3) as servers, running(
        with_pool(pooled(servers, {"weight": 5}, {"weight": 3}, {"weight": 2}))
    ) as (proxy, _log):
        writers, refused = await held(proxy.port(), 1000)
        await eventually(lambda: sum(s.active for s in servers) == 1000)
        split = [s.active for s in servers]
        close_all(writers)
        await eventually(lambda: all(s.active == 0 for s in servers))
    assert refused == 0
    for got, expected in zip(split, (500, 300, 200), strict=True):
        assert abs(got - expected) <= TOLERANCE, split


# --- max_conns -------------------------------------------------------------------------------------


async def test_max_conns_is_never_exceeded_under_concurrent_connects() -> None:
    async with upstreams(2) as servers, running(
        with_pool(pooled(servers, {"max_conns": 5, "weight": 10}, {"max_conns": 7}))
    ) as (proxy, log):
        writers, refused = await held(proxy.port(), 60, batch=60)
        peaks = [s.peak for s in servers]
        accepted = [s.accepted for s in servers]
        close_all(writers)
        await log.wait_for(60)
    assert (len(writers), refused) == (12, 48)
    assert peaks == [5, 7] and accepted == [5, 7]  # each member full to its cap, and never past it
    ends = [s.end_cause for s in log.sessions]
    assert ends.count("no_upstream (every healthy upstream is at its max_conns)") == 48


async def test_max_conns_holds_across_two_workers(tmp_path: Path) -> None:
    async with serving(2) as servers:
        specs = [f"{servers[0].address};max_conns=6", f"{servers[1].address};max_conns=4;weight=3"]
        async with supervised(tmp_path, specs, "--no-health-checks", "--max-queue", "0") as proxy:  # as typed
            writers, refused = await held(proxy.port, 80, batch=80)
            peaks = [s.peak for s in servers]
            close_all(writers)
            records = await proxy.wait_records(80)
    assert (len(writers), refused) == (10, 70)
    assert peaks == [6, 4], peaks
    assert {line.rsplit(" ", 1)[-1] for line in records} == {"worker=0", "worker=1"}  # both took clients


async def test_a_freed_place_under_the_cap_is_taken_again() -> None:
    async with upstreams(1) as [server], running(with_pool(pooled([server], {"max_conns": 2}))) as (proxy, _log):
        writers, refused = await held(proxy.port(), 3, batch=1)
        assert (len(writers), refused) == (2, 1)
        close_all(writers[:1])
        await eventually(lambda: server.active == 1)
        more, refused = await held(proxy.port(), 2, batch=1)
        assert (len(more), refused, server.peak) == (1, 1, 2)
        close_all(writers[1:] + more)


# --- backups ---------------------------------------------------------------------------------------


async def test_a_backup_takes_sessions_only_while_the_primaries_are_full() -> None:
    async with upstreams(3) as servers, running(
        with_pool(pooled(servers, {"max_conns": 3}, {"max_conns": 3}, {"backup": True}))
    ) as (proxy, _log):
        a, b, backup = servers
        first, _ = await held(proxy.port(), 6, batch=6)
        assert (a.active, b.active, backup.accepted) == (3, 3, 0)
        overflow, _ = await held(proxy.port(), 4, batch=4)
        assert backup.active == 4
        close_all(first[:1])  # a place on a primary is free again: the next session goes there
        await eventually(lambda: a.active + b.active == 5)
        again, _ = await held(proxy.port(), 1)
        assert (a.active + b.active, backup.active) == (6, 4)
        close_all(first[1:] + overflow + again)


async def test_a_backup_serves_while_every_primary_is_out() -> None:
    async with upstreams(3) as servers, running(
        # every retry allowed: ten clients at once retrying past two refusing primaries is the case the
        # retry budget exists to refuse (tests/test_retry_budget.py); here it is about the backup
        with_pool(pooled(servers, {}, {}, {"backup": True}, retries=2, retry_budget=100, max_ejected_percent=100))
    ) as (proxy, _log):
        a, b, backup = servers
        writers, _ = await held(proxy.port(), 10)
        assert (a.accepted, b.accepted, backup.accepted) == (5, 5, 0)
        close_all(writers)
        await eventually(lambda: a.active + b.active == 0)
        await a.stop()
        await b.stop()  # refused from now on: retries, then eject_after failures eject them
        writers, refused = await held(proxy.port(), 10)
        assert (len(writers), refused, backup.active) == (10, 0, 10)
        pool = proxy.pools["default"]
        assert [m.ejected for m in pool.members] == [True, True, False]
        close_all(writers)


# --- slow start ------------------------------------------------------------------------------------


async def test_slow_start_ramps_a_member_that_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "l4proxy.health")
    members = (MemberConfig(Address("127.0.0.1", 1), weight=10, max_conns=100), MemberConfig(Address("127.0.0.1", 2)))
    config = PoolConfig(members, health=HealthConfig(enabled=False), slow_start=0.5, eject_after=3, eject_time=0.05)
    pool = Pool(config)
    member = pool.members[0]
    assert (member.weight, member.limit) == (10, 100)  # present at start-up: full share at once
    seen: list[tuple[int, int]] = []
    try:
        for _ in range(3):
            pool.report(member, Event.TRAFFIC_FAIL, "connect failed: refused")
        assert member.ejected
        await eventually(lambda: not member.ejected)  # the ejection is over: back, ramping from 10%
        while member.slow.ramping or not seen or seen[-1] != (10, 100):
            seen.append((member.weight, member.limit))
            await asyncio.sleep(0.02)
            assert len(seen) < 200, seen
    finally:
        pool.close()
    assert seen[0][0] <= 2 and seen[0][1] <= 20, seen  # within a step of 10% (1 of 10, 10 of 100)
    assert seen == sorted(seen) and seen[-1] == (10, 100) and len(set(seen)) >= 4, seen
    messages = [r.getMessage() for r in caplog.records]
    assert sum("slow start: weight 1 of 10, max_conns 10 of 100, full in 0.5s" in m for m in messages) == 1
    assert sum("slow start over: full weight 10, max_conns 100" in m for m in messages) == 1


async def test_no_ramp_without_slow_start() -> None:
    config = PoolConfig((Address("127.0.0.1", 1),), health=HealthConfig(enabled=False), eject_after=3, eject_time=0.05)
    pool = Pool(config)
    member = pool.members[0]
    try:
        for _ in range(3):
            pool.report(member, Event.TRAFFIC_FAIL, "refused")
        assert member.ejected
        await eventually(lambda: not member.ejected)
        assert (member.weight, member.slow.ramping, pool._ramps) == (1, False, {})
    finally:
        pool.close()


def test_a_worker_follows_the_supervisors_ramp() -> None:
    config = make_config([MemberConfig(Address("127.0.0.1", 1), weight=20, max_conns=50)])
    config = replace(config, pools=(replace(config.pools[0], slow_start=10.0),))
    table = SharedTable(config, 1)
    pool = Pool(config.pools[0])
    follower = Follower(table, 0, [pool])
    follower.apply()
    member = pool.members[0]
    table.share[member.slot] = 0.5
    follower.follow_ramps()
    assert (member.weight, member.limit) == (10, 25)
    table.share[member.slot] = 1.0
    follower.follow_ramps()
    assert (member.weight, member.limit) == (20, 50)


# --- the reservation across processes ----------------------------------------------------------------


def test_reservations_in_four_processes_never_pass_the_cap() -> None:
    """Four processes reserve places on one capped member as fast as they can, each holding up to two
    (eight wanted, five allowed), and check after every reservation that the global count is within
    the cap."""
    workers, cap = 4, 5
    table = SharedTable(make_config([Address("127.0.0.1", 1)]), workers)
    slot = next(iter(table.slots("default").values()))
    start, go = os.pipe()  # the children begin together, when the parent closes ``go``
    pids = []
    for worker in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            with contextlib.suppress(BaseException):
                os.close(go)
                os.read(start, 1)
                code = _reserve_and_release(table, worker, slot, cap)
            os._exit(code)
        pids.append(pid)
    os.close(start)
    os.close(go)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert 2 not in codes and 3 not in codes, codes  # 2: the cap was exceeded; 3: never a place
    assert 0 in codes, codes  # some process was refused: the cap was contended (4: never refused)
    assert sum(table.active[cell] for cell in table.column(slot)) == 0


def _reserve_and_release(table: SharedTable, worker: int, slot: int, cap: int) -> int:
    view = WorkerView(table, worker)
    mine = successes = refusals = 0
    deadline = time.monotonic() + 0.5  # by time, not count, so the processes overlap even under load
    while time.monotonic() < deadline:
        if view.reserve(slot, cap, mine + 1):
            mine += 1
            successes += 1
            with table.lock:  # a consistent read: another process may release and reserve meanwhile
                total = sum(table.active[cell] for cell in table.column(slot))
            if total > cap:
                return 2
        else:
            refusals += 1
        if mine == 2:
            mine = 0
            view.publish(slot, 0)
    view.publish(slot, 0)
    return 3 if not successes else 0 if refusals else 4


def test_a_dead_workers_hold_on_the_lock_is_released() -> None:
    table = SharedTable(make_config([Address("127.0.0.1", 1)]), 2)
    table.lock.acquire()
    table.header[table.holder] = 1 + 1  # worker 1 died inside reserve
    table.clear_worker(0)
    assert not table.lock.acquire(False)  # not worker 0's: still held
    table.clear_worker(1)
    assert table.lock.acquire(False)
    table.lock.release()
