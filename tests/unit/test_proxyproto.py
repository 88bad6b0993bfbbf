"""The PROXY protocol module as tables: addresses → exact header bytes, header bytes → parsed header or
exact refusal reason, then every split point of a valid header, round trips, and hypothesis fuzzing.

Covers the pure side of RELIABILITY.md cases 28, 29 and 33: valid v1/v2 headers (TCP4, TCP6,
UNKNOWN/LOCAL), byte-exact output, and each malformed form named after the CVE it reproduces. The byte
layouts come from HAProxy's ``doc/proxy-protocol.txt``. Pure: no sockets, no loop.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4proxy.proxyproto import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_SIG_ALG,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    REASONS,
    SIGNATURE,
    V1_UNKNOWN,
    V2_LOCAL,
    V2_MAX_LENGTH,
    Command,
    Family,
    Header,
    Parsed,
    Parser,
    ProxyProtocolError,
    SSLInfo,
    _v6_text,
    alpn_tlv,
    authority_tlv,
    crc32c_of,
    encode_v1,
    encode_v2,
    ssl_tlv,
)

PROXY, LOCAL = Command.PROXY, Command.LOCAL
TCP4, TCP6, UNSPEC = Family.TCP4, Family.TCP6, Family.UNSPEC


def h(text: str) -> bytes:
    """Hex with spaces for readability."""
    return bytes.fromhex(text)


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header by hand: signature, version/command, family, length (default: the body's)."""
    size = len(body) if length is None else length
    return SIGNATURE + bytes((ver_cmd, fam)) + size.to_bytes(2, "big") + body


def tlv(kind: int, value: bytes, length: int | None = None) -> bytes:
    return bytes((kind,)) + (len(value) if length is None else length).to_bytes(2, "big") + value


def parse(data: bytes, **kwargs: Any) -> Parsed | None:
    return Parser(**kwargs).feed(data)


def refusal(data: bytes, **kwargs: Any) -> ProxyProtocolError:
    with pytest.raises(ProxyProtocolError) as caught:
        Parser(**kwargs).feed(data)
    return caught.value


TCP4_BLOCK = h("c0a80001 c0a8000b dc04 01bb")  # 192.168.0.1:56324 -> 192.168.0.11:443
TCP6_BLOCK = h("20010db8000000000000000000000001 20010db8000000000000000000000002 04d2 01bb")
SSL_VALUE = h("07 00000000") + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client")

# --- encoding --------------------------------------------------------------------------------------

ENCODE_V1 = {
    "the spec's TCP4 example": (
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    ),
    "TCP6, compressed text": (
        ("2001:db8::1", 1234),
        ("2001:db8::2", 443),
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 443\r\n",
    ),
    "the spec's longest TCP6 line (104 bytes)": (
        (":".join(["ffff"] * 8), 65535),
        (":".join(["ffff"] * 8), 65535),
        b"PROXY TCP6 " + b":".join([b"ffff"] * 8) + b" " + b":".join([b"ffff"] * 8) + b" 65535 65535\r\n",
    ),
    "a v6 peername 4-tuple, scope id dropped": (
        ("fe80::1%eth0", 1, 0, 2),
        ("fe80::2", 2, 0, 2),
        b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n",
    ),
    "uncompressed input is written canonically": (
        ("2001:0DB8:0:0:0:0:0:1", 1),
        ("::1", 0),
        b"PROXY TCP6 2001:db8::1 ::1 1 0\r\n",
    ),
    "mixed: a v4-mapped end counts as IPv4": (
        ("10.0.0.1", 1),
        ("::ffff:10.0.0.2", 2),
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n",
    ),
    "mixed: both v4-mapped (dual-stack socket) is TCP4": (
        ("::ffff:10.0.0.1", 1),
        ("::ffff:10.0.0.2", 2),
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n",
    ),
    "mixed: IPv4 client, IPv6 listener maps the client": (
        ("10.0.0.1", 1),
        ("2001:db8::2", 2),
        b"PROXY TCP6 ::ffff:a00:1 2001:db8::2 1 2\r\n",
    ),
    "unknown source": (None, ("10.0.0.2", 2), b"PROXY UNKNOWN\r\n"),
    "unknown destination": (("10.0.0.1", 1), None, b"PROXY UNKNOWN\r\n"),
}


