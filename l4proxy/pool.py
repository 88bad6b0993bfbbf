"""A pool at run time: its balancer, its settings, and one place that logs health changes.

Both the dialer (passive results) and the prober (active results) report through ``Pool.report``, so
each change of a member's status is logged exactly once, with the reason that caused it. The dialer's
successful connects go through ``Pool.connect_ok``, which skips the report when it would change nothing.

``Pool.update`` changes the members in place, matched by key (``balancer.member_keys``): members that
stay keep their health state; added ones start UP and get probes; removed ones get no new sessions,
lose their probes and ejection timers, and keep their sessions until those end. Host names in the list
stay as they are until the pool's next resolution (``resolver.py``) expands them into their addresses;
the resolver applies its answers through ``set_members``, whose ``check_first`` members (new addresses
of a name) are DOWN until their first probe passes, when health checks are on.

In a worker process (``--workers N``), ``forward`` is set: results go to the supervisor through shared
memory instead, and only the supervisor's pools decide and log status (see ``workers.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from .balancer import Balancer, Member
from .config import Address, PoolConfig
from .counters import DISABLED, DRAIN, READY
from .discovery import Target, unresolved
from .health import Event, Status

log = logging.getLogger("l4proxy.health")

UP = Status.UP


class Probes(Protocol):
    """The active checks of a pool (``prober.Prober``), told when the members change."""

    def sync(self) -> None:
        """Probe exactly the pool's current members."""
        ...


class Pool:
    """Run-time state of one ``PoolConfig``."""

    def __init__(self, config: PoolConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.name = config.name
        self.balancer = Balancer(unresolved(config.members), config.health)
        self.ssl_context = ssl_context
        self.no_upstream = 0  # clients closed because no member could be reached
        self.retries = 0  # connect attempts after a client's first
        self._ejections: dict[Member, asyncio.TimerHandle] = {}
        self.forward: Callable[[Member, Event, str], None] | None = None  # health decided elsewhere
        self.probes: Probes | None = None  # set by a running prober
        self.leaving: Callable[[Pool, list[Member]], None] | None = None  # told of members removed or drained

    @property
    def members(self) -> list[Member]:
        return self.balancer.members

    def update(self, members: Sequence[Target]) -> tuple[list[Member], list[Member]]:
        """Change the configured members to ``members``; returns the (added, removed) ones. Raises
        ConfigError (and changes nothing) when the list is not a valid pool."""
        config = dataclasses.replace(self.config, members=tuple(members))
        changes = self.set_members(unresolved(members))
        self.config = config
        return changes

    def retune(self, config: PoolConfig, members: bool = True) -> tuple[list[Member], list[Member]]:
        """Take ``config``'s settings (a reload): the members' rise and fall follow its health settings,
        and, with ``members``, its member list goes through ``update`` (a worker's members come from the
        supervisor instead). Returns the (added, removed) members."""
        self.balancer.health = config.health
        for member in [*self.members, *self.balancer.draining.values()]:
            member.health.rise, member.health.fall = config.health.rise, config.health.fall
        self.config = dataclasses.replace(config, members=self.config.members)
        return self.update(config.members) if members else ([], [])

    def set_members(
        self, members: Sequence[Address], check_first: Collection[str] = ()
    ) -> tuple[list[Member], list[Member]]:
        """Make ``members`` the live members (the configured ones stay as they are); added members whose
        key is in ``check_first`` get no sessions until a probe passes. Returns the (added, removed)."""
        added, removed = self.balancer.update(members)
        if self.config.health.enabled and self.forward is None:
            for member in added:
                if member.key in check_first:
                    member.health.await_probe("a new address, not probed yet")
        for member in removed:
            timer = self._ejections.pop(member, None)
            if timer is not None:
                timer.cancel()
        for member in added:  # a DOWN member added back while it drained: its ejection starts again
            if not member.health.up and self.forward is None and not self.config.health.enabled:
                self._eject(member)
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
        (a failure streak to clear, a status to decide, or results forwarded to the supervisor)."""
        health = member.health
        if health.streak or health.status is not UP or self.forward is not None:
            self.report(member, Event.TRAFFIC_OK)

    def report(self, member: Member, event: Event, reason: str = "") -> None:
        """Feed a result to the member's health; log the change of status, if any."""
        if self.forward is not None:
            self.forward(member, event, reason)
            return
        if member.draining:  # a dial or probe that was in flight when the member was removed
            return
        change = member.health.observe(event, reason)
        if change is None:
            return
        member.stats.changed(change.reason, time.time())
        if change.new is Status.DOWN:
            log.warning("pool %s member %s is DOWN: %s", self.name, member.name, change.reason)
            if not self.config.health.enabled:  # no probe will bring it back: the ejection time will
                self._eject(member)
        else:
            log.info("pool %s member %s is UP: %s", self.name, member.name, change.reason)

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

    def restrict(self, allowed: Collection[Member] | None) -> None:
        """New sessions go only to ``allowed`` (None: to any eligible member); see ``Balancer.restrict``."""
        self.balancer.restrict(allowed)

    def _eject(self, member: Member) -> None:
        member.stats.ejections += 1
        loop = asyncio.get_running_loop()
        self._ejections[member] = loop.call_later(self.config.health.eject_time, self._ejection_over, member)

    def _ejection_over(self, member: Member) -> None:
        self._ejections.pop(member, None)
        self.report(member, Event.EJECTION_OVER, f"ejection time ({self.config.health.eject_time:g}s) over")

    def close(self) -> None:
        """Cancel pending ejection timers (the proxy is stopping)."""
        for timer in self._ejections.values():
            timer.cancel()
        self._ejections.clear()
