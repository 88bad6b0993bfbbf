"""The one place that reads the proxy's run-time objects for ``/metrics``, ``/status``, ``/readyz``,
SIGUSR1 and the member actions of the admin API.

``ProxySource`` turns a running ``Proxy`` into a ``Snapshot`` of plain values (listeners, pools,
members, process facts) at the moment it is asked, and applies an operator's state to a member. The
renderers (``metrics.py``, ``status`` and ``status_lines`` below) see only the Snapshot, so a change
in how the proxy keeps its objects (a frontend per listener, a session table) is confined to
``ProxySource``, and another source (the supervisor of ``--workers N``) can stand in for it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__
from .checks import Failure
from .counters import ADMIN_STATES, DISABLED, DRAIN, REFUSALS, TLS_REASONS, ListenerCounters
from .edge import HEADER_ERRORS
from .histogram import CONNECT_BOUNDS, DURATION_BOUNDS, Buckets, empty

if TYPE_CHECKING:
    from .balancer import Member
    from .config import Config, ListenerConfig
    from .frontend import Frontend
    from .listener import Listener
    from .pool import Pool
    from .prober import Prober
    from .proxy import Proxy
    from .relay import Session

STATES = ("UP", "DOWN", "DRAIN", "MAINT", "EJECTED")  # HAProxy's haproxy_server_status states, and ejected


@dataclass(frozen=True, slots=True)
class ListenerView:
    name: str  # "default" from flags, its table key in a config file
    address: str  # as configured, e.g. 127.0.0.1:7000
    pool: str
    accepted: int
    sessions: int
    active: int
    bytes_in: int
    bytes_out: int
    tls_failures: dict[str, int]  # every reason of counters.TLS_REASONS on a TLS listener, else empty
    accept_pauses: int
    tls: bool = False  # terminates TLS: its sessions are handshakes done
    refused: dict[str, int] = field(default_factory=dict)  # by counters.REFUSALS, when it has rules or limits
    header_errors: dict[str, int] = field(default_factory=dict)  # by edge.HEADER_ERRORS, with accept_proxy
    durations: Buckets = field(default_factory=lambda: empty(DURATION_BOUNDS))  # of the sessions ended


@dataclass(frozen=True, slots=True)
class MemberView:
    name: str  # the member's key: its configured host:port
    state: str  # one of STATES
    health: str  # "up" or "down", whatever the operator did
    why: str
    since: float  # wall-clock seconds
    active: int
    attempts: int
    sessions: int
    connect_failures: dict[str, int]
    checks_passed: int
    checks_failed: int
    check_failures: dict[str, int]  # by kind (checks.Failure, lower-case names)
    last_check: str
    last_check_ok: bool
    last_check_seconds: float
    bytes_in: int = 0  # from clients to the member: sessions ended, and the open ones' so far
    bytes_out: int = 0
    state_changes: int = 0
    ejections: int = 0
    connects: Buckets = field(default_factory=lambda: empty(CONNECT_BOUNDS))  # the connects that made sessions
    ejected_until: float | None = None  # wall-clock seconds, while ejected (outlier.py)


@dataclass(frozen=True, slots=True)
class QueueView:
    """A pool's queue (``pool.WaitQueue``): clients waiting now, and what became of those that waited."""

    waiting: int = 0
    full: int = 0  # refused: the queue was full
    timeouts: int = 0  # closed after queue_timeout
    served: int = 0  # got a member after waiting
    waited_ms: int = 0  # milliseconds the served ones waited, in all
    no_primary: int = 0  # closed after queue_timeout waiting for a primary (a primary pool's failover)


def queue_view(pool: Pool) -> QueueView:
    queue = pool.queue
    waited_ms = round(queue.waited * 1000)
    return QueueView(queue.length, queue.full, queue.timeouts, queue.served, waited_ms, queue.no_primary)


@dataclass(frozen=True, slots=True)
class PoolView:
    name: str
    members: tuple[MemberView, ...]
    retries: int
    no_upstream: int
    queue: QueueView = field(default_factory=lambda: QueueView())

    @property
    def eligible(self) -> int:
        """Members that can take a new session."""
        return sum(1 for m in self.members if m.state == "UP")


