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
streak, so a member that fails every connect is ejected after ``eject_after`` of them, as in one
process, while one that fails only some is not ejected by a mixed interval). Sessions the member reset
before a byte come next, then one served session if there was any (``outlier.py``: a connect does not
clear a streak of resets, a served session does); the supervisor publishes whether the member's streak
is 0 (``streaky``), and workers report served sessions only while it is not. Its ``Pool.report`` is the
only place that logs a change, so each change is logged once, by the supervisor, and ejections are
global: the supervisor publishes an ejected member as not UP, so no worker picks it, and its pool's
ejection timer returns it to every worker at once. A primary pool's routing (``Pool.restrict``: its
primary, none yet, or none in a split brain) is published per member too (the table's ``role``);
each worker restricts its own balancer to it at its next look (``Follower.follow_roles``, which
serves the clients its queue holds for a primary), and reads it afresh when a client finds no
member, so a client waits for a primary or is refused in a split brain as in one process.

**Reload.** With ``--config``, SIGHUP makes the supervisor read and check the file once (``loader``);
a broken file keeps the running configuration everywhere, with every problem logged and counted
(``Supervisor.reloads_failed``). A good one is planned (``reload.plan``), new listen addresses are
checked free, the health thread changes its pools (``HealthThread.apply``: added pools get slots in
the table, removed ones give theirs back), and then every worker gets the same Config, pickled, on its
own pipe; it follows the table first, then applies it with ``Proxy.reconfigure`` (its members still
come from the table; those the reload removed are closed at ``drain_timeout``, as in one process). A worker
started later is forked with the configuration in force. No worker runs a configuration the
supervisor refused.

**Signals.** The supervisor blocks SIGTERM, SIGINT, SIGHUP and SIGCHLD and takes them with
``sigtimedwait`` in its main thread (the health thread never sees them). SIGTERM/SIGINT is forwarded as
SIGTERM to every worker, which drains (after its ``shutdown_delay``, while the supervisor already counts
as draining for readiness, and has told systemd ``STOPPING=1``: ``notify.py``); a second one is
forwarded again and makes the workers close their sessions at once; the supervisor exits 0 once every
worker has exited. Without a config file, SIGHUP is forwarded (each worker reloads its TLS files) and
the supervisor reloads its probes' client contexts. SIGUSR1 makes the supervisor log every member's
status (``snapshot.log_status``), for all workers. A child starts with those signals at their
defaults (SIGHUP ignored until its loop handles it) and unblocked, in its own process group, so a
terminal's Ctrl-C reaches it once, through the supervisor; it gets SIGTERM if the supervisor itself
dies.

**Admin.** With ``--admin`` the supervisor binds the endpoint before the first fork and serves it on the
health thread's loop, over every worker (``sharedstats.py``: each worker copies its counters to shared
memory every 0.25 s); workers run none of their own.

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
import pickle
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from .accesslog import AccessLog, Finished
from .admin import AdminServer, bind
from .balancer import Member
from .checks import PRIMARY_KINDS
from .config import Address, Config, ListenerConfig, MemberConfig, PoolConfig
from .configfile import ConfigFileError
from .discovery import unresolved_members
from .errors import ConfigError
from .health import Event
from .listener import bind_sockets
from .notify import notify
from .pool import Pool
from .prober import Prober
from .reload import Plan, plan
from .resolver import Resolver
from .sharedstats import Publisher, SharedCounters, SupervisorSource
from .snapshot import log_status
from .syslogsink import SyslogAccessLog
from .table import CHOSEN, EJECTED, ELIGIBLE, LEFT_OUT, OPEN, SPLIT_OUT, SharedTable, WorkerView, forwarder, restriction
from .tls import client_context

if TYPE_CHECKING:
    from .proxy import Proxy, Shared

log = logging.getLogger("l4proxy.workers")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1}
MAX_WORKERS = 256
_POLL = 0.05  # how often the supervisor looks at passive results, and a worker at the generation
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0
_STABLE = 10.0  # a worker that lived this long is replaced after the shortest back-off
_PIPE_BUF = 4096

