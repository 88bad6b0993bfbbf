"""The server name in a TLS ClientHello (RFC 8446 section 4.1.2, RFC 6066 section 3), read without
terminating TLS: what a listener with SNI routes needs to pick a pool.

A ``Parser`` per connection is fed each chunk of the client's first bytes as they arrive. It answers
``None`` (need more) or a ``Hello`` (its ``server_name``, lower case without a trailing dot, or None
when the client sent no SNI), or raises ``ClientHelloError`` with a short ``reason`` (for counting,
one of ``REASONS``) and a one-line message (for the log). The bytes fed are not changed or kept for the
caller: whoever reads them next relays them to the member as they are. Rules:

* Early: the first byte tells a TLS handshake record (``0x16``) from anything else, so a client speaking
  another protocol is refused at once, not at the timeout. Every field is checked as soon as it has
  arrived.
* Split: the ClientHello may span several TLS records (each one checked: a handshake record, version
  3.x, 1..2^14 bytes) and any number of chunks; records are joined before the message is read.
* Bounded: a ClientHello declaring more than ``max_length`` bytes (16 KiB by default, room for large
  post-quantum key shares) is refused before its body arrives, as is one spread over more than
  ``MAX_RECORDS`` records, so the parser never holds more than ``max_length + 4`` bytes of message and
  never needs more than ``max_raw`` bytes from the wire. Each feed costs time linear in its chunk.
* Nothing but its own error: any other exception from a feed is a bug.

Pure: no sockets, no event loop, no TLS library.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ClientError

MAX_LENGTH = 16384  # default bound on the ClientHello message body
MAX_RECORDS = 64  # a ClientHello cut into more records than this is not a client we serve
RECORD_MAX = 1 << 14  # RFC 8446 section 5.1: a plaintext record's fragment is at most 2^14 bytes
HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
SERVER_NAME = 0x0000
HOST_NAME = 0x00

REASONS = (
    "not_tls",  # the first record is not a TLS handshake record
    "bad_record",  # a record's version or length is not what TLS allows
    "not_client_hello",  # the first handshake message is another one
    "too_long",  # the ClientHello declares more than max_length bytes
    "too_fragmented",  # more than MAX_RECORDS records before the ClientHello is whole
    "malformed",  # a length inside the ClientHello runs past its end, or a field is out of range
    "bad_server_name",  # the server_name extension is malformed or its name is not a host name
)


class ClientHelloError(ClientError):
    """Not a TLS ClientHello we can route: ``reason`` is one of ``REASONS``, the message one log line."""


@dataclass(frozen=True, slots=True)
class Hello:
    """What routing needs from a ClientHello: the name the client asked for, None without SNI."""

    server_name: str | None


class Parser:
    """Reads the ClientHello at the start of a connection, from chunks as they arrive. After an answer
    or an error the parser is spent: a further ``feed`` is a caller bug and raises ``RuntimeError``."""

    __slots__ = ("_done", "_header", "_left", "_message", "_records", "max_length")

    def __init__(self, max_length: int = MAX_LENGTH) -> None:
        self.max_length = max_length
        self._header = bytearray()  # the record header being read (at most 5 bytes)
        self._left = 0  # bytes of the current record's fragment still to come
        self._message = bytearray()  # handshake bytes joined from the records so far
        self._records = 0
        self._done = False

    @property
    def max_raw(self) -> int:
        """The most bytes of the wire a ClientHello within the bounds can take: record headers included."""
        return self.max_length + 4 + 5 * MAX_RECORDS

    @property
    def buffered(self) -> int:
        """Bytes held while the ClientHello is incomplete: at most ``max_length + 4 + 4``."""
        return len(self._header) + len(self._message)

    def feed(self, data: bytes) -> Hello | None:
        """Take the next chunk: None while the ClientHello is incomplete, else what it asks for."""
        if self._done:
            raise RuntimeError("the ClientHello was already read (or refused) on this connection")
        try:
            hello = self._feed(memoryview(data))
        except ClientHelloError:
            self._spend()
            raise
        if hello is not None:
            self._spend()
        return hello

    def _spend(self) -> None:
        self._done = True
        self._header, self._message = bytearray(), bytearray()

    def _feed(self, data: memoryview) -> Hello | None:
        at = 0
        while at < len(data):
            if self._left == 0:
                take = min(5 - len(self._header), len(data) - at)
                self._header += data[at : at + take]
                at += take
                self._check_header()
                if len(self._header) < 5:
                    return None
                self._left = (self._header[3] << 8) | self._header[4]
                self._header.clear()
                continue
            take = min(self._left, len(data) - at)
            self._message += data[at : at + take]
            self._left -= take
            at += take
            hello = self._check_message()
            if hello is not None:
                return hello
        return None

    def _check_header(self) -> None:
        """Check the record header as far as it has arrived (RFC 8446 section 5.1)."""
        header = self._header
        if header[0] != HANDSHAKE:
            what = "a TLS handshake record" if not self._message else "the ClientHello's next record"
            raise ClientHelloError("not_tls", f"{what} (0x16) expected, got 0x{header[0]:02x}")
        if len(header) >= 2 and header[1] != 3:
            raise ClientHelloError("bad_record", f"TLS record version {header[1]}.x, 3.x expected")
        if len(header) == 5:
            length = (header[3] << 8) | header[4]
            if not 1 <= length <= RECORD_MAX:
                raise ClientHelloError("bad_record", f"TLS record of {length} bytes, 1..{RECORD_MAX} allowed")
            self._records += 1
            if self._records > MAX_RECORDS:
                raise ClientHelloError("too_fragmented", f"ClientHello spread over more than {MAX_RECORDS} records")

    def _check_message(self) -> Hello | None:
        """The Hello once the whole message is joined; the type and length are checked on arrival."""
        message = self._message
        if message[0] != CLIENT_HELLO:
            raise ClientHelloError("not_client_hello", f"handshake message type {message[0]}, ClientHello (1) expected")
        if len(message) < 4:
            return None
        length = int.from_bytes(message[1:4], "big")
        if length > self.max_length:
            raise ClientHelloError("too_long", f"ClientHello declares {length} bytes, at most {self.max_length}")
        if len(message) < 4 + length:
            return None
        return Hello(server_name(bytes(message[4 : 4 + length])))


def server_name(body: bytes) -> str | None:
    """The host name in a ClientHello's body (after its 4-byte handshake header), None without SNI."""
    at = 2 + 32  # legacy_version, random
    at = _skip(body, at, 1, 0, 32, "session id")
    at = _skip(body, at, 2, 2, 0xFFFE, "cipher suites")
    at = _skip(body, at, 1, 1, 0xFF, "compression methods")
    if at == len(body):
        return None  # no extensions at all (allowed before TLS 1.3)
    end = _skip(body, at, 2, 0, 0xFFFF, "extensions")
    if end != len(body):
        raise ClientHelloError("malformed", f"ClientHello: {len(body) - end} bytes after its extensions")
    at += 2
    seen: set[int] = set()
    name: str | None = None
    while at < end:
        if end - at < 4:
            raise ClientHelloError("malformed", "ClientHello: stray bytes where an extension header needs 4")
        kind = (body[at] << 8) | body[at + 1]
        after = _skip(body, at + 2, 2, 0, end - at - 4, f"extension {kind}")
        if kind in seen:
            raise ClientHelloError("malformed", f"ClientHello: extension {kind} appears twice")
        seen.add(kind)
        if kind == SERVER_NAME:
            name = _host_name(body[at + 4 : after])
        at = after
    return name


