"""Connection-level retries: pick a member, connect with a timeout, move on when that fails.

Retries happen only here, before the session has relayed a single byte to any upstream, which is what
makes them safe for every protocol. Each attempt goes to a member not yet tried for this client while
one remains; when every member has been tried, remaining attempts may reuse them (a single-member pool
then retries its one member, as HAProxy's ``retries`` does). Every failure is a passive health result,
except running out of our own descriptors or memory (EMFILE and kin): that is not the member's fault and
no other member would fare better, so the client is closed without blaming any member or retrying. (The
listener keeps a reserve of descriptors for upstream connects, so this is rare.)
Host names are resolved by the loop's ``getaddrinfo`` (a thread), never blocking the loop.

**Loops.** A member that is the proxy itself (refused at start-up, but a name can move, and a wildcard
listen address is every address) makes each connect come back as a new client, which dials again. Every
connection to a member on one of our listen ports (only those can be us) has its local address in
``Outgoing.addresses`` (the proxy's set, which the probes fill too) from its ``connect()`` call until
its session ends; a client whose own address is in that set is one of ours, and is closed as ``loop``
with a rate-limited warning before it dials (``frontend.py``). For such a member the socket is made
and connected here (``_connect_noted``), so its address is known before the connection can be
accepted at the other end; a member given by name is noted once connected, which may be a hop late.
It costs one set lookup per session and a port lookup per connect; a member on another port costs
nothing more.

**TLS members** are dialed plain and the handshake runs in ``tlsengine.TLSEngine`` (half-close); the
attempt is connected once the handshake is done and, on TLS 1.3, once the member's first record after
it has come or a bounded wait has passed: a member that rejects our certificate (or its absence) says
so only then, and that is a failed attempt like any handshake failure, retried elsewhere, not a served
session. Nothing of the client's has been sent to it, so the retry is as safe as any other.

**PROXY protocol** (``send_proxy``): a dial with a ``header`` (``proxy_header``, built once per
session by the frontend) writes it before any byte of the client's: to a plain member first thing on
the new transport, ahead of the early bytes the client pump holds; to a TLS member in the clear on the
connected socket before the handshake, as HAProxy's ``send-proxy`` with ``ssl`` does. A dial without
one does nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import socket
import ssl
import time
from bisect import bisect_left
from collections.abc import Coroutine, Hashable
from typing import Any

from .balancer import AT_CAP, NO_PRIMARY, Member
from .budget import retry_delay
from .config import is_ip
from .deadlines import Deadlines
from .drive import Drive
from .errors import failure_kind, out_of_descriptors
from .health import Event
from .peer import Carried
from .pool import Pool
from .proxyproto import SSLInfo, Tlv, alpn_tlv, authority_tlv, encode_v1, encode_v2, ssl_tlv
from .ratelog import Warnings
from .relay import Pump, Session
from .tlsengine import TLSEngine, judged

log = logging.getLogger("l4proxy.dialer")

NO_UPSTREAM = "clients with no upstream"  # rate-limited kinds of warnings (ratelog.py)
QUEUE_FULL = "clients refused by a full queue"
QUEUE_TIMEOUT = "clients timed out in the queue"
CONNECT_FAILED = "failed upstream connects"


class Outgoing:
    """The local addresses of the proxy's own outgoing connections, and the ports it listens on."""

    __slots__ = ("addresses", "ports")

    def __init__(self) -> None:
        self.addresses: set[object] = set()
        self.ports: set[int] = set()  # filled as the listeners bind


