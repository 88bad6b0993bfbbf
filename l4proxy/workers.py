"""``--workers N``: N processes, each a full ``Proxy`` on its own uvloop and its own SO_REUSEPORT
listening socket (the kernel spreads clients among them), under a supervisor that starts them,
restarts those that die, forwards signals and runs the health checks once for all of them.

**Shared memory.** One anonymous ``mmap`` (``SharedTable``), created before the first fork, so every
worker, restarted ones too, maps the same pages. Every slot has exactly one writer, and aligned 8-byte
loads and stores are atomic on the machines we run on, so there are no locks:

* ``active[worker][member]``: the sessions a worker has on a member, written by that worker only
  (``Balancer.acquire/release`` -> ``WorkerView.publish``). A worker's pick sums the member's column,
  so least-connections is global whichever worker accepted the client. The supervisor zeroes a dead
  worker's row (its sessions died with it) before it starts the replacement.
* ``up[member]``: 1 while the member is UP; written by the supervisor's health thread only and read by
  every worker's pick, so a member the supervisor takes DOWN gets no new client from any worker.
* ``fails/oks[worker][member]``: running counts of each worker's failed and successful upstream
  connects (passive results), with the last failure's cause in ``reason[worker][member]``; written by
  that worker only, through ``Pool.forward``.

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
import contextlib
import ctypes
import dataclasses
import logging
import mmap
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .accesslog import AccessLog, format_record
from .balancer import Member
from .config import Address, Config, PoolConfig
from .errors import ConfigError
from .health import Event
from .listener import bind_sockets
from .pool import Pool
from .prober import Prober
from .tls import client_context

if TYPE_CHECKING:
    from .proxy import Proxy
    from .relay import Session

log = logging.getLogger("l4proxy.workers")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
MAX_WORKERS = 256
_REASON = 96  # bytes kept of a passive failure's cause
_POLL = 0.05  # how often the supervisor looks at passive results
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0
_STABLE = 10.0  # a worker that lived this long is replaced after the shortest back-off
_PIPE_BUF = 4096

RunWorker = Callable[[Config, AccessLog, Callable[["Proxy"], None]], int]


def parse_workers(text: str, field_name: str = "--workers") -> int:
    """A number of worker processes: ``1``..``256`` or ``auto`` (the CPUs this process may use)."""
    value = text.strip().lower()
    if value == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    if not (value.isascii() and value.isdigit() and len(value) <= 3) or not 1 <= int(value) <= MAX_WORKERS:
        raise ConfigError(field_name, text, f"expected a number of processes from 1 to {MAX_WORKERS}, or 'auto'")
    return int(value)


class SharedTable:
    """Per-worker, per-member counters and per-member status in one anonymous shared mapping.

    Members of all pools are numbered globally (``offsets[pool]`` + the member's index in its pool);
    cell ``worker * members + g`` is worker ``worker``'s slot for member ``g``.
    """

    def __init__(self, config: Config, workers: int) -> None:
        self.workers = workers
        self.offsets: dict[str, int] = {}
        total = 0
        for pool in config.pools:
            self.offsets[pool.name] = total
            total += len(pool.members)
        self.members = total
        cells = workers * total
        words = 8 * cells
        self._map = mmap.mmap(-1, 3 * words + total + cells * _REASON)  # MAP_SHARED | MAP_ANONYMOUS
        view = memoryview(self._map)
        self.active = view[:words].cast("q")
        self.fails = view[words : 2 * words].cast("Q")
        self.oks = view[2 * words : 3 * words].cast("Q")
        self.up = view[3 * words : 3 * words + total]
        self.reasons = view[3 * words + total :]
        for g in range(total):
            self.up[g] = 1  # members start UP, as in one process

    def cell(self, worker: int, member: int) -> int:
        return worker * self.members + member

    def column(self, member: int) -> tuple[int, ...]:
        """The cells of every worker for global member ``member``."""
        return tuple(self.cell(w, member) for w in range(self.workers))

    def clear_worker(self, worker: int) -> None:
        """A worker died: its sessions are gone (its passive counts stay: they only ever grow)."""
        for g in range(self.members):
            self.active[self.cell(worker, g)] = 0

    def reason(self, cell: int) -> str:
        raw = self.reasons[cell * _REASON : (cell + 1) * _REASON].tobytes()
        return raw.rstrip(b"\0").decode("utf-8", "replace")

    def set_reason(self, cell: int, text: str) -> None:
        raw = text.encode("utf-8", "replace")[:_REASON]
        self.reasons[cell * _REASON : (cell + 1) * _REASON] = raw.ljust(_REASON, b"\0")


class WorkerView:
    """The ``balancer.LoadView`` of one pool in one worker: global counts and status, own slot writes."""

    __slots__ = ("_active", "_base", "_columns", "_own", "_up")

    def __init__(self, table: SharedTable, worker: int, base: int, count: int) -> None:
        self._active = table.active
        self._up = table.up
        self._base = base
        self._columns = [table.column(base + i) for i in range(count)]
        self._own = [table.cell(worker, base + i) for i in range(count)]

    def active(self, index: int) -> int:
        counts = self._active
        total = 0
        for cell in self._columns[index]:
            total += counts[cell]
        return total

    def up(self, index: int) -> bool:
        return self._up[self._base + index] != 0

    def publish(self, index: int, active: int) -> None:
        self._active[self._own[index]] = active


def forwarder(table: SharedTable, worker: int, base: int) -> Callable[[Member, Event, str], None]:
    """``Pool.forward`` for a worker: passive results to the worker's own counters; probes never run."""
    fails, oks = table.fails, table.oks
    first = table.cell(worker, base)

    def forward(member: Member, event: Event, reason: str) -> None:
        cell = first + member.index
        if event is Event.TRAFFIC_OK:
            oks[cell] += 1
        elif event is Event.TRAFFIC_FAIL:
            table.set_reason(cell, reason)  # before the count, so the supervisor reads this cause
            fails[cell] += 1

    return forward


class WorkerAccessLog(AccessLog):
    """Access-log lines of one worker, written in whole-line batches of at most PIPE_BUF bytes."""

    def __init__(self, fd: int | None, worker: int) -> None:
        super().__init__(None)
        self.fd = fd
        self.tail = f" worker={worker}\n"
        self.pending: list[str] = []

    def record(self, session: Session) -> None:
        self.records += 1
        if self.fd is not None:
            self.pending.append(format_record(session, time.time()) + self.tail)
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
    """The supervisor's pool: decides and logs status, and publishes it to the workers."""

    def __init__(self, config: PoolConfig, table: SharedTable) -> None:
        super().__init__(config, None if config.tls is None else client_context(config.tls))
        self._up = table.up
        self._base = table.offsets[config.name]

    def report(self, member: Member, event: Event, reason: str = "") -> None:
        super().report(member, event, reason)
        self._up[self._base + member.index] = 1 if member.health.up else 0


class HealthThread(threading.Thread):
    """Probes every member once for all workers and turns the workers' passive results into status."""

    def __init__(self, config: Config, table: SharedTable) -> None:
        super().__init__(name="l4proxy health", daemon=True)
        self.config = config
        self.table = table
        self.stopping = threading.Event()
        self.reload = threading.Event()
        self._seen_fails = [0] * (table.workers * table.members)
        self._seen_oks = [0] * (table.workers * table.members)

    def run(self) -> None:
        import uvloop

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._main())
        except Exception:
            log.exception("health checks stopped")

    async def _main(self) -> None:
        pools = [_HealthPool(pool, self.table) for pool in self.config.pools]
        probers = [Prober(pool) for pool in pools]
        for prober in probers:
            prober.start()
        try:
            while not self.stopping.is_set():
                await asyncio.sleep(_POLL)
                for pool in pools:
                    self._passive(pool)
                if self.reload.is_set():
                    self.reload.clear()
                    _reload_probe_tls(pools)
        finally:
            for prober in probers:
                await prober.stop()
            for pool in pools:
                pool.close()

    def _passive(self, pool: Pool) -> None:
        """Feed the passive results the workers recorded since the last look into ``pool``."""
        table = self.table
        base = table.offsets[pool.name]
        for member in pool.members:
            failed = succeeded = 0
            reason = ""
            for cell in table.column(base + member.index):
                fails, oks = table.fails[cell], table.oks[cell]
                if fails != self._seen_fails[cell]:
                    failed += fails - self._seen_fails[cell]
                    self._seen_fails[cell] = fails
                    reason = table.reason(cell)
                succeeded += oks - self._seen_oks[cell]
                self._seen_oks[cell] = oks
            for _ in range(min(failed, pool.config.health.fall)):
                pool.report(member, Event.TRAFFIC_FAIL, reason)
            if succeeded:
                pool.report(member, Event.TRAFFIC_OK)


