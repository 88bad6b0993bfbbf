"""Byte-exact integrity under churn: many concurrent sessions, random chunk sizes and random endings.

RELIABILITY.md case 10 (after Envoy's ``TcpProxyRandomBehavior``). 120 clients, at most 60 at a time,
over three echo members. Each sends a random payload (up to 1 MiB) in random chunks (1 B to 64 KiB,
log-uniform so small writes are common) and then either half-closes and checks the echo byte for byte,
or leaves abruptly part-way (close with unread data, or an RST). The random choices come from a fixed
seed; only the interleaving is left to the scheduler. Afterwards nothing may be left: no session, no
member count, no upstream connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import struct
from dataclasses import dataclass

import pytest

from l4proxy import Proxy

from ..kit import ENGINES, RecordingLog, Upstream, connect, eventually, make_config, running, upstreams

CLIENTS = 120
CONCURRENCY = 60
MAX_PAYLOAD = 1024 * 1024


@dataclass
class Plan:
    """What one client will do, drawn up front from the seeded generator."""

    payload: bytes
    chunks: list[int]
    ending: str  # "clean", "close" or "reset"
    cut_after: int  # chunks written before an abrupt ending
    delay: float


@dataclass
class Outcome:
    plan: Plan
    local_port: int = 0
    sent: int = 0
    echoed_digest: bytes = b""
    echoed_len: int = -1


def make_plan(rng: random.Random) -> Plan:
    size = rng.randint(0, MAX_PAYLOAD)
    payload = rng.randbytes(size)
    chunks: list[int] = []
    left = size
    while left:
        step = min(left, int(2 ** rng.uniform(0, 16)))
        chunks.append(step)
        left -= step
    ending = rng.choices(["clean", "close", "reset"], weights=[6, 2, 2])[0]
    cut_after = rng.randint(0, len(chunks))
    return Plan(payload, chunks, ending, cut_after, rng.uniform(0, 0.05))


async def run_client(port: int, plan: Plan, gate: asyncio.Semaphore) -> Outcome:
    outcome = Outcome(plan)
    async with gate:
        await asyncio.sleep(plan.delay)
        reader, writer = await connect(port)
        outcome.local_port = writer.get_extra_info("sockname")[1]
        collector = asyncio.create_task(collect(reader, outcome))
        try:
            await write_chunks(writer, plan, outcome)
            if plan.ending == "clean":
                writer.write_eof()
                await asyncio.wait_for(collector, 20)
            else:
                end_abruptly(writer, plan.ending)
                with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                    collector.cancel()
                    await collector
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return outcome


async def write_chunks(writer: asyncio.StreamWriter, plan: Plan, outcome: Outcome) -> None:
    offset = 0
    limit = plan.cut_after if plan.ending != "clean" else len(plan.chunks)
    for size in plan.chunks[:limit]:
        writer.write(plan.payload[offset : offset + size])
        offset += size
        await writer.drain()
    outcome.sent = offset


async def collect(reader: asyncio.StreamReader, outcome: Outcome) -> None:
    h = hashlib.sha256()
    total = 0
    while data := await reader.read(65536):
        h.update(data)
        total += len(data)
    outcome.echoed_digest, outcome.echoed_len = h.digest(), total


def end_abruptly(writer: asyncio.StreamWriter, how: str) -> None:
    if how == "reset":
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.transport.close()


def assert_no_leaks(proxy: Proxy, servers: list[Upstream]) -> None:
    assert not proxy.sessions
    assert [m.active for m in proxy.pools["default"].members] == [0] * len(servers)
    assert [s.active for s in servers] == [0] * len(servers)


@pytest.mark.parametrize("relay", ENGINES)
async def test_random_sessions_arrive_byte_exact_and_leave_nothing_behind(relay: str) -> None:
    rng = random.Random(20_261_126)
    plans = [make_plan(rng) for _ in range(CLIENTS)]
    gate = asyncio.Semaphore(CONCURRENCY)
    async with upstreams(3) as servers, running(
        make_config([s.address for s in servers], idle_timeout=10.0, half_closed_timeout=2.0, relay=relay)
    ) as (proxy, log):
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(run_client(proxy.port(), plan, gate) for plan in plans)), 60
        )
        await log.wait_for(CLIENTS, timeout=10)
        await eventually(lambda: all(s.active == 0 for s in servers))
        assert_no_leaks(proxy, servers)
    check_outcomes(outcomes, log)
    assert sum(s.accepted for s in servers) == CLIENTS
    assert min(s.accepted for s in servers) >= CLIENTS // 6  # least-connections spread the load


def check_outcomes(outcomes: list[Outcome], log: RecordingLog) -> None:
    by_port = {int(s.client_addr.rsplit(":", 1)[1]): s for s in log.sessions}
    assert len(by_port) == len(log.sessions) == CLIENTS
    clean = [o for o in outcomes if o.plan.ending == "clean"]
    assert len(clean) >= CLIENTS // 2
    for outcome in outcomes:
        session = by_port[outcome.local_port]
        payload = outcome.plan.payload
        if outcome.plan.ending == "clean":
            assert outcome.echoed_len == len(payload)
            assert outcome.echoed_digest == hashlib.sha256(payload).digest()
            assert (session.bytes_in, session.bytes_out, session.end_cause) == (len(payload), len(payload), "eof")
        else:
            assert session.bytes_in <= outcome.sent
            assert session.bytes_out <= session.bytes_in
            assert session.end_cause in {"eof", "client_closed", "client_reset", "upstream_closed", "upstream_reset"}


async def test_clients_that_vanish_while_the_upstream_connects_leak_nothing() -> None:
    """Clients that reset right after connecting race the dial: when the connect completes just as the
    client goes, the fresh upstream connection must be closed and the member's count released."""
    async with upstreams(3) as servers, running(make_config([s.address for s in servers])) as (proxy, log):
        for round_ in range(4):  # a different gap each round moves the resets across the dial
            clients = []
            for _ in range(50):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port()))
                clients.append(sock)
            await asyncio.sleep(0.002 * round_)
            for sock in clients:
                sock.close()
        await log.wait_for(200, timeout=10)
        await eventually(lambda: all(s.active == 0 for s in servers))
        assert_no_leaks(proxy, servers)
    assert {s.end_cause for s in log.sessions} <= {"client_reset", "client_closed"}
