"""Test kit: real loopback servers with scripted behaviour, a Proxy factory, and small client helpers.

Everything binds port 0 on loopback and is closed by the async context managers, so tests never leak
servers into each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trustme

from l4proxy import Address, Config, HealthConfig, ListenerConfig, PoolConfig, Proxy
from l4proxy.accesslog import AccessLog
from l4proxy.config import ServerTLSConfig

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


async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An overloaded server: accept, then close with SO_LINGER 0, which sends RST before any byte."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def resets_every_other() -> Handler:
    """A flaky server: resets its 1st, 3rd, 5th... connection at once (``reset_at_once``), echoes the others."""
    turns = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal turns
        turns += 1
        await (reset_at_once if turns % 2 else echo)(reader, writer)

    return handle


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
    pool_keys = {"retries", "connect_timeout", "upstream_tls", "on_member_down", "retry_budget", "panic_threshold",
                 "eject_after", "eject_time", "max_eject_time", "max_ejected_percent"}
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

    def __init__(self, fmt: str = "logfmt") -> None:
        super().__init__(io.StringIO(), fmt=fmt)
        self.sessions: list[Any] = []
        self.changed = asyncio.Event()

    def record(self, session: Any, now: float) -> None:
        super().record(session, now)
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
async def running(config: Config, fmt: str = "logfmt") -> AsyncIterator[tuple[Proxy, RecordingLog]]:
    """A started Proxy with an in-memory access log (``fmt`` lines); drained on exit."""
    access = RecordingLog(fmt)
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


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until EOF; a reset counts as the end too (an aborted session may send RST)."""
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            data += chunk
    return bytes(data)


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


def edge_config(members: list[Address], listen: Address | None = None, **settings: Any) -> Config:
    """``make_config`` with the edge's settings placed: ``send_proxy`` on the pool, the rest on the listener."""
    pool_settings = {k: settings.pop(k) for k in ("send_proxy",) if k in settings}
    listener_keys = {"accept_proxy", "accept_proxy_from", "proxy_timeout", "allow", "deny"}
    listener_keys |= {"max_connections_per_ip", "rate_per_ip", "tls"}
    listener_settings = {k: settings.pop(k) for k in list(settings) if k in listener_keys}
    config = make_config(members, listen, **settings)
    listener = replace(config.listeners[0], **listener_settings)
    return replace(config, listeners=(listener,), pools=(replace(config.pools[0], **pool_settings),))


async def dial_from(
    source: str, port: int, host: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connected from ``source`` (a loopback address of its own)."""
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def exchange(port: int, data: bytes, source: str = "127.0.0.1", host: str = "127.0.0.1") -> tuple[bytes, int]:
    """Send ``data``, half-close, read to the end; the reply and the client's own port."""
    reader, writer = await dial_from(source, port, host)
    own_port = writer.get_extra_info("sockname")[1]
    try:
        writer.write(data)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5), own_port
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


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


# --- TLS: certificates from trustme, a TLS upstream, a ClientHello ----------------------------------


