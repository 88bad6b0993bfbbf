"""Discovery decisions as tables: the empty-answer rule, SRV choice, expansion and the member plan."""

from __future__ import annotations

import pytest

from l4proxy.config import Address, MemberConfig, Resolved, Service
from l4proxy.discovery import (
    Answer,
    SRVRecord,
    Tracker,
    Verdict,
    address_answer,
    expand,
    expand_members,
    lingering,
    needs_resolving,
    plan,
    srv_answer,
    srv_choice,
    unresolved,
    unresolved_members,
)

A = Resolved("10.0.0.1", 6379, name="redis")
B = Resolved("10.0.0.2", 6379, name="redis")
C = Resolved("10.0.0.3", 6379, name="redis")
GOOD_AB = Answer((A, B))
GOOD_BC = Answer((B, C))
EMPTY = Answer()
FAILED = Answer(error="Temporary failure in name resolution")

# Each case: (time, answer) steps and, after each, (verdict, the name's set or None while never resolved).
TRACKER_CASES = {
    "first answer, then the same one": [
        (0, GOOD_AB, Verdict.FIRST, (A, B)),
        (10, Answer((B, A)), Verdict.SAME, (B, A)),
    ],
    "a moved address": [
        (0, GOOD_AB, Verdict.FIRST, (A, B)),
        (10, GOOD_BC, Verdict.CHANGED, (B, C)),
    ],
    "a failure keeps the last good set, however long": [
        (0, GOOD_AB, Verdict.FIRST, (A, B)),
        (10, FAILED, Verdict.FAILED, (A, B)),
        (1000, FAILED, Verdict.FAILED, (A, B)),
        (1010, GOOD_AB, Verdict.SAME, (A, B)),
    ],
    "a failure before any answer leaves the name unresolved": [
        (0, FAILED, Verdict.FAILED, None),
        (10, GOOD_AB, Verdict.FIRST, (A, B)),
    ],
    "empty answers are taken only once they lasted empty_after (30)": [
        (0, GOOD_AB, Verdict.FIRST, (A, B)),
        (10, EMPTY, Verdict.EMPTY_KEPT, (A, B)),
        (20, EMPTY, Verdict.EMPTY_KEPT, (A, B)),
        (39.9, EMPTY, Verdict.EMPTY_KEPT, (A, B)),
        (40, EMPTY, Verdict.EMPTY_TAKEN, ()),
        (50, EMPTY, Verdict.SAME, ()),
        (60, GOOD_BC, Verdict.CHANGED, (B, C)),
    ],
    "a good answer ends an empty streak": [
        (0, GOOD_AB, Verdict.FIRST, (A, B)),
        (10, EMPTY, Verdict.EMPTY_KEPT, (A, B)),
        (20, GOOD_AB, Verdict.SAME, (A, B)),
        (30, EMPTY, Verdict.EMPTY_KEPT, (A, B)),
        (59, EMPTY, Verdict.EMPTY_KEPT, (A, B)),
    ],
    "a failure neither confirms nor ends an empty streak": [
        (0, GOOD_AB, Verdict.FIRST, (A, B)),
        (10, EMPTY, Verdict.EMPTY_KEPT, (A, B)),
        (20, FAILED, Verdict.FAILED, (A, B)),
        (40, EMPTY, Verdict.EMPTY_TAKEN, ()),
    ],
    "empty from the start: the name stays unresolved until empty_after": [
        (0, EMPTY, Verdict.EMPTY_KEPT, None),
        (30, EMPTY, Verdict.EMPTY_TAKEN, ()),
    ],
}


@pytest.mark.parametrize("steps", TRACKER_CASES.values(), ids=TRACKER_CASES.keys())
def test_tracker(steps: list[tuple[float, Answer, Verdict, tuple[Resolved, ...] | None]]) -> None:
    tracker = Tracker(empty_after=30)
    for now, answer, verdict, addresses in steps:
        assert (tracker.observe(answer, now), tracker.addresses) == (verdict, addresses), f"at t={now}"


