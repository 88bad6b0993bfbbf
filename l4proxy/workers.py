"""``--workers N``: N processes, each a full ``Proxy`` on its own uvloop and its own SO_REUSEPORT
listening socket (the kernel spreads clients among them), under a supervisor that starts them,
restarts those that die, forwards signals and runs the health checks once for all of them.

**Shared memory.** One ``table.SharedTable``, created before the first fork: each worker's sessions
per member (a worker's pick sums every worker's count, so least-connections is global), each member's
status and slow-start share (written by the supervisor only) and each worker's passive results, in
slots allocated by member key; a capped member's sessions are reserved under the table's lock, so
``max_conns`` holds across workers. The supervisor zeroes a dead worker's counts before it starts the replacement.

**Pools that change.** ``HealthThread.update`` changes a pool in the supervisor: its ``Pool.update``
(probes start and stop, health state stays for members that stay) and the table's ``publish`` (new
generation). Each worker looks at the generation every 50 ms (``Follower``) and, when it moved, updates
its own pools from the table's entries: removed members get no new sessions from it and keep the ones
they have; the supervisor reuses their slots only once every worker has let go of them.

**Discovery, once.** The health thread also runs the resolvers of pools with DNS-named members
(``resolver.py``); their answers change its pools like ``update`` does, and the workers follow.
New addresses that wait for a probe are published DOWN, so no worker picks them first.

**Health, once.** Workers run no probers and decide nothing: ``Pool.forward`` sends their passive
results to the table. The supervisor runs every pool's probers in one thread with its own event loop,
and every 50 ms feeds the passive results that arrived since the last look into its own ``Pool``s: the
failures, then one success if there was any (order within 50 ms is not kept; a success clears the
streak, so a member that fails every connect goes DOWN after ``fall`` of them, as in one process, while
one that fails only some is not taken DOWN by a mixed interval). Its ``Pool.report`` is the only place
that logs a change, so each change is logged once, by the supervisor. With ``--no-health-checks`` its
ejection timers bring members back, as in one process.

**Signals.** The supervisor blocks SIGTERM, SIGINT, SIGHUP and SIGCHLD and takes them with
``sigtimedwait`` in its main thread (the health thread never sees them). SIGTERM/SIGINT is forwarded as
SIGTERM to every worker, which drains; a second one is forwarded again and makes the workers close
their sessions at once; the supervisor exits 0 once every worker has exited. SIGHUP is forwarded (each
worker reloads its TLS files) and the supervisor reloads its probes' client contexts. A child starts
with those signals at their defaults (SIGHUP ignored until its loop handles it) and unblocked, in its
own process group, so a terminal's Ctrl-C reaches it once, through the supervisor; it gets SIGTERM if
the supervisor itself dies.

**Forks** happen in the supervisor's main thread, which never runs an event loop. The first workers are
forked before the health thread starts; a replacement is forked while it runs, and only builds fresh
objects and leaves with ``os._exit``, never touching the health thread's loop.

**Access log.** Each worker buffers its lines and writes them with one ``os.write`` per batch of whole
lines of at most PIPE_BUF bytes, to the file (opened for appending, O_APPEND) or to stdout, so lines of
different workers never mix on a file or a pipe. Each line ends with ``worker=K``, the worker's slot
(0..N-1, kept by its replacement). Diagnostics of a worker name it too: ``l4proxy[w1]: ...``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from .accesslog import AccessLog, Finished
from .balancer import Member
from .config import Address, Config, MemberConfig, PoolConfig
from .errors import ConfigError
from .health import Event
from .listener import bind_sockets
from .pool import Pool
from .prober import Prober
from .resolver import Resolver
from .table import SharedTable, WorkerView, forwarder
from .tls import client_context

if TYPE_CHECKING:
    from .proxy import Shared

log = logging.getLogger("l4proxy.workers")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
MAX_WORKERS = 256
_POLL = 0.05  # how often the supervisor looks at passive results, and a worker at the generation
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0
_STABLE = 10.0  # a worker that lived this long is replaced after the shortest back-off
_PIPE_BUF = 4096

Changes = tuple[list[Member], list[Member]]  # Pool.update's (added, removed)
RunWorker = Callable[[Config, AccessLog, "Shared"], int]  # runs a Proxy(config, log, shared=...) to the end


def parse_workers(text: str, field_name: str = "--workers") -> int:
    """A number of worker processes: ``1``..``256`` or ``auto`` (the CPUs this process may use)."""
    value = text.strip().lower()
    if value == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    if not (value.isascii() and value.isdigit() and len(value) <= 3) or not 1 <= int(value) <= MAX_WORKERS:
        raise ConfigError(field_name, text, f"expected a number of processes from 1 to {MAX_WORKERS}, or 'auto'")
    return int(value)


class WorkerAccessLog(AccessLog):
    """Access-log lines of one worker, written in whole-line batches of at most PIPE_BUF bytes."""

    def __init__(self, fd: int | None, worker: int) -> None:
        super().__init__(None)
        self.fd = fd
        self.tail = f" worker={worker}\n"
        self.pending: list[str] = []

    def record(self, session: Finished) -> None:
        self.records += 1
        if self.fd is not None:
            self.pending.append(self.format(session, time.time()) + self.tail)
            if len(self.pending) >= 256:
                self.flush()

    def flush(self) -> None:
        if not self.pending or self.fd is None:
            return
        lines, self.pending = self.pending, []
        batch: list[bytes] = []
        size = 0
        for line in lines:
            data = line.encode("utf-8", "replace")
            if batch and size + len(data) > _PIPE_BUF:
                self._write(b"".join(batch))
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        self._write(b"".join(batch))

    def _write(self, data: bytes) -> None:
        assert self.fd is not None
        while data:
            try:
                data = data[os.write(self.fd, data) :]
            except InterruptedError:
                continue
            except OSError as exc:  # a closed stdout or a full disk: drop this batch, say so once per batch
                log.error("access log write failed: %s", exc.strerror or exc)
                return

    def close(self) -> None:
        self.flush()
        self.fd = None


class _HealthPool(Pool):
    """The supervisor's pool: decides and logs status, publishes it and its members to the workers."""

    def __init__(self, config: PoolConfig, table: SharedTable) -> None:
        super().__init__(config, None if config.tls is None else client_context(config.tls))
        self._table = table
        self._up = table.up
        slots = table.slots(config.name)
        for member in self.members:
            member.slot = slots[member.key]

    def set_members(self, members: Sequence[MemberConfig | Address], check_first: Collection[str] = ()) -> Changes:
        # members waiting for a probe are published DOWN, so no worker picks them in between
        slots = self._table.publish(self.name, members, down=check_first if self.config.health.enabled else ())
        added, removed = super().set_members(members, check_first)
        for member in added:
            member.slot = slots[member.key]
            self._up[member.slot] = 1 if member.health.up else 0
            self.scaled(member)
        return added, removed

    def scaled(self, member: Member) -> None:
        if not member.draining:
            self._table.share[member.slot] = member.share

    def report(self, member: Member, event: Event, reason: str = "") -> None:
        super().report(member, event, reason)
        if not member.draining:  # its slot may belong to another member soon
            self._up[member.slot] = 1 if member.health.up else 0


