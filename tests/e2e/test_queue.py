"""The pool's queue on real sockets: a client that finds every eligible member at its max_conns waits,
oldest first, for at most ``queue_timeout`` and among at most ``max_queue`` others; what it sends
meanwhile is held (bounded) and delivered. Health probes are off, so only clients reach the upstreams,
which count the sessions they hold (``Upstream.active``/``peak``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from l4proxy.balancer import AT_CAP
from l4proxy.config import Address, Config, MemberConfig, PoolConfig
from l4proxy.dialer import queue_timeout
from l4proxy.pool import Pool

from ..io.test_limits import echoed
from ..io.test_retries import CLOCK_SLACK
from ..kit import Upstream, connect, eventually, running, upstreams
from .test_traffic import pooled, with_pool
from .test_workers import serving, supervised


def queued(server: Upstream, **settings: Any) -> Config:
    """One member with room for one session, and a queue (30 s unless ``queue_timeout`` is given)."""
    settings.setdefault("queue_timeout", 30.0)
    settings.setdefault("max_queue", 8)
    return with_pool(pooled([server], {"max_conns": 1}, **settings))


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST (SO_LINGER 0): the client is gone, not half-closed."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def closed_by_proxy(reader: asyncio.StreamReader) -> bytes:
    """What the proxy sent before closing the client (a reset counts as nothing sent)."""
    with contextlib.suppress(ConnectionResetError):
        return await asyncio.wait_for(reader.read(), 10)
    return b""


QUEUE_TIMEOUTS: list[tuple[dict[str, Any], float]] = [
    ({}, 5.0),
    ({"connect_timeout": 0.4}, 0.4),
    ({"connect_timeout": 0.4, "queue_timeout": 9.0}, 9.0),
]


def test_the_queue_timeout_defaults_to_the_connect_timeout() -> None:
    member = (MemberConfig(Address("127.0.0.1", 1)),)
    got = [queue_timeout(Pool(PoolConfig(members=member, **settings))) for settings, _ in QUEUE_TIMEOUTS]
    assert got == [want for _, want in QUEUE_TIMEOUTS]


async def test_a_client_waits_at_most_the_queue_timeout_then_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "l4proxy.dialer")
    async with upstreams(1) as [server], running(queued(server, max_queue=8, queue_timeout=0.3)) as (proxy, log):
        pool = proxy.pools["default"]
        _holder = await echoed(proxy.port())
        started = time.monotonic()
        reader, writer = await connect(proxy.port())
        writer.write(b"early")
        await eventually(lambda: pool.queue.length == 1)
        assert await closed_by_proxy(reader) == b""
        waited = time.monotonic() - started
        await log.wait_for(1)
        writer.close()
    assert 0.3 - CLOCK_SLACK <= waited < 3
    cause = f"no_upstream ({AT_CAP}; waited 0.3s in the queue (queue_timeout))"
    assert log.sessions[0].end_cause == cause
    assert (pool.queue.timeouts, pool.queue.length, pool.queue.served, server.accepted) == (1, 0, 0, 1)
    assert sum(f"in pool default: {cause[13:-1]}" in m for m in caplog.messages) == 1


async def test_a_full_queue_refuses_at_once_and_places_go_oldest_first() -> None:
    async with upstreams(1) as [server], running(queued(server, max_queue=2)) as (proxy, log):
        pool = proxy.pools["default"]
        _first_reader, first_writer = await echoed(proxy.port())
        waiters = []
        for count, tag in enumerate((b"1", b"2"), 1):  # two wait, in this order, each with a byte sent
            reader, writer = await connect(proxy.port())
            writer.write(tag)
            waiters.append((reader, writer, tag))
            await eventually(lambda n=count: pool.queue.length == n)  # type: ignore[misc]
        started = time.monotonic()
        reader, writer = await connect(proxy.port())  # a third: the queue is full
        assert await closed_by_proxy(reader) == b""
        assert time.monotonic() - started < 5  # at once, not after the 30 s queue timeout
        writer.close()
        await log.wait_for(1)
        assert log.sessions[0].end_cause == f"no_upstream ({AT_CAP}; the queue is full (2 clients))"
        assert (pool.queue.full, pool.queue.length) == (1, 2)
        await asyncio.sleep(0.02)  # the waiting is the behaviour measured: each waiter waits 20 ms more
        first_writer.close()  # its place goes to the oldest waiter, which gets its byte back
        for reader, writer, tag in waiters:
            assert await asyncio.wait_for(reader.readexactly(1), 5) == tag
            assert pool.queue.served == int(tag)
            writer.close()  # and its place to the next
        await log.wait_for(4)
    assert server.peak == 1 and server.accepted == 3
    assert pool.queue.length == 0 and pool.queue.waited >= 0.04  # the loop's clock counts in ms on uvloop


async def test_bytes_sent_while_queued_are_held_bounded_and_delivered_in_order() -> None:
    async with upstreams(1) as [server], running(queued(server)) as (proxy, log):
        pool = proxy.pools["default"]
        _reader, holder = await echoed(proxy.port())
        payload = os.urandom(4 << 20)  # far more than the proxy holds: the rest waits in the kernel
        reader, writer = await connect(proxy.port())
        writer.write(payload)
        await eventually(lambda: pool.queue.length == 1)
        [waiting] = [s for s in proxy.sessions if s.member is None]
        await eventually(lambda: waiting.client.nbytes >= 65536)  # reading paused past one buffer
        await asyncio.sleep(0.2)  # a pause that is not held would read on meanwhile
        held = sum(len(chunk) for chunk in waiting.client.pending or [])
        assert 65536 <= held <= 65536 + (256 << 10)  # one buffer, plus at most the read that crossed it
        holder.close()
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
        assert got == payload
        writer.close()
        await log.wait_for(2)
    assert pool.queue.served == 1


async def test_a_client_that_leaves_while_queued_gives_its_turn_to_the_next() -> None:
    async with upstreams(1) as [server], running(queued(server)) as (proxy, log):
        pool = proxy.pools["default"]
        _reader, holder = await echoed(proxy.port())
        _gone_reader, gone = await connect(proxy.port())
        await eventually(lambda: pool.queue.length == 1)
        reader, writer = await connect(proxy.port())
        writer.write(b"n")
        await eventually(lambda: pool.queue.length == 2)
        reset(gone)  # gone, having sent nothing: its dial stops and its turn passes (a FIN would wait on)
        await eventually(lambda: pool.queue.length == 1)
        holder.close()
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"n"
        writer.close()
        await log.wait_for(3)
    assert (pool.queue.served, pool.queue.timeouts, server.accepted, server.peak) == (1, 0, 2, 1)


async def test_workers_share_the_cap_and_each_serves_its_own_queue(tmp_path: Path) -> None:
    async with serving(1) as [server]:
        spec = f"{server.address};max_conns=2"
        flags = ("--no-health-checks", "--queue-timeout", "20s")
        async with supervised(tmp_path, [spec], *flags) as proxy:  # type: ignore[list-item]  # as typed

            async def one(index: int) -> bytes:
                reader, writer = await connect(proxy.port)
                writer.write(b"%d" % index)  # held while it waits
                try:
                    return await asyncio.wait_for(reader.readexactly(1), 20)
                finally:
                    writer.close()  # its place goes to a waiting client, in this worker or the other

            got = await asyncio.gather(*(one(i) for i in range(8)))
            records = await proxy.wait_records(8)
    assert got == [b"%d" % i for i in range(8)]
    assert server.peak == 2  # never more than the cap across both workers
    assert not [line for line in records if "no_upstream" in line], records
    assert {line.rsplit(" ", 1)[-1] for line in records} == {"worker=0", "worker=1"}  # both served some
