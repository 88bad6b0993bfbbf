"""The ejection table as scripts: one result at a time, the whole pool's state checked after each.

The pure side of RELIABILITY.md case 16 (repeated connect failures eject a member; it returns after its
ejection time or when an active check passes) and of issue-level rules: ejections grow and cap, k
decays, max_ejected_percent holds while one member may always go.
"""

from __future__ import annotations

import itertools
import random
from typing import NamedTuple

import pytest

from l4proxy.errors import ConfigError
from l4proxy.outlier import (
    _TRANSITIONS,
    Change,
    Event,
    OutlierPolicy,
    OutlierTable,
    State,
    Verdict,
    _Act,
)

FAIL, OK, PROBE, EXPIRE = Event.FAILURE, Event.SUCCESS, Event.PROBE_OK, Event.EXPIRE
RESET, SERVED = Event.RESET, Event.SERVED
EARLY = "reset before the first byte"
EJECTED, RETURNED, HELD = Verdict.EJECTED, Verdict.RETURNED, Verdict.HELD

Snapshot = dict[str, tuple[str, int, int, float | None]]  # name: (in/out, streak, k, until if out)


class Step(NamedTuple):
    """One result for one member at ``now``, and the whole table expected right after it."""

    member: str
    event: Event
    now: float
    state: Snapshot
    change: Change | None = None
    reason: str = "refused"


def snapshot(table: OutlierTable) -> Snapshot:
    return {
        name: (m.state.value, m.streak, m.ejections, m.until if m.state is State.OUT else None)
        for name, m in table.members.items()
    }


def run_script(table: OutlierTable, steps: list[Step]) -> None:
    for number, step in enumerate(steps, 1):
        member = table.members[step.member]
        if step.event is EXPIRE:
            changes = table.expire(step.now)
            change = changes[0] if changes else None
            assert len(changes) <= 1, f"step {number}"
        else:
            change = table.observe(member, step.event, step.now, step.reason)
        where = f"step {number}: {step.member} {step.event.name} at {step.now}"
        assert (snapshot(table), change) == (step.state, step.change), where
        assert table.ejected == sum(m.state is State.OUT for m in table.members.values()), where


def inn(streak: int = 0, k: int = 0) -> tuple[str, int, int, None]:
    return ("in", streak, k, None)


def out(k: int, until: float) -> tuple[str, int, int, float]:
    return ("out", 0, k, until)


