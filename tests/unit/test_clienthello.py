"""The ClientHello parser and the SNI route table, as tables: real ClientHellos made by Python's ssl
(``ssl.MemoryBIO``: TLS 1.2 and 1.3, with and without SNI and ALPN), split across chunks and records,
and every refusal with its reason. No sockets, no loop."""

from __future__ import annotations

import ssl

import pytest

from l4proxy.clienthello import MAX_RECORDS, REASONS, ClientHelloError, Hello, Parser
from l4proxy.config import Address, ListenerConfig
from l4proxy.errors import ConfigError
from l4proxy.sniroutes import Routes, parse_pattern

from ..kit import sni_client_hello as client_hello


def records(flight: bytes, size: int) -> bytes:
    """The same handshake bytes cut into records of at most ``size`` bytes (as a client may send them)."""
    body = flight[5:]
    out = b""
    for at in range(0, len(body), size):
        piece = body[at : at + size]
        out += flight[:3] + len(piece).to_bytes(2, "big") + piece
    return out


def fed(data: bytes, chunk: int | None = None, parser: Parser | None = None) -> Hello | None:
    """Feed ``data`` in chunks of ``chunk`` bytes (all at once by default); the parser's last answer."""
    parser = parser or Parser()
    size = chunk or len(data)
    answer = None
    for at in range(0, len(data), size):
        answer = parser.feed(data[at : at + size])
        if answer is not None:
            return answer
    return answer


V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
HELLOS = [
    ("a.example", V13, ()),
    ("x.b.example", V12, ()),
    ("localhost", None, ("h2", "http/1.1")),
    ("deep.er.b.example", V12, ("http/1.1",)),
    (None, V13, ()),
    (None, V12, ("h2",)),
]


@pytest.mark.parametrize(("name", "version", "alpn"), HELLOS)
def test_the_server_name_of_a_real_client_hello(name: str | None, version: ssl.TLSVersion | None,
                                                alpn: tuple[str, ...]) -> None:  # fmt: skip
    flight = client_hello(name, version, alpn)
    assert fed(flight) == Hello(name)


def test_names_are_compared_in_lower_case() -> None:
    assert fed(client_hello("A.Example")) == Hello("a.example")


@pytest.mark.parametrize("chunk", [1, 2, 5, 6, 7, 64, 300])
def test_a_client_hello_split_over_chunks(chunk: int) -> None:
    flight = client_hello("a.example", V13)
    assert fed(flight, chunk) == Hello("a.example")


def test_every_split_point_needs_the_rest_first() -> None:
    flight = client_hello("split.example", V12)
    for at in range(1, len(flight)):
        parser = Parser()
        assert parser.feed(flight[:at]) is None, at
        assert parser.feed(flight[at:]) == Hello("split.example"), at


@pytest.mark.parametrize(("size", "chunk"), [(16, None), (16, 1), (100, 7), (300, None), (16384, None)])
def test_a_client_hello_over_several_records(size: int, chunk: int | None) -> None:
    flight = client_hello("r.example", V13)
    if size == 16:  # up to MAX_RECORDS records of 16 bytes: a short hand-made hello fits, a real one does not
        flight = _hello_with(_sni((0, b"r.example")))
    assert fed(records(flight, size), chunk) == Hello("r.example")


def test_a_client_hello_in_too_many_records_is_refused() -> None:
    with pytest.raises(ClientHelloError) as caught:
        fed(records(client_hello("r.example", V13), 1))
    assert caught.value.reason == "too_fragmented"


def test_bytes_after_the_client_hello_are_left_alone() -> None:
    flight = client_hello("a.example")
    parser = Parser()
    assert parser.feed(flight + b"\x14\x03\x03\x00\x01\x01" + b"more") == Hello("a.example")
    with pytest.raises(RuntimeError):
        parser.feed(b"")


