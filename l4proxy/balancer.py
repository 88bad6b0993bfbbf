"""Weighted least-connections among a pool's eligible members, with caps and backups.

The pick takes the member with the lowest ``(active + 1) / weight`` (HAProxy's weighted leastconn: the
load the member would have with this session, per unit of weight), compared by integer
cross-multiplication, never floats. Eligible means UP, not ejected (``outlier.py``: the pool decides,
the pick reads the state), not yet tried for this client, and below its ``max_conns``. Ties rotate:
the scan starts one place after the previous pick, so idle members share new sessions evenly instead
of the first member taking every tie.

Backups (``MemberConfig.backup``) are picked only while no other member is eligible, and then share
the load among themselves by the same weighted least-connections, with their own rotation. A retry
whose client has tried every other member therefore goes to a backup before it reuses a member.

When no member is eligible the pick returns None and the client is closed at once, as HAProxy does
with all servers down. **Panic mode** is off by default: with ``panic_threshold`` P, while fewer than
P percent of the members are UP and not ejected, ``take`` ignores health and ejections (Envoy's panic
threshold), on the bet that the checks are wrong rather than most members down. Off by default
because l4proxy fronts databases: sending writes to a member believed down (a demoted primary) is worse
than refusing them.

A member is identified by its key (``member_keys``: its configured ``host:port``), not by its place in
the list, so ``update`` can change the members in place: members that stay keep their object, and with
it their health and session counts (and take their new weight, cap and role); removed ones leave the
pick at once and are kept in ``draining`` while their sessions finish (a member added back before then
is the same object again).

**Slow start.** ``Member.weight`` and ``Member.limit`` are the *effective* weight and cap the pick reads:
the configured ones, or during a ramp (``slowstart.py``) a share of them that the pool raises in steps
through ``scale``. The pick itself never reads a clock, so slow start costs nothing when it is off.

With ``--workers N`` the counts and statuses that matter are global: ``workers.py`` gives the balancer
a ``LoadView`` over shared memory, and the pick reads each member's load and status through it (sum of
every worker's count) at the member's ``slot``. ``acquire``/``release`` still keep ``Member.active``
(this process's sessions) and publish it to the view. A capped member is taken through
``LoadView.reserve``, which checks the global count and counts the session in one atomic step, so
concurrent connects in several workers never push a member past its cap. Without a view (one process)
the pick reads ``Member`` directly, as fast as before.

Pure: no sockets, no clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from typing import Protocol

from .config import Address, HealthConfig, MemberConfig, Resolved, Service, as_member
from .counters import READY, MemberCounters
from .errors import ConfigError
from .health import HealthState, Status
from .outlier import MemberOutlier, State
from .slowstart import SlowStart, scaled

UP = Status.UP
IN, OUT = State.IN, State.OUT
UNLIMITED = 1 << 62  # the effective cap of a member without max_conns: no count reaches it


def member_keys(addresses: Sequence[Address | Service]) -> list[str]:
    """Each member's identity: its configured ``host:port`` (``name@ip:port`` for an address discovery
    found); a repeated address gets ``#2``, ``#3``..."""
    seen: Counter[str] = Counter()
    keys = []
    for address in addresses:
        key = str(address)
        seen[key] += 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


AT_CAP = "every healthy upstream is at its max_conns"  # shortage(): why a first pick found no member
NO_HEALTHY = "no healthy upstream"
NO_PRIMARY = "no member claims the primary role"  # a primary pool before a primary, or during a failover
SPLIT_BRAIN = "several members claim the primary role"  # a primary pool in a split brain: refused at once

