"""certrules as tables: which certificate a server name selects, and the verdict on a certificate's dates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from l4proxy.certrules import NameIndex, Validity, validity

# Certificates in listing order; position 0 is the default.
LISTED = [
    ["default.test"],
    ["api.example.com", "*.example.com"],
    ["*.example.com", "www.example.com"],  # the wildcard is the previous one's; the exact name is its own
    ["API.Example.COM", "db.internal."],  # api.example.com is taken; db.internal is its own
    ["*.*.example.com", "f*.example.org", "*", ""],  # no wildcard this module understands
]


@pytest.mark.parametrize(("name", "position"), [
    ("api.example.com", 1),  # exact, listed first
    ("www.example.com", 2),  # exact beats the earlier wildcard
    ("shop.example.com", 1),  # the wildcard, from the first certificate that has it
    ("SHOP.Example.Com", 1),  # DNS names have no case
    ("shop.example.com.", 1),  # nor a meaningful trailing dot
    ("db.internal", 3),
    ("DB.INTERNAL.", 3),
    ("example.com", 0),  # a wildcard needs a label in front of it
    ("a.b.example.com", 0),  # and covers exactly one
    ("default.test", 0),
    ("unknown.test", 0),  # nothing matches: the default
    ("fun.example.org", 0),  # partial-label wildcards are not matched
    ("x.y.example.com", 0),
    ("localhost", 0),  # a single label
    ("", 0),
    (None, 0),  # no SNI at all
])  # fmt: skip
def test_select(name: str | None, position: int) -> None:
    assert NameIndex.build(LISTED).select(name) == position


def test_build_keeps_only_names_it_can_match() -> None:
    index = NameIndex.build(LISTED)
    assert index.exact == {"default.test": 0, "api.example.com": 1, "www.example.com": 2, "db.internal": 3}
    assert index.wildcard == {"example.com": 1}


@pytest.mark.parametrize(("listed", "unreachable"), [
    ([["a.test"]], []),
    ([["a.test"], ["b.test"]], []),
    ([["a.test"], []], [1]),  # no DNS names (an IP-only certificate)
    ([["a.test"], ["a.test"]], [1]),  # everything served by an earlier one
    ([["*.test"], ["*.test", "x.test"]], []),  # x.test is its own
    ([["a.test"], ["a.test"], ["c.test"], ["*"]], [1, 3]),
    ([[], ["a.test"]], []),  # the default is reachable by definition
])  # fmt: skip
def test_unreachable(listed: list[list[str]], unreachable: list[int]) -> None:
    assert NameIndex.build(listed).unreachable(len(listed)) == unreachable


START = datetime(2026, 1, 1, tzinfo=UTC)
END = datetime(2027, 1, 1, 12, 30, tzinfo=UTC)
PERIOD = "valid from 2026-01-01 00:00 UTC to 2027-01-01 12:30 UTC"


@pytest.mark.parametrize(("now", "verdict"), [
    (datetime(2026, 6, 1, tzinfo=UTC), Validity()),
    (START, Validity()),  # the first valid instant
    (END - timedelta(days=14, seconds=1), Validity()),  # just over 14 days left
    (END - timedelta(days=14), Validity(warning="expires in 14 days, on 2027-01-01 12:30 UTC")),
    (END - timedelta(days=1, hours=3), Validity(warning="expires in 1 day, on 2027-01-01 12:30 UTC")),
    (END - timedelta(hours=23), Validity(warning="expires within a day, on 2027-01-01 12:30 UTC")),
    (END, Validity(warning="expires within a day, on 2027-01-01 12:30 UTC")),  # the last valid instant
    (END + timedelta(seconds=1), Validity(error=f"expired on 2027-01-01 12:30 UTC ({PERIOD})")),
    (START - timedelta(seconds=1), Validity(error=f"is not valid yet ({PERIOD})")),
])  # fmt: skip
def test_validity(now: datetime, verdict: Validity) -> None:
    assert validity(START, END, now) == verdict


def test_validity_warning_window_is_an_argument() -> None:
    assert validity(START, END, END - timedelta(days=20), warn_before=timedelta(days=30)).warning == (
        "expires in 20 days, on 2027-01-01 12:30 UTC"
    )
    assert validity(START, END, END - timedelta(days=2), warn_before=timedelta(0)) == Validity()
