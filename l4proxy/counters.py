"""The counters the proxy keeps for ``/metrics`` and ``/status``: plain ints bumped where things happen.

The hot path only adds to ints in these objects; everything else (labels, text, JSON) is made at
scrape time by ``snapshot.py`` and ``metrics.py``. Labels are bounded: failure causes are folded into
a few kinds (``connect_kind``), TLS failure reasons are kept up to ``MAX_REASONS`` distinct ones (the
rest count as ``other``), and no counter is keyed by a client's address.

Pure: no sockets, no event loop, no clock (times are given by the caller).
"""

from __future__ import annotations

CONNECT_KINDS = ("refused", "timeout", "dns", "tls", "reset", "other")
MAX_REASONS = 32  # distinct TLS failure reasons kept per listener; more count as "other"

# A member's operator state (the admin API): "" is normal; HAProxy's "set server state" drain|maint.
READY, DRAIN, DISABLED = "", "drain", "disable"
ADMIN_STATES = {"enable": READY, "drain": DRAIN, "disable": DISABLED}


def connect_kind(cause: str) -> str:
    """The kind of a connect failure from its cause (``errors.failure_kind``): one of CONNECT_KINDS."""
    head = cause.split(":", 1)[0]
    return head if head in CONNECT_KINDS else "other"


def tls_reason(cause: str) -> str:
    """A TLS handshake failure's cause as a label value: short, lower-case, no spaces."""
    if cause == "handshake timeout":
        return "timeout"
    if cause.startswith("the client reset"):
        return "client_reset"
    if cause.startswith("the client closed"):
        return "client_closed"
    words = "".join(c if c.isalnum() else "_" for c in cause.lower()).strip("_")
    return words[:48] or "other"


class ListenerCounters:
    """One listener's sessions, bytes and TLS failures. ``sessions`` counts sessions begun (the client
    is accepted and, for TLS, its handshake done); bytes are added when a session ends."""

    __slots__ = ("active", "bytes_in", "bytes_out", "sessions", "tls_failures")

    def __init__(self) -> None:
        self.sessions = 0
        self.active = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.tls_failures: dict[str, int] = {}

    def tls_failed(self, cause: str) -> None:
        reason = tls_reason(cause)
        failures = self.tls_failures
        if reason not in failures and len(failures) >= MAX_REASONS:
            reason = "other"
        failures[reason] = failures.get(reason, 0) + 1


class MemberCounters:
    """What a member's metrics need beyond ``Member.active``/``total``: sessions that reached it,
    connect failures by kind, probe results, and when and why its state last changed."""

    __slots__ = (
        "checks_failed",
        "checks_passed",
        "connect_failures",
        "last_check",
        "last_check_ok",
        "last_check_seconds",
        "last_check_time",
        "sessions",
        "since",
        "why",
    )

    def __init__(self, since: float = 0.0) -> None:
        self.sessions = 0
        self.connect_failures = dict.fromkeys(CONNECT_KINDS, 0)
        self.checks_passed = 0
        self.checks_failed = 0
        self.last_check = ""  # the last probe's result in words; "" before the first
        self.last_check_ok = False
        self.last_check_seconds = 0.0
        self.last_check_time = 0.0
        self.since = since  # wall-clock time of the last change of state (health or admin)
        self.why = "started"

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