@pytest.mark.parametrize(("src", "dst", "expected"), ENCODE_V1.values(), ids=ENCODE_V1.keys())
def test_encode_v1(src: Any, dst: Any, expected: bytes) -> None:
    assert encode_v1(src, dst) == expected
    assert len(expected) <= 107


ENCODE_V2 = {
    "TCP4": (("192.168.0.1", 56324), ("192.168.0.11", 443), (), v2(0x21, 0x11, TCP4_BLOCK)),
    "TCP6": (("2001:db8::1", 1234), ("2001:db8::2", 443), (), v2(0x21, 0x21, TCP6_BLOCK)),
    "mixed: IPv4 client, IPv6 listener": (
        ("10.0.0.1", 1),
        ("2001:db8::2", 2),
        (),
        v2(0x21, 0x21, h("00000000000000000000ffff0a000001 20010db8000000000000000000000002 0001 0002")),
    ),
    "mixed: v4-mapped is TCP4": (
        ("::ffff:10.0.0.1", 1),
        ("10.0.0.2", 2),
        (),
        v2(0x21, 0x11, h("0a000001 0a000002 0001 0002")),
    ),
    "unknown addresses: PROXY with UNSPEC": (None, None, (), v2(0x21, 0x00, b"")),
    "TLVs in the caller's order, after the addresses": (
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
        (
            alpn_tlv("h2"),
            authority_tlv("example.com"),
            ssl_tlv(SSLInfo.from_tls("TLSv1.3", cn="client", client_cert=True)),
        ),
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x20, SSL_VALUE)),
    ),
    "SSL without a client certificate: verify is non-zero": (
        None,
        None,
        (ssl_tlv(SSLInfo.from_tls("TLSv1.2", cipher="ECDHE-RSA-AES128-GCM-SHA256")),),
        v2(0x21, 0x00, tlv(0x20, h("01 00000001") + tlv(0x21, b"TLSv1.2") + tlv(0x23, b"ECDHE-RSA-AES128-GCM-SHA256"))),
    ),
    "UTF-8 SNI and CN": (
        None,
        None,
        (authority_tlv("bücher.example"), ssl_tlv(SSLInfo(PP2_CLIENT_SSL, 0, cn="Zoë"))),
        v2(0x21, 0x00, tlv(0x02, "bücher.example".encode()) + tlv(0x20, h("01 00000000") + tlv(0x22, "Zoë".encode()))),
    ),
}


@pytest.mark.parametrize(("src", "dst", "tlvs", "expected"), ENCODE_V2.values(), ids=ENCODE_V2.keys())
def test_encode_v2(src: Any, dst: Any, tlvs: Any, expected: bytes) -> None:
    assert encode_v2(src, dst, tlvs) == expected


def test_health_probe_headers() -> None:
    """HAProxy's check-send-proxy: v1 probes say UNKNOWN, v2 probes say LOCAL with no address block."""
    assert V1_UNKNOWN == b"PROXY UNKNOWN\r\n"
    assert h("0d0a0d0a000d0a515549540a 20 00 0000") == V2_LOCAL
    assert parse(V2_LOCAL) == Parsed(Header(2, LOCAL, UNSPEC, None, None, (), 16), 16)
    assert parse(V1_UNKNOWN) == Parsed(Header(1, PROXY, UNSPEC, None, None, (), 15), 15)


def test_crc32c() -> None:
    """RFC 4960's check value, and a header whose checksum field the receiver verifies."""
    assert crc32c_of(b"123456789") == 0xE3069283
    plain = encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), [alpn_tlv("h2")])
    header = encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), [alpn_tlv("h2")], crc32c=True)
    assert (header[:14], header[14:16], header[16:-7]) == (
        plain[:14],
        (len(plain) - 16 + 7).to_bytes(2, "big"),
        plain[16:],
    )
    assert header[-7:-4] == h("03 0004")
    assert int.from_bytes(header[-4:], "big") == crc32c_of(header[:-4] + b"\0\0\0\0")
    parsed = parse(header)
    assert parsed is not None and parsed.header.source == ("10.0.0.1", 1)


ENCODE_ERRORS = {
    "a host name": (("redis-a", 1), ("10.0.0.2", 2), "PROXY header: 'redis-a' is not an IP address"),
    "a port over 65535": (("10.0.0.1", 65536), ("10.0.0.2", 2), "PROXY header: port 65536 is not 0..65535"),
    "a negative port": (("10.0.0.1", 1), ("10.0.0.2", -1), "PROXY header: port -1 is not 0..65535"),
}


