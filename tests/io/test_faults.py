"""The fault kit itself: each fault does what it says, on IPv4 and IPv6, so tests built on it can trust it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest

from ..faults import Fault, FaultLink
from ..kit import Upstream, connect, eventually, roundtrip, upstreams

HOSTS = ["127.0.0.1", "::1"]


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[bytes, str]:
    """Everything until the end, and how it ended: ``fin`` or ``rst``."""
    got = bytearray()
    try:
        while data := await asyncio.wait_for(reader.read(65536), timeout):
            got += data
    except ConnectionResetError:
        return bytes(got), "rst"
    return bytes(got), "fin"


@pytest.mark.parametrize("host", HOSTS)
async def test_default_fault_relays_both_ways_with_half_close(host: str) -> None:
    payload = os.urandom(200_000)
    async with upstreams(1, host=host) as [server], FaultLink(server.address) as link:
        assert await roundtrip(link.port, payload, host=host) == payload
    assert link.relayed == {"up": len(payload), "down": len(payload)}


@pytest.mark.parametrize("host", HOSTS)
async def test_refuse_and_listen_again_on_the_same_port(host: str) -> None:
    async with upstreams(1, host=host) as [server], FaultLink(server.address) as link:
        port = link.port
        await link.refuse()
        with pytest.raises(ConnectionRefusedError):
            await connect(port, host)
        await link.listen_again()
        assert link.port == port
        assert await roundtrip(port, b"back", host=host) == b"back"


async def test_reset_on_accept() -> None:
    async with upstreams(1) as [server], FaultLink(server.address, Fault(reset_on_accept=True)) as link:
        reader, writer = await connect(link.port)
        assert await read_all(reader) == (b"", "rst")
        writer.close()
    assert server.accepted == 0


async def test_blackhole_accepts_and_never_answers() -> None:
    async with upstreams(1) as [server], FaultLink(server.address, Fault(blackhole=True)) as link:
        reader, writer = await connect(link.port)
        writer.write(b"anyone?")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
        assert link.active == 1 and server.accepted == 0
        writer.close()


async def test_stall_holds_bytes_for_its_time() -> None:
    async with upstreams(1) as [server], FaultLink(server.address, Fault(stall=0.3)) as link:
        started = time.monotonic()
        assert await roundtrip(link.port, b"late") == b"late"
        assert time.monotonic() - started >= 0.29  # uvloop's clock has millisecond steps


async def test_dribble_writes_one_byte_at_a_time() -> None:
    sizes: list[int] = []
    received = bytearray()

    async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            received.extend(data)
            sizes.append(len(data))

    async with Upstream(collect) as server, FaultLink(server.address, Fault(dribble=True, delay=0.01,
                                                                            direction="up")) as link:
        _, writer = await connect(link.port)
        writer.write(b"abcdef")
        writer.write_eof()
        await eventually(lambda: bytes(received) == b"abcdef")
        writer.close()
    assert sizes == [1] * 6  # 10 ms between bytes: each arrives in its own read


@pytest.mark.parametrize("cut_with", ["fin", "rst"])
async def test_cut_after_n_bytes(cut_with: str) -> None:
    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * 10_000)
        await writer.drain()
        await reader.read()

    async with Upstream(talk) as server, FaultLink(server.address, Fault(cut_after=1234, cut_with=cut_with)) as link:
        reader, writer = await connect(link.port)
        got, ended = await read_all(reader)
        writer.close()
    assert ended == cut_with
    assert got == b"x" * 1234 or (cut_with == "rst" and len(got) <= 1234)


async def test_greeting_reaches_the_peer_first() -> None:
    async with upstreams(1) as [server], FaultLink(server.address, Fault(greeting=b"220 hi\r\n")) as link:
        assert await roundtrip(link.port, b"QUIT\r\n") == b"220 hi\r\nQUIT\r\n"


async def test_cut_all_resets_every_live_connection() -> None:
    async with upstreams(1) as [server], FaultLink(server.address) as link:
        clients = [await connect(link.port) for _ in range(20)]
        for _, writer in clients:
            writer.write(b"p")
        await eventually(lambda: server.active == 20)
        assert link.cut_all() == 20
        endings = [(await read_all(reader))[1] for reader, _ in clients]
        for _, writer in clients:
            writer.close()
        await eventually(lambda: server.active == 0 and link.active == 0)
    assert set(endings) == {"rst"}


async def test_fault_changes_apply_to_new_connections_only() -> None:
    async with upstreams(1) as [server], FaultLink(server.address) as link:
        reader, writer = await connect(link.port)
        link.fault = Fault(blackhole=True)
        writer.write(b"still relayed")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"still relayed"
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
