"""Paired per-round ratios and a distribution-free interval for their median: a figure with its uncertainty.

The runner samples every target once per round. On a shared machine a sample's rate moves by tens of
percent with what the neighbours do, and neighbouring samples move together, so the ratio of two targets
*within one round* is steadier than the ratio of their medians over the run. Each round gives one ratio;
the summary is their median with an order-statistic interval: for n ratios sorted, [x(k), x(n+1-k)]
with the largest k for which a binomial(n, 1/2) puts at least the asked share (95%) of its mass inside,
which holds for any distribution of the ratios (no bootstrap, no normality; the same samples always give
the same interval). Fewer than 6 rounds cannot reach 95%: the interval is then [min, max] and its
``coverage`` says how much it is (5 rounds: 93.8%).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Interval:
    """The median of paired ratios, an interval around it, and what that interval covers."""

    median: float
    low: float
    high: float
    coverage: float  # probability that [low, high] holds the true median, distribution-free
    rounds: int


def median_interval(xs: list[float], level: float = 0.95) -> Interval | None:
    """The median of ``xs`` and its order-statistic interval at ``level`` (or [min, max] when too few)."""
    if len(xs) < 2:
        return None
    n, v = len(xs), sorted(xs)
    below = [math.comb(n, i) / 2**n for i in range(n + 1)]  # P(B = i), B ~ binomial(n, 1/2)
    k, tail = 1, below[0]  # coverage of [x(k), x(n+1-k)] is 1 - 2 * P(B < k)
    while k < n // 2 and 1 - 2 * (tail + below[k]) >= level:
        tail += below[k]
        k += 1
    return Interval(statistics.median(v), v[k - 1], v[n - k], 1 - 2 * tail, n)


def cv(xs: list[float]) -> float | None:
    """Coefficient of variation: sample standard deviation over the mean."""
    if len(xs) < 2 or not statistics.fmean(xs):
        return None
    return statistics.stdev(xs) / statistics.fmean(xs)


def by_round(samples: list[dict[str, Any]], key: str) -> dict[int, float]:
    """A target's samples by their ``round``, the metric ``key`` of each (samples without it left out)."""
    out: dict[int, float] = {}
    for i, s in enumerate(samples):
        v = s.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[int(s.get("round", i))] = float(v)
    return out


def paired_ratios(mine: list[dict[str, Any]], ref: list[dict[str, Any]], key: str) -> list[float]:
    """``key`` of ``mine`` over ``ref`` in each round both have a sample for (ref's value positive)."""
    a, b = by_round(mine, key), by_round(ref, key)
    return [a[r] / b[r] for r in sorted(a) if r in b and b[r] > 0]


def round_order(names: list[str], rnd: int) -> list[str]:
    """Targets in round ``rnd``'s order: as named in even rounds, reversed in odd ones (A B C, C B A, ...),
    so a steady drift of the machine within a round falls on every target alike on average."""
    return list(reversed(names)) if rnd % 2 else list(names)