@pytest.mark.parametrize(("src", "dst", "message"), ENCODE_ERRORS.values(), ids=ENCODE_ERRORS.keys())
def test_encode_rejects(src: Any, dst: Any, message: str) -> None:
    for encode in (encode_v1, encode_v2):
        with pytest.raises(ValueError) as caught:
            encode(src, dst)
        assert str(caught.value) == message


def test_encode_v2_rejects_oversized_tlvs() -> None:
    with pytest.raises(ValueError, match=r"type 256 must be 0\.\.255"):
        encode_v2(None, None, [(256, b"")])
    with pytest.raises(ValueError, match="at most 65535 fit"):
        encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), [(0xE0, b"x" * 65521)])


# --- parsing: valid headers ------------------------------------------------------------------------

V1_LONGEST = b"PROXY UNKNOWN " + b":".join([b"ffff"] * 8) + b" " + b":".join([b"ffff"] * 8) + b" 65535 65535\r\n"

VALID = {
    "v1: the spec's example": (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        Header(1, PROXY, TCP4, ("192.168.0.1", 56324), ("192.168.0.11", 443), (), 47),
    ),
    "v1: TCP6": (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 443\r\n",
        Header(1, PROXY, TCP6, ("2001:db8::1", 1234), ("2001:db8::2", 443), (), 45),
    ),
    "v1: IPv6 upper case and uncompressed reads canonically": (
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::FFFF:1.2.3.4 0 65535\r\n",
        Header(1, PROXY, TCP6, ("2001:db8::1", 0), ("::ffff:102:304", 65535), (), 75),
    ),
    "v1: UNKNOWN, short form": (b"PROXY UNKNOWN\r\n", Header(1, PROXY, UNSPEC, None, None, (), 15)),
    "v1: UNKNOWN, the spec's 107-byte worst case": (V1_LONGEST, Header(1, PROXY, UNSPEC, None, None, (), 107)),
    "v1: UNKNOWN, the rest of the line is ignored": (
        b"PROXY UNKNOWN whatever \x01 is here\r\n",
        Header(1, PROXY, UNSPEC, None, None, (), 34),
    ),
    "v2: TCP4": (
        v2(0x21, 0x11, TCP4_BLOCK),
        Header(2, PROXY, TCP4, ("192.168.0.1", 56324), ("192.168.0.11", 443), (), 28),
    ),
    "v2: TCP6": (
        v2(0x21, 0x21, TCP6_BLOCK),
        Header(2, PROXY, TCP6, ("2001:db8::1", 1234), ("2001:db8::2", 443), (), 52),
    ),
    "v2: LOCAL without an address block": (V2_LOCAL, Header(2, LOCAL, UNSPEC, None, None, (), 16)),
    "v2: LOCAL with an address block (CVE-2024-23327)": (
        v2(0x20, 0x11, TCP4_BLOCK),
        Header(2, LOCAL, UNSPEC, None, None, (), 28),
    ),
    "v2: LOCAL skips its block unread, whatever the family says": (
        v2(0x20, 0xFF, b"\x20\x00\x09garbage"),
        Header(2, LOCAL, UNSPEC, None, None, (), 26),
    ),
    "v2: PROXY with UNSPEC carries no addresses, still TLVs": (
        v2(0x21, 0x00, tlv(0x02, b"example.com")),
        Header(2, PROXY, UNSPEC, None, None, ((PP2_TYPE_AUTHORITY, b"example.com"),), 30),
    ),
    "v2: TLVs kept in order, unknown types passed through, NOOP may repeat": (
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x04, b"") + tlv(0xE0, b"\x00\xff") + tlv(0x04, b"pad") + tlv(0x01, b"h2")),
        Header(
            2,
            PROXY,
            TCP4,
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
            ((PP2_TYPE_NOOP, b""), (0xE0, b"\x00\xff"), (PP2_TYPE_NOOP, b"pad"), (PP2_TYPE_ALPN, b"h2")),
            28 + 3 + 5 + 6 + 5,
        ),
    ),
    "v2: SSL with the client CN (mTLS)": (
        v2(0x21, 0x00, tlv(0x20, SSL_VALUE)),
        Header(2, PROXY, UNSPEC, None, None, ((PP2_TYPE_SSL, SSL_VALUE),), 16 + 3 + len(SSL_VALUE)),
    ),
}


