"""Outlier ejection: a member that keeps failing real clients is taken out of the pool for a while.

Rules (the transitions are one table, ``_TRANSITIONS``, below; the numbers are ``OutlierPolicy``'s):

* Local-origin failures count: a connect refused or timed out, a failed TLS handshake (``FAILURE``),
  and a session whose upstream reset before sending a byte (``RESET``: a member that accepts and then
  resets, as an overloaded server does). ``eject_after`` of them in a row, of either kind, eject the
  member. What clears the streak depends on what it holds:

  ====================  ====================================  ===================================
  result                streak of connect failures only       streak holding a reset
  ====================  ====================================  ===================================
  ``FAILURE``           +1                                    +1
  ``RESET``             +1 (now holds a reset)                +1
  ``SUCCESS`` (connect) cleared                               kept: the member accepts, then resets
  ``SERVED`` (bytes)    cleared                               cleared
  ====================  ====================================  ===================================

  A connected dial cannot clear a streak of resets, or a member that accepts and resets every client
  would alternate connect-ok / reset at streak 0/1 forever. Only a session that got bytes from the
  upstream (``SERVED``) proves it serves. That is Envoy's ``consecutive_local_origin_failure`` with the
  TCP proxy's connect success as the success, except that a connect success there clears everything;
  HAProxy's ``observe layer4`` sees connects only. The owner reports ``SERVED`` only while the streak is
  not 0 (one attribute test per session end), and ``RESET`` only on the upstream's reset path.
* The k-th ejection in a row lasts ``min(eject_time * k, max_eject_time)`` (Envoy's rule). k stops
  growing at ``ceil(max_eject_time / eject_time)``, where the cap is reached, so it never piles up
  more than the decay below has to undo.
* k decays while the member is in: it drops by one for every full ``eject_time`` that has passed since
  the last ejection ended (Envoy drops it by one per 10 s sweep instead; counting in ``eject_time``
  needs no sweep, and a member must stay in as long as one base ejection to earn one step back).
* ``max_ejected_percent`` caps the ejected members of a pool at ``max(1, members * percent // 100)``:
  one member may always be ejected, even the only one (Envoy's "at least one host"). A failure that
  would eject past the cap leaves the member in; that is reported once per streak, and each further
  failure tries again, so the member goes as soon as there is room.
* An ejection ends at its deadline (the owner calls ``expire(now)`` at ``next_deadline()``) or early
  when an active health check passes (Envoy's ``successful_active_health_check_uneject_host``).
* While a member is in, active checks leave its streak alone: a member that passes probes but resets
  every client is exactly what this table is for. While it is out, passive results are ignored: they
  come from dials started before the ejection.
* Every ejection, return and held ejection comes out once as a ``Change``, for the log.

The module is pure: no sockets, no clock; ``now`` is passed in (the loop's monotonic time).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """When to eject (``eject_after`` failures in a row), for how long, and how much of a pool at most."""

    eject_after: int = 5
    eject_time: float = 30.0
    max_eject_time: float = 300.0
    max_ejected_percent: int = 50

    def __post_init__(self) -> None:
        if self.eject_after < 1:
            raise ConfigError("eject_after", self.eject_after, "must be at least 1")
        if not self.eject_time > 0:
            raise ConfigError("eject_time", self.eject_time, "must be greater than 0")
        if not self.max_eject_time >= self.eject_time:
            problem = f"must be at least the eject time ({self.eject_time:g}s)"
            raise ConfigError("max_eject_time", self.max_eject_time, problem)
        if not 0 <= self.max_ejected_percent <= 100:
            raise ConfigError("max_ejected_percent", self.max_ejected_percent, "must be a percent, 0..100")

    @property
    def max_ejections(self) -> int:
        """The k at which an ejection first lasts ``max_eject_time``; k grows no further."""
        return math.ceil(self.max_eject_time / self.eject_time)

    def duration(self, ejections: int) -> float:
        """How long the ``ejections``-th ejection in a row lasts."""
        return min(self.eject_time * ejections, self.max_eject_time)


class State(enum.Enum):
    """Whether the member is in the pool or ejected from it."""

    __hash__ = object.__hash__  # members are singletons; Enum's own __hash__ is Python code

    IN = "in"
    OUT = "out"


class Event(enum.Enum):
    __hash__ = object.__hash__

    FAILURE = "failure"  # a local-origin failure of a real client's dial
    SUCCESS = "success"  # a real client's dial connected (and, with TLS, shook hands)
    RESET = "reset"  # a real client's session: the upstream reset before sending a byte
    SERVED = "served"  # a real client's session got bytes from the upstream
    PROBE_OK = "probe_ok"  # an active health check passed
    EXPIRE = "expire"  # the ejection's deadline may have come


class _Act(enum.Enum):
    COUNT = "count"  # one more failure in a row; eject at eject_after if the cap allows
    COUNT_RESET = "count_reset"  # the same, and the streak now holds a reset
    CLEAR_CONNECTS = "clear_connects"  # clear the streak unless it holds a reset
    RESET = "reset"  # clear the streak
    IGNORE = "ignore"
    RETURN = "return"  # end the ejection now
    RETURN_IF_DUE = "return_if_due"  # end the ejection if its deadline has come


_TRANSITIONS: dict[tuple[State, Event], _Act] = {
    (State.IN, Event.FAILURE): _Act.COUNT,
    (State.IN, Event.SUCCESS): _Act.CLEAR_CONNECTS,
    (State.IN, Event.RESET): _Act.COUNT_RESET,
    (State.IN, Event.SERVED): _Act.RESET,
    (State.IN, Event.PROBE_OK): _Act.IGNORE,
    (State.IN, Event.EXPIRE): _Act.IGNORE,
    (State.OUT, Event.FAILURE): _Act.IGNORE,
    (State.OUT, Event.SUCCESS): _Act.IGNORE,
    (State.OUT, Event.RESET): _Act.IGNORE,
    (State.OUT, Event.SERVED): _Act.IGNORE,
    (State.OUT, Event.PROBE_OK): _Act.RETURN,
    (State.OUT, Event.EXPIRE): _Act.RETURN_IF_DUE,
}


class Verdict(enum.Enum):
    """What a ``Change`` reports."""

    EJECTED = "ejected"
    RETURNED = "returned"
    HELD = "held"  # eject_after reached, but the pool's max_ejected_percent is used up


@dataclass(frozen=True, slots=True)
class Change:
    """One record for the log: the member, what happened, until when (if ejected), the k, and why."""

    member: str
    verdict: Verdict
    until: float | None
    ejections: int
    reason: str


class MemberOutlier:
    """One member's ejection state: the streak, whether it is out and until when, and k.

    The hot path reads ``state`` (is the member eligible?) and reports results through the table.
    """

    __slots__ = ("ejections", "name", "resets", "since", "state", "streak", "until")

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = State.IN
        self.streak = 0
        self.resets = 0  # how many of the streak are resets before the first byte (0: connects only)
        self.until = 0.0  # meaningful while OUT
        self.ejections = 0  # k, as of ``since``
        self.since = 0.0  # when the last ejection ended: k decays from here

    def ejections_at(self, now: float, policy: OutlierPolicy) -> int:
        """k after decay: one less for every full ``eject_time`` in since the last ejection ended."""
        if self.state is State.OUT or self.ejections == 0:
            return self.ejections
        return max(0, self.ejections - int((now - self.since) // policy.eject_time))

    def __repr__(self) -> str:
        counts = f"streak={self.streak} resets={self.resets} k={self.ejections}"
        return f"<MemberOutlier {self.name} {self.state.value} {counts}>"


class OutlierTable:
    """The ejection state of one pool's members, and the pool-wide cap on how many may be out."""

    def __init__(self, policy: OutlierPolicy, names: tuple[str, ...] = ()) -> None:
        self.policy = policy
        self.members: dict[str, MemberOutlier] = {}
        self.ejected = 0
        for name in names:
            self.add(name)

    def add(self, name: str) -> MemberOutlier:
        """A new member, in, with no history (a member that already exists is returned as it is)."""
        member = self.members.get(name)
        if member is None:
            member = self.members[name] = MemberOutlier(name)
        return member

    def remove(self, name: str) -> None:
        """Forget a member; if it was out, that frees room under the cap."""
        member = self.members.pop(name)
        if member.state is State.OUT:
            self.ejected -= 1

    def room(self) -> int:
        """How many more members may be ejected now."""
        allowed = max(1, len(self.members) * self.policy.max_ejected_percent // 100)
        return allowed - self.ejected

    def observe(self, member: MemberOutlier, event: Event, now: float, reason: str = "") -> Change | None:
        """Apply one result to ``member``; return the Change to log, if any."""
        if member.streak == 0 and (event is Event.SUCCESS or event is Event.SERVED):
            return None  # every served connect: nothing to change, so skip the table
        act = _TRANSITIONS[(member.state, event)]
        if act is _Act.IGNORE:
            return None
        if act is _Act.RESET or (act is _Act.CLEAR_CONNECTS and not member.resets):
            member.streak = member.resets = 0
            return None
        if act is _Act.CLEAR_CONNECTS:
            return None  # a streak of resets stands: the member accepts connects, then resets them
        if act is _Act.COUNT or act is _Act.COUNT_RESET:
            member.streak += 1
            if act is _Act.COUNT_RESET:
                member.resets += 1
            if member.streak < self.policy.eject_after:
                return None
            return self._eject(member, now, reason)
        if act is _Act.RETURN_IF_DUE and now < member.until:
            return None
        default = "ejection over" if event is Event.EXPIRE else "active check passed"
        return self._return(member, now, reason or default)

    def expire(self, now: float) -> list[Change]:
        """End every ejection whose deadline has come."""
        due = [m for m in self.members.values() if m.state is State.OUT and m.until <= now]
        return [self._return(m, now, "ejection over") for m in due]

    def next_deadline(self) -> float | None:
        """The earliest end of an ejection, for the owner's one timer; None when nothing is out."""
        return min((m.until for m in self.members.values() if m.state is State.OUT), default=None)

    def _eject(self, member: MemberOutlier, now: float, reason: str) -> Change | None:
        policy = self.policy
        decayed = member.ejections_at(now, policy)
        if self.room() <= 0:
            if member.streak != policy.eject_after:
                return None  # reported when the streak first reached eject_after
            return Change(member.name, Verdict.HELD, None, decayed, f"{reason}; {self._cap_text()}")
        k = min(decayed + 1, policy.max_ejections)
        member.state, member.streak, member.resets, member.ejections = State.OUT, 0, 0, k
        member.until = now + policy.duration(k)
        self.ejected += 1
        return Change(member.name, Verdict.EJECTED, member.until, k, reason)

    def _return(self, member: MemberOutlier, now: float, reason: str) -> Change:
        member.state, member.streak, member.resets, member.since = State.IN, 0, 0, now
        self.ejected -= 1
        return Change(member.name, Verdict.RETURNED, None, member.ejections, reason)

    def _cap_text(self) -> str:
        return (
            f"not ejected: {self.ejected} of {len(self.members)} members already out"
            f" (max_ejected_percent {self.policy.max_ejected_percent})"
        )