def test_tracker_counts_failures_in_a_row() -> None:
    tracker = Tracker(empty_after=30)
    counts = [(tracker.observe(answer, 0), tracker.failing)[1] for answer in (FAILED, FAILED, EMPTY, FAILED)]
    assert counts == [1, 2, 0, 1]


def srv(priority: int, weight: int, port: int, target: str) -> SRVRecord:
    return SRVRecord(priority, weight, port, target)


SRV_CHOICE_CASES = {
    "lowest priority only (the next would be backups, ignored)": (
        [srv(20, 1, 1, "b."), srv(10, 5, 2, "a."), srv(10, 0, 3, "c.")],
        [srv(10, 5, 2, "a."), srv(10, 0, 3, "c.")],
    ),
    "'no service' records are skipped before choosing": (
        [srv(0, 0, 0, "a."), srv(1, 0, 80, "."), srv(5, 1, 80, "b.")],
        [srv(5, 1, 80, "b.")],
    ),
    "nothing left": ([srv(0, 0, 80, ".")], []),
    "no records": ([], []),
}


@pytest.mark.parametrize(("records", "chosen"), SRV_CHOICE_CASES.values(), ids=SRV_CHOICE_CASES.keys())
def test_srv_choice(records: list[SRVRecord], chosen: list[SRVRecord]) -> None:
    assert srv_choice(records) == chosen


def test_srv_answer_takes_ports_and_weights_from_the_records() -> None:
    records = [srv(10, 60, 7001, "r0.svc."), srv(10, 0, 7002, "r1.svc."), srv(20, 1, 7003, "backup.svc.")]
    ips = {"r0.svc.": ["10.0.0.1", "fd00::1"], "r1.svc.": ["10.0.0.2"], "backup.svc.": ["10.0.0.9"]}
    answer = srv_answer(records, ips, failed={})
    assert answer == Answer(
        (
            Resolved("10.0.0.1", 7001, name="r0.svc", weight=60),
            Resolved("fd00::1", 7001, name="r0.svc", weight=60),
            Resolved("10.0.0.2", 7002, name="r1.svc", weight=1),  # SRV weight 0 counts as 1
        )
    )
    keys = ["r0.svc@10.0.0.1:7001", "r0.svc@[fd00::1]:7001", "r1.svc@10.0.0.2:7002"]
    assert [str(a) for a in answer.addresses] == keys


def test_srv_answer_fails_whole_when_a_chosen_target_failed() -> None:
    records = [srv(10, 1, 7001, "r0."), srv(10, 1, 7002, "r1."), srv(20, 1, 7003, "backup.")]
    assert srv_answer(records, {"r0.": ["10.0.0.1"]}, failed={"r1.": "timeout", "backup.": "timeout"}) == Answer(
        error="r1.: timeout"
    )
    assert srv_answer(records, {"r0.": ["10.0.0.1"], "r1.": []}, failed={"backup.": "timeout"}).addresses == (
        Resolved("10.0.0.1", 7001, name="r0"),
    )


def test_address_answer_is_distinct_and_ordered() -> None:
    answer = address_answer("db", 5432, ["10.0.0.10", "::1", "10.0.0.9", "10.0.0.10"])
    assert [a.host for a in answer.addresses] == ["10.0.0.9", "10.0.0.10", "::1"]
    assert {a.name for a in answer.addresses} == {"db"}


NAME = Address("redis", 6379)
SRV = Service("_redis._tcp.cache")
IP = Address("10.9.9.9", 6379)

EXPAND_CASES = {
    "IP literals pass through, never resolved": ([IP], {}, [IP]),
    "a name never resolved stays a name": ([IP, NAME], {}, [IP, NAME]),
    "a name failed so far stays a name": ([NAME], {NAME: None}, [NAME]),
    "a resolved name is its addresses": ([NAME, IP], {NAME: (A, B)}, [A, B, IP]),
    "a name taken empty has no members": ([NAME, IP], {NAME: ()}, [IP]),
    "an SRV name never resolved has no members": ([SRV, IP], {}, [IP]),
    "a resolved SRV name is its addresses": ([SRV], {SRV: (C,)}, [C]),
}


