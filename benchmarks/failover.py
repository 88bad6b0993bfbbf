"""Failover: how long clients of a ``*-primary`` pool are refused or delayed while the primary moves.

    .venv/bin/python benchmarks/failover.py --out benchmarks/results/failover-2026-12-02.md

Each scenario starts real servers and the real ``l4proxy`` command on 127.0.0.1, then a client that
every 10 ms opens a new connection through the proxy and sends one write (Redis ``INCR``, PostgreSQL
``SELECT txid_current()``, which a replica or a standby refuses), each attempt on its own, so attempts
overlap while one waits. Mid-run the primary moves:

* Redis, demote first: ``REPLICAOF`` on the primary (now no member claims the role), 1 s later
  ``REPLICAOF NO ONE`` on its replica.
* Redis, promote first (Sentinel's order): ``REPLICAOF NO ONE`` on the replica (two masters: a split
  brain, refused at once by design), 0.5 s later ``REPLICAOF`` on the old primary.
* PostgreSQL: the primary stopped (``pg_ctl stop -m fast``), then the standby (made with
  ``pg_basebackup -R``) promoted with ``pg_ctl promote -w``.

Each runs with the queue off (``--max-queue 0``: refused at once, the behaviour before) and on
(``--queue-timeout 10s``). An attempt fails when the connection is closed or reset without a reply,
the reply is an error (READONLY, a standby's refusal), or no reply came within 15 s. The report gives,
per run: attempts, failed attempts, the refusal window (the first failure to the first success
started after it), the longest time a successful attempt took (connect to reply) and the median.
Bounded: each run lasts 4 s of traffic plus the failover's own steps, at most 2000 attempts.
``--workers N`` runs the proxy with ``--workers N`` (the supervisor probes, the workers follow the
primary through shared memory); its rows name it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sysinfo import machine  # noqa: E402
from tests.servers import Command, PostgresCluster, RedisServer, postgres_root  # noqa: E402

PERIOD = 0.010  # seconds between attempts
BEFORE, AFTER = 1.5, 2.5  # seconds of traffic before the failover starts and after it is done
ATTEMPT_TIMEOUT = 15.0
MAX_ATTEMPTS = 2000
SLOW = 0.1  # a successful attempt that took longer was delayed
CHECKS = ["--health-interval", "250ms", "--health-timeout", "200ms", "--rise", "1", "--fall", "1"]
QUEUE = {"off": ["--max-queue", "0"], "on": ["--queue-timeout", "10s"]}
PG_HBA = "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost replication postgres 127.0.0.1/32 trust\n"


@dataclass
class Attempt:
    started: float
    took: float = 0.0
    ok: bool = False
    error: str = ""


@dataclass
class Run:
    scenario: str
    queue: str
    attempts: list[Attempt] = field(default_factory=list)
    failover: tuple[float, float] = (0.0, 0.0)  # its first and last step, on the attempts' clock

    def row(self) -> str:
        failed = [a for a in self.attempts if not a.ok]
        done = [a.took for a in self.attempts if a.ok]
        window = "none"
        if failed:
            first = failed[0].started
            after = [a.started for a in self.attempts if a.ok and a.started > first]
            window = f"{(after[0] - first) * 1000:.0f} ms" if after else "no success after"
        kinds = sorted({a.error for a in failed})
        delayed = sum(1 for took in done if took > SLOW)
        return (
            f"| {self.scenario} | {self.queue} | {len(self.attempts)} | {len(failed)} | {window} | "
            f"{delayed} | {max(done) * 1000:.0f} ms | "
            f"{statistics.median(done) * 1000:.1f} ms | "
            f"{(self.failover[1] - self.failover[0]) * 1000:.0f} ms | {', '.join(kinds) or '-'} |"
        )


# --- one attempt per protocol -----------------------------------------------------------------------


async def redis_write(port: int) -> str:
    """One INCR on a new connection: '' when it succeeded, else why not."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n")
        reply = await reader.readline()
        if not reply:
            return "closed"
        return "" if reply.startswith(b":") else reply.decode().split()[0].lstrip("-")
    finally:
        writer.close()


