"""A pool at run time: its balancer, its settings, and one place that logs health changes.

Both the dialer (passive results) and the prober (active results) report through ``Pool.report``, so
each change of a member's status is logged exactly once, with the reason that caused it.

In a worker process (``--workers N``), ``forward`` is set: results go to the supervisor through shared
memory instead, and only the supervisor's pools decide and log status (see ``workers.py``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from .balancer import Balancer, Member
from .config import PoolConfig
from .health import Event, Status

log = logging.getLogger("l4proxy.health")


class Pool:
    """Run-time state of one ``PoolConfig``."""

    def __init__(self, config: PoolConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.name = config.name
        self.balancer = Balancer(config.members, config.health)
        self.ssl_context = ssl_context
        self.no_upstream = 0  # clients closed because no member could be reached
        self._ejections: dict[Member, asyncio.TimerHandle] = {}
        self.forward: Callable[[Member, Event, str], None] | None = None  # health decided elsewhere

    @property
    def members(self) -> list[Member]:
        return self.balancer.members

    def report(self, member: Member, event: Event, reason: str = "") -> None:
        """Feed a result to the member's health; log the change of status, if any."""
        if self.forward is not None:
            self.forward(member, event, reason)
            return
        change = self.balancer.report(member, event, reason)
        if change is None:
            return
        if change.new is Status.DOWN:
            log.warning("pool %s member %s is DOWN: %s", self.name, member.name, change.reason)
            if not self.config.health.enabled:  # no probe will bring it back: the ejection time will
                loop = asyncio.get_running_loop()
                self._ejections[member] = loop.call_later(self.config.health.eject_time, self._ejection_over, member)
        else:
            log.info("pool %s member %s is UP: %s", self.name, member.name, change.reason)

    def _ejection_over(self, member: Member) -> None:
        self._ejections.pop(member, None)
        self.report(member, Event.EJECTION_OVER, f"ejection time ({self.config.health.eject_time:g}s) over")

    def close(self) -> None:
        """Cancel pending ejection timers (the proxy is stopping)."""
        for timer in self._ejections.values():
            timer.cancel()
        self._ejections.clear()