@dataclass
class PKI:
    """Certificate files under one directory; ``ca``/``other_ca`` are kept for building contexts."""

    dir: Path
    ca: trustme.CA
    other_ca: trustme.CA
    paths: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        return self.paths[name]

    def write(self, name: str, data: bytes) -> None:
        path = self.dir / name
        path.write_bytes(data)
        self.paths[name] = str(path)

    def server_tls(self, **overrides: object) -> ServerTLSConfig:
        values: dict[str, object] = {"cert": self["server.pem"], "key": self["server.key"], **overrides}
        return ServerTLSConfig(**values)  # type: ignore[arg-type]

    def client_ctx(self, cert: str | None = None, ca: str = "ca.pem", alpn: list[str] | None = None) -> ssl.SSLContext:
        """A client context trusting ``ca``, presenting ``cert`` (``NAME.pem``/``NAME.key``) if given."""
        ctx = ssl.create_default_context(cafile=self[ca])
        if cert is not None:
            ctx.load_cert_chain(self[f"{cert}.pem"], self[f"{cert}.key"])
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def upstream_server_ctx(self, cert: str = "server", client_ca: str | None = None) -> ssl.SSLContext:
        """A context for a TLS upstream serving ``cert``; with ``client_ca`` it requires client certs."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self[f"{cert}.pem"], self[f"{cert}.key"])
        if client_ca is not None:
            ctx.load_verify_locations(self[client_ca])
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def make_pki(directory: Path) -> PKI:
    """``ca`` signs ``server`` (localhost, 127.0.0.1, ::1), ``client`` (CN good-client) and ``db_only``
    (only the name db.internal); ``other_ca`` signs ``other_server`` and ``other_client``."""
    ca, other_ca = trustme.CA(), trustme.CA()
    p = PKI(directory, ca, other_ca)
    leaves = {
        "server": ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="localhost"),
        "client": ca.issue_cert("good-client", common_name="good-client"),
        "db_only": ca.issue_cert("db.internal", common_name="db.internal"),
        "other_server": other_ca.issue_cert("localhost", "127.0.0.1", "::1"),
        "other_client": other_ca.issue_cert("intruder", common_name="intruder"),
    }
    p.write("ca.pem", ca.cert_pem.bytes())
    p.write("other_ca.pem", other_ca.cert_pem.bytes())
    for name, leaf in leaves.items():
        p.write(f"{name}.pem", b"".join(c.bytes() for c in leaf.cert_chain_pems))
        p.write(f"{name}.key", leaf.private_key_pem.bytes())
    return p


class TLSUpstream(Upstream):
    """A kit Upstream that speaks TLS; records what each handshake negotiated."""

    def __init__(self, ctx: ssl.SSLContext, handler: Handler = echo, host: str = "127.0.0.1") -> None:
        super().__init__(handler, host)
        self.ctx = ctx
        self.sni: list[str | None] = []
        self.alpn: list[str | None] = []
        self.peer_cn: list[str | None] = []
        ctx.sni_callback = lambda _obj, name, _ctx: self.sni.append(name)  # type: ignore[assignment,func-returns-value]

    async def start(self, port: int = 0) -> TLSUpstream:
        self.server = await asyncio.start_server(self._record_then_serve, self.host, port, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _record_then_serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        self.alpn.append(ssl_object.selected_alpn_protocol())
        subject = dict(rdn[0] for rdn in (ssl_object.getpeercert() or {}).get("subject", ()))
        self.peer_cn.append(subject.get("commonName"))
        await self._serve(reader, writer)


@contextlib.asynccontextmanager
async def tls_upstream(ctx: ssl.SSLContext, handler: Handler = echo, host: str = "127.0.0.1") -> AsyncIterator[
    TLSUpstream
]:
    server = await TLSUpstream(ctx, handler, host).start()
    try:
        yield server
    finally:
        await server.stop()


async def open_tls(
    port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1", server_hostname: str = "localhost"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_hostname), 5.0
    )


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5.0)


def client_hello() -> bytes:
    """The bytes of a real ClientHello, produced by an in-memory SSLObject (no socket)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def sni_client_hello(name: str | None, version: ssl.TLSVersion | None = None, alpn: tuple[str, ...] = ()) -> bytes:
    """The first flight of a real TLS client: one record holding its ClientHello."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def until_refused(port: int, timeout: float = 10.0) -> None:
    """Wait until the listener is gone: a connect is refused (each one accepted before is closed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _reader, writer = await asyncio.wait_for(connect(port), 2)
        except ConnectionRefusedError:
            return
        writer.close()
        assert asyncio.get_running_loop().time() < deadline, "still accepting"
        await asyncio.sleep(0.02)


async def closed_at(reader: asyncio.StreamReader) -> float:
    """When the proxy closes this client (an aborted session may end in a reset)."""
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 15) == b""
    return asyncio.get_running_loop().time()
