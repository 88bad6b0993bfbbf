"""Slow readers: a fast writer must be paused, not buffered, and every byte must still arrive.

RELIABILITY.md case 8, both directions: 50 MiB from a fast sender through the proxy to a receiver that
reads 64 KiB and then sleeps. While the bytes flow, the test samples how much the proxy holds in its
own transports' write buffers (and in bytes held before the upstream connected) and asserts it stays
within ``buffer_size`` plus one read chunk. On the splice engine the proxy holds nothing in user space;
the bytes in its pipes are sampled instead, and stay within one pipe per direction.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from l4proxy import Proxy, splice

from ..kit import ENGINES, RecordingLog, Upstream, connect, eventually, make_config, running

pytestmark = pytest.mark.parametrize("relay", ENGINES)

TOTAL = 50 * 1024 * 1024
BUFFER = 65536
READ = 65536
# A transport's write buffer may pass the high-water mark by the one chunk just read from the other side
# (asyncio and uvloop read up to 256 KiB at a time) before pause_writing stops further reads.
ONE_READ = 256 * 1024


def bound(relay: str, buffer_size: int) -> int:
    """What the proxy may hold: a buffer and one read on transports, a pipe-full per direction with splice."""
    return buffer_size + ONE_READ if relay == "transport" else max(buffer_size + ONE_READ, 2 * splice.pipe_size())


def held_by_proxy(proxy: Proxy) -> int:
    """Bytes the proxy holds right now (buffers, early bytes, pipes), over every session and direction."""
    total = 0
    for session in proxy.sessions:
        if isinstance(session.engine, splice.Splicer):
            total += session.engine.held()
            spliced.add(session)
        for pump in (session.client, session.upstream):
            if pump is None:
                continue
            if pump.transport is not None and not pump.transport.is_closing():
                total += pump.transport.get_write_buffer_size()
            total += sum(map(len, pump.pending or ()))
    return total


spliced: set[object] = set()  # sessions seen on the splice engine


def payload_chunks() -> list[bytes]:
    """50 MiB as 1 MiB chunks of distinct content (so a lost or repeated chunk changes the hash)."""
    return [hashlib.sha256(b"%d" % i).digest() * (1024 * 1024 // 32) for i in range(TOTAL // (1024 * 1024))]


def digest(chunks: list[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


async def send_fast(writer: asyncio.StreamWriter, chunks: list[bytes]) -> None:
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()


async def read_slowly(reader: asyncio.StreamReader, proxy: Proxy, samples: list[int]) -> str:
    """Read 64 KiB, sample the proxy's buffers, sleep a little; the sha256 of everything read."""
    h = hashlib.sha256()
    while chunk := await reader.read(READ):
        h.update(chunk)
        samples.append(held_by_proxy(proxy))
        await asyncio.sleep(0.001)
    return h.hexdigest()


async def download_slowly(
    chunks: list[bytes], buffer_size: int, relay: str, samples: list[int]
) -> tuple[str, RecordingLog]:
    """A fast upstream sends ``chunks`` to a client that reads slowly; the digest received and the log.
    Afterwards nothing is left: no session, no member count, no upstream connection."""

    async def fast_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send_fast(writer, chunks)
        await reader.read()

    async with Upstream(fast_upstream) as server, running(
        make_config([server.address], buffer_size=buffer_size, idle_timeout=10.0, relay=relay)
    ) as (proxy, log):
        reader, writer = await connect(proxy.port())
        received = await asyncio.wait_for(read_slowly(reader, proxy, samples), 20)
        writer.write_eof()
        await log.wait_for(1)
        await eventually(lambda: server.active == 0)
        assert not proxy.sessions and proxy.pools["default"].members[0].active == 0
        writer.close()
    return received, log


async def test_slow_client_pauses_the_fast_upstream(relay: str) -> None:
    chunks = payload_chunks()
    spliced.clear()
    samples: list[int] = []
    received, log = await download_slowly(chunks, BUFFER, relay, samples)
    assert received == digest(chunks)
    assert log.sessions[0].bytes_out == TOTAL
    assert len(samples) >= TOTAL // READ // 2
    assert max(samples) <= bound(relay, BUFFER), max(samples)
    assert bool(spliced) == (relay == "splice")


async def test_fast_client_is_paused_by_the_slow_upstream(relay: str) -> None:
    chunks = payload_chunks()
    spliced.clear()
    samples: list[int] = []
    proxies: list[Proxy] = []

    async def slow_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = await read_slowly(reader, proxies[0], samples)
        writer.write(received.encode())
        await writer.drain()

    async with Upstream(slow_upstream) as server, running(
        make_config([server.address], buffer_size=BUFFER, idle_timeout=10.0, relay=relay)
    ) as (proxy, log):
        proxies.append(proxy)
        reader, writer = await connect(proxy.port())
        await asyncio.wait_for(send_fast(writer, chunks), 20)
        reply = await asyncio.wait_for(reader.read(), 20)
        await log.wait_for(1)
        await eventually(lambda: server.active == 0)
        assert not proxy.sessions and proxy.pools["default"].members[0].active == 0
        writer.close()
    assert reply == digest(chunks).encode()
    assert log.sessions[0].bytes_in == TOTAL
    assert len(samples) >= TOTAL // READ // 2
    assert max(samples) <= bound(relay, BUFFER), max(samples)
    assert bool(spliced) == (relay == "splice")


@pytest.mark.parametrize("buffer_size", [4096, 16384])
async def test_small_buffers_hold_at_most_one_read_past_the_high_water_mark(buffer_size: int, relay: str) -> None:
    """8 MiB through a 4 KiB or 16 KiB buffer: still bounded, by ``buffer_size`` plus one read."""
    chunks = payload_chunks()[:8]
    spliced.clear()
    samples: list[int] = []
    received, _ = await download_slowly(chunks, buffer_size, relay, samples)
    assert received == digest(chunks)
    assert max(samples) <= bound(relay, buffer_size), max(samples)
