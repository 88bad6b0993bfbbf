"""Health-check kinds as pure conversations, the failure kinds they report, and the split-brain rule.

A check is a *conversation* with a member, written without I/O (as h11 is): ``start`` gives the bytes
to send first, ``feed`` takes what the member sent and gives the bytes to send next and, once it can
tell, a ``Verdict``. ``prober.py`` does the I/O for every kind the same way: connect (TLS when the pool
originates it), write, read, feed, until a verdict, an EOF (``closed``) or the probe timeout
(``stalled``: a verdict from what arrived, or None for a plain timeout).

Failures fall into the kinds of ``Failure`` (refused, timeout, wrong role, auth failed, bad reply, a
server error reply, TLS, other), so logs and counters tell them apart.

Split-brain (``SplitBrain``): in a pool whose check is a ``*-primary`` kind, more than one member UP
means more than one claims the primary role; that is reported once per episode, and the episode ends
when at most one claims it.

Pure: no sockets, no event loop. The kinds of other modules (``resp.RedisCheck``,
``pgwire.PostgresCheck``, ``httpcheck.HttpCheck``) follow the same ``Conversation`` protocol.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from .errors import ConfigError, failure_kind

KINDS = ("tcp", "send-expect", "http", "redis", "redis-primary", "postgres", "postgres-primary")
PRIMARY_KINDS = frozenset({"redis-primary", "postgres-primary"})
AUTH_KINDS = frozenset({"redis", "redis-primary", "postgres", "postgres-primary"})
MATCHES = ("prefix", "contains", "regex")
REPLY_LIMIT = 65536  # a reply that has not matched by this size never will, for a health check


class Failure(enum.Enum):
    """Why a check failed, as logs and counters name it."""

    REFUSED = "refused"
    TIMEOUT = "timeout"
    WRONG_ROLE = "wrong role"
    AUTH_FAILED = "auth failed"
    BAD_REPLY = "bad reply"
    SERVER_ERROR = "server error"  # a well-formed error reply that is not about credentials or role
    TLS = "tls"
    OTHER = "error"  # reset, DNS and other OS errors


@dataclass(frozen=True, slots=True)
class Verdict:
    """A check's result: passed, or the failure kind with a short detail."""

    failure: Failure | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def reason(self) -> str:
        """The text the health log shows: ``check passed`` or ``check failed: KIND[: detail]``."""
        if self.failure is None:
            return "check passed"
        return f"check failed: {self.failure.value}" + (f": {self.detail}" if self.detail else "")


PASSED = Verdict()
Step = tuple[bytes, Verdict | None]  # bytes to send next, and the verdict once it is known


class Conversation(Protocol):
    """One probe's exchange with a member, without I/O."""

    def start(self) -> Step:
        """What to send once connected (and a verdict when the connect alone decides)."""
        ...

    def feed(self, data: bytes) -> Step:
        """Bytes the member sent; what to send next and the verdict once it is known."""
        ...

    def closed(self) -> Verdict:
        """The member closed before a verdict."""
        ...

    def stalled(self) -> Verdict | None:
        """The probe timed out: a verdict from what arrived, or None for a plain timeout."""
        ...


def from_exception(exc: BaseException) -> Verdict:
    """The verdict for a connect or I/O failure."""
    kind = failure_kind(exc)
    if kind in ("refused", "timeout"):
        return Verdict(Failure(kind))
    if kind.startswith("tls: "):
        return Verdict(Failure.TLS, kind[5:])
    return Verdict(Failure.OTHER, kind)


class Connect:
    """``tcp``: the connect (and TLS handshake) is the whole check."""

    def start(self) -> Step:
        return b"", PASSED

    def feed(self, data: bytes) -> Step:
        return b"", PASSED

    def closed(self) -> Verdict:
        return PASSED

    def stalled(self) -> Verdict | None:
        return None


class SendExpect:
    """``send-expect``: send bytes, then the reply must start with, contain, or match (a regex) ``expect``."""

    def __init__(self, send: bytes, expect: bytes, match: str = "prefix") -> None:
        self.send = send
        self.expect = expect
        self.match = match
        self.pattern = re.compile(expect) if match == "regex" else None
        self.reply = b""

    def start(self) -> Step:
        return self.send, None if self.expect else PASSED

    def feed(self, data: bytes) -> Step:
        self.reply += data
        if self.match == "prefix":
            if len(self.reply) < len(self.expect):
                return b"", None
            return b"", PASSED if self.reply.startswith(self.expect) else self._wrong()
        if self.expect in self.reply if self.pattern is None else self.pattern.search(self.reply):
            return b"", PASSED
        return b"", self._wrong() if len(self.reply) >= REPLY_LIMIT else None

    def closed(self) -> Verdict:
        return self._wrong()

    def stalled(self) -> Verdict | None:
        return self._wrong() if self.reply else None

    def _wrong(self) -> Verdict:
        shown = self.reply[: len(self.expect) if self.match == "prefix" else 40]
        how = {"prefix": "expected", "contains": "expected it to contain", "regex": "expected a match for"}
        return Verdict(Failure.BAD_REPLY, f"{shown!r}, {how[self.match]} {self.expect!r}")


# --- settings --------------------------------------------------------------------------------------


