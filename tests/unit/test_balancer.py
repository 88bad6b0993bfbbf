"""The least-connections pick, on its own: no sockets, no loop.

RELIABILITY.md cases 14 (each attempt goes to a member not yet tried, the budget is bounded), 15 (all
members down: no pick, at once), 17 (idle members share evenly; new sessions avoid the busy member) and
18 (max_conns together with least-connections and weights; backups), the pure side of each; the socket
side lives with the dialer, proxy and traffic tests.
"""

from __future__ import annotations

import gc
from collections import Counter

import pytest

from l4proxy.balancer import AT_CAP, NO_PRIMARY, SPLIT_BRAIN, UNLIMITED, Balancer, Member, member_keys
from l4proxy.config import Address, HealthConfig, MemberConfig, Resolved
from l4proxy.health import Change, Event, Status
from l4proxy.outlier import Event as Outlier
from l4proxy.outlier import OutlierPolicy, OutlierTable, Verdict

HEALTH = HealthConfig(rise=2, fall=3)


def make_balancer(count: int, health: HealthConfig = HEALTH) -> Balancer:
    return Balancer([Address(f"10.0.0.{i + 1}", 6379) for i in range(count)], health)


def take_down(balancer: Balancer, member: Member) -> None:
    """``fall`` failures in a row, as the prober or dialer would report them."""
    for _ in range(member.health.fall):
        member.health.observe(Event.PROBE_FAIL, "refused")
    assert member.health.status is Status.DOWN


def hold(balancer: Balancer, picks: int) -> list[Member]:
    """Pick and acquire ``picks`` times without releasing: sessions that stay open."""
    chosen = []
    for _ in range(picks):
        member = balancer.pick()
        assert member is not None
        balancer.acquire(member)
        chosen.append(member)
    return chosen


def short_sessions(balancer: Balancer, picks: int) -> Counter[str]:
    """Pick, acquire and release ``picks`` times: sessions that end before the next one starts."""
    counts: Counter[str] = Counter()
    for _ in range(picks):
        member = balancer.pick()
        assert member is not None
        balancer.acquire(member)
        counts[member.name] += 1
        balancer.release(member)
    return counts


# --- least connections (case 17) -------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_idle_members_share_short_sessions_evenly(count: int) -> None:
    """Every pick is a tie at zero; the rotation must not hand every tie to the first member."""
    balancer = make_balancer(count)
    counts = short_sessions(balancer, 100 * count)
    assert counts == {m.name: 100 for m in balancer.members}


def test_ties_rotate_in_member_order() -> None:
    balancer = make_balancer(3)
    names = [m.name for m in balancer.members]
    picks = []
    for _ in range(7):
        member = balancer.pick()
        assert member is not None
        picks.append(member.name)
    assert picks == [names[i % 3] for i in range(7)]


def test_open_sessions_spread_one_per_member_before_any_gets_a_second() -> None:
    balancer = make_balancer(3)
    chosen = hold(balancer, 9)
    for round_start in range(0, 9, 3):
        assert {m.name for m in chosen[round_start : round_start + 3]} == {m.name for m in balancer.members}
    assert [m.active for m in balancer.members] == [3, 3, 3]
    assert [m.total for m in balancer.members] == [3, 3, 3]


def test_new_sessions_avoid_the_busy_member() -> None:
    balancer = make_balancer(3)
    busy = balancer.members[1]
    for _ in range(5):
        balancer.acquire(busy)
    counts = short_sessions(balancer, 200)
    assert counts == {balancer.members[0].name: 100, balancer.members[2].name: 100}
    assert busy.active == 5


def test_least_loaded_member_catches_up_first() -> None:
    """A member with fewer sessions (say, back from DOWN) takes new ones until loads are level."""
    balancer = make_balancer(3)
    a, b, c = balancer.members
    for member, active in ((a, 4), (b, 2), (c, 0)):
        for _ in range(active):
            balancer.acquire(member)
    chosen = hold(balancer, 6)
    assert [m.name for m in chosen[:2]] == [c.name, c.name]  # c: 0 -> 2, level with b
    assert (a.active, b.active, c.active) == (4, 4, 4)


