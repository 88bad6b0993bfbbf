"""The rate limit on client-triggerable log lines (``ratelog``): tables of events at given times, and
the line count a flood leaves in a real logger. No clock, no loop."""

from __future__ import annotations

import logging

import pytest

from l4proxy.ratelog import RateLog, Warnings, summary

# (time, kind) events -> which ones are written, with burst 2 and a 10 s window
EVENTS: list[tuple[float, str, bool]] = [
    (0.0, "a", True),
    (0.1, "a", True),
    (0.2, "a", False),  # over the burst: held back
    (0.3, "b", True),  # kinds are independent
    (5.0, "a", False),
    (10.1, "a", False),  # the window passed, but its summary is not out yet: still held
]


def test_allow_table() -> None:
    rl = RateLog(burst=2, window=10.0)
    assert [rl.allow(kind, t) for t, kind, _ in EVENTS] == [shown for _, _, shown in EVENTS]
    assert rl.total == {"a": 5, "b": 1}


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (9.9, []),  # no window has passed
        (10.3, [("a", 3)]),  # a's window held 3 back; b's showed everything: forgotten
    ],
)
def test_due_table(now: float, expected: list[tuple[str, int]]) -> None:
    rl = RateLog(burst=2, window=10.0)
    for t, kind, _ in EVENTS:
        rl.allow(kind, t)
    assert rl.due(now) == expected


def test_a_flood_that_goes_on_gives_one_summary_per_window_and_no_new_lines() -> None:
    rl = RateLog(burst=2, window=10.0)
    shown = sum(rl.allow("a", t / 10) for t in range(100))  # 10 s of events
    assert shown == 2
    assert rl.due(10.0) == [("a", 98)]
    assert not any(rl.allow("a", 10 + t / 10) for t in range(50))  # the flood goes on: counted only
    assert rl.due(15.0) == []
    assert rl.due(20.0) == [("a", 50)]
    assert rl.due(30.0) == []  # the flood stopped: nothing held in that window
    assert rl.allow("a", 31.0)  # a quiet kind writes its lines again
    assert rl.total == {"a": 151}


def test_a_kind_under_its_burst_starts_over_without_a_summary() -> None:
    rl = RateLog(burst=2, window=10.0)
    assert rl.allow("a", 0.0) and rl.allow("a", 1.0)
    assert rl.allow("a", 11.0) and rl.allow("a", 12.0)
    assert not rl.allow("a", 13.0)


def test_summary_text() -> None:
    assert summary("TLS handshake failures", 4998, 10.0) == "... and 4,998 more TLS handshake failures in the last 10 s"
    assert summary("x", 1, 2.5) == "... and 1 more x in the last 2.5 s"


@pytest.mark.parametrize(("burst", "window"), [(0, 10.0), (1, 0.0)])
def test_bad_settings(burst: int, window: float) -> None:
    with pytest.raises(ValueError, match="burst must be >= 1 and window > 0"):
        RateLog(burst, window)


def test_warnings_count_lines(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    warnings = Warnings(lambda: now[0], RateLog(burst=5, window=10.0))
    logger = logging.getLogger("l4proxy.test")
    with caplog.at_level(logging.WARNING, logger="l4proxy"):
        for i in range(5000):
            now[0] = i / 1000
            warnings.warn(logger, "TLS handshake failures", "TLS handshake with %s failed", i)
        warnings.flush()  # 5 s in: not due
        now[0] = 10.0
        warnings.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"TLS handshake with {i} failed" for i in range(5)] + [
        "... and 4,995 more TLS handshake failures in the last 10 s"
    ]
    assert caplog.records[-1].name == "l4proxy.test"
    assert warnings.count("TLS handshake failures") == 5000
