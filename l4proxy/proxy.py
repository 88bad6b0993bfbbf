"""``Proxy``: the engine the CLI runs and programs embed, built from one ``Config``.

    async with Proxy(config) as proxy:      # binds, starts health checks
        port = proxy.port()                 # the bound port (useful with port 0)
        await proxy.serve_until_stopped()   # or anything else; leaving the block drains

A thin owner that builds and wires the parts: a ``Pool`` (and its ``Prober``, and a ``Resolver`` when
the pool has DNS-named members) per pool, a ``Frontend``
per listener (``frontend.py``: its sockets, TLS context and how clients become sessions), one
``SessionTable`` (``sessions.py``: live sessions, the sweeper, drain, abort), the access log, the
splice engine's pipes (``splice.Splicing``), the connect deadlines and the set of our own outgoing
addresses that catches a member leading back here (``dialer.py``, Loops). ``drain`` sets ``draining``
(what readiness reads), keeps accepting for ``shutdown_delay``, stops accepting, waits for sessions up
to ``drain_timeout``, then closes the rest, spread over the last second.

``shared`` is the seam for a worker of ``--workers N`` (``workers.py``): health is decided in the
supervisor, so the proxy runs no probers and hands its pools to ``shared.join`` when it starts.

**Reload.** ``reconfigure(new)`` computes ``reload.plan(self.config, new)`` and ``apply`` carries it
out, with nothing awaited between taking a socket from one Frontend and giving it to the next, so no
client is refused: pools are added or changed in place first (``Pool.retune``: members that stay keep
their health and sessions), then new listeners are bound (a failure there changes nothing), kept ones
keep their Frontend or get a new one around the same socket, removed ones stop accepting, and removed
pools stop probing. Sessions of removed listeners and removed members carry on and are closed at
``drain_timeout`` if still open. ``inherited`` sockets (a takeover, ``takeover.py``) are used instead of
binding, by listen address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from .accesslog import AccessLog
from .balancer import Member
from .causes import MEMBER_DOWN
from .config import Config, ListenerConfig, PoolConfig, UpstreamTLSConfig
from .counters import DRAIN
from .deadlines import Deadlines
from .dialer import Outgoing
from .errors import ConfigError
from .frontend import Frontend, expire_dial, owed
from .listener import Listener, bind_sockets
from .pool import Pool
from .prober import Prober
from .ratelog import Warnings
from .relay import Session
from .reload import Plan, plan
from .resolver import Resolver
from .safeclose import watch
from .sessions import SessionTable
from .splice import Splicing
from .syslogsink import open_log
from .tls import Warn, client_context, reload_server_context, warn_under

log = logging.getLogger("l4proxy")


class Shared(Protocol):
    """Health and member lists kept by another process (the supervisor of ``--workers N``)."""

    def join(self, pools: Sequence[Pool]) -> None:
        """Plug ``pools`` in (called by ``Proxy.start`` on the running loop, before accepting, and by
        ``apply`` for pools a reload adds)."""
        ...

    def follow(self, apply: Callable[[Config], None]) -> None:
        """Call ``apply`` with each configuration the supervisor sends (it checked it, once for all), once
        the pools follow the member lists it published before sending it (so a reload's removed members
        are removed, and drain, when ``apply`` runs)."""
        ...

    def publish(self, proxy: Proxy) -> None:
        """Start handing the proxy's counters to the other process (called by ``Proxy.start`` once accepting)."""
        ...


