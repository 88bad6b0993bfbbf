"""The zero-copy relay engine (``l4proxy/splice.py``) and the adaptive switch to it, on real sockets.

RELIABILITY.md cases 1, 2 and 6 (half-close both ways and resets on spliced sessions), 4 and 23
(half-closed and idle timeouts after the switch), 7 and 8 (bulk both ways byte-exact; a slow reader is
bounded by the pipe), 10 (bytes in flight when a live session switches engines are neither lost nor
reordered), 11 (exact access-log counts across both engines), and the engine's own resources: pipes
come back to the pool, and no descriptor outlives the proxy. Also: TLS sessions and ``--relay
transport`` never switch, small request/response traffic stays on transports under ``auto``, and a
system without ``os.splice`` falls back to transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest
import trustme

from l4proxy import ListenerConfig, Proxy, splice
from l4proxy.cli import build_config, command
from l4proxy.config import Address, ServerTLSConfig
from l4proxy.errors import ConfigError

from ..kit import Upstream, connect, eventually, make_config, roundtrip, running, upstreams

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="os.splice is Linux-only")

MiB = 1024 * 1024
IDLE = 0.3


def chunks(count: int, size: int = MiB) -> list[bytes]:
    """``count`` chunks of distinct content, so a lost, repeated or reordered chunk changes the hash."""
    return [hashlib.sha256(b"%d" % i).digest() * (size // 32) for i in range(count)]


def sha(parts: list[bytes]) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


async def send_all(writer: asyncio.StreamWriter, parts: list[bytes], eof: bool = True) -> None:
    for part in parts:
        writer.write(part)
        await writer.drain()
    if eof:
        writer.write_eof()


async def read_all(reader: asyncio.StreamReader, limit: int | None = None) -> tuple[int, bytes]:
    """Bytes read (until EOF, or ``limit``) and their sha256."""
    h, total = hashlib.sha256(), 0
    while limit is None or total < limit:
        data = await reader.read(min(MiB, limit - total) if limit is not None else MiB)
        if not data:
            break
        h.update(data)
        total += len(data)
    return total, h.digest()


def only_session(proxy: Proxy) -> object:
    assert len(proxy.sessions) == 1
    return next(iter(proxy.sessions))


def spliced(session: object) -> splice.Splicer:
    engine = getattr(session, "engine", None)
    assert isinstance(engine, splice.Splicer), engine
    return engine


def rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def open_fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


# --- bulk, switching, counts -------------------------------------------------------------------------


@pytest.mark.parametrize("relay", ["auto", "splice"])
async def test_bulk_both_ways_is_byte_exact_and_logged_exactly(relay: str) -> None:
    """24 MiB to an echo upstream while reading the echo: hashes equal, counts exact, spliced."""
    parts = chunks(24)
    async with upstreams(1) as [server], running(make_config([server.address], relay=relay)) as (proxy, log):
        reader, writer = await connect(proxy.port())
        sender = asyncio.create_task(send_all(writer, parts))
        total, digest = await asyncio.wait_for(read_all(reader), 30)
        await sender
        await log.wait_for(1)
        writer.close()
    session = log.sessions[0]
    assert (total, digest) == (24 * MiB, sha(parts))
    assert (session.bytes_in, session.bytes_out, session.end_cause) == (24 * MiB, 24 * MiB, "eof")
    assert f"in={24 * MiB} out={24 * MiB}" in log.lines[0]
    engine = spliced(session)
    if relay == "splice":  # at once, or as soon as the bytes sent before the upstream connected are out
        assert engine.switched_at[0] <= MiB, engine.switched_at


async def test_auto_switches_mid_session_with_bytes_in_flight() -> None:
    """Small exchanges on transports, then a 16 MiB stream that switches engines while bytes are in
    flight both ways, then small exchanges again on splice: every byte arrives once and in order."""
    parts = chunks(64, 256 * 1024)
    async with upstreams(1) as [server], running(make_config([server.address])) as (proxy, log):
        reader, writer = await connect(proxy.port())
        for i in range(20):
            writer.write(b"ping %d\n" % i)
            assert await asyncio.wait_for(reader.readline(), 5) == b"ping %d\n" % i
        assert only_session(proxy).engine is None  # type: ignore[attr-defined]
        sender = asyncio.create_task(send_all(writer, parts, eof=False))
        total, digest = await asyncio.wait_for(read_all(reader, 16 * MiB), 30)
        await sender
        engine = spliced(only_session(proxy))
        for i in range(20):
            writer.write(b"pong %d\n" % i)
            assert await asyncio.wait_for(reader.readline(), 5) == b"pong %d\n" % i
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await log.wait_for(1)
        writer.close()
    small = sum(len(b"ping %d\n" % i) for i in range(20))
    assert (total, digest) == (16 * MiB, sha(parts))
    assert small < engine.switched_at[0] < small + 16 * MiB  # it switched in the middle of the stream
    assert engine.switched_at[1] < small + 16 * MiB  # with echo bytes still on their way
    session = log.sessions[0]
    assert session.bytes_in == session.bytes_out == 2 * small + 16 * MiB
    assert session.end_cause == "eof"


@pytest.mark.parametrize("relay", ["auto", "transport"])
async def test_small_messages_stay_on_transports(relay: str) -> None:
    """Request/response traffic never proves bulky under auto; transport never switches at all."""
    async with upstreams(1) as [server], running(make_config([server.address], relay=relay)) as (proxy, log):
        reader, writer = await connect(proxy.port())
        for _ in range(50):
            writer.write(b"x" * 1000 + b"\n")
            assert len(await asyncio.wait_for(reader.readline(), 5)) == 1001
        if relay == "transport":
            await send_all(writer, chunks(8), eof=False)
            assert (await asyncio.wait_for(read_all(reader, 8 * MiB), 10))[0] == 8 * MiB
        engine = only_session(proxy).engine  # type: ignore[attr-defined]
        writer.close()
        await log.wait_for(1)
    assert engine is (splice.NEVER if relay == "transport" else None)


async def test_tls_sessions_never_switch(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(b"".join(c.bytes() for c in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    tls = ServerTLSConfig(cert=str(cert), key=str(key))
    parts = chunks(8)
    async with upstreams(1) as [server], running(make_config([server.address], tls=tls, relay="splice")) as (
        proxy,
        log,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port(), ssl=client_ctx)
        sender = asyncio.create_task(send_all(writer, parts, eof=False))
        total, digest = await asyncio.wait_for(read_all(reader, 8 * MiB), 30)
        await sender
        engine = only_session(proxy).engine  # type: ignore[attr-defined]
        writer.close()
        await log.wait_for(1)
    assert (total, digest, engine) == (8 * MiB, sha(parts), splice.NEVER)


async def test_without_splice_sessions_stay_on_transports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splice, "AVAILABLE", False)
    parts = chunks(8)
    async with upstreams(1) as [server], running(make_config([server.address], relay="splice")) as (proxy, log):
        reader, writer = await connect(proxy.port())
        sender = asyncio.create_task(send_all(writer, parts))
        total, digest = await asyncio.wait_for(read_all(reader), 30)
        await sender
        await log.wait_for(1)
        writer.close()
    assert (total, digest, log.sessions[0].engine) == (8 * MiB, sha(parts), splice.NEVER)


# --- half-close and resets after the switch ------------------------------------------------------------


async def test_client_half_close_after_the_switch_keeps_the_reply_direction_open() -> None:
    """Case 1 on splice: the client streams, then sends FIN; the upstream answers after seeing EOF."""
    parts = chunks(8)

    async def digest_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count, digest = await read_all(reader)
        await asyncio.sleep(0.1)
        writer.write(b"%d " % count + digest.hex().encode() + b"x" * MiB)
        await writer.drain()

    async with Upstream(digest_after_eof) as server, running(make_config([server.address])) as (proxy, log):
        reader, writer = await connect(proxy.port())
        await send_all(writer, parts)
        engine = spliced(only_session(proxy))
        reply = await asyncio.wait_for(reader.read(), 10)
        await log.wait_for(1)
        writer.close()
    assert reply == b"%d " % (8 * MiB) + sha(parts).hex().encode() + b"x" * MiB
    assert engine.switched_at[0] < 8 * MiB
    assert (log.sessions[0].bytes_in, log.sessions[0].bytes_out) == (8 * MiB, len(reply))
    assert log.sessions[0].end_cause == "eof"


async def test_upstream_half_close_after_the_switch_lets_the_client_keep_sending() -> None:
    """Case 2 on splice: the upstream streams then sends FIN; the client still sends, then FIN ends it."""
    parts = chunks(8)
    late: list[bytes] = []

    async def stream_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send_all(writer, parts)
        late.append(await reader.read())

    async with Upstream(stream_then_listen) as server, running(make_config([server.address])) as (proxy, log):
        reader, writer = await connect(proxy.port())
        total, digest = await asyncio.wait_for(read_all(reader), 10)  # until the upstream's FIN
        spliced(only_session(proxy))
        writer.write(b"late data")
        writer.write_eof()
        await log.wait_for(1)
        writer.close()
    assert (total, digest, late) == (8 * MiB, sha(parts), [b"late data"])
    session = log.sessions[0]
    assert (session.bytes_in, session.bytes_out, session.end_cause) == (9, 8 * MiB, "eof")


@pytest.mark.parametrize("side", ["client", "upstream"])
async def test_reset_mid_stream_tears_both_sides_down(side: str) -> None:
    """Case 6 on splice: an RST from either side during a stream ends the session as a reset."""
    parts = chunks(64)
    cut = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            for i, part in enumerate(parts):
                if i == 8 and side == "upstream":
                    await cut.wait()
                    rst(writer)
                    return
                writer.write(part)
                await writer.drain()

    async with Upstream(stream) as server, running(make_config([server.address])) as (proxy, log):
        reader, writer = await connect(proxy.port())
        await asyncio.wait_for(read_all(reader, 4 * MiB), 10)
        spliced(only_session(proxy))
        if side == "client":
            rst(writer)
        else:
            cut.set()
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(read_all(reader), 5)
            writer.close()
        await log.wait_for(1)
        await eventually(lambda: server.active == 0)
        assert not proxy.sessions and proxy.pools["default"].members[0].active == 0
    assert log.sessions[0].end_cause == f"{side}_reset"


# --- backpressure and timeouts ------------------------------------------------------------------------


async def test_slow_reader_is_bounded_by_the_pipe() -> None:
    """Case 8 on splice: a client that stops reading stops the upstream; the pipe never holds more than
    it can, and nothing is buffered in user space; then every byte arrives."""
    parts = chunks(48)

    async def fast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"go\n"
        await send_all(writer, parts)
        await reader.read()

    async with Upstream(fast) as server, running(make_config([server.address], relay="splice")) as (proxy, log):
        reader, writer = await connect(proxy.port())
        writer.write(b"go\n")
        await eventually(lambda: server.active == 1)
        session = only_session(proxy)
        await eventually(lambda: isinstance(getattr(session, "engine", None), splice.Splicer))
        engine = spliced(session)
        capacity = engine.flows[1].room
        samples = []
        for _ in range(30):  # the client reads nothing for 0.3 s
            await asyncio.sleep(0.01)
            samples.append((engine.held(), session.upstream.nbytes))  # type: ignore[attr-defined]
        assert max(held for held, _ in samples) <= capacity
        assert samples[-1][1] == samples[-10][1] < 48 * MiB  # the upstream is stalled, not buffered
        total, digest = await asyncio.wait_for(read_all(reader), 30)
        writer.write_eof()
        await log.wait_for(1)
        writer.close()
    assert (total, digest, log.sessions[0].bytes_out) == (48 * MiB, sha(parts), 48 * MiB)


async def test_idle_after_the_switch_is_reaped_with_exact_counts() -> None:
    """Case 23 on splice: a session that went quiet after a bulk transfer meets its idle timeout."""
    parts = chunks(8)
    async with upstreams(1) as [server], running(make_config([server.address], idle_timeout=IDLE)) as (proxy, log):
        reader, writer = await connect(proxy.port())
        sender = asyncio.create_task(send_all(writer, parts, eof=False))
        await asyncio.wait_for(read_all(reader, 8 * MiB), 10)
        await sender
        spliced(only_session(proxy))
        began = time.monotonic()
        await log.wait_for(1)
        waited = time.monotonic() - began
        await eventually(lambda: server.active == 0)
        writer.close()
    session = log.sessions[0]
    assert (session.end_cause, session.bytes_in, session.bytes_out) == ("idle_timeout", 8 * MiB, 8 * MiB)
    assert IDLE * 0.8 <= waited <= IDLE + 1.0, waited


async def test_half_closed_after_the_switch_is_reaped_by_its_own_timeout() -> None:
    """Case 4 on splice: the client streams then sends FIN; the upstream never answers nor closes."""
    parts = chunks(8)
    reaped = asyncio.Event()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_all(reader)
        await reaped.wait()

    async with Upstream(swallow) as server, running(
        make_config([server.address], idle_timeout=3600.0, half_closed_timeout=IDLE)
    ) as (proxy, log):
        reader, writer = await connect(proxy.port())
        await send_all(writer, parts)
        spliced(only_session(proxy))
        began = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        waited = time.monotonic() - began
        await log.wait_for(1)
        reaped.set()
        await eventually(lambda: server.active == 0)
        writer.close()
    assert (log.sessions[0].end_cause, log.sessions[0].bytes_in) == ("half_closed_timeout", 8 * MiB)
    assert IDLE * 0.5 <= waited <= IDLE + 1.0, waited


# --- resources ------------------------------------------------------------------------------------------


async def test_pipes_are_returned_to_the_pool_and_reused() -> None:
    async with upstreams(1) as [server], running(make_config([server.address], relay="splice")) as (proxy, log):
        pipes = []
        for i in range(3):
            reader, writer = await connect(proxy.port())
            writer.write(b"hello %d" % i)
            assert await asyncio.wait_for(reader.readexactly(7), 5) == b"hello %d" % i
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            await log.wait_for(i + 1)
            writer.close()
            pipes.append({flow.pipe for flow in spliced(log.sessions[i]).flows})
            assert pipes[i] <= set(proxy.splicing.pipes.idle)  # drained pipes went back
        assert pipes[0] == pipes[1] == pipes[2]  # and were taken again
    assert proxy.splicing.pipes.idle == []  # closed when the proxy stopped


async def test_no_descriptor_outlives_the_proxy() -> None:
    """Spliced sessions ending every way (clean, reset, idle timeout, shutdown) leave no descriptor."""
    async with upstreams(1) as [server], running(make_config([server.address], relay="splice")) as (proxy, _):
        assert await roundtrip(proxy.port(), b"warm-up") == b"warm-up"  # one-time descriptors of the loop
    before = open_fds()
    async with upstreams(1) as [server], running(make_config([server.address], relay="splice", idle_timeout=IDLE)) as (
        proxy,
        log,
    ):
        clients = [await connect(proxy.port()) for _ in range(8)]
        for i, (reader, writer) in enumerate(clients):
            writer.write(b"x" * 100_000)
            assert len(await asyncio.wait_for(reader.readexactly(100_000), 5)) == 100_000
            if i % 4 == 0:
                writer.write_eof()
            elif i % 4 == 1:
                rst(writer)
        await log.wait_for(6, timeout=5)  # the clean, the reset, and the idle ones; the rest at shutdown
        for _, writer in clients:
            writer.transport.abort()
    await asyncio.sleep(0.05)
    assert len(log.sessions) == 8
    assert {s.end_cause for s in log.sessions} >= {"eof", "client_reset", "idle_timeout"}
    assert all(isinstance(s.engine, splice.Splicer) for s in log.sessions)
    assert open_fds() == before


# --- configuration -------------------------------------------------------------------------------------


def test_relay_engine_is_validated() -> None:
    with pytest.raises(ConfigError) as caught:
        ListenerConfig(Address("127.0.0.1", 1), relay="fast")
    assert str(caught.value) == str(ConfigError("relay", "fast", "expected one of auto, splice, transport"))


@pytest.mark.parametrize(("args", "expected"), [([], "auto"), (["--relay", "splice"], "splice")])
def test_relay_flag(args: list[str], expected: str) -> None:
    ctx = command.make_context("l4proxy", ["--listen", ":6379", "--upstream", "a", *args])
    assert build_config(ctx.params).listeners[0].relay == expected
    ctx = command.make_context("l4proxy", ["--listen", ":6379", "--upstream", "a", "--relay", "fast"])
    with pytest.raises(ConfigError) as caught:
        build_config(ctx.params)
    assert str(caught.value) == "--relay 'fast': expected one of auto, splice, transport"

