"""The whole configuration as frozen dataclasses, plus parsers for the textual forms users type.

Every dataclass validates itself in ``__post_init__``, so an invalid Config cannot be built: the I/O
layers never re-check values. Errors are ``ConfigError``s naming the field, the value and what was
expected; a dataclass names its own field (``interval``) and :func:`from_tree`, which builds the whole
tree from plain data (flags, or a config file through ``configfile``), places it
(``pools.default.health.interval``, ``listeners[0].tls.cert``); the CLI maps those paths to its flags.
Nothing here touches sockets or the event loop.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

from . import checks
from .acl import parse_cidr
from .errors import ConfigError
from .outlier import OutlierPolicy
from .sniroutes import parse_pattern

# --- textual forms ---------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$", re.ASCII)  # '٣' is no digit here
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str, field_name: str) -> float:
    """Seconds from ``250ms``, ``5s``, ``1m``, ``1h`` or a plain number of seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(field_name, text, "expected a duration such as 250ms, 5s, 1m, 1h or 2.5")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds):  # hundreds of digits overflow to inf: no wait may be infinite
        raise ConfigError(field_name, text, "is too large")
    return seconds


def _parse_port(text: str, whole: str, field_name: str) -> int:
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):  # str.isdigit alone accepts '²', which int() rejects
        raise ConfigError(field_name, whole, f"port {text!r} is not a number")
    port = int(text) if len(text) <= 5 else 0  # int() refuses over 4300 digits with a ValueError
    if not 1 <= port <= 65535:
        raise ConfigError(field_name, whole, "port must be 1..65535")
    return port


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _canonical_host(host: str) -> str | None:
    """``host`` with an IP literal in canonical form; None when it is neither an IP nor a host name."""
    if not host:
        return host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    return host if all(_LABEL.fullmatch(label) for label in host.rstrip(".").split(".")) else None


def _check_host(host: str, whole: str, field_name: str) -> str:
    canonical = _canonical_host(host)
    if canonical is None:
        raise ConfigError(field_name, whole, f"{host!r} is not a valid host name or IP address")
    return canonical


def parse_address(text: str, field_name: str, default_port: int | None = None) -> Address:
    """Parse ``host:port``, ``:port``, ``[v6]:port``, ``host`` or a bare IPv6 literal.

    ``default_port`` fills in a missing port; without one a port is required.
    """
    text = text.strip()
    if not text:
        raise ConfigError(field_name, text, "address is empty")
    if "://" in text:
        raise ConfigError(field_name, text, "a URL scheme is not allowed here; give HOST:PORT")
    if any(c.isspace() for c in text):
        raise ConfigError(field_name, text, "an address has no spaces in it")
    host, port_text = _split_host_port(text, field_name)
    host = _check_host(host, text, field_name)
    if port_text is None:
        if default_port is None:
            raise ConfigError(field_name, text, "a port is required, as HOST:PORT or :PORT")
        return Address(host, default_port)
    return Address(host, _parse_port(port_text, text, field_name))