@pytest.mark.parametrize(("data", "header"), VALID.values(), ids=VALID.keys())
def test_parse_valid(data: bytes, header: Header) -> None:
    assert parse(data) == Parsed(header, len(data))
    assert parse(data + b"GET / HTTP/1.1\r\n") == Parsed(header, len(data)), "bytes after the header are not its"


def test_typed_tlv_views() -> None:
    header = encode_v2(
        ("10.0.0.1", 1),
        ("10.0.0.2", 2),
        [
            alpn_tlv("h2"),
            authority_tlv("bücher.example"),
            ssl_tlv(SSLInfo.from_tls("TLSv1.3", cn="Zoë", cipher="TLS_AES_128_GCM_SHA256", client_cert=True)),
            (0x05, b"id-1"),
        ],
    )
    parsed = parse(header)
    assert parsed is not None
    got = parsed.header
    assert (got.alpn, got.authority, got.unique_id, got.tlv(0x30)) == (b"h2", "bücher.example", b"id-1", None)
    assert got.ssl == SSLInfo(
        PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS, 0, "TLSv1.3", "Zoë", "TLS_AES_128_GCM_SHA256"
    )
    assert got.ssl.client_cert_verified
    assert not SSLInfo.from_tls("TLSv1.3").client_cert_verified


def test_ssl_sub_tlvs_without_a_field_are_kept() -> None:
    value = (
        h("01 00000000") + tlv(0x21, b"TLSv1.2") + tlv(PP2_SUBTYPE_SSL_SIG_ALG, b"RSA-SHA256") + tlv(0x28, b"\x30\x82")
    )
    parsed = parse(v2(0x21, 0x00, tlv(0x20, value)))
    assert parsed is not None
    assert parsed.header.ssl == SSLInfo(
        1, 0, "TLSv1.2", extra=((PP2_SUBTYPE_SSL_SIG_ALG, b"RSA-SHA256"), (0x28, b"\x30\x82"))
    )


# --- parsing: refusals -----------------------------------------------------------------------------

