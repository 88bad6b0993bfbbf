"""The schedule of the forced closes at the end of a drain, as a table."""

from __future__ import annotations

import itertools

import pytest

from l4proxy.spread import close_schedule


@pytest.mark.parametrize(("count", "window", "schedule"), [
    (0, 1.0, []),  # nothing to close
    (1, 1.0, [(1.0, 1)]),  # one session: at the deadline
    (3, 0.3, [(0.1, 1), (0.2, 2), (0.3, 3)]),  # fewer sessions than steps: one per batch
    (4, 0.0, [(0.0, 4)]),  # no window: all at once
    (4, -1.0, [(0.0, 4)]),
    (5, 0.02, [(0.01, 3), (0.02, 5)]),  # two 10 ms steps: 3 then 2
    (7, 0.005, [(0.005, 7)]),  # shorter than one step: one batch at its end
])
def test_close_schedule(count: int, window: float, schedule: list[tuple[float, int]]) -> None:
    assert [(pytest.approx(at), upto) for at, upto in close_schedule(count, window)] == schedule


@pytest.mark.parametrize(("count", "window"), [(10_000, 1.0), (101, 1.0), (250, 0.5), (99, 2.0)])
def test_batches_are_even_and_end_with_everyone(count: int, window: float) -> None:
    schedule = close_schedule(count, window)
    offsets = [at for at, _ in schedule]
    sizes = [b - a for a, b in itertools.pairwise([0, *(upto for _, upto in schedule)])]
    assert len(schedule) == min(count, round(window / 0.01))
    assert offsets == sorted(offsets) and offsets[-1] == pytest.approx(window)
    assert schedule[-1][1] == count and max(sizes) - min(sizes) <= 1