class Dial:
    """The dial of one session: a chain of callbacks, no coroutine of its own and no Task.

    Each attempt picks a member, sets its connect deadline (``deadlines.py``: no timer of its own) and
    starts the loop's ``create_connection`` under a ``Drive``; its outcome (or the deadline) moves the
    dial on to the next attempt, to the session,
    or to failing the client. ``cancel`` stops it when the client leaves first or the proxy aborts."""

    __slots__ = (
        "attempted",
        "deadline",
        "deadlines",
        "drive",
        "header",
        "loop",
        "member",
        "outgoing",
        "pool",
        "pump",
        "queued_at",
        "session",
        "tried",
        "wait",
        "warnings",
    )

    def __init__(
        self,
        session: Session,
        pool: Pool,
        loop: asyncio.AbstractEventLoop,
        deadlines: Deadlines,
        warnings: Warnings,
        outgoing: Outgoing,
    ) -> None:
        self.session = session
        self.pool = pool
        self.loop = loop
        self.deadlines = deadlines
        self.warnings = warnings  # a member down or every member down: one line per client otherwise
        self.outgoing = outgoing  # our own connections' local addresses (see Loops)
        self.tried: list[Member] = []
        self.member: Member | None = None
        self.pump: Pump | None = None
        self.drive: Drive | None = None
        self.deadline: set[Hashable] | None = None  # the deadline bucket this attempt is in
        self.wait: asyncio.TimerHandle | None = None  # the back-off before a retry to the same member
        self.header = b""  # the PROXY header to send first (send_proxy), the same for every attempt
        self.attempted = 0.0  # time.monotonic() the attempt in flight began
        self.queued_at = 0.0  # loop time it joined the pool's queue (every member full); 0: not waiting

    def start(
        self,
        cause: str = "no healthy upstream",
        give_up: bool = False,
        member: Member | None = None,
        waited: bool = False,
    ) -> None:
        """Begin the next attempt, or fail the client when none is left (or ``give_up``); ``member`` is
        one the queue took for it, or (``waited``) the one a retry's back-off was for, taken and counted.
        From the pick to the connect in one method: this runs per session."""
        pool = self.pool
        if not waited:
            tried = self.tried
            if member is None and not give_up and len(tried) <= pool.config.retries:
                member = pool.balancer.take(tried)  # counted on the member from here on
            if member is None:
                if not tried:  # say whether the members are down or full
                    cause = pool.balancer.shortage()
                    if (cause is AT_CAP or cause is NO_PRIMARY) and pool.config.max_queue:
                        self._queue(cause)
                        return
                self._no_upstream(cause)
                return
            # From here until _done or _stop the attempt is counted in the pool's retry budget: a first
            # one while ``tried`` holds one member, a retry after that; ``member`` is set exactly meanwhile.
            if tried:
                if not self._retry(member, cause):
                    return
            else:
                pool.budget.dials += 1  # RetryBudget.dial_started, inlined
                tried.append(member)
                self.member = member
        assert member is not None
        pump = self.pump = Pump(self.session)  # a fresh pump per attempt; a failed one is dropped
        if pool.timed:  # the connect histogram's start, and the deadline's
            self.attempted = now = time.monotonic()
            self.deadline = self.deadlines.add(self, pool.config.connect_timeout, now)
        else:
            self.deadline = self.deadlines.add(self, pool.config.connect_timeout)
        try:
            before_tls = self.header if pool.ssl_context is not None else b""
            if member.address.port in self.outgoing.ports and is_ip(member.address.host):
                coro = _connect_noted(self.loop, pool, member, pump, self.outgoing, before_tls)
            elif before_tls:
                coro = _connect_after(self.loop, pool, member, pump, before_tls)
            else:
                coro = _connect(self.loop, pool, member, pump)
        except (OSError, ssl.SSLError) as exc:
            self._failed(exc)
            return
        drive = Drive(coro, self._done)
        if drive.coro is not None:  # else it finished at once, and _done has moved on already
            self.drive = drive

    def _retry(self, member: Member, cause: str) -> bool:
        """Count a retry on ``member`` (taken) if the retry budget allows: whether to connect now. A
        member tried already (a one-member pool) gets a back-off with jitter first (``_waited``)."""
        pool = self.pool
        budget = pool.budget
        if not budget.try_retry():
            pool.balancer.release(member)
            pool.retry_refused += 1
            spent = f"the retry budget ({budget.percent}% of the dials in flight) is spent"
            self._no_upstream(f"{cause}; no retry: {spent}")
            return False
        pool.retries += 1
        tried = self.tried
        again = member in tried
        tried.append(member)
        self.member = member
        if again:
            delay = retry_delay(tried.count(member) - 1, random.random())
            self.wait = self.loop.call_later(delay, self._waited)
            return False
        return True

    # the queue: every eligible member is at its max_conns, or a primary pool has no primary (a failover)

    def _queue(self, cause: str) -> None:
        """Wait in the pool's queue for a place or a primary (``cause`` says which), at most
        ``queue_timeout``; refused when it is full. The client's early bytes are held meanwhile as
        during a connect (``Pump.pending``, bounded), and go to the member it gets."""
        pool = self.pool
        queue = pool.queue
        if queue.length >= pool.config.max_queue:
            queue.full += 1
            self._no_upstream(f"{cause}; the queue is full ({pool.config.max_queue} clients)", QUEUE_FULL)
            return
        self.queued_at = self.loop.time()
        self.wait = self.loop.call_later(queue_timeout(pool), self._queue_expired, cause)
        queue.join(self)

    def resume(self, member: Member) -> None:
        """A place on ``member`` (taken and counted for this client): the wait is over."""
        if self.wait is not None:
            self.wait.cancel()
            self.wait = None
        self.start(AT_CAP, member=member)

    def _queue_expired(self, cause: str) -> None:
        self.wait = None
        queue = self.pool.queue
        queue.leave(self)
        if cause is AT_CAP:
            queue.timeouts += 1
        else:
            queue.no_primary += 1
        waited = f"{cause}; waited {queue_timeout(self.pool):g}s in the queue (queue_timeout)"
        self._no_upstream(waited, QUEUE_TIMEOUT)

    def _no_upstream(self, cause: str, kind: str = NO_UPSTREAM) -> None:
        pool = self.pool
        self.session.dial = None
        pool.no_upstream += 1
        self.warnings.warn(log, kind, "no upstream for %s in pool %s: %s", self.session.client_addr, pool.name, cause)
        self.session.fail(f"no_upstream ({cause})")

    def _waited(self) -> None:
        """The back-off before a retry is over: connect."""
        self.wait = None
        self.start(member=self.member, waited=True)

    def cancel(self) -> None:
        """Stop the attempt in flight; the client is dealt with by the caller."""
        self.session.dial = None
        self._stop()

    # outcomes

    def _done(self, exc: BaseException | None) -> None:
        self.drive = None
        if exc is not None:
            self._failed(exc)
            return
        begun = self.attempted  # 0.0: not timed (Proxy.time_sessions came after the attempt began, or never)
        took = time.monotonic() - begun if begun else 0.0
        assert self.deadline is not None and self.member is not None and self.pump is not None
        self.deadline.discard(self)
        self.deadline = None
        session, member, pump = self.session, self.member, self.pump
        pool = self.pool
        if len(self.tried) == 1:
            pool.budget.dials -= 1  # RetryBudget.dial_ended, inlined
        else:
            pool.budget.dial_ended(True)
        if member.outlier.streak or pool.forward is not None:  # Pool.connect_ok, inlined: this runs per session
            pool.report(member, Event.TRAFFIC_OK)
        session.dial = None
        self.pump = self.member = None
        if session.ended:  # the client left as the connect completed
            self.pool.balancer.release(member)
            pump.abort()
            self.outgoing.addresses.discard(session.sockname)  # its session's end has passed already
            return
        outgoing = self.outgoing
        if session.sockname is None and member.address.port in outgoing.ports:  # a name that may be us
            assert pump.transport is not None
            session.sockname = sockname = pump.transport.get_extra_info("sockname")
            outgoing.addresses.add(sockname)
        stats = member.stats
        stats.sessions += 1
        if begun:
            connects = stats.connects  # connects.observe(took), inlined: this runs per session
            connects.counts[bisect_left(connects.bounds, took)] += 1
            connects.sum += took
        if self.header and self.pool.ssl_context is None:
            early = session.client.pending
            if early:  # one write with the early bytes attach_upstream hands over
                early.insert(0, self.header)
            else:
                assert pump.transport is not None
                pump.transport.write(self.header)
        session.attach_upstream(pump, member)

    def expired(self) -> None:
        """The connect deadline passed (``Deadlines`` calls this)."""
        self.deadline = None
        self._failed(TimeoutError())

    def _failed(self, exc: BaseException) -> None:
        member = self.member
        assert member is not None
        self._stop()
        cause = failure_kind(exc)
        exhausted = out_of_descriptors(exc)  # not this member's fault, and no other member would fare better
        if not exhausted:
            self.warnings.warn(
                log, CONNECT_FAILED, "connect to %s for %s failed: %s", member.name, self.session.client_addr, cause
            )
            member.stats.connect_failed(cause)
            self.pool.report(member, Event.TRAFFIC_FAIL, f"connect failed: {cause}")
        if self.session.ended:
            self.session.dial = None
            return
        self.start(cause, give_up=exhausted)

    def _stop(self) -> None:
        """Undo the attempt in flight: back-off, deadline, connect, member count, upstream socket, budget."""
        if self.wait is not None:
            self.wait.cancel()
            self.wait = None
        if self.queued_at:
            self.pool.queue.leave(self)
        if self.deadline is not None:
            self.deadline.discard(self)
            self.deadline = None
        drive, self.drive = self.drive, None
        if drive is not None:
            drive.cancel()  # closes the transport the connect opened
        if self.member is not None:  # counted on the member and in the budget since start
            self.pool.balancer.release(self.member)
            self.pool.budget.dial_ended(len(self.tried) > 1)
        if self.pump is not None:
            self.pump.abort()  # the connect may have completed before the cancellation
        self.pump = self.member = None