SCRIPTS: dict[str, tuple[OutlierPolicy, tuple[str, ...], list[Step]]] = {
    # name: (policy, members, steps)
    "eject_after failures in a row eject for eject_time": (OutlierPolicy(3, 30, 300, 50), ("a", "b"), [
        Step("a", FAIL, 0, {"a": inn(1), "b": inn()}),
        Step("a", FAIL, 1, {"a": inn(2), "b": inn()}),
        Step("b", FAIL, 1, {"a": inn(2), "b": inn(1)}),
        Step("a", FAIL, 2, {"a": out(1, 32), "b": inn(1)}, Change("a", EJECTED, 32, 1, "refused")),
    ]),
    "a served connect resets the streak": (OutlierPolicy(3, 30, 300, 50), ("a", "b"), [
        Step("a", FAIL, 0, {"a": inn(1), "b": inn()}),
        Step("a", FAIL, 1, {"a": inn(2), "b": inn()}),
        Step("a", OK, 2, {"a": inn(0), "b": inn()}),
        Step("a", FAIL, 3, {"a": inn(1), "b": inn()}),
        Step("a", OK, 4, {"a": inn(0), "b": inn()}),
        Step("a", OK, 5, {"a": inn(0), "b": inn()}),
    ]),
    "a member that accepts and resets every client is ejected": (OutlierPolicy(3, 30, 300, 50), ("a", "b"), [
        Step("a", OK, 0, {"a": inn(0), "b": inn()}),
        Step("a", RESET, 0, {"a": inn(1), "b": inn()}, None, EARLY),
        Step("a", OK, 1, {"a": inn(1), "b": inn()}),  # a connect cannot clear a streak holding a reset
        Step("a", RESET, 1, {"a": inn(2), "b": inn()}, None, EARLY),
        Step("a", OK, 2, {"a": inn(2), "b": inn()}),
        Step("a", RESET, 2, {"a": out(1, 32), "b": inn()}, Change("a", EJECTED, 32, 1, EARLY), EARLY),
    ]),
    "a session that got bytes clears any streak": (OutlierPolicy(3, 30, 300, 50), ("a", "b"), [
        Step("a", RESET, 0, {"a": inn(1), "b": inn()}, None, EARLY),
        Step("a", OK, 1, {"a": inn(1), "b": inn()}),
        Step("a", RESET, 1, {"a": inn(2), "b": inn()}, None, EARLY),
        Step("a", OK, 2, {"a": inn(2), "b": inn()}),
        Step("a", SERVED, 3, {"a": inn(0), "b": inn()}),
        Step("a", OK, 4, {"a": inn(0), "b": inn()}),
        Step("a", RESET, 4, {"a": inn(1), "b": inn()}, None, EARLY),
        Step("a", FAIL, 5, {"a": inn(2), "b": inn()}),
        Step("a", SERVED, 6, {"a": inn(0), "b": inn()}),
        Step("a", FAIL, 7, {"a": inn(1), "b": inn()}),
        Step("a", SERVED, 8, {"a": inn(0), "b": inn()}),
    ]),
    "connect failures and resets add up; a connect clears only connect failures": (
        OutlierPolicy(4, 30, 300, 50), ("a", "b"), [
            Step("a", FAIL, 0, {"a": inn(1), "b": inn()}),
            Step("a", FAIL, 0, {"a": inn(2), "b": inn()}),
            Step("a", OK, 1, {"a": inn(0), "b": inn()}),  # connects only: cleared, as before
            Step("a", FAIL, 2, {"a": inn(1), "b": inn()}),
            Step("a", RESET, 3, {"a": inn(2), "b": inn()}, None, EARLY),
            Step("a", OK, 4, {"a": inn(2), "b": inn()}),  # now it holds a reset: kept
            Step("a", FAIL, 5, {"a": inn(3), "b": inn()}),
            Step("a", FAIL, 6, {"a": out(1, 36), "b": inn()}, Change("a", EJECTED, 36, 1, "refused")),
            Step("a", EXPIRE, 36, {"a": inn(0, 1), "b": inn()}, Change("a", RETURNED, None, 1, "ejection over")),
            Step("a", FAIL, 37, {"a": inn(1, 1), "b": inn()}),
            Step("a", OK, 38, {"a": inn(0, 1), "b": inn()}),  # the ejection forgot the reset
        ]),
    "resets and served sessions while out are ignored": (OutlierPolicy(1, 30, 300, 100), ("a",), [
        Step("a", RESET, 0, {"a": out(1, 30)}, Change("a", EJECTED, 30, 1, EARLY), EARLY),
        Step("a", RESET, 1, {"a": out(1, 30)}, None, EARLY),
        Step("a", SERVED, 2, {"a": out(1, 30)}),
    ]),
    "ejections grow by eject_time and stop at max_eject_time": (OutlierPolicy(1, 30, 100, 100), ("a",), [
        Step("a", FAIL, 0, {"a": out(1, 30)}, Change("a", EJECTED, 30, 1, "refused")),
        Step("a", EXPIRE, 30, {"a": inn(0, 1)}, Change("a", RETURNED, None, 1, "ejection over")),
        Step("a", FAIL, 30, {"a": out(2, 90)}, Change("a", EJECTED, 90, 2, "refused")),
        Step("a", EXPIRE, 90, {"a": inn(0, 2)}, Change("a", RETURNED, None, 2, "ejection over")),
        Step("a", FAIL, 91, {"a": out(3, 181)}, Change("a", EJECTED, 181, 3, "refused")),
        Step("a", EXPIRE, 181, {"a": inn(0, 3)}, Change("a", RETURNED, None, 3, "ejection over")),
        Step("a", FAIL, 182, {"a": out(4, 282)}, Change("a", EJECTED, 282, 4, "refused")),  # 120 s capped
        Step("a", EXPIRE, 282, {"a": inn(0, 4)}, Change("a", RETURNED, None, 4, "ejection over")),
        Step("a", FAIL, 282, {"a": out(4, 382)}, Change("a", EJECTED, 382, 4, "refused")),  # k stops at 4
    ]),
    "k drops by one per full eject_time in": (OutlierPolicy(1, 30, 300, 100), ("a",), [
        Step("a", FAIL, 0, {"a": out(1, 30)}, Change("a", EJECTED, 30, 1, "refused")),
        Step("a", EXPIRE, 30, {"a": inn(0, 1)}, Change("a", RETURNED, None, 1, "ejection over")),
        Step("a", FAIL, 31, {"a": out(2, 91)}, Change("a", EJECTED, 91, 2, "refused")),
        Step("a", EXPIRE, 91, {"a": inn(0, 2)}, Change("a", RETURNED, None, 2, "ejection over")),
        Step("a", FAIL, 150, {"a": out(2, 210)}, Change("a", EJECTED, 210, 2, "refused")),  # 59 s in: k 2-1+1
        Step("a", EXPIRE, 210, {"a": inn(0, 2)}, Change("a", RETURNED, None, 2, "ejection over")),
        Step("a", FAIL, 270, {"a": out(1, 300)}, Change("a", EJECTED, 300, 1, "refused")),  # 60 s in: k 0+1
    ]),
    "a failure while in does not stop the decay": (OutlierPolicy(2, 10, 300, 100), ("a",), [
        Step("a", FAIL, 0, {"a": inn(1)}),
        Step("a", FAIL, 0, {"a": out(1, 10)}, Change("a", EJECTED, 10, 1, "refused")),
        Step("a", EXPIRE, 10, {"a": inn(0, 1)}, Change("a", RETURNED, None, 1, "ejection over")),
        Step("a", FAIL, 15, {"a": inn(1, 1)}),
        Step("a", FAIL, 20, {"a": out(1, 30)}, Change("a", EJECTED, 30, 1, "refused")),
    ]),
    "max_ejected_percent holds; a held member goes when there is room": (OutlierPolicy(2, 30, 300, 50), "abcd", [
        Step("a", FAIL, 0, {"a": inn(1), "b": inn(), "c": inn(), "d": inn()}),
        Step("a", FAIL, 0, {"a": out(1, 30), "b": inn(), "c": inn(), "d": inn()},
             Change("a", EJECTED, 30, 1, "refused")),
        Step("b", FAIL, 1, {"a": out(1, 30), "b": inn(1), "c": inn(), "d": inn()}),
        Step("b", FAIL, 1, {"a": out(1, 30), "b": out(1, 31), "c": inn(), "d": inn()},
             Change("b", EJECTED, 31, 1, "refused")),
        Step("c", FAIL, 2, {"a": out(1, 30), "b": out(1, 31), "c": inn(1), "d": inn()}),
        Step("c", FAIL, 2, {"a": out(1, 30), "b": out(1, 31), "c": inn(2), "d": inn()},
             Change("c", HELD, None, 0,
                    "refused; not ejected: 2 of 4 members already out (max_ejected_percent 50)")),
        Step("c", FAIL, 3, {"a": out(1, 30), "b": out(1, 31), "c": inn(3), "d": inn()}),  # reported once
        Step("c", FAIL, 4, {"a": out(1, 30), "b": out(1, 31), "c": inn(4), "d": inn()}),
        Step("a", EXPIRE, 30, {"a": inn(0, 1), "b": out(1, 31), "c": inn(4), "d": inn()},
             Change("a", RETURNED, None, 1, "ejection over")),
        Step("c", FAIL, 30, {"a": inn(0, 1), "b": out(1, 31), "c": out(1, 60), "d": inn()},
             Change("c", EJECTED, 60, 1, "refused")),
    ]),
    "one member may always be ejected, whatever the percent": (OutlierPolicy(1, 30, 300, 10), ("a", "b"), [
        Step("a", FAIL, 0, {"a": out(1, 30), "b": inn()}, Change("a", EJECTED, 30, 1, "refused")),
        Step("b", FAIL, 1, {"a": out(1, 30), "b": inn(1)},
             Change("b", HELD, None, 0,
                    "refused; not ejected: 1 of 2 members already out (max_ejected_percent 10)")),
    ]),
    "a passing active check ends an ejection early": (OutlierPolicy(1, 30, 300, 100), ("a",), [
        Step("a", FAIL, 0, {"a": out(1, 30)}, Change("a", EJECTED, 30, 1, "timeout"), "timeout"),
        Step("a", PROBE, 5, {"a": inn(0, 1)}, Change("a", RETURNED, None, 1, "probe passed"), "probe passed"),
        Step("a", EXPIRE, 30, {"a": inn(0, 1)}),  # the old deadline is gone
        Step("a", FAIL, 34, {"a": out(2, 94)}, Change("a", EJECTED, 94, 2, "reset"), "reset"),  # 29 s in: no decay
    ]),
    "passive results while out are ignored": (OutlierPolicy(2, 30, 300, 100), ("a",), [
        Step("a", FAIL, 0, {"a": inn(1)}),
        Step("a", FAIL, 0, {"a": out(1, 30)}, Change("a", EJECTED, 30, 1, "refused")),
        Step("a", FAIL, 1, {"a": out(1, 30)}),
        Step("a", OK, 2, {"a": out(1, 30)}),
        Step("a", FAIL, 3, {"a": out(1, 30)}),
    ]),
    "an active check while in leaves the streak alone": (OutlierPolicy(3, 30, 300, 100), ("a",), [
        Step("a", FAIL, 0, {"a": inn(1)}),
        Step("a", PROBE, 1, {"a": inn(1)}),
        Step("a", FAIL, 2, {"a": inn(2)}),
        Step("a", FAIL, 3, {"a": out(1, 33)}, Change("a", EJECTED, 33, 1, "refused")),
    ]),
    "expire before the deadline changes nothing": (OutlierPolicy(1, 30, 300, 100), ("a",), [
        Step("a", FAIL, 0, {"a": out(1, 30)}, Change("a", EJECTED, 30, 1, "refused")),
        Step("a", EXPIRE, 29.999, {"a": out(1, 30)}),
        Step("a", EXPIRE, 30, {"a": inn(0, 1)}, Change("a", RETURNED, None, 1, "ejection over")),
        Step("a", EXPIRE, 31, {"a": inn(0, 1)}),
    ]),
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_script(name: str) -> None:
    policy, members, steps = SCRIPTS[name]
    run_script(OutlierTable(policy, tuple(members)), steps)


def test_observe_expire_before_the_deadline_is_ignored() -> None:
    table = OutlierTable(OutlierPolicy(1, 30, 300, 100), ("a",))
    a = table.members["a"]
    table.observe(a, FAIL, 0)
    assert table.observe(a, EXPIRE, 10) is None
    assert table.observe(a, EXPIRE, 30) == Change("a", RETURNED, None, 1, "ejection over")


def test_next_deadline_is_the_earliest_ejection_end() -> None:
    table = OutlierTable(OutlierPolicy(1, 30, 300, 100), ("a", "b", "c"))
    assert table.next_deadline() is None
    table.observe(table.members["b"], FAIL, 5)
    table.observe(table.members["a"], FAIL, 1)
    assert table.next_deadline() == 31
    assert sorted(c.member for c in table.expire(35)) == ["a", "b"]
    assert table.next_deadline() is None


def test_expire_returns_every_member_due_at_once() -> None:
    table = OutlierTable(OutlierPolicy(1, 30, 300, 100), ("a", "b", "c"))
    for name, now in (("a", 0), ("b", 1), ("c", 50)):
        table.observe(table.members[name], FAIL, now)
    assert sorted(c.member for c in table.expire(40)) == ["a", "b"]
    assert (table.ejected, table.next_deadline()) == (1, 80)


def test_removing_an_ejected_member_frees_room() -> None:
    table = OutlierTable(OutlierPolicy(1, 30, 300, 50), ("a", "b"))
    table.observe(table.members["a"], FAIL, 0)
    assert table.room() == 0
    table.remove("a")
    assert (table.ejected, table.room(), list(table.members)) == (0, 1, ["b"])
    assert table.observe(table.members["b"], FAIL, 1, "refused") == Change("b", EJECTED, 31, 1, "refused")


def test_adding_a_member_keeps_an_existing_one() -> None:
    table = OutlierTable(OutlierPolicy(), ("a",))
    a = table.members["a"]
    a.streak = 2
    assert table.add("a") is a and a.streak == 2
    assert table.add("b").state is State.IN and len(table.members) == 2


@pytest.mark.parametrize(("members", "percent", "allowed"), [
    (1, 50, 1), (2, 50, 1), (3, 50, 1), (4, 50, 2), (5, 50, 2), (10, 10, 1), (10, 0, 1), (10, 100, 10), (7, 30, 2),
])
def test_cap_is_percent_of_members_rounded_down_but_at_least_one(members: int, percent: int, allowed: int) -> None:
    table = OutlierTable(OutlierPolicy(1, 30, 300, percent), tuple(f"m{i}" for i in range(members)))
    ejected = [table.observe(m, FAIL, 0) for m in list(table.members.values())]
    assert sum(c is not None and c.verdict is EJECTED for c in ejected) == allowed
    assert table.ejected == allowed


@pytest.mark.parametrize("event", [OK, SERVED])
def test_a_success_with_no_streak_takes_the_fast_path_and_changes_nothing(event: Event) -> None:
    table = OutlierTable(OutlierPolicy(), ("a",))
    a = table.members["a"]
    for now in range(100):
        assert table.observe(a, event, now) is None
    assert snapshot(table) == {"a": inn()}


def test_resets_counts_the_resets_of_the_streak_and_clears_with_it() -> None:
    table = OutlierTable(OutlierPolicy(3, 30, 300, 100), ("a",))
    a = table.members["a"]
    steps = [(FAIL, 1, 0), (RESET, 2, 1), (OK, 2, 1), (RESET, 0, 0)]  # the third ejects: both cleared
    for now, (event, streak, resets) in enumerate(steps):
        table.observe(a, event, now, EARLY)
        assert (a.streak, a.resets) == (streak, resets), f"{event.name} at {now}"
    assert repr(a) == "<MemberOutlier a out streak=0 resets=0 k=1>"


# --- the policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"eject_after": 0}, "eject_after 0: must be at least 1"),
    ({"eject_time": 0}, "eject_time 0: must be greater than 0"),
    ({"eject_time": 30, "max_eject_time": 10}, "max_eject_time 10: must be at least the eject time (30s)"),
    ({"max_ejected_percent": 101}, "max_ejected_percent 101: must be a percent, 0..100"),
    ({"max_ejected_percent": -1}, "max_ejected_percent -1: must be a percent, 0..100"),
])
def test_bad_policy(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        OutlierPolicy(**kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_the_defaults_are_envoys_but_half_the_pool() -> None:
    policy = OutlierPolicy()
    numbers = (policy.eject_after, policy.eject_time, policy.max_eject_time, policy.max_ejected_percent)
    assert numbers == (5, 30, 300, 50)
    assert [policy.duration(k) for k in range(1, 12)] == [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300]
    assert policy.max_ejections == 10


# --- the table itself --------------------------------------------------------------------------------


def test_table_covers_every_state_and_event() -> None:
    assert set(_TRANSITIONS) == set(itertools.product(State, Event))


@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)))
def test_table_follows_the_stated_rules(state: State, event: Event) -> None:
    """The module docstring's rules, restated independently of the table."""
    if state is State.IN:
        rules = {FAIL: _Act.COUNT, RESET: _Act.COUNT_RESET, OK: _Act.CLEAR_CONNECTS, SERVED: _Act.RESET}
        expected = rules.get(event, _Act.IGNORE)
    else:
        expected = {PROBE: _Act.RETURN, EXPIRE: _Act.RETURN_IF_DUE}.get(event, _Act.IGNORE)
    assert _TRANSITIONS[(state, event)] is expected