def parse_status(text: str) -> tuple[tuple[int, int], ...]:
    """Status ranges from ``2xx``, ``200``, ``200-299`` or a comma-separated list of them."""
    ranges = []
    for part in text.split(","):
        part = part.strip().lower()
        if re.fullmatch(r"[1-5]xx", part):
            low = int(part[0]) * 100
            ranges.append((low, low + 99))
        elif match := re.fullmatch(r"([1-5]\d\d)(?:-([1-5]\d\d))?", part):
            low, high = int(match[1]), int(match[2] or match[1])
            if high < low:
                raise ValueError(f"range {part!r} runs backwards")
            ranges.append((low, high))
        else:
            raise ValueError("expected statuses such as 2xx, 200, 200-299 or a comma-separated list")
    return tuple(ranges)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a check logs in with; an empty user means none (Redis ``AUTH password``)."""

    user: str = ""
    password: str = ""
    database: str = ""


def parse_credentials(text: str, kind: str) -> Credentials:
    """Credentials from a file's text: its first non-blank line, fields split by blanks.

    Redis: ``password`` or ``user password``. PostgreSQL: ``user database [password]`` (no password:
    trust). The last field is the rest of the line, so a password may contain blanks (in Redis only in
    the two-field form). Raises ValueError with the problem."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ValueError("is empty; expected " + _CREDENTIAL_FORMS[kind.split("-")[0]])
    if len(lines) > 1:
        raise ValueError("has more than one line; expected " + _CREDENTIAL_FORMS[kind.split("-")[0]])
    if kind.startswith("redis"):
        fields = lines[0].split(None, 1)
        return Credentials(password=fields[0]) if len(fields) == 1 else Credentials(fields[0], fields[1])
    fields = lines[0].split(None, 2)
    if len(fields) < 2:
        raise ValueError("names only a user; expected " + _CREDENTIAL_FORMS["postgres"])
    return Credentials(fields[0], fields[2] if len(fields) > 2 else "", fields[1])


_CREDENTIAL_FORMS = {"redis": "'password' or 'user password'", "postgres": "'user database [password]'"}


def load_credentials(path: str, kind: str) -> Credentials:
    """The credentials in the file at ``path``; a ConfigError (path ``auth``) names the file and the problem."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(4096)
    except OSError as exc:
        raise ConfigError("auth", path, exc.strerror or str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigError("auth", path, "is not UTF-8 text") from None
    try:
        return parse_credentials(text, kind)
    except ValueError as exc:
        raise ConfigError("auth", path, str(exc)) from None


def validate(
    *, check: str | None, kind: str, send: bytes, expect: bytes, expect_match: str,
    path: str | None, port: int | None, status: str | None, auth: str | None,
) -> None:  # fmt: skip
    """The rules between HealthConfig's check fields; a ConfigError names the field that is wrong."""
    if check is not None and check not in KINDS:
        raise ConfigError("check", check, f"expected one of {', '.join(KINDS)}")
    if expect_match not in MATCHES:
        raise ConfigError("expect_match", expect_match, f"expected one of {', '.join(MATCHES)}")
    if kind == "send-expect":
        if not (send or expect):
            raise ConfigError("check", check, "send-expect needs a payload to send or a reply to expect")
    else:
        for name, value in (("send", send), ("expect", expect)):
            if value:
                raise ConfigError(name, value, f"applies only to the send-expect check, not {kind}")
    if expect_match != "prefix":
        if kind != "send-expect" or not expect:
            raise ConfigError("expect_match", expect_match, "applies only to the send-expect check with a reply")
        if expect_match == "regex":
            try:
                re.compile(expect)
            except re.error as exc:
                raise ConfigError("expect", expect, f"is not a regular expression: {exc}") from None
    if kind != "http":
        http: tuple[tuple[str, object], ...] = (("path", path), ("port", port), ("status", status))
        for name, given in http:
            if given is not None:
                raise ConfigError(name, given, f"applies only to the http check, not {kind}")
    if path is not None and not path.startswith("/"):
        raise ConfigError("path", path, "expected a path starting with '/'")
    if port is not None and (type(port) is not int or not 1 <= port <= 65535):
        raise ConfigError("port", port, "must be 1..65535")
    if status is not None:
        try:
            parse_status(status)
        except ValueError as exc:
            raise ConfigError("status", status, str(exc)) from None
    if auth is not None and kind not in AUTH_KINDS:
        raise ConfigError("auth", auth, f"applies only to the redis and postgres checks, not {kind}")
    if auth is None and kind.startswith("postgres"):
        raise ConfigError("check", check, "the postgres checks need a credentials file (auth) naming user and database")


# --- split-brain -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Episode:
    """A change of the split-brain state: it began (with the claimants) or ended."""

    began: bool
    claimants: tuple[str, ...]


class SplitBrain:
    """Tells when more than one member claims the primary role: one ``Episode`` when that begins,
    one when it ends (at most one claimant again); nothing while it lasts, even as claimants change."""

    __slots__ = ("active", "episodes")

    def __init__(self) -> None:
        self.active = False
        self.episodes = 0  # how many have begun, for metrics

    def observe(self, claimants: Collection[str]) -> Episode | None:
        """The members that claim the primary role now; the Episode when the state changes."""
        split = len(claimants) > 1
        if split == self.active:
            return None
        self.active = split
        self.episodes += split
        return Episode(split, tuple(sorted(claimants)))
