"""Rate-limited warnings for the log lines any client can trigger.

A handshake that fails, a client that times out, a connect while every member is down: each is worth
a line, but one line per client lets a single abusive client (or an outage) flood the log. So each
*kind* of line gets a window (10 s by default): the first ``burst`` lines of the window go out as
they are, the rest are only counted, and when the window has passed one summary line says how many
were held back::

    TLS handshake with 127.0.0.1:40522 failed: client reset the connection
    ... and 4,998 more TLS handshake failures in the last 10 s

The counts stay on the ``RateLog`` (``total`` per kind, every event, shown or not), so metrics can
read them. Time is an argument everywhere (no clock, no I/O), so the rules are tested as tables; the
proxy calls ``due`` from its sweeper to emit the summaries of windows that have passed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Window:
    """One kind's current window: when it began, lines shown and lines held back in it."""

    start: float
    shown: int = 0
    held: int = 0


class RateLog:
    """Decides, per kind, whether a line goes out now; counts the ones held back."""

    def __init__(self, burst: int = 5, window: float = 10.0) -> None:
        if burst < 1 or window <= 0:
            raise ValueError(f"burst must be >= 1 and window > 0, got {burst!r} and {window!r}")
        self.burst = burst
        self.window = window
        self.total: dict[str, int] = {}  # every event per kind since start: for metrics
        self._windows: dict[str, _Window] = {}

    def allow(self, kind: str, now: float) -> bool:
        """Count one event of ``kind`` at ``now``; True when its line should be written."""
        self.total[kind] = self.total.get(kind, 0) + 1
        window = self._windows.get(kind)
        if window is None or (now - window.start >= self.window and not window.held):
            # a fresh window; one whose lines were all shown can start over at once (nothing to summarise)
            window = self._windows[kind] = _Window(now)
        if window.shown < self.burst and not window.held:
            window.shown += 1
            return True
        window.held += 1
        return False

    def due(self, now: float) -> list[tuple[str, int]]:
        """The kinds whose window has passed with lines held back, and how many: each is reported once,
        and its next window starts now. Windows that held nothing back are simply forgotten."""
        summaries: list[tuple[str, int]] = []
        for kind, window in list(self._windows.items()):
            if now - window.start < self.window:
                continue
            if window.held:
                summaries.append((kind, window.held))
                # the flood may go on: the next window starts now and shows nothing until it is over
                self._windows[kind] = _Window(now, shown=self.burst)
            else:
                del self._windows[kind]
        return summaries


def summary(label: str, count: int, window: float) -> str:
    """``... and 4,998 more TLS handshake failures in the last 10 s``"""
    return f"... and {count:,} more {label} in the last {window:g} s"


class Warnings:
    """A ``RateLog`` in front of loggers: what the I/O modules call. ``kind`` doubles as the summary's
    label (``"TLS handshake failures"``); ``clock`` gives the time (``time.monotonic`` in the proxy)."""

    def __init__(self, clock: Callable[[], float], ratelog: RateLog | None = None) -> None:
        self.clock = clock
        self.ratelog = ratelog or RateLog()
        self._loggers: dict[str, logging.Logger] = {}

    def warn(self, logger: logging.Logger, kind: str, msg: str, *args: object) -> None:
        """``logger.warning(msg, *args)`` unless this kind is over its burst (then only counted)."""
        if self.ratelog.allow(kind, self.clock()):
            self._loggers[kind] = logger
            logger.warning(msg, *args, stacklevel=2)  # the caller's line, not this one

    def flush(self) -> None:
        """Write the summaries of windows that have passed (the proxy's sweeper calls this each tick)."""
        window = self.ratelog.window
        for kind, count in self.ratelog.due(self.clock()):
            self._loggers.get(kind, _log).warning("%s", summary(kind, count, window))

    def count(self, kind: str) -> int:
        """Every event of ``kind`` so far, shown or not."""
        return self.ratelog.total.get(kind, 0)


_log = logging.getLogger("l4proxy")