@pytest.mark.parametrize("seed", range(5))
def test_random_runs_keep_the_invariants(seed: int) -> None:
    """Over seeded random runs: the cap holds, deadlines match k, k stays in range, counts agree."""
    rng = random.Random(seed)
    policy = OutlierPolicy(eject_after=rng.randint(1, 4), eject_time=10, max_eject_time=45, max_ejected_percent=40)
    table = OutlierTable(policy, tuple(f"m{i}" for i in range(6)))
    now, ejections = 0.0, 0
    for _ in range(3000):
        now += rng.random() * 3
        member = rng.choice(list(table.members.values()))
        event = rng.choices([FAIL, RESET, OK, SERVED, PROBE, EXPIRE], weights=[4, 2, 2, 1, 1, 2])[0]
        changes = table.expire(now) if event is EXPIRE else [table.observe(member, event, now)]
        for change in filter(None, changes):
            if change.verdict is EJECTED:
                ejections += 1
                assert change.until == now + policy.duration(change.ejections)
        assert table.ejected <= 2  # 40% of 6, rounded down
        assert table.ejected == sum(m.state is State.OUT for m in table.members.values())
        assert all(0 <= m.ejections <= policy.max_ejections for m in table.members.values())
        assert all(0 <= m.resets <= m.streak for m in table.members.values())
    assert ejections > 20  # the run did exercise ejection


def test_returns_say_why_when_the_caller_gives_no_reason() -> None:
    table = OutlierTable(OutlierPolicy(1, 30, 300, 100), ("a", "b"))
    a, b = table.members["a"], table.members["b"]
    table.observe(a, FAIL, 0)
    table.observe(b, FAIL, 0)
    assert table.observe(a, PROBE, 1) == Change("a", RETURNED, None, 1, "active check passed")
    assert table.observe(b, EXPIRE, 30) == Change("b", RETURNED, None, 1, "ejection over")
