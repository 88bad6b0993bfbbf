"""``Proxy``: the engine the CLI runs and programs embed, built from one ``Config``.

    async with Proxy(config) as proxy:      # binds, starts health checks
        port = proxy.port()                 # the bound port (useful with port 0)
        await proxy.serve_until_stopped()   # or anything else; leaving the block drains

It owns the run-time objects (pools, probers, listeners), the set of live sessions, the sweeper that
enforces idle and half-closed timeouts with one timer for all sessions, the access log, and the
graceful drain: stop accepting, wait for sessions up to ``drain_timeout``, then abort the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Hashable
from typing import Any

from . import splice
from .accesslog import AccessLog
from .config import Config, ListenerConfig, UpstreamTLSConfig
from .counters import ListenerCounters
from .deadlines import Deadlines
from .dialer import Dial
from .drive import Drive
from .errors import ConfigError
from .listener import AcceptedFD, Listener
from .pool import Pool
from .prober import Prober
from .ratelog import Warnings
from .relay import Session
from .tls import client_context, server_context

log = logging.getLogger("l4proxy")

TLS_FAILED = "TLS handshake failures"  # rate-limited kinds of warnings (ratelog.py)
ACCEPT_FAILED = "failed accepts"


class Proxy:
    """Listeners, pools and sessions for one Config."""

    deadlines: Deadlines  # connect deadlines of the dials in flight; made by start(), on the running loop

    def __init__(self, config: Config, access_log: AccessLog | None = None) -> None:
        self.config = config
        self.access_log = access_log or AccessLog.from_target(config.access_log)
        self.pools = {p.name: Pool(p, _client_tls(p.tls)) for p in config.pools}
        self.server_tls = {i: server_context(c.tls) for i, c in enumerate(config.listeners) if c.tls is not None}
        self.probers = [Prober(pool) for pool in self.pools.values()]
        self.listeners: list[Listener] = []
        self.sessions: set[Session] = set()
        self.served = 0
        self.tls_failures = 0  # client TLS handshakes that failed or timed out
        self.counters = [ListenerCounters() for _ in config.listeners]  # by listener index, for metrics
        self.started_at = time.time()
        self.draining = False  # set when a drain starts (readiness turns 503 at once)
        self.warnings = Warnings(time.monotonic)  # lines any client can trigger, rate-limited per kind
        self._sweeper: asyncio.Task[None] | None = None
        # clients whose transport is not made yet (a TLS handshake, or one loop iteration)
        self._opening: dict[Session, Drive | Coroutine[Any, Any, Any]] = {}
        self._idle = asyncio.Event()
        self._stopped: asyncio.Event | None = None

    # lifecycle

    async def start(self) -> None:
        self._stopped = asyncio.Event()
        self.deadlines = Deadlines(asyncio.get_running_loop(), _expire_dial)
        try:
            for index, listener_config in enumerate(self.config.listeners):
                listener = Listener(
                    listener_config,
                    self._server_for(index, listener_config),
                    per_session=_descriptors_per_session(listener_config, self.pools[listener_config.pool]),
                )
                listener.start()
                self.listeners.append(listener)
        except BaseException:
            self._close_listeners()
            raise
        for prober in self.probers:
            prober.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="l4proxy sweeper")
        for listener in self.listeners:
            log.info("listening on %s", ", ".join(_fmt(a) for a in listener.addresses))

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain()

    def port(self, index: int = 0) -> int:
        """The port listener ``index`` is bound to."""
        return self.listeners[index].addresses[0][1]

    def stop(self) -> None:
        """Ask ``serve_until_stopped`` to return (signal handlers call this); the drain begins."""
        self.draining = True
        if self._stopped is not None:
            self._stopped.set()

    async def serve_until_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, let sessions finish for up to ``timeout``, then abort what is left."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        self.draining = True
        self._close_listeners()
        await self._cancel_opening()
        if self.sessions:
            count = len(self.sessions)
            log.info("draining %d session%s for up to %.1fs", count, "" if count == 1 else "s", timeout)
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        self.abort_all("shutdown")
        splice.close_pool()  # the idle pipes; aborted sessions have returned theirs
        await self._stop_background()
        await asyncio.sleep(0)  # let aborted transports deliver connection_lost
        self.access_log.close()

    async def _cancel_opening(self) -> None:
        """Close clients whose transport is not made yet (still in their TLS handshake, or accepted on
        this loop iteration): they are not sessions yet, and must not become sessions (dial, relay, log)
        after the drain has returned."""
        opening = list(self._opening.values())
        self._opening.clear()
        for drive in opening:
            if isinstance(drive, Drive):
                drive.cancel()
            else:  # a plain client's connect_accepted_socket on uvloop: closing it closes the transport
                drive.close()
        if opening:
            await asyncio.sleep(0)  # the cancelled handshakes close their transports on this iteration

    def abort_all(self, cause: str) -> None:
        """Close every session now (drain deadline reached, or a second signal)."""
        if self.sessions:
            log.info("closing %d sessions: %s", len(self.sessions), cause)
        for session in list(self.sessions):
            session.abort(cause)

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            if listener.sockets:
                listener.close()

    async def _stop_background(self) -> None:
        for prober in self.probers:
            await prober.stop()
        for pool in self.pools.values():
            pool.close()
        self.deadlines.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    # sessions

    def _server_for(self, index: int, config: ListenerConfig) -> Callable[[socket.socket | AcceptedFD, object], None]:
        """The per-client callback of listener ``index``.

        No Task per client: the loop's ``connect_accepted_socket`` runs under a ``Drive`` (see
        ``drive.py``), the client pump's ``connection_made`` (after the TLS handshake, if any) starts
        the dial, and the dial is a chain of callbacks too. A plain client on uvloop does not even need
        the Drive: the coroutine is started, which makes the transport, and finished when the session
        is freed; its only other outcome, the handshake, does not exist without TLS."""
        loop = asyncio.get_running_loop()
        pool = self.pools[config.pool]
        sessions = self.sessions
        opening = self._opening
        tls = config.tls is not None
        handshake_timeout = config.tls.handshake_timeout if config.tls is not None else None
        warnings = self.warnings
        counters = self.counters[index]

        def on_client_ready(session: Session) -> None:
            opening.pop(session, None)  # a session now: drain waits for it instead of cancelling it
            sessions.add(session)
            counters.sessions += 1
            counters.active += 1
            dial = session.dial = Dial(session, pool, loop, self.deadlines, warnings)
            dial.start()

        def on_end(session: Session) -> None:
            sessions.discard(session)
            self.served += 1
            counters.active -= 1
            counters.ended += 1
            counters.bytes_in += session.client.nbytes
            upstream = session.upstream
            if upstream is not None:
                counters.bytes_out += upstream.nbytes
            if session.member is not None:
                pool.balancer.release(session.member)
            self.access_log.record(session)
            if not sessions:
                self._idle.set()

        def serve(sock: socket.socket | AcceptedFD, address: object) -> None:
            session = Session(config, on_client_ready, on_end)
            session.client_address = address

            client: socket.socket = sock  # type: ignore[assignment]  # uvloop takes an AcceptedFD as it is
            factory = itertools.repeat(session.client).__next__  # a C callable: no Python frame runs
            if not tls and isinstance(sock, AcceptedFD):
                # uvloop, plain: the coroutine only waits for connection_made, which our pump sees
                # anyway. Started here, it is finished when the session is freed (Session.opener).
                opener = loop.connect_accepted_socket(factory, client)
                try:
                    opener.send(None)  # the transport exists once this returns
                except Exception as exc:
                    _close_unowned(sock)
                    warnings.warn(log, ACCEPT_FAILED, "accepting %s failed: %s", session.client_addr, exc)
                    return
                session.opener = opener
                opening[session] = opener
                return

            def opened(exc: BaseException | None) -> None:
                opening.pop(session, None)
                if exc is None:
                    return
                sock.close()  # a no-op once a transport has taken the socket (or the descriptor)
                session.discard()
                if tls:
                    self.tls_failures += 1
                    cause = _tls_failure(exc)
                    counters.tls_failed(cause)
                    warnings.warn(log, TLS_FAILED, "TLS handshake with %s failed: %s", session.client_addr, cause)
                else:
                    warnings.warn(log, ACCEPT_FAILED, "accepting %s failed: %s", session.client_addr, exc)

            if tls:
                coro = loop.connect_accepted_socket(
                    factory,
                    client,
                    ssl=self.server_tls[index],
                    ssl_handshake_timeout=handshake_timeout,
                )
            else:
                coro = loop.connect_accepted_socket(factory, client)
            drive = Drive(coro, opened)
            if drive.coro is not None:
                if session.client.transport is None:
                    opening[session] = drive  # until connection_made; drain closes what is left
            elif isinstance(sock, AcceptedFD) and session.client.transport is None:
                _close_unowned(sock)

        return serve

    @property
    def uses_tls(self) -> bool:
        """Whether any listener or pool has TLS files that ``reload_tls`` would re-read."""
        return bool(self.server_tls) or any(pool.config.tls is not None for pool in self.pools.values())

    def reload_tls(self) -> list[ConfigError]:
        """Re-read certificates, keys and CAs (SIGHUP). A broken file keeps the old context; returns
        the problems, one line each. Established sessions are not touched."""
        problems: list[ConfigError] = []
        for index, listener_config in enumerate(self.config.listeners):
            if listener_config.tls is not None:
                try:
                    self.server_tls[index] = server_context(listener_config.tls)
                except ConfigError as exc:
                    problems.append(exc.under(f"listeners[{index}].tls"))
        for pool in self.pools.values():
            if pool.config.tls is not None:
                try:
                    pool.ssl_context = client_context(pool.config.tls)
                except ConfigError as exc:
                    problems.append(exc.under(f"pools.{pool.config.name}.tls"))
        return problems

    async def _sweep(self) -> None:
        """One timer for all sessions: close those idle past their timeout."""
        shortest = min(min(c.idle_timeout, c.half_closed_timeout) for c in self.config.listeners)
        tick = max(0.02, min(1.0, shortest / 4))
        access_log = self.access_log
        warnings = self.warnings
        listeners = self.listeners
        while True:
            await asyncio.sleep(tick)
            access_log.flush()
            warnings.flush()
            for listener in listeners:
                listener.check_limit()
            now = time.monotonic()
            for session in list(self.sessions):
                moved = session.moved()
                if moved != session.seen:
                    session.seen = moved
                    session.last_active = now
                    continue
                limits = session.limits
                half = session.half_closed
                if now - session.last_active >= (limits.half_closed_timeout if half else limits.idle_timeout):
                    session.abort("half_closed_timeout" if half else "idle_timeout")


def _close_unowned(fd: AcceptedFD) -> None:
    """Close a client descriptor that no transport took (the loop failed before it could)."""
    with contextlib.suppress(OSError):
        os.close(fd)


def _descriptors_per_session(config: ListenerConfig, pool: Pool) -> int:
    """What one session of this listener holds: its two sockets, and the splice engine's descriptors
    when every session moves there at once (``--relay splice``, plain TCP on both sides)."""
    spliced = config.relay == "splice" and config.tls is None and pool.config.tls is None and splice.AVAILABLE
    return 2 + (splice.DESCRIPTORS if spliced else 0)


def _expire_dial(dial: Hashable) -> None:
    assert isinstance(dial, Dial)
    dial.expired()


def _client_tls(tls_config: UpstreamTLSConfig | None) -> ssl.SSLContext | None:
    return None if tls_config is None else client_context(tls_config)


def _tls_failure(exc: BaseException) -> str:
    """Why a client's handshake failed, in words: the loops report a client that leaves mid-handshake
    as a bare ``ConnectionResetError`` (no message), whether it reset or just closed, and their own
    handshake timeout as ``ConnectionAbortedError``."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | ConnectionAbortedError):
        return "handshake timeout"  # both loops abort a handshake past its timeout with ConnectionAbortedError
    if isinstance(exc, ConnectionError):
        if exc.errno == errno.ECONNRESET:
            return "the client reset the connection during the handshake"
        return "the client closed the connection during the handshake"
    return str(exc) or type(exc).__name__


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
