"""Fixed-bucket histograms for ``/metrics``: a list of ints and a float sum, observed on the hot path.

An observe is one ``bisect`` and two additions (the bucket's count and the sum); the count of all
observations is the sum of the buckets, taken at scrape time. Counts are per bucket, not cumulative,
so a worker's row of ``--workers N`` (``sharedstats.py``) and the supervisor's sums are plain adds;
``cumulative`` makes Prometheus's ``le`` buckets when scraped. The bounds are fixed tables, so series
are bounded (no client labels) and every worker has the same cells.

Pure: no sockets, no clock (the caller measures).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

# Upstream connects, to the connect being done (a TLS member's: its handshake too). A loopback or
# same-host connect takes 0.05-0.2 ms, one in a data centre up to about 1 ms, a TLS handshake or another
# zone a few ms; past 1 s is a member in trouble, and 5 s is the connect timeout's usual order.
CONNECT_BOUNDS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Sessions, from accept to end: one request on a fresh connection lasts a millisecond or a few, a
# client's pooled connection (databases, caches) minutes to hours; past an hour the +Inf bucket holds it.
DURATION_BOUNDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)


class Histogram:
    """Counts per bucket (``bounds`` ascending, then +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is at least it (Prometheus's ``le``). The data
        path has it inlined (``frontend.py``, ``dialer.py``): a call frame per session is not free."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def view(self) -> Buckets:
        """The values now, the sum to the microsecond: what a worker's cells keep, so one process and
        ``--workers N`` show the same."""
        return Buckets(self.bounds, tuple(self.counts), round(self.sum, 6))


@dataclass(frozen=True, slots=True)
class Buckets:
    """A histogram's values at one moment, as snapshots carry them."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # per bucket, not cumulative; the last is +Inf's
    sum: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, observations at most le)`` for every bound and +Inf: Prometheus's buckets."""
        running, found = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            found.append((bound, running))
        return found


def empty(bounds: tuple[float, ...]) -> Buckets:
    return Buckets(bounds, (0,) * (len(bounds) + 1))


def cells(buckets: Buckets) -> tuple[int, ...]:
    """The histogram as int64 cells for a worker's row: the counts, then the sum in microseconds."""
    return (*buckets.counts, round(buckets.sum * 1_000_000))


def from_cells(bounds: tuple[float, ...], values: Sequence[int]) -> Buckets:
    """``cells`` read back (summed over workers)."""
    *counts, micros = values
    return Buckets(bounds, tuple(counts), micros / 1_000_000)


def width(bounds: tuple[float, ...]) -> int:
    """Cells ``cells`` takes for a histogram over ``bounds``."""
    return len(bounds) + 2
