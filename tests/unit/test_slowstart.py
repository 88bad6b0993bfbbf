"""The slow-start ramp and its rounding rule, as tables."""

from __future__ import annotations

import pytest

from l4proxy.slowstart import SlowStart, ramp, scaled


@pytest.mark.parametrize(("now", "since", "duration", "fraction"), [
    (100, 100, 60, 0.1),  # back this instant: 10%
    (90, 100, 60, 0.1),  # a clock read before the restart: still 10%
    (130, 100, 60, 0.55),  # half way
    (145, 100, 60, 0.775),
    (160, 100, 60, 1.0),  # done
    (1000, 100, 60, 1.0),
    (100, 100, 0, 1.0),  # slow start off
])
def test_ramp_is_linear_from_10_percent(now: float, since: float, duration: float, fraction: float) -> None:
    assert ramp(now, since, duration) == pytest.approx(fraction)


@pytest.mark.parametrize(("full", "fraction", "effective"), [
    (1, 0.1, 1),  # never 0
    (3, 0.1, 1),
    (5, 0.1, 1),  # 0.5 rounds up
    (15, 0.1, 2),  # 1.5 rounds up
    (30, 0.1, 3),  # 3.0000000000000004: a ceiling would say 4
    (256, 0.1, 26),
    (200, 0.55, 110),
    (7, 0.5, 4),
    (200, 1.0, 200),
    (1, 1.0, 1),
])
def test_scaled_rounds_to_nearest_and_never_to_zero(full: int, fraction: float, effective: int) -> None:
    assert scaled(full, fraction) == effective


def test_scaled_is_monotonic_over_a_ramp() -> None:
    for full in (1, 2, 3, 10, 33, 200, 256, 10_000):
        values = [scaled(full, ramp(t, 0, 100)) for t in range(0, 101)]
        assert values == sorted(values) and values[0] >= 1 and values[-1] == full


def test_a_member_at_start_up_has_its_full_share() -> None:
    slow = SlowStart(60)
    assert (slow.ramping, slow.fraction(0), slow.ends()) == (False, 1.0, None)


def test_a_member_that_comes_back_ramps_then_stops_ramping() -> None:
    slow = SlowStart(60)
    slow.restart(1000)
    steps = []
    for now in (1000, 1030, 1059, 1060, 1061):
        steps.append((now, round(slow.fraction(now), 3), slow.ramping, slow.ends()))
    assert steps == [
        (1000, 0.1, True, 1060),
        (1030, 0.55, True, 1060),
        (1059, 0.985, True, 1060),
        (1060, 1.0, False, None),
        (1061, 1.0, False, None),
    ]


def test_coming_back_again_mid_ramp_starts_over() -> None:
    slow = SlowStart(60)
    slow.restart(0)
    assert slow.fraction(30) == pytest.approx(0.55)
    slow.restart(40)
    assert (slow.fraction(40), slow.ends()) == (pytest.approx(0.1), 100)


def test_slow_start_off_never_ramps() -> None:
    slow = SlowStart(0)
    slow.restart(5)
    assert (slow.ramping, slow.fraction(5), slow.ends()) == (False, 1.0, None)
