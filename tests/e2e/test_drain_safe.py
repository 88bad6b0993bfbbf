"""``--drain-at safe`` against real servers: a drained session is closed at a moment its client loses
nothing (Redis: every command answered, no MULTI open; PostgreSQL: after ReadyForQuery idle), and with
``now`` the same drain cuts it (the tests can fail). pgbench keeps running across the drain of its member.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy import Address, Config
from l4proxy.counters import DRAIN, READY
from l4proxy.proxy import Proxy
from l4proxy.safeclose import DRAINED
from l4proxy.splice import AVAILABLE

from ..kit import eventually, make_config, running, with_members
from ..servers import PostgresCluster, RedisServer, postgres_root, redis_servers

PG_HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host replication postgres 127.0.0.1/32 trust
"""


def drained_config(members: list[Address], drain_at: str, protocol: str, timeout: float) -> Config:
    config = make_config(members, drain_at=drain_at, drain_timeout=timeout)
    pool = dataclasses.replace(config.pools[0], drain_protocol=protocol)
    return dataclasses.replace(config, pools=(pool,))


@pytest.fixture
def two_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    with redis_servers(tmp_path, 2) as (a, b):
        yield a, b


async def redis_client(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
    writer.write(b"PING\r\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"+PONG\r\n"
    return reader, writer


async def remove_first_member(proxy: Proxy) -> None:
    """Reload without the session's member (the first), so its sessions drain."""
    [session] = proxy.sessions
    first, second = proxy.pools["default"].members
    assert session.member is first
    await proxy.reconfigure(with_members(proxy.config, [second.address]))


async def test_redis_multi_in_flight_is_not_cut_and_the_session_closes_after_exec(
    two_redis: tuple[RedisServer, RedisServer],
) -> None:
    a, b = two_redis
    members = [Address("127.0.0.1", a.port), Address("127.0.0.1", b.port)]
    async with running(drained_config(members, "safe", "redis", timeout=10)) as (proxy, access):
        reader, writer = await redis_client(proxy)
        writer.write(b"MULTI\r\nINCR x\r\n")
        assert await asyncio.wait_for(reader.readexactly(14), 5) == b"+OK\r\n+QUEUED\r\n"
        await remove_first_member(proxy)
        writer.write(b"INCR x\r\n")  # more of the transaction, at the client's turn: the watch starts here
        assert await asyncio.wait_for(reader.readline(), 5) == b"+QUEUED\r\n"
        assert proxy.sessions, "closed inside MULTI"
        writer.write(b"EXEC\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b"*2\r\n:1\r\n:2\r\n"  # the reply, then EOF
        await access.wait_for(1)
        writer.close()
    assert access.sessions[0].end_cause == DRAINED
    assert a.cli("GET", "x") == "2"


async def test_redis_now_cuts_the_same_multi_at_the_drain_timeout(two_redis: tuple[RedisServer, RedisServer]) -> None:
    a, b = two_redis
    members = [Address("127.0.0.1", a.port), Address("127.0.0.1", b.port)]
    async with running(drained_config(members, "now", "redis", timeout=0.3)) as (proxy, access):
        reader, writer = await redis_client(proxy)
        writer.write(b"MULTI\r\nINCR x\r\n")
        assert await asyncio.wait_for(reader.readexactly(14), 5) == b"+OK\r\n+QUEUED\r\n"
        await remove_first_member(proxy)
        await access.wait_for(1)  # cut at the drain timeout
        with contextlib.suppress(ConnectionError):
            writer.write(b"EXEC\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert access.sessions[0].end_cause == "shutdown"
    assert a.cli("GET", "x") == ""  # the transaction was lost


async def test_redis_pipelined_batch_in_flight_gets_every_reply(two_redis: tuple[RedisServer, RedisServer]) -> None:
    """The batch's full reads make it bulky: under load (some orders of the suite) it used to move to the
    splice engine, where no watch can see it, and close only at the drain timeout, after the client's
    5 s wait for its FIN. With ``--drain-at safe`` it stays on the pumps. The drain starts once the proxy
    has read the whole batch: a watch started while commands still arrive may take the middle of one for
    a command's start (an inline command is a line), count one command too many and never see a safe
    moment."""
    a, b = two_redis
    members = [Address("127.0.0.1", a.port), Address("127.0.0.1", b.port)]
    count = 20000
    async with running(drained_config(members, "safe", "redis", timeout=10)) as (proxy, access):
        reader, writer = await redis_client(proxy)
        try:
            batch = b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n" * count
            writer.write(batch)
            first = await asyncio.wait_for(reader.readline(), 5)  # replies are flowing
            [session] = proxy.sessions
            # Every command read, so none is in flight across the drain's start (which the watch cannot
            # follow: README); most replies are, as the client reads them only after it.
            await eventually(lambda: session.client.nbytes == len(b"PING\r\n") + len(batch))
            await remove_first_member(proxy)
            replies = [first] + [await asyncio.wait_for(reader.readline(), 5) for _ in range(count - 1)]
            assert replies == [b":%d\r\n" % n for n in range(1, count + 1)]  # every reply, whatever happens next
            assert proxy.sessions, "closed with no command of its turn answered yet"
            writer.write(b"*1\r\n$4\r\nPING\r\n")  # the client's turn: the watch starts, the answer ends it
            assert await asyncio.wait_for(reader.read(), 5) == b"+PONG\r\n"
            await access.wait_for(1)
        finally:
            writer.close()
    assert access.sessions[0].end_cause == DRAINED


@pytest.mark.parametrize(("drain_at", "relay", "spliced"), [("safe", "auto", False), ("now", "auto", True),
                                                          ("safe", "splice", True)])
def test_with_drain_at_safe_a_read_pools_sessions_never_move_to_splice_by_themselves(
    drain_at: str, relay: str, spliced: bool
) -> None:
    """A session on the splice engine could not be closed at a safe moment; ``--relay splice`` is obeyed."""
    config = drained_config([Address("127.0.0.1", 1)], drain_at, "redis", timeout=1)
    config = dataclasses.replace(config, listeners=(dataclasses.replace(config.listeners[0], relay=relay),))
    [frontend] = Proxy(config).frontends
    assert frontend.spliced is (spliced and AVAILABLE)


async def test_an_operator_drain_closes_at_the_next_safe_moment(two_redis: tuple[RedisServer, RedisServer]) -> None:
    a, _ = two_redis
    async with running(drained_config([Address("127.0.0.1", a.port)], "safe", "redis", timeout=10)) as (proxy, access):
        reader, writer = await redis_client(proxy)
        pool = proxy.pools["default"]
        pool.set_admin(pool.members[0], DRAIN)
        writer.write(b"SET k v\r\n")  # idle at the drain's start: its first answer is where the watch starts
        assert await asyncio.wait_for(reader.readline(), 5) == b"+OK\r\n"
        writer.write(b"GET k\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b"$1\r\nv\r\n"
        await access.wait_for(1)
        writer.close()
    assert access.sessions[0].end_cause == DRAINED


async def test_a_member_enabled_again_keeps_its_sessions(two_redis: tuple[RedisServer, RedisServer]) -> None:
    a, _ = two_redis
    async with running(drained_config([Address("127.0.0.1", a.port)], "safe", "redis", timeout=10)) as (proxy, access):
        reader, writer = await redis_client(proxy)
        pool = proxy.pools["default"]
        pool.set_admin(pool.members[0], DRAIN)
        pool.set_admin(pool.members[0], READY)
        for _ in range(3):  # safe moments, but the session is no longer to end
            writer.write(b"PING\r\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"+PONG\r\n"
        assert proxy.sessions and not access.sessions
        writer.close()


async def test_the_shutdown_drain_waits_for_exec_then_ends_at_once(two_redis: tuple[RedisServer, RedisServer]) -> None:
    a, _ = two_redis
    proxy = Proxy(drained_config([Address("127.0.0.1", a.port)], "safe", "redis", timeout=30))
    await proxy.start()
    reader, writer = await redis_client(proxy)
    writer.write(b"MULTI\r\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"+OK\r\n"
    drain = asyncio.create_task(proxy.drain())
    await eventually(lambda: proxy.draining)
    writer.write(b"INCR x\r\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"+QUEUED\r\n"
    writer.write(b"EXEC\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b"*1\r\n:1\r\n"
    await asyncio.wait_for(drain, 5)  # well before the 30 s drain timeout
    writer.close()
    assert a.cli("GET", "x") == "1"


# --- PostgreSQL: pgbench ---------------------------------------------------------------------------

PGBENCH_SCRIPT = """\
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1 + :client_id;
SELECT pg_sleep(0.03);
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1 + :client_id, 1, CURRENT_TIMESTAMP);
END;
"""


@pytest.fixture(scope="module")
def pg_pair() -> Iterator[tuple[PostgresCluster, PostgresCluster]]:
    """Two independent primaries with pgbench's tables: the members of one pool."""
    with postgres_root() as root:
        first = PostgresCluster(root, "bench-a").init(PG_HBA)
        second = PostgresCluster(root, "bench-b")
        try:
            first.start()
            first.run(first.bin("pgbench"), "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(first.port),
                      "-U", "postgres", "postgres")  # fmt: skip
            first.sql("CHECKPOINT")  # else pg_basebackup's spread checkpoint takes minutes over these pages
            second.backup_of(first, standby=False).start()
            yield first, second
        finally:
            second.stop()
            first.stop()


async def pgbench_across_a_drain(pg_pair: tuple[PostgresCluster, PostgresCluster], tmp_path: Path, drain_at: str,
                                 timeout: float) -> tuple[int, str, list[object]]:  # fmt: skip
    """pgbench (a connection per transaction, -C) through the proxy for 3 s; at 1 s the first member
    is removed. Its exit status, its output, and the end causes of the drained sessions."""
    script = tmp_path / "tx.sql"
    script.write_text(PGBENCH_SCRIPT)
    script.chmod(0o644)
    tmp_path.chmod(0o755)
    members = [Address("127.0.0.1", pg.port) for pg in pg_pair]
    async with running(drained_config(members, drain_at, "postgres", timeout)) as (proxy, access):
        bench = await asyncio.create_subprocess_exec(
            PostgresCluster.bin("pgbench"), "-n", "-C", "-c", "4", "-T", "3", "-f", str(script),
            "-h", "127.0.0.1", "-p", str(proxy.port()), "-U", "postgres", "postgres",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        pool = proxy.pools["default"]
        first = pool.members[0]
        on_first = lambda: [s for s in proxy.sessions if s.member is first]  # noqa: E731  # connected to it
        await eventually(lambda: first.total >= 12 and bool(on_first()), timeout=10)
        await proxy.reconfigure(with_members(proxy.config, [pool.members[1].address]))
        output, _ = await asyncio.wait_for(bench.communicate(), 30)
        await eventually(lambda: first.active == 0)  # every session on it recorded
        causes = [s.end_cause for s in access.sessions if s.member is first and s.ended]
    assert bench.returncode is not None
    return bench.returncode, output.decode(), causes


def aborted(output: str) -> list[str]:
    return re.findall(r"client \d+ aborted in command \d+.*", output)


async def test_pgbench_keeps_running_across_a_safe_drain_of_its_member(
    pg_pair: tuple[PostgresCluster, PostgresCluster], tmp_path: Path
) -> None:
    status, output, causes = await pgbench_across_a_drain(pg_pair, tmp_path, "safe", timeout=5)
    assert status == 0 and not aborted(output), output
    processed = int(re.search(r"number of transactions actually processed: (\d+)", output)[1])  # type: ignore[index]
    assert processed > 20, output
    assert DRAINED in causes and "shutdown" not in causes, causes


async def test_pgbench_aborts_when_the_drain_cuts_sessions_now(
    pg_pair: tuple[PostgresCluster, PostgresCluster], tmp_path: Path
) -> None:
    """The same run with ``now`` and a drain timeout shorter than a transaction: clients abort."""
    status, output, causes = await pgbench_across_a_drain(pg_pair, tmp_path, "now", timeout=0.01)
    assert status != 0 and aborted(output), output
    assert "shutdown" in causes