def test_release_makes_a_member_preferred_again() -> None:
    balancer = make_balancer(2)
    _, b = hold(balancer, 2)
    hold(balancer, 2)
    balancer.release(b)
    assert balancer.pick() is b


@pytest.mark.parametrize(
    ("weights", "sessions", "expected_active"),
    [
        ((1, 1), 10, (5, 5)),
        ((2, 1), 30, (20, 10)),
        ((3, 1, 1), 50, (30, 10, 10)),
        ((1, 4), 25, (5, 20)),
    ],
)
def test_weights_scale_the_load(weights: tuple[int, ...], sessions: int, expected_active: tuple[int, ...]) -> None:
    """Load is active sessions divided by weight, so open sessions settle in proportion to weights."""
    balancer = make_balancer(len(weights))
    for member, weight in zip(balancer.members, weights, strict=True):
        member.weight = weight
    hold(balancer, sessions)
    assert tuple(m.active for m in balancer.members) == expected_active


def test_heavier_member_wins_at_equal_sessions() -> None:
    balancer = make_balancer(2)
    light, heavy = balancer.members
    heavy.weight = 2
    balancer.acquire(light)
    balancer.acquire(heavy)
    assert balancer.pick() is heavy  # 1/2 < 1/1


# --- health (case 15) ------------------------------------------------------------------------------


def test_down_members_get_no_sessions() -> None:
    balancer = make_balancer(3)
    a, b, c = balancer.members
    take_down(balancer, b)
    counts = short_sessions(balancer, 100)
    assert counts == {a.name: 50, c.name: 50}


def test_down_member_is_skipped_even_when_it_is_least_loaded() -> None:
    balancer = make_balancer(2)
    a, b = balancer.members
    for _ in range(10):
        balancer.acquire(a)
    take_down(balancer, b)
    assert balancer.pick() is a


def test_all_members_down_picks_none() -> None:
    balancer = make_balancer(3)
    for member in balancer.members:
        take_down(balancer, member)
    assert balancer.pick() is None
    assert not balancer.any_up


def test_member_back_up_is_picked_again() -> None:
    balancer = make_balancer(2)
    a, b = balancer.members
    take_down(balancer, b)
    assert b.health.observe(Event.PROBE_OK, "ok") is None
    assert b.health.observe(Event.PROBE_OK, "tcp connect ok") == Change(Status.DOWN, Status.UP, "tcp connect ok")
    assert balancer.any_up and b.up
    assert short_sessions(balancer, 10) == {a.name: 5, b.name: 5}


def test_an_ejected_member_is_out_of_the_pick_until_it_returns() -> None:
    """The pool decides ejections (``outlier.py``); the pick only reads the member's state."""
    balancer = make_balancer(2)
    a, b = balancer.members
    table = OutlierTable(OutlierPolicy(eject_after=3, eject_time=1.0))
    a.outlier = table.add(a.key)
    changes = [table.observe(a.outlier, Outlier.FAILURE, 0.0, "refused") for _ in range(3)]
    assert [c and c.verdict for c in changes] == [None, None, Verdict.EJECTED]
    assert (a.ejected, a.eligible, a.up, balancer.any_up) == (True, False, True, True)
    assert short_sessions(balancer, 4) == {b.name: 4}
    assert table.observe(a.outlier, Outlier.PROBE_OK, 0.5) is not None
    assert (a.ejected, a.eligible) == (False, True)
    assert short_sessions(balancer, 4) == {a.name: 2, b.name: 2}


# --- tried members (case 14) -----------------------------------------------------------------------


def test_tried_members_are_excluded() -> None:
    balancer = make_balancer(3)
    a, b, c = balancer.members
    for _ in range(3):
        balancer.acquire(b)  # b is busiest, yet the only one left untried
    assert balancer.pick(tried={a, c}) is b
    assert balancer.pick(tried=[a, b, c]) is None


def test_retry_loop_visits_each_member_once_then_stops() -> None:
    """The dialer's pattern: pick, fail, add to tried; at most one attempt per member."""
    balancer = make_balancer(4)
    tried: list[Member] = []
    while (member := balancer.pick(tried)) is not None:
        assert len(tried) < 4, "the pick must run out once every member is tried"
        tried.append(member)
    assert sorted(m.name for m in tried) == sorted(m.name for m in balancer.members)