REFUSED = {
    # not a PROXY header at all: refused at the first byte that proves it
    "an HTTP request": (b"GET / HTTP/1.1\r\n", "not_proxy"),
    "a TLS ClientHello": (h("16 03 01 02 00 01 00 01 fc 03 03"), "not_proxy"),
    "lower-case proxy": (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "not_proxy"),
    "PROXY without its space": (b"PROXYTCP4", "not_proxy"),
    "one bad signature byte": (SIGNATURE[:7] + b"X", "not_proxy"),
    # v1
    "CVE-2021-23351: a v1 line over 107 bytes without CRLF": (b"PROXY TCP4 " + b"1" * 200, "v1_too_long"),
    "v1: 108 bytes with its CRLF": (V1_LONGEST[:-2] + b"f\r\n", "v1_too_long"),
    "v1: LF alone": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1_bad_line_end"),
    "v1: CR alone": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "v1_bad_line_end"),
    "v1: LF before the CRLF": (b"PROXY UNKNOWN\n\r\n", "v1_bad_line_end"),
    "v1: protocol TCP5": (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_protocol"),
    "v1: lower-case tcp4": (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_protocol"),
    "v1: UNKNOWN glued to more": (b"PROXY UNKNOWNX\r\n", "v1_bad_protocol"),
    "v1: empty line": (b"PROXY \r\n", "v1_bad_protocol"),
    "v1: two spaces": (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "v1_bad_fields"),
    "v1: a port missing": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1_bad_fields"),
    "v1: a field too many": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "v1_bad_fields"),
    "v1: trailing space": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "v1_bad_fields"),
    "v1: TCP4 and nothing else": (b"PROXY TCP4\r\n", "v1_bad_fields"),
    "v1: a leading zero in IPv4 (octal confusion)": (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_address"),
    "v1: an octet over 255": (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "v1_bad_address"),
    "v1: IPv6 under TCP4": (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1_bad_address"),
    "v1: IPv4 under TCP6": (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1_bad_address"),
    "v1: an IPv6 scope id": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1_bad_address"),
    "v1: two double colons": (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "v1_bad_address"),
    "v1: a host name": (b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "v1_bad_address"),
    "v1: non-ASCII digits": ("PROXY TCP4 \u0661.2.3.4 5.6.7.8 1 2\r\n".encode(), "v1_bad_address"),
    "v1: port 65536": (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "v1_bad_port"),
    "v1: a leading zero in a port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "v1_bad_port"),
    "v1: a signed port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", "v1_bad_port"),
    "v1: a negative port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "v1_bad_port"),
    "v1: a six-digit port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 000002\r\n", "v1_bad_port"),
    # v2 fixed part
    "v2: version 1 in the binary form": (v2(0x11, 0x11, TCP4_BLOCK), "v2_bad_version"),
    "v2: version 3": (v2(0x31, 0x11, TCP4_BLOCK), "v2_bad_version"),
    "v2: command 2": (v2(0x22, 0x11, TCP4_BLOCK), "v2_bad_command"),
    "v2: command 15": (v2(0x2F, 0x11, TCP4_BLOCK), "v2_bad_command"),
    "v2: unassigned family 4": (v2(0x21, 0x41, TCP4_BLOCK), "v2_bad_family"),
    "v2: unassigned protocol 3": (v2(0x21, 0x13, TCP4_BLOCK), "v2_bad_family"),
    "v2: UNSPEC family with STREAM": (v2(0x21, 0x01, b""), "v2_bad_family"),
    "CVE-2024-23325: UDP over IPv4": (v2(0x21, 0x12, TCP4_BLOCK), "v2_unsupported_family"),
    "CVE-2024-23325: UDP over IPv6": (v2(0x21, 0x22, TCP6_BLOCK), "v2_unsupported_family"),
    "CVE-2024-23325: UNIX stream": (v2(0x21, 0x31, bytes(216)), "v2_unsupported_family"),
    "CVE-2024-23325: UNIX datagram": (v2(0x21, 0x32, bytes(216)), "v2_unsupported_family"),
    "v2: length over the bound, refused before the body": (v2(0x21, 0x11, b"", V2_MAX_LENGTH + 1), "v2_too_long"),
    "v2: LOCAL is bounded too": (v2(0x20, 0x00, b"", 0xFFFF), "v2_too_long"),
    "CVE-2019-14243: TCP4 addresses cut short": (v2(0x21, 0x11, TCP4_BLOCK[:8]), "v2_short_addresses"),
    "CVE-2019-14243: TCP6 addresses cut short": (v2(0x21, 0x21, TCP6_BLOCK[:12]), "v2_short_addresses"),
    "CVE-2019-14243: TCP4 with no addresses": (v2(0x21, 0x11, b""), "v2_short_addresses"),
    # TLVs
    "a TLV whose length runs past the header": (v2(0x21, 0x11, TCP4_BLOCK + tlv(0x02, b"abc", 200)), "tlv_truncated"),
    "two stray bytes after the last TLV": (
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x01, b"h2") + b"\x02\x00"),
        "tlv_truncated",
    ),
    "an SSL sub-TLV past its SSL TLV": (
        v2(0x21, 0x00, tlv(0x20, h("01 00000000") + tlv(0x21, b"TLSv1.3", 50))),
        "tlv_truncated",
    ),
    "CVE-2024-23324: PP2_TYPE_SSL too short for its fields": (v2(0x21, 0x00, tlv(0x20, h("01 0000"))), "tlv_invalid"),
    "CVE-2024-23324: AUTHORITY not UTF-8": (v2(0x21, 0x00, tlv(0x02, b"ex\xffample")), "tlv_invalid"),
    "CVE-2024-23324: SSL CN not UTF-8": (
        v2(0x21, 0x00, tlv(0x20, h("07 00000000") + tlv(0x22, b"\xc3\x28"))),
        "tlv_invalid",
    ),
    "CVE-2024-23324: SSL version not ASCII": (
        v2(0x21, 0x00, tlv(0x20, h("01 00000000") + tlv(0x21, "TLSv1.3é".encode()))),
        "tlv_invalid",
    ),
    "CVE-2024-23324: CRC32C not 4 bytes": (v2(0x21, 0x00, tlv(0x03, b"\x00\x00")), "tlv_invalid"),
    "CVE-2024-23324: UNIQUE_ID over 128 bytes": (v2(0x21, 0x00, tlv(0x05, bytes(129))), "tlv_invalid"),
    "CVE-2024-23324: NETNS not ASCII": (v2(0x21, 0x00, tlv(0x30, b"ns\x80")), "tlv_invalid"),
    "two AUTHORITY TLVs": (v2(0x21, 0x00, tlv(0x02, b"a.example") + tlv(0x02, b"b.example")), "tlv_duplicate"),
    "two SSL CN sub-TLVs": (
        v2(0x21, 0x00, tlv(0x20, h("07 00000000") + tlv(0x22, b"alice") + tlv(0x22, b"bob"))),
        "tlv_duplicate",
    ),
    "a CRC32C that does not match": (v2(0x21, 0x11, TCP4_BLOCK + tlv(0x03, b"\x00\x00\x00\x01")), "crc32c_mismatch"),
}


