"""Member health as a small state machine: rise/fall hysteresis over active and passive results.

Rules (one table, ``_TRANSITIONS``, below):

* A member starts UP, as in HAProxy, so a fresh proxy serves at once.
* In UP, each failure (an active probe or a real client's failed connect) adds to a streak; ``fall``
  failures in a row take it DOWN. Any success resets the streak.
* In DOWN, only active probe successes count: ``rise`` in a row bring it UP; a failure resets the
  streak. Passive results are ignored while DOWN (no new clients are sent there anyway).
* Without active probes nothing would ever bring a DOWN member back, so the pool reports
  ``EJECTION_OVER`` after the ejection time (nginx's ``fail_timeout``) and the member is UP again at
  once; if it still fails, ``fall`` more failures eject it again.
* Every change of status is reported once, with the reason of the result that caused it.

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
    __hash__ = object.__hash__

    PROBE_OK = "probe_ok"
    PROBE_FAIL = "probe_fail"
    TRAFFIC_OK = "traffic_ok"
    TRAFFIC_FAIL = "traffic_fail"
    EJECTION_OVER = "ejection_over"


class _Act(enum.Enum):
    RESET = "reset"  # the result agrees with the status: clear the streak
    COUNT = "count"  # the result contradicts the status: one more toward a change
    IGNORE = "ignore"
    FLIP = "flip"  # change status now, whatever the streak


_TRANSITIONS: dict[tuple[Status, Event], _Act] = {
    (Status.UP, Event.PROBE_OK): _Act.RESET,
    (Status.UP, Event.TRAFFIC_OK): _Act.RESET,
    (Status.UP, Event.PROBE_FAIL): _Act.COUNT,
    (Status.UP, Event.TRAFFIC_FAIL): _Act.COUNT,
    (Status.DOWN, Event.PROBE_OK): _Act.COUNT,
    (Status.DOWN, Event.PROBE_FAIL): _Act.RESET,
    (Status.DOWN, Event.TRAFFIC_OK): _Act.IGNORE,
    (Status.DOWN, Event.TRAFFIC_FAIL): _Act.IGNORE,
    (Status.UP, Event.EJECTION_OVER): _Act.IGNORE,
    (Status.DOWN, Event.EJECTION_OVER): _Act.FLIP,
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
        """Apply one result; return the Change when the status flips, else None."""
        if event is Event.TRAFFIC_OK and self.streak == 0 and self.status is Status.UP:
            return None  # every successful connect: nothing to change, so skip the table
        act = _TRANSITIONS[(self.status, event)]
        if act is _Act.IGNORE:
            return None
        if reason:
            self.last_reason = reason
        if act is _Act.RESET:
            self.streak = 0
            return None
        if act is _Act.COUNT:
            self.streak += 1
            if self.streak < (self.fall if self.status is Status.UP else self.rise):
                return None
        old, self.status, self.streak = self.status, _other(self.status), 0
        return Change(old, self.status, reason)


def _other(status: Status) -> Status:
    return Status.DOWN if status is Status.UP else Status.UP