@pytest.mark.parametrize(("retries", "attempts"), [(0, 1), (1, 2), (2, 3), (5, 3)])
def test_retry_budget_is_bounded_by_retries_and_members(retries: int, attempts: int) -> None:
    balancer = make_balancer(3)
    tried: list[Member] = []
    for _ in range(retries + 1):
        member = balancer.pick(tried)
        if member is None:
            break
        tried.append(member)
    assert len(tried) == attempts
    assert len(set(tried)) == attempts


def test_tried_and_down_together_leave_nothing() -> None:
    balancer = make_balancer(3)
    a, b, c = balancer.members
    take_down(balancer, c)
    assert balancer.pick(tried={a}) is b
    assert balancer.pick(tried={a, b}) is None
    assert balancer.any_up  # members are up, just all tried for this client


def test_retries_of_one_client_do_not_disturb_the_rotation_for_others() -> None:
    """After a client's attempts, short sessions of other clients are still spread evenly."""
    balancer = make_balancer(3)
    tried: set[Member] = set()
    for _ in range(3):
        member = balancer.pick(tried)
        assert member is not None
        tried.add(member)
    assert short_sessions(balancer, 300) == {m.name: 100 for m in balancer.members}


# --- members by key, update in place ---------------------------------------------------------------


def addresses(*ports: int) -> list[Address]:
    return [Address("10.0.0.1", port) for port in ports]


def test_member_keys_are_host_port_and_repeats_are_numbered() -> None:
    members = [Address("10.0.0.1", 1), Address("::1", 2), Address("10.0.0.1", 1), Address("10.0.0.1", 1)]
    assert member_keys(members) == ["10.0.0.1:1", "[::1]:2", "10.0.0.1:1#2", "10.0.0.1:1#3"]


@pytest.mark.parametrize(
    ("before", "after", "added", "removed"),
    [
        ((1, 2), (1, 2, 3), [3], []),
        ((1, 2, 3), (1, 3), [], [2]),
        ((1, 2), (3, 4), [3, 4], [1, 2]),
        ((1, 2), (2, 1), [], []),
        ((1,), (1, 1), [1], []),  # a repeat is a member of its own
        ((1, 2), (1, 2), [], []),
    ],
)
def test_update_matches_members_by_key(
    before: tuple[int, ...], after: tuple[int, ...], added: list[int], removed: list[int]
) -> None:
    balancer = Balancer(addresses(*before), HEALTH)
    old = {m.key: m for m in balancer.members}
    got_added, got_removed = balancer.update(addresses(*after))
    assert [m.address.port for m in got_added] == added
    assert [m.address.port for m in got_removed] == removed
    assert [m.address.port for m in balancer.members] == list(after)
    assert [m.index for m in balancer.members] == list(range(len(after)))
    for member in balancer.members:  # a member that stays is the same object; an added one is new
        assert old.get(member.key) is (None if member in got_added else member)
    assert all(m.draining for m in got_removed) and not any(m.draining for m in balancer.members)


def test_a_member_that_stays_keeps_health_and_counts() -> None:
    balancer = Balancer(addresses(1, 2), HEALTH)
    down, busy = balancer.members
    take_down(balancer, down)
    busy.health.observe(Event.PROBE_FAIL, "refused")
    balancer.acquire(busy)
    balancer.update(addresses(3, 2, 1))
    assert balancer.members[2] is down and down.health.status is Status.DOWN
    assert balancer.members[1] is busy and (busy.active, busy.total, busy.health.streak) == (1, 1, 1)


def test_a_removed_member_leaves_the_pick_and_drains() -> None:
    balancer = Balancer(addresses(1, 2), HEALTH)
    leaving, staying = balancer.members
    balancer.acquire(leaving)
    _, removed = balancer.update(addresses(2))
    assert removed == [leaving] and balancer.draining == {leaving.key: leaving}
    assert short_sessions(balancer, 5) == {staying.name: 5}
    balancer.release(leaving)  # its session ended
    balancer.update(addresses(2))
    assert balancer.draining == {}


