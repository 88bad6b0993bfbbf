"""The edge of a listener on real sockets: PROXY headers read (``--accept-proxy``) and sent
(``--send-proxy``), allow/deny rules, and per-source limits (RELIABILITY.md 28, 29 and 33).

Clients bind 127.0.0.x sources (all of 127.0.0.0/8 is loopback) to be several clients, and ``::1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trustme

from l4proxy import Address, HealthConfig, Proxy
from l4proxy.config import ServerTLSConfig
from l4proxy.proxyproto import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_SSL,
    SIGNATURE,
    V1_UNKNOWN,
    V2_LOCAL,
    Command,
    Parser,
    encode_v1,
    encode_v2,
)

from ..kit import (
    ENGINES,
    RecordingLog,
    Upstream,
    dial_from,
    edge_config,
    eventually,
    exchange,
    running,
    upstreams,
)


class Recorder(Upstream):
    """An upstream that keeps every connection's bytes (until EOF) and answers ``ok``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(self._keep, host)
        self.received: list[bytes] = []

    async def _keep(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.received.append(await reader.read())
        writer.write(b"ok")
        await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def recorder(host: str = "127.0.0.1") -> AsyncIterator[Recorder]:
    server = Recorder(host)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
LOOPBACK = "127.0.0.1"


async def closed_without_reply(port: int, data: bytes = b"", source: str = "127.0.0.1", host: str = LOOPBACK) -> bool:
    """Whether the proxy closes the connection without a byte of reply (a refusal)."""
    reader, writer = await dial_from(source, port, host)
    try:
        if data:
            writer.write(data)
        try:
            return await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            return True
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# --- sending headers (28: byte-exact) --------------------------------------------------------------


@pytest.mark.parametrize("relay", ENGINES)
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_the_header_sent_upstream_is_byte_exact_and_first(version: str, relay: str) -> None:
    async with recorder() as member:
        config = edge_config([member.address], send_proxy=version, relay=relay)
        async with running(config) as (proxy, _):
            port = proxy.port()
            reply, client_port = await exchange(port, b"hello", source="127.0.0.2")
    src, dst = ("127.0.0.2", client_port), ("127.0.0.1", port)
    header = encode_v1(src, dst) if version == "v1" else encode_v2(src, dst)
    assert (reply, member.received) == (b"ok", [header + b"hello"])


async def test_the_header_comes_first_when_the_client_waits_for_the_member_to_speak() -> None:
    """No early bytes to ride with: the header is written alone, as soon as the member is connected."""
    received: list[bytes] = []

    async def greets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello?")
        received.append(await reader.read())
        writer.close()

    async with upstreams(1, handler=greets) as [member], running(edge_config([member.address], send_proxy="v1")) as run:
        port = run[0].port()
        reader, writer = await dial_from("127.0.0.3", port)
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"hello?"
        writer.write(b"late")
        writer.write_eof()
        client_port = writer.get_extra_info("sockname")[1]
        await eventually(lambda: received != [])
        writer.close()
    assert received == [encode_v1(("127.0.0.3", client_port), ("127.0.0.1", port)) + b"late"]


async def test_an_ipv6_client_is_sent_as_tcp6() -> None:
    async with recorder() as member:
        config = edge_config([member.address], Address("::1", 0), send_proxy="v1")
        async with running(config) as (proxy, _):
            port = proxy.port()
            _, client_port = await exchange(port, b"x", source="::1", host="::1")
    assert member.received == [b"PROXY TCP6 ::1 ::1 %d %d\r\nx" % (client_port, port)]


@pytest.mark.parametrize(("version", "expected"), [("v1", V1_UNKNOWN), ("v2", V2_LOCAL)])
async def test_health_probes_send_a_header_of_the_proxys_own(version: str, expected: bytes) -> None:
    async with recorder() as member:
        config = edge_config([member.address], send_proxy=version)
        config = replace(config, pools=(replace(config.pools[0], health=HealthConfig(interval=0.05, timeout=1.0)),))
        async with running(config):
            await eventually(lambda: len(member.received) >= 2)
    assert set(member.received) == {expected}


# --- reading headers (28 and 29) -------------------------------------------------------------------

_SRC4, _DST4 = ("10.1.2.3", 40000), ("10.9.9.9", 6379)
_SRC6, _DST6 = ("2001:db8::7", 40001), ("2001:db8::1", 6379)
VALID = {
    "v1 TCP4": (encode_v1(_SRC4, _DST4), "10.1.2.3:40000"),
    "v1 TCP6": (encode_v1(_SRC6, _DST6), "[2001:db8::7]:40001"),
    "v1 UNKNOWN": (V1_UNKNOWN, None),
    "v2 TCP4": (encode_v2(_SRC4, _DST4), "10.1.2.3:40000"),
    "v2 TCP6 with a TLV": (encode_v2(_SRC6, _DST6, [(0x05, b"id-1")]), "[2001:db8::7]:40001"),
    "v2 TCP4 longer than one peek": (encode_v2(_SRC4, _DST4, [(0xE0, b"t" * 600)]), "10.1.2.3:40000"),
    "v2 LOCAL": (V2_LOCAL, None),
    "v2 LOCAL with an address block": (SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12), None),
}