class Proxy:
    """Listeners, pools and sessions for one Config."""

    deadlines: Deadlines  # connect deadlines of the dials in flight; made by start(), on the running loop

    def __init__(
        self,
        config: Config,
        access_log: AccessLog | None = None,
        *,
        shared: Shared | None = None,
        inherited: Mapping[str, list[socket.socket]] | None = None,
    ) -> None:
        self.config = config
        self.shared = shared
        self.access_log = access_log or open_log(config.access_log, config.access_log_format)
        self.timed = False  # sessions and connects are timed for the histograms: someone reads them
        self.pools = {p.name: self._pool(p) for p in config.pools}
        self.outgoing = Outgoing()  # local addresses of our own connections: a member leading back here
        self._probers = {name: self._prober(pool) for name, pool in self.pools.items() if shared is None}
        self._resolvers = {  # a worker has none: the supervisor resolves
            name: Resolver(pool) for name, pool in self.pools.items() if shared is None and Resolver.wanted(pool.config)
        }
        self.table = SessionTable()
        self.warnings = Warnings(time.monotonic)  # lines any client can trigger, rate-limited per kind
        self.splicing = Splicing()
        self.frontends = [self._frontend(i, c) for i, c in enumerate(config.listeners)]
        self.inherited = dict(inherited or {})  # listening sockets handed over, by listen address
        self.reloads = 0  # configurations applied by reconfigure
        self.reloads_failed = 0  # reloads refused (a broken file: the CLI counts them here)
        self.binding: ListenerConfig | None = None  # the listener start() binds (or bound last)
        self._stopped: asyncio.Event | None = None
        self.started_at = time.time()
        self.draining = False  # set when a drain starts: readiness (admin /readyz) turns 503 at once
        self._delay_over = asyncio.Event()  # set by a second signal, or once the shutdown delay has run
        self._drain_timers: set[asyncio.TimerHandle] = set()

    def _pool(self, config: PoolConfig) -> Pool:
        pool = Pool(config, _client_tls(config.tls))
        pool.timed = self.timed
        pool.leaving = self._members_leaving
        pool.on_down = self._close_member  # acts only with --on-member-down close
        return pool

    def _prober(self, pool: Pool) -> Prober:
        return Prober(pool, outgoing=self.outgoing.addresses, ports=self.outgoing.ports)

    def _frontend(self, index: int, config: ListenerConfig) -> Frontend:
        pool = self.pools[config.pool]
        frontend = Frontend(
            index, config, pool, self.table, self.access_log, self.warnings, self.splicing, self.outgoing, self.pools
        )
        if config.relay == "auto" and self._safe_protocol(pool) is not None:
            frontend.spliced = False  # a session on the splice engine could not be closed at a safe moment
        frontend.listener.owed = self._owed
        frontend.counters.timed = self.timed
        return frontend

    def time_sessions(self) -> None:
        """Keep the session-duration and connect histograms from now on (for ``/metrics``): until someone
        reads them (``snapshot.ProxySource``, a worker's ``sharedstats.Publisher`` under ``--admin``),
        sessions skip their clock read and buckets."""
        self.timed = True
        for frontend in self.frontends:
            frontend.counters.timed = True
        for pool in self.pools.values():
            pool.timed = True

    def _owed(self) -> int:
        """What the clients accepted on every listener will still open (``frontend.owed``)."""
        return owed(self.frontends, self.table.opening, self.deadlines)

    @property
    def probers(self) -> list[Prober]:
        """The probers of the pools (none in a worker: the supervisor probes)."""
        return list(self._probers.values())

    @property
    def resolvers(self) -> list[Resolver]:
        """The resolvers of the pools with DNS-named members (none in a worker)."""
        return list(self._resolvers.values())

    def _close_member(self, pool: Pool, member: Member, why: str) -> None:
        """``--on-member-down close``: ``member`` (which ``why``) loses its sessions, over a second; with
        ``--drain-at safe`` each at its first safe moment instead, those left at the drain timeout,
        unless the member is routable again by then."""
        protocol = self._safe_protocol(pool)
        if protocol is None:
            self.table.close_member(pool.name, member, member.name, why=why)
            return
        balancer = pool.balancer

        def leaving(session: Session) -> bool:
            return session.member is member and not balancer.routable(member)

        sessions = [s for s in self.table.live if leaving(s)]
        if not sessions:
            return
        log.warning(
            "pool %s member %s %s: closing its %d sessions at safe moments, within %gs (--on-member-down close)",
            pool.name, member.name, why, len(sessions), self.config.drain_timeout,
        )  # fmt: skip
        for session in sessions:
            watch(session, protocol, leaving)
        self._drain_later(leaving, self.config.drain_timeout, MEMBER_DOWN)

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
        await asyncio.gather(*(r.resolve() for r in self._resolvers.values()))  # DNS names: addresses first
        if self.shared is not None:
            self.shared.join(list(self.pools.values()))
        try:
            for frontend in self.frontends:
                self.binding = frontend.config
                frontend.start(self.deadlines, self.inherited.pop(str(frontend.config.address), None))
                self.outgoing.ports.update(port for _, port in frontend.listener.addresses)
        except BaseException:
            self._close_listeners()
            raise
        finally:
            for sockets in self.inherited.values():  # handed over, but no listener of ours is there
                for sock in sockets:
                    sock.close()
            self.inherited.clear()
        for prober in self._probers.values():
            prober.start()
        for resolver in self._resolvers.values():
            resolver.start()
        shortest = min(min(c.idle_timeout, c.half_closed_timeout) for c in self.config.listeners)
        durations = [c.max_session_duration for c in self.config.listeners if c.max_session_duration]
        self.table.durations = bool(durations)
        if durations:  # a quiet moment is one tick without bytes: tick at a twentieth of the duration
            shortest = min(shortest, min(durations) / 5)
        chores = [self.access_log.flush, self.warnings.flush, self._check_limits]
        self.table.start(max(0.02, min(1.0, shortest / 4)), chores)
        if self.shared is not None:
            self.shared.publish(self)
        for pool in self.pools.values():  # before the listeners: "listening on" stays the last line
            log.info("%s", describe_pool(pool))
        for frontend in self.frontends:
            log.info("listening on %s", frontend.describe())

    def _check_limits(self) -> None:
        for frontend in self.frontends:
            frontend.listener.check_limit()

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain()

    def port(self, index: int = 0) -> int:
        """The port listener ``index`` is bound to."""
        return self.frontends[index].listener.addresses[0][1]

    def stop(self, delayed: bool = True) -> None:
        """Ask ``serve_until_stopped`` to return (signal handlers call this); the drain begins, and
        with it readiness ends. ``delayed=False`` skips the shutdown delay: after a takeover the new
        process accepts on the same sockets, so there is nothing for endpoints to catch up with."""
        self.draining = True
        self.access_log.flush()  # the drain begins: buffered lines are written now
        if not delayed:
            self._delay_over.set()
        if self._stopped is not None:
            self._stopped.set()

    async def serve_until_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    async def drain(self, timeout: float | None = None, delay: float | None = None) -> None:
        """Turn not ready, keep accepting for ``delay`` (``shutdown_delay``: load balancers and Kubernetes
        endpoints take seconds to stop sending clients here), then stop accepting, let sessions finish
        for up to ``timeout``, and close what is left over the drain's last second."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        delay = self.config.shutdown_delay if delay is None else delay
        self.draining = True
        if delay > 0 and not self._delay_over.is_set():  # once: a second drain does not wait again
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._delay_over.wait(), delay)
            self._delay_over.set()
            log.info("shutdown delay over: no longer accepting")
        self.access_log.flush()
        self._close_listeners()
        for session in list(self.table.live):
            pool = self.pools.get(session.limits.pool)
            protocol = self._safe_protocol(pool) if pool is not None else None
            if protocol is not None:
                watch(session, protocol)
        await self.table.drain(timeout)
        self.splicing.close()  # the idle pipes; aborted sessions have returned theirs
        await self._stop_background()
        await asyncio.sleep(0)  # let aborted transports deliver connection_lost
        self.access_log.close()

    def abort_all(self, cause: str) -> None:
        """Close every session now, and end the shutdown delay if it is running (a second signal)."""
        self._delay_over.set()
        self.table.abort_all(cause)

    def _close_listeners(self) -> None:
        for frontend in self.frontends:
            frontend.close()

    async def _stop_background(self) -> None:
        for timer in self._drain_timers:
            timer.cancel()
        self._drain_timers.clear()
        for resolver in self._resolvers.values():
            await resolver.stop()
        for prober in self._probers.values():
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

    def reload_tls(
        self, listeners: Sequence[int] | None = None, pools: Sequence[str] | None = None, warn: Warn | None = None
    ) -> list[ConfigError]:
        """Re-read certificates, keys and CAs (SIGHUP): of every listener and pool, or of those given
        (listener indexes, pool names). A broken file keeps the old context (per certificate, on a
        listener with several); returns the problems, one line each, and passes warnings (a certificate
        about to expire) to ``warn``. Established sessions are not touched."""
        problems: list[ConfigError] = []
        for frontend in self.frontends:
            if listeners is not None and frontend.index not in listeners:
                continue
            if frontend.config.tls is not None and frontend.tls_context is not None:
                where = f"listeners[{frontend.index}].tls"
                frontend.tls_context, failed = reload_server_context(
                    frontend.config.tls, frontend.tls_context, warn_under(warn, where)
                )
                problems.extend(exc.under(where) for exc in failed)
        for pool in self.pools.values():
            if pool.config.tls is not None and (pools is None or pool.name in pools):
                where = f"pools.{pool.config.name}.tls"
                try:
                    pool.ssl_context = client_context(pool.config.tls, warn_under(warn, where))
                except ConfigError as exc:
                    problems.append(exc.under(where))
        return problems

    # reload

    async def reconfigure(self, config: Config, warn: Warn | None = None) -> tuple[Plan, list[ConfigError]]:
        """Run ``config`` from now on (a reload): the plan applied, and the TLS files of the listeners and
        pools that stay read again (their problems returned; the old context stays for those; warnings,
        such as a certificate about to expire, go to ``warn``)."""
        steps = plan(self.config, config)
        await self.apply(steps)
        return steps, self.reload_tls(steps.tls_listeners, steps.tls_pools, warn)

    async def apply(self, steps: Plan) -> None:
        """Carry out ``steps`` (``reload.plan``); an OSError binding a new listener changes nothing."""
        new = steps.new
        fresh: dict[int, list[socket.socket]] = {}
        try:  # before anything changes
            for index in steps.opened:
                fresh[index] = bind_sockets(new.listeners[index])
        except OSError:
            for sockets in fresh.values():
                for sock in sockets:
                    sock.close()
            raise
        for name in steps.pools_added:
            await self._add_pool(new.pool(name))
        for name in steps.pools_updated:
            await self._update_pool(name, new.pool(name), steps)
        frontends: list[Frontend] = [None] * len(new.listeners)  # type: ignore[list-item]
        for kept in steps.kept:
            frontend = self.frontends[kept.old]
            if kept.rebuilt:
                replacement = self._frontend(kept.new, new.listeners[kept.new])
                replacement.start(self.deadlines, frontend.listener.release())  # no await in between
                self._drain_later(_of_listener(frontend.config), new.drain_timeout)
                frontend = replacement
            elif frontend.sni is not None:
                frontend.sni.reroute(new.listeners[kept.new])
            frontend.index = kept.new
            frontends[kept.new] = frontend
        for index, sockets in fresh.items():
            frontends[index] = self._frontend(index, new.listeners[index])
            frontends[index].start(self.deadlines, sockets)
            self.outgoing.ports.update(port for _, port in frontends[index].listener.addresses)
            log.info("listening on %s", frontends[index].describe())
        for index in steps.closed:
            gone = self.frontends[index]
            gone.close()
            log.info("stopped listening on %s (no longer in the configuration)", gone.config.address)
            self._drain_later(_of_listener(gone.config), new.drain_timeout)
        self.frontends = frontends
        for name in steps.pools_removed:
            await self._remove_pool(name)
        if "log_level" in steps.process:
            logging.getLogger().setLevel(new.log_level.upper())
        self.config = new
        self.table.durations = any(c.max_session_duration for c in new.listeners)
        self.reloads += 1

    async def _add_pool(self, config: PoolConfig) -> None:
        pool = self.pools[config.name] = self._pool(config)
        if self.shared is not None:
            self.shared.join([pool])
            return
        if Resolver.wanted(config):
            resolver = self._resolvers[config.name] = Resolver(pool)
            await resolver.resolve()
            resolver.start()
        prober = self._probers[config.name] = self._prober(pool)
        prober.start()

    async def _update_pool(self, name: str, config: PoolConfig, steps: Plan) -> None:
        pool = self.pools[name]
        if config.tls != pool.config.tls:
            pool.ssl_context = _client_tls(config.tls)
        if self.shared is not None:  # members come from the supervisor's table, followed before this
            pool.retune(config, members=False)  # config arrived (``Shared.follow``): the removed now drain
            if name in steps.members_changed:
                self._drain_removed(pool, list(pool.balancer.draining.values()), steps.new.drain_timeout)
            return
        if name in steps.health_changed:
            await self._probers[name].stop()
        resolver = self._resolvers.pop(name, None)
        if resolver is not None and name in steps.members_changed:
            await resolver.stop()
        elif resolver is not None:
            self._resolvers[name] = resolver
        _, removed = pool.retune(config, members=name in steps.members_changed)  # else discovery's stay
        self._drain_removed(pool, removed, steps.new.drain_timeout)
        if name in steps.members_changed and Resolver.wanted(config):
            resolver = self._resolvers[name] = Resolver(pool)
            await resolver.resolve()
            resolver.start()
        if name in steps.health_changed:
            prober = self._probers[name] = self._prober(pool)
            prober.start()

    async def _remove_pool(self, name: str) -> None:
        pool = self.pools.pop(name)
        resolver = self._resolvers.pop(name, None)
        if resolver is not None:
            await resolver.stop()
        prober = self._probers.pop(name, None)
        if prober is not None:
            await prober.stop()
        pool.close()  # its sessions are those of listeners closed or rebuilt: they drain with them

    def _drain_removed(self, pool: Pool, removed: list[Member], timeout: float) -> None:
        """Close the sessions of members a reload removed that are still removed ``timeout`` from now
        (with ``--drain-at safe``, ``_members_leaving`` already did, when they left the pool)."""
        if removed and self._safe_protocol(pool) is None:
            self._drain_later(_on_members(frozenset(removed)), timeout)

    def _safe_protocol(self, pool: Pool) -> str | None:
        """The protocol drained sessions of ``pool`` are watched in (``--drain-at safe``), or None."""
        return pool.config.watched_as if self.config.drain_at == "safe" else None

    def _members_leaving(self, pool: Pool, members: list[Member]) -> None:
        """Members removed (reload, discovery) or drained by the operator: with ``--drain-at safe``, their
        sessions close at their first safe moment, or at the drain timeout."""
        protocol = self._safe_protocol(pool)
        if protocol is None:
            return
        chosen = frozenset(members)

        def leaving(session: Session) -> bool:  # not once the member is enabled or added back
            member = session.member
            return member in chosen and (member.draining or member.admin == DRAIN)

        for session in [s for s in self.table.live if leaving(s)]:
            watch(session, protocol, leaving)
        self._drain_later(leaving, self.config.drain_timeout)

    def _drain_later(self, leaving: Callable[[Session], bool], timeout: float, cause: str = "shutdown") -> None:
        """Close the sessions ``leaving`` picks that are still open ``timeout`` from now, as ``cause``."""
        loop = asyncio.get_running_loop()

        def close() -> None:
            self._drain_timers.discard(timer)
            for session in [s for s in self.table.live if leaving(s)]:
                if cause == MEMBER_DOWN:
                    self.table.closed_member_down += 1
                session.abort(cause)

        timer = loop.call_later(timeout, close)
        self._drain_timers.add(timer)

    def handover(self) -> list[tuple[str, list[socket.socket]]]:
        """Each listener's listen address (as configured) and its listening sockets, for a takeover."""
        return [(str(f.config.address), f.listener.sockets) for f in self.frontends]


