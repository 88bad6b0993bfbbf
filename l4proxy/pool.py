"""A pool at run time: its balancer, its settings, and one place that logs health and ejection changes.

Both the dialer (passive results) and the prober (active results) report through ``Pool.report``, so
each change of a member's status is logged exactly once, with the reason that caused it. The dialer's
successful connects report only when it could change something (``Pool.connect_ok``, which the dialer
inlines).

**Outlier ejection** (``outlier.py``; ``PoolConfig.eject_after`` and co.): real clients' failed
connects, and their sessions whose upstream reset before sending a byte (``reset_early``), feed the
pool's ``OutlierTable``, never the probes' rise/fall; ``eject_after`` in a row take the member out of
the pick for a time that grows with each ejection in a row. A served connect clears a streak of
connect failures, a session that got upstream bytes (``served``) clears any streak; a passing probe
ends an ejection early, and one timer per pool, at the table's
``next_deadline``, ends the others. Sessions already on an ejected member go on. Each ejection,
return and ejection held back by ``max_ejected_percent`` is logged once; ejections are counted.

**Slow start** (``PoolConfig.slow_start``): a member that comes back UP (probes, or the end of an
ejection) ramps from 10% of its weight and max_conns to all of them over that time (``slowstart.py``):
a timer raises its effective weight and cap in steps (a twentieth of the ramp, 50 ms to 1 s apart), so
the pick never reads a clock. The start and the end of each ramp are logged once. Members present at
start-up, or added by ``update``, get their full share at once.

``Pool.update`` changes the members in place, matched by key (``balancer.member_keys``): members that
stay keep their health state (and take their new weight, cap and role); added ones start UP and get
probes; removed ones get no new sessions, lose their probes, ejection timers and ramps, and keep their
sessions until those end. Host names in the list stay as they are until the pool's next resolution
(``resolver.py``) expands them into their addresses, each with its name's settings; the resolver applies
its answers through ``set_members``, whose ``check_first`` members (new addresses of a name) are DOWN
until their first probe passes, when health checks are on.

In a worker process (``--workers N``), ``forward`` is set: results go to the supervisor through shared
memory instead, and only the supervisor's pools decide and log status (see ``workers.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from .balancer import Balancer, Member
from .budget import BudgetPolicy, RetryBudget
from .config import Address, MemberConfig, PoolConfig
from .counters import DISABLED, DRAIN, READY
from .discovery import Target, unresolved_members
from .health import Event, Status
from .outlier import Change, OutlierTable, State, Verdict
from .outlier import Event as Outlier

log = logging.getLogger("l4proxy.health")

IN = State.IN
_EARLY = 0.001  # uvloop's timers count whole milliseconds and may fire up to one early
_PASSIVE = {
    Event.TRAFFIC_FAIL: Outlier.FAILURE,
    Event.TRAFFIC_OK: Outlier.SUCCESS,
    Event.TRAFFIC_RESET: Outlier.RESET,
    Event.TRAFFIC_SERVED: Outlier.SERVED,
    Event.EJECTION_OVER: Outlier.EXPIRE,
}
RESET_EARLY = "reset before the first byte"


class Probes(Protocol):
    """The active checks of a pool (``prober.Prober``), told when the members change."""

    def sync(self) -> None:
        """Probe exactly the pool's current members."""
        ...


class Waiting(Protocol):
    """A client's dial waiting in the pool's queue (``dialer.Dial``)."""

    queued_at: float  # loop time it joined the queue; 0 once it left (served, timed out, or gone)

    def resume(self, member: Member) -> None:
        """Dial ``member`` (taken and counted for it): the client's turn has come."""
        ...


QUEUE_POLL = 0.05  # seconds between looks for a free place while clients wait (freed in other workers)