def _split_host_port(text: str, field_name: str) -> tuple[str, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(field_name, text, "missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(field_name, text, f"{host!r} is not an IPv6 address") from None
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ConfigError(field_name, text, "expected ':PORT' after ']'")
        return host, rest[1:]
    if text.count(":") > 1:
        try:
            return str(ipaddress.IPv6Address(text)), None
        except ValueError:
            raise ConfigError(field_name, text, "IPv6 addresses with a port need brackets: [::1]:6379") from None
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


def member_texts(texts: list[str] | tuple[str, ...], field_name: str) -> list[str]:
    """Each member as typed, from repeated and/or comma-separated values."""
    parts: list[str] = []
    for text in texts:
        for part in text.split(","):
            part = part.strip()
            if not part:
                raise ConfigError(field_name, text, "empty member in the list")
            if any(c.isspace() for c in part):
                raise ConfigError(field_name, text, "separate members with commas, not spaces")
            parts.append(part)
    if not parts:
        raise ConfigError(field_name, None, "at least one upstream is required")
    return parts


SRV_PREFIX = "srv:"


def parse_target(text: str, field_name: str, default_port: int) -> Address | Service:
    """Where a member is: ``HOST[:PORT]``, or ``srv:NAME`` (a DNS SRV name; its records give the ports)."""
    if not text.lower().startswith(SRV_PREFIX):
        return parse_address(text, field_name, default_port)
    name = text[len(SRV_PREFIX) :]
    if not name or _canonical_host(name) is None or is_ip(name):
        raise ConfigError(field_name, text, "expected srv:NAME with a DNS name, such as srv:_redis._tcp.example.com")
    return Service(name)


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP literal (never resolved) rather than a DNS name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_members(
    texts: list[str] | tuple[str, ...], field_name: str, default_port: int
) -> tuple[MemberConfig, ...]:
    """Members from repeated and/or comma-separated ``HOST[:PORT][;OPTION...]`` or ``srv:NAME[;OPTION...]``."""
    return tuple(parse_member(part, field_name, default_port) for part in member_texts(texts, field_name))


MEMBER_OPTIONS = "weight=N, max_conns=N, backup"


def parse_member(text: str, field_name: str, default_port: int) -> MemberConfig:
    """One member spec: ``HOST[:PORT]`` or ``srv:NAME``, then options after semicolons
    (``redis-a:6379;weight=3;backup``).

    Every error echoes the whole spec as typed, so it names the member, then the option and its problem."""
    address_text, *option_texts = text.split(";")
    try:
        address = parse_target(address_text, field_name, default_port)
    except ConfigError as exc:
        raise ConfigError(field_name, text, exc.problem) from None
    options: dict[str, Any] = {}
    for typed in (option.strip() for option in option_texts):
        name, sep, value = typed.partition("=")
        name, value = name.strip(), value.strip()
        if not typed:
            raise ConfigError(field_name, text, "empty member option between semicolons")
        if name in options:
            raise ConfigError(field_name, text, f"{typed}: {name} is given twice")
        if name == "backup" and not sep:
            options[name] = True
        elif name == "backup":
            raise ConfigError(field_name, text, f"{typed}: backup takes no value")
        elif name in ("weight", "max_conns") and value.isascii() and value.isdigit():
            options[name] = int(value)
        elif name in ("weight", "max_conns"):
            expected = WEIGHTS if name == "weight" else "1 or more"
            raise ConfigError(field_name, text, f"{typed}: must be a whole number {expected}")
        else:
            raise ConfigError(field_name, text, f"{typed}: unknown member option; known: {MEMBER_OPTIONS}")
    try:
        return MemberConfig(address, **options)
    except ConfigError as exc:
        raise ConfigError(field_name, text, f"{exc.path}={exc.value}: {exc.problem}") from None


# A lone ``x`` alternative catches a short \x; scanning pairs left to right keeps ``\\x41`` literal.
_ESCAPE = re.compile(rb"\\(x[0-9A-Fa-f]{2}|x|[rnt0\\])")
_SIMPLE_ESCAPES = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"0": b"\0", b"\\": b"\\"}


def parse_escapes(text: str, field_name: str) -> bytes:
    r"""Bytes from text with ``\r \n \t \0 \\ \xNN`` escapes (a probe payload such as ``PING\r\n``)."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(field_name, text, "is not valid text") from None

    def replace(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code == b"x":
            raise ConfigError(field_name, text, r"\x needs two hex digits, as in \x0d")
        return bytes([int(code[1:], 16)]) if code[:1] == b"x" else _SIMPLE_ESCAPES[code]

    return _ESCAPE.sub(replace, raw)


# --- the configuration tree ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """A host (name or IP; empty means every interface) and a port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or _canonical_host(self.host) is None:
            raise ConfigError("host", self.host, "is not a valid host name or IP address")
        if type(self.port) is not int or not 0 <= self.port <= 65535:  # 0: any free port, for a listener
            raise ConfigError("port", self.port, "must be a number 0..65535")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def hostname(self) -> str:
        """The name TLS sends as SNI and checks the certificate against: the host as configured."""
        return self.host


@dataclass(frozen=True, slots=True)
class Resolved(Address):
    """An address that DNS name ``name`` resolved to: dialed by IP (``host``), but keyed, logged and
    verified (TLS) by the name, so the same IP under two names is two members. ``weight`` is an SRV
    record's weight (1 for A/AAAA answers)."""

    name: str = ""
    weight: int = 1

    def __str__(self) -> str:
        return f"{self.name}@{Address.__str__(self)}"

    @property
    def hostname(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Service:
    """A member given as a DNS SRV name (``srv:_redis._tcp.cache.svc.cluster.local``): its records
    name the targets, their ports, priorities and weights; discovery expands it into addresses."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or _canonical_host(self.name) is None:
            raise ConfigError("name", self.name, "is not a valid DNS name")

    def __str__(self) -> str:
        return f"{SRV_PREFIX}{self.name}"


WEIGHT_MAX = 256
ON_MEMBER_DOWN = ("keep", "close")
WEIGHTS = f"1..{WEIGHT_MAX}"


@dataclass(frozen=True, slots=True)
class MemberConfig:
    """One pool member: where it is (its key is ``host:port``) and how much traffic it may take.

    ``weight`` scales its share under least-connections (1..256); ``max_conns`` caps its sessions across
    all workers (None: no cap); a ``backup`` member gets sessions only while no other member can take one.
    A member given as a DNS name (a host name, or a ``Service``) stands for every address it resolves to,
    and its settings apply to each of them: each address has the weight, its own max_conns and the role;
    an SRV record's weight multiplies the configured one (``Resolved.weight``).
    """

    address: Address | Service
    weight: int = 1
    max_conns: int | None = None
    backup: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.address, Address | Service):
            raise ConfigError("address", self.address, "expected HOST:PORT or srv:NAME")
        if type(self.weight) is not int or not 1 <= self.weight <= WEIGHT_MAX:
            raise ConfigError("weight", self.weight, f"must be a whole number {WEIGHTS}")
        if self.max_conns is not None and (type(self.max_conns) is not int or self.max_conns < 1):
            raise ConfigError("max_conns", self.max_conns, "must be a whole number 1 or more")
        if type(self.backup) is not bool:
            raise ConfigError("backup", self.backup, "must be true or false")

    def __str__(self) -> str:
        return str(self.address)


def as_member(member: MemberConfig | Address | Service) -> MemberConfig:
    """``member`` as a MemberConfig: a bare address or name is a member with the default weight, no cap."""
    return member if isinstance(member, MemberConfig) else MemberConfig(member)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(name, value, "must be greater than 0")


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active probes (every ``interval`` with jitter) and the rise/fall thresholds.

    A probe is a TCP connect, then the conversation of ``check`` (``checks.KINDS``; unset: send-expect
    when ``send`` or ``expect`` are set, else tcp): ``send``/``expect``/``expect_match``, an HTTP
    ``GET path`` on ``port`` passing on ``status``, or a Redis or PostgreSQL login with the credentials
    in the file ``auth``. Failed connects of real clients do not count here: they feed outlier ejection
    (``PoolConfig.eject_after``, ``outlier.py``).
    """

    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    send: bytes = b""
    expect: bytes = b""
    enabled: bool = True
    check: str | None = None
    expect_match: str = "prefix"
    path: str | None = None  # http: "/" when unset
    port: int | None = None  # http: the member's port when unset
    status: str | None = None  # http: "2xx" when unset
    auth: str | None = None

    @property
    def kind(self) -> str:
        """The check kind in force."""
        return self.check or ("send-expect" if self.send or self.expect else "tcp")

    def __post_init__(self) -> None:
        checks.validate(
            check=self.check, kind=self.kind, send=self.send, expect=self.expect, expect_match=self.expect_match,
            path=self.path, port=self.port, status=self.status, auth=self.auth,
        )  # fmt: skip
        _positive("interval", self.interval)
        _positive("timeout", self.timeout)
        if self.rise < 1:
            raise ConfigError("rise", self.rise, "must be at least 1")
        if self.fall < 1:
            raise ConfigError("fall", self.fall, "must be at least 1")


@dataclass(frozen=True, slots=True)
class ServerTLSConfig:
    """TLS termination on a listener: our certificates, and optionally client certificates to require.

    ``cert`` and ``key`` are pairs in order (HAProxy's crt-list): the first certificate is the default,
    the others are chosen by the SNI name a client asks for. A single path may be given as a string; it
    is kept as a one-element tuple. ``ciphers`` replaces the TLS 1.2 cipher list (OpenSSL syntax; the
    TLS 1.3 suites are OpenSSL's, which Python's ssl cannot change); ``None`` keeps the default list.
    """

    cert: tuple[str, ...] | str
    key: tuple[str, ...] | str
    client_ca: str | None = None
    alpn: tuple[str, ...] = ()
    handshake_timeout: float = 10.0
    min_version: str = "1.2"
    ciphers: str | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not isinstance(value, tuple) or not value or not all(isinstance(v, str) for v in value):
                raise ConfigError(name, value, "expected a file path, or a list of them")
        if len(self.cert) != len(self.key):
            certs, keys = len(self.cert), len(self.key)
            given = f"{certs} certificate{'s' * (certs != 1)} and {keys} key{'s' * (keys != 1)}"
            raise ConfigError("key", None, f"expected one key per certificate, in the same order; got {given}")
        _positive("handshake_timeout", self.handshake_timeout)
        if self.min_version not in TLS_VERSIONS:
            raise ConfigError("min_version", self.min_version, f"expected {' or '.join(TLS_VERSIONS)}")
        if self.ciphers is not None:
            if not self.ciphers.strip():
                raise ConfigError("ciphers", self.ciphers, "expected an OpenSSL cipher list, such as ECDHE+AESGCM")
            if self.min_version == "1.3":
                problem = "sets TLS 1.2 ciphers, which a minimum version of 1.3 never uses"
                raise ConfigError("ciphers", self.ciphers, problem)

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """(certificate, key) paths in order; the first is the default."""
        return tuple(zip(self.cert, self.key, strict=True))


@dataclass(frozen=True, slots=True)
class UpstreamTLSConfig:
    """TLS origination to members; verification is on unless ``insecure``."""

    ca: str | None = None
    sni: str | None = None
    cert: str | None = None
    key: str | None = None
    alpn: tuple[str, ...] = ()
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            missing = "key" if self.key is None else "cert"
            raise ConfigError(missing, None, "a client certificate needs both a cert and a key")
        if self.sni is not None and (not self.sni or _canonical_host(self.sni) is None):  # else every dial fails
            raise ConfigError("sni", self.sni, "expected a host name or IP address")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A named set of members with its balancing, retry and health settings.

    Members given as DNS names (``Address`` with a host name, or ``Service``) are resolved again every
    ``resolve_interval``; an empty answer replaces the last good one only once every answer for
    ``resolve_empty_after`` was empty (``discovery.py``).
    """

    members: tuple[MemberConfig, ...]  # an Address or Service given here is a member with the defaults
    name: str = "default"
    retries: int = 2
    connect_timeout: float = 5.0
    health: HealthConfig = field(default_factory=HealthConfig)
    tls: UpstreamTLSConfig | None = None
    resolve_interval: float = 10.0
    resolve_empty_after: float = 30.0
    send_proxy: str | None = None  # 'v1' or 'v2': a PROXY protocol header before any byte to a member
    drain_protocol: str | None = None  # how --drain-at safe reads sessions; None: as the health check's kind
    split_brain: str = "fail-closed"  # with a *-primary check and several claimants: route to none, or the newest
    slow_start: float = 0.0  # seconds a member back UP takes to ramp from 10% to its full share; 0: off
    retry_budget: int = 20  # retries in flight may be this percent of the dials in flight (3 at least)
    panic_threshold: int = 0  # percent of members UP below which health is ignored; 0: off
    on_member_down: str | None = None  # 'keep' a DOWN member's sessions or 'close' them; None: close if *-primary
    queue_timeout: float | None = None  # longest wait for a member below its max_conns; None: connect_timeout
    max_queue: int = 1024  # clients that may wait at once (per process); 0: none wait, all are refused
    eject_after: int = 5  # local-origin failures in a row that eject a member (outlier.py)
    eject_time: float = 30.0  # the first ejection's length; the k-th in a row lasts k times as long...
    max_eject_time: float = 300.0  # ...up to this
    max_ejected_percent: int = 50  # of the pool's members, at most, ejected at once (one always may be)

    @property
    def outlier(self) -> OutlierPolicy:
        """The ejection settings, as ``outlier.py`` takes them."""
        return OutlierPolicy(self.eject_after, self.eject_time, self.max_eject_time, self.max_ejected_percent)

    @property
    def watched_as(self) -> str | None:
        """The protocol ``--drain-at safe`` reads this pool's sessions in: ``drain_protocol``, else the
        health check's (``redis*``, ``postgres*``); None when there is none to read."""
        if self.drain_protocol is not None:
            return self.drain_protocol
        kind = self.health.kind
        return next((p for p in DRAIN_PROTOCOLS if kind.startswith(p)), None)

    def __post_init__(self) -> None:
        if self.drain_protocol is not None and self.drain_protocol not in DRAIN_PROTOCOLS:
            raise ConfigError("drain_protocol", self.drain_protocol, f"expected {' or '.join(DRAIN_PROTOCOLS)}")
        if self.split_brain not in SPLIT_BRAIN:
            raise ConfigError("split_brain", self.split_brain, f"expected {' or '.join(SPLIT_BRAIN)}")
        if self.split_brain != "fail-closed" and self.health.kind not in checks.PRIMARY_KINDS:
            problem = f"applies only to a pool with a *-primary health check, not {self.health.kind}"
            raise ConfigError("split_brain", self.split_brain, problem)
        if self.send_proxy is not None and self.send_proxy not in PROXY_VERSIONS:
            raise ConfigError("send_proxy", self.send_proxy, f"expected {' or '.join(PROXY_VERSIONS)}")
        if not self.members:
            raise ConfigError("members", None, "at least one upstream is required")
        _positive("resolve_interval", self.resolve_interval)
        _positive("resolve_empty_after", self.resolve_empty_after)
        object.__setattr__(self, "members", tuple(as_member(m) for m in self.members))
        for index, member in enumerate(self.members):
            if isinstance(member.address, Service):
                continue
            if not member.address.host:
                raise ConfigError(f"members[{index}]", str(member), "an upstream needs a host")
            if not member.address.port:
                raise ConfigError(f"members[{index}]", str(member), "an upstream needs a port")
        if self.retries < 0:
            raise ConfigError("retries", self.retries, "must be 0 or more")
        _positive("connect_timeout", self.connect_timeout)
        if not self.slow_start >= 0:
            raise ConfigError("slow_start", self.slow_start, "must be 0 (off) or more")
        if type(self.retry_budget) is not int or not 0 <= self.retry_budget <= 100:
            raise ConfigError("retry_budget", self.retry_budget, "must be a percent, 0..100")
        if self.on_member_down is None:  # a demoted primary's clients must move to the new one
            object.__setattr__(self, "on_member_down", "close" if self.health.kind in checks.PRIMARY_KINDS else "keep")
        if self.on_member_down not in ON_MEMBER_DOWN:
            raise ConfigError("on_member_down", self.on_member_down, f"expected {' or '.join(ON_MEMBER_DOWN)}")
        if type(self.panic_threshold) is not int or not 0 <= self.panic_threshold <= 100:
            raise ConfigError("panic_threshold", self.panic_threshold, "must be a percent, 0..100 (0: off)")
        if self.queue_timeout is not None:
            _positive("queue_timeout", self.queue_timeout)
        if type(self.max_queue) is not int or self.max_queue < 0:
            raise ConfigError("max_queue", self.max_queue, "must be 0 (no queue) or more")
        if type(self.eject_after) is not int:
            raise ConfigError("eject_after", self.eject_after, "must be a whole number, at least 1")
        if type(self.max_ejected_percent) is not int:
            raise ConfigError("max_ejected_percent", self.max_ejected_percent, "must be a percent, 0..100")
        self.outlier  # noqa: B018 - checks the numbers (OutlierPolicy raises ConfigError)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """Where clients connect, which pool serves them, the per-session timeouts and buffer, and who may
    connect (``edge.py``): a PROXY header to read first (``accept_proxy``, from every peer or only
    from those in ``accept_proxy_from``), CIDR ``allow``/``deny`` rules and per-source limits.
    Ranges are kept as canonical text (``10.0.0.0/8``), checked here.

    ``sni`` routes TLS clients by the server name of their ClientHello (``sniroutes.py``), without
    terminating TLS: ``(pattern, pool)`` pairs, given as a mapping or pairs, kept with canonical
    patterns; ``pool`` then serves the names no route matches and clients without SNI, unless
    ``sni_strict`` refuses them. A client gets ``sni_timeout`` to send its whole ClientHello."""

    address: Address
    pool: str = "default"
    idle_timeout: float = 3600.0
    half_closed_timeout: float = 30.0
    buffer_size: int = 65536
    tls: ServerTLSConfig | None = None
    backlog: int = 1024
    reuse_port: bool = False  # SO_REUSEPORT, so several worker processes can each bind the address
    relay: str = "auto"  # engine: 'auto' (bulky plain-TCP sessions switch to splice), 'splice', 'transport'
    name: str = "default"  # its table key in a config file
    accept_proxy: bool = False
    accept_proxy_from: tuple[str, ...] = ()  # empty: every peer must send a header
    proxy_timeout: float = 5.0
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    max_connections_per_ip: int | None = None
    rate_per_ip: int | None = None  # connections a second, with a burst of as many
    sni: tuple[tuple[str, str], ...] = ()
    sni_strict: bool = False
    sni_timeout: float = 10.0
    max_connections: int | None = None  # sessions at once; None: as many as the open-files limit allows
    tcp_keepalive: float = 60.0  # idle seconds before TCP keepalive probes, on both sides; 0: off
    max_session_duration: float = 0.0  # sessions older are closed when quiet, or at 110% at most; 0: off

    def __post_init__(self) -> None:
        for name in ("accept_proxy_from", "allow", "deny"):
            object.__setattr__(self, name, _ranges(getattr(self, name), name))
        object.__setattr__(self, "sni", _routes(self.sni))
        if self.sni and self.tls is not None:
            raise ConfigError(
                "sni", None, "routes TLS through untouched, so it cannot be combined with tls (termination)"
            )
        if self.sni_strict and not self.sni:
            raise ConfigError("sni_strict", self.sni_strict, "needs sni routes")
        _positive("sni_timeout", self.sni_timeout)
        if self.accept_proxy_from and not self.accept_proxy:
            raise ConfigError("accept_proxy_from", list(self.accept_proxy_from), "needs accept_proxy")
        _positive("proxy_timeout", self.proxy_timeout)
        for name in ("max_connections_per_ip", "rate_per_ip"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ConfigError(name, value, "must be at least 1")
        _positive("idle_timeout", self.idle_timeout)
        _positive("half_closed_timeout", self.half_closed_timeout)
        if self.buffer_size < 1024:
            raise ConfigError("buffer_size", self.buffer_size, "must be at least 1024 bytes")
        if self.relay not in RELAY_ENGINES:
            raise ConfigError("relay", self.relay, f"expected one of {', '.join(RELAY_ENGINES)}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError("max_connections", self.max_connections, "must be 1 or more")
        if not self.max_session_duration >= 0:
            raise ConfigError("max_session_duration", self.max_session_duration, "must be 0 (off) or more")
        if not 0 <= self.tcp_keepalive <= 32767:  # the kernel's bound for TCP_KEEPIDLE
            raise ConfigError("tcp_keepalive", self.tcp_keepalive, "must be 0 (off) to 32767s")


@dataclass(frozen=True, slots=True)
class Config:
    """Listeners, the pools they use, and process-wide settings."""

    listeners: tuple[ListenerConfig, ...]
    pools: tuple[PoolConfig, ...]
    drain_timeout: float = 30.0
    shutdown_delay: float = 0.0  # on SIGTERM, not ready but still accepting for this long, then the drain
    access_log: str = "-"  # "-" (stdout), "off", a file path, syslog:HOST:PORT or syslog:/PATH
    access_log_format: str = "logfmt"  # one of ACCESS_LOG_FORMATS
    drain_at: str = "now"  # 'now': drained sessions close at drain_timeout; 'safe': at a protocol-safe moment first
    log_level: str = "info"
    workers: int = 1  # processes accepting on the listeners (SO_REUSEPORT), under one supervisor
    admin: Address | None = None  # where the admin API and /metrics listen; None: off

    def __post_init__(self) -> None:
        if not self.listeners:
            raise ConfigError("listeners", None, "at least one listener is required")
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ConfigError("pools", names, "pool names must be unique")
        for index, listener in enumerate(self.listeners):
            if listener.pool not in names:
                raise ConfigError(f"listeners[{index}].pool", listener.pool, f"no such pool; known: {', '.join(names)}")
            self._check_routes(index, listener)
        _positive("drain_timeout", self.drain_timeout)
        if not 0 <= self.shutdown_delay < float("inf"):
            raise ConfigError("shutdown_delay", self.shutdown_delay, "must be 0 or more")
        if self.drain_at not in DRAIN_AT:
            raise ConfigError("drain_at", self.drain_at, f"expected {' or '.join(DRAIN_AT)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", self.log_level, f"expected one of {', '.join(LOG_LEVELS)}")
        if self.access_log_format not in ACCESS_LOG_FORMATS:
            raise ConfigError(
                "access_log_format", self.access_log_format, f"expected one of {', '.join(ACCESS_LOG_FORMATS)}"
            )
        if self.access_log.startswith(SYSLOG):
            syslog_target(self.access_log, "access_log")
        if type(self.workers) is not int or self.workers < 1:
            raise ConfigError("workers", self.workers, "must be at least 1")

    def pool(self, name: str) -> PoolConfig:
        """The pool called ``name`` (validated to exist for every listener)."""
        return next(p for p in self.pools if p.name == name)

    def _check_routes(self, index: int, listener: ListenerConfig) -> None:
        """Every pool an SNI listener routes to exists and takes the client's TLS as it is."""
        if not listener.sni:
            return
        names = [p.name for p in self.pools]
        for pattern, pool in (*listener.sni, ("", listener.pool)):
            where = f"listeners[{index}].sni.{pattern}" if pattern else f"listeners[{index}].pool"
            if pool not in names:
                raise ConfigError(where, pool, f"no such pool; known: {', '.join(names)}")
            if self.pool(pool).tls is not None:
                raise ConfigError(
                    where, pool, "this pool originates TLS, but SNI routes pass the client's TLS on as it is"
                )


def _routes(routes: object) -> tuple[tuple[str, str], ...]:
    """SNI routes as ``(pattern, pool)`` pairs with canonical patterns, each pattern once."""
    pairs = list(routes.items()) if isinstance(routes, Mapping) else routes
    if not isinstance(pairs, list | tuple) or not all(isinstance(p, tuple | list) and len(p) == 2 for p in pairs):
        raise ConfigError("sni", routes, 'expected a table of server names and pools, as {"a.example" = "pool_a"}')
    out: dict[str, str] = {}
    for text, pool in pairs:
        pattern = parse_pattern(text, f"sni.{text}")
        if not isinstance(pool, str) or not pool:
            raise ConfigError(f"sni.{text}", pool, "expected the name of a pool")
        if pattern in out:
            raise ConfigError(f"sni.{text}", pool, f"the same name as another route ({pattern})")
        out[pattern] = pool
    return tuple(out.items())


def _ranges(texts: tuple[str, ...], name: str) -> tuple[str, ...]:
    """CIDR ranges as canonical text; a ConfigError names the one that is wrong (``allow[1]``)."""
    if isinstance(texts, str):
        raise ConfigError(name, texts, "expected a list of CIDR ranges")
    return tuple(str(parse_cidr(text, f"{name}[{index}]")) for index, text in enumerate(texts))


LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOG_FORMATS = ("logfmt", "json")
SYSLOG = "syslog:"  # the access_log prefix of a syslog target


def syslog_target(text: str, path: str = "access_log") -> tuple[str, int] | str:
    """``syslog:HOST:PORT`` -> ``(host, port)`` (UDP; ``[::1]`` for IPv6); ``syslog:/path`` -> the path
    of an AF_UNIX datagram socket (``/dev/log``)."""
    rest = text[len(SYSLOG) :]
    if rest.startswith("/"):
        return rest
    host, sep, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        expected = "expected syslog:HOST:PORT (UDP, port 1..65535) or syslog:/PATH (a UNIX datagram socket)"
        raise ConfigError(path, text, expected)
    return host, int(port)

PROXY_VERSIONS = ("v1", "v2")
RELAY_ENGINES = ("auto", "splice", "transport")
DRAIN_AT = ("now", "safe")
DRAIN_PROTOCOLS = ("redis", "postgres")
SPLIT_BRAIN = ("fail-closed", "prefer-newest")
TLS_VERSIONS = ("1.2", "1.3")


# --- the tree from plain data ----------------------------------------------------------------------

# Settings that hold a nested object (a section of the tree) or a list of them.
_SECTIONS: dict[tuple[type, str], type] = {
    (ListenerConfig, "address"): Address,
    (ListenerConfig, "tls"): ServerTLSConfig,
    (PoolConfig, "health"): HealthConfig,
    (PoolConfig, "tls"): UpstreamTLSConfig,
    (MemberConfig, "address"): Address,
    (Config, "admin"): Address,
}
_LISTS: dict[tuple[type, str], type] = {(PoolConfig, "members"): MemberConfig}
_ALSO: dict[type, tuple[type, ...]] = {Address: (Service,)}  # objects a section of these may be as they are

_T = TypeVar("_T")


def from_tree(tree: Mapping[str, Any]) -> Config:
    """The Config for plain data shaped like the tree: ``listeners`` a list (flags) or a table by name
    (a config file), ``pools`` a table by name, sections as mappings. Every ConfigError names the full
    path of its value (``listeners[0].tls.cert``, ``listeners.redis.tls.cert``), so flags and a config
    file get the same validation and can each name the value in their own terms."""
    data = dict(tree)
    listeners = data.pop("listeners", ())
    named = listeners.items() if isinstance(listeners, Mapping) else enumerate(listeners)
    built = tuple(
        _build(ListenerConfig, {**spec, "name": key} if isinstance(key, str) else spec, _item("listeners", key))
        for key, spec in named
    )
    pools = tuple(
        _build(PoolConfig, {**spec, "name": name}, f"pools.{name}") for name, spec in data.pop("pools", {}).items()
    )
    return _build(Config, {**data, "listeners": built, "pools": pools}, "")


def _item(table: str, key: int | str) -> str:
    return f"{table}[{key}]" if isinstance(key, int) else f"{table}.{key}"


def _build(kind: type[_T], data: object, path: str) -> _T:
    if isinstance(data, (kind, *_ALSO.get(kind, ()))):
        return data  # type: ignore[return-value]
    if kind is MemberConfig and isinstance(data, Address | Service):  # bare: a member with the defaults
        return MemberConfig(data)  # type: ignore[return-value]
    if not isinstance(data, Mapping):
        raise ConfigError(path, data, f"expected a table of {kind.__name__} settings")
    known = {f.name: f for f in fields(kind)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in known:
            raise ConfigError(where, None, "no such setting")
        if (kind, key) in _SECTIONS and value is not None:
            value = _build(_SECTIONS[kind, key], value, where)
        elif (kind, key) in _LISTS:
            value = tuple(_build(_LISTS[kind, key], item, f"{where}[{index}]") for index, item in enumerate(value))
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    for name, spec in known.items():
        if name not in values and spec.default is MISSING and spec.default_factory is MISSING:
            raise ConfigError(f"{path}.{name}" if path else name, None, "is required")
    try:
        return kind(**values)
    except ConfigError as exc:
        raise (exc.under(path) if path else exc) from None
