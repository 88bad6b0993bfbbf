"""Least-connections choice among a pool's healthy members.

A member's load is its active sessions (counted from the start of the dial until the session closes)
divided by its weight. The pick takes the lowest load among members that are UP and not yet tried for
this client. Ties rotate: the scan starts one place after the previous pick, so idle members share new
sessions evenly instead of the first member taking every tie.

When no member is UP the pick returns None and the client is closed at once, as HAProxy does with all
servers down (no "panic mode" routing to unhealthy members).

A member is identified by its key (``member_keys``: its configured ``host:port``), not by its place in
the list, so ``update`` can change the members in place: members that stay keep their object, and with
it their health and session counts; removed ones leave the pick at once and are kept in ``draining``
while their sessions finish (a member added back before then is the same object again).

With ``--workers N`` the counts and statuses that matter are global: ``workers.py`` gives the balancer
a ``LoadView`` over shared memory, and the pick reads each member's load and status through it (sum of
every worker's count) at the member's ``slot``. ``acquire``/``release`` still keep ``Member.active``
(this process's sessions) and publish it to the view. Without a view (one process) the pick reads
``Member`` directly, as fast as before.

Pure: no sockets, no clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from typing import Protocol

from .config import Address, HealthConfig, Resolved
from .counters import READY, MemberCounters
from .health import HealthState, Status

UP = Status.UP


def member_keys(addresses: Sequence[Address]) -> list[str]:
    """Each member's identity: its configured ``host:port`` (``name@ip:port`` for an address discovery
    found); a repeated address gets ``#2``, ``#3``..."""
    seen: Counter[str] = Counter()
    keys = []
    for address in addresses:
        key = str(address)
        seen[key] += 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


class Member:
    """A pool member's live state: address, active session count, weight and health.

    ``index`` is its place in the pool's list (the pick's rotation), ``slot`` its place in the workers'
    shared table (-1 in one process); ``draining`` is set while it is out of the pool with sessions left.
    ``admin`` is the operator's state (``counters.DRAIN``/``DISABLED``, or READY ""): any but READY keeps
    new sessions away whatever the health. ``stats`` holds the counters metrics read.
    """

    __slots__ = (
        "active",
        "address",
        "admin",
        "draining",
        "health",
        "index",
        "key",
        "name",
        "slot",
        "stats",
        "total",
        "weight",
    )

    def __init__(self, address: Address, key: str, health: HealthConfig, weight: int = 1) -> None:
        self.address = address
        self.key = key
        self.name = str(address)
        self.index = 0
        self.slot = -1
        self.weight = weight
        self.active = 0
        self.total = 0
        self.draining = False
        self.health = HealthState(health.rise, health.fall)
        self.admin = READY
        self.stats = MemberCounters()

    @property
    def up(self) -> bool:
        return self.health.up

    @property
    def eligible(self) -> bool:
        """UP and not held by the operator: the pick may choose it."""
        return self.health.up and not self.admin

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


class Balancer:
    """The members of one pool and the least-connections pick."""

    def __init__(self, addresses: Sequence[Address], health: HealthConfig, view: LoadView | None = None) -> None:
        self.health = health
        self.members: list[Member] = []
        self.draining: dict[str, Member] = {}  # removed members whose sessions are not all over yet
        self.view = view
        self.allowed: frozenset[Member] | None = None  # see restrict
        self._next = 0
        self.update(addresses)

    def update(self, addresses: Sequence[Address]) -> tuple[list[Member], list[Member]]:
        """Make the members ``addresses``, matched by key; returns the (added, removed) members.

        A member that stays keeps its object (health, counts); a removed one leaves the pick and waits in
        ``draining`` until its sessions are over; a draining member added back is revived as it is."""
        for key in [k for k, m in self.draining.items() if m.active == 0]:
            del self.draining[key]
        current = {m.key: m for m in self.members}
        members: list[Member] = []
        added: list[Member] = []
        for key, address in zip(member_keys(addresses), addresses, strict=True):
            member = current.pop(key, None)
            if member is None:
                member = self.draining.pop(key, None) or Member(address, key, self.health)
                member.draining = False
                added.append(member)
            if isinstance(address, Resolved):  # an SRV record's weight, which may change
                member.weight = address.weight
            member.index = len(members)
            members.append(member)
        removed = list(current.values())
        for member in removed:
            member.draining = True
            if member.active:
                self.draining[member.key] = member
        self.members = members
        self._next %= len(members) or 1
        return added, removed

    def pick(self, tried: Collection[Member] = ()) -> Member | None:
        """The least-loaded UP member not in ``tried``; None when there is none."""
        members = self.members
        view = self.view
        count = len(members)
        best: Member | None = None
        best_load = 0.0
        start = self._next
        for offset in range(count):
            member = members[(start + offset) % count]
            if member in tried:
                continue
            if view is None:  # one process: this process's counts and health are the truth
                if member.health.status is not UP or member.admin:
                    continue
                load = member.active / member.weight
            else:  # several workers: every worker's count, status from the supervisor
                if not view.up(member.slot):  # the supervisor writes 0 for a member held by the operator too
                    continue
                load = view.active(member.slot) / member.weight
            if best is None or load < best_load:
                best, best_load = member, load
        if best is not None:
            self._next = (best.index + 1) % count
        return best

    def restrict(self, allowed: Collection[Member] | None) -> None:
        """From now on pick only among ``allowed`` (a primary pool's one primary, or none in a split brain);
        None lifts it. The restriction replaces ``pick`` on this balancer alone, so a pool without one
        pays nothing for it."""
        self.allowed = None if allowed is None else frozenset(allowed)
        if self.allowed is None:
            self.__dict__.pop("pick", None)
            return
        chosen = self.allowed
        unrestricted = Balancer.pick

        def pick(tried: Collection[Member] = ()) -> Member | None:
            return unrestricted(self, [*tried, *(m for m in self.members if m not in chosen)])

        self.pick = pick  # type: ignore[method-assign]

    def allows(self, member: Member) -> bool:
        """Whether the restriction (``restrict``), if any, leaves ``member`` to the pick."""
        return self.allowed is None or member in self.allowed

    def acquire(self, member: Member) -> None:
        """Count a session against ``member`` from the moment its dial starts."""
        member.active += 1
        member.total += 1
        if self.view is not None:
            self.view.publish(member.slot, member.active)

    def release(self, member: Member) -> None:
        member.active -= 1
        if self.view is not None:
            self.view.publish(member.slot, member.active)

    @property
    def any_up(self) -> bool:
        if self.view is not None:
            return any(self.view.up(m.slot) for m in self.members)
        return any(m.eligible for m in self.members)