def _hello_with(extensions: bytes) -> bytes:
    """A TLS 1.2 ClientHello record with these extensions (a hand-made one, for the malformed cases)."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    body += len(extensions).to_bytes(2, "big") + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def _sni(*entries: tuple[int, bytes]) -> bytes:
    names = b"".join(bytes([kind]) + len(name).to_bytes(2, "big") + name for kind, name in entries)
    data = len(names).to_bytes(2, "big") + names
    return b"\x00\x00" + len(data).to_bytes(2, "big") + data


def test_hand_made_hellos() -> None:
    assert fed(_hello_with(_sni((0, b"hand.example")))) == Hello("hand.example")
    assert fed(_hello_with(b"")) == Hello(None)
    assert fed(_hello_with(_sni((0, b"dot.example.")))) == Hello("dot.example")
    assert fed(_hello_with(_sni((1, b"other"), (0, b"second.example")))) == Hello("second.example")
    assert fed(_hello_with(b"\x00\x00\x00\x00")) == Hello(None)  # empty server_name, as a server echoes it
    no_extensions = _hello_with(b"")[:-2]
    no_extensions = no_extensions[:3] + (len(no_extensions) - 5).to_bytes(2, "big") + no_extensions[5:]
    no_extensions = no_extensions[:6] + (len(no_extensions) - 9).to_bytes(3, "big") + no_extensions[9:]
    assert fed(no_extensions) == Hello(None)


REFUSALS = [
    (b"GET / HTTP/1.1\r\n", "not_tls", "a TLS handshake record (0x16) expected, got 0x47"),
    (b"\x80\x2e\x01", "not_tls", "a TLS handshake record (0x16) expected, got 0x80"),
    (b"\x16\x02", "bad_record", "TLS record version 2.x, 3.x expected"),
    (b"\x16\x03\x01\x00\x00", "bad_record", "TLS record of 0 bytes, 1..16384 allowed"),
    (b"\x16\x03\x01\x40\x01", "bad_record", "TLS record of 16385 bytes, 1..16384 allowed"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not_client_hello",
     "handshake message type 2, ClientHello (1) expected"),
    (b"\x16\x03\x01\x00\x04\x01\x00\x40\x01", "too_long", "ClientHello declares 16385 bytes, at most 16384"),
    (b"\x16\x03\x01\x00\x02\x01\x00\x17\x03\x03", "not_tls",
     "the ClientHello's next record (0x16) expected, got 0x17"),
    (b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03", "malformed", "ClientHello ends before its session id"),
    (_hello_with(_sni((0, b"bad name"))), "bad_server_name", "server_name b'bad name' is not a host name"),
    (_hello_with(_sni((0, b"")) + b""), "bad_server_name", "server_name b'' is not a host name"),
    (_hello_with(_sni((0, b"a..b"))), "bad_server_name", "server_name b'a..b' is not a host name"),
    (_hello_with(_sni((0, b"\xff.example"))), "bad_server_name", "server_name b'\\xff.example' is not a host name"),
    (_hello_with(b"\x00\x00\x00\x03\x00\x05\x00"), "bad_server_name",
     "server_name extension: its list length does not fit"),
    (_hello_with(_sni((0, b"a.example")) * 2), "malformed", "ClientHello: extension 0 appears twice"),
    (_hello_with(b"\x00\x10\x00\x09"), "malformed", "ClientHello: extension 16 of 9 bytes does not fit"),
    (_hello_with(b"\x00"), "malformed", "ClientHello: stray bytes where an extension header needs 4"),
]


@pytest.mark.parametrize(("data", "reason", "message"), REFUSALS)
def test_refusals_name_their_reason(data: bytes, reason: str, message: str) -> None:
    for chunk in (None, 1):
        with pytest.raises(ClientHelloError) as caught:
            fed(data, chunk)
        assert (caught.value.reason, caught.value.message) == (reason, message)
        assert reason in REASONS


def test_too_many_records_are_refused_at_the_one_over() -> None:
    parser = Parser()
    one = b"\x16\x03\x01\x00\x01"
    pieces = [b"\x01", b"\x00", b"\x00", b"\x80"] + [b"\x00"] * (MAX_RECORDS - 4)  # 128 bytes declared
    assert parser.feed(b"".join(one + piece for piece in pieces)) is None
    with pytest.raises(ClientHelloError) as caught:
        parser.feed(one)
    assert caught.value.reason == "too_fragmented"


def test_what_the_parser_holds_is_bounded() -> None:
    parser = Parser(max_length=100)
    assert parser.max_raw == 100 + 4 + 5 * MAX_RECORDS
    assert parser.feed(b"\x16\x03\x01\x00\x68\x01\x00\x00\x64" + bytes(50)) is None
    assert parser.buffered == 54


# --- routes ----------------------------------------------------------------------------------------

ROUTES = (("a.example", "pa"), ("*.b.example", "pb"), ("*.x.b.example", "px"), ("x.b.example", "exact"))
LOOKUPS = [
    ("a.example", "pa"),
    ("z.a.example", "default"),  # an exact name matches only itself
    ("b.example", "default"),  # a suffix does not match its own base
    ("y.b.example", "pb"),
    ("deep.y.b.example", "pb"),
    ("x.b.example", "exact"),  # exact beats every suffix
    ("y.x.b.example", "px"),  # the longest suffix wins
    ("other.example", "default"),
    (None, "default"),
]


@pytest.mark.parametrize(("name", "pool"), LOOKUPS)
def test_routes_exact_then_the_longest_suffix(name: str | None, pool: str) -> None:
    assert Routes(ROUTES, "default").pool(name) == pool
    assert Routes(tuple(reversed(ROUTES)), "default").pool(name) == pool  # order does not matter


def test_without_a_default_the_rest_is_refused() -> None:
    routes = Routes(ROUTES, None)
    assert (routes.pool("a.example"), routes.pool("other.example"), routes.pool(None)) == ("pa", None, None)


PATTERNS = [
    ("a.example", "a.example"),
    ("A.Example.", "a.example"),
    ("*.b.example", "*.b.example"),
    ("*.example", "*.example"),
    ("localhost", "localhost"),
]
BAD_PATTERNS = ["", "*", "*.", "a.*.example", "a b", "*a.example", "-a.example", "a..example", 7, "é.example"]


@pytest.mark.parametrize(("text", "pattern"), PATTERNS)
def test_patterns_in_canonical_form(text: str, pattern: str) -> None:
    assert parse_pattern(text, "sni") == pattern


@pytest.mark.parametrize("text", BAD_PATTERNS)
def test_bad_patterns_are_refused(text: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pattern(text, f"sni.{text}")
    assert caught.value.path == f"sni.{text}"


LISTENER_ERRORS = [
    ({"sni": {"a.example": "p", "A.example": "q"}}, "sni.A.example 'q': the same name as another route (a.example)"),
    ({"sni": {"a.example": ""}}, "sni.a.example '': expected the name of a pool"),
    ({"sni": "a.example"}, "sni 'a.example': expected a table of server names and pools"),
    ({"sni_strict": True}, "sni_strict True: needs sni routes"),
    ({"sni": {"a.example": "p"}, "sni_timeout": 0.0}, "sni_timeout 0.0: must be greater than 0"),
]


@pytest.mark.parametrize(("settings", "message"), LISTENER_ERRORS)
def test_listener_route_errors(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ListenerConfig(Address("127.0.0.1", 0), **settings)  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)


def test_routes_are_kept_as_canonical_pairs() -> None:
    listener = ListenerConfig(Address("127.0.0.1", 0), sni={"A.example": "p", "*.B.example": "q"})  # type: ignore[arg-type]
    assert listener.sni == (("a.example", "p"), ("*.b.example", "q"))
