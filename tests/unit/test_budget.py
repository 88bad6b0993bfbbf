"""The retry budget as scripts (events in, the whole count after each) and the back-off as a table."""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest

from l4proxy.budget import BudgetPolicy, RetryBudget, retry_allowed, retry_delay
from l4proxy.errors import ConfigError


class Step(NamedTuple):
    """``dial`` (a first attempt), ``retry`` (try_retry), ``end`` / ``end_retry`` (dial_ended)."""

    event: str
    result: bool | None  # what try_retry answered; None for the other events
    dials: int
    retries: int
    refused: int


def apply(budget: RetryBudget, event: str) -> bool | None:
    if event == "dial":
        budget.dial_started()
    elif event == "retry":
        return budget.try_retry()
    else:
        budget.dial_ended(retry=event == "end_retry")
    return None


SCRIPTS: dict[str, tuple[BudgetPolicy, list[Step]]] = {
    "the minimum of 3 retries always goes": (BudgetPolicy(20, 3), [
        Step("dial", None, 1, 0, 0),
        Step("end", None, 0, 0, 0),
        Step("retry", True, 1, 1, 0),
        Step("retry", True, 2, 2, 0),
        Step("retry", True, 3, 3, 0),
        Step("retry", False, 3, 3, 1),
        Step("end_retry", None, 2, 2, 1),
        Step("retry", True, 3, 3, 1),
    ]),
    "past the minimum, retries are percent of the dials, counting the new one": (BudgetPolicy(20, 3), [
        *[Step("dial", None, n, 0, 0) for n in range(1, 20)],
        Step("retry", True, 20, 1, 0),
        Step("retry", True, 21, 2, 0),
        Step("retry", True, 22, 3, 0),
        Step("retry", True, 23, 4, 0),  # 4 of 23 dials: 17%
        Step("retry", False, 23, 4, 1),  # 5 of 24 would be 21%
        Step("dial", None, 24, 4, 1),
        Step("dial", None, 25, 4, 1),
        Step("retry", True, 26, 5, 1),  # 5 of 26: 19%
        Step("retry", False, 26, 5, 2),  # 6 of 27 would be 22%
    ]),
    "a budget of 0 percent leaves only the minimum": (BudgetPolicy(0, 1), [
        *[Step("dial", None, n, 0, 0) for n in range(1, 101)],
        Step("retry", True, 101, 1, 0),
        Step("retry", False, 101, 1, 1),
    ]),
    "100 percent allows a retry per dial, no more": (BudgetPolicy(100, 0), [
        Step("retry", True, 1, 1, 0),
        Step("retry", True, 2, 2, 0),
        Step("end_retry", None, 1, 1, 0),
        Step("end_retry", None, 0, 0, 0),
    ]),
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_script(name: str) -> None:
    policy, steps = SCRIPTS[name]
    budget = RetryBudget(policy)
    for number, step in enumerate(steps, 1):
        result = apply(budget, step.event)
        got = (result, budget.dials, budget.retries, budget.refused)
        assert got == (step.result, step.dials, step.retries, step.refused), f"step {number}: {step.event}"


@pytest.mark.parametrize(("retries", "dials", "percent", "minimum", "allowed"), [
    (0, 0, 20, 3, True),
    (2, 2, 20, 3, True),
    (3, 3, 20, 3, False),
    (3, 19, 20, 3, True),  # 4 of 20
    (3, 18, 20, 3, False),  # 4 of 19
    (19, 99, 20, 3, True),  # 20 of 100
    (20, 100, 20, 3, False),  # 21 of 101
    (0, 0, 0, 0, False),
    (0, 0, 100, 0, True),
])
def test_retry_allowed(retries: int, dials: int, percent: int, minimum: int, allowed: bool) -> None:
    assert retry_allowed(retries, dials, percent, minimum) is allowed


@pytest.mark.parametrize("seed", range(5))
def test_an_outage_of_every_member_cannot_multiply_attempts(seed: int) -> None:
    """Clients arrive, every attempt fails and asks for a retry; each admitted retry stays in the budget."""
    rng = random.Random(seed)
    budget = RetryBudget(BudgetPolicy(20, 3))
    in_flight: list[bool] = []  # each attempt in flight: is it a retry?
    started = retried = 0
    for _ in range(20000):
        if rng.random() < 0.5 or not in_flight:
            budget.dial_started()
            in_flight.append(False)
            started += 1
        else:
            retry = in_flight.pop(rng.randrange(len(in_flight)))
            budget.dial_ended(retry)
            if budget.try_retry():  # the failed attempt wants another
                in_flight.append(True)
                retried += 1
                assert budget.retries <= max(3, budget.dials * 20 // 100)  # as admitted
        assert (budget.dials, budget.retries) == (len(in_flight), sum(in_flight))
    assert retried <= started // 3  # without the budget every failure would retry: retried == started
    assert budget.refused > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"percent": 101}, "retry_budget 101: must be 0..100 (percent of the dials in flight)"),
    ({"percent": -5}, "retry_budget -5: must be 0..100 (percent of the dials in flight)"),
    ({"minimum": -1}, "retry_budget_minimum -1: must be 0 or more"),
])
def test_bad_policy(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        BudgetPolicy(**kwargs)
    assert str(caught.value) == message


# --- back-off ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("retry", "u", "delay"), [
    (1, 0.0, 0.0),
    (1, 0.5, 0.0125),
    (1, 0.999, 0.024975),
    (2, 0.5, 0.025),
    (3, 0.5, 0.05),
    (4, 0.5, 0.1),
    (5, 0.5, 0.125),  # 400 ms capped at 250
    (6, 0.5, 0.125),
    (10_000, 0.999, 0.24975),
])
def test_full_jitter_doubles_from_25ms_to_250ms(retry: int, u: float, delay: float) -> None:
    assert retry_delay(retry, u) == pytest.approx(delay)


def test_full_jitter_spreads_over_the_whole_window() -> None:
    rng = random.Random(7)
    delays = sorted(retry_delay(3, rng.random()) for _ in range(10000))
    assert 0 <= delays[0] < 0.001 and 0.099 < delays[-1] < 0.1
    assert delays[5000] == pytest.approx(0.05, abs=0.003)


def test_retry_number_starts_at_one() -> None:
    with pytest.raises(ValueError, match="retry must be 1 or more, not 0"):
        retry_delay(0, 0.5)
