"""The whole configuration as frozen dataclasses, plus parsers for the textual forms users type.

Every dataclass validates itself in ``__post_init__``, so an invalid Config cannot be built: the I/O
layers never re-check values. Errors are ``ConfigError``s naming the field (the CLI renames fields to
flags), the value and what was expected. Nothing here touches sockets or the event loop.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field

from .errors import ConfigError

# --- textual forms ---------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
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
    if not (text.isascii() and text.isdigit()):  # str.isdigit alone accepts '²', which int() rejects
        raise ConfigError(field_name, whole, f"port {text!r} is not a number")
    port = int(text) if len(text) <= 5 else 0  # int() refuses over 4300 digits with a ValueError
    if not 1 <= port <= 65535:
        raise ConfigError(field_name, whole, "port must be 1..65535")
    return port


def _check_host(host: str, whole: str, field_name: str) -> str:
    if not host:
        return host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not all(re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", label) for label in labels):
        raise ConfigError(field_name, whole, f"{host!r} is not a valid host name or IP address")
    return host


def parse_address(text: str, field_name: str, default_port: int | None = None) -> Address:
    """Parse ``host:port``, ``:port``, ``[v6]:port``, ``host`` or a bare IPv6 literal.

    ``default_port`` fills in a missing port; without one a port is required.
    """
    text = text.strip()
    if not text:
        raise ConfigError(field_name, text, "address is empty")
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


def parse_members(texts: list[str] | tuple[str, ...], field_name: str, default_port: int) -> tuple[Address, ...]:
    """Members from repeated and/or comma-separated ``HOST[:PORT]`` values."""
    members: list[Address] = []
    for text in texts:
        for part in text.split(","):
            if not part.strip():
                raise ConfigError(field_name, text, "empty member in the list")
            members.append(parse_address(part, field_name, default_port))
    if not members:
        raise ConfigError(field_name, None, "at least one upstream is required")
    return tuple(members)


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

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(name, value, "must be greater than 0")


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active probes (every ``interval`` with jitter) and the rise/fall thresholds.

    A probe is a TCP connect, then, when ``send`` or ``expect`` are set, a write of ``send`` and a read
    that must start with ``expect``. Passive failures (failed connects of real clients) count toward
    ``fall`` as well.
    """

    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    send: bytes = b""
    expect: bytes = b""
    enabled: bool = True
    eject_time: float = 10.0

    def __post_init__(self) -> None:
        _positive("health_interval", self.interval)
        _positive("eject_time", self.eject_time)
        _positive("health_timeout", self.timeout)
        if self.rise < 1:
            raise ConfigError("rise", self.rise, "must be at least 1")
        if self.fall < 1:
            raise ConfigError("fall", self.fall, "must be at least 1")


@dataclass(frozen=True, slots=True)
class ServerTLSConfig:
    """TLS termination on a listener: our certificate, and optionally client certificates to require."""

    cert: str
    key: str
    client_ca: str | None = None
    alpn: tuple[str, ...] = ()
    handshake_timeout: float = 10.0
    min_version: str = "1.2"

    def __post_init__(self) -> None:
        _positive("tls_handshake_timeout", self.handshake_timeout)
        if self.min_version not in ("1.2", "1.3"):
            raise ConfigError("tls_min_version", self.min_version, "expected 1.2 or 1.3")


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
            raise ConfigError("upstream_cert", self.cert, "a client certificate needs both a cert and a key")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A named set of members with its balancing, retry and health settings."""

    members: tuple[Address, ...]
    name: str = "default"
    retries: int = 2
    connect_timeout: float = 5.0
    health: HealthConfig = field(default_factory=HealthConfig)
    tls: UpstreamTLSConfig | None = None

    def __post_init__(self) -> None:
        if not self.members:
            raise ConfigError("upstream", None, "at least one upstream is required")
        if any(not m.host for m in self.members):
            bad = next(m for m in self.members if not m.host)
            raise ConfigError("upstream", str(bad), "an upstream needs a host")
        if self.retries < 0:
            raise ConfigError("retries", self.retries, "must be 0 or more")
        _positive("connect_timeout", self.connect_timeout)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """Where clients connect, which pool serves them, and the per-session timeouts and buffer."""

    address: Address
    pool: str = "default"
    idle_timeout: float = 3600.0
    half_closed_timeout: float = 30.0
    buffer_size: int = 65536
    tls: ServerTLSConfig | None = None
    backlog: int = 1024
    reuse_port: bool = False  # SO_REUSEPORT, so several worker processes can each bind the address
    relay: str = "auto"  # engine: 'auto' (bulky plain-TCP sessions switch to splice), 'splice', 'transport'

    def __post_init__(self) -> None:
        _positive("idle_timeout", self.idle_timeout)
        _positive("half_closed_timeout", self.half_closed_timeout)
        if self.buffer_size < 1024:
            raise ConfigError("buffer_size", self.buffer_size, "must be at least 1024 bytes")
        if self.relay not in RELAY_ENGINES:
            raise ConfigError("relay", self.relay, f"expected one of {', '.join(RELAY_ENGINES)}")


@dataclass(frozen=True, slots=True)
class Config:
    """Listeners, the pools they use, and process-wide settings."""

    listeners: tuple[ListenerConfig, ...]
    pools: tuple[PoolConfig, ...]
    drain_timeout: float = 30.0
    access_log: str = "-"
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.listeners:
            raise ConfigError("listen", None, "at least one listener is required")
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ConfigError("pool", names, "pool names must be unique")
        for listener in self.listeners:
            if listener.pool not in names:
                raise ConfigError("pool", listener.pool, f"no such pool; known: {', '.join(names)}")
        _positive("drain_timeout", self.drain_timeout)
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", self.log_level, f"expected one of {', '.join(LOG_LEVELS)}")

    def pool(self, name: str) -> PoolConfig:
        """The pool called ``name`` (validated to exist for every listener)."""
        return next(p for p in self.pools if p.name == name)


LOG_LEVELS = ("debug", "info", "warning", "error")
RELAY_ENGINES = ("auto", "splice", "transport")