class WaitQueue:
    """The clients of one pool that found every eligible member at its max_conns, or a primary pool
    with no primary (a failover: ``Pool.restrict`` serves them as soon as one claims the role), oldest
    first.

    A place freed in this process (a session's end) serves the oldest at once; while any wait, a look
    every ``QUEUE_POLL`` seconds finds the places that appear otherwise: sessions ended in other
    workers (the caps are global), a member back UP or added, a cap raised by a reload, a slow-start
    ramp's next step. A client that leaves while waiting is only marked (``queued_at`` 0) and passed
    over when its turn comes. Counters for metrics: ``full``, ``timeouts`` (for a place),
    ``no_primary`` (timed out waiting for a primary), ``served``, ``waited``."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.waiting: deque[Waiting] = deque()
        self.length = 0  # clients waiting now (``waiting`` may hold some that left)
        self.full = 0  # clients refused because the queue was full (--max-queue)
        self.timeouts = 0  # clients closed after --queue-timeout in the queue, waiting for a place
        self.no_primary = 0  # clients closed after --queue-timeout in the queue, waiting for a primary
        self.served = 0  # clients that got a member after waiting
        self.waited = 0.0  # seconds those served spent in the queue, in all
        self._poll: asyncio.TimerHandle | None = None

    def __bool__(self) -> bool:
        return self.length > 0

    def join(self, dial: Waiting) -> None:
        """``dial`` waits; the caller set its ``queued_at`` and its timeout."""
        self.waiting.append(dial)
        self.length += 1
        self._schedule()

    def leave(self, dial: Waiting) -> None:
        """``dial`` stops waiting without a member (its client left, or its time is up)."""
        if dial.queued_at:
            dial.queued_at = 0.0
            self.length -= 1

    def serve(self) -> None:
        """Give the free places to the waiting clients, oldest first."""
        waiting, balancer = self.waiting, self.pool.balancer
        while waiting:
            dial = waiting[0]
            if not dial.queued_at:  # gone meanwhile
                waiting.popleft()
                continue
            member = balancer.take(())
            if member is None:
                break
            waiting.popleft()
            self.length -= 1
            self.served += 1
            self.waited += asyncio.get_running_loop().time() - dial.queued_at
            dial.queued_at = 0.0
            dial.resume(member)
        self._schedule()

    def _schedule(self) -> None:
        if self.length and self._poll is None:
            self._poll = asyncio.get_running_loop().call_later(QUEUE_POLL, self._look)
        elif not self.length:
            self.waiting.clear()

    def _look(self) -> None:
        self._poll = None
        self.serve()

    def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None


class Pool:
    """Run-time state of one ``PoolConfig``."""

    def __init__(self, config: PoolConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.name = config.name
        self.balancer = Balancer(
            unresolved_members(config.members),
            config.health,
            slow_start=config.slow_start,
            panic_threshold=config.panic_threshold,
        )
        self.ssl_context = ssl_context
        self.no_upstream = 0  # clients closed because no member could be reached
        self.budget = RetryBudget(BudgetPolicy(config.retry_budget))  # retries in flight, per process
        self.retry_refused = 0  # clients closed because the retry budget refused their retry
        self.retries = 0  # connect attempts after a client's first
        self.timed = False  # connects are timed for the member's histogram (Proxy.time_sessions)
        self.queue = WaitQueue(self)  # clients waiting for a member below its max_conns (per process)
        self.outliers = OutlierTable(config.outlier)
        for member in self.members:
            member.outlier = self.outliers.add(member.key)
        self._ejections: asyncio.TimerHandle | None = None  # at the earliest end of an ejection
        self._ramps: dict[Member, asyncio.TimerHandle] = {}  # the next step of each slow-start ramp
        self.forward: Callable[[Member, Event, str], None] | None = None  # health decided elsewhere
        self.probes: Probes | None = None  # set by a running prober
        self.leaving: Callable[[Pool, list[Member]], None] | None = None  # told of members removed or drained
        self.on_down: Callable[[Pool, Member, str], None] | None = None  # closes a member's sessions (and why)

    @property
    def members(self) -> list[Member]:
        return self.balancer.members

    def update(self, members: Sequence[MemberConfig | Target]) -> tuple[list[Member], list[Member]]:
        """Change the configured members to ``members`` (a bare address or name is a member with the
        defaults); returns the (added, removed) ones. Raises ConfigError (and changes nothing) when the
        list is not a valid pool."""
        config = dataclasses.replace(self.config, members=tuple(members))  # type: ignore[arg-type]
        changes = self.set_members(unresolved_members(config.members))
        self.config = config
        return changes

    def retune(self, config: PoolConfig, members: bool = True) -> tuple[list[Member], list[Member]]:
        """Take ``config``'s settings (a reload): the members' rise and fall follow its health settings,
        and, with ``members`` (the reload changed them), its member list goes through ``update``, which
        drops the addresses discovery found until the next lookup (a worker's members come from the
        supervisor instead). Returns the (added, removed) members."""
        self.balancer.health = config.health
        self.balancer.slow_start, self.balancer.panic_threshold = config.slow_start, config.panic_threshold
        self.budget.percent = config.retry_budget
        self.outliers.policy = config.outlier  # ejections under way keep their end
        for member in [*self.members, *self.balancer.draining.values()]:
            member.health.rise, member.health.fall = config.health.rise, config.health.fall
        self.config = dataclasses.replace(config, members=self.config.members)
        return self.update(config.members) if members else ([], [])

    def set_members(
        self, members: Sequence[MemberConfig | Address], check_first: Collection[str] = ()
    ) -> tuple[list[Member], list[Member]]:
        """Make ``members`` the live members (the configured ones stay as they are); added members whose
        key is in ``check_first`` get no sessions until a probe passes. Returns the (added, removed)."""
        added, removed = self.balancer.update(members)
        if self.config.health.enabled and self.forward is None:
            for member in added:
                if member.key in check_first:
                    member.health.await_probe("a new address, not probed yet")
        for member in removed:
            self.outliers.remove(member.key)  # an ejected one frees its place under max_ejected_percent
            timer = self._ramps.pop(member, None)
            if timer is not None:
                timer.cancel()
        for member in added:  # new, or back from draining: in, with no history
            member.outlier = self.outliers.add(member.key)
        if self.probes is not None:
            self.probes.sync()
        if removed and self.leaving is not None:
            self.leaving(self, removed)
        if (added or removed) and self.forward is None:  # a worker's pool follows the supervisor's, which logs
            log.info(
                "pool %s updated: added %s; removed %s; %d in all",
                self.name,
                ", ".join(m.name + ("" if m.health.up else " (waits for a probe)") for m in added) or "none",
                ", ".join(m.name for m in removed) or "none",
                len(self.members),
            )
        return added, removed

    def connect_ok(self, member: Member) -> None:
        """A client's connect to ``member`` succeeded: report it only when it could change something
        (a failure streak to clear, or results forwarded to the supervisor)."""
        if member.outlier.streak or self.forward is not None:
            self.report(member, Event.TRAFFIC_OK)

    def reset_early(self, member: Member) -> None:
        """A client's session on ``member`` ended with the upstream's reset before any upstream byte: a
        local-origin failure (the member accepts and resets, as an overloaded server does)."""
        self.report(member, Event.TRAFFIC_RESET, RESET_EARLY)

    def served(self, member: Member) -> None:
        """A client's session on ``member`` got upstream bytes; called only while its streak is not 0,
        which a connect alone does not clear once it holds a reset (``outlier.py``)."""
        self.report(member, Event.TRAFFIC_SERVED)

    def report(self, member: Member, event: Event, reason: str = "") -> None:
        """Feed a result to the member's health (probes) or ejection state (clients' connects, the
        ejection timer); log the change, if any."""
        if self.forward is not None:
            self.forward(member, event, reason)
            return
        if member.draining:  # a dial or probe that was in flight when the member was removed
            return
        passive = _PASSIVE.get(event)
        if passive is not None:
            self._observe(member, passive, reason)
            return
        if event is Event.PROBE_OK and member.outlier.state is not IN:
            self._observe(member, Outlier.PROBE_OK, "")  # "active check passed"
        change = member.health.observe(event, reason)
        if change is None:
            return
        member.stats.changed(change.reason, time.time())
        self.status_changed(member)  # before the log line: nothing may act on an older state than it says
        if change.new is Status.DOWN:
            log.warning("pool %s member %s is DOWN: %s", self.name, member.name, change.reason)
            self._stop_ramp(member)
            if self.on_down is not None and self.config.on_member_down == "close":
                self.on_down(self, member, "is DOWN")
        else:
            log.info("pool %s member %s is UP: %s", self.name, member.name, change.reason)
            if self.config.slow_start and member.outlier.state is IN:
                self._start_ramp(member)

    # outlier ejection

    def _observe(self, member: Member, event: Outlier, reason: str) -> None:
        now = asyncio.get_running_loop().time()
        if event is Outlier.EXPIRE:  # sent only once due (``_expire``), whatever a millisecond clock says now
            now = max(now, member.outlier.until)
        change = self.outliers.observe(member.outlier, event, now, reason)
        if change is not None:
            self._ejection_changed(member, change)

    def _ejection_changed(self, member: Member, change: Change) -> None:
        """Log ``change`` once, count an ejection, and keep the timer at the earliest end of one."""
        self.status_changed(member)
        where = f"pool {self.name} member {member.name}"
        policy = self.outliers.policy
        failures = f"{policy.eject_after} failure{'s' * (policy.eject_after != 1)} in a row"
        if change.verdict is Verdict.EJECTED:
            seconds = policy.duration(change.ejections)
            nth = "" if change.ejections == 1 else f", ejection {change.ejections} in a row"
            why = f"ejected for {seconds:g}s after {failures}{nth}: {change.reason}"
            member.stats.ejections += 1
            member.stats.changed(why, time.time())
            log.warning("%s %s", where, why)
            self._stop_ramp(member)
        elif change.verdict is Verdict.RETURNED:
            member.stats.changed(f"back from ejection: {change.reason}", time.time())
            log.info("%s back from ejection: %s", where, change.reason)
            if self.config.slow_start and member.health.up:
                self._start_ramp(member)
        else:
            log.warning("%s held in after %s: %s", where, failures, change.reason)  # the reason names the cap
        self._arm()

    def _arm(self) -> None:
        deadline = self.outliers.next_deadline()
        timer = self._ejections
        if timer is not None and deadline is not None and timer.when() == deadline:
            return
        if timer is not None:
            timer.cancel()
        self._ejections = None if deadline is None else asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        """The earliest ejection's end has come: end every ejection due (through ``report``, so the
        supervisor publishes the change to the workers)."""
        self._ejections = None
        now = asyncio.get_running_loop().time() + _EARLY
        for member in self.members:
            if member.outlier.state is not IN and member.outlier.until <= now:
                self.report(member, Event.EJECTION_OVER)
        self._arm()

    # slow start

    def _start_ramp(self, member: Member) -> None:
        loop = asyncio.get_running_loop()
        member.slow.restart(loop.time())
        self._ramp(member)
        cap = f", max_conns {member.limit} of {member.config.max_conns}" if member.config.max_conns else ""
        log.info(
            "pool %s member %s slow start: weight %d of %d%s, full in %gs",
            self.name, member.name, member.weight, member.config.weight, cap, self.config.slow_start,
        )  # fmt: skip

    def _ramp(self, member: Member) -> None:
        """One step of ``member``'s ramp: its share now, and the timer of the next step."""
        self._ramps.pop(member, None)
        loop = asyncio.get_running_loop()
        now = loop.time()
        member.scale(member.slow.fraction(now))
        self.scaled(member)
        end = member.slow.ends()
        if end is None:
            cap = f", max_conns {member.limit}" if member.config.max_conns else ""
            log.info("pool %s member %s slow start over: full weight %d%s", self.name, member.name, member.weight, cap)
            return
        step = min(1.0, max(0.05, self.config.slow_start / 20))
        self._ramps[member] = loop.call_at(min(now + step, end), self._ramp, member)

    def _stop_ramp(self, member: Member) -> None:
        timer = self._ramps.pop(member, None)
        if timer is not None:
            timer.cancel()
            member.scale(1.0)  # a ramp starts afresh when it is back
            self.scaled(member)

    def status_changed(self, member: Member) -> None:
        """``member``'s health or ejection just changed, before it is logged (the supervisor's pool
        publishes it to the workers here, so none acts on an older state than the log says)."""

    def scaled(self, member: Member) -> None:
        """``member``'s effective share changed (the supervisor's pool publishes it to the workers)."""

    def set_admin(self, member: Member, state: str) -> None:
        """The operator's state for ``member`` (admin API): DRAIN takes no new sessions and keeps its
        checks; DISABLED takes none and is not probed either; READY is back to what health says."""
        if member.admin == state:
            return
        member.admin = state
        word = {READY: "enabled", DRAIN: "draining", DISABLED: "disabled"}[state]
        member.stats.changed(f"{word} by the operator", time.time())
        log.info("pool %s member %s %s by the operator", self.name, member.name, word)
        if state == DRAIN and self.leaving is not None:
            self.leaving(self, [member])

    def restrict(self, allowed: Collection[Member] | None, split: bool = False) -> None:
        """New sessions go only to ``allowed`` (None: to any eligible member; none in a split brain,
        ``split``); see ``Balancer.restrict``. A primary found serves the clients that wait for one."""
        self.balancer.restrict(allowed, split)
        if allowed and self.queue:
            self.queue.serve()

    def close(self) -> None:
        """Cancel pending ejection and ramp timers (the proxy is stopping)."""
        self.queue.close()
        if self._ejections is not None:
            self._ejections.cancel()
            self._ejections = None
        for timer in self._ramps.values():
            timer.cancel()
        self._ramps.clear()
