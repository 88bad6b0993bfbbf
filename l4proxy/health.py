"""Member health as a small state machine: rise/fall hysteresis over active probe results.

Rules (one table, ``_TRANSITIONS``, below):

* A member starts UP, as in HAProxy, so a fresh proxy serves at once.
* In UP, each failing probe adds to a streak; ``fall`` failures in a row take it DOWN. A pass resets
  the streak.
* In DOWN, ``rise`` passes in a row bring it UP; a failure resets the streak.
* Every change of status is reported once, with the reason of the result that caused it.

Real clients' connects are not health results: they feed outlier ejection (``outlier.py``), which the
pool runs beside this table. ``Event`` names both kinds, as ``Pool.report`` takes them; only the probe
events come here. Without probes a member stays UP, and only ejection takes it out of the pick.

The module is pure: no sockets, no clock. The prober that runs probes lives in ``prober.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    UP = "up"
    DOWN = "down"

    __hash__ = object.__hash__  # members are singletons; Enum's own __hash__ is Python code, run per session


class Event(enum.Enum):
    """A result ``Pool.report`` takes: probes (health, here) or clients' connects and the ejection timer
    (outlier ejection, ``outlier.py``)."""

    __hash__ = object.__hash__

    PROBE_OK = "probe_ok"
    PROBE_FAIL = "probe_fail"
    TRAFFIC_OK = "traffic_ok"
    TRAFFIC_FAIL = "traffic_fail"
    TRAFFIC_RESET = "traffic_reset"  # a session's upstream reset before sending a byte
    TRAFFIC_SERVED = "traffic_served"  # a session got upstream bytes while the member had a failure streak
    EJECTION_OVER = "ejection_over"


class _Act(enum.Enum):
    RESET = "reset"  # the result agrees with the status: clear the streak
    COUNT = "count"  # the result contradicts the status: one more toward a change


PROBES = (Event.PROBE_OK, Event.PROBE_FAIL)  # the events this table takes

_TRANSITIONS: dict[tuple[Status, Event], _Act] = {
    (Status.UP, Event.PROBE_OK): _Act.RESET,
    (Status.UP, Event.PROBE_FAIL): _Act.COUNT,
    (Status.DOWN, Event.PROBE_OK): _Act.COUNT,
    (Status.DOWN, Event.PROBE_FAIL): _Act.RESET,
}


@dataclass(frozen=True, slots=True)
class Change:
    """A status change, reported once so it can be logged once."""

    old: Status
    new: Status
    reason: str


class HealthState:
    """One member's status and the streak of results that contradict it."""

    __slots__ = ("fall", "last_reason", "rise", "status", "streak")

    def __init__(self, rise: int, fall: int, status: Status = Status.UP) -> None:
        self.rise = rise
        self.fall = fall
        self.status = status
        self.streak = 0
        self.last_reason = ""

    @property
    def up(self) -> bool:
        return self.status is Status.UP

    def await_probe(self, reason: str) -> None:
        """DOWN until one probe passes (a member at a new address is checked before it gets sessions);
        if that probe fails, it is an ordinary DOWN member that needs ``rise`` passes."""
        self.status, self.streak, self.last_reason = Status.DOWN, self.rise - 1, reason

    def observe(self, event: Event, reason: str = "") -> Change | None:
        """Apply one probe result (``PROBES``); return the Change when the status flips, else None."""
        act = _TRANSITIONS[(self.status, event)]
        if reason:
            self.last_reason = reason
        if act is _Act.RESET:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < (self.fall if self.status is Status.UP else self.rise):
            return None
        old, self.status, self.streak = self.status, _other(self.status), 0
        return Change(old, self.status, reason)


def _other(status: Status) -> Status:
    return Status.DOWN if status is Status.UP else Status.UP
