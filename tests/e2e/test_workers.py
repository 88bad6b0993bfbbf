"""``--workers N``: worker processes on SO_REUSEPORT sockets under a supervisor, with least-connections
and health shared through memory.

The end-to-end tests run the real ``l4proxy`` command with ``--workers 2`` and tell the workers apart by
the ``worker=K`` field of the access log and the ``worker K started (pid P)`` lines of the supervisor.
In-process tests drive two balancers over one ``SharedTable`` to show the pick reads every worker's
counts and the supervisor's status, and the passive path that turns workers' failed connects into one
DOWN decision.

RELIABILITY.md cases 11 (one access-log line per session, whole, naming the worker), 16 (passive failure
marking across workers), 17 (least-connections stays global), 21 (a member failing its checks gets no
new clients from any worker), 32 (SIGTERM drains every worker and the command exits 0; SIGHUP is
forwarded), and worker supervision (a killed worker is logged once and replaced).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from l4proxy.accesslog import AccessLog
from l4proxy.balancer import NO_HEALTHY, NO_PRIMARY, SPLIT_BRAIN, Balancer, Member
from l4proxy.config import Address, HealthConfig, Resolved, Service
from l4proxy.errors import ConfigError
from l4proxy.health import Event
from l4proxy.pool import Pool
from l4proxy.proxy import Proxy
from l4proxy.resolver import Resolver
from l4proxy.table import (
    CHOSEN,
    EJECTED,
    ELIGIBLE,
    FREE,
    LEFT_OUT,
    OPEN,
    RETIRED,
    SPLIT_OUT,
    SharedTable,
    WorkerView,
    forwarder,
)
from l4proxy.workers import Follower, HealthThread, Supervisor, WorkerShare, _HealthPool, parse_workers

from ..dnsserver import Dnsmasq, discovering, pair
from ..kit import (
    Handler,
    RecordingLog,
    Upstream,
    connect,
    echo,
    eventually,
    make_config,
    open_session,
    refused_address,
    reset_at_once,
    resets_every_other,
    roundtrip,
    upstreams,
)
from ..reuseport import in_netns
from ..servers import Command, free_port, run_command

STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


class Supervised(Command):
    """``l4proxy --workers 2`` on a free port, with what the supervisor's log and the access log say."""

    def __init__(self, access_log: Path, members: list[Address], *flags: str) -> None:
        super().__init__(
            "--upstream", ",".join(str(m) for m in members), "--workers", "2", "--access-log", str(access_log),
            "--half-closed-timeout", "1s", "--drain-timeout", "5s", "--connect-timeout", "0.5s", *flags,
            listeners=2,
        )  # fmt: skip
        self.access_log = access_log

    def workers(self) -> dict[int, int]:
        """Worker slot -> pid of its latest process, from the supervisor's log."""
        found: dict[int, int] = {}
        for line in list(self.err_lines):
            if match := STARTED.search(line):
                found[int(match.group(1))] = int(match.group(2))
        return found

    def records(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    async def wait_records(self, count: int, timeout: float = 10.0) -> list[str]:
        await eventually(lambda: len(self.records()) >= count, timeout, interval=0.05)
        return self.records()


@contextlib.asynccontextmanager
async def supervised(tmp_path: Path, members: list[Address], *flags: str) -> AsyncIterator[Supervised]:
    """Started and ready (listening); stopped with SIGTERM if the test did not stop it."""
    async with Supervised(tmp_path / "access.log", members, *flags) as proxy:
        try:
            yield proxy
        finally:
            if proxy.poll() is None:
                await proxy.stopped()


@contextlib.asynccontextmanager
async def serving(count: int, handler: Handler = echo) -> AsyncIterator[list[Upstream]]:
    """Upstreams that stop only once the connections they hold are done: the supervisor's probes end
    as it exits, and cancelling a stream handler mid-connection makes Python 3.11's asyncio log an
    error."""
    async with upstreams(count, handler) as servers:
        yield servers
        await eventually(lambda: all(s.active == 0 for s in servers))


@contextlib.contextmanager
def listening_only_on(port: int = 0) -> Iterator[socket.socket]:
    """A member that completes TCP handshakes (probes pass) and never accepts: closing it makes it refuse."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    try:
        yield sock
    finally:
        sock.close()


def share(records: list[str]) -> Counter[str]:
    """Sessions per worker, from the ``worker=K`` field that ends every access-log line."""
    workers = [line.rsplit(" ", 1)[-1] for line in records]
    assert all(re.fullmatch(r"worker=[01]", w) for w in workers), records[:5]
    return Counter(workers)


async def test_both_workers_take_sessions_and_log_whole_lines(tmp_path: Path) -> None:
    async with serving(2) as servers, supervised(tmp_path, [s.address for s in servers]) as proxy:
        for i in range(200):
            payload = f"hello {i}".encode()
            assert await roundtrip(proxy.port, payload) == payload
        records = await proxy.wait_records(200)
    assert len(records) == 200
    counts = share(records)
    assert all(50 <= counts[w] <= 150 for w in ("worker=0", "worker=1")), counts
    assert all(" end=eof " in line and line.startswith("20") for line in records), records[:3]


async def test_least_connections_is_global_across_workers(tmp_path: Path) -> None:
    """20 held sessions split 10/10 over the members, whichever worker accepted each."""
    async with serving(2) as servers, supervised(tmp_path, [s.address for s in servers]) as proxy:
        clients = []
        for _ in range(20):
            reader, writer = await connect(proxy.port)
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"  # the dial is done
            clients.append(writer)
        await eventually(lambda: sum(s.active for s in servers) == 20)
        held = [s.active for s in servers]
        for writer in clients:
            writer.close()
        records = await proxy.wait_records(20)
    assert all(9 <= active <= 11 for active in held), held
    counts = share(records)
    assert counts["worker=0"] and counts["worker=1"], counts  # both workers placed sessions


async def test_a_killed_worker_is_logged_once_and_replaced(tmp_path: Path) -> None:
    async with serving(1) as [server], supervised(tmp_path, [server.address]) as proxy:
        victim = proxy.workers()[0]
        os.kill(victim, signal.SIGKILL)
        await proxy.logged(f"worker 0 (pid {victim}) was killed by SIGKILL; starting a new one in 0.1s")
        await proxy.logged("listening on", 3)
        replacement = proxy.workers()[0]
        assert replacement != victim
        for i in range(40):
            assert await roundtrip(proxy.port, b"%d" % i) == b"%d" % i
        records = await proxy.wait_records(40)
        assert proxy.count("was killed") == 1
        assert await proxy.stopped() == 0
    counts = share(records)
    assert counts["worker=0"] and counts["worker=1"], counts  # the replacement takes sessions too


async def test_sigterm_drains_every_worker_and_exits_zero(tmp_path: Path) -> None:
    reply = b"r" * 300_000

    async def slow_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        await asyncio.sleep(0.3)  # the behaviour under test: a reply still on its way at SIGTERM
        writer.write(reply)
        await writer.drain()

    flags = ("--no-health-checks",)
    async with serving(1, slow_answer) as [server], supervised(tmp_path, [server.address], *flags) as proxy:
        pids = set(proxy.workers().values())
        reader, writer = await connect(proxy.port)
        writer.write(b"question")
        writer.write_eof()
        await eventually(lambda: server.active == 1)
        proxy.signal(signal.SIGHUP)  # forwarded: no TLS here, so nothing to reload; workers live on
        await proxy.logged("SIGHUP: no TLS configured, nothing to reload")
        proxy.signal(signal.SIGTERM)
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert await proxy.exited(10) == 0
        records = await proxy.wait_records(1)
    assert data == reply
    assert len(records) == 1 and f"out={len(reply)}" in records[0] and "end=eof" in records[0], records
    assert "SIGTERM received: draining 2 workers" in proxy.stderr
    assert proxy.count("exited with status 0") == 2 and "all 2 workers stopped" in proxy.stderr
    assert "Traceback" not in proxy.stderr and "was killed" not in proxy.stderr, proxy.stderr
    assert "reloading TLS files" not in proxy.stderr
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_second_sigterm_closes_the_sessions_at_once(tmp_path: Path) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass

    flags = ("--no-health-checks",)
    async with serving(1, hold) as [server], supervised(tmp_path, [server.address], *flags) as proxy:
        reader, writer = await connect(proxy.port)
        writer.write(b"stay")
        await eventually(lambda: server.active == 1)
        proxy.signal(signal.SIGTERM)
        await proxy.logged("SIGTERM received: draining", 3)  # the supervisor and both workers
        proxy.signal(signal.SIGTERM)
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert await proxy.exited(5) == 0
        records = await proxy.wait_records(1)
    assert len(records) == 1 and "end=forced_shutdown" in records[0], records
    assert "SIGTERM received again" in proxy.stderr


async def test_a_member_going_down_is_logged_once_and_gets_no_clients(tmp_path: Path) -> None:
    """Probes run once, in the supervisor: one DOWN line, one UP line, and no worker uses it meanwhile."""
    flags = ("--health-interval", "0.1s", "--health-timeout", "0.2s", "--fall", "2", "--rise", "1")
    with listening_only_on() as member:
        down = Address("127.0.0.1", member.getsockname()[1])
        async with serving(1) as [up], supervised(tmp_path, [up.address, down], *flags) as proxy:
            member.close()  # refused from now on
            await proxy.logged(f"member {down} is DOWN")
            for i in range(20):
                assert await roundtrip(proxy.port, b"%d" % i) == b"%d" % i
            await asyncio.sleep(0.5)  # the behaviour under test: several more probe rounds, no second DOWN
            assert proxy.count("is DOWN") == 1, proxy.stderr
            records = await proxy.wait_records(20)
            assert all(f"upstream={up.address}" in line for line in records), records
            with listening_only_on(down.port):
                await proxy.logged(f"member {down} is UP")
                await asyncio.sleep(0.3)  # the behaviour under test: probe rounds after UP, no flap
            assert proxy.count("is DOWN") == 1 and proxy.count("is UP") == 1, proxy.stderr
    health_lines = [line for line in proxy.err_lines if " is DOWN" in line or " is UP" in line]
    assert all("l4proxy.health:" in line for line in health_lines), health_lines  # the supervisor's


async def test_workers_failures_eject_a_member_once_for_every_worker(tmp_path: Path) -> None:
    """Without probes, failed connects seen by the workers reach the supervisor, which ejects once and
    logs once; from then on no worker dials the member (its connect attempts, summed over the workers
    by the admin endpoint, stay put while both workers serve more clients)."""
    dead = refused_address()
    admin = free_port()
    flags = ("--no-health-checks", "--eject-after", "2", "--eject-time", "30s", "--admin", f"127.0.0.1:{admin}")

    def counts() -> tuple[int, int, str]:
        """(sessions on the live member, connect attempts at the dead one, its state), from /status."""
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as response:
            members = {m["name"]: m for m in json.loads(response.read())["pools"][0]["members"]}
        live, out = members[str(server.address)], members[str(dead)]
        return live["sessions"], out["connect_attempts"], out["state"]

    async def settled(sessions: int) -> int:
        """The dead member's attempts once every worker has published its counts of ``sessions`` sessions."""
        await eventually(lambda: counts()[0] == sessions, interval=0.05)
        return counts()[1]

    async with serving(1) as [server], supervised(tmp_path, [server.address, dead], *flags) as proxy:
        for i in range(30):
            assert await roundtrip(proxy.port, b"%d" % i) == b"%d" % i  # retried on the live member
        await proxy.logged("ejected for 30s")
        before = await settled(30)
        assert counts()[2] == "EJECTED"
        for i in range(30, 50):
            assert await roundtrip(proxy.port, b"%d" % i) == b"%d" % i
        assert await settled(50) == before, "a worker dialed the ejected member"
        records = await proxy.wait_records(50)
    ejected = [line for line in proxy.err_lines if " ejected for " in line]
    expected = f"member {dead} ejected for 30s after 2 failures in a row: connect failed: refused"
    assert len(ejected) == 1 and expected in ejected[0] and "l4proxy.health:" in ejected[0], proxy.stderr
    assert len(share(records[30:])) == 2, "one worker served every client after the ejection"
    assert server.accepted == 50


@pytest.mark.parametrize("value", ["0", "-1", "two", "", "1.5", "257"])
def test_bad_workers_values_are_one_line_errors(value: str) -> None:
    result = run_command("--listen", ":1", "--upstream", "a", f"--workers={value}")
    expected = f"l4proxy: error: --workers {value!r}: expected a number of processes from 1 to 256, or 'auto'\n"
    assert (result.returncode, result.stderr) == (2, expected)


@pytest.mark.parametrize(("text", "count"), [("1", 1), ("2", 2), (" 4 ", 4), ("AUTO", len(os.sched_getaffinity(0)))])
def test_parse_workers(text: str, count: int) -> None:
    assert parse_workers(text) == count


def test_parse_workers_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^workers '0': expected a number"):
        parse_workers("0", "workers")


def two_workers() -> tuple[SharedTable, Balancer, Balancer]:
    """Two workers' balancers of one pool over one table, as after the fork."""
    members = [Address("127.0.0.1", 1), Address("127.0.0.1", 2)]
    table = SharedTable(make_config(members), 2)
    health = HealthConfig()
    first, second = (Balancer(members, health, WorkerView(table, w)) for w in (0, 1))
    for balancer in (first, second):
        for member in balancer.members:
            member.slot = table.slots("default")[member.key]
    return table, first, second


def test_a_pick_counts_the_sessions_of_every_worker() -> None:
    table, first, second = two_workers()
    for _ in range(3):
        first.acquire(first.members[0])
    assert [first.members[0].active, second.members[0].active] == [3, 0]  # each counts its own
    picks = []
    for _ in range(3):
        member = second.pick()
        assert member is not None
        second.acquire(member)
        picks.append(member.index)
    assert picks == [1, 1, 1]  # the other worker's three sessions count
    first.release(first.members[0])
    assert second.pick() is second.members[0]
    table.clear_worker(1)  # a dead worker's sessions are gone
    assert [first.view.active(i) for i in (0, 1)] == [2, 0]  # type: ignore[union-attr]


def test_a_pick_follows_the_supervisors_status() -> None:
    table, first, _second = two_workers()
    table.up[0] = 0
    assert [first.pick() for _ in range(3)] == [first.members[1]] * 3
    assert first.any_up
    table.up[1] = 0
    assert first.pick() is None and not first.any_up


@pytest.mark.parametrize(
    ("roles", "cause"),
    [
        ((OPEN, OPEN), NO_HEALTHY),  # no primary pool: nothing restricts it
        ((LEFT_OUT, LEFT_OUT), NO_PRIMARY),  # a failover: the client waits for the next primary
        ((SPLIT_OUT, SPLIT_OUT), SPLIT_BRAIN),  # refused at once
        ((SPLIT_OUT, LEFT_OUT), SPLIT_BRAIN),  # read while the supervisor writes the second byte
    ],
)
def test_a_worker_tells_the_shortage_the_supervisor_published_before_it_follows_it(
    roles: tuple[int, int], cause: str
) -> None:
    """The supervisor logs a change once it is in the table; a worker whose balancer has not followed
    the routing yet (its next look is up to 50 ms away) still gives a client the cause published now."""
    table, first, _second = two_workers()
    for slot, role in enumerate(roles):
        table.up[slot] = 0
        table.role[slot] = role
    assert first.allowed is None  # not followed yet
    assert first.take() is None
    assert first.shortage() == cause


async def test_failures_from_two_workers_make_one_ejection_that_no_worker_picks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Worker 0 and worker 1 each see some of a member's failed connects; the supervisor counts them in
    one streak, ejects once, logs once, and publishes it ejected: neither worker's pick takes it, while
    a health check (were it on) would still see it UP. The ejection's end is published too."""
    members = [Address("127.0.0.1", 1), Address("127.0.0.1", 2)]
    config = make_config(members, eject_after=3, eject_time=0.1)
    table = SharedTable(config, 2)
    health = HealthThread(config, table)
    pool = _HealthPool(config.pools[0], table)
    pickers = [Balancer(members, HealthConfig(), WorkerView(table, w)) for w in (0, 1)]
    for picker in pickers:
        for member in picker.members:
            member.slot = table.slots("default")[member.key]
    forwards = [forwarder(table, w) for w in (0, 1)]
    try:
        forwards[0](pool.members[1], Event.TRAFFIC_FAIL, "connect failed: refused")
        health._passive(pool)
        assert not pool.members[1].ejected and table.up[1] == ELIGIBLE
        caplog.set_level(logging.INFO, "l4proxy.health")
        forwards[1](pool.members[1], Event.TRAFFIC_FAIL, "connect failed: refused")
        forwards[0](pool.members[1], Event.TRAFFIC_FAIL, "connect failed: refused")
        forwards[0](pool.members[0], Event.TRAFFIC_OK, "")
        health._passive(pool)
        assert pool.members[1].ejected and pool.members[1].up
        assert (table.up[1], table.up[0]) == (EJECTED, ELIGIBLE)
        assert [r.getMessage() for r in caplog.records] == [
            f"pool default member {members[1]} ejected for 0.1s after 3 failures in a row: connect failed: refused"
        ]
        for picker in pickers:  # worker 1 saw only one of the failures: its pick skips the member all the same
            assert [picker.pick() for _ in range(3)] == [picker.members[0]] * 3
        await eventually(lambda: table.up[1] == ELIGIBLE, timeout=2)  # the supervisor's timer ended it
        assert {picker.pick() for picker in pickers for _ in range(2)} == {*pickers[0].members, *pickers[1].members}
    finally:
        pool.close()


async def test_a_success_in_the_same_interval_clears_the_streak() -> None:
    """Order inside one look is not kept: failures first, then a success, so mixed results do not eject;
    failures alone carry their streak over to the next look."""
    members = [Address("127.0.0.1", 1)]
    config = make_config(members, eject_after=3)
    table = SharedTable(config, 2)
    health = HealthThread(config, table)
    pool = _HealthPool(config.pools[0], table)
    forward = forwarder(table, 1)
    try:
        for event in (Event.TRAFFIC_FAIL, Event.TRAFFIC_OK, Event.TRAFFIC_FAIL):
            forward(pool.members[0], event, "connect failed: refused")
        health._passive(pool)
        assert not pool.members[0].ejected and pool.members[0].outlier.streak == 0
        for _ in range(2):
            forward(pool.members[0], Event.TRAFFIC_FAIL, "connect failed: refused")
            health._passive(pool)
        assert not pool.members[0].ejected and pool.members[0].outlier.streak == 2
        forward(pool.members[0], Event.TRAFFIC_FAIL, "connect failed: refused")
        health._passive(pool)
        assert pool.members[0].ejected and table.up[0] == EJECTED
    finally:
        pool.close()


async def test_resets_from_two_workers_make_one_streak_that_connects_leave_and_a_served_session_clears(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each worker forwards its connects (successes) and its sessions the member reset before a byte;
    the supervisor counts the resets of both in one streak that the connects leave alone, publishes that
    it is not 0 (``streaky``), and one served session from either worker clears it. The forwarder marks
    the worker's own copy on a reset and clears it once it has said a session was served."""
    members = [Address("127.0.0.1", 1)]
    config = make_config(members, eject_after=3)
    table = SharedTable(config, 2)
    health = HealthThread(config, table)
    pool = _HealthPool(config.pools[0], table)
    workers = [Balancer(members, HealthConfig(), WorkerView(table, w)) for w in (0, 1)]
    seen = [picker.members[0] for picker in workers]  # each worker's own copy of the member
    for copy in seen:
        copy.slot = table.slots("default")[copy.key]
    forwards = [forwarder(table, w) for w in (0, 1)]
    member = pool.members[0]

    def session(worker: int, event: Event) -> None:
        forwards[worker](seen[worker], Event.TRAFFIC_OK, "")
        forwards[worker](seen[worker], event, "")

    try:
        session(0, Event.TRAFFIC_RESET)
        session(1, Event.TRAFFIC_RESET)
        health._passive(pool)
        assert (member.outlier.streak, table.streaky[0], member.ejected) == (2, 1, False)
        assert [copy.outlier.streak for copy in seen] == [1, 1]
        session(1, Event.TRAFFIC_SERVED)
        assert [copy.outlier.streak for copy in seen] == [1, 0]
        health._passive(pool)
        assert (member.outlier.streak, table.streaky[0]) == (0, 0)
        caplog.set_level(logging.INFO, "l4proxy.health")
        for worker in (0, 1, 0):
            session(worker, Event.TRAFFIC_RESET)
        health._passive(pool)
        assert member.ejected and table.up[0] == EJECTED and table.streaky[0] == 0
        assert [r.getMessage() for r in caplog.records] == [
            f"pool default member {members[0]} ejected for 30s after 3 failures in a row: reset before the first byte"
        ]
    finally:
        pool.close()


async def test_workers_resets_before_the_first_byte_eject_a_member_that_accepts_every_connect(
    tmp_path: Path,
) -> None:
    """With --workers 2, a member that accepts each connect and resets it at once is ejected after
    --eject-after such sessions, summed over the workers by the supervisor (counted at that server);
    then the healthy member serves every client. A member that resets every other session between
    sessions that get its bytes is not ejected; those sessions are paced one supervisor look (50 ms)
    apart, because a worker learns of a streak another worker's resets made only at its next look."""
    flags = ("--no-health-checks", "--eject-after", "3", "--eject-time", "30s")
    async with (
        serving(1, reset_at_once) as [bad],
        serving(1) as [good],
        supervised(tmp_path, [bad.address, good.address], *flags) as proxy,
    ):
        for i in range(60):  # a reset that beats a worker's connect is a connect failure instead, retried
            with contextlib.suppress(ConnectionResetError):
                await roundtrip(proxy.port, b"%d" % i)
            if proxy.count(" ejected for "):
                break
        await proxy.logged(" ejected for ")
        for i in range(5):  # past the supervisor's log line and its publication, which follows it
            assert await roundtrip(proxy.port, b"then %d" % i) == b"then %d" % i
        accepted = bad.accepted
        assert accepted >= 3
        for i in range(20):
            assert await roundtrip(proxy.port, b"after %d" % i) == b"after %d" % i
        assert bad.accepted == accepted, "a worker dialed the ejected member"
    ejected = [line for line in proxy.err_lines if " ejected for " in line]
    expected = f"member {bad.address} ejected for 30s after 3 failures in a row: "
    assert len(ejected) == 1 and expected in ejected[0] and "l4proxy.health:" in ejected[0], proxy.stderr
    why = ejected[0].split(expected)[1]  # the last failure's: a reset that beat the connect is one too
    assert why in ("reset before the first byte", "connect failed: reset"), proxy.stderr

    async with serving(1, resets_every_other()) as [flaky], supervised(tmp_path, [flaky.address], *flags) as proxy:
        echoed = 0
        for i in range(30):
            with contextlib.suppress(ConnectionResetError):
                answer = await roundtrip(proxy.port, b"%d" % i)
                assert answer in (b"", b"%d" % i)
                echoed += answer == b"%d" % i
            await asyncio.sleep(0.06)  # one supervisor look apart: the case, not a wait for a condition
        # a reset that beats the worker's connect is a connect failure, retried on the next turn, which
        # serves: every even turn is a client's echo
        assert flaky.accepted >= 30 and echoed == flaky.accepted // 2
    assert not [line for line in proxy.err_lines if " ejected for " in line], proxy.stderr


# --- pools that change: slots by key, a generation, workers that follow -----------------------------


def keyed(table: SharedTable) -> dict[str, int]:
    return table.slots("default")


def test_publish_keeps_slots_by_key_and_bumps_the_generation() -> None:
    a, b, c = (Address("127.0.0.1", port) for port in (1, 2, 3))
    table = SharedTable(make_config([a, b]), 2)
    before, generation = keyed(table), table.generation
    assert before == {str(a): 0, str(b): 1} and generation % 2 == 0
    WorkerView(table, 1).publish(before[str(b)], 3)  # worker 1 has three sessions on b
    slots = table.publish("default", [b, c])
    assert table.generation == generation + 2
    assert slots[str(b)] == before[str(b)] and slots[str(c)] not in before.values()
    assert keyed(table) == slots  # a is retired: no longer live
    assert WorkerView(table, 0).active(slots[str(b)]) == 3  # counts are by key: b kept its slot and count
    seen, entries = table.snapshot()
    assert seen == table.generation
    assert [(e.key, e.address, e.slot) for e in entries["default"]] == [(str(b), b, 1), (str(c), c, slots[str(c)])]


def test_a_retired_slot_is_reused_only_once_no_worker_holds_it() -> None:
    a, b, c = (Address("127.0.0.1", port) for port in (1, 2, 3))
    table = SharedTable(make_config([a, b]), 2, capacity=2)
    view = WorkerView(table, 0)
    member = Balancer([a], HealthConfig(), view).members[0]
    member.slot = keyed(table)[str(a)]
    view.publish(member.slot, 1)  # worker 0 has a session on a
    table.publish("default", [b])
    gone = table.generation
    assert table.reclaim() == []  # no worker has seen the removal
    table.saw(0, gone)
    table.saw(1, gone)
    assert table.reclaim() == []  # worker 0's session is still open
    forwarder(table, 0)(member, Event.TRAFFIC_FAIL, "connect failed: refused")  # its dial failed...
    view.publish(member.slot, 0)  # ... and let go of the member
    with pytest.raises(ConfigError, match=r"^upstream: 1 new members, but 0 of the shared table's 2 slots"):
        table.publish("default", [b, c])
    assert table.generation == gone  # the refused publish changed nothing
    assert table.reclaim() == []  # idle once: one more look, in case a result is still on its way
    assert table.reclaim() == [member.slot]
    slots = table.publish("default", [b, c])
    assert slots[str(c)] == member.slot
    assert table.passive(member.slot) == (0, 0, "")  # c starts clean, not with a's failure
    assert table.up[member.slot] == 1


def test_a_member_name_too_long_for_the_table_is_refused() -> None:
    table = SharedTable(make_config([Address("127.0.0.1", 1)]), 1)
    longest = ".".join(["h" * 63] * 3 + ["h" * 61])  # 253 characters: the longest valid host name
    with pytest.raises(ConfigError, match="longer than the table's 1024 bytes"):
        table.publish("p" * 600, [Address(longest, 1)])  # a long pool name (a config file's) and host


async def test_a_worker_follows_the_supervisors_update(tmp_path: Path) -> None:
    """In one process: the supervisor's health thread changes the pool, the worker's Proxy (set up as
    after a fork) follows: the new member takes sessions, the removed one keeps its open session and
    gets no new one, and its slot is freed once the session ends."""
    async with serving(3) as [a, b, c]:
        config = make_config([a.address, b.address])
        supervisor = Supervisor(config, 1, AccessLog(None), lambda *_: 0)
        supervisor.health.start()
        try:
            assert await asyncio.to_thread(supervisor.health.ready.wait, 5)
            log = RecordingLog()
            proxy = Proxy(config, log, shared=WorkerShare(supervisor.table, 0))
            assert proxy.probers == []  # health is the supervisor's
            await proxy.start()
            try:
                await _follow(supervisor, proxy, log, c)
            finally:
                await proxy.drain()
        finally:
            supervisor.health.stopping.set()
            await asyncio.to_thread(supervisor.health.join, 5)


async def _follow(supervisor: Supervisor, proxy: Proxy, log: RecordingLog, new: Upstream) -> None:
    table, pool = supervisor.table, proxy.pools["default"]
    reader, writer, leaving = await open_session(proxy)
    old_slot = leaving.slot
    staying = next(m for m in pool.members if m is not leaving)
    added, removed = await asyncio.wrap_future(supervisor.health.update("default", [staying.address, new.address]))
    assert ([m.key for m in added], [m.key for m in removed]) == ([str(new.address)], [leaving.key])
    await eventually(lambda: [m.key for m in pool.members] == [staying.key, str(new.address)])
    assert table.header[1] == table.generation  # the worker says it has seen this generation
    assert pool.members[0] is staying and leaving.draining
    for i in range(4):
        assert await roundtrip(proxy.port(), b"new %d" % i) == b"new %d" % i
    assert {s.member.key for s in log.sessions} == {staying.key, str(new.address)}
    assert new.accepted == 2 and table.state[old_slot] == RETIRED
    writer.write(b" still")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b" still"
    writer.close()
    await eventually(lambda: table.state[old_slot] == FREE)  # the supervisor reclaimed it
    assert leaving.active == 0


def test_discovered_members_cross_the_table_with_their_name_and_weight_and_new_ones_start_down() -> None:
    table = SharedTable(make_config([Address("redis.svc", 1), Service("_r._tcp.svc")]), 1)
    assert table.capacity >= 2 * 256  # room for what the two names resolve to
    assert [e.address for e in table.snapshot()[1]["default"]] == [Address("redis.svc", 1)]  # not yet resolved
    moved = Resolved("10.0.0.2", 7001, name="r0.svc", weight=60)
    stays = Resolved("10.0.0.1", 1, name="redis.svc")
    slots = table.publish("default", [stays, moved], down={str(moved)})
    entries = table.snapshot()[1]["default"]
    assert [(e.key, e.address) for e in entries] == [(str(stays), stays), (str(moved), moved)]
    assert entries[1].address.weight == 60  # type: ignore[attr-defined]
    assert (table.up[slots[str(stays)]], table.up[slots[str(moved)]]) == (1, 0)


async def test_workers_follow_a_name_that_moves_and_get_the_new_address_only_once_probed(tmp_path: Path) -> None:
    """The supervisor's health thread resolves (here through dnsmasq), the worker follows the table: the
    new address is published DOWN, probed, then used; the session on the old address keeps flowing."""

    dns = Dnsmasq(tmp_path).start()
    try:
        dns.set_hosts({"redis.test": ["127.0.0.2"]})
        async with pair() as (_old, new):
            config = discovering([Address("redis.test", new.port)])
            supervisor = Supervisor(config, 1, AccessLog(None), lambda *_: 0)
            supervisor.health.make_resolver = lambda pool: Resolver(pool, dns.getaddrinfo)
            supervisor.health.start()
            try:
                assert await asyncio.to_thread(supervisor.health.ready.wait, 5)
                proxy = Proxy(config, RecordingLog(), shared=WorkerShare(supervisor.table, 0))
                await proxy.start()
                try:
                    pool = proxy.pools["default"]
                    await eventually(lambda: [m.key for m in pool.members] == [f"redis.test@127.0.0.2:{new.port}"])
                    reader, writer, first = await open_session(proxy)
                    dns.set_hosts({"redis.test": ["127.0.0.3"]})
                    await eventually(lambda: [m.key for m in pool.members] == [f"redis.test@127.0.0.3:{new.port}"])
                    for _ in range(3):
                        assert await roundtrip(proxy.port(), b"moved") == b"moved"
                    assert new.kinds[0] == "probe" and new.kinds.count("client") == 3
                    assert pool.no_upstream == 0 and first.draining
                    writer.write(b"still")
                    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
                    writer.close()
                finally:
                    await proxy.drain()
            finally:
                supervisor.health.stopping.set()
                await asyncio.to_thread(supervisor.health.join, 5)
    finally:
        dns.stop()


async def test_a_worker_follows_the_primary_routing_and_tells_no_primary_from_a_split_brain() -> None:
    """A primary pool across the table: the supervisor's ``restrict`` (its prober's decision) reaches a
    worker's balancer at its next look (``Follower.follow_roles``), and a worker's shortage reads the
    routing as published at that moment, so a client arriving just after a demotion waits (NO_PRIMARY)
    and one arriving in a split brain is refused (SPLIT_BRAIN), as in one process. A primary marked
    DOWN reads as no primary even before the prober reroutes."""
    members = [Address("127.0.0.1", 1), Address("127.0.0.1", 2)]
    config = make_config(members, health=HealthConfig(enabled=True, rise=1, fall=1, check="redis-primary"))
    table = SharedTable(config, 1)
    supervisor = _HealthPool(config.pools[0], table)
    worker = Pool(config.pools[0])
    worker.balancer.view = WorkerView(table, 0)
    follower = Follower(table, 0, [worker])
    follower.apply()
    a, b = supervisor.members
    wa, _wb = worker.members
    steps: list[tuple[tuple[Member, ...], bool, frozenset[Member], str]] = [
        ((), False, frozenset(), NO_PRIMARY),  # before the first probe passes
        ((a,), False, frozenset({wa}), ""),  # its one primary, the pick's
        ((), True, frozenset(), SPLIT_BRAIN),
    ]
    for allowed, split, followed, shortage in steps:
        supervisor.restrict(allowed, split)
        follower.follow_roles()
        assert (worker.balancer.allowed, worker.balancer.split) == (followed, split), allowed
        if followed:
            assert worker.balancer.pick() is wa
        else:
            assert worker.balancer.pick() is None and worker.balancer.shortage() == shortage, allowed
    supervisor.restrict(None)  # lifted (a reload to another check kind): every member again
    follower.follow_roles()
    assert worker.balancer.allowed is None and {worker.balancer.pick() for _ in range(2)} == set(worker.members)
    supervisor.restrict((a,))
    follower.follow_roles()
    supervisor.restrict(())  # demoted; the worker has not looked yet
    assert worker.balancer.allowed == {wa} and worker.balancer.pick() is None
    assert worker.balancer.shortage() == NO_PRIMARY
    supervisor.restrict((b,), True)  # a split brain resolved by prefer-newest: routed, not split
    follower.follow_roles()
    assert worker.balancer.allowed == {worker.members[1]} and not worker.balancer.split
    supervisor.report(b, Event.PROBE_FAIL, "refused")  # DOWN, before the prober reroutes
    assert table.role[b.slot] == LEFT_OUT and worker.balancer.shortage() == NO_PRIMARY
    supervisor.close()
    worker.close()


class TableAtEmit(logging.Handler):
    """Each log line of the pool with the table's ``up`` and ``role`` bytes of ``slot`` as it is written."""

    def __init__(self, table: SharedTable, slot: int) -> None:
        super().__init__(logging.INFO)
        self.table, self.slot = table, slot
        self.lines: list[tuple[str, int, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), self.table.up[self.slot], self.table.role[self.slot]))


async def test_the_supervisor_publishes_a_change_before_it_logs_it() -> None:
    """A worker never acts on an older state than the one logged: a client that connects on reading
    "is DOWN" (or "ejected") must find the member already out of the table, not in it for a moment more."""
    members = [Address("127.0.0.1", 1), Address("127.0.0.1", 2)]
    health = HealthConfig(enabled=True, rise=1, fall=1, check="redis-primary")
    config = make_config(members, health=health, eject_after=1, eject_time=60)
    table = SharedTable(config, 1)
    supervisor = _HealthPool(config.pools[0], table)
    a = supervisor.members[0]
    supervisor.restrict((a,))
    handler = TableAtEmit(table, a.slot)
    logger = logging.getLogger("l4proxy.health")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        supervisor.report(a, Event.PROBE_FAIL, "refused")
        supervisor.report(a, Event.PROBE_OK, "primary")
        supervisor.report(a, Event.TRAFFIC_FAIL, "connect failed: refused")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        supervisor.close()
    where = f"pool default member {members[0]}"
    assert handler.lines == [
        (f"{where} is DOWN: refused", 0, LEFT_OUT),
        (f"{where} is UP: primary", ELIGIBLE, CHOSEN),
        (f"{where} ejected for 60s after 1 failure in a row: connect failed: refused", EJECTED, CHOSEN),
    ]


async def test_a_worker_closes_its_sessions_on_a_member_the_supervisor_marks_down() -> None:
    """``--on-member-down close`` with workers: the supervisor decides DOWN (its ``up`` cell falls), each
    worker sees it within a poll and closes its own sessions on that member, and only those."""
    async with serving(2) as [a, b]:
        config = make_config([a.address, b.address], on_member_down="close")
        supervisor = Supervisor(config, 1, AccessLog(None), lambda *_: 0)
        log = RecordingLog()
        proxy = Proxy(config, log, shared=WorkerShare(supervisor.table, 0))
        await proxy.start()
        try:
            first = await open_session(proxy)
            second = await open_session_beside(proxy)
            down, other = first[2], second[2]
            assert down is not other
            supervisor.table.up[down.slot] = 0  # what the health thread writes when it marks it DOWN
            assert await asyncio.wait_for(first[0].read(), 5) == b""
            await log.wait_for(1)
            assert [s.end_cause for s in log.sessions] == ["member_down"]
            second[1].write(b"y")
            assert await asyncio.wait_for(second[0].readexactly(1), 5) == b"y"
            second[1].close()
            first[1].close()
        finally:
            await proxy.drain()


async def open_session_beside(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
    """A second client of an echo member, with its session established; returns its member."""
    before = set(proxy.sessions)
    reader, writer = await connect(proxy.port())
    writer.write(b"open")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"open"
    [session] = set(proxy.sessions) - before
    return reader, writer, session.member


def test_a_killed_workers_queued_clients_are_reset_unless_the_kernel_migrates_them() -> None:
    """A worker stopped (SIGSTOP) while clients connect keeps the ones the kernel gives it in its
    SO_REUSEPORT queue; SIGKILLed, it takes the queue with it: every one of those clients is reset and
    none is ever seen by the proxy (the soak counts such failures as the kill's when they started before
    the worker was gone). With ``net.ipv4.tcp_migrate_req=1`` (in a network namespace of the test's
    own) the same clients move to the other worker and are served, and none is reset. Also measured:
    how long a killed worker takes to be gone and the supervisor to log it. docs/reliability.md case 41."""
    without, with_migration = in_netns("worker", 0), in_netns("worker", 1)
    if without is None or with_migration is None:
        pytest.skip("no network namespace of our own here (unshare is not permitted)")
    for result in (without, with_migration):
        assert result["queued"] > 0 and result["before"] + result["queued"] == 40, result
        assert result["unanswered"] == 0 and result["exit"] == 0, result
        assert result["gone_ms"] <= result["noticed_ms"] < 5000, result
    assert without["reset"] == without["queued"] and without["after"] == 0, without
    assert with_migration["reset"] == 0 and with_migration["after"] == with_migration["queued"], with_migration