@dataclass(frozen=True, slots=True)
class Snapshot:
    listeners: tuple[ListenerView, ...]
    pools: tuple[PoolView, ...]
    started_at: float
    now: float
    draining: bool
    workers: int = 1
    version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)
    workers_alive: int = 1  # worker processes running now (one process: itself)
    reloads: int = 0  # configurations applied by a reload
    reloads_failed: int = 0  # reloads refused (the file had problems, or a new address could not be bound)
    config_digest: str = ""  # config_digest() of the configuration in force

    @property
    def ready(self) -> bool:
        """Serving new clients: not draining, and every pool has an eligible member."""
        return not self.draining and all(pool.eligible for pool in self.pools)


def config_digest(config: Config) -> str:
    """A short digest of a configuration: equal configurations (whatever file or flags they came from,
    defaults filled in) have equal digests, so a fleet's odd one out shows."""
    return hashlib.sha256(repr(config).encode()).hexdigest()[:16]


class NotFound(LookupError):
    """An unknown pool or member; the message names it."""


class Source(Protocol):
    """What the admin endpoint reads and changes."""

    def snapshot(self) -> Snapshot: ...

    def set_admin(self, pool: str, member: str, action: str) -> MemberView:
        """Apply ``action`` (a key of ``counters.ADMIN_STATES``) to a member; raises NotFound."""
        ...


def state_of(member: Member, up: bool | None = None) -> str:
    """The member's state as one word: the operator's hold wins over health, health over an ejection."""
    if member.admin == DISABLED:
        return "MAINT"
    if member.admin == DRAIN:
        return "DRAIN"
    if not (member.health.up if up is None else up):
        return "DOWN"
    return "EJECTED" if member.ejected else "UP"


def check_failures(probers: Sequence[Prober], pool: Pool, member: Member) -> dict[str, int]:
    """The member's failed checks by kind, every kind present, from its pool's prober (if it has one)."""
    prober = next((p for p in probers if p.pool is pool), None)
    found = prober.failures if prober is not None else {}
    return {kind.name.lower(): found.get((member.key, kind), 0) for kind in Failure}


class OpenBytes:
    """Bytes the sessions still open have moved so far, read from their pumps' own counters (which the
    data path keeps anyway) when asked: a scrape, or a worker's copy for the supervisor. A session's
    bytes join the listener's and member's totals as it ends (``frontend.py``) and leave this sum at
    the same moment, so totals that add the two include open sessions and never go backwards. Sessions
    of a listener a reload rebuilt count with its old counters, which are no longer shown: left out."""

    __slots__ = ("listeners", "members")

    def __init__(self, live: Iterable[Session]) -> None:
        self.listeners: dict[int, list[int]] = {}  # by id() of the session's Wiring: [in, out]
        self.members: dict[int, list[int]] = {}  # by id() of its member, once connected
        for session in live:
            sent, upstream = session.client.nbytes, session.upstream
            got = 0 if upstream is None else upstream.nbytes
            pair = self.listeners.setdefault(id(session.wiring), [0, 0])
            pair[0] += sent
            pair[1] += got
            if upstream is not None and session.member is not None:
                pair = self.members.setdefault(id(session.member), [0, 0])
                pair[0] += sent
                pair[1] += got

    def listener(self, frontend: Frontend) -> tuple[int, int]:
        """Bytes in and out of ``frontend``'s open sessions (every pool its SNI routes lead to)."""
        found = self.listeners
        pairs = [found[id(w)] for w in frontend.wirings if id(w) in found]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def member(self, member: Member) -> tuple[int, int]:
        pair = self.members.get(id(member))
        return (0, 0) if pair is None else (pair[0], pair[1])


def member_view(
    member: Member,
    started_at: float,
    check_failures: dict[str, int],
    active: int | None = None,
    up: bool | None = None,
    moving: tuple[int, int] = (0, 0),
) -> MemberView:
    """A member's facts; ``active`` and ``up`` override this process's (the workers' table knows better);
    ``moving``: its open sessions' bytes in and out (``OpenBytes``)."""
    stats = member.stats
    return MemberView(
        name=member.key,
        state=state_of(member, up),
        health="up" if (member.health.up if up is None else up) else "down",
        why=stats.why,
        since=stats.since or started_at,
        active=member.active if active is None else active,
        attempts=member.total,
        sessions=stats.sessions,
        connect_failures=dict(stats.connect_failures),
        checks_passed=stats.checks_passed,
        checks_failed=stats.checks_failed,
        check_failures=check_failures,
        last_check=stats.last_check,
        last_check_ok=stats.last_check_ok,
        last_check_seconds=stats.last_check_seconds,
        bytes_in=stats.bytes_in + moving[0],
        bytes_out=stats.bytes_out + moving[1],
        state_changes=stats.state_changes,
        ejections=stats.ejections,
        connects=stats.connects.view(),
        ejected_until=time.time() + member.outlier.until - time.monotonic() if member.ejected else None,
    )