@pytest.mark.parametrize(("data", "reason"), REFUSED.values(), ids=REFUSED.keys())
def test_parse_refuses(data: bytes, reason: str) -> None:
    error = refusal(data)
    assert error.reason == reason
    assert reason in REASONS
    assert "\n" not in error.message and str(error) == error.message


def test_every_reason_is_tested() -> None:
    assert {reason for _, reason in REFUSED.values()} == set(REASONS)


REFUSAL_MESSAGES = {
    b"GET / HTTP/1.1\r\n": "PROXY header expected, got b'GET / HTTP/1.1\\r\\n'",
    b"PROXY TCP4 " + b"1" * 200: "PROXY v1 line has no CRLF within 107 bytes",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n": "PROXY v1 line: port b'65536', 0..65535 without leading zeros expected",
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n": "PROXY v1 line: b'1.2.3.4' is not an IPv6 address",
    v2(0x21, 0x11, TCP4_BLOCK[:8]): "PROXY v2 header: family 0x11 needs 12 address bytes, length is 8",
    v2(0x21, 0x31, bytes(216)): "PROXY v2 header: UNIX stream is not proxied here, TCP only",
    v2(0x21, 0x00, tlv(0x20, h("01 0000"))): (
        "PROXY v2 header: SSL TLV is 3 bytes, shorter than its 5 bytes of client and verify fields"
    ),
    v2(0x21, 0x00, tlv(0x02, b"abc", 200)): "PROXY v2 header: TLV 0x02 of 200 bytes runs past the end (3)",
}


@pytest.mark.parametrize(("data", "message"), REFUSAL_MESSAGES.items())
def test_refusal_messages(data: bytes, message: str) -> None:
    assert refusal(data).message == message


def test_the_length_bound_is_the_parsers() -> None:
    header = v2(0x21, 0x11, TCP4_BLOCK + tlv(0xE0, bytes(100)))
    assert refusal(header, max_v2_length=64).reason == "v2_too_long"
    assert parse(header, max_v2_length=115) is not None


# --- chunked feeding -------------------------------------------------------------------------------

SAMPLES = [data for data, _ in VALID.values()]


def feed_all(parser: Parser, chunks: list[bytes]) -> tuple[Parsed | None, int]:
    """Feed chunks until a header; return it and the index of the chunk that completed it."""
    for index, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        if result is not None:
            return result, index
    return None, -1


@pytest.mark.parametrize("data", SAMPLES, ids=VALID.keys())
def test_every_split_point_gives_the_same_header(data: bytes) -> None:
    tail = b"first bytes of the client"
    whole = parse(data + tail)
    assert whole is not None
    for cut in range(1, len(data) + len(tail)):
        chunks = [(data + tail)[:cut], (data + tail)[cut:]]
        result, index = feed_all(Parser(), chunks)
        assert result is not None and result.header == whole.header, f"cut at {cut}"
        assert chunks[index][result.consumed :] + b"".join(chunks[index + 1 :]) == tail, f"cut at {cut}"


@pytest.mark.parametrize("data", SAMPLES, ids=VALID.keys())
def test_byte_at_a_time(data: bytes) -> None:
    parser = Parser()
    for i in range(len(data) - 1):
        assert parser.feed(data[i : i + 1]) is None
        assert parser.buffered == i + 1
    result = parser.feed(data[-1:] + b"rest")
    assert result is not None and result.consumed == 1 and result.header.length == len(data)
    assert parser.buffered == 0


def test_empty_chunks_need_more() -> None:
    parser = Parser()
    assert parser.feed(b"") is None
    assert parser.feed(b"PROXY ") is None
    assert parser.feed(b"") is None
    assert parser.feed(b"UNKNOWN\r\n") == Parsed(Header(1, PROXY, UNSPEC, None, None, (), 15), 9)


