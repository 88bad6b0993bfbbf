"""Slow start: a member that comes back ramps its share up instead of taking a full share at once.

A member that becomes eligible again (UP after DOWN, or back from an ejection) starts at 10% of its
weight and max_conns and grows linearly to 100% over ``duration`` (HAProxy's ``slowstart``, which
starts near 0; 10% gives a returning member some traffic from the first moment). Members present at
start-up get their full share at once: there is no history to distrust, and a fresh proxy in front of a
warm pool must not throttle itself.

Rounding: an effective weight or max_conns is ``full * fraction`` rounded to the nearest integer
(halves up) and never below 1, so a ramping member always gets some traffic and a max_conns of 1
stays 1. Nearest rather than ceiling because ``0.1 * 30`` is ``3.0000000000000004`` in floating point:
a ceiling would turn every such exact product into one more.

Pure: ``now`` is passed in.
"""

from __future__ import annotations

import math

START = 0.1


def ramp(now: float, since: float, duration: float) -> float:
    """The fraction of its full share a member back since ``since`` gets: 0.1 up to 1.0 over ``duration``."""
    if duration <= 0:
        return 1.0
    elapsed = now - since
    if elapsed <= 0:
        return START
    if elapsed >= duration:
        return 1.0
    return START + (1.0 - START) * elapsed / duration


def scaled(full: int, fraction: float) -> int:
    """``full`` weight or max_conns at ``fraction``: nearest integer, halves up, at least 1."""
    return max(1, math.floor(full * fraction + 0.5))


class SlowStart:
    """One member's ramp: none at start-up; ``restart(now)`` when it comes back.

    The hot path asks ``fraction(now)`` only while ``ramping`` is true; the ramp switches itself off
    once it reaches 1.0, so a member past its ramp costs one attribute read.
    """

    __slots__ = ("duration", "ramping", "since")

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.since = 0.0
        self.ramping = False

    def restart(self, now: float) -> None:
        """The member became eligible again: ramp from 10% (no-op when slow start is off)."""
        if self.duration > 0:
            self.since, self.ramping = now, True

    def fraction(self, now: float) -> float:
        """The share at ``now``; 1.0 outside a ramp."""
        if not self.ramping:
            return 1.0
        share = ramp(now, self.since, self.duration)
        if share >= 1.0:
            self.ramping = False
        return share

    def ends(self) -> float | None:
        """When the current ramp reaches 100%, for the owner's timer; None outside a ramp."""
        return self.since + self.duration if self.ramping else None
