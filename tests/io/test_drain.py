"""Graceful drain: stop accepting at once, let open sessions finish, abort the rest at the deadline.

RELIABILITY.md cases 32 (drain, in-process and through SIGTERM to the ``l4proxy`` command) and 9
(shutdown with sessions in flight: no crash, no leak, no traceback, no unhandled loop error).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time

from ..kit import Upstream, blackhole, connect, eventually, make_config, running, upstreams
from ..servers import Command


async def refused(port: int) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(connect(port), 2)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_drain_stops_accepting_and_waits_for_the_open_session() -> None:
    async with upstreams(1) as [server], running(make_config([server.address], drain_timeout=5.0)) as (
        proxy,
        log,
    ):
        port = proxy.port()
        reader, writer = await connect(port)
        writer.write(b"before ")
        assert await asyncio.wait_for(reader.readexactly(7), 5) == b"before "

        drain = asyncio.create_task(proxy.drain())
        await eventually(lambda: not proxy.listeners[0].sockets)  # the drain's first step
        assert await refused(port)  # no listener any more
        assert not drain.done()
        for word in (b"during ", b"drain"):  # the open session still relays both ways
            writer.write(word)
            assert await asyncio.wait_for(reader.readexactly(len(word)), 5) == word
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        ended = time.monotonic()
        await asyncio.wait_for(drain, 5)
        returned_after = time.monotonic() - ended
        writer.close()
        assert not proxy.sessions and proxy.pools["default"].members[0].active == 0
        await eventually(lambda: server.active == 0)
    assert returned_after < 0.5, returned_after
    assert [s.end_cause for s in log.sessions] == ["eof"]
    assert log.sessions[0].bytes_in == len(b"before during drain")


async def test_drain_aborts_a_session_that_never_ends_at_the_deadline() -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass

    async with Upstream(hold) as server, running(make_config([server.address], drain_timeout=0.3)) as (
        proxy,
        log,
    ):
        reader, writer = await connect(proxy.port())
        writer.write(b"stay")
        await eventually(lambda: server.active == 1)
        began = time.monotonic()
        await asyncio.wait_for(proxy.drain(), 5)
        took = time.monotonic() - began
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert not proxy.sessions and proxy.pools["default"].members[0].active == 0
        await eventually(lambda: server.active == 0)
    assert 0.25 <= took <= 1.0, took
    assert [s.end_cause for s in log.sessions] == ["shutdown"]
    assert "end=shutdown" in log.lines[0]


async def test_drain_with_transfers_and_dials_in_flight_leaves_nothing() -> None:
    """Case 9: a bulk transfer, a half-closed session and a client whose connect is still pending when
    the deadline passes; all are closed, each logged once, and nothing is left behind."""
    blob = b"z" * (8 * 1024 * 1024)

    async def pour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(blob)
        await writer.drain()
        await reader.read()

    with blackhole() as unreachable:
        async with Upstream(pour) as server, running(
            make_config([server.address, unreachable], drain_timeout=0.3, buffer_size=16384, retries=0)
        ) as (proxy, log):
            # least-connections with rotating ties: server, then the blackhole, then the server again
            members = proxy.pools["default"].members
            slow_reader, slow = await connect(proxy.port())  # never reads: the transfer stalls
            await eventually(lambda: len(proxy.sessions) == 1 and members[0].active == 1)
            _pending_reader, pending = await connect(proxy.port())
            await eventually(lambda: members[1].active == 1)
            _half_reader, half = await connect(proxy.port())
            half.write_eof()
            await eventually(lambda: sum(s.upstream is not None for s in proxy.sessions) == 2)
            assert len(proxy.sessions) == 3 and [m.active for m in members] == [2, 1]
            await asyncio.wait_for(proxy.drain(), 5)
            assert not proxy.sessions and [m.active for m in members] == [0, 0]
            await eventually(lambda: server.active == 0)
            for writer in (slow, pending, half):
                writer.transport.abort()
            del slow_reader
    assert sorted(s.end_cause for s in log.sessions) == ["shutdown", "shutdown", "shutdown"]


def queued_clients(port: int, count: int) -> list[socket.socket]:
    """``count`` clients connected (the kernel completes the handshake and queues them in the listening
    socket's backlog) that sent their bytes and half-closed; blocking calls, so the loop does not run
    and accepts none of them yet."""
    clients = []
    for index in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"client %d" % index)
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        clients.append(sock)
    return clients


async def echoed_back(sock: socket.socket) -> bytes:
    """Everything the proxy sends this client until it closes (a reset raises)."""
    loop = asyncio.get_running_loop()
    data = b""
    with sock:
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
            data += chunk
    return data


async def test_clients_in_the_backlog_when_the_drain_begins_are_served_not_reset() -> None:
    """Clients that connected before the drain but that the loop had not accepted yet (under load the
    backlog holds some): the kernel resets every connection still queued when a listening socket
    closes, so the drain accepts them before it closes it, and each gets its bytes back."""
    async with upstreams(1) as [server], running(make_config([server.address], drain_timeout=5.0)) as (proxy, log):
        clients = queued_clients(proxy.port(), 8)
        drain = asyncio.create_task(proxy.drain(delay=0))  # its first step runs before the accept callback
        assert await asyncio.gather(*map(echoed_back, clients)) == [b"client %d" % i for i in range(8)]
        await asyncio.wait_for(drain, 5)
    assert [s.end_cause for s in log.sessions] == ["eof"] * 8


async def test_clients_accepted_just_before_the_drain_are_served_not_closed() -> None:
    """Clients accepted on the loop iteration the drain begins, their transports' ``connection_made``
    still queued behind the drain's first step (a signal or a takeover's READY lands there): they are
    connected clients, not handshakes, so the drain lets them become sessions and waits for them
    instead of closing them (a reset: their bytes are unread). The accept callback is called by hand
    to put it in that place on the loop's queue."""
    async with upstreams(1) as [server], running(make_config([server.address], drain_timeout=5.0)) as (proxy, log):
        clients = queued_clients(proxy.port(), 8)
        listener = proxy.frontends[0].listener
        asyncio.get_running_loop().call_soon(listener._accept, listener.sockets[0])
        drain = asyncio.create_task(proxy.drain(delay=0))
        assert await asyncio.gather(*map(echoed_back, clients)) == [b"client %d" % i for i in range(8)]
        await asyncio.wait_for(drain, 5)
    assert [s.end_cause for s in log.sessions] == ["eof"] * 8


async def test_sigterm_lets_a_session_in_flight_finish_and_exits_zero() -> None:
    """The command drains on SIGTERM: a reply that comes 0.3 s later still reaches the client in full."""
    reply = b"r" * 300_000

    async def slow_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        await asyncio.sleep(0.3)  # the behaviour under test: a reply still on its way at SIGTERM
        writer.write(reply)
        await writer.drain()

    async with Upstream(slow_answer) as server, Command(
        "--upstream", str(server.address), "--access-log", "-", "--no-health-checks", "--drain-timeout", "5s"
    ) as proxy:
        port = proxy.port
        reader, writer = await connect(port)
        writer.write(b"question")
        writer.write_eof()
        await eventually(lambda: server.active == 1)
        proxy.signal(signal.SIGTERM)
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert await proxy.exited() == 0
    out, err = proxy.stdout, proxy.stderr
    assert data == reply
    assert "end=eof" in out and f"out={len(reply)}" in out, out
    assert "SIGTERM received" in err and "Traceback" not in err, err
    assert await refused(port)
