"""The PROXY protocol, versions 1 and 2 (HAProxy's ``doc/proxy-protocol.txt``): encode and parse.

A proxy in front of a server hides the client's address; the PROXY header restores it. The sender
writes one header before any byte of the connection, the receiver reads it before anything else.

Sending: ``encode_v1(src, dst)`` and ``encode_v2(src, dst, tlvs)`` build the header for a real client;
health probes send ``V1_UNKNOWN`` or ``V2_LOCAL`` (the connection is the proxy's own). TLV builders
(``alpn_tlv``, ``authority_tlv``, ``ssl_tlv``) carry what TLS termination learnt.

Receiving: a ``Parser`` per connection is fed each chunk as it arrives (from ``data_received``). It
answers ``None`` (need more), a ``Parsed`` (the ``Header`` and how many bytes of *that chunk* it took:
the rest is the client's first data, to relay unchanged), or raises ``ProxyProtocolError`` with a
short ``reason`` (for counting, one of ``REASONS``) and a one-line message (for the log). Rules:

* Strict: the header is required and never guessed (the spec's security rule). The first byte already
  tells a v2 signature (``\\r``) or a v1 ``PROXY `` (``P``) from anything else, so a client that
  speaks its own protocol is refused at once, not at the timeout.
* Bounded: a v1 line is at most 107 bytes with its CRLF; a v2 header declares its length in its first
  16 bytes and one over ``max_v2_length`` is refused before its body is read. The parser never holds
  more than that, and each feed costs time linear in what it holds.
* ``LOCAL`` (v2), ``UNKNOWN`` (v1) and v2 ``PROXY`` with the ``UNSPEC`` family are valid and carry no
  addresses (``source``/``destination`` are None): the caller then uses the socket's own addresses.
  A ``LOCAL`` block, whatever its family byte and length, is skipped unread, as the spec says.
* Only TCP is proxied: UDP and UNIX families are refused, as are values the spec leaves unassigned.
* TLVs are kept in wire order; the types this module knows are checked to be what their type says
  (UTF-8 or ASCII text, fixed sizes, well-formed ``PP2_TYPE_SSL`` sub-TLVs), may appear only once,
  and a ``PP2_TYPE_CRC32C`` checksum is verified. Unknown types pass through unread.

Addresses are ``(host, port)`` tuples with the host as an IP literal string, both ways: that is what
transports give (``get_extra_info("peername")``; a v6 4-tuple works, only its first two items are
read), what the access log prints and what ``config.Address`` holds, so a header read on the way in
can be sent on as it is. Parsed hosts are canonical (RFC 5952 for IPv6, plain hex groups) so the same
client always reads the same. The encoder packs each host once (a bounded cache), so a returning
client or the listener's own address costs a dictionary lookup.

Mixed families (an IPv4 client reaching an IPv6 listener address): an IPv4-mapped IPv6 address
(``::ffff:a.b.c.d``) counts as the IPv4 address it maps; when both ends are then IPv4 the header is
TCP4, otherwise TCP6 with the IPv4 end mapped into IPv6, so no address is lost. Scope ids
(``fe80::1%eth0``) cannot be carried and are dropped.

Pure: no sockets, no event loop, no TLS; ``ipaddress`` and ``struct`` only.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import ClientError

Endpoint = tuple[str, int]
Tlv = tuple[int, bytes]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V2_LOCAL = SIGNATURE + b"\x20\x00\x00\x00"
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN" with two full IPv6 addresses and ports, and the CRLF
V2_MAX_LENGTH = 4096  # default bound on a v2 header's body (addresses + TLVs): room for a client certificate

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_SUBTYPE_SSL_GROUP = 0x26
PP2_SUBTYPE_SSL_SIG_SCHEME = 0x27
PP2_SUBTYPE_SSL_CLIENT_CERT = 0x28
PP2_TYPE_NETNS = 0x30

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

REASONS = (
    "not_proxy",  # the connection does not start with a PROXY header
    "v1_too_long",  # no CRLF within 107 bytes (CVE-2021-23351)
    "v1_bad_line_end",  # a CR or LF alone
    "v1_bad_protocol",  # not TCP4, TCP6 or UNKNOWN
    "v1_bad_fields",  # wrong number of fields or spacing
    "v1_bad_address",  # not an address of the announced family in canonical form
    "v1_bad_port",  # not 0..65535 in plain decimal
    "v2_bad_version",  # the version nibble is not 2
    "v2_bad_command",  # neither LOCAL nor PROXY
    "v2_bad_family",  # a family/protocol byte the spec does not assign
    "v2_unsupported_family",  # UDP or UNIX: valid, but this is a TCP proxy (CVE-2024-23325)
    "v2_too_long",  # the declared length is over the bound
    "v2_short_addresses",  # the length cannot hold the family's addresses (CVE-2019-14243)
    "tlv_truncated",  # a TLV runs past the end of the header
    "tlv_invalid",  # a TLV is not what its type says (CVE-2024-23324)
    "tlv_duplicate",  # a TLV type this module interprets appears twice
    "crc32c_mismatch",  # the header's checksum does not match
)


class ProxyProtocolError(ClientError):
    """The PROXY header is malformed: ``reason`` is one of ``REASONS``, the message one line for the log."""


class Command(enum.Enum):
    LOCAL = "local"  # the proxy's own connection (a health probe): use the socket's addresses
    PROXY = "proxy"  # relayed for a client: the header carries its addresses

    __hash__ = object.__hash__  # singletons; Enum's own __hash__ is Python code


class Family(enum.Enum):
    UNSPEC = "unspec"
    TCP4 = "tcp4"
    TCP6 = "tcp6"

    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class SSLInfo:
    """The value of a ``PP2_TYPE_SSL`` TLV: how the client reached the sender over TLS.

    ``client`` holds the ``PP2_CLIENT_*`` bits; ``verify`` is 0 only when a client certificate was
    presented and verified. ``extra`` keeps the sub-TLVs without a field here, in wire order.
    """

    client: int
    verify: int
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    extra: tuple[Tlv, ...] = ()

    @classmethod
    def from_tls(
        cls, version: str, *, cipher: str | None = None, cn: str | None = None, client_cert: bool = False
    ) -> SSLInfo:
        """What a TLS-terminating listener knows; ``client_cert``: a certificate was presented and verified."""
        flags = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS if client_cert else 0)
        return cls(flags, 0 if client_cert else 1, version, cn, cipher)

    @property
    def client_cert_verified(self) -> bool:
        return bool(self.client & PP2_CLIENT_CERT_CONN) and self.verify == 0

    def encode(self) -> bytes:
        subs = [
            (kind, text.encode("utf-8" if kind == PP2_SUBTYPE_SSL_CN else "ascii"))
            for kind, text in (
                (PP2_SUBTYPE_SSL_VERSION, self.version),
                (PP2_SUBTYPE_SSL_CN, self.cn),
                (PP2_SUBTYPE_SSL_CIPHER, self.cipher),
            )
            if text is not None
        ]
        return struct.pack("!BI", self.client, self.verify) + _pack_tlvs([*subs, *self.extra])


class Header(NamedTuple):
    """A parsed PROXY header. ``length`` is its size on the wire; addresses are None without PROXY/TCP.

    A NamedTuple rather than a frozen dataclass: as immutable, and built in a third of the time.
    """

    version: int
    command: Command
    family: Family
    source: Endpoint | None
    destination: Endpoint | None
    tlvs: tuple[Tlv, ...] = ()
    length: int = 0

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of this type, or None."""
        for t, value in self.tlvs:
            if t == kind:
                return value
        return None

    @property
    def alpn(self) -> bytes | None:
        return self.tlv(PP2_TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8")  # checked when parsed

    @property
    def unique_id(self) -> bytes | None:
        return self.tlv(PP2_TYPE_UNIQUE_ID)

    @property
    def ssl(self) -> SSLInfo | None:
        value = self.tlv(PP2_TYPE_SSL)
        return None if value is None else _ssl_info(value)


class Parsed(NamedTuple):
    """A complete header and how many bytes of the chunk just fed belong to it."""

    header: Header
    consumed: int


# --- encoding --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _packed(host: str) -> tuple[bytes | None, bytes]:
    """An IP literal as (4 bytes when IPv4 or IPv4-mapped else None, 16 bytes with IPv4 mapped), once:
    the cache is bounded, so many distinct clients cannot grow it."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])  # a scope id cannot travel in the header
    except ValueError:
        raise ValueError(f"PROXY header: {host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv4Address):
        return ip.packed, b"\0" * 10 + b"\xff\xff" + ip.packed
    return (ip.ipv4_mapped.packed if ip.ipv4_mapped else None), ip.packed


@functools.lru_cache(maxsize=1024)
def _v1_text(host: str) -> tuple[bytes | None, bytes]:
    """The canonical v1 text of a host, as IPv4 (None when it is not) and as IPv6."""
    v4, v6 = _packed(host)
    return (None if v4 is None else _v4_text(v4).encode()), _v6_text(v6).encode()


def _port(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"PROXY header: port {port!r} is not 0..65535")
    return port


def encode_v1(src: Endpoint | None, dst: Endpoint | None) -> bytes:
    """The v1 line for a client at ``src`` that reached ``dst``; ``PROXY UNKNOWN`` when either is None."""
    if src is None or dst is None:
        return V1_UNKNOWN
    (a4, a6), (b4, b6), ports = _v1_text(src[0]), _v1_text(dst[0]), (_port(src[1]), _port(dst[1]))
    if a4 is not None and b4 is not None:
        return b"PROXY TCP4 %s %s %d %d\r\n" % (a4, b4, *ports)
    return b"PROXY TCP6 %s %s %d %d\r\n" % (a6, b6, *ports)


_V2_TCP4 = struct.Struct("!12sBBH4s4sHH")
_V2_TCP6 = struct.Struct("!12sBBH16s16sHH")
_V2_BARE = struct.Struct("!12sBBH")


def encode_v2(src: Endpoint | None, dst: Endpoint | None, tlvs: Iterable[Tlv] = (), *, crc32c: bool = False) -> bytes:
    """The v2 ``PROXY`` header for a client at ``src`` that reached ``dst``, then ``tlvs`` in order.

    Either address None gives the ``UNSPEC`` family (no address block). ``crc32c`` appends a
    ``PP2_TYPE_CRC32C`` TLV with the header's checksum.
    """
    body = _pack_tlvs(tlvs)
    if crc32c:
        body += b"\x03\x00\x04\x00\x00\x00\x00"
    if src is None or dst is None:
        header = _V2_BARE.pack(SIGNATURE, 0x21, 0x00, _length(len(body))) + body
    else:
        (a4, a6), (b4, b6), sport, dport = _packed(src[0]), _packed(dst[0]), _port(src[1]), _port(dst[1])
        if a4 is not None and b4 is not None:
            header = _V2_TCP4.pack(SIGNATURE, 0x21, 0x11, _length(12 + len(body)), a4, b4, sport, dport) + body
        else:
            header = _V2_TCP6.pack(SIGNATURE, 0x21, 0x21, _length(36 + len(body)), a6, b6, sport, dport) + body
    if crc32c:
        header = header[:-4] + crc32c_of(header).to_bytes(4, "big")
    return header


def _length(n: int) -> int:
    if n > 0xFFFF:
        raise ValueError(f"PROXY v2 header: {n} bytes of addresses and TLVs, at most 65535 fit")
    return n


def _pack_tlvs(tlvs: Iterable[Tlv]) -> bytes:
    out = []
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"PROXY v2 TLV: type {kind!r} must be 0..255 and its value at most 65535 bytes")
        out.append(struct.pack("!BH", kind, len(value)) + value)
    return b"".join(out)


def alpn_tlv(protocol: str | bytes) -> Tlv:
    """``PP2_TYPE_ALPN``: the protocol TLS negotiated with the client (``ssl`` gives it as str)."""
    return PP2_TYPE_ALPN, protocol.encode() if isinstance(protocol, str) else protocol


def authority_tlv(name: str) -> Tlv:
    """``PP2_TYPE_AUTHORITY``: the host name the client asked for (TLS SNI), UTF-8."""
    return PP2_TYPE_AUTHORITY, name.encode("utf-8")


def ssl_tlv(info: SSLInfo) -> Tlv:
    """``PP2_TYPE_SSL`` with its client and verify fields and sub-TLVs (version, client CN, cipher)."""
    return PP2_TYPE_SSL, info.encode()


# --- address text ----------------------------------------------------------------------------------


def _v4_text(packed: bytes) -> str:
    return f"{packed[0]}.{packed[1]}.{packed[2]}.{packed[3]}"


@functools.lru_cache(maxsize=1024)
def _v6_text(packed: bytes) -> str:
    """RFC 5952 text in plain hex groups (the v1 grammar), the same on every Python version."""
    groups = struct.unpack("!8H", packed)
    best, best_len, i = 0, 0, 0
    while i < 8:  # the longest run of zero groups, the first on a tie, compressed if at least 2 long
        j = i
        while j < 8 and groups[j] == 0:
            j += 1
        if j - i > best_len:
            best, best_len = i, j - i
        i = j + 1
    hexes = [f"{g:x}" for g in groups]
    if best_len < 2:
        return ":".join(hexes)
    return ":".join(hexes[:best]) + "::" + ":".join(hexes[best + best_len :])


# --- parsing ---------------------------------------------------------------------------------------


class Parser:
    """Reads the one PROXY header at the start of a connection, from chunks as they arrive.

    The common case, a whole header in the first chunk, is parsed straight from that chunk; only a
    header split across chunks is buffered (bounded, see the module rules). After a header or an
    error the parser is spent: a further ``feed`` is a caller bug and raises ``RuntimeError``.
    """

    __slots__ = ("_buffer", "_done", "max_v2_length")

    def __init__(self, max_v2_length: int = V2_MAX_LENGTH) -> None:
        self.max_v2_length = max_v2_length
        self._buffer = b""
        self._done = False

    @property
    def buffered(self) -> int:
        """Bytes held while the header is incomplete: at most 106 (v1) or 16 + ``max_v2_length`` (v2)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Parsed | None:
        """Take the next chunk: None while the header is incomplete, else the header and its share of ``data``."""
        if self._done:
            raise RuntimeError("the PROXY header was already read (or refused) on this connection")
        before = len(self._buffer)
        buf = self._buffer + data if before else data
        try:
            length = _frame(buf, self.max_v2_length)
            if not length:
                self._buffer = bytes(buf)
                return None
            header = _decode_v2(buf, length) if buf[0] == 0x0D else _decode_v1(buf, length)
        except ProxyProtocolError:
            self._done, self._buffer = True, b""
            raise
        self._done, self._buffer = True, b""
        return Parsed(header, length - before)


def _frame(buf: bytes, max_v2: int) -> int:
    """The header's total length once all of it is in ``buf``, 0 while more is needed; raises when
    nothing that starts like ``buf`` can be a valid header (checked as early as the bytes allow)."""
    if not buf:
        return 0
    if buf[0] == 0x0D:
        return _frame_v2(buf, max_v2)
    n = min(len(buf), 6)
    if buf[:n] != b"PROXY "[:n]:
        raise ProxyProtocolError("not_proxy", f"PROXY header expected, got {bytes(buf[:16])!r}")
    return _frame_v1(buf)


def _frame_v1(buf: bytes) -> int:
    cr = buf.find(b"\r", 0, V1_MAX_LENGTH - 1)  # a CR at index 106 would end the line past 107 bytes
    lf = buf.find(b"\n", 0, V1_MAX_LENGTH if cr < 0 else cr + 2)
    if cr < 0:
        if lf >= 0:
            raise ProxyProtocolError("v1_bad_line_end", "PROXY v1 line ends with LF alone, CRLF expected")
        if len(buf) >= V1_MAX_LENGTH - 1:
            raise ProxyProtocolError("v1_too_long", f"PROXY v1 line has no CRLF within {V1_MAX_LENGTH} bytes")
        return 0
    if 0 <= lf < cr:
        raise ProxyProtocolError("v1_bad_line_end", "PROXY v1 line has an LF before its CRLF")
    if len(buf) == cr + 1:
        return 0
    if lf != cr + 1:
        raise ProxyProtocolError("v1_bad_line_end", "PROXY v1 line has a CR not followed by LF")
    return cr + 2


def _frame_v2(buf: bytes, max_v2: int) -> int:
    n = min(len(buf), 12)
    if buf[:n] != SIGNATURE[:n]:
        raise ProxyProtocolError("not_proxy", f"PROXY header expected, got {bytes(buf[:16])!r}")
    if len(buf) > 12:
        if buf[12] >> 4 != 2:
            raise ProxyProtocolError(
                "v2_bad_version", f"PROXY v2 header: version {buf[12] >> 4} in byte 13, 2 expected"
            )
        if buf[12] & 0x0F > 1:
            raise ProxyProtocolError(
                "v2_bad_command", f"PROXY v2 header: command {buf[12] & 0x0F}, LOCAL (0) or PROXY (1) expected"
            )
    if len(buf) < 16:
        return 0
    length = (buf[14] << 8) | buf[15]
    if length > max_v2:
        raise ProxyProtocolError(
            "v2_too_long", f"PROXY v2 header declares {length} bytes after its first 16, at most {max_v2}"
        )
    if buf[12] & 0x0F == 1:  # PROXY: the family must be ours and fit; LOCAL ignores it
        need = _address_length(buf[13])
        if length < need:
            raise ProxyProtocolError(
                "v2_short_addresses",
                f"PROXY v2 header: family 0x{buf[13]:02x} needs {need} address bytes, length is {length}",
            )
    return 16 + length if len(buf) >= 16 + length else 0


_ADDRESS_LENGTHS = {0x00: 0, 0x11: 12, 0x21: 36}
_UNSUPPORTED = {0x12: "UDP over IPv4", 0x22: "UDP over IPv6", 0x31: "UNIX stream", 0x32: "UNIX datagram"}


def _address_length(family: int) -> int:
    need = _ADDRESS_LENGTHS.get(family)
    if need is not None:
        return need
    if family in _UNSUPPORTED:
        raise ProxyProtocolError(
            "v2_unsupported_family", f"PROXY v2 header: {_UNSUPPORTED[family]} is not proxied here, TCP only"
        )
    raise ProxyProtocolError("v2_bad_family", f"PROXY v2 header: family/protocol byte 0x{family:02x} is not assigned")


_TCP4_BLOCK = struct.Struct("!8BHH")


def _decode_v2(buf: bytes, end: int) -> Header:
    if buf[12] & 0x0F == 0:
        return Header(2, Command.LOCAL, Family.UNSPEC, None, None, (), end)
    family = buf[13]
    if family == 0x11:
        a0, a1, a2, a3, b0, b1, b2, b3, sport, dport = _TCP4_BLOCK.unpack_from(buf, 16)
        src, dst = (f"{a0}.{a1}.{a2}.{a3}", sport), (f"{b0}.{b1}.{b2}.{b3}", dport)
        return Header(2, Command.PROXY, Family.TCP4, src, dst, _tlvs(buf, 28, end), end)
    if family == 0x21:
        sport, dport = struct.unpack_from("!HH", buf, 48)
        src, dst = (_v6_text(bytes(buf[16:32])), sport), (_v6_text(bytes(buf[32:48])), dport)
        return Header(2, Command.PROXY, Family.TCP6, src, dst, _tlvs(buf, 52, end), end)
    return Header(2, Command.PROXY, Family.UNSPEC, None, None, _tlvs(buf, 16, end), end)


def _decode_v1(buf: bytes, end: int) -> Header:
    proto, sep, rest = bytes(buf[6 : end - 2]).partition(b" ")
    if proto == b"UNKNOWN":  # the spec: ignore whatever follows, up to the CRLF
        return Header(1, Command.PROXY, Family.UNSPEC, None, None, (), end)
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(
            "v1_bad_protocol", f"PROXY v1 line: protocol {proto[:16]!r}, TCP4, TCP6 or UNKNOWN expected"
        )
    fields = rest.split(b" ")
    if not sep or len(fields) != 4:
        raise ProxyProtocolError(
            "v1_bad_fields", f"PROXY v1 line: {rest!r} after {proto.decode()}, source destination ports expected"
        )
    v6 = proto == b"TCP6"
    src = (_v1_address(fields[0], v6), _v1_port(fields[2]))
    dst = (_v1_address(fields[1], v6), _v1_port(fields[3]))
    return Header(1, Command.PROXY, Family.TCP6 if v6 else Family.TCP4, src, dst, (), end)


def _v1_address(token: bytes, v6: bool) -> str:
    try:
        if not v6:
            return _v1_ipv4(token)
        text = token.decode("ascii")
        if "%" in text:
            raise ValueError("scope id")
        return _v6_text(ipaddress.IPv6Address(text).packed)
    except ValueError:  # UnicodeDecodeError and AddressValueError included
        family = "IPv6" if v6 else "IPv4"
        raise ProxyProtocolError(
            "v1_bad_address", f"PROXY v1 line: {token[:48]!r} is not an {family} address"
        ) from None


def _v1_ipv4(token: bytes) -> str:
    """Dotted-quad text as the spec writes it: four decimal octets 0..255, no leading zeros (what
    ``ipaddress.IPv4Address`` accepts, at a tenth of its cost on the per-connection path)."""
    octets = token.split(b".")
    if len(octets) != 4:
        raise ValueError("not four octets")
    for octet in octets:
        if not (octet.isdigit() and len(octet) <= 3 and (octet[0] != 0x30 or len(octet) == 1) and int(octet) <= 255):
            raise ValueError("not an octet")
    return token.decode("ascii")


def _v1_port(token: bytes) -> int:
    if token.isdigit() and len(token) <= 5 and (token[:1] != b"0" or token == b"0"):
        port = int(token)
        if port <= 0xFFFF:
            return port
    raise ProxyProtocolError(
        "v1_bad_port", f"PROXY v1 line: port {token[:16]!r}, 0..65535 without leading zeros expected"
    )


# --- TLVs ------------------------------------------------------------------------------------------


def _split_tlvs(buf: bytes, start: int, end: int, where: str) -> list[tuple[int, int, bytes]]:
    """(type, value offset, value) for each TLV in ``buf[start:end]``, which they must fill exactly."""
    out = []
    i = start
    while i < end:
        if end - i < 3:
            raise ProxyProtocolError(
                "tlv_truncated", f"PROXY v2 {where}: {end - i} stray bytes where a TLV header needs 3"
            )
        kind, length = buf[i], (buf[i + 1] << 8) | buf[i + 2]
        if i + 3 + length > end:
            raise ProxyProtocolError(
                "tlv_truncated",
                f"PROXY v2 {where}: TLV 0x{kind:02x} of {length} bytes runs past the end ({end - i - 3})",
            )
        out.append((kind, i + 3, bytes(buf[i + 3 : i + 3 + length])))
        i += 3 + length
    return out


def _tlvs(buf: bytes, start: int, end: int) -> tuple[Tlv, ...]:
    if start == end:
        return ()
    seen: set[int] = set()
    crc_at = -1
    tlvs = []
    for kind, at, value in _split_tlvs(buf, start, end, "header"):
        check = _CHECKS.get(kind)
        if check is not None:
            if kind in seen:
                raise ProxyProtocolError("tlv_duplicate", f"PROXY v2 header: TLV 0x{kind:02x} appears twice")
            seen.add(kind)
            check(value)
            if kind == PP2_TYPE_CRC32C:
                crc_at = at
        tlvs.append((kind, value))
    if crc_at >= 0:
        _verify_crc(buf, end, crc_at)
    return tuple(tlvs)


def _invalid(what: str) -> ProxyProtocolError:
    return ProxyProtocolError("tlv_invalid", f"PROXY v2 header: {what}")


def _text(value: bytes, encoding: str, what: str) -> str:
    try:
        return value.decode(encoding)
    except UnicodeDecodeError:
        raise _invalid(f"{what} is not {'UTF-8' if encoding == 'utf-8' else 'ASCII'}: {value[:32]!r}") from None


def _check_crc(value: bytes) -> None:
    if len(value) != 4:
        raise _invalid(f"CRC32C TLV is {len(value)} bytes, 4 expected")


def _check_unique_id(value: bytes) -> None:
    if len(value) > 128:
        raise _invalid(f"UNIQUE_ID TLV is {len(value)} bytes, at most 128 allowed")


_SSL_TEXT = {
    PP2_SUBTYPE_SSL_VERSION: ("ascii", "SSL version"),
    PP2_SUBTYPE_SSL_CN: ("utf-8", "SSL client CN"),
    PP2_SUBTYPE_SSL_CIPHER: ("ascii", "SSL cipher"),
    PP2_SUBTYPE_SSL_SIG_ALG: ("ascii", "SSL signature algorithm"),
    PP2_SUBTYPE_SSL_KEY_ALG: ("ascii", "SSL key algorithm"),
    PP2_SUBTYPE_SSL_GROUP: ("ascii", "SSL group"),
    PP2_SUBTYPE_SSL_SIG_SCHEME: ("ascii", "SSL signature scheme"),
}


def _ssl_info(value: bytes) -> SSLInfo:
    """Decode and check a ``PP2_TYPE_SSL`` value: 5 bytes of fields, then sub-TLVs filling the rest."""
    if len(value) < 5:
        raise _invalid(f"SSL TLV is {len(value)} bytes, shorter than its 5 bytes of client and verify fields")
    client, verify = struct.unpack_from("!BI", value)
    texts: dict[int, str] = {}
    extra = []
    for kind, _at, sub in _split_tlvs(value, 5, len(value), "SSL TLV"):
        spec = _SSL_TEXT.get(kind)
        if spec is None:
            extra.append((kind, sub))
            continue
        if kind in texts:
            raise ProxyProtocolError("tlv_duplicate", f"PROXY v2 header: SSL sub-TLV 0x{kind:02x} appears twice")
        texts[kind] = _text(sub, *spec)
        if kind not in (PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN, PP2_SUBTYPE_SSL_CIPHER):
            extra.append((kind, sub))
    get = texts.get
    return SSLInfo(
        client, verify, get(PP2_SUBTYPE_SSL_VERSION), get(PP2_SUBTYPE_SSL_CN), get(PP2_SUBTYPE_SSL_CIPHER), tuple(extra)
    )


def _check_text(encoding: str, what: str) -> Callable[[bytes], Any]:
    return lambda value: _text(value, encoding, what)


_CHECKS: dict[int, Callable[[bytes], Any]] = {
    PP2_TYPE_ALPN: lambda value: None,  # opaque bytes, but once only
    PP2_TYPE_AUTHORITY: _check_text("utf-8", "AUTHORITY TLV"),
    PP2_TYPE_CRC32C: _check_crc,
    PP2_TYPE_UNIQUE_ID: _check_unique_id,
    PP2_TYPE_SSL: _ssl_info,
    PP2_TYPE_NETNS: _check_text("ascii", "NETNS TLV"),
}


# --- CRC32C (RFC 4960 appendix B, the Castagnoli polynomial) ---------------------------------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c_of(data: bytes) -> int:
    """CRC32C of ``data``; only headers that carry a checksum pay for it."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _verify_crc(buf: bytes, end: int, at: int) -> None:
    header = bytes(buf[:end])
    sent = int.from_bytes(header[at : at + 4], "big")
    computed = crc32c_of(header[:at] + b"\0\0\0\0" + header[at + 4 :])
    if sent != computed:
        raise ProxyProtocolError(
            "crc32c_mismatch", f"PROXY v2 header: CRC32C 0x{sent:08x}, the header sums to 0x{computed:08x}"
        )