@pytest.mark.parametrize(("targets", "known", "members"), EXPAND_CASES.values(), ids=EXPAND_CASES.keys())
def test_expand(targets: list, known: dict, members: list) -> None:
    assert expand(targets, known) == members


def test_what_is_resolved() -> None:
    assert [needs_resolving(t) for t in (NAME, SRV, IP, Address("::1", 1))] == [True, True, False, False]
    assert unresolved([NAME, SRV, IP]) == [NAME, IP]
    members = [MemberConfig(NAME, weight=2), MemberConfig(SRV, backup=True), MemberConfig(IP, max_conns=3)]
    assert unresolved_members(members) == [members[0], members[2]]


def test_every_address_of_a_name_has_its_members_settings() -> None:
    heavy = Resolved("10.0.0.9", 7000, name="t", weight=5)
    members = [MemberConfig(NAME, weight=3, max_conns=10), MemberConfig(SRV, backup=True), MemberConfig(IP)]
    assert expand_members(members, {NAME: (A, B), SRV: (heavy,)}) == [
        MemberConfig(A, weight=3, max_conns=10),
        MemberConfig(B, weight=3, max_conns=10),
        MemberConfig(heavy, backup=True),
        MemberConfig(IP),
    ]


PLAN_CASES = {
    "nothing changes": (["a", "b"], ["b", "a"], [], ((), ("b", "a"), (), ())),
    "a moved address is added checked-first, the old one drains": (
        ["n@1", "n@2"],
        ["n@2", "n@3"],
        [],
        (("n@3",), ("n@2",), ("n@1",), ("n@3",)),
    ),
    "a first answer's addresses start UP, replacing the bare name": (
        ["n:1", "x"],
        ["n@1", "n@2", "x"],
        ["n@1", "n@2"],
        (("n@1", "n@2"), ("x",), ("n:1",), ()),
    ),
    "everything drains": (["a"], [], [], ((), (), ("a",), ())),
}


@pytest.mark.parametrize(("current", "wanted", "first", "expected"), PLAN_CASES.values(), ids=PLAN_CASES.keys())
def test_plan(current: list[str], wanted: list[str], first: list[str], expected: tuple) -> None:
    result = plan(current, wanted, first)
    assert (result.add, result.keep, result.drain, result.check_first) == expected
    assert result.changed == bool(expected[0] or expected[2])


def test_a_moved_name_keeps_its_old_address_until_a_new_one_is_up() -> None:
    tracker = Tracker(empty_after=30)
    tracker.observe(GOOD_AB, 0)
    assert tracker.observe(Answer((C,)), 10) is Verdict.CHANGED and tracker.leaving == (A, B)
    assert lingering(tracker, up={str(A), str(B)}) == (A, B)  # C waits for its probe: A and B still serve
    assert lingering(tracker, up={str(A), str(B), str(C)}) == ()  # C passed: A and B drain
    assert expand([NAME], {NAME: (C,)}, {NAME: (A, B)}) == [C, A, B]
    tracker.observe(Answer((C,)), 20)
    assert tracker.leaving == () and lingering(tracker, up=set()) == ()  # the next answer ends it


def test_addresses_that_stay_up_need_no_lingering() -> None:
    tracker = Tracker(empty_after=30)
    tracker.observe(GOOD_AB, 0)
    tracker.observe(GOOD_BC, 10)
    assert (tracker.leaving, lingering(tracker, up={str(A), str(B)})) == ((A,), ())


def test_an_empty_answer_taken_leaves_nothing_lingering() -> None:
    tracker = Tracker(empty_after=5)
    tracker.observe(GOOD_AB, 0)
    tracker.observe(EMPTY, 10)
    assert (tracker.observe(EMPTY, 15), tracker.leaving, lingering(tracker, up=())) == (Verdict.EMPTY_TAKEN, (), ())