class TimedDial(Dial):
    """A Dial that leaves on its session what a JSON access-log record reads: the members tried (the
    dial's own list, shared) and ``connect_time``, seconds from the dial's start to the connect that
    succeeded. Only listeners that log JSON use it, so the logfmt path pays nothing for these."""

    __slots__ = ("begun",)

    def __init__(self, session: Session, *rest: Any) -> None:
        super().__init__(session, *rest)
        session.tried = self.tried
        self.begun = time.monotonic()

    def _done(self, exc: BaseException | None) -> None:
        if exc is None:
            self.session.connect_time = time.monotonic() - self.begun
        super()._done(exc)


def queue_timeout(pool: Pool) -> float:
    """How long a client may wait in ``pool``'s queue: ``queue_timeout``, by default the connect timeout."""
    config = pool.config
    return config.connect_timeout if config.queue_timeout is None else config.queue_timeout


def _connect(
    loop: asyncio.AbstractEventLoop, pool: Pool, member: Member, pump: Pump, sock: socket.socket | None = None
) -> Coroutine[Any, Any, tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]:
    """The loop's connect coroutine for one attempt, not yet started (over ``sock``, connected, if given)."""
    address = member.address
    if pool.ssl_context is None:  # the common case: host and port positional, no keyword dict built and unpacked
        factory = itertools.repeat(pump).__next__  # returns the pump; a C callable, so no Python frame runs
        if sock is None:
            return loop.create_connection(factory, address.host, address.port)
        return loop.create_connection(factory, sock=sock)
    where: dict[str, Any] = {"sock": sock} if sock is not None else {"host": address.host, "port": address.port}
    return connect_tls(loop, pool, member, pump, where)


