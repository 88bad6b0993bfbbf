"""``--workers N``: the workers' counters in shared memory, and the supervisor's view of them (for
``--admin`` and SIGUSR1).

Each worker keeps its counters as in one process (plain ints, ``counters.py``) and copies them into its
own row of one anonymous ``mmap`` every ``PUBLISH`` seconds (``Publisher``, a loop timer: nothing on the
data path), its bytes with those of its open sessions so far (``snapshot.OpenBytes``: one pass over
its session table per copy, only with ``--admin``, the one reader of bytes). The supervisor's admin
endpoint sums the rows (``SupervisorSource``). The row is bounded: per listener ``LISTENER_FIELDS``,
per pool ``POOL_FIELDS``, per member slot of the shared table (``table.SharedTable``) ``SLOT_FIELDS``.
The layout is the start-up configuration's: rows are found by listen address and pool name, so a
reload that reorders or renames them reads the right cells; a listener or pool a reload adds has no
cells until the next start (the admin endpoint shows it with zero counts, health and members are still
exact). TLS failures, refusals and PROXY header errors have a cell per reason of their fixed tables
(``counters.TLS_REASONS``, ``counters.REFUSALS``, ``edge.HEADER_ERRORS``); a histogram has a cell per
bucket and one for its sum in microseconds
(``histogram.cells``), so the supervisor's sums are a histogram of every worker's observations.

Every cell has one writer (its worker), and aligned 8-byte stores are atomic, so there are no locks.
When a worker dies, the supervisor adds its counters to a private total and zeroes its row before the
replacement starts, so sums never go backwards; what the dead worker counted since its last copy (at
most ``PUBLISH`` seconds) is lost. Health, checks and operator states are the supervisor's own: its
pools decide them for every worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import mmap
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from .counters import ADMIN_STATES, CONNECT_KINDS, REFUSALS, TLS_REASONS
from .edge import HEADER_ERRORS
from .histogram import CONNECT_BOUNDS, DURATION_BOUNDS, cells, from_cells, width
from .snapshot import (
    ListenerView,
    MemberView,
    OpenBytes,
    PoolView,
    QueueView,
    Snapshot,
    check_failures,
    config_digest,
    edge_tables,
    find_member,
    member_view,
    queue_view,
)

if TYPE_CHECKING:
    from .balancer import Member
    from .config import Config, ListenerConfig
    from .pool import Pool
    from .prober import Prober
    from .proxy import Proxy
    from .table import SharedTable

PUBLISH = 0.25  # seconds between a worker's copies of its counters
_REFUSED = tuple(f"refused_{reason}" for reason in REFUSALS)
_HEADERS = tuple(f"header_{reason}" for reason in HEADER_ERRORS)
LISTENER_FIELDS: tuple[str, ...] = ("accepted", "sessions", "active", "bytes_in", "bytes_out", "accept_pauses")
LISTENER_FIELDS += (*TLS_REASONS, *_REFUSED, *_HEADERS)
_DURATIONS = tuple(f"duration_{cell}" for cell in range(width(DURATION_BOUNDS)))  # histogram.cells: counts, sum
LISTENER_FIELDS += _DURATIONS
QUEUE_FIELDS = ("queue_waiting", "queue_full", "queue_timeouts", "queue_served", "queue_waited_ms", "queue_no_primary")
POOL_FIELDS = ("retries", "no_upstream", *QUEUE_FIELDS)
_CONNECTS = tuple(f"connect_{cell}" for cell in range(width(CONNECT_BOUNDS)))
SLOT_FIELDS = ("attempts", "sessions", "bytes_in", "bytes_out", *CONNECT_KINDS, *_CONNECTS)
_GAUGES = {LISTENER_FIELDS.index("active")}  # listener offsets of values that are not running totals


class SharedCounters:
    """One row of int64 cells per worker: listeners, then pools, then member slots."""

    def __init__(self, config: Config, workers: int, capacity: int, admin: bool = True) -> None:
        self.workers = workers
        self.admin = admin  # the supervisor serves /metrics: workers keep histograms and open sessions' bytes
        self.listeners = len(config.listeners)
        self.addresses: dict[str, int] = {}  # listen address -> listener index in the row
        for index, listener in enumerate(config.listeners):
            self.addresses.setdefault(str(listener.address), index)
        self.pools = {pool.name: index for index, pool in enumerate(config.pools)}
        self._pool_base = self.listeners * len(LISTENER_FIELDS)
        self._slot_base = self._pool_base + len(self.pools) * len(POOL_FIELDS)
        self.row = self._slot_base + capacity * len(SLOT_FIELDS)
        self._map = mmap.mmap(-1, 8 * workers * self.row)
        self.cells = memoryview(self._map).cast("q")
        self._retired = [0] * self.row  # the supervisor's: totals of workers that died
        self._gauge_cells = {
            index * len(LISTENER_FIELDS) + offset for index in range(self.listeners) for offset in _GAUGES
        }

    def listener(self, index: int) -> int:
        return index * len(LISTENER_FIELDS)

    def pool(self, name: str) -> int:
        return self._pool_base + self.pools[name] * len(POOL_FIELDS)

    def slot(self, slot: int) -> int:
        return self._slot_base + slot * len(SLOT_FIELDS)

    def total(self, offset: int, count: int) -> list[int]:
        """``count`` cells from ``offset``, summed over every worker (and the dead ones)."""
        cells = self.cells
        sums = self._retired[offset : offset + count]
        for worker in range(self.workers):
            base = worker * self.row + offset
            for field in range(count):
                sums[field] += cells[base + field]
        return sums

    def retire(self, worker: int) -> None:
        """A worker died: keep its running totals, zero its row for its replacement."""
        base = worker * self.row
        for offset in range(self.row):
            value = self.cells[base + offset]
            if offset not in self._gauge_cells:
                self._retired[offset] += value
            self.cells[base + offset] = 0


class Publisher:
    """A worker's copy of its Proxy's counters into its row, every ``PUBLISH`` seconds."""

    def __init__(self, shared: SharedCounters, worker: int, proxy: Proxy) -> None:
        self.shared = shared
        self.base = worker * shared.row
        self.proxy = proxy
        if shared.admin:
            proxy.time_sessions()

    def publish(self) -> None:
        shared, row, base, proxy = self.shared, self.shared.cells, self.base, self.proxy
        moving = OpenBytes(proxy.table.live if shared.admin else ())
        for frontend in proxy.frontends:  # read each time: a reload replaces them
            index = shared.addresses.get(str(frontend.config.address))
            if index is None:  # added by a reload: no cells in this layout
                continue
            counters, listener = frontend.counters, frontend.listener
            tls, refused, headers = counters.tls_failures, frontend.refused, frontend.header_errors
            open_in, open_out = moving.listener(frontend)
            values = (
                listener.accepted,
                counters.sessions,
                counters.active,
                counters.bytes_in + open_in,
                counters.bytes_out + open_out,
                listener.exhausted,
                *(tls.get(reason, 0) for reason in TLS_REASONS),
                *(refused.get(reason, 0) for reason in REFUSALS),
                *(headers.get(reason, 0) for reason in HEADER_ERRORS),
                *cells(counters.durations.view()),
            )
            _store(row, base + shared.listener(index), values)
        for pool in proxy.pools.values():
            if pool.name not in shared.pools:
                continue
            queue = queue_view(pool)
            values = (pool.retries, pool.no_upstream, queue.waiting, queue.full, queue.timeouts, queue.served)
            _store(row, base + shared.pool(pool.name), (*values, queue.waited_ms, queue.no_primary))
            for member in pool.members:
                if member.slot >= 0:
                    stats = member.stats
                    failures = stats.connect_failures
                    open_in, open_out = moving.member(member)
                    counts = (member.total, stats.sessions, stats.bytes_in + open_in, stats.bytes_out + open_out)
                    values = (*counts, *(failures[kind] for kind in CONNECT_KINDS), *cells(stats.connects.view()))
                    _store(row, base + shared.slot(member.slot), values)

    def poll(self, loop: asyncio.AbstractEventLoop) -> None:
        """Publish now and every ``PUBLISH`` seconds after, on ``loop``."""
        self.publish()
        loop.call_later(PUBLISH, self.poll, loop)


def _store(cells: memoryview, start: int, values: tuple[int, ...]) -> None:
    for offset, value in enumerate(values):
        cells[start + offset] = value


class SupervisorSource:
    """A ``snapshot.Source`` for the supervisor: its pools (health, checks, operator states), the shared
    table (every worker's active sessions) and the workers' counters. Runs on the health thread's loop,
    where those pools live."""

    def __init__(
        self,
        config: Callable[[], Config],
        pools: Callable[[], Mapping[str, Pool]],
        probers: Callable[[], Sequence[Prober]],
        table: SharedTable,
        shared: SharedCounters,
        draining: Callable[[], bool],
        facts: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0),
    ) -> None:
        self.config = config
        self.pools = pools
        self.probers = probers
        self.table = table
        self.shared = shared
        self.draining = draining
        self.facts = facts  # workers alive, reloads applied, reloads refused: the supervisor's
        self.started_at = time.time()

    def snapshot(self) -> Snapshot:
        listeners = tuple(self._listener(listener) for listener in self.config().listeners)  # as reloaded
        pools = tuple(self._pool(pool) for pool in self.pools().values())
        alive, reloads, failed = self.facts()
        return Snapshot(
            listeners,
            pools,
            self.started_at,
            time.time(),
            self.draining(),
            self.shared.workers,
            workers_alive=alive,
            reloads=reloads,
            reloads_failed=failed,
            config_digest=config_digest(self.config()),
        )

    def _listener(self, config: ListenerConfig) -> ListenerView:
        index = self.shared.addresses.get(str(config.address))
        width = len(LISTENER_FIELDS)
        totals = [0] * width if index is None else self.shared.total(self.shared.listener(index), width)
        values = dict(zip(LISTENER_FIELDS, totals, strict=True))
        return ListenerView(
            name=config.name,
            address=str(config.address),
            pool=config.pool,
            accepted=values["accepted"],
            sessions=values["sessions"],
            active=values["active"],
            bytes_in=values["bytes_in"],
            bytes_out=values["bytes_out"],
            accept_pauses=values["accept_pauses"],
            durations=from_cells(DURATION_BOUNDS, [values[name] for name in _DURATIONS]),
            **edge_tables(
                config,
                {reason: values[reason] for reason in TLS_REASONS},
                {reason: values[f"refused_{reason}"] for reason in REFUSALS},
                {reason: values[f"header_{reason}"] for reason in HEADER_ERRORS},
            ),
        )

    def _pool(self, pool: Pool) -> PoolView:
        known = pool.name in self.shared.pools
        totals = self.shared.total(self.shared.pool(pool.name), len(POOL_FIELDS)) if known else [0] * len(POOL_FIELDS)
        retries, no_upstream, *queue = totals
        members = tuple(self._member(m, pool) for m in pool.members)
        return PoolView(pool.name, members, retries, no_upstream, QueueView(*queue))

    def _member(self, member: Member, pool: Pool) -> MemberView:
        active = sum(self.table.active[cell] for cell in self.table.column(member.slot))
        view = member_view(member, self.started_at, check_failures(self.probers(), pool, member), active=active)
        attempts, sessions, bytes_in, bytes_out, *rest = self.shared.total(
            self.shared.slot(member.slot), len(SLOT_FIELDS)
        )
        failed = dict(zip(CONNECT_KINDS, rest[: len(CONNECT_KINDS)], strict=True))
        connects = from_cells(CONNECT_BOUNDS, rest[len(CONNECT_KINDS) :])
        return dataclasses.replace(
            view,
            attempts=attempts,
            sessions=sessions,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            connect_failures=failed,
            connects=connects,
        )

    def set_admin(self, pool: str, member: str, action: str) -> MemberView:
        found, target = find_member(self.pools(), pool, member)
        found.set_admin(target, ADMIN_STATES[action])
        return self._member(target, found)