class HealthThread(threading.Thread):
    """Probes every member once for all workers, turns the workers' passive results into status, and
    changes pools on request (``update``)."""

    def __init__(self, config: Config, table: SharedTable) -> None:
        super().__init__(name="l4proxy health", daemon=True)
        self.config = config
        self.table = table
        self.stopping = threading.Event()
        self.reload = threading.Event()
        self.pools: dict[str, _HealthPool] = {}
        self.ready = threading.Event()  # set once the pools exist and probes run
        self.make_resolver: Callable[[Pool], Resolver] = Resolver  # tests point it at a DNS server of theirs
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        import uvloop

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._main())
        except Exception:
            log.exception("health checks stopped")

    def update(self, pool: str, members: Sequence[Address]) -> concurrent.futures.Future[Changes]:
        """Change the members of ``pool`` from another thread; the future has ``Pool.update``'s result
        or its ConfigError. Workers follow within 50 ms."""
        assert self._loop is not None, "the health thread is not running"

        async def apply() -> Changes:
            return self.pools[pool].update(members)

        return asyncio.run_coroutine_threadsafe(apply(), self._loop)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.pools = {pool.name: _HealthPool(pool, self.table) for pool in self.config.pools}
        resolvers = [self.make_resolver(pool) for pool in self.pools.values() if Resolver.wanted(pool.config)]
        await asyncio.gather(*(resolver.resolve() for resolver in resolvers))
        probers = [Prober(pool) for pool in self.pools.values()]
        for prober in probers:
            prober.start()
        for resolver in resolvers:
            resolver.start()
        self.ready.set()
        try:
            while not self.stopping.is_set():
                await asyncio.sleep(_POLL)
                for pool in self.pools.values():
                    self._passive(pool)
                self.table.reclaim()
                if self.reload.is_set():
                    self.reload.clear()
                    _reload_probe_tls(list(self.pools.values()))
        finally:
            for resolver in resolvers:
                await resolver.stop()
            for prober in probers:
                await prober.stop()
            for pool in self.pools.values():
                pool.close()

    def _passive(self, pool: Pool) -> None:
        """Feed the passive results the workers recorded since the last look into ``pool``."""
        for member in pool.members:
            failed, succeeded, reason = self.table.passive(member.slot)
            for _ in range(min(failed, pool.config.health.fall)):
                pool.report(member, Event.TRAFFIC_FAIL, reason)
            if succeeded:
                pool.report(member, Event.TRAFFIC_OK)


