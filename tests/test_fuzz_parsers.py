"""Property tests for every parser of user input: whatever is typed, the answer is a value or a
``ConfigError`` (never another exception), values are sane, formatters round-trip, and each call is
quick. Kept to a few seconds in all."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from l4proxy.cli import _size
from l4proxy.config import Address, parse_address, parse_duration, parse_escapes, parse_members
from l4proxy.errors import ConfigError
from l4proxy.workers import MAX_WORKERS, parse_workers

FAST = settings(max_examples=100, deadline=200)

# Text that looks like what people type, plus anything at all.
_ALPHABET = st.sampled_from(list("0123456789abcdefhkmsx.:,[]-_ \\\t²٣ﬀ")) | st.characters()
_HUGE = st.builds(lambda n, d, unit: d * n + unit, st.integers(300, 5000), st.sampled_from("19٣"),
                  st.sampled_from(["", "k", "s", "h"]))  # overflows float and int()'s digit limit
typed = st.text(_ALPHABET, max_size=40) | st.text(max_size=40) | _HUGE


def outcome(parse: Callable[[], Any]) -> Any:
    """The parsed value, or None for a ConfigError; anything else fails the test. Also bounded in time."""
    started = time.perf_counter()
    try:
        return parse()
    except ConfigError:
        return None
    finally:
        assert time.perf_counter() - started < 0.1


@FAST
@given(typed)
@example("9" * 400)
def test_durations_are_finite_non_negative_seconds_or_a_config_error(text: str) -> None:
    seconds = outcome(lambda: parse_duration(text, "--idle-timeout"))
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0)


@FAST
@given(st.integers(0, 10**7), st.sampled_from(["ms", "s", "m", "h", ""]))
def test_durations_in_every_unit_parse_to_their_value(number: int, unit: str) -> None:
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "": 1}[unit]
    assert parse_duration(f"{number}{unit}", "--x") == number * scale


@FAST
@given(st.floats(0, 10**6, allow_nan=False))
def test_durations_as_the_access_log_prints_them_round_trip(seconds: float) -> None:
    assert abs(parse_duration(f"{seconds:.3f}s", "--x") - seconds) <= 0.0005


@FAST
@given(typed)
@example("1" * 5000)
@example("²k")
def test_sizes_are_positive_byte_counts_or_a_config_error(text: str) -> None:
    size = outcome(lambda: _size(text, "--buffer-size", {}))
    assert size is None or (isinstance(size, int) and size >= 0)


@FAST
@given(st.integers(0, 10**6), st.sampled_from(["", "k", "m", "K", "kib", "MiB"]))
def test_sizes_scale_by_their_unit(number: int, unit: str) -> None:
    scale = {"": 1, "k": 1024, "m": 1 << 20, "K": 1024, "kib": 1024, "MiB": 1 << 20}[unit]
    assert _size(f"{number}{unit}", "--buffer-size", {}) == number * scale


@FAST
@given(typed)
@example("1" * 5000)
def test_workers_are_in_range_or_a_config_error(text: str) -> None:
    count = outcome(lambda: parse_workers(text))
    assert count is None or 1 <= count <= MAX_WORKERS


@FAST
@given(typed, st.sampled_from([None, 6379]))
@example("h:" + "1" * 5000, None)
@example("[::1]:" + "9" * 400, None)
def test_addresses_parse_to_a_valid_port_or_a_config_error(text: str, default_port: int | None) -> None:
    address = outcome(lambda: parse_address(text, "--upstream", default_port))
    assert address is None or 1 <= address.port <= 65535 or address.port == default_port


hosts = st.one_of(
    st.ip_addresses().map(str),
    st.lists(st.text("abcz09_", min_size=1, max_size=10), min_size=1, max_size=4).map(".".join),
)
addresses = st.builds(Address, hosts, st.integers(1, 65535))


@FAST
@given(addresses)
def test_an_address_prints_in_a_form_that_parses_back_to_it(address: Address) -> None:
    assert parse_address(str(address), "--upstream") == address


@FAST
@given(st.lists(addresses, min_size=1, max_size=6), st.integers(1, 3))
def test_member_lists_round_trip_however_they_are_split(members: list[Address], groups: int) -> None:
    texts = [",".join(str(m) for m in members[i::groups]) for i in range(groups)]
    texts = [t for t in texts if t]
    parsed = parse_members(texts, "--upstream", 6379)
    expected = [m for i in range(groups) for m in members[i::groups]]
    assert [m.address for m in parsed] == expected


@FAST
@given(st.lists(typed, max_size=4))
def test_member_lists_are_members_or_a_config_error(texts: list[str]) -> None:
    members = outcome(lambda: parse_members(texts, "--upstream", 6379))
    assert members is None or (members and all(1 <= m.address.port <= 65535 for m in members))  # type: ignore[union-attr]


def escape(data: bytes) -> str:
    r"""The text form parse_escapes reads: printable ASCII as is (a backslash doubled), the rest as \xNN."""
    return "".join(
        "\\\\" if b == 0x5C else chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in data
    )


@FAST
@given(st.binary(max_size=64))
def test_escapes_round_trip(data: bytes) -> None:
    assert parse_escapes(escape(data), "--health-send") == data


@FAST
@given(typed)
@example("\\x")
@example("\ud800")
def test_escapes_are_bytes_or_a_config_error(text: str) -> None:
    data = outcome(lambda: parse_escapes(text, "--health-send"))
    assert data is None or isinstance(data, bytes)
