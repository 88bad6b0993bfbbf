"""The counters the proxy keeps for ``/metrics`` and ``/status``: plain ints bumped where things happen.

The hot path only adds to ints in these objects; everything else (labels, text, JSON) is made at
scrape time by ``snapshot.py`` and ``metrics.py``. A total that follows from others is summed when read
instead of counted twice: past 256 an int's ``+=`` makes a new object, a few hundred instructions at
every session's start or end. So a listener counts the sessions that ended, and those begun are the
ended plus the open (``ListenerCounters.sessions``); a session's bytes are added once, to the ``Flow``
of its listener and member, whose sums are both the listener's bytes and the member's.

Labels are bounded, from fixed tables: failure causes are folded into a few kinds (``connect_kind``),
TLS handshake failures into ``TLS_REASONS`` (``tls_reason``: the common OpenSSL reasons by name, the
rest ``other``), the edge's refusals into ``REFUSALS`` (``edge.HEADER_ERRORS`` for PROXY headers); no
counter is keyed by a client's address.
Fixed tables also let ``--workers N`` keep every reason in its shared-memory rows.

Pure: no sockets, no event loop, no clock (times are given by the caller).
"""

from __future__ import annotations

from .histogram import CONNECT_BOUNDS, DURATION_BOUNDS, Histogram

CONNECT_KINDS = ("refused", "timeout", "dns", "tls", "reset", "other")
# Why client TLS handshakes failed: ours first, then OpenSSL's reasons (lower-case) that a client can
# cause, the likely ones: plaintext or an old protocol on a TLS port, no common cipher or ALPN, an mTLS
# client without a certificate or with one we refuse, or refusing ours.
TLS_REASONS = (
    "timeout",
    "client_reset",
    "client_closed",
    "http_request",
    "wrong_version_number",
    "unsupported_protocol",
    "tlsv1_alert_protocol_version",
    "no_shared_cipher",
    "no_application_protocol",
    "peer_did_not_return_a_certificate",
    "certificate_verify_failed",
    "tlsv1_alert_unknown_ca",
    "sslv3_alert_bad_certificate",
    "sslv3_alert_certificate_unknown",
    "unexpected_eof_while_reading",
    "other",
)
REFUSALS = ("deny", "not_allowed", "max_connections_per_ip", "rate_per_ip")  # edge.Edge.refused's keys

# A member's operator state (the admin API): "" is normal; HAProxy's "set server state" drain|maint.
READY, DRAIN, DISABLED = "", "drain", "disable"
ADMIN_STATES = {"enable": READY, "drain": DRAIN, "disable": DISABLED}


def connect_kind(cause: str) -> str:
    """The kind of a connect failure from its cause (``errors.failure_kind``): one of CONNECT_KINDS."""
    head = cause.split(":", 1)[0]
    return head if head in CONNECT_KINDS else "other"


def tls_reason(cause: str) -> str:
    """A TLS handshake failure's cause (``frontend._tls_failure``) as one of ``TLS_REASONS``."""
    if cause == "handshake timeout":
        return "timeout"
    if cause.startswith("the client reset"):
        return "client_reset"
    if cause.startswith("the client closed"):
        return "client_closed"
    words = "".join(c if c.isalnum() else "_" for c in cause.lower()).strip("_")
    return words if words in _TLS_NAMED else "other"


_TLS_NAMED = frozenset(TLS_REASONS)


class Flow:
    """The bytes of the ended sessions of one listener through one member, each way: added once per
    session, read as part of both the listener's and the member's totals."""

    __slots__ = ("bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.bytes_in = 0  # from clients to the member
        self.bytes_out = 0  # from the member to clients


class ListenerCounters:
    """One listener's sessions, bytes, TLS failures and session durations. ``sessions`` counts sessions
    begun (the client is accepted and, for TLS, its handshake done): those ended and those open. Bytes
    and the duration (from accept to end, as the access log's) are added when a session ends."""

    __slots__ = ("active", "durations", "ended", "flows", "timed", "tls_failures", "unconnected_in")

    def __init__(self) -> None:
        self.active = 0  # sessions open now
        self.ended = 0  # sessions ended so far
        self.flows: list[Flow] = []  # one per member its sessions reached, kept when the member is gone
        self.unconnected_in = 0  # bytes from clients whose session never reached a member
        self.tls_failures: dict[str, int] = {}
        self.durations = Histogram(DURATION_BOUNDS)
        self.timed = False  # durations are observed (Proxy.time_sessions: someone reads them)

    @property
    def sessions(self) -> int:
        """Sessions begun: a session is open from its start until it is counted as ended."""
        return self.ended + self.active

    @property
    def bytes_in(self) -> int:
        """Bytes read from the clients of ended sessions."""
        return self.unconnected_in + sum(flow.bytes_in for flow in self.flows)

    @property
    def bytes_out(self) -> int:
        """Bytes read from the upstreams of ended sessions."""
        return sum(flow.bytes_out for flow in self.flows)

    def tls_failed(self, cause: str) -> None:
        reason = tls_reason(cause)
        self.tls_failures[reason] = self.tls_failures.get(reason, 0) + 1


class MemberCounters:
    """What a member's metrics need beyond ``Member.active``/``total``: sessions that reached it,
    connect failures by kind, the time its connects took (those that succeeded), bytes each way (added
    as its sessions end), probe results, and when and why its state last changed."""

    __slots__ = (
        "checks_failed",
        "checks_passed",
        "connect_failures",
        "connects",
        "ejections",
        "flows",
        "last_check",
        "last_check_ok",
        "last_check_seconds",
        "last_check_time",
        "sessions",
        "since",
        "state_changes",
        "why",
    )

    def __init__(self, since: float = 0.0) -> None:
        self.sessions = 0
        self.flows: dict[ListenerCounters, Flow] = {}  # its ended sessions' bytes, by their listener
        self.connect_failures = dict.fromkeys(CONNECT_KINDS, 0)
        self.connects = Histogram(CONNECT_BOUNDS)  # seconds from an attempt's start to its connect, per session
        self.checks_passed = 0
        self.checks_failed = 0
        self.last_check = ""  # the last probe's result in words; "" before the first
        self.last_check_ok = False
        self.last_check_seconds = 0.0
        self.last_check_time = 0.0
        self.since = since  # wall-clock time of the last change of state (health or admin)
        self.why = "started"
        self.state_changes = 0  # changes of health or operator state
        self.ejections = 0  # times failed client connects ejected it (outlier.py)

    @property
    def bytes_in(self) -> int:
        """Bytes from the clients of its ended sessions to the member."""
        return sum(flow.bytes_in for flow in self.flows.values())

    @property
    def bytes_out(self) -> int:
        """Bytes from the member to the clients of its ended sessions."""
        return sum(flow.bytes_out for flow in self.flows.values())

    def flow(self, listener: ListenerCounters) -> Flow:
        """The flow of ``listener``'s sessions through this member, made at the first one to end."""
        flow = self.flows.get(listener)
        if flow is None:
            flow = self.flows[listener] = Flow()
            listener.flows.append(flow)
        return flow

    def connect_failed(self, cause: str) -> None:
        self.connect_failures[connect_kind(cause)] += 1

    def checked(self, ok: bool, result: str, seconds: float, now: float) -> None:
        if ok:
            self.checks_passed += 1
        else:
            self.checks_failed += 1
        self.last_check, self.last_check_ok = result, ok
        self.last_check_seconds, self.last_check_time = seconds, now

    def changed(self, why: str, now: float) -> None:
        self.why, self.since = why, now
        self.state_changes += 1