@pytest.mark.parametrize("relay", ENGINES)
@pytest.mark.parametrize("name", sorted(VALID))
async def test_a_valid_header_names_the_client_and_the_rest_is_relayed_unchanged(name: str, relay: str) -> None:
    header, client = VALID[name]
    async with upstreams(1) as [member], running(edge_config([member.address], accept_proxy=True, relay=relay)) as run:
        proxy, log = run
        payload = b"PROXY is data here\r\n" + bytes(range(256)) * 300  # many segments, the first with the header
        reply, client_port = await exchange(proxy.port(), header + payload)
        await log.wait_for(1)
    assert reply == payload
    shown = client or f"127.0.0.1:{client_port}"  # LOCAL and UNKNOWN: the socket's own address
    assert f" client={shown} " in log.lines[0]
    assert proxy.frontends[0].header_errors == {}


async def test_a_header_dribbled_byte_by_byte_is_read_whole() -> None:
    header = encode_v2(_SRC4, _DST4)
    async with upstreams(1) as [member], running(edge_config([member.address], accept_proxy=True)) as (proxy, log):
        reader, writer = await dial_from("127.0.0.1", proxy.port())
        for byte in header + b"ab":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0)
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ab"
        writer.close()
        await log.wait_for(1)
    assert " client=10.1.2.3:40000 " in log.lines[0]


MALFORMED = {
    "v1_too_long": b"PROXY TCP4 " + b"1" * 120,  # CVE-2021-23351: no CRLF within 107 bytes
    "v2_bad_version": SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),
    "v2_short_addresses": SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # CVE-2019-14243
    "tlv_truncated": SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x05\x00\x09z",  # a TLV past the header
    "v2_unsupported_family": SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),
    "not_proxy": b"GET / HTTP/1.1\r\n\r\n",
    "v1_bad_address": b"PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n",
    "tlv_invalid": SIGNATURE + b"\x21\x11\x00\x11" + bytes(12) + b"\x02\x00\x02\xff\xfe",  # AUTHORITY not UTF-8
    "v2_bad_command": SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),
}


@pytest.mark.parametrize("reason", sorted(MALFORMED))
async def test_a_malformed_header_closes_only_that_connection(reason: str, caplog: pytest.LogCaptureFixture) -> None:
    async with upstreams(1) as [member], running(edge_config([member.address], accept_proxy=True)) as (proxy, log):
        reader, writer = await dial_from("127.0.0.1", proxy.port())  # a good client, already served
        writer.write(encode_v1(_SRC4, _DST4) + b"first")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"first"
        assert await closed_without_reply(proxy.port(), MALFORMED[reason], source="127.0.0.3")
        writer.write(b"still")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
        writer.close()
        await log.wait_for(1)
    assert proxy.frontends[0].header_errors == {reason: 1}
    assert member.accepted == 1  # nothing was dialed for the bad one
    [line] = [r.getMessage() for r in caplog.records if "closed 127.0.0.3" in r.getMessage()]
    assert "PROXY" in line