def _reload_probe_tls(pools: list[_HealthPool]) -> None:
    for pool in pools:
        if pool.config.tls is not None:
            try:
                pool.ssl_context = client_context(pool.config.tls)
            except ConfigError as exc:
                log.error("SIGHUP: health checks kept the previous TLS files: %s", exc)


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
        log.info("all %d workers stopped", self.count)
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
            log.info("SIGHUP received: reloading TLS files in every worker")
            self.health.reload.set()
            self._forward(signal.SIGHUP)
        elif signo in (signal.SIGTERM, signal.SIGINT):
            self.signals += 1
            name = signal.Signals(signo).name
            if self.signals == 1:
                log.info(
                    "%s received: draining %d workers for up to %.1fs (again to force)",
                    name,
                    self.count,
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
            code = self.run_worker(self.config, access, lambda proxy: self._prepare(proxy, worker))
        except BaseException:
            log.exception("worker %d failed", worker)
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def _prepare(self, proxy: Proxy, worker: int) -> None:
        """Make a worker's Proxy use the shared table: global counts and status, no probers."""
        proxy.probers = []
        for pool in proxy.pools.values():
            base = self.table.offsets[pool.name]
            pool.balancer.view = WorkerView(self.table, worker, base, len(pool.members))
            pool.forward = forwarder(self.table, worker, base)

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
