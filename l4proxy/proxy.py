"""``Proxy``: the engine the CLI runs and programs embed, built from one ``Config``.

    async with Proxy(config) as proxy:      # binds, starts health checks
        port = proxy.port()                 # the bound port (useful with port 0)
        await proxy.serve_until_stopped()   # or anything else; leaving the block drains

A thin owner that builds and wires the parts: a ``Pool`` (and its ``Prober``, and a ``Resolver`` when
the pool has DNS-named members) per pool, a ``Frontend``
per listener (``frontend.py``: its sockets, TLS context and how clients become sessions), one
``SessionTable`` (``sessions.py``: live sessions, the sweeper, drain, abort), the access log, the
splice engine's pipes (``splice.Splicing``), the connect deadlines and the set of our own outgoing
addresses that catches a member leading back here (``dialer.py``, Loops). ``drain`` stops accepting,
waits for sessions up to ``drain_timeout``, then aborts the rest.

``shared`` is the seam for a worker of ``--workers N`` (``workers.py``): health is decided in the
supervisor, so the proxy runs no probers and hands its pools to ``shared.join`` when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence
from typing import Protocol

from .accesslog import AccessLog
from .balancer import Member
from .config import Config, UpstreamTLSConfig
from .deadlines import Deadlines
from .dialer import Outgoing
from .errors import ConfigError
from .frontend import Frontend, expire_dial
from .listener import Listener
from .pool import Pool
from .prober import Prober
from .ratelog import Warnings
from .relay import Session
from .resolver import Resolver
from .sessions import SessionTable
from .splice import Splicing
from .tls import client_context, server_context

log = logging.getLogger("l4proxy")


class Shared(Protocol):
    """Health and member lists kept by another process (the supervisor of ``--workers N``)."""

    def join(self, pools: Sequence[Pool]) -> None:
        """Plug ``pools`` in (called by ``Proxy.start`` on the running loop, before accepting)."""
        ...


class Proxy:
    """Listeners, pools and sessions for one Config."""

    deadlines: Deadlines  # connect deadlines of the dials in flight; made by start(), on the running loop

    def __init__(self, config: Config, access_log: AccessLog | None = None, *, shared: Shared | None = None) -> None:
        self.config = config
        self.shared = shared
        self.access_log = access_log or AccessLog.from_target(config.access_log)
        self.pools = {p.name: Pool(p, _client_tls(p.tls)) for p in config.pools}
        self.outgoing = Outgoing()  # local addresses of our own connections: a member leading back here
        addresses = self.outgoing.addresses
        self.probers = [] if shared is not None else [Prober(p, outgoing=addresses) for p in self.pools.values()]
        self.resolvers = [] if shared is not None else [  # a worker: the supervisor resolves
            Resolver(pool) for pool in self.pools.values() if Resolver.wanted(pool.config)
        ]
        self.table = SessionTable()
        for pool in self.pools.values():
            if pool.config.on_member_down == "close":
                pool.on_down = self._close_member
        self.warnings = Warnings(time.monotonic)  # lines any client can trigger, rate-limited per kind
        self.splicing = Splicing()
        self.frontends = [
            Frontend(i, c, self.pools[c.pool], self.table, self.access_log, self.warnings, self.splicing, self.outgoing)
            for i, c in enumerate(config.listeners)
        ]
        self._stopped: asyncio.Event | None = None

    def _close_member(self, pool: Pool, member: Member) -> None:
        self.table.close_member(pool.name, member, member.name)

    @property
    def sessions(self) -> set[Session]:
        """The live sessions."""
        return self.table.live

    @property
    def served(self) -> int:
        """Sessions ended so far."""
        return self.table.served

    @property
    def tls_failures(self) -> int:
        """Client TLS handshakes that failed or timed out, on every listener."""
        return sum(frontend.tls_failures for frontend in self.frontends)

    @property
    def listeners(self) -> list[Listener]:
        return [frontend.listener for frontend in self.frontends]

    @property
    def server_tls(self) -> dict[int, ssl.SSLContext]:
        """The TLS context of each listener that terminates TLS, by index."""
        return {f.index: f.tls_context for f in self.frontends if f.tls_context is not None}

    # lifecycle

    async def start(self) -> None:
        self._stopped = asyncio.Event()
        self.deadlines = Deadlines(asyncio.get_running_loop(), expire_dial)
        await asyncio.gather(*(resolver.resolve() for resolver in self.resolvers))  # DNS names: addresses first
        if self.shared is not None:
            self.shared.join(list(self.pools.values()))
        try:
            for frontend in self.frontends:
                frontend.start(self.deadlines)
                self.outgoing.ports.update(port for _, port in frontend.listener.addresses)
        except BaseException:
            self._close_listeners()
            raise
        for prober in self.probers:
            prober.start()
        for resolver in self.resolvers:
            resolver.start()
        shortest = min(min(c.idle_timeout, c.half_closed_timeout) for c in self.config.listeners)
        durations = [c.max_session_duration for c in self.config.listeners if c.max_session_duration]
        if durations:  # a quiet moment is one tick without bytes: tick at a twentieth of the duration
            self.table.durations = True
            shortest = min(shortest, min(durations) / 5)
        chores = [self.access_log.flush, self.warnings.flush, *(f.listener.check_limit for f in self.frontends)]
        self.table.start(max(0.02, min(1.0, shortest / 4)), chores)
        for frontend in self.frontends:
            log.info("listening on %s", frontend.describe())

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain()

    def port(self, index: int = 0) -> int:
        """The port listener ``index`` is bound to."""
        return self.frontends[index].listener.addresses[0][1]

    def stop(self) -> None:
        """Ask ``serve_until_stopped`` to return (signal handlers call this)."""
        if self._stopped is not None:
            self._stopped.set()

    async def serve_until_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, let sessions finish for up to ``timeout``, then abort what is left."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        self._close_listeners()
        await self.table.drain(timeout)
        self.splicing.close()  # the idle pipes; aborted sessions have returned theirs
        await self._stop_background()
        await asyncio.sleep(0)  # let aborted transports deliver connection_lost
        self.access_log.close()

    def abort_all(self, cause: str) -> None:
        """Close every session now (drain deadline reached, or a second signal)."""
        self.table.abort_all(cause)

    def _close_listeners(self) -> None:
        for frontend in self.frontends:
            frontend.close()

    async def _stop_background(self) -> None:
        for resolver in self.resolvers:
            await resolver.stop()
        for prober in self.probers:
            await prober.stop()
        for pool in self.pools.values():
            pool.close()
        if hasattr(self, "deadlines"):
            self.deadlines.close()
        await self.table.stop()

    @property
    def uses_tls(self) -> bool:
        """Whether any listener or pool has TLS files that ``reload_tls`` would re-read."""
        return bool(self.server_tls) or any(pool.config.tls is not None for pool in self.pools.values())

    def reload_tls(self) -> list[ConfigError]:
        """Re-read certificates, keys and CAs (SIGHUP). A broken file keeps the old context; returns
        the problems, one line each. Established sessions are not touched."""
        problems: list[ConfigError] = []
        for frontend in self.frontends:
            if frontend.config.tls is not None:
                try:
                    frontend.tls_context = server_context(frontend.config.tls)
                except ConfigError as exc:
                    problems.append(exc.under(f"listeners[{frontend.index}].tls"))
        for pool in self.pools.values():
            if pool.config.tls is not None:
                try:
                    pool.ssl_context = client_context(pool.config.tls)
                except ConfigError as exc:
                    problems.append(exc.under(f"pools.{pool.config.name}.tls"))
        return problems


def _client_tls(tls_config: UpstreamTLSConfig | None) -> ssl.SSLContext | None:
    return None if tls_config is None else client_context(tls_config)
