"""What ``l4proxy top`` shows (``topview``): rates from two ``/status`` answers, number forms, name
truncation and the layout that fits a terminal, as tables. No sockets, no terminal."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from l4proxy.topview import (
    GAP,
    MIN_NAME,
    Row,
    cells,
    elapsed,
    layout,
    number,
    rate,
    rows,
    size,
    title,
    truncate,
    visible,
)


def member(name: str, state: str = "UP", **counts: Any) -> dict[str, Any]:
    return {
        "name": name,
        "state": state,
        "active_sessions": counts.get("active", 0),
        "sessions": counts.get("sessions", 0),
        "bytes_in": counts.get("bytes_in", 0),
        "bytes_out": counts.get("bytes_out", 0),
        "connect_failures": {"refused": counts.get("refused", 0), "timeout": 0},
    }


def status(uptime: float, sessions: tuple[int, int], sent: tuple[int, int], draining: bool = False) -> dict[str, Any]:
    """A /status answer with one listener and a pool of two members; ``sessions`` and ``sent`` per member."""
    a = member("10.0.0.1:6379", sessions=sessions[0], bytes_in=sent[0], bytes_out=sent[0] * 2, active=2)
    b = member("10.0.0.2:6379", "DOWN", sessions=sessions[1], bytes_in=sent[1], bytes_out=sent[1] * 2, refused=4)
    return {
        "version": "0.1.0",
        "uptime_seconds": uptime,
        "workers": 1,
        "draining": draining,
        "ready": not draining,
        "listeners": [{
            "name": "default", "address": "127.0.0.1:7000", "sessions": sum(sessions), "active_sessions": 2,
            "bytes_in": sum(sent), "bytes_out": 2 * sum(sent), "tls_failures": {"timeout": 1, "other": 2},
        }],
        "pools": [{"name": "default", "no_upstream": 5, "members": [a, b]}],
        "totals": {"members": 2, "members_up": 1, "active_sessions": 2},
    }  # fmt: skip


BEFORE = status(10.0, (100, 50), (1000, 0))
AFTER = status(12.0, (120, 50), (1000 + 2048 * 1024, 0))  # 2 s later: 20 sessions, 2 MiB in, 4 MiB out on a


def test_rows_from_two_reads() -> None:
    assert rows(BEFORE, AFTER) == [
        Row("listener", "default 127.0.0.1:7000", "OPEN", "2", "10", "3.0M", "3", "-", "-"),
        Row("pool", "pool default", "1/2 UP", "2", "10", "3.0M", "5", "-", "-"),
        Row("member", "  10.0.0.1:6379", "UP", "2", "10", "3.0M", "0", "-", "-"),
        Row("member", "  10.0.0.2:6379", "DOWN", "0", "0", "0", "4", "-", "-"),
    ]


def test_the_first_read_has_counts_but_no_rates() -> None:
    assert [(r.name, r.active, r.sessions_rate, r.bytes_rate, r.failures) for r in rows(None, AFTER)] == [
        ("default 127.0.0.1:7000", "2", "-", "-", "3"),
        ("pool default", "2", "-", "-", "5"),
        ("  10.0.0.1:6379", "2", "-", "-", "0"),
        ("  10.0.0.2:6379", "0", "-", "-", "4"),
    ]


def test_a_restarted_proxy_a_new_member_and_a_drain() -> None:
    restarted = status(1.0, (3, 0), (10, 0), draining=True)  # uptime went down: no rates at all
    assert {r.sessions_rate for r in rows(AFTER, restarted)} == {"-"}
    assert rows(AFTER, restarted)[0].state == "DRAIN"
    grown = copy.deepcopy(AFTER)
    grown["uptime_seconds"] = 13.0
    grown["pools"][0]["members"].append(member("10.0.0.3:6379", sessions=7))
    found = {r.name: r.sessions_rate for r in rows(AFTER, grown)}
    assert found["  10.0.0.3:6379"] == "-"  # not in the previous answer
    assert found["pool default"] == "-"  # so the pool's sum is unknown too
    assert found["  10.0.0.1:6379"] == "0"


def test_fields_a_proxy_reports_later_fill_their_columns() -> None:
    richer = copy.deepcopy(AFTER)
    richer["pools"][0]["queued"] = 3
    richer["pools"][0]["members"][1]["ejections"] = 2
    pool, _a, b = rows(BEFORE, richer)[1:]
    assert (pool.queue, b.ejections, b.queue) == ("3", "2", "-")


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [
        (None, {"uptime_seconds": 5}, None),
        ({"uptime_seconds": 5}, {"uptime_seconds": 6.5}, 1.5),
        ({"uptime_seconds": 5}, {"uptime_seconds": 5}, None),  # same answer twice
        ({"uptime_seconds": 5}, {"uptime_seconds": 1}, None),  # restarted
        ({}, {"uptime_seconds": 1}, None),
    ],
)
def test_elapsed(previous: dict[str, Any] | None, current: dict[str, Any], expected: float | None) -> None:
    assert elapsed(previous, current) == expected


@pytest.mark.parametrize(
    ("now", "before", "seconds", "expected"),
    [(30, 10, 2.0, 10.0), (10, 10, 1.0, 0.0), (5, 10, 1.0, None), (None, 1, 1.0, None), (3, 1, None, None),
     (3, 1, 0.0, None)],
)  # fmt: skip
def test_rate(now: float | None, before: float | None, seconds: float | None, expected: float | None) -> None:
    assert rate(now, before, seconds) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "-"), (0, "0"), (7, "7"), (12.5, "12.5"), (0.25, "0.2"), (100.4, "100"), (999, "999"),
     (1000, "1.0k"), (12_345, "12.3k"), (999_999, "1000k"), (2_500_000, "2.5M"), (3e9, "3.0G")],
)  # fmt: skip
def test_number(value: float | None, expected: str) -> None:
    assert number(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "-"), (0, "0"), (1023, "1023"), (1024, "1.0K"), (1536, "1.5K"), (200 * 1024, "200K"),
     (5 << 20, "5.0M"), (3 << 30, "3.0G")],
)  # fmt: skip
def test_size(value: float | None, expected: str) -> None:
    assert size(value) == expected


@pytest.mark.parametrize(
    ("text", "width", "expected"),
    [
        ("10.0.0.1:6379", 20, "10.0.0.1:6379"),
        ("10.0.0.1:6379", 13, "10.0.0.1:6379"),
        ("redis-primary.example.internal:6379", 20, "redis-prim~rnal:6379"),
        ("abcdef", 4, "ab~f"),
        ("abcdef", 2, "a~"),
        ("abcdef", 1, "a"),
    ],
)
def test_truncate_keeps_both_ends(text: str, width: int, expected: str) -> None:
    assert truncate(text, width) == expected
    assert len(truncate(text, width)) <= width


@pytest.mark.parametrize(
    ("width", "name", "shown"),
    [
        (80, 80 - 43 - 7 * GAP, ("STATE", "ACTIVE", "SESS/s", "BYTES/s", "FAIL", "EJECT", "QUEUE")),
        (62, MIN_NAME, ("STATE", "ACTIVE", "SESS/s", "BYTES/s", "FAIL", "EJECT", "QUEUE")),  # just fits
        (61, 17, ("STATE", "ACTIVE", "SESS/s", "BYTES/s", "FAIL", "EJECT")),
        (50, MIN_NAME, ("STATE", "ACTIVE", "SESS/s", "BYTES/s", "FAIL")),
        (49, 18, ("STATE", "ACTIVE", "SESS/s", "BYTES/s")),
        (42, 19, ("STATE", "ACTIVE", "SESS/s")),  # no optional column left: from the right
        (20, 20 - 8, ("STATE",)),
        (12, 12, ()),
        (5, 5, ()),
    ],
)
def test_layout_drops_optional_columns_first(width: int, name: int, shown: tuple[str, ...]) -> None:
    name_width, columns = layout(width)
    assert (name_width, tuple(c.title for c in columns)) == (name, shown)


@pytest.mark.parametrize("width", [100, 80, 62, 61, 50, 49, 42, 20, 12])
def test_every_line_fits_its_width(width: int) -> None:
    name_width, columns = layout(width)
    long = Row("member", "  " + "x" * 100 + ":6379", "DOWN", "123456789", "1.5k", "20M", "4", "-", "-")
    texts = cells(long, name_width, columns)
    assert len((" " * GAP).join(texts)) <= width
    assert texts[0].endswith(":6379") and len(texts[0]) == name_width
    assert [len(t) <= c.width for t, c in zip(texts[1:], columns, strict=True)] == [True] * len(columns)
    assert len(title(AFTER, "127.0.0.1:9901", width)) <= width


def test_visible_rows_and_the_more_line() -> None:
    many = [Row("member", f"m{i}", "UP", "0", "0", "0", "0", "-", "-") for i in range(30)]
    assert visible(many, 30) == many
    shown = visible(many, 21)
    assert len(shown) == 21 and shown[:20] == many[:20]
    assert (shown[-1].kind, shown[-1].name) == ("more", "... 10 more (a taller terminal shows them)")
    assert visible(many, 0) == []


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        (100, "127.0.0.1:9901  ready  up 0m12s  members 1/2 UP  active 2  workers 1  l4proxy 0.1.0"),
        (80, "127.0.0.1:9901  ready  up 0m12s  members 1/2 UP  active 2  workers 1"),
        (30, "127.0.0.1:9901  ready"),
        (10, "127.0~9901"),  # the address alone, cut as a name is
    ],
)
def test_title_leaves_off_what_does_not_fit(width: int, expected: str) -> None:
    assert title(AFTER, "127.0.0.1:9901", width) == expected


def test_title_says_draining_and_not_ready() -> None:
    drained = status(3725, (0, 0), (0, 0), draining=True)
    assert title(drained, "[::1]:9901", 80).startswith("[::1]:9901  draining  up 1h02m")
    unready = dict(AFTER, ready=False)
    assert title(unready, "a:1", 80).startswith("a:1  NOT READY")