class Member:
    """A pool member's live state: address, active session count, effective weight and cap, and health.

    ``config`` holds its configured weight, max_conns and role, ``full`` its whole weight (the configured
    one times an SRV record's); ``weight`` and ``limit`` are what the pick uses now (``share`` of the full
    ones during a slow-start ramp). ``index`` is its place in the pool's list, ``turn`` its place among
    the primaries or the backups (the pick's rotation), ``slot`` its place in the workers' shared table
    (-1 in one process); ``draining`` is set while it is out of the pool with sessions left.
    ``admin`` is the operator's state (``counters.DRAIN``/``DISABLED``, or READY ""): any but READY keeps
    new sessions away whatever the health. ``stats`` holds the counters metrics read.
    """

    __slots__ = (
        "active", "address", "admin", "backup", "config", "draining", "full", "health", "index", "key", "limit",
        "name", "outlier", "share", "slot", "slow", "stats", "total", "turn", "weight",
    )  # fmt: skip

    def __init__(self, config: MemberConfig, key: str, health: HealthConfig, slow_start: float = 0.0) -> None:
        self.key = key
        self.name = str(config.address)
        self.index = self.turn = 0
        self.slot = -1
        self.active = 0
        self.total = 0
        self.draining = False
        self.health = HealthState(health.rise, health.fall)
        self.outlier = MemberOutlier(key)  # its pool's OutlierTable replaces it with the one it tracks
        self.admin = READY
        self.stats = MemberCounters()
        self.slow = SlowStart(slow_start)
        self.share = 1.0
        self.configure(config)

    def configure(self, config: MemberConfig) -> None:
        """Take ``config``'s weight, cap and role (at the current ``share``); an address found by discovery
        multiplies in its SRV record's weight (1 for an A/AAAA answer)."""
        address = config.address
        if not isinstance(address, Address):
            raise ConfigError("address", str(address), "an SRV name has no member until it is resolved")
        self.config = config
        self.address = address
        self.backup = config.backup
        self.full = config.weight * address.weight if isinstance(address, Resolved) else config.weight
        self.scale(self.share)

    def scale(self, share: float) -> None:
        """Make the effective weight and cap ``share`` (0.1..1.0) of the configured ones."""
        self.share = share
        config = self.config
        self.weight = self.full if share >= 1.0 else scaled(self.full, share)
        if config.max_conns is None:
            self.limit = UNLIMITED
        else:
            self.limit = config.max_conns if share >= 1.0 else scaled(config.max_conns, share)

    @property
    def up(self) -> bool:
        return self.health.up

    @property
    def ejected(self) -> bool:
        """Taken out of the pick by outlier ejection (``outlier.py``) for now."""
        return self.outlier.state is OUT

    @property
    def eligible(self) -> bool:
        """UP, not ejected and not held by the operator: the pick may choose it."""
        return self.health.up and self.outlier.state is IN and not self.admin

    def __repr__(self) -> str:
        return f"<Member {self.name} active={self.active} {self.health.status.value}>"


class LoadView(Protocol):
    """Members' load and status as seen across processes (``workers.SharedTable``), by member slot."""

    def active(self, slot: int) -> int:
        """Sessions on the member in ``slot`` in every process."""
        ...

    def up(self, slot: int) -> bool:
        """Whether the member in ``slot`` is UP (decided by the one process that runs health checks)."""
        ...

    def publish(self, slot: int, active: int) -> None:
        """This process now has ``active`` sessions on the member in ``slot``."""
        ...

    def reserve(self, slot: int, limit: int, active: int) -> bool:
        """Atomically across processes: when fewer than ``limit`` sessions are on the member in ``slot``,
        publish ``active`` (this process's count with the new session) and return True."""
        ...

    def restriction(self, slots: Iterable[int]) -> tuple[bool, bool]:
        """A primary pool's routing as the process that runs the checks decides it now: whether it leaves
        any of the members in ``slots`` to new sessions (or none is restricted), and whether it routes
        to none because of a split brain."""
        ...


class _Group:
    """The primaries or the backups of a pool, in order, and where the next scan starts."""

    __slots__ = ("members", "next")

    def __init__(self, members: list[Member]) -> None:
        self.members = members
        for turn, member in enumerate(members):
            member.turn = turn
        self.next = 0