def pool_view(pool: Pool, started_at: float, probers: Sequence[Prober], moving: OpenBytes) -> PoolView:
    members = tuple(
        member_view(m, started_at, check_failures(probers, pool, m), moving=moving.member(m)) for m in pool.members
    )
    return PoolView(pool.name, members, pool.retries, pool.no_upstream, queue_view(pool))


def edge_tables(
    config: ListenerConfig, tls: Mapping[str, int], refused: Mapping[str, int], header_errors: Mapping[str, int]
) -> dict[str, Any]:
    """A listener's TLS failures, refusals and PROXY header errors, each with every reason of its fixed
    table where the listener has the feature (so a rate can be taken before the first one), else empty."""
    gated = bool(config.allow or config.deny) or (config.max_connections_per_ip, config.rate_per_ip) != (None, None)
    return {
        "tls": config.tls is not None,
        "tls_failures": {r: tls.get(r, 0) for r in TLS_REASONS} if config.tls is not None else {},
        "refused": {r: refused.get(r, 0) for r in REFUSALS} if gated else {},
        "header_errors": {r: header_errors.get(r, 0) for r in HEADER_ERRORS} if config.accept_proxy else {},
    }


def listener_view(
    config: ListenerConfig,
    counters: ListenerCounters,
    listener: Listener,
    refused: Mapping[str, int],
    header_errors: Mapping[str, int],
    moving: tuple[int, int] = (0, 0),
) -> ListenerView:
    """A listener's facts; ``moving``: its open sessions' bytes in and out (``OpenBytes``)."""
    return ListenerView(
        name=config.name,
        address=str(config.address),
        pool=config.pool,
        accepted=listener.accepted,
        sessions=counters.sessions,
        active=counters.active,
        bytes_in=counters.bytes_in + moving[0],
        bytes_out=counters.bytes_out + moving[1],
        accept_pauses=listener.exhausted,
        durations=counters.durations.view(),
        **edge_tables(config, counters.tls_failures, refused, header_errors),
    )


def find_member(pools: Mapping[str, Pool], pool: str, member: str) -> tuple[Pool, Member]:
    """The pool called ``pool`` and its member whose key (or address) is ``member``."""
    found = pools.get(pool)
    if found is None:
        raise NotFound(f"no pool {pool!r}; known: {', '.join(sorted(pools))}")
    for candidate in found.members:
        if member in (candidate.key, candidate.name):
            return found, candidate
    raise NotFound(f"no member {member!r} in pool {pool!r}; known: {', '.join(m.key for m in found.members)}")


class ProxySource:
    """A ``Source`` over one process's ``Proxy``; ``timed``: it serves ``/metrics``, so the proxy keeps
    its histograms from now on (``Proxy.time_sessions``)."""

    def __init__(self, proxy: Proxy, timed: bool = True) -> None:
        self.proxy = proxy
        if timed:
            proxy.time_sessions()

    def snapshot(self) -> Snapshot:
        proxy = self.proxy
        moving = OpenBytes(proxy.table.live)
        listeners = tuple(
            listener_view(f.config, f.counters, f.listener, f.refused, f.header_errors, moving.listener(f))
            for f in proxy.frontends
        )
        pools = tuple(pool_view(pool, proxy.started_at, proxy.probers, moving) for pool in proxy.pools.values())
        return Snapshot(
            listeners,
            pools,
            proxy.started_at,
            time.time(),
            proxy.draining,
            proxy.config.workers,
            reloads=proxy.reloads,
            reloads_failed=proxy.reloads_failed,
            config_digest=config_digest(proxy.config),
        )

    def set_admin(self, pool: str, member: str, action: str) -> MemberView:
        found, target = find_member(self.proxy.pools, pool, member)
        found.set_admin(target, ADMIN_STATES[action])
        moving = OpenBytes(s for s in self.proxy.table.live if s.member is target).member(target)
        failures = check_failures(self.proxy.probers, found, target)
        return member_view(target, self.proxy.started_at, failures, moving=moving)


