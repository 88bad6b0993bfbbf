"""The retry budget and the back-off of retries to the same member, on real sockets (RELIABILITY.md
cases 14 and 40: the retry budget holds while every member is down)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from l4proxy import HealthConfig
from l4proxy.budget import RetryBudget

from ..kit import blackhole, connect, eventually, make_config, refused_address, running
from .test_retries import CLOCK_SLACK, closed_after, closed_by_proxy


class Watched(RetryBudget):
    """A budget that notes the retries and dials in flight each time it admitted a retry."""

    __slots__ = ("admitted",)

    def __init__(self) -> None:
        super().__init__()
        self.admitted: list[tuple[int, int]] = []

    def try_retry(self) -> bool:
        if not super().try_retry():
            return False
        self.admitted.append((self.retries, self.dials))
        return True


QUIET = HealthConfig(enabled=False)
STAY = 1000  # eject_after: members stay in, so every retry has a member to go to
CLIENTS = 40


async def test_the_budget_holds_while_every_member_is_down() -> None:
    """40 clients at once against two members whose connects time out, with five retries each: without
    a budget that is 240 attempts; with 20% the retries in flight never pass a fifth of the dials in
    flight (3 at least), and the clients whose retry was refused are closed, counted."""
    with contextlib.ExitStack() as stack:
        dead = [stack.enter_context(blackhole()) for _ in range(2)]
        config = make_config(dead, retries=5, connect_timeout=0.3, health=QUIET, eject_after=STAY)
        async with running(config) as (proxy, log):
            pool = proxy.pools["default"]
            budget = pool.budget = Watched()
            clients = [await connect(proxy.port()) for _ in range(CLIENTS)]
            try:
                await asyncio.gather(*(closed_by_proxy(reader, 15) for reader, _ in clients))
                await log.wait_for(CLIENTS, 15)
            finally:
                for _, writer in clients:
                    writer.close()
            attempts = sum(m.total for m in pool.members)
    assert budget.admitted and all(r * 100 <= max(300, d * 20) for r, d in budget.admitted)
    assert max(r for r, _ in budget.admitted) > 3  # the 20% did allow more than the minimum at the peak
    # every client's first attempt, and retries a fraction of them (the first attempts time out
    # staggered, as the clients connected, so more than 20% of 40 get their turn): far from 6 x 40
    assert CLIENTS <= attempts <= 3 * CLIENTS
    assert pool.retry_refused >= CLIENTS // 4 and pool.retry_refused == budget.refused
    assert (budget.dials, budget.retries) == (0, 0)  # every attempt left the books
    refused = [s for s in log.sessions if "retry budget" in s.end_cause]
    assert len(refused) == pool.retry_refused
    assert refused[0].end_cause == (
        "no_upstream (timeout; no retry: the retry budget (20% of the dials in flight) is spent)"
    )


async def test_retries_to_the_same_member_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """One member, three retries, the jitter at its top: 25, 50 and 100 ms between the attempts."""
    monkeypatch.setattr("l4proxy.dialer.random.random", lambda: 0.999)
    async with running(make_config([refused_address()], retries=3, health=QUIET, eject_after=STAY)) as (proxy, log):
        elapsed = await closed_after(proxy.port(), log)
    assert proxy.pools["default"].members[0].total == 4
    assert elapsed >= 0.999 * (0.025 + 0.05 + 0.1) - 3 * CLOCK_SLACK


async def test_a_retry_counts_in_the_budget_while_it_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("l4proxy.dialer.retry_delay", lambda _retry, _u: 0.5)  # long enough to look at
    async with running(make_config([refused_address()], retries=1, health=QUIET, eject_after=STAY)) as (proxy, log):
        pool = proxy.pools["default"]
        _reader, writer = await connect(proxy.port())
        await eventually(lambda: any(s.dial is not None and s.dial.wait is not None for s in proxy.sessions))
        assert (pool.budget.dials, pool.budget.retries) == (1, 1)  # the retry is in flight while it waits
        await log.wait_for(1)  # then it fails too, and the client is closed
        writer.close()
    member = pool.members[0]
    assert (member.active, member.total, pool.budget.dials, pool.budget.retries) == (0, 2, 0, 0)