async def test_clients_that_never_send_the_header_are_closed_at_the_timeout_while_others_are_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CVE-2021-23409: silent clients hold a descriptor each until the timeout, nothing more."""
    async with upstreams(1) as [member]:
        config = edge_config([member.address], accept_proxy=True, proxy_timeout=0.5)
        async with running(config) as (proxy, log):
            silent = [await dial_from(f"127.0.0.{2 + i % 50}", proxy.port()) for i in range(100)]
            started = asyncio.get_running_loop().time()
            for _ in range(5):  # served while the silent ones wait
                reply, _ = await exchange(proxy.port(), encode_v2(_SRC4, _DST4) + b"hi")
                assert reply == b"hi"
            ends = await asyncio.gather(*(asyncio.wait_for(reader.read(), 5) for reader, _ in silent))
            waited = asyncio.get_running_loop().time() - started
            for _, writer in silent:
                writer.close()
            await log.wait_for(5)
            assert ends == [b""] * 100
            assert 0.4 <= waited < 3
            assert proxy.frontends[0].header_errors == {"timeout": 100}
            assert proxy.frontends[0].edge.reading == set()
            late = f" on {config.listeners[0].address}: no PROXY header within 0.5s"
            assert any(late in record.getMessage() for record in caplog.records), caplog.text


async def test_only_peers_in_accept_proxy_from_must_send_a_header() -> None:
    async with upstreams(1) as [member]:
        config = edge_config([member.address], accept_proxy=True, accept_proxy_from=("127.0.0.2/32",))
        async with running(config) as (proxy, log):
            reply, _ = await exchange(proxy.port(), encode_v1(_SRC4, _DST4) + b"via lb", source="127.0.0.2")
            direct = encode_v1(_SRC6, _DST6) + b"direct"  # from a direct client: data, not a header
            reply_direct, direct_port = await exchange(proxy.port(), direct, source="127.0.0.3")
            await log.wait_for(2)
    assert (reply, reply_direct) == (b"via lb", direct)
    assert {line.split()[1] for line in log.lines} == {"client=10.1.2.3:40000", f"client=127.0.0.3:{direct_port}"}


async def test_a_carried_address_is_what_the_header_sent_on_repeats() -> None:
    async with recorder() as member:
        config = edge_config([member.address], accept_proxy=True, send_proxy="v2")
        async with running(config) as (proxy, _):
            await exchange(proxy.port(), encode_v1(_SRC6, _DST6) + b"on")
            local, _ = await exchange(proxy.port(), V2_LOCAL + b"own")
    assert member.received[0] == encode_v2(_SRC6, _DST6) + b"on"
    parsed = Parser().feed(member.received[1])
    assert parsed is not None and parsed.header.command is Command.PROXY
    assert parsed.header.source is not None and parsed.header.source[0] == "127.0.0.1"
    assert member.received[1][parsed.consumed :] == b"own" and local == b"ok"


# --- who may connect (33) --------------------------------------------------------------------------


async def test_allow_and_deny_close_refused_clients_at_accept_without_dialing(caplog: pytest.LogCaptureFixture) -> None:
    async with upstreams(1) as [member]:
        config = edge_config([member.address], allow=("127.0.0.0/29",), deny=("127.0.0.4",))
        async with running(config) as (proxy, _):
            assert (await exchange(proxy.port(), b"in", source="127.0.0.2"))[0] == b"in"
            assert await closed_without_reply(proxy.port(), source="127.0.0.4")  # deny wins over allow
            assert await closed_without_reply(proxy.port(), source="127.0.0.9")  # in no allowed range
            assert await closed_without_reply(proxy.port(), source="127.0.0.9")
    assert member.accepted == 1
    assert proxy.frontends[0].refused == {"deny": 1, "not_allowed": 2}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert any("127.0.0.4" in line and "denied by 127.0.0.4/32" in line for line in lines)
    assert any("127.0.0.9" in line and "in no allowed range" in line for line in lines)


async def test_rules_on_ipv6() -> None:
    async with upstreams(1, host="::1") as [member]:
        config = edge_config([member.address], Address("::1", 0), deny=("::1/128",))
        async with running(config) as (proxy, _):
            assert await closed_without_reply(proxy.port(), source="::1", host="::1")
        config = edge_config([member.address], Address("::1", 0), allow=("::1",), deny=("127.0.0.0/8",))
        async with running(config) as (proxy, _):
            assert (await exchange(proxy.port(), b"six", source="::1", host="::1"))[0] == b"six"
    assert member.accepted == 1


async def test_the_rules_judge_the_address_a_header_carries() -> None:
    async with upstreams(1) as [member]:
        config = edge_config([member.address], accept_proxy=True, allow=("10.0.0.0/8",))
        async with running(config) as (proxy, _):
            assert (await exchange(proxy.port(), encode_v1(_SRC4, _DST4) + b"a"))[0] == b"a"
            assert await closed_without_reply(proxy.port(), encode_v1(("192.0.2.1", 1), _DST4) + b"b")
    assert proxy.frontends[0].refused == {"not_allowed": 1}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_max_connections_per_ip(host: str) -> None:
    async with upstreams(1, host=host) as [member]:
        config = edge_config([member.address], Address(host, 0), max_connections_per_ip=2)
        async with running(config) as (proxy, _):
            first = "127.0.0.2" if host != "::1" else "::1"
            held = [await dial_from(first, proxy.port(), host) for _ in range(2)]
            for reader, writer in held:
                writer.write(b"up")
                assert await asyncio.wait_for(reader.readexactly(2), 5) == b"up"
            assert await closed_without_reply(proxy.port(), source=first, host=host)
            if host != "::1":  # another source is not limited by this one
                assert (await exchange(proxy.port(), b"other", source="127.0.0.3", host=host))[0] == b"other"
            held[0][1].close()
            await eventually(lambda: len(proxy.sessions) == 1)
            assert (await exchange(proxy.port(), b"again", source=first, host=host))[0] == b"again"
            held[1][1].close()
            await eventually(lambda: not proxy.sessions)
            assert len(proxy.frontends[0].edge.sources.live) == 0  # type: ignore[union-attr]
    assert proxy.frontends[0].refused == {"max_connections_per_ip": 1}


async def test_rate_per_ip_is_a_token_bucket_per_source() -> None:
    now = [100.0]
    async with upstreams(1) as [member]:
        proxy = Proxy(edge_config([member.address], rate_per_ip=2), RecordingLog())
        proxy.frontends[0].edge.clock = lambda: now[0]
        await proxy.start()
        try:
            port = proxy.port()
            assert [(await exchange(port, b"r", source="127.0.0.2"))[0] for _ in range(2)] == [b"r", b"r"]
            assert await closed_without_reply(port, source="127.0.0.2")  # the burst is spent
            assert (await exchange(port, b"s", source="127.0.0.3"))[0] == b"s"
            now[0] += 0.5  # one token back at 2/s
            assert (await exchange(port, b"t", source="127.0.0.2"))[0] == b"t"
            assert await closed_without_reply(port, source="127.0.0.2")
        finally:
            await proxy.drain()
    assert proxy.frontends[0].refused == {"rate_per_ip": 2}


# --- TLS termination: the TLVs HAProxy sends --------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, trustme.CA]:
    ca = trustme.CA()
    where = tmp_path_factory.mktemp("edge-tls")
    server = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    client = ca.issue_cert("good-client", common_name="good-client")
    server.private_key_and_cert_chain_pem.write_to_path(where / "server.pem")
    client.private_key_and_cert_chain_pem.write_to_path(where / "client.pem")
    ca.cert_pem.write_to_path(where / "ca.pem")
    return where, ca


@pytest.mark.parametrize("mtls", [False, True])
async def test_v2_over_tls_termination_carries_alpn_authority_and_ssl(
    tls_files: tuple[Path, trustme.CA], mtls: bool
) -> None:
    where, _ = tls_files
    pem = str(where / "server.pem")
    tls = ServerTLSConfig(pem, pem, client_ca=str(where / "ca.pem") if mtls else None, alpn=("h2", "redis"))
    client_ctx = ssl.create_default_context(cafile=str(where / "ca.pem"))
    client_ctx.set_alpn_protocols(["redis"])
    if mtls:
        client_ctx.load_cert_chain(str(where / "client.pem"))
    async with recorder() as member, running(edge_config([member.address], tls=tls, send_proxy="v2")) as (proxy, _):
        port = proxy.port()
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
        writer.write(b"secret")
        await eventually(lambda: member.accepted == 1)
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        await eventually(lambda: len(member.received) == 1)
    parsed = Parser().feed(member.received[0])
    assert parsed is not None
    header = parsed.header
    assert (header.alpn, header.authority) == (b"redis", "localhost")
    info = header.ssl
    assert info is not None and info.version in ("TLSv1.2", "TLSv1.3") and info.cipher
    assert info.client & PP2_CLIENT_SSL
    assert (info.cn, bool(info.client & PP2_CLIENT_CERT_CONN), info.verify) == (
        ("good-client", True, 0) if mtls else (None, False, 1)
    )
    assert member.received[0][parsed.consumed :] == b"secret"


async def test_a_tls_member_gets_the_header_in_the_clear_before_the_handshake(
    tls_files: tuple[Path, trustme.CA],
) -> None:
    """The member reads exactly the 28 bytes of a v2 TCP4 header, then its TLS handshake begins."""
    from l4proxy.config import UpstreamTLSConfig

    where, _ = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(where / "server.pem"))
    loop = asyncio.get_running_loop()
    headers: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    async def member() -> None:
        sock, _ = await loop.sock_accept(listener)
        header = b""
        while len(header) < 28:  # recv never reads past what it is asked for
            header += await loop.sock_recv(sock, 28 - len(header))
        headers.append(header)
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, ssl=server_ctx)
        transport.write(await reader.readexactly(8))
        await reader.read()
        transport.close()

    serving = asyncio.create_task(member())
    upstream_tls = UpstreamTLSConfig(ca=str(where / "ca.pem"), sni="localhost")
    config = edge_config([Address("127.0.0.1", listener.getsockname()[1])], send_proxy="v2", upstream_tls=upstream_tls)
    try:
        async with running(config) as (proxy, _):
            port = proxy.port()
            reader, writer = await dial_from("127.0.0.5", port)  # a close after the reply: the member closes at EOF
            client_port = writer.get_extra_info("sockname")[1]
            writer.write(b"over tls")
            reply = await asyncio.wait_for(reader.readexactly(8), 5)
            writer.close()
            await asyncio.wait_for(serving, 5)
    finally:
        serving.cancel()
        listener.close()
    assert reply == b"over tls"
    assert headers == [encode_v2(("127.0.0.5", client_port), ("127.0.0.1", port))]


def test_loopback_sources_are_usable() -> None:
    """The tests above bind 127.0.0.x sources: the whole of 127.0.0.0/8 is loopback on Linux."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.9", 0))