def describe_pool(pool: Pool) -> str:
    """``pool default: 2 members: 10.0.0.1:6379, 10.0.0.2:6379; tcp checks every 2s``: the pool's
    start-up line."""
    config = pool.config
    members = ", ".join(m.name for m in pool.members)
    count = f"{len(pool.members)} member{'' if len(pool.members) == 1 else 's'}"
    health = config.health
    checks = f"{health.kind} checks every {health.interval:g}s" if health.enabled else "no health checks"
    extras = [f"retries {config.retries}"] + ["TLS"] * (config.tls is not None)
    extras += [f"PROXY {config.send_proxy}"] * (config.send_proxy is not None)
    return f"pool {pool.name}: {count}{': ' if members else ''}{members}; {checks}; {', '.join(extras)}"


def _of_listener(config: ListenerConfig) -> Callable[[Session], bool]:
    """Picks the sessions a Frontend built from ``config`` accepted (their limits are its config)."""
    return lambda session: session.limits is config


def _on_members(members: frozenset[Member]) -> Callable[[Session], bool]:
    """Picks the sessions on ``members`` that are still removed: a member added back before the drain
    timeout (revived with its sessions, ``Balancer.update``) is a member again, and so are they."""
    return lambda session: session.member in members and session.member.draining


def _client_tls(tls_config: UpstreamTLSConfig | None) -> ssl.SSLContext | None:
    return None if tls_config is None else client_context(tls_config)
