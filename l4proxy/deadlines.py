"""Connect deadlines for every dial in flight, with one loop timer instead of one per dial.

A timer per dial (``call_later`` and its ``cancel``) was about 3.5% of a short session's user-space
instructions. Here a deadline is rounded up to the next multiple of ``granularity`` and its dial goes
into that tick's bucket: adding and removing are a set operation each. One timer runs while buckets
exist and expires the due ones. A deadline therefore fires between its exact time and one granularity
later, never early; with the default 10 ms that is far inside any connect timeout worth setting.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable, Hashable, Iterator


class Deadlines:
    """Buckets of expiring things by tick; ``expire(thing)`` is called for each that comes due."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, expire: Callable[[Hashable], None], granularity: float = 0.01
    ) -> None:
        self.loop = loop
        self.expire = expire
        self.granularity = granularity
        self.buckets: dict[int, set[Hashable]] = {}
        self._ticks: list[int] = []  # a heap of the ticks that have a bucket
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0  # the tick the timer is set for

    def add(self, thing: Hashable, timeout: float, now: float | None = None) -> set[Hashable]:
        """Expire ``thing`` ``timeout`` seconds from now unless it is discarded from the returned set.
        ``now``: a ``time.monotonic()`` the caller read anyway (a dial times its connect from it). Both
        loops' clocks are CLOCK_MONOTONIC (uvloop's truncated to the millisecond, at most that behind),
        so a deadline from it is never early."""
        tick = math.ceil(((self.loop.time() if now is None else now) + timeout) / self.granularity)
        bucket = self.buckets.get(tick)
        if bucket is None:
            bucket = self.buckets[tick] = set()
            heapq.heappush(self._ticks, tick)
            if self._timer is None or tick < self._armed:
                self._arm(tick)
        bucket.add(thing)
        return bucket

    def close(self) -> None:
        """Forget everything (the proxy is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.buckets.clear()
        self._ticks.clear()

    def __len__(self) -> int:
        return sum(map(len, self.buckets.values()))

    def __iter__(self) -> Iterator[Hashable]:
        """Every thing with a deadline, in no order (a snapshot: expiring while iterating is safe)."""
        for bucket in list(self.buckets.values()):
            yield from list(bucket)

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = tick
        self._timer = self.loop.call_at(tick * self.granularity, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self.loop.time()
        ticks = self._ticks
        while ticks and ticks[0] * self.granularity <= now:
            bucket = self.buckets.pop(heapq.heappop(ticks))
            while bucket:  # expire() may add new deadlines (a retry), never to a past bucket
                self.expire(bucket.pop())
        if ticks:  # the loop's clock may fire a timer a little early: a due bucket waits for the next run
            self._arm(ticks[0])