async def connect_tls(
    loop: asyncio.AbstractEventLoop,
    pool: Pool,
    member: Member,
    app: asyncio.Protocol,
    where: dict[str, Any],
    by: float | None = None,
) -> tuple[asyncio.BaseTransport, TLSEngine]:
    """Connect (``where``: host and port, or a connected ``sock``), then complete the TLS handshake
    (``tlsengine.py``, its late-verdict wait included) before the attempt counts as connected; a
    cancelled attempt drops the connection. Returns the TCP transport and the engine over it, which is
    ``app``'s transport. The sessions' dials and the health probes both connect through here, so a
    member that rejects us after a TLS 1.3 handshake fails both alike, with an alert's reason or, if it
    just hangs up on the certificate we sent, ``tlsengine.LateRejection``'s. ``by``: the attempt's
    deadline (``time.monotonic()``), which the late-verdict wait leaves room before."""
    from .tls import server_hostname

    assert pool.ssl_context is not None and pool.config.tls is not None
    handshake: asyncio.Future[None] = loop.create_future()
    engine = TLSEngine(
        pool.ssl_context,
        app,
        functools.partial(_settle, handshake),
        server_side=False,
        server_hostname=server_hostname(pool.config.tls, member.address.hostname),
        confirm=True,
        by=by,
    )
    transport, _ = await loop.create_connection(itertools.repeat(engine).__next__, **where)
    try:
        await handshake
    except BaseException as exc:
        engine.abort()
        judgement = judged(exc, pool.config.tls.cert is not None)
        if judgement is not exc:
            raise judgement from exc
        raise
    return transport, engine


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():  # cancelled with its dial
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