# --- renderings ------------------------------------------------------------------------------------


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def member_json(member: MemberView) -> dict[str, Any]:
    return {
        "name": member.name,
        "state": member.state,
        "health": member.health,
        "why": member.why,
        "since": _stamp(member.since),
        "active_sessions": member.active,
        "sessions": member.sessions,
        "connect_attempts": member.attempts,
        "connect_failures": member.connect_failures,
        "bytes_in": member.bytes_in,
        "bytes_out": member.bytes_out,
        "state_changes": member.state_changes,
        "ejections": member.ejections,
        "ejected_until": None if member.ejected_until is None else _stamp(member.ejected_until),
        "checks": {"passed": member.checks_passed, "failed": member.checks_failed, "failures": member.check_failures},
        "last_check": {
            "result": member.last_check or None,
            "ok": member.last_check_ok if member.last_check else None,
            "latency_ms": round(member.last_check_seconds * 1000, 3) if member.last_check else None,
        },
    }


def status(snap: Snapshot) -> dict[str, Any]:
    """``GET /status``: everything an operator looks at, as JSON-ready data."""
    listeners = [
        {
            "name": listener.name,
            "address": listener.address,
            "pool": listener.pool,
            "accepted": listener.accepted,
            "sessions": listener.sessions,
            "active_sessions": listener.active,
            "bytes_in": listener.bytes_in,
            "bytes_out": listener.bytes_out,
            "tls_failures": listener.tls_failures,
            "refused": listener.refused,
            "proxy_header_errors": listener.header_errors,
        }
        for listener in snap.listeners
    ]
    pools = [
        {
            "name": pool.name,
            "eligible_members": pool.eligible,
            "retries": pool.retries,
            "no_upstream": pool.no_upstream,
            "ejections": sum(m.ejections for m in pool.members),
            "ejected_members": sum(1 for m in pool.members if m.ejected_until is not None),
            "queue": {
                "waiting": pool.queue.waiting,
                "refused_full": pool.queue.full,
                "timed_out": pool.queue.timeouts,
                "timed_out_no_primary": pool.queue.no_primary,
                "served": pool.queue.served,
                "waited_seconds": pool.queue.waited_ms / 1000,
            },
            "members": [member_json(m) for m in pool.members],
        }
        for pool in snap.pools
    ]
    totals = {
        "sessions": sum(x.sessions for x in snap.listeners),
        "active_sessions": sum(x.active for x in snap.listeners),
        "bytes_in": sum(x.bytes_in for x in snap.listeners),
        "bytes_out": sum(x.bytes_out for x in snap.listeners),
        "members": sum(len(p.members) for p in snap.pools),
        "members_up": sum(p.eligible for p in snap.pools),
    }
    return {
        "version": snap.version,
        "started": _stamp(snap.started_at),
        "uptime_seconds": round(snap.now - snap.started_at, 3),
        "workers": snap.workers,
        "workers_alive": snap.workers_alive,
        "reloads": {"ok": snap.reloads, "failed": snap.reloads_failed},
        "config_digest": snap.config_digest,
        "draining": snap.draining,
        "ready": snap.ready,
        "listeners": listeners,
        "pools": pools,
        "totals": totals,
        **snap.extra,
    }


def status_lines(snap: Snapshot) -> list[str]:
    """SIGUSR1: one line per member, for hosts without the admin port."""
    lines = []
    for pool in snap.pools:
        for m in pool.members:
            check = f"{m.last_check} ({m.last_check_seconds * 1000:.1f} ms)" if m.last_check else "none"
            lines.append(
                f"status: pool {pool.name} member {m.name} {m.state} since {_stamp(m.since)} ({m.why});"
                f" active {m.active}, sessions {m.sessions}, last check {check}"
            )
    return lines


def log_status(source: Source) -> None:
    """SIGUSR1: the status of every member, one line each, to the log."""
    for line in status_lines(source.snapshot()):
        logging.getLogger("l4proxy").info("%s", line)