class Follower:
    """A worker's pools kept in step with the table: on a new generation, each pool takes the members
    the supervisor published (by key, so members that stay keep their counts and sessions)."""

    def __init__(self, table: SharedTable, worker: int, pools: Sequence[Pool]) -> None:
        self.table = table
        self.worker = worker
        self.pools = pools
        self.seen = -1
        self.was_up: dict[tuple[str, str], bool] = {}  # (pool, member key): UP at the last look

    def apply(self) -> None:
        generation, entries = self.table.snapshot()
        for pool in self.pools:
            found = entries.get(pool.name, [])  # none: discovery found no address
            pool.set_members([entry.member for entry in found])
            slots = {entry.key: entry.slot for entry in found}
            for member in pool.members:
                member.slot = slots[member.key]
        self.seen = generation
        self.table.saw(self.worker, generation)

    def poll(self, loop: asyncio.AbstractEventLoop) -> None:
        """Look at the generation now and every ``_POLL`` seconds after, on ``loop``."""
        if self.table.generation != self.seen:
            self.apply()
        self.follow_ramps()
        self.follow_downs()
        loop.call_later(_POLL, self.poll, loop)

    def follow_downs(self) -> None:
        """``--on-member-down close`` in a worker: the supervisor decides DOWN, each worker closes its own
        sessions on the member once it sees the status fall."""
        up = self.table.up
        for pool in self.pools:
            if pool.on_down is None:
                continue
            for member in pool.members:
                now, key = bool(up[member.slot]), (pool.name, member.key)
                if self.was_up.get(key, True) and not now:
                    pool.on_down(pool, member)
                self.was_up[key] = now

    def follow_ramps(self) -> None:
        """Give members the slow-start share the supervisor's ramp published for them."""
        share = self.table.share
        for pool in self.pools:
            if pool.config.slow_start:
                for member in pool.members:
                    if share[member.slot] != member.share:
                        member.scale(share[member.slot])


class WorkerShare:
    """A worker's ``Proxy.shared``: its pools count sessions in the shared table, read the status the
    supervisor decides, forward their passive results to it, and follow its member lists."""

    def __init__(self, table: SharedTable, worker: int) -> None:
        self.table = table
        self.worker = worker

    def join(self, pools: Sequence[Pool]) -> None:
        view, forward = WorkerView(self.table, self.worker), forwarder(self.table, self.worker)
        for pool in pools:
            pool.balancer.view = view
            pool.forward = forward
        Follower(self.table, self.worker, pools).poll(asyncio.get_running_loop())


def _reload_probe_tls(pools: list[_HealthPool]) -> None:
    for pool in pools:
        if pool.config.tls is not None:
            try:
                pool.ssl_context = client_context(pool.config.tls)
            except ConfigError as exc:
                problem = exc.under(f"pools.{pool.config.name}.tls")
                log.error("SIGHUP: health checks kept the previous TLS files: %s", problem)


@dataclasses.dataclass
class _Slot:
    pid: int = 0
    started: float = 0.0
    backoff: float = _BACKOFF_MIN
    restart_at: float | None = None