async def _connect_after(
    loop: asyncio.AbstractEventLoop, pool: Pool, member: Member, pump: Pump, header: bytes
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """Connect, send ``header`` in the clear, then start TLS on the same socket (send_proxy with TLS)."""
    sock = await connected_after(loop, member.address.host, member.address.port, header)
    try:
        return await _connect(loop, pool, member, pump, sock)
    except BaseException:
        sock.close()
        raise


async def connected_after(loop: asyncio.AbstractEventLoop, host: str, port: int, header: bytes) -> socket.socket:
    """A socket connected to ``host:port`` that has sent ``header`` (and nothing else yet)."""
    family, _, _, _, where = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]  # an IP: at once
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, where)
        await loop.sock_sendall(sock, header)
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect_noted(
    loop: asyncio.AbstractEventLoop, pool: Pool, member: Member, pump: Pump, outgoing: Outgoing, header: bytes = b""
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """Connect to a member that may be this proxy, with the socket's local address in ``outgoing`` from
    the ``connect()`` call on (see Loops), so the far end can tell it is us as soon as it accepts;
    ``header`` goes first, before TLS starts."""
    host, port = member.address.host, member.address.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sockname: object = None
    try:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect((host, port))
        sockname = sock.getsockname()
        outgoing.addresses.add(sockname)
        await loop.sock_connect(sock, (host, port))
        if header:
            await loop.sock_sendall(sock, header)
        connected = await _connect(loop, pool, member, pump, sock)
    except BaseException:
        outgoing.addresses.discard(sockname)
        sock.close()
        raise
    pump.session.sockname = sockname
    return connected


def proxy_header(
    session: Session, version: str, client_cert: bool = False, listening: tuple[str, int] | None = None
) -> bytes:
    """The PROXY header for ``session``'s client (``version`` 'v1' or 'v2'): the address it came from
    and the one it reached, as a header carried them, else ``listening`` (the listener's one address)
    or what its socket says. With v2 over a
    TLS-terminated client, the TLVs HAProxy sends: ALPN, AUTHORITY (the SNI), SSL with the version,
    the cipher and, when a client certificate was verified (``client_cert``), its CN."""
    address = session.client_address
    source = address[0], address[1]  # type: ignore[index]
    if isinstance(address, Carried):
        destination = address.destination
    elif listening is not None:
        destination = listening
    else:
        transport = session.client.transport
        assert transport is not None
        destination = transport.get_extra_info("sockname")
    if version == "v1":
        return encode_v1(source, destination)
    tls = session.tls_info
    return encode_v2(source, destination, _tls_tlvs(tls, client_cert) if tls else ())


def _tls_tlvs(tls: dict[str, str], client_cert: bool) -> list[Tlv]:
    tlvs = []
    if "tls_alpn" in tls:
        tlvs.append(alpn_tlv(tls["tls_alpn"]))
    if "tls_sni" in tls:
        tlvs.append(authority_tlv(tls["tls_sni"]))
    cn = tls.get("tls_peer_cn")
    info = SSLInfo.from_tls(tls.get("tls_version", ""), cipher=tls.get("tls_cipher"), cn=cn, client_cert=client_cert)
    tlvs.append(ssl_tlv(info))
    return tlvs
