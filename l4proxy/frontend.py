"""One listener's front end: its sockets (``Listener``), its TLS context, and how a client accepted
there becomes a session of its pool.

No Task per client: the loop's ``connect_accepted_socket`` runs under a ``Drive`` (``drive.py``); the
client pump's ``connection_made`` (after the TLS handshake, if any) starts the dial, and the dial is a
chain of callbacks too. The sessions of a listener share one ``relay.Wiring``, built here once: the
hooks that start the dial, end the session, and move bulky sessions to the splice engine when this
listener's sessions may switch.

**Opening a client** depends on the loop. On uvloop a client does not need the Drive: the
opener starts ``connect_accepted_socket`` by hand. Its first step calls the protocol factory once, makes
the transport from the descriptor (an ``AcceptedFD`` is enough) and schedules ``connection_made``, then
waits for that and nothing else; our pump sees ``connection_made`` anyway, so nothing waits on the
coroutine, and ``Session._unlink`` finishes it when the session is freed. Its only other outcome, the
loop's own TLS handshake, is never asked for: a TLS client's transport is plain and its protocol is a
``tlsengine.TLSEngine`` (so it can half-close), which reports the handshake to ``_handshaken`` and then
makes the pump's connection; until then drain closes the engine. This is the one place that relies
on how uvloop runs that coroutine, and ``tests/io/test_frontend.py`` pins the behaviour. Every client on
asyncio's own loop (kept for debugging, not speed) goes through the Drive.

**Stages.** ``Frontend.stages`` are per-listener steps between accept and session (an ACL, a PROXY
protocol header): each wraps the accept callback once, at ``start``, so a listener without stages
calls the opener directly and pays nothing for them. This listener's own are the ``Edge``'s
(``edge.py``: the PROXY header, the allow/deny rules and the per-source limits), whose counters
``refused`` and ``header_errors`` are exposed here; ``leave`` (set only with per-source limits) hears
of every admitted client that is gone, served or not.

**SNI routes** (``sni.py``): a listener with routes ends its stages with the ``SniRouter``, which picks
each client's pool from its ClientHello and calls that pool's opener. Each pool gets an opener (and a
``Wiring``) of its own at its first client, so its sessions dial, count and release in that pool; the
listener's own ``pool`` is the default. A listener without routes builds its single opener as before.

**PROXY headers to members** (the pool's ``send_proxy``): the dial of each session gets its header
(``dialer.proxy_header``) from a dial maker of its own, so a pool without it pays nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import os
import socket
import ssl
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from .accesslog import AccessLog
from .causes import LOOP
from .config import ListenerConfig
from .counters import ListenerCounters
from .deadlines import Deadlines
from .dialer import Dial, Outgoing, TimedDial, proxy_header
from .drive import Drive
from .edge import Edge
from .listener import AcceptedFD, Listener
from .peer import format_peers
from .pool import Pool
from .ratelog import Warnings
from .relay import Session, SessionHook, Wiring, stay
from .sessions import SessionTable
from .sni import SniRouter
from .splice import DESCRIPTORS, Splicing, usable
from .tls import server_context
from .tlsengine import Dropped, TLSEngine

log = logging.getLogger("l4proxy")

TLS_FAILED = "TLS handshake failures"  # rate-limited kinds of warnings (ratelog.py)
ACCEPT_FAILED = "failed accepts"
LOOPS = "connections from the proxy itself"

Serve = Callable[[socket.socket | AcceptedFD, object], None]  # what a listener calls per accepted client
Stage = Callable[[Serve], Serve]  # a per-listener step: given the next callback, the one to call first


class Frontend:
    """Listener ``index`` of the config: accepts its clients and turns them into sessions of ``pool``."""

    def __init__(
        self,
        index: int,
        config: ListenerConfig,
        pool: Pool,
        table: SessionTable,
        access_log: AccessLog,
        warnings: Warnings,
        splicing: Splicing,
        outgoing: Outgoing,
        pools: Mapping[str, Pool] | None = None,
    ) -> None:
        self.index = index
        self.config = config
        self.pool = pool
        self.table = table
        self.access_log = access_log
        self.warnings = warnings
        self.splicing = splicing
        self.outgoing = outgoing
        self.tls_context: ssl.SSLContext | None = None if config.tls is None else server_context(config.tls)
        self.edge = Edge(config, warnings)
        self.stages: list[Stage] = self.edge.stages()
        self.refused = self.edge.refused  # clients the rules or limits closed, by reason
        self.header_errors = self.edge.header_errors  # clients closed for their PROXY header, by reason
        self.leave: Callable[[object], None] | None = None if self.edge.sources is None else self.edge.leave
        self.sni = SniRouter(config, warnings, pools or {pool.name: pool}) if config.sni else None
        if self.sni is not None:
            self.sni.leave = self.leave
        self.tls_failures = 0  # client TLS handshakes that failed or timed out
        self.counters = ListenerCounters()  # for the admin endpoint: read at scrape time
        table.counted.append(self.counters)  # the table's count of sessions served sums them
        self.spliced = usable(config, pool.config.tls is not None)
        self.listener = Listener(config, self._refused, per_session=self.descriptors_per_session())
        self.wirings: list[Wiring] = []  # its sessions' hooks, once started

    def descriptors_per_session(self) -> int:
        """What one session holds: its two sockets, and the splice engine's descriptors when every
        session moves there at once (``--relay splice``, plain TCP on both sides)."""
        return 2 + (DESCRIPTORS if self.spliced and self.config.relay == "splice" else 0)

    def staged(self) -> int:
        """Clients accepted here that a stage still holds (their PROXY header or ClientHello awaited): no
        session yet."""
        return len(self.edge.reading) + (0 if self.sni is None else len(self.sni.peeking))

    def start(self, deadlines: Deadlines, sockets: list[socket.socket] | None = None) -> None:
        """Bind (or take ``sockets``, already listening) and accept: the stages wrap the opener once, here."""
        serve = self._opener(deadlines, self.pool) if self.sni is None else self.sni.stage(self._openers(deadlines))
        for stage in reversed(self.stages):
            serve = stage(serve)
        self.listener.serve = serve
        self.listener.start(sockets)

    def close(self) -> None:
        """Stop accepting and close the clients whose PROXY header is still awaited; sessions are not
        touched."""
        if self.listener.sockets:
            self.listener.close()
        self.edge.close()
        if self.sni is not None:
            self.sni.close()

    def describe(self) -> str:
        """``127.0.0.1:6379 (listener default, TLS, PROXY header) -> pool default``, for the start-up
        log (the pool's own line names its members); SNI routes are listed before the default pool."""
        config = self.config
        traits = [f"listener {config.name}"]
        traits += ["TLS"] * (config.tls is not None) + ["PROXY header"] * config.accept_proxy
        traits += ["allow/deny rules"] * bool(config.allow or config.deny)
        routes = "".join(f"{pattern} -> pool {pool}, " for pattern, pool in config.sni)
        default = "" if not config.sni else "the rest refused; " if config.sni_strict else "the rest -> "
        addresses = format_peers(self.listener.addresses)
        return f"{addresses} ({', '.join(traits)}) -> {routes}{default}pool {self.pool.name}"

    def _refused(self, sock: socket.socket | AcceptedFD, _address: object) -> None:
        """The callback before ``start`` (never called: the listener accepts only once started)."""
        sock.close()

    def _wiring(self, deadlines: Deadlines, pool: Pool) -> Wiring:
        loop = asyncio.get_running_loop()
        table, warnings, outgoing = self.table, self.warnings, self.outgoing
        queue = pool.queue  # clients waiting for a place (every member at its max_conns)
        live, opening, record = table.live, table.opening, self.access_log.record
        idle = table.idle
        listener = self.listener

        own = outgoing.addresses
        counters = self.counters
        durations = counters.durations
        spans, bounds = durations.counts, durations.bounds
        make_dial = self._dial_maker(pool)

        def client_ready(session: Session) -> None:
            opening.pop(session, None)  # a session now: drain waits for it instead of cancelling it
            live.add(session)
            counters.active += 1  # and so one more begun (ListenerCounters.sessions)
            # one of our own connections: a member leads back here (an empty set, the common case,
            # skips hashing the client's address)
            if own and session.client_address in own:
                self._loop_back(session)
                return
            dial = session.dial = make_dial(session, pool, loop, deadlines, warnings, outgoing)
            dial.start()

        def ended(session: Session) -> None:
            now = time.time()  # the duration's end, and the access log's
            live.discard(session)
            listener.sessions -= 1  # Listener.done, inlined: this runs per session
            if listener.full:
                listener.resume()
            counters.ended += 1  # the table's served, and with active the sessions begun
            counters.active -= 1
            if counters.timed:
                took = now - session.started
                spans[bisect_left(bounds, took)] += 1  # durations.observe(took), inlined: this runs per session
                durations.sum += took
            sent = session.client.nbytes
            member = session.member
            if member is not None:  # it was connected: attach_upstream sets its member and upstream together
                received = session.upstream.nbytes  # type: ignore[union-attr]
                try:  # once per session, for the listener's and the member's bytes alike (counters.Flow)
                    flow = member.stats.flows[counters]
                except KeyError:
                    flow = member.stats.flow(counters)
                flow.bytes_in += sent
                flow.bytes_out += received
                member.active -= 1  # Balancer.release, inlined: this runs per session
                view = pool.balancer.view
                if view is not None:
                    view.publish(member.slot, member.active)
                if queue.length:  # a place for the oldest client waiting
                    queue.serve()
                if member.outlier.streak and received:  # bytes prove it serves: clear its failure streak
                    pool.served(member)
            else:
                counters.unconnected_in += sent
            if session.sockname is not None:
                outgoing.addresses.discard(session.sockname)
            record(session, now)
            if not live:
                idle.set()

        bulky: SessionHook = self.splicing.start if self.spliced else stay
        attached: SessionHook | None = None
        if self.config.relay == "splice":
            attached = bulky
        def reset_early(session: Session) -> None:
            pool.reset_early(session.member)  # type: ignore[arg-type]  # attached: the upstream reset

        wiring = Wiring(self.config, client_ready, self._with_leave(ended), bulky, attached, reset_early)
        self.wirings.append(wiring)
        return wiring

    def _dial_maker(self, pool: Pool) -> Callable[..., Dial]:
        """What makes a session's dial: ``Dial`` itself (``TimedDial`` for a JSON access log), or one that
        gives it the PROXY header the pool sends (``send_proxy``), built once per session and the same
        for every attempt. A listener on one address (not a wildcard) is every direct client's
        destination: no ``getsockname`` each."""
        version = pool.config.send_proxy
        kind = TimedDial if self.access_log.json else Dial  # JSON records a connect time and the attempts
        if version is None:
            return kind
        client_cert = self.config.tls is not None and self.config.tls.client_ca is not None
        listener = self.listener
        fixed: list[tuple[str, int] | None] = []  # looked up at the first client: bound only then

        def dial_with_header(session: Session, *rest: Any) -> Dial:
            if not fixed:
                bound = listener.addresses
                fixed.append(bound[0] if len(bound) == 1 and bound[0][0] not in ("0.0.0.0", "::") else None)
            dial = kind(session, *rest)
            dial.header = proxy_header(session, version, client_cert, fixed[0])
            return dial

        return dial_with_header

    def _with_leave(self, ended: SessionHook) -> SessionHook:
        """``ended`` that tells ``leave`` too, when it is set."""
        leave = self.leave
        if leave is None:
            return ended

        def ended_and_left(session: Session) -> None:
            ended(session)
            leave(session.client_address)

        return ended_and_left

    def _openers(self, deadlines: Deadlines) -> Callable[[Pool], Serve]:
        """The opener of each pool an SNI route leads to, made at its first client and again for a pool
        a reload replaced."""
        made: dict[str, tuple[Pool, Serve]] = {}

        def opener(pool: Pool) -> Serve:
            found = made.get(pool.name)
            if found is None or found[0] is not pool:
                found = made[pool.name] = (pool, self._opener(deadlines, pool))
            return found[1]

        return opener

    def _opener(self, deadlines: Deadlines, pool: Pool) -> Serve:
        """The per-client callback: a session of ``pool`` for the accepted client, and its transport under way."""
        loop = asyncio.get_running_loop()
        wiring = self._wiring(deadlines, pool)
        opening = self.table.opening
        warnings = self.warnings
        tls = self.config.tls
        bare = type(loop).__module__.startswith("uvloop")

        def serve(sock: socket.socket | AcceptedFD, address: object) -> None:
            session = Session(wiring)
            session.client_address = address
            protocol: asyncio.Protocol = session.client
            engine = None
            if tls is not None:  # the engine is the client transport's protocol and the pump's transport
                protocol = engine = self._engine(session, tls.handshake_timeout)
            factory = itertools.repeat(protocol).__next__  # a C callable: no Python frame runs
            if bare and isinstance(sock, AcceptedFD):
                # uvloop: the one place that relies on how uvloop runs the coroutine (see the module's
                # docstring; tests/io/test_frontend.py pins it). Inline: it runs per client.
                opener = loop.connect_accepted_socket(factory, sock)  # type: ignore[arg-type]
                try:
                    opener.send(None)  # the transport exists once this returns
                except Exception as exc:
                    opener.close()
                    _close_unowned(sock)
                    self.listener.done()
                    warnings.warn(log, ACCEPT_FAILED, "accepting %s failed: %s", session.client_addr, exc)
                    if self.leave is not None:
                        self.leave(address)
                    return
                session.opener = opener
                # until connection_made (which the loop calls later: pinned too); drain closes what is left
                opening[session] = opener if engine is None else engine
                return

            def opened(exc: BaseException | None) -> None:
                opening.pop(session, None)
                if exc is not None:
                    self._open_failed(sock, session, exc)
                elif engine is not None and engine.handshaking:
                    opening[session] = engine  # in its handshake: drain closes it

            client: socket.socket = sock  # type: ignore[assignment]  # uvloop takes an AcceptedFD as it is
            drive = Drive(loop.connect_accepted_socket(factory, client), opened)
            if drive.coro is not None:
                if session.client.transport is None:
                    opening[session] = drive  # until connection_made; drain closes what is left
            elif isinstance(sock, AcceptedFD) and session.client.transport is None:
                _close_unowned(sock)

        return serve

    def _engine(self, session: Session, timeout: float) -> TLSEngine:
        """The TLS engine between a client's transport and its pump: it reports the handshake to
        ``_handshaken``."""
        assert self.tls_context is not None
        done = functools.partial(self._handshaken, session)
        return TLSEngine(self.tls_context, session.client, done, server_side=True, timeout=timeout)

    def _handshaken(self, session: Session, exc: BaseException | None) -> None:
        """A client's TLS handshake is over: on success its pump's ``connection_made`` comes next and
        starts the session; a failure is counted and logged, a drop (drain) just forgotten."""
        if exc is None:
            return
        self.table.opening.pop(session, None)
        if self.leave is not None:
            self.leave(session.client_address)
        session.discard()
        if isinstance(exc, Dropped):
            return
        self._tls_failed(session, exc)

    def _loop_back(self, session: Session) -> None:
        """Close a client that is one of our own connections instead of dialing on (``dialer.py``)."""
        self.warnings.warn(
            log,
            LOOPS,
            "closed a connection from this proxy's own %s: pool %s has a member that leads back to this"
            " proxy (%s)",
            session.client_addr,
            self.pool.name,
            format_peers(self.listener.addresses),
        )
        session.fail(LOOP)

    def _open_failed(self, sock: socket.socket | AcceptedFD, session: Session, exc: BaseException) -> None:
        sock.close()  # a no-op once a transport has taken the socket (or the descriptor)
        if session.client.transport is None:  # else it became a session, and its end says it is done
            self.listener.done()
        if self.leave is not None:
            self.leave(session.client_address)
        session.discard()
        self.warnings.warn(log, ACCEPT_FAILED, "accepting %s failed: %s", session.client_addr, exc)

    def _tls_failed(self, session: Session, exc: BaseException) -> None:
        self.tls_failures += 1
        cause = _tls_failure(exc)
        self.counters.tls_failed(cause)
        self.warnings.warn(log, TLS_FAILED, "TLS handshake with %s failed: %s", session.client_addr, cause)


def owed(frontends: Iterable[Frontend], opening: Iterable[Session], dials: Iterable[Hashable]) -> int:
    """The descriptors that clients accepted on any of ``frontends`` will still open: one waiting for
    its PROXY header, its transport (``opening``) or its upstream connect (``dials``) holds its own
    socket and will hold the rest of its listener's ``descriptors_per_session``. (A dialing client may
    have its upstream socket already: counted again, which errs on the side of a client waiting in the
    backlog.) The descriptor limit is the process's, so every listener's count takes off what all of
    them owe. Walked only when a listener counts its descriptors (its budget is spent), never per client."""
    frontends = list(frontends)
    rest = {wiring: f.listener.per_session - 1 for f in frontends for wiring in f.wirings}
    total = sum((f.listener.per_session - 1) * f.staged() for f in frontends)
    for session in opening:
        total += rest.get(session.wiring, 1)  # a listener a reload replaced: its upstream socket at least
    for dial in dials:
        assert isinstance(dial, Dial)
        total += rest.get(dial.session.wiring, 1)
    return total


def _close_unowned(fd: AcceptedFD) -> None:
    """Close a client descriptor that no transport took (the loop failed before it could)."""
    with contextlib.suppress(OSError):
        os.close(fd)


def expire_dial(dial: Hashable) -> None:
    """``Deadlines``' callback: a dial's connect deadline passed."""
    assert isinstance(dial, Dial)
    dial.expired()


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