def test_refused_as_early_as_the_bytes_allow() -> None:
    """A bad header is refused on the chunk that proves it, not at the timeout; the body is never awaited."""
    cases = [
        (b"G", "not_proxy"),
        (SIGNATURE + b"\x11", "v2_bad_version"),
        (SIGNATURE + b"\x23", "v2_bad_command"),
        (SIGNATURE + b"\x21\x11\xff\xff", "v2_too_long"),
        (SIGNATURE + b"\x21\x12\x00\x0c", "v2_unsupported_family"),
        (SIGNATURE + b"\x21\x21\x00\x0c", "v2_short_addresses"),
        (b"PROXY UNKNOWN\n", "v1_bad_line_end"),
        (b"PROXY " + b"x" * 100, "v1_too_long"),
    ]
    for data, reason in cases:
        assert refusal(data).reason == reason, data


def test_a_spent_parser_refuses_more_input() -> None:
    parser = Parser()
    assert parser.feed(V1_UNKNOWN) is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"x")
    parser = Parser()
    with pytest.raises(ProxyProtocolError):
        parser.feed(b"x")
    with pytest.raises(RuntimeError):
        parser.feed(V1_UNKNOWN)


# --- IPv6 text -------------------------------------------------------------------------------------

V6_TEXT = {
    "::": "::",
    "::1": "::1",
    "1::": "1::",
    "2001:db8:0:0:1:0:0:1": "2001:db8::1:0:0:1",  # the first of two equal runs
    "2001:db8:0:1:1:1:1:1": "2001:db8:0:1:1:1:1:1",  # a single zero group stays
    "2001:0:0:1:0:0:0:1": "2001:0:0:1::1",  # the longest run
    "::ffff:1.2.3.4": "::ffff:102:304",  # plain hex groups, the v1 grammar
}


@pytest.mark.parametrize(("text", "canonical"), V6_TEXT.items())
def test_v6_text(text: str, canonical: str) -> None:
    assert _v6_text(ipaddress.IPv6Address(text).packed) == canonical


@given(st.binary(min_size=16, max_size=16))
def test_v6_text_reads_back(packed: bytes) -> None:
    text = _v6_text(packed)
    assert ipaddress.IPv6Address(text).packed == packed
    assert "." not in text and text == text.lower()


# --- round trips and fuzzing -----------------------------------------------------------------------

FUZZ = settings(
    max_examples=300, deadline=timedelta(milliseconds=500), suppress_health_check=[HealthCheck.function_scoped_fixture]
)

ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
endpoints = st.tuples(ips.map(str), st.integers(0, 65535))
texts = st.text(max_size=40)
ascii_texts = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
ssl_infos = st.builds(
    SSLInfo,
    client=st.integers(0, 255),
    verify=st.integers(0, 2**32 - 1),
    version=st.none() | ascii_texts,
    cn=st.none() | texts,
    cipher=st.none() | ascii_texts,
    extra=st.lists(
        st.one_of(
            st.tuples(st.integers(0x24, 0x27), ascii_texts.map(str.encode)),  # named in the spec as ASCII strings
            st.tuples(st.just(0x28), st.binary(max_size=20)),  # a DER certificate: any bytes
        ),
        max_size=3,
        unique_by=lambda t: t[0],
    ).map(tuple),
)
tlv_lists = st.tuples(
    st.none() | st.binary(max_size=20).map(alpn_tlv),
    st.none() | texts.map(authority_tlv),
    st.none() | ssl_infos.map(ssl_tlv),
    st.lists(st.tuples(st.sampled_from([0x04, 0xE0, 0xEF, 0xF0]), st.binary(max_size=30)), max_size=4),
).map(lambda t: [x for x in t[:3] if x is not None] + t[3])


def expected_addresses(src: tuple[str, int], dst: tuple[str, int]) -> tuple[Family, Any, Any]:
    """The family and addresses the module docstring promises, worked out with ``ipaddress``."""
    a, b = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])

    def as_v4(ip: Any) -> Any:
        return ip if ip.version == 4 else ip.ipv4_mapped

    if as_v4(a) is not None and as_v4(b) is not None:
        return TCP4, (as_v4(a), src[1]), (as_v4(b), dst[1])

    def as_v6(ip: Any) -> Any:
        return ip if ip.version == 6 else ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)

    return TCP6, (as_v6(a), src[1]), (as_v6(b), dst[1])


def read_ips(header: Header) -> tuple[Any, Any]:
    assert header.source is not None and header.destination is not None
    return (
        (ipaddress.ip_address(header.source[0]), header.source[1]),
        (ipaddress.ip_address(header.destination[0]), header.destination[1]),
    )


