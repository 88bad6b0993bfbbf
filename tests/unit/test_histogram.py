"""The fixed-bucket histograms: where a value lands (Prometheus's ``le``: a value equal to a bound is in
that bound's bucket), the cumulative buckets a scrape shows, and the int64 cells a worker's row keeps."""

from __future__ import annotations

import pytest

from l4proxy.histogram import CONNECT_BOUNDS, DURATION_BOUNDS, Buckets, Histogram, cells, empty, from_cells, width

BOUNDS = (0.001, 0.01, 0.1)


@pytest.mark.parametrize(
    ("value", "bucket"),
    [
        (0.0, 0),
        (0.0005, 0),
        (0.001, 0),  # on the bound: le="0.001"
        (0.0010001, 1),
        (0.01, 1),
        (0.05, 2),
        (0.1, 2),
        (0.1000001, 3),  # past the last bound: +Inf
        (1e9, 3),
    ],
)
def test_a_value_lands_in_the_first_bucket_whose_bound_is_at_least_it(value: float, bucket: int) -> None:
    histogram = Histogram(BOUNDS)
    histogram.observe(value)
    expected = [0, 0, 0, 0]
    expected[bucket] = 1
    assert histogram.counts == expected
    assert histogram.sum == value


def test_cumulative_buckets_end_with_inf_holding_the_count() -> None:
    histogram = Histogram(BOUNDS)
    for value in (0.0001, 0.002, 0.003, 0.5, 2.0):
        histogram.observe(value)
    view = histogram.view()
    assert view.counts == (1, 2, 0, 2)
    assert view.count == 5
    assert view.cumulative() == [(0.001, 1), (0.01, 3), (0.1, 3), (float("inf"), 5)]
    assert view.sum == pytest.approx(2.5051)


@pytest.mark.parametrize("bounds", [CONNECT_BOUNDS, DURATION_BOUNDS])
def test_the_tables_ascend_and_span_an_l4_proxys_times(bounds: tuple[float, ...]) -> None:
    assert list(bounds) == sorted(set(bounds))
    assert empty(bounds).cumulative()[-1] == (float("inf"), 0)
    assert len(cells(empty(bounds))) == width(bounds) == len(bounds) + 2


def test_connects_span_half_a_millisecond_to_five_seconds_and_sessions_a_millisecond_to_an_hour() -> None:
    assert CONNECT_BOUNDS[0] <= 0.0005 and CONNECT_BOUNDS[-1] == 5.0
    assert DURATION_BOUNDS[0] == 0.001 and DURATION_BOUNDS[-1] == 3600.0


def test_cells_keep_the_counts_and_the_sum_in_microseconds() -> None:
    buckets = Buckets(BOUNDS, (3, 0, 1, 2), 12.3456789)
    assert cells(buckets) == (3, 0, 1, 2, 12_345_679)
    assert from_cells(BOUNDS, cells(buckets)) == Buckets(BOUNDS, (3, 0, 1, 2), 12.345679)
    two_workers = [a + b for a, b in zip(cells(buckets), cells(buckets), strict=True)]
    assert from_cells(BOUNDS, two_workers) == Buckets(BOUNDS, (6, 0, 2, 4), 24.691358)
