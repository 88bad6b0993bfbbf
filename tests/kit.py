"""Test kit: real loopback servers with scripted behaviour, a Proxy factory, and small client helpers.

Everything binds port 0 on loopback and is closed by the async context managers, so tests never leak
servers into each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from l4proxy import Address, Config, HealthConfig, ListenerConfig, PoolConfig, Proxy
from l4proxy.accesslog import AccessLog

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ENGINES = ("transport", "splice")  # the relay engines data-path tests run on (make_config(relay=...))


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every byte until EOF, then half-close back."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    await _drain_and_close(writer)


async def _drain_and_close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class Upstream:
    """A TCP server on loopback running ``handler`` per connection and counting connections."""

    def __init__(self, handler: Handler = echo, host: str = "127.0.0.1", name: str = "") -> None:
        self.handler = handler
        self.host = host
        self.name = name
        self.accepted = 0
        self.active = 0
        self.peak = 0  # the most connections open at once
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    async def start(self, port: int = 0) -> Upstream:
        self.server = await asyncio.start_server(self._serve, self.host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the peer went away mid-script (ENOTCONN on shutdown, resets): not the test's concern
        except asyncio.CancelledError:
            # stop() cut this connection. End the task normally: on Python 3.11, start_server's done
            # callback calls task.exception() on a cancelled handler, which the loop logs as an error.
            if not self.stopping:
                raise
        finally:
            self.active -= 1
            self.tasks.discard(task)
            writer.close()

    async def stop(self) -> None:
        """Stop listening and cut every open connection (a crashed server, as clients see it)."""
        if self.server is not None:
            self.stopping = True
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2)
            self.server = None
            self.stopping = False

    async def __aenter__(self) -> Upstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@contextlib.asynccontextmanager
async def upstreams(count: int, handler: Handler = echo, host: str = "127.0.0.1") -> AsyncIterator[list[Upstream]]:
    servers = [await Upstream(handler, host, name=f"u{i}").start() for i in range(count)]
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


def refused_address(host: str = "127.0.0.1") -> Address:
    """An address nothing listens on (bound then closed, so connects are refused)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return Address(host, sock.getsockname()[1])


@contextlib.contextmanager
def blackhole(host: str = "127.0.0.1") -> Any:
    """An address whose SYNs go unanswered: a listener with a full accept queue, never accepting."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue; later SYNs are dropped by the kernel
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(listener.getsockname())
            fillers.append(s)
        yield Address(host, listener.getsockname()[1])
    finally:
        for s in fillers:
            s.close()
        listener.close()


def make_config(
    members: Sequence[Address],
    listen: Address | None = None,
    *,
    health: HealthConfig | None = None,
    **settings: Any,
) -> Config:
    """A one-listener Config; ``settings`` go to the ListenerConfig, PoolConfig or Config by name."""
    listen = listen or Address("127.0.0.1", 0)
    listener_keys = {"idle_timeout", "half_closed_timeout", "buffer_size", "tls", "relay", "max_connections",
                     "tcp_keepalive", "max_session_duration"}
    pool_keys = {"retries", "connect_timeout", "upstream_tls", "on_member_down", "retry_budget", "panic_threshold"}
    listener = ListenerConfig(listen, **{k: v for k, v in settings.items() if k in listener_keys})
    pool_settings = {k: v for k, v in settings.items() if k in pool_keys}
    if "upstream_tls" in pool_settings:
        pool_settings["tls"] = pool_settings.pop("upstream_tls")
    pool = PoolConfig(
        members=tuple(members),
        health=health or HealthConfig(enabled=False),
        **pool_settings,
    )
    rest = {k: v for k, v in settings.items() if k not in listener_keys | pool_keys}
    return Config(listeners=(listener,), pools=(pool,), **{"drain_timeout": 2.0, "access_log": "off", **rest})


class RecordingLog(AccessLog):
    """An access log kept in memory, with the Session objects for exact assertions."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.sessions: list[Any] = []
        self.changed = asyncio.Event()

    def record(self, session: Any) -> None:
        super().record(session)
        self.sessions.append(session)
        self.changed.set()

    @property
    def lines(self) -> list[str]:
        assert isinstance(self.stream, io.StringIO)
        return self.stream.getvalue().splitlines()

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async def until() -> None:
            while len(self.sessions) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)

    def close(self) -> None:
        """Keep the text readable after the proxy stops."""


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[Proxy, RecordingLog]]:
    """A started Proxy with an in-memory access log; drained on exit."""
    access = RecordingLog()
    proxy = Proxy(config, access)
    await proxy.start()
    try:
        yield proxy, access
    finally:
        await proxy.drain()


async def connect(port: int, host: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


async def roundtrip(port: int, payload: bytes, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """Send ``payload``, half-close, and read everything until the proxy closes."""
    reader, writer = await connect(port, host)
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def open_session(
    proxy: Proxy, payload: bytes = b"open"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
    """A client of an echo member with its session established (one echo), and the member serving it;
    the proxy must have no other session."""
    reader, writer = await connect(proxy.port())
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    [session] = proxy.sessions
    assert session.member is not None
    return reader, writer, session.member


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Wait until ``predicate()`` holds; fail with a clear message when it never does."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def with_members(config: Config, members: Sequence[Address]) -> Config:
    pool = replace(config.pools[0], members=tuple(members))
    return replace(config, pools=(pool,))


class SlowAccept:
    """A fault: an upstream that is slow to accept. Until ``open()`` its accept queue is full, so the
    kernel drops the SYNs of connects to it and they complete only on a retransmission, a second or
    more later: a wide, deterministic window for a client to leave while its upstream connect is in
    progress. Once open, it reads every connection to EOF and keeps the bytes (``received``)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(0)
        self.fillers: list[socket.socket] = []
        for _ in range(4):  # fill the queue: later SYNs are dropped (as in ``blackhole``)
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(self.listener.getsockname())
            self.fillers.append(filler)
        self.address = Address(host, self.listener.getsockname()[1])
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def open(self) -> None:
        """Start accepting (with a long queue): the retransmitted SYNs now complete."""
        for filler in self.fillers:
            filler.close()
        self.server = await asyncio.start_server(self._read_all, sock=self.listener, backlog=1024)

    async def _read_all(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            self.received.append(await reader.read())
        writer.close()

    async def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        if self.server is not None:
            self.server.close()
        self.listener.close()
