"""The data path on real loopback sockets: byte-exact relay, half-close, resets, backpressure.

RELIABILITY.md cases 1, 2, 5, 6, 7, 8 and 11.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket

import pytest

from l4proxy import Address

from ..kit import ENGINES, Upstream, connect, eventually, make_config, roundtrip, running, upstreams

pytestmark = pytest.mark.parametrize("relay", ENGINES)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_bytes_roundtrip_exactly_and_access_log_counts_them(host: str, relay: str) -> None:
    payload = os.urandom(300_000)
    async with upstreams(1, host=host) as [server], running(
        make_config([server.address], Address(host, 0), relay=relay)
    ) as (proxy, log):
        echoed = await roundtrip(proxy.port(), payload, host=host)
        await log.wait_for(1)
    assert echoed == payload
    session = log.sessions[0]
    assert (session.bytes_in, session.bytes_out, session.end_cause) == (len(payload), len(payload), "eof")
    line = log.lines[0]
    assert f"in={len(payload)} out={len(payload)}" in line
    assert f"upstream={server.address}" in line and "end=eof" in line


async def test_server_that_speaks_first_reaches_a_silent_client(relay: str) -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        await writer.drain()
        assert await reader.readline() == b"QUIT\r\n"
        writer.write(b"221 bye\r\n")
        await writer.drain()

    async with Upstream(banner) as server, running(make_config([server.address], relay=relay)) as (proxy, _):
        reader, writer = await connect(proxy.port())
        assert await asyncio.wait_for(reader.readline(), 5) == b"220 hello\r\n"
        writer.write(b"QUIT\r\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"221 bye\r\n"
        writer.close()


async def test_bytes_sent_before_the_upstream_connects_are_delivered_first(relay: str) -> None:
    received = bytearray()

    async def slow_accept_collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.read())
        writer.write(b"got %d" % len(received))
        await writer.drain()

    async with Upstream(slow_accept_collect) as server, running(
        make_config([server.address], relay=relay)
    ) as (proxy, _):
        payload = b"".join(b"%06d" % i for i in range(20_000))  # 120 KB: more than one buffer
        reply = await roundtrip(proxy.port(), payload)
    assert bytes(received) == payload
    assert reply == b"got %d" % len(payload)


async def test_client_half_close_keeps_the_reply_direction_open(relay: str) -> None:
    """Case 1: the client shuts down writing; the upstream still answers after seeing EOF."""

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the FIN
        await asyncio.sleep(0.2)  # the behaviour under test: the reply direction stays open meanwhile
        writer.write(b"reply to " + request)
        await writer.drain()

    async with Upstream(answer_after_eof) as server, running(
        make_config([server.address], relay=relay)
    ) as (proxy, log):
        assert await roundtrip(proxy.port(), b"question") == b"reply to question"
        await log.wait_for(1)
    assert log.sessions[0].end_cause == "eof"  # both directions ended with a FIN


async def test_upstream_half_close_lets_the_client_keep_sending(relay: str) -> None:
    """Case 2: FIN from the upstream reaches the client, which can still send; both FINs end it."""

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting")
        writer.write_eof()
        data = await reader.read()
        assert data == b"late data"
        # the upstream can no longer write (it half-closed); it just closes after reading all

    async with Upstream(greet_then_listen) as server, running(
        make_config([server.address], relay=relay)
    ) as (proxy, log):
        reader, writer = await connect(proxy.port())
        assert await asyncio.wait_for(reader.read(), 5) == b"greeting"  # EOF arrived
        writer.write(b"late data")
        writer.write_eof()
        await log.wait_for(1)
        writer.close()
    assert log.sessions[0].bytes_in == len(b"late data")
    assert log.sessions[0].end_cause == "eof"


async def test_upstream_writes_then_closes_every_byte_arrives(relay: str) -> None:
    """Case 5: a large reply followed at once by close() is delivered in full before the close."""
    blob = os.urandom(2_000_000)

    async def dump_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(blob)
        await writer.drain()
        writer.close()

    async with Upstream(dump_and_close) as server, running(make_config([server.address], relay=relay)) as (proxy, _):
        reader, writer = await connect(proxy.port())
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert hashlib.sha256(data).digest() == hashlib.sha256(blob).digest()


async def test_upstream_reset_tears_down_the_client(relay: str) -> None:
    """Case 6: an RST from the upstream closes the client promptly and is logged as a reset."""

    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    async with Upstream(reset_after_hello) as server, running(
        make_config([server.address], relay=relay)
    ) as (proxy, log):
        reader, writer = await connect(proxy.port())
        writer.write(b"hello")
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        await log.wait_for(1)
        writer.close()
    assert log.sessions[0].end_cause == "upstream_reset"
    assert not proxy.sessions


async def test_client_reset_tears_down_the_upstream(relay: str) -> None:
    async with upstreams(1) as [server], running(make_config([server.address], relay=relay)) as (proxy, log):
        sock = socket.create_connection(("127.0.0.1", proxy.port()))
        sock.sendall(b"ping")
        await eventually(lambda: server.active == 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        await log.wait_for(1)
        await eventually(lambda: server.active == 0)
    assert log.sessions[0].end_cause == "client_reset"
    assert proxy.pools["default"].members[0].active == 0


@pytest.mark.parametrize("buffer_size", [1024, 65536])
async def test_large_writes_through_small_buffers_arrive_intact(buffer_size: int, relay: str) -> None:
    """Case 7: 8 MiB each way through a 1 KiB or 64 KiB buffer, hashes compared."""
    payload = os.urandom(8 * 1024 * 1024)
    async with upstreams(1) as [server], running(
        make_config([server.address], buffer_size=buffer_size, relay=relay)
    ) as (proxy, log):
        reader, writer = await connect(proxy.port())

        async def send() -> None:
            for i in range(0, len(payload), 100_000):
                writer.write(payload[i : i + 100_000])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        echoed = await asyncio.wait_for(reader.read(), 30)
        await sender
        writer.close()
        await log.wait_for(1)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert (log.sessions[0].bytes_in, log.sessions[0].bytes_out) == (len(payload), len(payload))