@FUZZ
@given(endpoints, endpoints)
def test_round_trip_v1(src: tuple[str, int], dst: tuple[str, int]) -> None:
    data = encode_v1(src, dst)
    parsed = parse(data)
    assert parsed is not None and parsed.consumed == len(data) <= 107
    family, want_src, want_dst = expected_addresses(src, dst)
    assert (parsed.header.version, parsed.header.command, parsed.header.family) == (1, PROXY, family)
    assert read_ips(parsed.header) == (want_src, want_dst)
    assert encode_v1(parsed.header.source, parsed.header.destination) == data, "a header read is sent on as it is"


@FUZZ
@given(endpoints, endpoints, tlv_lists, st.booleans())
def test_round_trip_v2(src: tuple[str, int], dst: tuple[str, int], tlvs: list[tuple[int, bytes]], crc: bool) -> None:
    data = encode_v2(src, dst, tlvs, crc32c=crc)
    parsed = Parser(max_v2_length=65535).feed(data)
    assert parsed is not None and parsed.consumed == len(data)
    header = parsed.header
    family, want_src, want_dst = expected_addresses(src, dst)
    assert (header.version, header.command, header.family) == (2, PROXY, family)
    assert read_ips(header) == (want_src, want_dst)
    assert list(header.tlvs[: len(tlvs)]) == tlvs
    if crc:
        assert header.tlvs[-1][0] == 0x03
    ssl = [value for kind, value in tlvs if kind == PP2_TYPE_SSL]
    if ssl:
        assert header.ssl is not None and header.ssl.encode() == ssl[0]
    assert encode_v2(header.source, header.destination, tlvs, crc32c=crc) == data


PREFIXES = [
    b"",
    b"PROXY ",
    b"PROXY TCP4 ",
    b"PROXY TCP6 ",
    b"PROXY UNKNOWN",
    SIGNATURE,
    SIGNATURE + b"\x21",
    SIGNATURE + b"\x21\x11",
    SIGNATURE + b"\x21\x00",
    SIGNATURE + b"\x20",
]


def outcome(chunks: list[bytes], **kwargs: Any) -> tuple[str, Any]:
    """What feeding these chunks ends in: a header, need-more, or a reason; checks the parser's promises."""
    parser = Parser(**kwargs)
    fed = 0
    try:
        for chunk in chunks:
            result = parser.feed(chunk)
            assert parser.buffered <= 16 + parser.max_v2_length
            if result is not None:
                assert 0 <= result.consumed <= len(chunk) and fed + result.consumed == result.header.length
                return "header", result.header
            fed += len(chunk)
    except ProxyProtocolError as error:
        assert error.reason in REASONS and error.message and "\n" not in error.message
        return "refused", error.reason
    return "more", None


@FUZZ
@given(st.sampled_from(PREFIXES), st.binary(max_size=600))
def test_random_bytes_only_ever_refuse(prefix: bytes, data: bytes) -> None:
    """Whatever arrives, the parser answers need-more, a header, or ProxyProtocolError; nothing else."""
    outcome([prefix + data])


@FUZZ
@given(st.sampled_from(PREFIXES), st.binary(max_size=300), st.data())
def test_random_bytes_any_chunking_same_outcome(prefix: bytes, data: bytes, draw: st.DataObject) -> None:
    whole = prefix + data
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    chunks = [whole[i:j] for i, j in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    assert outcome(chunks) == outcome([whole])


@FUZZ
@given(st.sampled_from(SAMPLES), st.integers(0, 200), st.integers(0, 255))
def test_one_flipped_byte_never_escapes(data: bytes, position: int, value: int) -> None:
    """Mutations of valid headers reach the deep checks (TLVs, addresses) and still only refuse or parse."""
    mutated = bytearray(data)
    mutated[position % len(data)] = value
    outcome([bytes(mutated)])


@FUZZ
@given(st.binary(min_size=0, max_size=200), st.integers(0, 0xFFFF))
def test_declared_length_bounds_the_buffer(body: bytes, length: int) -> None:
    """However a v2 length lies, the parser holds at most 16 + its bound, then answers."""
    kind, _ = outcome([v2(0x21, 0x00, body, length)[i : i + 7] for i in range(0, 16 + len(body), 7)], max_v2_length=128)
    if length > 128:
        assert kind == "refused"