def test_a_draining_member_added_back_is_the_same_member() -> None:
    balancer = Balancer(addresses(1, 2), HEALTH)
    member = balancer.members[0]
    balancer.acquire(member)
    take_down(balancer, member)
    balancer.update(addresses(2))
    added, _ = balancer.update(addresses(2, 1))
    assert added == [member] and balancer.members[1] is member
    assert (member.active, member.health.status, member.draining) == (1, Status.DOWN, False)


def test_a_removed_member_without_sessions_is_forgotten() -> None:
    balancer = Balancer(addresses(1, 2), HEALTH)
    member = balancer.members[0]
    take_down(balancer, member)
    balancer.update(addresses(2))
    assert balancer.draining == {}
    added, _ = balancer.update(addresses(2, 1))
    assert added[0] is not member and added[0].health.status is Status.UP


def test_resolved_members_take_their_srv_weight_and_follow_its_changes() -> None:
    heavy, light = Resolved("10.0.0.1", 1, name="a", weight=3), Resolved("10.0.0.2", 1, name="b")
    balancer = Balancer([heavy, light], HealthConfig())
    assert [(m.key, m.weight) for m in balancer.members] == [("a@10.0.0.1:1", 3), ("b@10.0.0.2:1", 1)]
    kept = balancer.members[0]
    balancer.update([Resolved("10.0.0.1", 1, name="a", weight=5), light])
    assert balancer.members[0] is kept and kept.weight == 5


def test_a_restriction_leaves_the_pick_only_the_allowed_members_and_lifts_cleanly() -> None:
    balancer = make_balancer(3)
    a, b, c = balancer.members
    balancer.restrict([b])
    assert [balancer.pick() for _ in range(3)] == [b, b, b]
    assert balancer.pick([b]) is None
    assert (balancer.allows(a), balancer.allows(b)) == (False, True)
    balancer.restrict(())  # a split brain: none
    assert balancer.pick() is None
    balancer.restrict(None)
    # the class's own pick and take again: nothing left on the hot path
    assert (balancer.pick.__func__, balancer.take.__func__) == (Balancer.pick, Balancer.take)  # type: ignore[attr-defined]
    assert {balancer.pick() for _ in range(3)} == {a, b, c}


@pytest.mark.parametrize(
    ("allowed", "split", "cause"),
    [
        (None, False, AT_CAP),  # every member at its cap below
        ((), False, NO_PRIMARY),  # a failover: the client may wait for a primary
        ((), True, SPLIT_BRAIN),  # refused at once
        ("b", True, AT_CAP),  # prefer-newest picked one: no split as far as routing goes
    ],
)
def test_the_shortage_tells_a_missing_primary_from_a_split_brain(
    allowed: tuple[()] | str | None, split: bool, cause: str
) -> None:
    balancer = Balancer([MemberConfig(Address("a", 1), max_conns=1), MemberConfig(Address("b", 1), max_conns=1)],
                        HEALTH)  # fmt: skip
    a, b = balancer.members
    a.active = b.active = 1
    balancer.restrict([b] if allowed == "b" else allowed, split)  # type: ignore[arg-type]
    assert balancer.take() is None
    assert balancer.shortage() == cause


def _attributes_in_a_dict(balancer: Balancer) -> bool:
    """Whether CPython keeps the instance's attributes in a real dict (a referent holding them) rather
    than inline, where the interpreter reads them without a lookup. Read this way because looking at
    ``__dict__`` would make one."""
    return any(isinstance(r, dict) and "members" in r for r in gc.get_referents(balancer))


def test_lifting_a_restriction_that_is_not_there_keeps_the_attributes_inline() -> None:
    """The prober lifts at start on every pool it probes (``restrict(None)``); touching the instance's
    ``__dict__`` then made every attribute read on the balancer, several per dial, a dict lookup."""
    balancer = make_balancer(2)
    balancer.restrict(None)
    assert not _attributes_in_a_dict(balancer)
    assert balancer.take() is balancer.members[0]


def test_take_honours_a_restriction_past_its_fast_scan() -> None:
    balancer = make_balancer(3)
    c = balancer.members[2]
    balancer.restrict([c])
    assert [balancer.take() for _ in range(3)] == [c, c, c]  # though a and b have fewer sessions
    balancer.restrict(())
    assert balancer.take() is None


