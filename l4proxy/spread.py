"""When the sessions left at the end of a drain are closed: spread over a window, not all at once.

Closing thousands of sessions in one loop iteration makes their clients reconnect in one burst, all to
whatever replaced this proxy (a reconnect storm). So the drain closes them in batches over its last
``window`` seconds, in equal steps of at least ``STEP`` seconds, the last batch exactly at the deadline:

* ``count`` sessions and a window of ``w``: ``n = min(count, max(1, floor(w / STEP)))`` batches; batch
  ``k`` (1..n) is due ``w * k / n`` seconds into the window and closes sessions up to
  ``ceil(count * k / n)`` (cumulative), so every batch closes the same number, give or take one.
* A window of 0 (or less) is one batch at once: a caller that asks for "now" gets now.

Pure: no clock, no loop; the caller sleeps until each offset.
"""

from __future__ import annotations

import math

STEP = 0.01  # the shortest time between two batches: finer steps cost wake-ups and spread nothing more
WINDOW = 1.0  # the drain's last second: how long the forced closes are spread over


def close_schedule(count: int, window: float, step: float = STEP) -> list[tuple[float, int]]:
    """``(offset into the window, sessions closed by then)`` for each batch; empty for no session."""
    if count <= 0:
        return []
    if window <= 0:
        return [(0.0, count)]
    batches = min(count, max(1, math.floor(window / step + 1e-9)))
    return [(window * k / batches, -(-count * k // batches)) for k in range(1, batches + 1)]