class Balancer:
    """The members of one pool and the weighted least-connections pick."""

    def __init__(
        self,
        members: Sequence[MemberConfig | Address],
        health: HealthConfig,
        view: LoadView | None = None,
        slow_start: float = 0.0,
        panic_threshold: int = 0,
    ) -> None:
        self.health = health
        self.slow_start = slow_start
        self.members: list[Member] = []
        self.draining: dict[str, Member] = {}  # removed members whose sessions are not all over yet
        self.view = view
        self.allowed: frozenset[Member] | None = None  # see restrict
        self.split = False  # ``allowed`` is empty because several members claim the primary role
        self.panic_threshold = panic_threshold  # percent; 0: off
        self.panics = 0  # members taken while panicking, health ignored
        self._primaries = self._backups = _Group([])
        self.update(members)

    def update(self, members: Sequence[MemberConfig | Address]) -> tuple[list[Member], list[Member]]:
        """Make the members ``members``, matched by key; returns the (added, removed) members.

        A member that stays keeps its object (health, counts) and takes its new settings; a removed one
        leaves the pick and waits in ``draining`` until its sessions are over; a draining member added
        back is revived as it is."""
        configs = [as_member(m) for m in members]
        for key in [k for k, m in self.draining.items() if m.active == 0]:
            del self.draining[key]
        current = {m.key: m for m in self.members}
        new: list[Member] = []
        added: list[Member] = []
        for key, config in zip(member_keys([c.address for c in configs]), configs, strict=True):
            member = current.pop(key, None) or self.draining.pop(key, None)
            if member is None:
                member = Member(config, key, self.health, self.slow_start)
                added.append(member)
            elif member.draining:
                member.draining = False
                added.append(member)
            if member.config != config:  # new settings, or a new SRV weight
                member.configure(config)
            member.index = len(new)
            new.append(member)
        removed = list(current.values())
        for member in removed:
            member.draining = True
            if member.active:
                self.draining[member.key] = member
        self.members = new
        primaries, backups = self._primaries, self._backups
        self._primaries = _Group([m for m in new if not m.backup])
        self._backups = _Group([m for m in new if m.backup])
        self._primaries.next = primaries.next % (len(self._primaries.members) or 1)
        self._backups.next = backups.next % (len(self._backups.members) or 1)
        return added, removed

    def pick(self, tried: Collection[Member] = ()) -> Member | None:
        """The eligible member with the lowest ``(active + 1) / weight``, a backup only when no primary
        is eligible; None when there is none."""
        best = self._scan(self._primaries, tried)
        if best is None and self._backups.members:
            best = self._scan(self._backups, tried)
        return best

    def _scan(self, group: _Group, tried: Collection[Member], healthy: bool = True) -> Member | None:
        members = group.members
        view = self.view
        count = len(members)
        best: Member | None = None
        best_load = best_weight = 0
        start = group.next
        for offset in range(count):
            member = members[(start + offset) % count]
            if member in tried:
                continue
            if view is None:  # one process: this process's counts, health and ejections are the truth
                if member.admin:  # panic ignores health and ejections, never the operator
                    continue
                if healthy and (member.health.status is not UP or member.outlier.state is not IN):
                    continue
                active = member.active
            else:  # several workers: every worker's count, status from the supervisor
                if healthy and not view.up(member.slot):  # the supervisor writes 0 for an operator's hold too
                    continue
                active = view.active(member.slot)
            if active >= member.limit:
                continue
            # (active + 1) / weight < best_load / best_weight, without division (weights are >= 1)
            if best is None or (active + 1) * best_weight < best_load * member.weight:
                best, best_load, best_weight = member, active + 1, member.weight
        if best is not None:
            group.next = (best.turn + 1) % count
        return best

    def restrict(self, allowed: Collection[Member] | None, split: bool = False) -> None:
        """From now on pick only among ``allowed`` (a primary pool's one primary, or none: before a
        primary, or in a split brain, ``split``); None lifts it. The restriction replaces ``pick`` and
        ``take`` on this balancer alone, so a pool without one pays nothing for it. Lifting one that is
        not there touches nothing: reading the instance's ``__dict__`` (or a failed ``del``) would turn its
        attributes into a real dict, and every attribute read on the balancer, per dial, into a dict
        lookup (Python 3.11)."""
        was = self.allowed
        self.allowed = None if allowed is None else frozenset(allowed)
        self.split = split and not self.allowed
        if self.allowed is None:
            if was is not None:
                del self.pick, self.take
            return
        chosen = self.allowed
        unrestricted = Balancer.pick

        def pick(tried: Collection[Member] = ()) -> Member | None:
            return unrestricted(self, [*tried, *(m for m in self.members if m not in chosen)])

        def take(tried: Sequence[Member] = ()) -> Member | None:  # its one primary, or none
            return self._take(tried, [])

        self.pick = pick  # type: ignore[method-assign]
        self.take = take  # type: ignore[method-assign]

    def allows(self, member: Member) -> bool:
        """Whether the restriction (``restrict``), if any, leaves ``member`` to the pick."""
        return self.allowed is None or member in self.allowed

    def take(self, tried: Sequence[Member] = ()) -> Member | None:
        """Pick a member for a new attempt and count the session on it; None when there is none.

        The member is the best one not in ``tried``, or, once every eligible member has been tried for
        this client, the best of them again (a one-member pool retries its member). With workers, a
        capped member is reserved atomically; one that another worker filled meanwhile is passed over.
        The common case (a primary without a cap across workers) is one scan and the count: this runs
        per dial. A primary pool's restriction replaces it (``restrict``), so others do not test for one."""
        if self.panic_threshold and self.panicking():
            return self._take_in_panic(tried)
        member = self._scan(self._primaries, tried)
        if member is None:
            return self._take(tried, [])
        view = self.view
        if view is not None:
            if member.limit >= UNLIMITED:
                view.publish(member.slot, member.active + 1)
            elif not view.reserve(member.slot, member.limit, member.active + 1):
                return self._take(tried, [member])  # another worker took the last place meanwhile
        member.active += 1  # acquire, inlined
        member.total += 1
        return member

    def _take(self, tried: Sequence[Member], full: list[Member]) -> Member | None:
        """``take`` beyond the common case: backups, members tried again, and capped members that other
        workers filled (``full``) passed over."""
        view = self.view
        while True:
            member = self.pick([*tried, *full] if full else tried)
            if member is None and tried:
                member = self.pick(full)
            if member is None:
                return None
            if view is None or member.limit >= UNLIMITED or view.reserve(member.slot, member.limit, member.active + 1):
                self.acquire(member)
                return member
            full.append(member)

    def panicking(self) -> bool:
        """Whether fewer than ``panic_threshold`` percent of the members are UP and in (Envoy's panic mode)."""
        members = self.members
        if self.view is None:
            up = sum(1 for m in members if m.health.status is UP and m.outlier.state is IN)
        else:
            view = self.view
            up = sum(1 for m in members if view.up(m.slot))
        return up * 100 < self.panic_threshold * len(members)

    def _take_in_panic(self, tried: Sequence[Member]) -> Member | None:
        """``take`` with health ignored: every member below its cap is eligible, primaries first."""
        for avoid in (tried, ()):
            for group in (self._primaries, self._backups):
                member = self._scan(group, avoid, healthy=False)
                if member is None:
                    continue
                view = self.view
                if view is not None and member.limit < UNLIMITED:
                    if not view.reserve(member.slot, member.limit, member.active + 1):
                        continue  # another worker took its last place
                    member.active += 1
                    member.total += 1
                else:
                    self.acquire(member)
                self.panics += 1
                return member
        return None

    def acquire(self, member: Member) -> None:
        """Count a session against ``member`` from the moment its dial starts."""
        member.active += 1
        member.total += 1
        if self.view is not None:
            self.view.publish(member.slot, member.active)

    def release(self, member: Member) -> None:
        """A session counted on ``member`` is over (a session's end inlines this: ``frontend.py``)."""
        member.active -= 1
        if self.view is not None:
            self.view.publish(member.slot, member.active)

    def shortage(self) -> str:
        """Why a first pick found no member: none is UP (``NO_HEALTHY``), or those UP are all at their
        max_conns (``AT_CAP``: the client may wait in the pool's queue), or a primary pool has no member
        it may route to: none claims the role (``NO_PRIMARY``: the client may wait for one, as for a
        place), or several do (``SPLIT_BRAIN``: fail closed at once, never queued)."""
        if self.view is not None:
            # with workers: as the supervisor publishes it now (``table.py``), even before this worker's
            # balancer has followed it, so a client never gets an older state than the supervisor logged
            routed, split = self.view.restriction([m.slot for m in self.members])
        else:
            routed, split = self.allowed is None or bool(self.allowed), self.split
        if not routed:
            return SPLIT_BRAIN if split else NO_PRIMARY
        return AT_CAP if self.any_up else NO_HEALTHY

    def routable(self, member: Member) -> bool:
        """Whether new sessions may go to ``member`` now: UP and not restricted out (with workers, as
        the supervisor publishes it)."""
        if self.view is not None:
            return bool(self.view.up(member.slot))
        return member.eligible and self.allows(member)

    @property
    def any_up(self) -> bool:
        if self.view is not None:
            return any(self.view.up(m.slot) for m in self.members)
        return any(m.eligible for m in self.members)