def test_a_configured_weight_multiplies_the_srv_weight_and_applies_to_each_address() -> None:
    srv = MemberConfig(Resolved("10.0.0.1", 1, name="a", weight=3), weight=2, max_conns=4)
    named = MemberConfig(Resolved("10.0.0.2", 1, name="b"), weight=5, max_conns=4)
    balancer = Balancer([srv, named], HealthConfig())
    assert [(m.weight, m.limit) for m in balancer.members] == [(6, 4), (5, 4)]

# --- weights, caps and backups (case 18, the pure side) --------------------------------------------


def weighted(*specs: str) -> Balancer:
    """A balancer from member specs as the command line takes them: ``"w=3"``, ``"cap=2"``, ``"backup"``."""
    members = []
    for index, spec in enumerate(specs):
        options = dict(part.partition("=")[::2] for part in spec.split(";") if part)
        members.append(
            MemberConfig(
                Address(f"10.0.0.{index + 1}", 6379),
                weight=int(options.get("w", 1)),
                max_conns=int(options["cap"]) if "cap" in options else None,
                backup="backup" in options,
            )
        )
    return Balancer(members, HEALTH)


@pytest.mark.parametrize(
    ("specs", "active", "expected"),
    [
        # lowest (active + 1) / weight wins
        (("w=1", "w=1"), (0, 0), 0),
        (("w=1", "w=1"), (1, 0), 1),
        (("w=3", "w=1"), (2, 0), 0),  # 3/3 = 1 vs 1/1 = 1: a tie, the scan order decides
        (("w=3", "w=1"), (3, 0), 1),  # 4/3 > 1/1
        (("w=1", "w=2"), (1, 1), 1),  # 2/1 > 2/2
        (("w=256", "w=1"), (255, 0), 0),  # 256/256 = 1/1: a tie, the first in the scan
        (("w=256", "w=1"), (256, 0), 1),
        (("w=2", "w=3"), (3, 5), 0),  # 4/2 = 2 vs 6/3 = 2: tie; cross-multiplied, never a float rounding
        (("w=7", "w=3"), (6, 2), 0),  # 7/7 = 1 vs 3/3 = 1: tie
        # a member at its cap is not eligible, whatever its load
        (("cap=2", "w=1"), (2, 9), 1),
        (("cap=2", "cap=3"), (2, 3), None),
        (("cap=2;w=10", "w=1"), (1, 5), 0),
        # backups only while no primary is eligible; then least-connections among them
        (("w=1", "backup"), (50, 0), 0),
        (("cap=1", "backup", "backup"), (1, 3, 2), 2),
        (("cap=1", "backup;w=4", "backup"), (1, 3, 0), 1),  # 4/4 = 1/1: a tie among the backups
        (("cap=1", "backup;w=4", "backup"), (1, 4, 0), 2),  # 5/4 > 1/1
        (("cap=1", "backup;w=4", "backup"), (1, 4, 1), 1),  # 5/4 < 2/1
        (("cap=1", "backup;cap=3"), (1, 3), None),
    ],
)  # fmt: skip
def test_pick_with_weights_caps_and_backups(
    specs: tuple[str, ...], active: tuple[int, ...], expected: int | None
) -> None:
    balancer = weighted(*specs)
    for member, count in zip(balancer.members, active, strict=True):
        member.active = count
    picked = balancer.pick()
    assert (None if picked is None else picked.index) == expected


@pytest.mark.parametrize(
    ("weights", "sessions", "expected"),
    [
        ((3, 1), 1000, (750, 250)),
        ((1, 1, 2), 1000, (250, 250, 500)),
        ((5, 3, 2), 1000, (500, 300, 200)),
        ((256, 1), 257, (256, 1)),
    ],
)
def test_held_sessions_settle_in_proportion_to_the_weights(
    weights: tuple[int, ...], sessions: int, expected: tuple[int, ...]
) -> None:
    balancer = weighted(*(f"w={w}" for w in weights))
    hold(balancer, sessions)
    assert tuple(m.active for m in balancer.members) == expected


