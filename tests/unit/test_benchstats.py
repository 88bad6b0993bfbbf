"""The benchmark runner's paired statistics (benchmarks/stats.py): the interval's order statistics and
coverage, pairing by round, and the round order."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

# loaded from its file: benchmarks/ is scripts, not a package, and its folder stays off sys.path
_file = Path(__file__).resolve().parents[2] / "benchmarks" / "stats.py"
_spec = importlib.util.spec_from_file_location("benchstats", _file)
assert _spec is not None and _spec.loader is not None
stats = sys.modules["benchstats"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(stats)


def coverage(n: int, k: int) -> float:
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize(
    ("n", "k"),
    [
        (2, 1),  # too few for 95%: [min, max], 50%
        (5, 1),  # 93.75%
        (6, 1),  # 96.9%: the fewest rounds that reach 95%
        (8, 1),  # k=2 would be 93.0%
        (9, 2),  # 96.1%
        (12, 3),
        (20, 6),
        (40, 14),
    ],
)
def test_the_interval_is_the_widest_pair_of_order_statistics_that_reaches_95(n: int, k: int) -> None:
    xs = [float(i) for i in range(n, 0, -1)]  # given unsorted: n .. 1
    iv = stats.median_interval(xs)
    assert iv is not None
    assert (iv.low, iv.high, iv.rounds) == (float(k), float(n + 1 - k), n)
    assert iv.median == (n + 1) / 2
    assert iv.coverage == pytest.approx(coverage(n, k))
    assert iv.coverage >= 0.95 or k == 1
    assert k == 1 or coverage(n, k + 1) < 0.95 or k + 1 > n // 2


def test_one_round_has_no_interval() -> None:
    assert stats.median_interval([1.0]) is None
    assert stats.median_interval([]) is None


def test_ratios_pair_samples_of_the_same_round_only() -> None:
    mine = [{"round": 0, "rate": 90.0}, {"round": 1, "rate": 80.0}, {"round": 3, "rate": 50.0}]
    ref = [{"round": 0, "rate": 100.0}, {"round": 2, "rate": 70.0}, {"round": 3, "rate": 100.0},
           {"round": 1, "rate": 0.0}]
    assert stats.paired_ratios(mine, ref, "rate") == [0.9, 0.5]


def test_samples_without_a_round_pair_by_position() -> None:
    assert stats.paired_ratios([{"rate": 3.0}, {"rate": 4.0}], [{"rate": 2.0}, {"rate": 8.0}], "rate") == [1.5, 0.5]


def test_every_other_round_runs_the_targets_in_reverse() -> None:
    assert [stats.round_order(["a", "b", "c"], r) for r in range(3)] == [
        ["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]


def test_the_coefficient_of_variation_is_the_sample_stdev_over_the_mean() -> None:
    assert stats.cv([9.0, 11.0]) == pytest.approx(math.sqrt(2) / 10)
    assert stats.cv([5.0]) is None
