"""Least-connections choice among a pool's healthy members.

A member's load is its active sessions (counted from the start of the dial until the session closes)
divided by its weight. The pick takes the lowest load among members that are UP and not yet tried for
this client. Ties rotate: the scan starts one place after the previous pick, so idle members share new
sessions evenly instead of the first member taking every tie.

When no member is UP the pick returns None and the client is closed at once, as HAProxy does with all
servers down (no "panic mode" routing to unhealthy members).

With ``--workers N`` the counts and statuses that matter are global: ``workers.py`` gives the balancer
a ``LoadView`` over shared memory, and the pick reads each member's load and status through it (sum of
every worker's count). ``acquire``/``release`` still keep ``Member.active`` (this process's sessions)
and publish it to the view. Without a view (one process) the pick reads ``Member`` directly, as fast as
before.

Pure: no sockets, no clock.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from .config import Address, HealthConfig
from .health import Change, Event, HealthState, Status

UP = Status.UP


class Member:
    """A pool member's live state: address, active session count, weight and health."""

    __slots__ = ("active", "address", "health", "index", "name", "total", "weight")

    def __init__(self, address: Address, index: int, health: HealthConfig, weight: int = 1) -> None:
        self.address = address
        self.name = str(address)
        self.index = index
        self.weight = weight
        self.active = 0
        self.total = 0
        self.health = HealthState(health.rise, health.fall)

    @property
    def up(self) -> bool:
        return self.health.up

    def __repr__(self) -> str:
        return f"<Member {self.name} active={self.active} {self.health.status.value}>"


class LoadView(Protocol):
    """Members' load and status as seen across processes (``workers.SharedTable``), by member index."""

    def active(self, index: int) -> int:
        """Sessions on member ``index`` in every process."""
        ...

    def up(self, index: int) -> bool:
        """Whether member ``index`` is UP (decided by the one process that runs health checks)."""
        ...

    def publish(self, index: int, active: int) -> None:
        """This process now has ``active`` sessions on member ``index``."""
        ...


class Balancer:
    """The members of one pool and the least-connections pick."""

    def __init__(self, addresses: Sequence[Address], health: HealthConfig, view: LoadView | None = None) -> None:
        self.members = [Member(a, i, health) for i, a in enumerate(addresses)]
        self.view = view
        self._next = 0

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
                if member.health.status is not UP:
                    continue
                load = member.active / member.weight
            else:  # several workers: every worker's count, status from the supervisor
                if not view.up(member.index):
                    continue
                load = view.active(member.index) / member.weight
            if best is None or load < best_load:
                best, best_load = member, load
        if best is not None:
            self._next = (best.index + 1) % count
        return best

    def acquire(self, member: Member) -> None:
        """Count a session against ``member`` from the moment its dial starts."""
        member.active += 1
        member.total += 1
        if self.view is not None:
            self.view.publish(member.index, member.active)

    def release(self, member: Member) -> None:
        member.active -= 1
        if self.view is not None:
            self.view.publish(member.index, member.active)

    def report(self, member: Member, event: Event, reason: str = "") -> Change | None:
        """Feed one active or passive result into the member's health state."""
        return member.health.observe(event, reason)

    @property
    def any_up(self) -> bool:
        if self.view is not None:
            return any(self.view.up(m.index) for m in self.members)
        return any(m.health.up for m in self.members)
