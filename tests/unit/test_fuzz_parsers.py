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

from l4proxy.boundaries import MAX_RESP_LINE, PostgresWatch, RedisWatch, watch_for
from l4proxy.cli import _size
from l4proxy.clienthello import MAX_LENGTH, ClientHelloError, Hello, Parser
from l4proxy.clienthello import REASONS as CLIENT_HELLO_REASONS
from l4proxy.config import Address, parse_address, parse_duration, parse_escapes, parse_members
from l4proxy.errors import ConfigError
from l4proxy.workers import MAX_WORKERS, parse_workers

from .test_clienthello import V12, V13, client_hello, records

FAST = settings(max_examples=100, deadline=200)

# Text that looks like what people type, plus anything at all.
_ALPHABET = st.sampled_from(list("0123456789abcdefhkmsx.:,[]-_ \\\t²٣ﬀ")) | st.characters()
_HUGE = st.builds(
    lambda n, d, unit: d * n + unit,
    st.integers(300, 5000),
    st.sampled_from("19٣"),
    st.sampled_from(["", "k", "s", "h"]),
)  # overflows float and int()'s digit limit
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
    return "".join("\\\\" if b == 0x5C else chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in data)


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


# --- the TLS ClientHello peek (SNI routing) --------------------------------------------------------

_HELLOS = [client_hello(name, version) for name in ("a.example", None) for version in (V12, V13)]


def hello_outcome(chunks: list[bytes], max_length: int = MAX_LENGTH) -> Hello | None:
    """What a parser fed ``chunks`` answers: a Hello, or None for need-more or a ClientHelloError (the
    only exception allowed). It never holds more than its bound, and each feed is quick."""
    parser = Parser(max_length)
    for chunk in chunks:
        started = time.perf_counter()
        try:
            hello = parser.feed(chunk)
        except ClientHelloError as exc:
            assert exc.reason in CLIENT_HELLO_REASONS
            return None
        finally:
            assert time.perf_counter() - started < 0.1
        if hello is not None:
            return hello
        assert parser.buffered <= max_length + 8
    return None


@FAST
@given(st.lists(st.binary(max_size=300), max_size=8))
@example([b"\x16\x03\x01\x00\x01\x01"] * 70)
def test_any_bytes_are_a_hello_need_more_or_a_client_hello_error(chunks: list[bytes]) -> None:
    hello_outcome(chunks)


@FAST
@given(st.sampled_from(_HELLOS), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
       st.integers(1, 64))  # fmt: skip
def test_real_hellos_with_bytes_changed_never_raise_another_error(
    flight: bytes, changes: list[tuple[int, int]], chunk: int
) -> None:
    data = bytearray(flight)
    for at, value in changes:
        data[at % len(data)] = value
    hello = hello_outcome([bytes(data[i : i + chunk]) for i in range(0, len(data), chunk)], max_length=4096)
    assert hello is None or hello.server_name is None or hello.server_name.isascii()


@FAST
@given(st.sampled_from(_HELLOS), st.lists(st.integers(1, 400), min_size=1, max_size=10), st.integers(40, 16384))
def test_real_hellos_give_their_name_however_they_are_cut(flight: bytes, cuts: list[int], record: int) -> None:
    data = records(flight, record)
    chunks, at = [], 0
    for cut in cuts * (len(data) // sum(cuts) + 1):
        chunks.append(data[at : at + cut])
        at += cut
    expected = Parser().feed(flight)
    assert hello_outcome([c for c in chunks if c]) == expected


# --- the safe-moment watches of --drain-at safe (boundaries.py): bytes from the wire, not typed ------


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given points (sorted, deduplicated)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


_WIRE = st.binary(max_size=300) | st.builds(
    lambda parts: b"".join(parts),
    st.lists(st.sampled_from([b"*1\r\n", b"$4\r\nPING\r\n", b"+OK\r\n", b"Z\0\0\0\x05I", b"Q\0\0\0\x05x",
                              b"$-1\r\n", b">1\r\n", b"|1\r\n", b"%2\r\n", b"\r\n", b"\0\0\0\x04", b"*99999\r\n"]),
             max_size=30),
)  # fmt: skip


@FAST
@given(st.lists(st.tuples(st.booleans(), _WIRE), max_size=12), st.sampled_from(["redis", "postgres"]))
def test_watches_take_any_bytes_either_way_without_error_or_growth(
    steps: list[tuple[bool, bytes]], protocol: str
) -> None:
    """Whatever comes, a watch answers True or False, keeps only a bounded partial line or header, and is quick."""
    watch = watch_for(protocol)
    started = time.perf_counter()
    for from_server, data in steps:
        if from_server:
            assert watch.server(data) in (True, False)
        else:
            watch.client(data)
    assert time.perf_counter() - started < 0.1
    for part in ("commands", "replies"):
        lines = getattr(getattr(watch, part, None), "lines", None)
        assert lines is None or len(lines.partial) <= MAX_RESP_LINE
    for part in ("client_frames", "server_frames"):
        frames = getattr(watch, part, None)
        assert frames is None or len(frames.head) < 5


_SET = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
_GET = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
_COMMANDS = st.lists(st.sampled_from([b"*1\r\n$4\r\nPING\r\n", _GET, b"PING\r\n", _SET]), min_size=1, max_size=6)
_REPLIES = st.sampled_from(
    [b"+PONG\r\n", b"$-1\r\n", b"$3\r\nabc\r\n", b"*2\r\n:1\r\n*1\r\n+x\r\n", b"%1\r\n+a\r\n_\r\n"]
)


@FAST
@given(_COMMANDS, st.data())
def test_redis_watch_is_safe_exactly_when_the_last_reply_of_a_batch_is_in(commands: list[bytes], data: Any) -> None:
    """A pipelined batch split anywhere, each way: never safe before its last reply is whole, safe then."""
    commands = [b"*1\r\n$4\r\nPING\r\n", *commands]  # a start is an array at the client's turn
    replies = b"".join(data.draw(_REPLIES) for _ in commands)
    watch = RedisWatch()
    watch.server(b"+OK\r\n")  # the client's turn
    for chunk in chunked(b"".join(commands), data.draw(st.lists(st.integers(0, 500), max_size=5))):
        watch.client(chunk)
    pieces = chunked(replies, data.draw(st.lists(st.integers(0, 500), max_size=5)))
    verdicts = [watch.server(piece) for piece in pieces]
    assert verdicts == [False] * (len(pieces) - 1) + [True]


@FAST
@given(st.lists(st.sampled_from([b"I", b"T", b"E"]), min_size=1, max_size=5), st.data())
def test_postgres_watch_is_safe_only_after_an_idle_ready_for_query_that_answers_the_last_request(
    statuses: list[bytes], data: Any
) -> None:
    watch = PostgresWatch()
    watch.server(b"Z\0\0\0\x05I")  # the server waits: the start
    for status in statuses:
        for chunk in chunked(b"Q\0\0\0\x0dSELECT 1\0", data.draw(st.lists(st.integers(0, 20), max_size=3))):
            watch.client(chunk)
        answer = b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05" + status
        pieces = chunked(answer, data.draw(st.lists(st.integers(0, 20), max_size=3)))
        verdicts = [watch.server(piece) for piece in pieces]
        assert verdicts == [False] * (len(pieces) - 1) + [status == b"I"]
