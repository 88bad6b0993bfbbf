"""``Deadlines``: connect timeouts in buckets under one timer, on both loops."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

from l4proxy.deadlines import Deadlines

# uvloop keeps loop time in whole milliseconds, so a timer may fire up to 1 ms early by the wall clock
CLOCK_SLACK = 0.002


class Recorder:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.expired: list[tuple[Hashable, float]] = []

    def __call__(self, thing: Hashable) -> None:
        self.expired.append((thing, self.loop.time() - self.started))


async def test_a_deadline_fires_not_early_and_within_one_granularity() -> None:
    record = Recorder()
    deadlines = Deadlines(record.loop, record, granularity=0.01)
    deadlines.add("a", 0.05)
    await asyncio.sleep(0.2)
    [(thing, after)] = record.expired
    assert thing == "a"
    assert 0.05 - CLOCK_SLACK <= after < 0.05 + 0.01 + 0.1  # the upper bound allows for a busy machine
    assert len(deadlines) == 0


async def test_a_discarded_deadline_never_fires() -> None:
    record = Recorder()
    deadlines = Deadlines(record.loop, record)
    deadlines.add("kept", 0.03)
    deadlines.add("done", 0.03).discard("done")  # the connect completed first
    await asyncio.sleep(0.1)
    assert [thing for thing, _ in record.expired] == ["kept"]


async def test_an_earlier_deadline_added_later_still_fires_first() -> None:
    record = Recorder()
    deadlines = Deadlines(record.loop, record)
    deadlines.add("late", 0.3)
    deadlines.add("soon", 0.02)
    await asyncio.sleep(0.1)
    assert [thing for thing, _ in record.expired] == ["soon"]  # not held back until the later timer
    await asyncio.sleep(0.3)
    assert [thing for thing, _ in record.expired] == ["soon", "late"]


async def test_expiry_may_add_a_new_deadline() -> None:
    """A timed-out attempt moves on to the next member, which gets a deadline of its own."""
    loop = asyncio.get_running_loop()
    fired: list[str] = []

    def expire(thing: Hashable) -> None:
        fired.append(str(thing))
        if thing == "first":
            deadlines.add("retry", 0.02)

    deadlines = Deadlines(loop, expire)
    deadlines.add("first", 0.02)
    await asyncio.sleep(0.15)
    assert fired == ["first", "retry"]


async def test_close_forgets_every_deadline() -> None:
    record = Recorder()
    deadlines = Deadlines(record.loop, record)
    deadlines.add("a", 0.02)
    deadlines.close()
    await asyncio.sleep(0.06)
    assert record.expired == []
    assert len(deadlines) == 0
