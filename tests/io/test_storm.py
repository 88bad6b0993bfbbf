"""Backend-drop storm (``docs/reliability.md`` case 34): hundreds of upstream connections, all busy,
reset at the same moment, again and again, on both loops and both relay engines. The process must
survive (libuv has aborted another uvloop proxy in exactly this case), end every session as a reset,
leave nothing behind, and keep serving."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from ..faults import FaultLink
from ..kit import ENGINES, connect, eventually, make_config, roundtrip, running, upstreams

SESSIONS = 300
ROUNDS = 3


async def busy_client(port: int, started: asyncio.Event, ready: list[int]) -> int:
    """Trade 1 KiB messages until the connection ends; how many round trips completed."""
    reader, writer = await connect(port)
    trips = 0
    message = os.urandom(1024)
    try:
        while True:
            writer.write(message)
            echoed = await asyncio.wait_for(reader.readexactly(len(message)), 10)
            assert echoed == message  # an echo is whole and unchanged, or the connection ends
            trips += 1
            if trips == 1:
                ready.append(1)
                if len(ready) == SESSIONS:
                    started.set()
    except (ConnectionError, asyncio.IncompleteReadError):
        return trips
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("relay", ENGINES)
async def test_hundreds_of_upstream_resets_at_once_repeated(relay: str) -> None:
    async with upstreams(1) as [server], FaultLink(server.address) as link, running(
        make_config([link.address], relay=relay, retries=0)
    ) as (proxy, log):
        for round_ in range(ROUNDS):
            started, ready = asyncio.Event(), []
            clients = [asyncio.ensure_future(busy_client(proxy.port(), started, ready)) for _ in range(SESSIONS)]
            await asyncio.wait_for(started.wait(), 30)
            assert link.cut_all(rst=True) == SESSIONS
            trips = await asyncio.wait_for(asyncio.gather(*clients), 30)
            assert all(t >= 1 for t in trips)
            await log.wait_for((round_ + 1) * SESSIONS, timeout=30)
            await eventually(lambda: not proxy.sessions and server.active == 0, timeout=10)
            assert await roundtrip(proxy.port(), b"still serving") == b"still serving"
            await log.wait_for((round_ + 1) * (SESSIONS + 1), timeout=5)
    storm = [s for s in log.sessions if s.bytes_in != len(b"still serving")]
    assert len(storm) == ROUNDS * SESSIONS
    assert {s.end_cause for s in storm} <= {"upstream_reset", "upstream_closed", "client_reset", "client_closed"}
    assert proxy.pools["default"].members[0].active == 0