def _skip(body: bytes, at: int, size: int, least: int, most: int, what: str) -> int:
    """The offset after the vector at ``at`` whose length takes ``size`` bytes (least..most long)."""
    if at + size > len(body):
        raise ClientHelloError("malformed", f"ClientHello ends before its {what}")
    length = int.from_bytes(body[at : at + size], "big")
    if not least <= length <= most or at + size + length > len(body):
        raise ClientHelloError("malformed", f"ClientHello: {what} of {length} bytes does not fit")
    return at + size + length


def _host_name(extension: bytes) -> str | None:
    """The first host_name of a server_name extension; an empty extension (a server's echo) is no name."""
    if not extension:
        return None
    if len(extension) < 2 or int.from_bytes(extension[:2], "big") != len(extension) - 2:
        raise ClientHelloError("bad_server_name", "server_name extension: its list length does not fit")
    at = 2
    while at < len(extension):
        if len(extension) - at < 3:
            raise ClientHelloError("bad_server_name", "server_name extension: an entry is cut short")
        kind, length = extension[at], int.from_bytes(extension[at + 1 : at + 3], "big")
        value = extension[at + 3 : at + 3 + length]
        if len(value) != length:
            raise ClientHelloError("bad_server_name", "server_name extension: an entry runs past its end")
        if kind == HOST_NAME:
            return _checked_name(value)
        at += 3 + length
    return None


def _checked_name(value: bytes) -> str:
    """RFC 6066: an ASCII host name, without the trailing dot; compared in lower case."""
    text = value.decode("ascii", "replace").lower()
    if text.endswith("."):
        text = text[:-1]
    labels = text.split(".")
    if not text or len(text) > 253 or not all(_label(label) for label in labels):
        raise ClientHelloError("bad_server_name", f"server_name {bytes(value[:64])!r} is not a host name")
    return text


_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _label(label: str) -> bool:
    return (
        0 < len(label) <= 63
        and not label.startswith("-")
        and not label.endswith("-")
        and _LABEL_CHARS.issuperset(label)
    )
