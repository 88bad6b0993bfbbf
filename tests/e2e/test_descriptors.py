"""Descriptor limits through the real ``l4proxy`` command in a child process: the listener accepts only
the clients it can serve (each session's real descriptor count, per engine), and follows a limit
lowered at run time. A client is either served or waits in the kernel's backlog; none is accepted and
then dropped. RELIABILITY.md case 31, with the splice engine's eight descriptors per session and a
limit changed with ``prlimit`` while the proxy runs."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from l4proxy import Address, splice

from ..kit import SlowAccept, Upstream, eventually
from ..servers import Command

CLIENTS = 300


@contextlib.asynccontextmanager
async def child_proxy(member: Address, *args: str, limit: int | None = None) -> AsyncIterator[Command]:
    """The command in front of ``member``; leaving sends SIGTERM and expects exit 0 and no traceback."""
    async with Command("--upstream", str(member), "--access-log", "off", *args, limit=limit) as proxy:
        yield proxy
        assert await proxy.stopped() == 0
    assert "Traceback" not in proxy.stderr, proxy.stderr


class Clients:
    """``CLIENTS`` clients at once, each sending a message and waiting for its echo, then holding its
    session until ``release`` is set. A client accepted and then dropped sees EOF or a reset instead."""

    def __init__(self, port: int) -> None:
        self.echoed = 0
        self.dropped: list[str] = []
        self.release = asyncio.Event()
        self.tasks = [asyncio.create_task(self.one(port, i)) for i in range(CLIENTS)]

    async def one(self, port: int, i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            message = b"client-%03d\n" % i
            writer.write(message)
            try:
                assert await asyncio.wait_for(reader.readexactly(len(message)), 60) == message
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                self.dropped.append(f"client {i}: {exc!r}")
                return
            self.echoed += 1
            await self.release.wait()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def every_client_served(proxy: Command, server: Upstream) -> None:
    """Hold sessions until the proxy pauses accepting, check that no client was dropped, then let the
    sessions end one by one: the waiting clients are then accepted and served."""
    clients = Clients(proxy.port)
    try:
        # the descriptor count pauses accepting, or the --max-connections it derives does so first
        paused = ("accept on 127.0.0.1:", "is full")
        await eventually(lambda: any(proxy.count(p) for p in paused) or bool(clients.dropped), timeout=30)
        await eventually(lambda: clients.echoed + len(clients.dropped) >= server.accepted, timeout=30)
        assert not clients.dropped, clients.dropped
        assert clients.echoed < CLIENTS  # the limit did bite: some clients wait in the backlog
        clients.release.set()
        await asyncio.wait_for(asyncio.gather(*clients.tasks), 60)
        assert not clients.dropped, clients.dropped
        assert clients.echoed == CLIENTS
    finally:
        for task in clients.tasks:
            task.cancel()
    assert not any("no upstream" in line or "connect to" in line for line in proxy.err_lines), proxy.stderr


@pytest.mark.skipif(not splice.AVAILABLE, reason="the splice engine needs Linux os.splice")
async def test_splice_sessions_are_counted_at_eight_descriptors() -> None:
    """1,000 descriptors, 300 clients at once under ``--relay splice``: about 120 sessions fit; the
    others wait in the backlog and are served as sessions end."""
    args = ("--no-health-checks", "--relay", "splice")
    async with Upstream() as server, child_proxy(server.address, *args, limit=1000) as proxy:
        await every_client_served(proxy, server)


def accept_queue(port: int) -> int:
    """Clients waiting in the accept queue of the listener on 127.0.0.1:``port`` (a LISTEN row of
    /proc/net/tcp: its rx_queue is the queue's length)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1] == f"0100007F:{port:04X}" and cols[3] == "0A":
            return int(cols[4].split(":")[1], 16)
    raise AssertionError(f"no listener on 127.0.0.1:{port}")


class Senders:
    """``CLIENTS`` clients at once, each sending its message, half-closing, and waiting for the proxy to
    close in turn."""

    def __init__(self, port: int) -> None:
        self.connected = 0
        self.messages = [b"client-%03d" % i for i in range(CLIENTS)]
        self.tasks = [asyncio.create_task(self.one(port, m)) for m in self.messages]

    async def one(self, port: int, message: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.connected += 1
        try:
            writer.write(message)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 60) == b""
        finally:
            writer.close()


@pytest.mark.skipif(not splice.AVAILABLE, reason="the splice engine needs Linux os.splice")
async def test_clients_still_dialing_count_at_the_descriptors_they_will_hold() -> None:
    """The budget is counted again while a burst of clients is still dialing: the count must take off
    what those clients will open, not only what they hold. Every dial waits (the member's accept queue
    is full), so under 1,000 descriptors and ``--relay splice`` about 120 of 300 clients are accepted and
    the others wait in the backlog; once the member accepts, every client's bytes arrive. (Counting only
    the open descriptors let nearly every client in, and their sessions then failed with EMFILE.)"""
    member = SlowAccept()
    args = ("--no-health-checks", "--relay", "splice", "--connect-timeout", "60s")
    try:
        async with child_proxy(member.address, *args, limit=1000) as proxy:
            clients = Senders(proxy.port)
            try:
                await proxy.logged("accept on 127.0.0.1:", timeout=30)  # paused: the budget is spent
                await eventually(lambda: clients.connected == CLIENTS, timeout=30)
                accepted = CLIENTS - accept_queue(proxy.port)
                assert 90 <= accepted <= 1000 // 8, accepted
                await member.open()
                await asyncio.wait_for(asyncio.gather(*clients.tasks), 60)
            finally:
                for task in clients.tasks:
                    task.cancel()
            received = [data for data in member.received if data]  # its queue's fillers sent nothing
            assert sorted(received) == clients.messages
            assert not any("no upstream" in line or "connect to" in line for line in proxy.err_lines), proxy.stderr
    finally:
        await member.close()


async def test_a_limit_lowered_at_run_time_pauses_accepting_instead_of_dropping() -> None:
    async with Upstream() as server, child_proxy(server.address, "--no-health-checks") as proxy:
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (100, 100))
        await eventually(lambda: proxy.count("open-files limit is now 100") == 1, timeout=5)
        await every_client_served(proxy, server)