Changes = tuple[list[Member], list[Member]]  # Pool.update's (added, removed)
RunWorker = Callable[[Config, AccessLog, "Shared"], int]  # runs a Proxy(config, log, shared=...) to the end
Loader = Callable[[], Config]  # the config file read and checked again (SIGHUP)
Refused = Callable[[ConfigFileError | ConfigError], None]  # logs a refused reload


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

    def __init__(self, fd: int | None, worker: int, fmt: str = "logfmt") -> None:
        super().__init__(None, fmt=fmt, worker=worker)
        self.fd = fd
        self.tail = f" worker={worker}\n" if fmt == "logfmt" else "\n"  # JSON has it as a key
        self.pending: list[str] = []

    def record(self, session: Finished, now: float) -> None:
        self.records += 1
        if self.fd is not None:
            self.pending.append(self.line(session, now) + self.tail)
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
        self._role = table.role
        slots = table.slots(config.name)
        for member in self.members:
            member.slot = slots[member.key]

    def set_members(self, members: Sequence[MemberConfig | Address], check_first: Collection[str] = ()) -> Changes:
        # members waiting for a probe are published DOWN, so no worker picks them in between
        slots = self._table.publish(self.name, members, down=check_first if self.config.health.enabled else ())
        added, removed = super().set_members(members, check_first)
        for member in added:
            member.slot = slots[member.key]
            self._publish(member)
            self.scaled(member)
        return added, removed

    def scaled(self, member: Member) -> None:
        if not member.draining:
            self._table.share[member.slot] = member.share

    def status_changed(self, member: Member) -> None:
        if not member.draining:  # its slot may belong to another member soon
            self._publish(member)

    def report(self, member: Member, event: Event, reason: str = "") -> None:
        super().report(member, event, reason)
        if not member.draining:
            self._publish(member)

    def set_admin(self, member: Member, state: str) -> None:
        """The operator's state, decided here for every worker: a held member reads as not UP to their picks."""
        super().set_admin(member, state)
        if not member.draining:
            self._publish(member)

    def restrict(self, allowed: Collection[Member] | None, split: bool = False) -> None:
        """A primary pool's routing, decided here: a member left out reads as not UP to the workers' picks."""
        super().restrict(allowed, split)
        for member in self.members:
            self._publish(member)

    def _publish(self, member: Member) -> None:
        balancer, slot = self.balancer, member.slot
        if balancer.allowed is None:
            role = OPEN
        elif member in balancer.allowed and (member.eligible or member.health.up):
            role = CHOSEN
        else:
            role = SPLIT_OUT if balancer.split else LEFT_OUT
        # A primary marked DOWN is published left out at once, not when the prober reroutes just after,
        # and left out before it reads as not UP, chosen only once it reads as UP: a worker that reads
        # the roles, then the status (``Balancer.shortage``), finds no primary (its client waits) rather
        # than a chosen one DOWN (refused at once). A primary held by the operator or ejected stays chosen
        # and not UP, refused at once as in one process.
        if role != CHOSEN:
            self._role[slot] = role
        if member.eligible and balancer.allows(member):
            self._up[slot] = ELIGIBLE
        else:  # an ejected member is not DOWN: --on-member-down close leaves its sessions alone
            self._up[slot] = EJECTED if member.ejected and member.health.up else 0
        if role == CHOSEN:
            self._role[slot] = role


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
        self.probers: dict[str, Prober] = {}
        self.resolvers: dict[str, Resolver] = {}
        self.ready = threading.Event()  # set once the pools exist and probes run
        self.make_resolver: Callable[[Pool], Resolver] = Resolver  # tests point it at a DNS server of theirs
        self.admin: AdminServer | None = None  # served on this thread's loop, over every worker
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        import uvloop

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._main())
        except Exception:
            log.exception("health checks stopped")

    def call(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on this thread's loop (where the pools live), from another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(callback)

    def update(self, pool: str, members: Sequence[Address]) -> concurrent.futures.Future[Changes]:
        """Change the members of ``pool`` from another thread; the future has ``Pool.update``'s result
        or its ConfigError. Workers follow within 50 ms."""
        assert self._loop is not None, "the health thread is not running"

        async def apply() -> Changes:
            return self.pools[pool].update(members)

        return asyncio.run_coroutine_threadsafe(apply(), self._loop)

    def apply(self, steps: Plan) -> concurrent.futures.Future[None]:
        """Change the pools as ``steps`` says, from another thread (a reload); the future has a
        ConfigError when the shared table has no room for the new members."""
        assert self._loop is not None, "the health thread is not running"
        return asyncio.run_coroutine_threadsafe(self._apply(steps), self._loop)

    async def _apply(self, steps: Plan) -> None:
        new = steps.new
        for name in steps.pools_added:
            config = new.pool(name)
            self.table.publish(name, unresolved_members(config.members))
            await self._watch(_HealthPool(config, self.table))
        for name in steps.pools_updated:
            pool = self.pools[name]
            if name in steps.health_changed or name in steps.members_changed:
                await self._unwatch(name)
            pool.retune(new.pool(name), members=name in steps.members_changed)
            if pool.config.tls is not None:
                pool.ssl_context = client_context(pool.config.tls)
            if name not in self.probers:
                await self._watch(pool)
        for name in steps.pools_removed:
            await self._unwatch(name)
            self.pools.pop(name).close()
            self.table.publish(name, [])  # its slots are reclaimed once no worker uses them
        self.config = new

    async def _watch(self, pool: _HealthPool) -> None:
        """Resolve and probe ``pool`` from now on."""
        self.pools[pool.name] = pool
        if Resolver.wanted(pool.config):
            resolver = self.resolvers[pool.name] = self.make_resolver(pool)
            await resolver.resolve()
            resolver.start()
        prober = self.probers[pool.name] = Prober(pool)
        prober.start()

    async def _unwatch(self, name: str) -> None:
        resolver = self.resolvers.pop(name, None)
        if resolver is not None:
            await resolver.stop()
        prober = self.probers.pop(name, None)
        if prober is not None:
            await prober.stop()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        for config in self.config.pools:
            await self._watch(_HealthPool(config, self.table))
        if self.admin is not None:
            await self.admin.start()
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
            if self.admin is not None:
                await self.admin.close()
            for name in list(self.pools):
                await self._unwatch(name)
            for pool in self.pools.values():
                pool.close()

    def _passive(self, pool: Pool) -> None:
        """Feed the passive results the workers recorded since the last look into ``pool``."""
        for member in pool.members:
            failed, succeeded, reason = self.table.passive(member.slot)
            for _ in range(min(failed, pool.config.eject_after)):
                pool.report(member, Event.TRAFFIC_FAIL, reason)
            if succeeded:
                pool.report(member, Event.TRAFFIC_OK)
            resets, served = self.table.sessions(member.slot)
            for _ in range(min(resets, pool.config.eject_after)):
                pool.reset_early(member)
            if served:
                pool.served(member)
            self.table.streaky[member.slot] = 1 if member.outlier.streak else 0


class Follower:
    """A worker's pools kept in step with the table: on a new generation, each pool takes the members
    the supervisor published (by key, so members that stay keep their counts and sessions)."""

    def __init__(self, table: SharedTable, worker: int, pools: Sequence[Pool]) -> None:
        self.table = table
        self.worker = worker
        self.pools = {pool.name: pool for pool in pools}
        self.seen = -1
        self.was_up: dict[tuple[str, str], bool] = {}  # (pool, member key): UP at the last look

    def apply(self) -> None:
        generation, entries = self.table.snapshot()
        for pool in self.pools.values():
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
        self.follow_roles()
        self.follow_ramps()
        self.follow_downs()
        self.follow_streaks()
        loop.call_later(_POLL, self.poll, loop)

    def follow_roles(self) -> None:
        """A primary pool's routing as the supervisor's prober decided it (``Pool.restrict``: a new
        primary serves the clients that wait for one in this worker's queue)."""
        role = self.table.role
        for pool in self.pools.values():
            if pool.config.health.kind not in PRIMARY_KINDS:
                continue
            slots, split = restriction(role, [member.slot for member in pool.members])
            allowed = None if slots is None else frozenset(m for m in pool.members if m.slot in slots)
            if allowed != pool.balancer.allowed or split != pool.balancer.split:
                pool.restrict(allowed, split)

    def follow_downs(self) -> None:
        """``--on-member-down close`` in a worker: the supervisor decides DOWN, each worker closes its own
        sessions on the member once it sees the status fall."""
        up = self.table.up
        for pool in self.pools.values():
            if pool.on_down is None or pool.config.on_member_down != "close":
                continue
            why = "is DOWN or no longer the primary" if pool.config.health.kind in PRIMARY_KINDS else "is DOWN"
            for member in pool.members:
                now, key = bool(up[member.slot]), (pool.name, member.key)
                if self.was_up.get(key, True) and not now:
                    pool.on_down(pool, member, why)
                self.was_up[key] = now

    def follow_streaks(self) -> None:
        """Mark the members whose supervisor has a failure streak, so this worker's next session that
        gets their bytes reports it (``Pool.served``: only a served session clears a streak of resets;
        the forwarder lowers the mark once it is said, ``table.forwarder``)."""
        streaky = self.table.streaky
        for pool in self.pools.values():
            for member in pool.members:
                if streaky[member.slot]:
                    member.outlier.streak = 1

    def follow_ramps(self) -> None:
        """Give members the slow-start share the supervisor's ramp published for them."""
        share = self.table.share
        for pool in self.pools.values():
            if pool.config.slow_start:
                for member in pool.members:
                    if share[member.slot] != member.share:
                        member.scale(share[member.slot])


class WorkerShare:
    """A worker's ``Proxy.shared``: its pools count sessions in the shared table, read the status the
    supervisor decides, forward their passive results to it, and follow its member lists; the
    configurations the supervisor sends arrive on ``configs`` (a pipe)."""

    def __init__(
        self, table: SharedTable, worker: int, configs: int | None = None, counters: SharedCounters | None = None
    ) -> None:
        self.table = table
        self.worker = worker
        self.configs = configs
        self.counters = counters
        self.follower: Follower | None = None
        self._pending = b""

    def join(self, pools: Sequence[Pool]) -> None:
        view, forward = WorkerView(self.table, self.worker), forwarder(self.table, self.worker)
        for pool in pools:
            pool.balancer.view = view
            pool.forward = forward
        if self.follower is None:
            self.follower = Follower(self.table, self.worker, pools)
            self.follower.poll(asyncio.get_running_loop())
            return
        self.follower.pools.update({pool.name: pool for pool in pools})  # a reload added them
        self.follower.apply()

    def follow(self, apply: Callable[[Config], None]) -> None:
        if self.configs is None:
            return
        os.set_blocking(self.configs, False)
        asyncio.get_running_loop().add_reader(self.configs, self._readable, apply)

    def _readable(self, apply: Callable[[Config], None]) -> None:
        assert self.configs is not None
        try:
            data = os.read(self.configs, 1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        if not data:  # the supervisor is gone; PR_SET_PDEATHSIG stops us
            asyncio.get_running_loop().remove_reader(self.configs)
            return
        self._pending += data
        for config in _messages(self):
            if self.follower is not None and self.table.generation != self.follower.seen:
                self.follower.apply()  # the reload's members, published before it was sent: drained with it
            apply(config)

    def publish(self, proxy: Proxy) -> None:
        if self.counters is not None:  # for the supervisor's --admin and SIGUSR1
            Publisher(self.counters, self.worker, proxy).poll(asyncio.get_running_loop())


def _messages(share: WorkerShare) -> list[Config]:
    """The whole configurations in ``share``'s buffer (length-prefixed pickles), taken out of it."""
    found = []
    while len(share._pending) >= 8:
        (size,) = struct.unpack("!Q", share._pending[:8])
        if len(share._pending) < 8 + size:
            break
        found.append(pickle.loads(share._pending[8 : 8 + size]))
        share._pending = share._pending[8 + size :]
    return found


def _send(fd: int, config: Config) -> None:
    """Write ``config`` to a worker's pipe, whole (blocking: it is a few kilobytes)."""
    data = pickle.dumps(config)
    message = memoryview(struct.pack("!Q", len(data)) + data)
    os.set_blocking(fd, True)
    while message:
        message = message[os.write(fd, message) :]


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
    pipe: int = -1  # the write end of the worker's configuration pipe


class Supervisor:
    """Starts ``count`` workers, replaces dead ones, forwards signals, and runs the health thread."""

    def __init__(
        self,
        config: Config,
        count: int,
        access_log: AccessLog,
        run_worker: RunWorker,
        loader: Loader | None = None,
        refused: Refused | None = None,
        admin: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.loader = loader
        self.refused = refused or _log_refused
        self.reloads = 0
        self.reloads_failed = 0
        self.count = count
        self.access_log = access_log
        self.run_worker = run_worker
        self.table = SharedTable(config, count)
        # the workers' counters (--admin, SIGUSR1); histograms and open sessions' bytes only for --admin
        self.shared = SharedCounters(config, count, self.table.capacity, admin=admin is not None)
        self.health = health = HealthThread(config, self.table)
        self.admin_socket = admin
        self.source = SupervisorSource(
            lambda: self.config,
            lambda: health.pools,
            lambda: list(health.probers.values()),
            self.table,
            self.shared,
            lambda: self.draining,
            lambda: (sum(1 for slot in self.slots if slot.pid), self.reloads, self.reloads_failed),
        )
        if admin is not None:
            host, port = admin.getsockname()[:2]
            health.admin = AdminServer(self.source, host, port, sock=admin)
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
        if signo == signal.SIGUSR1:
            self.health.call(lambda: log_status(self.source))
        elif signo == signal.SIGHUP and self.loader is not None:
            self._reload(self.loader)
        elif signo == signal.SIGHUP:
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
                delay = self.config.shutdown_delay
                log.info(
                    "%s received: %sdraining %d worker%s for up to %.1fs (again to force)",
                    name,
                    f"not ready, accepting for {delay:.1f}s more, then " if delay > 0 else "",
                    self.count,
                    "" if self.count == 1 else "s",
                    self.config.drain_timeout,
                )
                notify("STOPPING=1")
                for slot in self.slots:
                    slot.restart_at = None
            else:
                log.info("%s received again: workers close their sessions now", name)
            self._forward(signal.SIGTERM)

    def _reload(self, loader: Loader) -> None:
        """SIGHUP with a config file: check it once here, change the health thread's pools, then hand
        the same Config to every worker; anything wrong keeps the running configuration everywhere."""
        try:
            config = loader()
            config = dataclasses.replace(config, listeners=tuple(
                dataclasses.replace(listener, reuse_port=True) for listener in config.listeners
            ))  # fmt: skip
            steps = plan(self.config, config)
            for index in steps.opened:
                _claim(steps.new.listeners[index])
            self.health.apply(steps).result(timeout=30)
        except (ConfigFileError, ConfigError) as exc:
            self.reloads_failed += 1
            self.refused(exc)
            return
        except OSError as exc:
            self.reloads_failed += 1
            log.error("SIGHUP: kept the running configuration: cannot listen on a new address: %s", exc.strerror or exc)
            return
        self.config = steps.new
        self.reloads += 1
        for slot in self.slots:
            if slot.pid and slot.pipe >= 0:
                with contextlib.suppress(OSError):
                    _send(slot.pipe, dataclasses.replace(steps.new, admin=None))  # as at spawn
        self.health.reload.set()  # the probes' TLS files, read again
        for name in steps.restart:
            log.warning("SIGHUP: %s changed in the file; it takes effect when l4proxy is restarted", name)
        log.info("SIGHUP: configuration reloaded in %d workers: %s", self.count, steps.summary())

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
        self.shared.retire(worker)
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
        if slot.pipe >= 0:
            os.close(slot.pipe)
        configs, slot.pipe = os.pipe()
        pid = os.fork()
        if pid == 0:
            self._child(worker, configs)  # never returns
        os.close(configs)
        slot.pid = pid
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d)", worker, pid)

    def _child(self, worker: int, configs: int) -> None:
        code = 1
        try:
            for slot in self.slots:  # the write ends are the supervisor's
                if slot.pipe >= 0:
                    os.close(slot.pipe)
            os.setpgid(0, 0)
            _die_with(self.pid)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the worker's loop handles it once running
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            _tag_logs(worker)
            if self.admin_socket is not None:
                self.admin_socket.close()  # the supervisor's endpoint answers for every worker
            access = self._access_log(worker)
            config = dataclasses.replace(self.config, admin=None)
            code = self.run_worker(config, access, WorkerShare(self.table, worker, configs, self.shared))
        except BaseException:
            log.exception("worker %d failed", worker)
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def _access_log(self, worker: int) -> AccessLog:
        """Worker ``worker``'s access log, in its process: the supervisor's socket for syslog, else
        whole-line batches on the supervisor's stream."""
        if isinstance(self.access_log, SyslogAccessLog):
            return self.access_log.for_worker(worker)
        stream = self.access_log.stream
        return WorkerAccessLog(None if stream is None else stream.fileno(), worker, self.access_log.fmt)

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


def supervise(
    config: Config,
    count: int,
    access_log: AccessLog,
    run_worker: RunWorker,
    loader: Loader | None = None,
    refused: Refused | None = None,
) -> int:
    """Run ``count`` workers until they have drained; the exit status (1 when the address is taken).
    ``loader`` reads the config file again on SIGHUP; ``refused`` logs a file it refused."""
    try:
        config = _claim_addresses(config)
    except OSError as exc:
        print(f"l4proxy: error: cannot listen on {config.listeners[0].address}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    admin = None
    if config.admin is not None:
        try:
            admin = bind(config.admin.host, config.admin.port)
        except OSError as exc:
            print(f"l4proxy: error: --admin: cannot listen on {config.admin}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return Supervisor(config, count, access_log, run_worker, loader, refused, admin).run()


def _claim_addresses(config: Config) -> Config:
    """Check every address is free, fix OS-chosen ports so every worker binds the same one, and turn
    SO_REUSEPORT on."""
    return dataclasses.replace(config, listeners=tuple(_claim(listener) for listener in config.listeners))


def _claim(listener: ListenerConfig) -> ListenerConfig:
    """``listener`` with SO_REUSEPORT and a fixed port, once its address is found free (binding without
    SO_REUSEPORT fails if anyone listens there, even a stale l4proxy with SO_REUSEPORT)."""
    sockets = bind_sockets(dataclasses.replace(listener, reuse_port=False))
    port = sockets[0].getsockname()[1]
    for sock in sockets:
        sock.close()
    address = listener.address if listener.address.port else Address(listener.address.host, port)
    return dataclasses.replace(listener, address=address, reuse_port=True)


def _log_refused(exc: ConfigFileError | ConfigError) -> None:
    lines = exc.lines() if isinstance(exc, ConfigFileError) else [str(exc)]
    for line in lines:
        log.error("SIGHUP: %s", line)
    log.error("SIGHUP: kept the running configuration (%d problem%s in the file)", len(lines),
              "" if len(lines) == 1 else "s")  # fmt: skip


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