def _pg_message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


async def _pg_read(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readexactly(5)
    return head[:1], await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)


async def pg_write(port: int) -> str:
    """A trust login and ``SELECT txid_current()`` on a new connection: '' when it succeeded."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        params = b"user\0postgres\0database\0postgres\0\0"
        writer.write(struct.pack("!II", len(params) + 8, 196608) + params)
        query_sent = False
        while True:
            try:
                kind, body = await _pg_read(reader)
            except asyncio.IncompleteReadError:
                return "closed"
            if kind == b"E":
                fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
                return f"SQLSTATE {fields.get(b'C', b'?').decode()}"
            if kind == b"Z" and not query_sent:
                writer.write(_pg_message(b"Q", b"SELECT txid_current()\0"))
                query_sent = True
            elif kind == b"C":
                return ""
    finally:
        writer.close()


async def attempt(write: Callable[[int], Awaitable[str]], port: int, origin: float) -> Attempt:
    record = Attempt(time.monotonic() - origin)
    try:
        record.error = await asyncio.wait_for(write(port), ATTEMPT_TIMEOUT)
    except TimeoutError:
        record.error = "timeout"
    except (ConnectionError, OSError) as exc:
        record.error = type(exc).__name__
    record.ok = not record.error
    record.took = time.monotonic() - origin - record.started
    return record


async def drive(write: Callable[[int], Awaitable[str]], port: int, failover: Callable[[], None], run: Run) -> None:
    """Attempts every PERIOD from BEFORE seconds before the failover to AFTER seconds after it."""
    origin = time.monotonic()
    tasks: list[asyncio.Task[Attempt]] = []
    loop = asyncio.get_running_loop()
    stop_at: float | None = None
    started = 0.0
    step: asyncio.Future[None] | None = None
    while len(tasks) < MAX_ATTEMPTS:
        now = time.monotonic() - origin
        if step is None and now >= BEFORE:
            started = now
            step = loop.run_in_executor(None, failover)
        if step is not None and step.done() and stop_at is None:
            step.result()
            run.failover = (started, time.monotonic() - origin)
            stop_at = now + AFTER
        if stop_at is not None and now >= stop_at:
            break
        tasks.append(asyncio.create_task(attempt(write, port, origin)))
        await asyncio.sleep(PERIOD)
    run.attempts = sorted(await asyncio.gather(*tasks), key=lambda a: a.started)


# --- scenarios --------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_pair(tmp: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    servers = []
    try:
        for name in ("a", "b"):
            (tmp / name).mkdir(parents=True)
            servers.append(RedisServer(tmp / name).start())
        a, b = servers
        b.cli("REPLICAOF", "127.0.0.1", str(a.port))
        yield a, b
    finally:
        for server in servers:
            server.stop()


WORKERS = 1  # --workers of the proxy (main sets it)


def proxy(members: str, check: list[str], queue: str) -> Command:
    workers = ["--workers", str(WORKERS)] if WORKERS > 1 else []
    return Command("--upstream", members, *check, *CHECKS, *QUEUE[queue], *workers, "--access-log", "off",
                   listeners=WORKERS)


def wait_served(write: Callable[[int], Awaitable[str]], port: int) -> None:
    deadline = time.monotonic() + 20
    while asyncio.run(attempt(write, port, time.monotonic())).error:
        if time.monotonic() > deadline:
            raise RuntimeError("the proxy never served a first write")
        time.sleep(0.1)


def redis_run(tmp: Path, order: str, queue: str) -> Run:
    run = Run(f"Redis, {order} first{_workers()}", queue)
    with redis_pair(tmp) as (a, b):

        def failover() -> None:
            if order == "demote":
                a.cli("REPLICAOF", "127.0.0.1", str(b.port))
                time.sleep(1.0)
                b.cli("REPLICAOF", "NO", "ONE")
            else:
                b.cli("REPLICAOF", "NO", "ONE")
                time.sleep(0.5)
                a.cli("REPLICAOF", "127.0.0.1", str(b.port))

        with proxy(f"127.0.0.1:{a.port},127.0.0.1:{b.port}", ["--health-check", "redis-primary"], queue) as cmd:
            wait_served(redis_write, cmd.port)
            asyncio.run(drive(redis_write, cmd.port, failover, run))
    return run


def pg_run(queue: str) -> Run:
    run = Run(f"PostgreSQL, stop + promote{_workers()}", queue)
    with postgres_root() as root:
        primary = PostgresCluster(root, "primary").init(PG_HBA)
        with open(primary.data / "postgresql.conf", "a") as conf:
            conf.write("wal_level = replica\nmax_wal_senders = 4\n")
        primary.start()
        standby = None
        try:
            standby = PostgresCluster(root, "standby").backup_of(primary, standby=True).start()
            auth = root / "probe.auth"
            auth.write_text("postgres postgres\n")

            def failover() -> None:
                primary.run(primary.bin("pg_ctl"), "-D", str(primary.data), "-m", "fast", "-w", "stop")
                assert standby is not None
                standby.promote()

            members = f"127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
            check = ["--health-check", "postgres-primary", "--health-auth", str(auth)]
            with proxy(members, check, queue) as cmd:
                wait_served(pg_write, cmd.port)
                asyncio.run(drive(pg_write, cmd.port, failover, run))
        finally:
            for cluster in (standby, primary):
                if cluster is not None:
                    cluster.stop()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the Markdown report here as well")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-redis", action="store_true")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each scenario (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="the proxy's --workers (default 1)")
    args = parser.parse_args()
    global WORKERS
    WORKERS = args.workers
    info = machine()
    runs: list[Run] = []
    with postgres_root() as tmp:
        for order in () if args.skip_redis else ("demote", "promote"):
            for repeat in range(args.repeat):
                for queue in QUEUE:
                    runs.append(redis_run(tmp / f"{order}-{queue}-{repeat}", order, queue))
                    print(runs[-1].row(), flush=True)
    if not args.skip_postgres:
        for _ in range(args.repeat):
            for queue in QUEUE:
                runs.append(pg_run(queue))
                print(runs[-1].row(), flush=True)
    lines = [
        "# Failover: clients refused or delayed while the primary moves",
        "",
        f"`benchmarks/failover.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit "
        f"{info['git']['commit'][:12]}{' (dirty tree)' if info['git']['dirty'] else ''}; {info['cpu_model']}, "
        f"{info['nproc']} CPUs, load {info['loadavg_at_start']} at start; Python {info['python']}; "
        f"{info['redis']}; PostgreSQL {_pg_version()}.",
        "",
        f"One new connection and one write every {PERIOD * 1000:.0f} ms through the real `l4proxy` command;"
        f" probes `{' '.join(CHECKS)}`; queue off = `--max-queue 0` (as before), on = `--queue-timeout 10s`."
        " Refusal window: first failed attempt to the first successful attempt started after it."
        " Max / median time: of the successful attempts, connect to reply. Failover: the time its own"
        " steps took (the script's, not the proxy's).",
        "",
        "| scenario | queue | attempts | failed | refusal window | delayed > 100 ms | max time | median time"
        " | failover steps | failures |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(run.row() for run in runs),
        "",
        "Failure kinds: `closed`/`ConnectionResetError` with the queue off are clients closed at once while no"
        " member claimed the role. `READONLY` (Redis) and `SQLSTATE 57P03` (PostgreSQL: shutting down) reach"
        " the old primary after its demotion or shutdown began and before its next probe saw it, so the"
        " probe interval bounds them and the queue cannot help; `SQLSTATE 57P01` is a session the old"
        " primary's shutdown terminated. With Redis promote-first, both members are masters for a while:"
        " a split brain, refused at once by design with the queue on too, until the old primary's probe"
        " sees it demoted.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return 0


def _workers() -> str:
    return f", --workers {WORKERS}" if WORKERS > 1 else ""


def _pg_version() -> str:
    out = subprocess.run([PostgresCluster.bin("postgres"), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.split()[2] if out.returncode == 0 else "?"


if __name__ == "__main__":
    sys.exit(main())
