"""The rise/fall state machine as scripts: feed one result at a time, check the whole state after each.

RELIABILITY.md case 19 (rise/fall hysteresis: a flapping member does not change state on every probe).
Each status change is reported exactly once, with the reason of the result that caused it. Clients'
connects are not health results (they feed outlier ejection, ``test_outlier.py``).
"""

from __future__ import annotations

import itertools
import random
from typing import NamedTuple

import pytest

from l4proxy.health import _TRANSITIONS, PROBES, Change, Event, HealthState, Status, _Act

UP, DOWN = Status.UP, Status.DOWN
P_OK, P_FAIL = Event.PROBE_OK, Event.PROBE_FAIL


class Step(NamedTuple):
    """One result and the whole state expected right after it."""

    event: Event
    reason: str
    status: Status
    streak: int
    change: Change | None = None


def run_script(state: HealthState, steps: list[Step]) -> None:
    for number, step in enumerate(steps, 1):
        change = state.observe(step.event, step.reason)
        got = (state.status, state.streak, change)
        assert got == (step.status, step.streak, step.change), f"step {number}: {step.event.name} {step.reason!r}"
        assert state.up is (state.status is UP)


SCRIPTS: dict[str, tuple[int, int, Status, list[Step]]] = {
    # name: (rise, fall, initial status, steps)
    "falls after fall probe failures": (2, 3, UP, [
        Step(P_FAIL, "refused", UP, 1),
        Step(P_FAIL, "refused", UP, 2),
        Step(P_FAIL, "timeout", DOWN, 0, Change(UP, DOWN, "timeout")),
    ]),
    "any success resets the failure streak": (2, 3, UP, [
        Step(P_FAIL, "refused", UP, 1),
        Step(P_FAIL, "refused", UP, 2),
        Step(P_OK, "ok", UP, 0),
    ]),
    "rises after rise probe successes": (2, 3, DOWN, [
        Step(P_OK, "ok", DOWN, 1),
        Step(P_OK, "+PONG", UP, 0, Change(DOWN, UP, "+PONG")),
    ]),
    "a failure while DOWN resets the rise streak": (3, 3, DOWN, [
        Step(P_OK, "ok", DOWN, 1),
        Step(P_OK, "ok", DOWN, 2),
        Step(P_FAIL, "wrong reply", DOWN, 0),
        Step(P_OK, "ok", DOWN, 1),
        Step(P_OK, "ok", DOWN, 2),
        Step(P_OK, "ok", UP, 0, Change(DOWN, UP, "ok")),
    ]),
    "a full cycle: down, back up, down again": (2, 2, UP, [
        Step(P_FAIL, "refused", UP, 1),
        Step(P_FAIL, "refused", DOWN, 0, Change(UP, DOWN, "refused")),
        Step(P_FAIL, "refused", DOWN, 0),
        Step(P_OK, "ok", DOWN, 1),
        Step(P_OK, "ok", UP, 0, Change(DOWN, UP, "ok")),
        Step(P_OK, "ok", UP, 0),
        Step(P_FAIL, "timeout", UP, 1),
        Step(P_FAIL, "timeout", DOWN, 0, Change(UP, DOWN, "timeout")),
    ]),
    "rise and fall of 1 flip on every contradicting result": (1, 1, UP, [
        Step(P_OK, "ok", UP, 0),
        Step(P_FAIL, "refused", DOWN, 0, Change(UP, DOWN, "refused")),
        Step(P_OK, "ok", UP, 0, Change(DOWN, UP, "ok")),
    ]),
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_script(name: str) -> None:
    rise, fall, initial, steps = SCRIPTS[name]
    run_script(HealthState(rise, fall, initial), steps)


def test_a_new_member_starts_up_with_no_streak() -> None:
    state = HealthState(rise=2, fall=3)
    assert (state.status, state.streak, state.last_reason, state.up) == (UP, 0, "", True)


@pytest.mark.parametrize(("rise", "fall"), [(2, 3), (2, 2), (3, 5)])
@pytest.mark.parametrize("initial", [UP, DOWN])
def test_flapping_member_never_changes_state(rise: int, fall: int, initial: Status) -> None:
    """Case 19: alternating pass/fail probes, 200 of them, leave the status where it was."""
    state = HealthState(rise, fall, initial)
    for event in itertools.islice(itertools.cycle([P_OK, P_FAIL]), 200):
        assert state.observe(event, event.value) is None
        assert state.status is initial
        assert state.streak <= 1


def test_a_result_without_reason_keeps_the_last_one() -> None:
    state = HealthState(rise=2, fall=3)
    state.observe(P_FAIL, "timeout")
    state.observe(P_OK)
    assert state.last_reason == "timeout"


# --- the table itself ------------------------------------------------------------------------------


def test_table_covers_every_status_and_probe_result() -> None:
    assert set(_TRANSITIONS) == set(itertools.product(Status, PROBES))
    assert all(isinstance(act, _Act) for act in _TRANSITIONS.values())


@pytest.mark.parametrize(("status", "event"), list(itertools.product(Status, PROBES)))
def test_table_follows_the_stated_rules(status: Status, event: Event) -> None:
    """The module docstring's rules, restated independently of the table."""
    expected = _Act.RESET if (event is P_OK) == (status is UP) else _Act.COUNT
    assert _TRANSITIONS[(status, event)] is expected


# --- every flip reported once ----------------------------------------------------------------------


def reference_status(rise: int, fall: int, events: list[Event]) -> list[Status]:
    """A second, table-free statement of the rules: the status after each event."""
    status, streak, out = UP, 0, []
    for event in events:
        if status is UP:
            streak = streak + 1 if event is P_FAIL else 0
            if streak == fall:
                status, streak = DOWN, 0
        elif event is P_OK:
            streak += 1
            if streak == rise:
                status, streak = UP, 0
        elif event is P_FAIL:
            streak = 0
        out.append(status)
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("rise", "fall"), [(1, 1), (2, 3), (3, 2)])
def test_exactly_one_change_per_flip(seed: int, rise: int, fall: int) -> None:
    """Over a seeded random run, each status flip yields one Change carrying that event's reason."""
    rng = random.Random(seed)
    events = [rng.choice(PROBES) for _ in range(2000)]
    expected = reference_status(rise, fall, events)
    state = HealthState(rise, fall)
    flips = 0
    for number, (event, want) in enumerate(zip(events, expected, strict=True)):
        before = state.status
        change = state.observe(event, f"result {number}")
        assert state.status is want, f"event {number}"
        if before is state.status:
            assert change is None
        else:
            flips += 1
            assert change == Change(before, state.status, f"result {number}")
    assert flips > 10  # the run did exercise both directions


def test_a_member_awaiting_its_first_probe_needs_one_pass_or_then_rise() -> None:
    state = HealthState(rise=3, fall=2)
    state.await_probe("a new address")
    assert (state.status, state.last_reason) == (Status.DOWN, "a new address")
    assert state.observe(Event.PROBE_OK, "check passed") == Change(Status.DOWN, Status.UP, "check passed")
    state.await_probe("moved again")
    assert state.observe(Event.PROBE_FAIL, "refused") is None
    assert [state.observe(Event.PROBE_OK, "ok") for _ in range(3)][-1] == Change(Status.DOWN, Status.UP, "ok")
    assert state.status is Status.UP