def test_equal_weights_tie_and_rotate_as_without_weights() -> None:
    balancer = weighted("w=4", "w=4", "w=4")
    assert [m.index for m in hold(balancer, 6)] == [0, 1, 2, 0, 1, 2]


def test_a_cap_holds_and_the_rest_go_elsewhere() -> None:
    balancer = weighted("cap=3;w=10", "w=1")
    capped, other = balancer.members
    hold(balancer, 20)
    assert (capped.active, other.active) == (3, 17)
    balancer.release(capped)
    assert balancer.take() is capped and capped.active == 3


def test_every_member_at_its_cap_picks_none() -> None:
    balancer = weighted("cap=1", "cap=2")
    hold(balancer, 3)
    assert balancer.pick() is None and balancer.take() is None
    assert [m.active for m in balancer.members] == [1, 2]  # a refused take counts nothing


@pytest.mark.parametrize("ineligible", ["down", "capped", "tried"])
def test_backups_only_while_no_primary_is_eligible(ineligible: str) -> None:
    balancer = weighted("cap=1", "cap=1", "backup", "backup")
    a, b, x, y = balancer.members
    tried: list[Member] = []
    for primary in (a, b):
        if ineligible == "down":
            take_down(balancer, primary)
        elif ineligible == "capped":
            balancer.acquire(primary)
        else:
            tried.append(primary)
    picks = [balancer.pick(tried) for _ in range(4)]
    assert picks == [x, y, x, y]  # backups share by least-connections: idle ones rotate


def test_backups_share_held_sessions_by_weight() -> None:
    balancer = weighted("cap=2", "backup;w=3", "backup;w=1")
    hold(balancer, 2 + 40)
    assert [m.active for m in balancer.members] == [2, 30, 10]


def test_new_sessions_return_to_a_primary_as_soon_as_it_is_eligible() -> None:
    balancer = weighted("w=1", "backup")
    primary, backup = balancer.members
    take_down(balancer, primary)
    assert hold(balancer, 2) == [backup, backup]
    primary.health.observe(Event.PROBE_OK)
    primary.health.observe(Event.PROBE_OK)
    assert hold(balancer, 3) == [primary] * 3  # the backup's two sessions stay where they are
    assert backup.active == 2


def test_a_retry_tries_the_backup_before_reusing_a_primary() -> None:
    balancer = weighted("w=1", "backup")
    primary, backup = balancer.members
    first = balancer.take()
    assert first is primary
    balancer.release(primary)  # the attempt failed
    assert balancer.take([primary]) is backup
    balancer.release(backup)
    assert balancer.take([primary, backup]) is primary  # every member tried: the best one again


def test_a_member_that_stays_takes_its_new_settings() -> None:
    balancer = weighted("w=1", "w=1")
    a, b = balancer.members
    balancer.acquire(a)
    balancer.update([MemberConfig(a.address, weight=5, max_conns=9), MemberConfig(b.address, backup=True)])
    assert balancer.members == [a, b] and a.active == 1
    assert (a.weight, a.limit, a.backup, b.backup) == (5, 9, False, True)
    assert hold(balancer, 8) == [a] * 8  # b is a backup now, and a has room up to its cap of 9
    assert balancer.pick() is b


class FullView:
    """A LoadView whose reservations of ``full`` slots fail, as when another worker took the last place."""

    def __init__(self, full: set[int]) -> None:
        self.full = full
        self.counts: dict[int, int] = {}
        self.reserved: list[int] = []

    def active(self, slot: int) -> int:
        return self.counts.get(slot, 0)

    def up(self, slot: int) -> bool:
        return True

    def publish(self, slot: int, active: int) -> None:
        self.counts[slot] = active

    def reserve(self, slot: int, limit: int, active: int) -> bool:
        self.reserved.append(slot)
        if slot in self.full:
            return False
        self.counts[slot] = active
        return True


def test_take_passes_over_a_member_another_worker_filled() -> None:
    view = FullView(full={0})
    balancer = Balancer([MemberConfig(Address("10.0.0.1", 1), max_conns=5), Address("10.0.0.2", 1)], HEALTH, view)
    for slot, member in enumerate(balancer.members):
        member.slot = slot
    first, second = balancer.members
    assert balancer.take() is second
    assert view.reserved == [0]  # the capped member was tried through the view; the uncapped one needs no lock
    assert (first.active, second.active, view.counts) == (0, 1, {1: 1})