class Supervisor:
    """Starts ``count`` workers, replaces dead ones, forwards signals, and runs the health thread."""

    def __init__(self, config: Config, count: int, access_log: AccessLog, run_worker: RunWorker) -> None:
        self.config = config
        self.count = count
        self.access_log = access_log
        self.run_worker = run_worker
        self.table = SharedTable(config, count)
        self.health = HealthThread(config, self.table)
        self.slots = [_Slot() for _ in range(count)]
        self.signals = 0
        self.pid = os.getpid()

    @property
    def draining(self) -> bool:
        return self.signals > 0

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            for worker in range(self.count):
                self._spawn(worker)
            self.health.start()
            while not self.draining or any(slot.pid for slot in self.slots):
                self._step()
        finally:
            self._stop()
        log.info("all %d worker%s stopped", self.count, "" if self.count == 1 else "s")
        return 0

    def _step(self) -> None:
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        timeout = max(0.0, min(due) - time.monotonic()) if due else 1.0
        info = signal.sigtimedwait(SIGNALS, timeout)
        if info is not None:
            self._on_signal(info.si_signo)
        self._reap()
        now = time.monotonic()
        for worker, slot in enumerate(self.slots):
            if slot.restart_at is not None and now >= slot.restart_at and not self.draining:
                self._spawn(worker)

    def _on_signal(self, signo: int) -> None:
        if signo == signal.SIGHUP:
            if _uses_tls(self.config):
                log.info("SIGHUP received: reloading TLS files in every worker")
                self.health.reload.set()
            else:
                log.info("SIGHUP: no TLS configured, nothing to reload")
            self._forward(signal.SIGHUP)
        elif signo in (signal.SIGTERM, signal.SIGINT):
            self.signals += 1
            name = signal.Signals(signo).name
            if self.signals == 1:
                log.info(
                    "%s received: draining %d worker%s for up to %.1fs (again to force)",
                    name,
                    self.count,
                    "" if self.count == 1 else "s",
                    self.config.drain_timeout,
                )
                for slot in self.slots:
                    slot.restart_at = None
            else:
                log.info("%s received again: workers close their sessions now", name)
            self._forward(signal.SIGTERM)

    def _forward(self, signo: int) -> None:
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signo)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w, slot in enumerate(self.slots) if slot.pid == pid), None)
            if worker is not None:
                self._died(worker, status)

    def _died(self, worker: int, status: int) -> None:
        slot = self.slots[worker]
        self.table.clear_worker(worker)
        how = _describe(status)
        if self.draining:
            level = logging.INFO if os.waitstatus_to_exitcode(status) == 0 else logging.WARNING
            log.log(level, "worker %d (pid %d) %s", worker, slot.pid, how)
            slot.pid = 0
            return
        lived = time.monotonic() - slot.started
        delay = _BACKOFF_MIN if lived >= _STABLE else slot.backoff
        slot.backoff = min(delay * 2, _BACKOFF_MAX)
        log.warning("worker %d (pid %d) %s; starting a new one in %.1fs", worker, slot.pid, how, delay)
        slot.pid = 0
        slot.restart_at = time.monotonic() + delay

    def _spawn(self, worker: int) -> None:
        slot = self.slots[worker]
        slot.restart_at = None
        pid = os.fork()
        if pid == 0:
            self._child(worker)  # never returns
        slot.pid = pid
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d)", worker, pid)

    def _child(self, worker: int) -> None:
        code = 1
        try:
            os.setpgid(0, 0)
            _die_with(self.pid)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the worker's loop handles it once running
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            _tag_logs(worker)
            stream = self.access_log.stream
            access = WorkerAccessLog(None if stream is None else stream.fileno(), worker)
            code = self.run_worker(self.config, access, WorkerShare(self.table, worker))
        except BaseException:
            log.exception("worker %d failed", worker)
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def _stop(self) -> None:
        """Leaving (normally after the drain; on an error, with workers still running)."""
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        self.health.stopping.set()
        if self.health.is_alive():
            self.health.join(timeout=5)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def supervise(config: Config, count: int, access_log: AccessLog, run_worker: RunWorker) -> int:
    """Run ``count`` workers until they have drained; the exit status (1 when the address is taken)."""
    try:
        config = _claim_addresses(config)
    except OSError as exc:
        print(f"l4proxy: error: cannot listen on {config.listeners[0].address}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return Supervisor(config, count, access_log, run_worker).run()


def _claim_addresses(config: Config) -> Config:
    """Check every address is free (binding without SO_REUSEPORT fails if anyone listens there, even a
    stale l4proxy with SO_REUSEPORT), fix OS-chosen ports so every worker binds the same one, and turn
    SO_REUSEPORT on."""
    listeners = []
    for listener in config.listeners:
        sockets = bind_sockets(listener)
        port = sockets[0].getsockname()[1]
        for sock in sockets:
            sock.close()
        address = listener.address if listener.address.port else Address(listener.address.host, port)
        listeners.append(dataclasses.replace(listener, address=address, reuse_port=True))
    return dataclasses.replace(config, listeners=tuple(listeners))


def _uses_tls(config: Config) -> bool:
    return any(c.tls is not None for c in config.listeners) or any(p.tls is not None for p in config.pools)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _die_with(parent: int) -> None:
    """Get SIGTERM when the supervisor dies (Linux), so no worker outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(0)


def _tag_logs(worker: int) -> None:
    """Name the worker in its diagnostics: ``l4proxy.dialer[w1]: ...``."""
    factory = logging.getLogRecordFactory()

    def tagged(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.name = f"{record.name}[w{worker}]"
        return record

    logging.setLogRecordFactory(tagged)