def test_take_with_every_capped_member_full_elsewhere_is_none() -> None:
    view = FullView(full={0, 1})
    balancer = Balancer([MemberConfig(Address("10.0.0.1", p), max_conns=5) for p in (1, 2)], HEALTH, view)
    for slot, member in enumerate(balancer.members):
        member.slot = slot
    assert balancer.take() is None and balancer.take([balancer.members[0]]) is None
    assert all(m.active == 0 for m in balancer.members)


# --- slow start: the effective weight and cap (the ramp itself is tested in test_slowstart) --------


@pytest.mark.parametrize(
    ("weight", "max_conns", "share", "effective"),
    [
        (10, 200, 1.0, (10, 200)),
        (10, 200, 0.1, (1, 20)),
        (10, 200, 0.55, (6, 110)),  # 5.5 rounds half up
        (30, 3, 0.1, (3, 1)),  # 0.1 * 30 is 3.0000000000000004: nearest, not ceiling; never below 1
        (1, None, 0.1, (1, UNLIMITED)),
        (256, 1, 0.5, (128, 1)),
    ],
)
def test_a_member_scaled_by_its_ramp(
    weight: int, max_conns: int | None, share: float, effective: tuple[int, int]
) -> None:
    balancer = Balancer([MemberConfig(Address("10.0.0.1", 1), weight=weight, max_conns=max_conns)], HEALTH)
    member = balancer.members[0]
    member.scale(share)
    assert (member.weight, member.limit) == effective
    member.scale(1.0)
    assert (member.weight, member.limit) == (weight, max_conns or UNLIMITED)


def test_a_ramping_member_takes_its_share_of_held_sessions() -> None:
    balancer = weighted("w=10", "w=10")
    ramping, steady = balancer.members
    ramping.scale(0.1)  # weight 1 against 10
    hold(balancer, 110)
    assert (ramping.active, steady.active) == (10, 100)


# --- panic mode: (members, how many DOWN, threshold) -> the members four takes go to, and whether it panicked
PANIC_CASES = {
    "off: only the UP member serves": (4, 3, 0, ["10.0.0.4"] * 4, False),
    "1 of 4 UP is below 50%: every member serves": (4, 3, 50, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"], True),
    "2 of 4 UP is not below 50%: health holds": (4, 2, 50, ["10.0.0.3", "10.0.0.4"] * 2, False),
    "none UP at 100%: every member serves": (2, 2, 100, ["10.0.0.1", "10.0.0.2"] * 2, True),
    "none UP, off: nothing": (2, 2, 0, [], False),
}


@pytest.mark.parametrize(("count", "down", "threshold", "hosts", "panicked"), PANIC_CASES.values(), ids=PANIC_CASES)
def test_panic_mode_ignores_health_below_its_threshold(
    count: int, down: int, threshold: int, hosts: list[str], panicked: bool
) -> None:
    balancer = Balancer([Address(f"10.0.0.{i + 1}", 6379) for i in range(count)], HEALTH, panic_threshold=threshold)
    for member in balancer.members[:down]:
        take_down(balancer, member)
    taken = [balancer.take() for _ in range(4)]
    assert sorted(m.address.host for m in taken if m is not None) == sorted(hosts)
    assert balancer.panicking() is panicked and balancer.panics == (4 if panicked else 0)


def test_panic_mode_still_keeps_caps_and_tries_other_members_first() -> None:
    members = [MemberConfig(Address("10.0.0.1", 1), max_conns=1), MemberConfig(Address("10.0.0.2", 1))]
    balancer = Balancer(members, HEALTH, panic_threshold=100)
    for member in balancer.members:
        take_down(balancer, member)
    first = balancer.take()
    assert first is not None and first.address.host == "10.0.0.1"
    again = balancer.take([first])
    assert again is not None and again.address.host == "10.0.0.2"  # not tried yet, and the first is full
    assert balancer.take([first, again]) is again  # every one tried: reuse one below its cap
