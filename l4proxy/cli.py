"""The ``l4proxy`` command: flags to a Config, Config to a running Proxy, errors to one line.

Every option is declared once, in ``OPTIONS``: its flag, the path of its value in the config tree, its
default as the user would type it, its parser, its help and its group. The click options, the grouped
``--help``, the Config (through ``config.from_tree``), the refusal of flags that cannot take effect and
the flag an error names are all derived from that table.

The rule for flags that cannot take effect: a flag that configures something the rest of the command
line leaves off (``--tls-alpn`` without ``--tls-cert``, ``--health-send`` with ``--no-health-checks``,
``--upstream-ca`` with ``--upstream-insecure``) is refused, since the command line contradicts itself;
what works but is probably not what was meant (a member listed twice) is a warning at start-up.

``--config FILE`` takes the listeners and pools from a TOML file instead (``configfile``, which reads
each value with the flag parsers here, ``FILE_FORMS``); the process-level flags may still be given and
win over the file, the others are refused. ``l4proxy check --config FILE`` (``check`` as the first
word, so ``l4proxy --listen ...`` parses as before) prints the effective configuration or every problem
as ``FILE:LINE: path: problem``.

Only this module turns errors into exit codes: 2 for a user mistake (bad flag, bad value, missing
file, a member that is the proxy itself), 1 when the proxy cannot start (address in use), 0 after a
graceful drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import ipaddress
import itertools
import logging
import os
import re
import resource
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any, cast

import click

from . import __version__, configfile, takeover
from .accesslog import AccessLog, stamp
from .acl import parse_cidr, parse_rate
from .admin import AdminServer
from .checks import KINDS, MATCHES, load_credentials
from .config import (
    ACCESS_LOG_FORMATS,
    DRAIN_AT,
    DRAIN_PROTOCOLS,
    LOG_LEVELS,
    PROXY_VERSIONS,
    RELAY_ENGINES,
    SPLIT_BRAIN,
    TLS_VERSIONS,
    Address,
    Config,
    MemberConfig,
    Service,
    from_tree,
    parse_address,
    parse_duration,
    parse_escapes,
    parse_members,
)
from .configfile import ConfigFileError, Document
from .discovery import needs_resolving
from .errors import ConfigError
from .notify import notify
from .ownaddrs import WILDCARDS, IPAddress, is_own, local_networks
from .proxy import Proxy, Shared
from .reload import Plan
from .snapshot import ProxySource, log_status
from .syslogsink import open_log
from .workers import parse_workers, supervise

log = logging.getLogger("l4proxy")

# --- the option table ------------------------------------------------------------------------------

# A parser turns what the user typed into the config value; ``path`` is where it goes (for errors) and
# ``earlier`` holds the values of the options declared before it, by path.
Parse = Callable[[Any, str, Mapping[str, Any]], Any]


def _plain(parse: Callable[[str, str], Any]) -> Parse:
    """A parser that needs only the text and the path."""
    return lambda text, path, _earlier: parse(text, path)


def _text(text: str, path: str, _earlier: Mapping[str, Any]) -> str:
    return text


def _whole(text: str, path: str, _earlier: Mapping[str, Any]) -> int:
    digits = text.strip().removeprefix("-")
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 18):  # int() refuses over 4300 digits
        raise ConfigError(path, text, "expected a whole number")
    return int(text)


def _size(text: str, path: str, _earlier: Mapping[str, Any]) -> int:
    lowered = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(lowered[-1:], 1)
    digits = lowered[:-1] if scale > 1 else lowered
    if lowered.endswith("ib"):
        scale, digits = {"kib": 1024, "mib": 1024 * 1024}.get(lowered[-3:], 0), lowered[:-3]
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 18) or not scale:
        raise ConfigError(path, text, "expected bytes such as 65536, 64k or 1m")
    return int(digits) * scale


def _names(text: str, path: str, _earlier: Mapping[str, Any]) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:  # given, but naming nothing: it would be silently ignored
        raise ConfigError(path, text, "expected names, comma-separated, such as h2,http/1.1")
    return names


def _port(text: str, path: str, _earlier: Mapping[str, Any]) -> int:
    port = _whole(text, path, _earlier)
    if not 1 <= port <= 65535:
        raise ConfigError(path, text, "port must be 1..65535")
    return port


def _members(texts: tuple[str, ...], path: str, earlier: Mapping[str, Any]) -> tuple[MemberConfig, ...]:
    """Members with their options; a missing port is the listen port."""
    return parse_members(texts, path, default_port=earlier[LISTEN_PATH].port)


def _cidrs(texts: tuple[str, ...], path: str, _earlier: Mapping[str, Any]) -> tuple[str, ...]:
    """CIDR ranges from repeated and/or comma-separated values, as canonical text."""
    parts = [part.strip() for text in texts for part in text.split(",")]
    return tuple(str(parse_cidr(part, path)) for part in parts)


def _off(given: bool, path: str, _earlier: Mapping[str, Any]) -> bool:
    return not given


def _on(given: bool, path: str, _earlier: Mapping[str, Any]) -> bool:
    return given


def _section(given: bool, path: str, _earlier: Mapping[str, Any]) -> dict[str, Any] | None:
    """A switch that turns a section of the tree on (its other options fill it in)."""
    return {} if given else None


@dataclasses.dataclass(frozen=True, slots=True)
class Need:
    """What a flag needs from the rest of the command line to take any effect."""

    problem: str  # what the error says, after the flag and its value
    met: Callable[[frozenset[str]], bool]  # given the flags on the command line


TLS_IN = Need("needs --tls-cert and --tls-key", lambda given: bool({"--tls-cert", "--tls-key"} & given))
TLS_OUT = Need("needs --upstream-tls", lambda given: "--upstream-tls" in given)
PROBES = Need("has no effect with --no-health-checks", lambda given: "--no-health-checks" not in given)
PROXY_IN = Need("needs --accept-proxy", lambda given: "--accept-proxy" in given)
VERIFIED = Need(
    "has no effect with --upstream-insecure (nothing is verified)", lambda given: "--upstream-insecure" not in given
)


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    """One command-line option: everything the CLI derives about it comes from here."""

    flag: str
    path: str  # where the value goes in the config tree (config.from_tree), and what errors are about
    group: str
    help: str
    default: str | None = None  # as the user would type it; None: the dataclass default applies
    parse: Parse = _text
    metavar: str = ""
    switch: bool = False  # takes no value; the parser gets whether it was given
    multiple: bool = False
    required: bool = False
    needs: tuple[Need, ...] = ()
    pair: str = ""  # the flag that must be given with this one

    @property
    def name(self) -> str:
        """The keyword click passes the value as."""
        return self.flag[2:].replace("-", "_")


LISTEN_PATH = "listeners[0].address"
_LISTENER, _POOL = "listeners[0]", "pools.default"
_DURATION = _plain(parse_duration)

GROUPS = {
    "listener": "Listener",
    "upstreams": "Upstreams",
    "health": "Health checks",
    "access": "Who may connect",
    "tls-in": "TLS from clients",
    "tls-out": "TLS to upstreams",
    "logging": "Logging",
    "process": "Process",
}

OPTIONS: tuple[Option, ...] = (
    Option("--listen", LISTEN_PATH, "listener", "Address to accept clients on; ':PORT' means every interface,"
           " '[::1]:PORT' for IPv6.", parse=_plain(parse_address), metavar="[HOST]:PORT", required=True),
    Option("--idle-timeout", f"{_LISTENER}.idle_timeout", "listener",
           "Close a session with no traffic in either direction for this long.", "1h", _DURATION, "DURATION"),
    Option("--half-closed-timeout", f"{_LISTENER}.half_closed_timeout", "listener",
           "Idle timeout once one direction has ended (HAProxy's 'timeout client-fin').", "30s", _DURATION,
           "DURATION"),
    Option("--max-connections", f"{_LISTENER}.max_connections", "listener", "Sessions at once; at the limit the"
           " listener stops accepting and new clients wait in the kernel's backlog. Default: what the open-files"
           " limit leaves room for.", parse=_whole, metavar="N"),
    Option("--tcp-keepalive", f"{_LISTENER}.tcp_keepalive", "listener", "TCP keepalive on both sides of each"
           " session: probes after this long idle, so a peer gone without a FIN is found; 0 is off.", "60s",
           _DURATION, "DURATION"),
    Option("--max-session-duration", f"{_LISTENER}.max_session_duration", "listener", "Close a session older"
           " than this at its next quiet moment, or at this plus up to 10% at the latest, so long-lived"
           " sessions rebalance; 0 is off.", "0", _DURATION, "DURATION"),
    Option("--buffer-size", f"{_LISTENER}.buffer_size", "listener",
           "Per-direction buffer high-water mark; a slower peer pauses the faster one.", "64k", _size, "SIZE"),
    Option("--relay", f"{_LISTENER}.relay", "listener",
           "Relay engine: 'auto' moves bulky plain-TCP sessions to zero-copy splice, 'splice' does so for every"
           " plain-TCP session, 'transport' never (TLS sessions always use transports).", "auto",
           metavar="|".join(RELAY_ENGINES)),
    Option("--upstream", f"{_POOL}.members", "upstreams", "Pool members, comma-separated and/or repeated; the port"
           " defaults to the listen port; srv:NAME takes members and ports from DNS SRV records. Options follow a"
           " member after semicolons: weight=N (1..256), max_conns=N, backup, as in"
           " 'a:6379;weight=3;max_conns=200,b;backup'.", parse=_members,
           metavar="HOST[:PORT][;OPTION...],...", multiple=True, required=True),
    Option("--slow-start", f"{_POOL}.slow_start", "upstreams", "A member that comes back UP ramps from 10% of its"
           " weight and max_conns to all of them over this time; 0 is off.", "0", _DURATION, "DURATION"),
    Option("--connect-timeout", f"{_POOL}.connect_timeout", "upstreams",
           "Give up on one connect attempt after this long and try another member.", "5s", _DURATION, "DURATION"),
    Option("--retries", f"{_POOL}.retries", "upstreams",
           "Extra connect attempts after the first, each to a member not yet tried.", "2", _whole, "N"),
    Option("--retry-budget", f"{_POOL}.retry_budget", "upstreams", "Retries in flight may be at most this"
           " percent of the connects in flight (3 at least), so an outage cannot multiply connect attempts.",
           "20", _whole, "PERCENT"),
    Option("--panic-threshold", f"{_POOL}.panic_threshold", "upstreams", "While fewer than this percent of the"
           " members are UP, ignore health and balance over all of them; 0 (off) suits databases.", "0", _whole,
           "PERCENT"),
    Option("--on-member-down", f"{_POOL}.on_member_down", "upstreams", "A member marked DOWN (or a primary"
           " demoted): 'keep' its sessions, or 'close' them, spread over a second, so its clients reconnect"
           " [default: close with a *-primary check, else keep].", metavar="keep|close"),
    Option("--queue-timeout", f"{_POOL}.queue_timeout", "upstreams", "A client that finds every eligible member"
           " at its max_conns, or a primary pool with no primary, waits this long at most (default: the"
           " connect timeout).",
           parse=_DURATION, metavar="DURATION"),
    Option("--max-queue", f"{_POOL}.max_queue", "upstreams", "Clients that may wait for a place at once (per"
           " worker process); past it a client is refused; 0: none wait.", "1024", _whole, "N"),
    Option("--eject-after", f"{_POOL}.eject_after", "upstreams", "Eject a member after this many failures of"
           " client connects in a row (refused, timed out, TLS handshake failed); a served connect resets the"
           " count.", "5", _whole, "N"),
    Option("--eject-time", f"{_POOL}.eject_time", "upstreams", "How long a first ejection lasts; the k-th in a"
           " row lasts k times as long, up to --max-eject-time. A passing health check ends it early.", "30s",
           _DURATION, "DURATION"),
    Option("--max-eject-time", f"{_POOL}.max_eject_time", "upstreams", "The longest an ejection lasts.", "300s",
           _DURATION, "DURATION"),
    Option("--max-ejected-percent", f"{_POOL}.max_ejected_percent", "upstreams", "At most this percent of a"
           " pool's members are ejected at once; one member always may be.", "50", _whole, "PERCENT"),
    Option("--resolve-interval", f"{_POOL}.resolve_interval", "upstreams", "Resolve members given as DNS names"
           " (HOST or srv:NAME) again this often; each address they resolve to is a member.", "10s", _DURATION,
           "DURATION"),
    Option("--resolve-empty-after", f"{_POOL}.resolve_empty_after", "upstreams", "An empty DNS answer replaces"
           " the last good one only once every answer for this long was empty.", "30s", _DURATION, "DURATION"),
    Option("--send-proxy", f"{_POOL}.send_proxy", "upstreams", "Send each member a PROXY protocol header with"
           " the client's address before any byte; probes send LOCAL (v2) or UNKNOWN (v1).",
           metavar="|".join(PROXY_VERSIONS)),
    Option("--health-interval", f"{_POOL}.health.interval", "health",
           "Time between active health probes of each member.", "2s", _DURATION, "DURATION", needs=(PROBES,)),
    Option("--health-timeout", f"{_POOL}.health.timeout", "health", "A probe that takes longer fails.", "1s",
           _DURATION, "DURATION", needs=(PROBES,)),
    Option("--rise", f"{_POOL}.health.rise", "health", "Consecutive passing probes that bring a DOWN member"
           " back UP.", "2", _whole, "N", needs=(PROBES,)),
    Option("--fall", f"{_POOL}.health.fall", "health", "Consecutive failing probes that take an UP member"
           " DOWN.", "3", _whole, "N", needs=(PROBES,)),
    Option("--health-send", f"{_POOL}.health.send", "health", "Probe payload to send after connecting, e.g."
           r" 'PING\r\n' (escapes below).", parse=_plain(parse_escapes), metavar="BYTES", needs=(PROBES,)),
    Option("--health-expect", f"{_POOL}.health.expect", "health", "The probe passes only if the reply starts"
           " with these bytes, e.g. '+PONG'.", parse=_plain(parse_escapes), metavar="BYTES", needs=(PROBES,)),
    Option("--health-check", f"{_POOL}.health.check", "health", "What a probe checks: the connect, send/expect,"
           " an HTTP GET on a side port, a Redis PING or ROLE (master), a PostgreSQL login (not in recovery)"
           " [default: send-expect with --health-send/--health-expect, else tcp].", metavar="|".join(KINDS),
           needs=(PROBES,)),
    Option("--health-expect-match", f"{_POOL}.health.expect_match", "health", "How the reply must hold"
           " --health-expect: start with it, contain it, or match it as a regular expression.", "prefix",
           metavar="|".join(MATCHES), needs=(PROBES,)),
    Option("--health-path", f"{_POOL}.health.path", "health", "http: the path to GET [default: /].",
           metavar="PATH", needs=(PROBES,)),
    Option("--health-port", f"{_POOL}.health.port", "health", "http: the port to probe, e.g. Patroni's 8008"
           " [default: the member's port].", parse=_port, metavar="PORT", needs=(PROBES,)),
    Option("--health-status", f"{_POOL}.health.status", "health", "http: statuses that pass, e.g. 200 or"
           " 200-299,304 [default: 2xx].", metavar="LIST", needs=(PROBES,)),
    Option("--health-auth", f"{_POOL}.health.auth", "health", "redis, postgres: a file holding the credentials"
           " ('password' or 'user password'; 'user database [password]').", metavar="FILE", needs=(PROBES,)),
    Option("--split-brain", f"{_POOL}.split_brain", "health", "With a *-primary check, when several members"
           " claim the primary role: route to none, or to the one that turned primary last.", "fail-closed",
           metavar="|".join(SPLIT_BRAIN)),
    Option("--no-health-checks", f"{_POOL}.health.enabled", "health", "Turn active probes off (members stay UP;"
           " failing ones are still ejected, see --eject-after).", parse=_off, switch=True),
    Option("--accept-proxy", f"{_LISTENER}.accept_proxy", "access", "Clients start with a PROXY protocol header"
           " (v1 or v2, from a load balancer in front); the address it carries is the client's.", parse=_on,
           switch=True),
    Option("--accept-proxy-from", f"{_LISTENER}.accept_proxy_from", "access", "Only peers in these CIDR ranges"
           " must send the header; others are served as direct clients (repeatable).", parse=_cidrs,
           metavar="CIDR", multiple=True, needs=(PROXY_IN,)),
    Option("--proxy-timeout", f"{_LISTENER}.proxy_timeout", "access", "Close a client whose PROXY header has not"
           " arrived within this long.", "5s", _DURATION, "DURATION", needs=(PROXY_IN,)),
    Option("--allow", f"{_LISTENER}.allow", "access", "Accept clients only from these CIDR ranges (repeatable,"
           " comma-separated).", parse=_cidrs, metavar="CIDR", multiple=True),
    Option("--deny", f"{_LISTENER}.deny", "access", "Refuse clients from these CIDR ranges; wins over --allow.",
           parse=_cidrs, metavar="CIDR", multiple=True),
    Option("--max-connections-per-ip", f"{_LISTENER}.max_connections_per_ip", "access", "Refuse a client"
           " address's connections past this many at once (per worker process).", parse=_whole, metavar="N"),
    Option("--rate-per-ip", f"{_LISTENER}.rate_per_ip", "access", "New connections a second from one client"
           " address, with a burst of as many (per worker process).", parse=_plain(parse_rate), metavar="N/s"),
    Option("--tls-cert", f"{_LISTENER}.tls.cert", "tls-in",
           "Terminate TLS from clients with this certificate chain. Repeat for more certificates, chosen by the"
           " SNI name clients ask for (their DNS names); the first is the default.", metavar="PEM",
           multiple=True, pair="--tls-key"),
    Option("--tls-key", f"{_LISTENER}.tls.key", "tls-in", "The private key of --tls-cert; one per --tls-cert,"
           " in the same order.", metavar="PEM", multiple=True, pair="--tls-cert"),
    Option("--tls-client-ca", f"{_LISTENER}.tls.client_ca", "tls-in",
           "Require client certificates signed by this CA (mTLS).", metavar="PEM", needs=(TLS_IN,)),
    Option("--tls-alpn", f"{_LISTENER}.tls.alpn", "tls-in", "ALPN protocols offered to clients, e.g."
           " h2,http/1.1.", parse=_names, metavar="LIST", needs=(TLS_IN,)),
    Option("--tls-handshake-timeout", f"{_LISTENER}.tls.handshake_timeout", "tls-in",
           "Close clients that do not finish the handshake.", "10s", _DURATION, "DURATION", needs=(TLS_IN,)),
    Option("--tls-min-version", f"{_LISTENER}.tls.min_version", "tls-in", "Oldest TLS version accepted from"
           " clients.", "1.2", metavar="|".join(TLS_VERSIONS), needs=(TLS_IN,)),
    Option("--tls-ciphers", f"{_LISTENER}.tls.ciphers", "tls-in", "TLS 1.2 cipher list in OpenSSL syntax"
           " [default: Mozilla intermediate: ECDHE with AES-GCM or ChaCha20-Poly1305]; TLS 1.3 suites are fixed.",
           metavar="LIST", needs=(TLS_IN,)),
    Option("--upstream-tls", f"{_POOL}.tls", "tls-out", "Speak TLS to the upstreams (verified by default).",
           parse=_section, switch=True),
    Option("--upstream-ca", f"{_POOL}.tls.ca", "tls-out", "CA bundle that upstream certificates must chain to"
           " [default: the system trust store].", metavar="PEM", needs=(TLS_OUT, VERIFIED)),
    Option("--upstream-sni", f"{_POOL}.tls.sni", "tls-out", "Server name sent and verified [default: the"
           " member's host].", metavar="NAME", needs=(TLS_OUT,)),
    Option("--upstream-cert", f"{_POOL}.tls.cert", "tls-out", "Client certificate presented to upstreams"
           " (mTLS).", metavar="PEM", needs=(TLS_OUT,), pair="--upstream-key"),
    Option("--upstream-key", f"{_POOL}.tls.key", "tls-out", "The private key of --upstream-cert.",
           metavar="PEM", needs=(TLS_OUT,), pair="--upstream-cert"),
    Option("--upstream-alpn", f"{_POOL}.tls.alpn", "tls-out", "ALPN protocols offered to upstreams.",
           parse=_names, metavar="LIST", needs=(TLS_OUT,)),
    Option("--upstream-insecure", f"{_POOL}.tls.insecure", "tls-out",
           "Do not verify upstream certificates (warns at start-up).", parse=_on, switch=True, needs=(TLS_OUT,)),
    Option("--log-level", "log_level", "logging", "Level of the diagnostic log on stderr.", "info",
           metavar="|".join(LOG_LEVELS)),
    Option("--access-log", "access_log", "logging", "One line per session: '-' for stdout, a file path,"
           " syslog:HOST:PORT (UDP) or syslog:/dev/log (a UNIX datagram socket), or 'off'.", "-",
           metavar="-|PATH|syslog:...|off"),
    Option("--access-log-format", "access_log_format", "logging", "Access-log lines as logfmt or as JSON"
           " (docs/access-log.schema.json).", "logfmt", metavar="|".join(ACCESS_LOG_FORMATS)),
    Option("--drain-timeout", "drain_timeout", "process", "On SIGTERM/SIGINT, how long sessions may finish"
           " before they are closed.", "30s", _DURATION, "DURATION"),
    Option("--shutdown-delay", "shutdown_delay", "process", "On SIGTERM/SIGINT, keep accepting for this long"
           " while no longer ready (load balancers and Kubernetes endpoints catch up), then drain.", "0s",
           _DURATION, "DURATION"),
    Option("--drain-at", "drain_at", "process", "When a drained session (member drained or removed, shutdown)"
           " is closed: at the drain timeout ('now'), or first at a moment its Redis or PostgreSQL client loses"
           " nothing ('safe').", "now", metavar="|".join(DRAIN_AT)),
    Option("--drain-protocol", f"{_POOL}.drain_protocol", "upstreams", "The protocol --drain-at safe reads the"
           " sessions in [default: the --health-check kind's, redis* or postgres*].",
           metavar="|".join(DRAIN_PROTOCOLS)),
    Option("--workers", "workers", "process", "Processes accepting on the address (SO_REUSEPORT); 'auto' ="
           " one per CPU.", "1", _plain(parse_workers), "N|auto"),
    Option("--admin", "admin", "process", "Serve the admin API (/metrics, /healthz, /readyz, /status, member"
           " drain/enable/disable) on this address; off unless given.", parse=_plain(parse_address),
           metavar="HOST:PORT"),
)  # fmt: skip

# Sections that exist only when one of their flags is given; their defaults apply only then.
OPTIONAL_SECTIONS = (f"{_LISTENER}.tls", f"{_POOL}.tls")


def _form(option: Option) -> configfile.Form:
    return lambda text, path: option.parse(text, path, {})


# The text forms a config file accepts, by schema path: each flag's own parser (members, a list in the
# file, are parsed one by one; switches are TOML booleans or tables).
FILE_FORMS: dict[str, configfile.Form] = {
    configfile.generic(o.path): _form(o) for o in OPTIONS if not o.switch and not o.multiple
}
FILE_FORMS["listeners.*.sni_timeout"] = parse_duration  # SNI routes have no flags: the file alone sets them
# With --config, only the process-level settings may come from flags too (and win over the file).
PROCESS_OPTIONS = tuple(o for o in OPTIONS if not o.path.startswith(("listeners", "pools")))


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((prefix + ".", prefix + "["))


def option_for(path: str) -> Option | None:
    """The option whose value ``path`` is, or lies inside (the longest such option path)."""
    matches = [option for option in OPTIONS if _under(path, option.path)]
    return max(matches, key=lambda option: len(option.path), default=None)


def flagged(exc: ConfigError, typed: Mapping[str, object] | None = None) -> ConfigError:
    """The same error naming the flag instead of the config path, with the value as it was typed
    (``typed``: flag to text) rather than as it was parsed (``'0'``, not ``0.0``)."""
    option = option_for(exc.path)
    if option is None:
        return exc
    value = exc.value
    if option.switch:
        value = None
    elif not option.multiple and typed is not None and option.flag in typed:
        value = typed[option.flag]
    return ConfigError(option.flag, value, exc.problem)


# --- from flags to a Config ------------------------------------------------------------------------


def build_config(params: Mapping[str, Any]) -> Config:
    """The Config for what click collected (text as typed, nothing converted yet); ConfigErrors name
    the flag and echo the text."""
    given = _given(params)
    typed = {o.flag: params[o.name] if o.flag in given else o.default for o in OPTIONS if not o.switch}
    for option in OPTIONS:
        if option.required and option.flag not in given:
            raise click.MissingParameter(param_type="option", param_hint=f"'{option.flag}'")
    try:
        _refuse_ineffective(params, given)
        created = [s for s in OPTIONAL_SECTIONS if any(_under(o.path, s) for o in OPTIONS if o.flag in given)]
        values: dict[str, Any] = {}
        for option in OPTIONS:
            section = next((s for s in OPTIONAL_SECTIONS if _under(option.path, s)), None)
            if option.flag in given:
                raw: Any = params[option.name]
            elif option.switch:
                raw = False
            elif option.default is not None:
                raw = option.default
            else:
                continue
            if section is not None and section not in created and option.path != section:
                continue
            values[option.path] = option.parse(raw, option.path, values)
        config = from_tree(_tree(values))
        _refuse_discovery_unused(config, params, given)
        return config
    except ConfigError as exc:
        raise flagged(exc, typed) from None


def _given(params: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(o.flag for o in OPTIONS if params.get(o.name) not in (None, False, ()))


def _refuse_ineffective(params: Mapping[str, Any], given: frozenset[str]) -> None:
    """A flag whose needs the command line does not meet would be ignored: refuse it instead."""
    for option in OPTIONS:
        if option.flag not in given:
            continue
        shown = _shown(option, params)
        for need in option.needs:
            if not need.met(given):
                raise ConfigError(option.flag, shown, need.problem)
        if option.pair and option.pair not in given:
            raise ConfigError(option.pair, None, f"required with {option.flag}")


def _refuse_discovery_unused(config: Config, params: Mapping[str, Any], given: frozenset[str]) -> None:
    """The discovery flags do nothing when every member is an IP address: refuse them then."""
    if any(needs_resolving(member.address) for pool in config.pools for member in pool.members):
        return
    for flag in ("--resolve-interval", "--resolve-empty-after"):
        if flag in given:
            problem = "has no effect: every --upstream is an IP address"
            raise ConfigError(flag, params[flag[2:].replace("-", "_")], problem)


def _tree(values: Mapping[str, Any]) -> dict[str, Any]:
    """Nested plain data from values by path (``listeners[0].tls.cert``), as ``from_tree`` takes it."""
    tree: dict[str, Any] = {}
    for path, value in values.items():
        keys: list[str | int] = [int(i) if i else k for k, i in re.findall(r"(\w+)|\[(\d+)\]", path)]
        node: Any = tree
        for key, following in itertools.pairwise(keys):
            if isinstance(key, int):
                while len(node) <= key:
                    node.append({})
                node = node[key]
            else:
                node = node.setdefault(key, [] if isinstance(following, int) else {})
        node[keys[-1]] = value
    return tree


def without_repeats(config: Config) -> tuple[Config, list[str]]:
    """The Config with each pool's members listed once, and a warning for each member listed again."""
    warnings: list[str] = []
    pools = []
    for pool in config.pools:
        first: dict[Address | Service, MemberConfig] = {}
        for member in pool.members:
            first.setdefault(member.address, member)
        members = tuple(first.values())
        for member in members:
            count = sum(1 for other in pool.members if other.address == member.address)
            if count > 1:
                warnings.append(f"{member} is listed {count} times; it is used once, with its first options")
        pools.append(dataclasses.replace(pool, members=members) if len(members) < len(pool.members) else pool)
    return dataclasses.replace(config, pools=tuple(pools)), warnings


def refuse_self_loops(config: Config) -> None:
    """Refuse the first member that is one of our own listen addresses (see :func:`self_loops`)."""
    for problem in self_loops(config):
        raise problem


def self_loops(config: Config) -> list[ConfigError]:
    """Members that are one of our own listen addresses: each would make every probe and client loop
    through the proxy until descriptors run out (names resolved now; one that does not resolve passes)."""
    local = local_networks()
    problems = []
    for listener in config.listeners:
        pool = config.pool(listener.pool)
        listen = listener.address
        listen_ips = set() if listen.host in WILDCARDS else _resolve(listen.host, listen.port)
        for index, member in enumerate(m.address for m in pool.members):
            if isinstance(member, Service) or member.port != listen.port:  # SRV ports are known once resolved
                continue
            for ip in sorted(_resolve(member.host, member.port), key=str):
                if is_own(ip, listen.host, listen_ips, local):
                    named = "is" if str(ip) == member.host else f"resolves to {ip}, which is"
                    problems.append(
                        ConfigError(
                            f"pools.{pool.name}.members[{index}]",
                            str(member),
                            f"{named} this proxy's own listen address {listen}: it would connect to itself",
                        )
                    )
                    break
    return problems


def _resolve(host: str, port: int) -> set[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}


# --- the command -----------------------------------------------------------------------------------

EXPLANATIONS = {
    "Durations": [("250ms, 5s, 1m, 1h", "milliseconds, seconds, minutes, hours; a plain number is seconds")],
    "Escapes in --health-send and --health-expect": [
        (r"\r \n \t \0", "carriage return, line feed, tab, NUL"),
        (r"\\ \xNN", "a backslash; the byte with hex value NN"),
    ],
    "Commands": [
        ("check --config FILE", "check a config file: print the effective configuration, or each problem"),
        ("top --admin HOST:PORT", "a live view of a running proxy's listeners, pools and members (q quits)"),
    ],
    "Exit codes": [
        ("0", "stopped after a graceful drain (SIGTERM/SIGINT)"),
        ("1", "could not start (the listen address cannot be bound)"),
        ("2", "a mistake on the command line or in a file it names; one line on stderr says which"),
    ],
}


class _GroupedCommand(click.Command):
    """Shows the options in their groups, then the value syntax and the exit codes."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        group_of = {option.name: option.group for option in OPTIONS} | {"config": "process", "takeover": "process"}
        sections: dict[str, list[tuple[str, str]]] = {title: [] for title in GROUPS.values()}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(GROUPS.get(group_of.get(param.name or "", ""), "Other"), []).append(record)
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for title, rows in EXPLANATIONS.items():
            with formatter.section(title):
                formatter.write_dl(rows)


def _click_option(option: Option) -> click.Option:
    """The click option for ``option``: text in, parsing left to ``build_config`` (so a default is
    not mistaken for a value the user typed)."""
    shown = f"{option.help} [default: {option.default}]" if option.default is not None else option.help
    if option.required:  # checked by build_config: a config file gives these instead
        shown += " [required without --config]"
    if option.switch:
        return click.Option([option.flag], is_flag=True, help=shown)
    return click.Option([option.flag], multiple=option.multiple, metavar=option.metavar or "TEXT", help=shown)


def _print_version(ctx: click.Context, _param: click.Parameter, wanted: bool) -> None:
    if wanted and not ctx.resilient_parsing:
        click.echo(f"l4proxy {__version__}")
        ctx.exit()


def _start(**params: Any) -> None:
    path = params.pop("config")
    handover = params.pop("takeover")
    loader = None
    if path is not None:
        heard: list[str] = []
        config = with_process_flags(load_file(path, heard), params)
        _setup_logging(config.log_level)
        for warning in heard:
            log.warning("%s", warning)

        def loader() -> Config:
            """The file again, as at start-up (the process flags still win), for SIGHUP."""
            again: list[str] = []
            reloaded = with_process_flags(load_file(path, again), params)
            check_credentials_files(reloaded)
            for warning in again:
                log.warning("SIGHUP: %s", warning)
            return reloaded

    else:
        config, repeated = without_repeats(build_config(params))
        _setup_logging(config.log_level)
        for warning in repeated:
            log.warning("--upstream: %s", warning)
        check_tls_files(config)
        try:
            refuse_self_loops(config)
        except ConfigError as exc:
            raise flagged(exc) from None
    if handover is not None and config.workers > 1:
        raise ConfigError("--takeover", handover, "works with one process only, not with --workers/workers above 1")
    check_credentials_files(config)
    if any(p.tls is not None and p.tls.insecure for p in config.pools):
        log.warning(
            "--upstream-insecure: upstream certificates are NOT verified; anyone on the path can"
            " impersonate an upstream"
        )
    try:
        access_log = open_log(config.access_log, config.access_log_format)
    except OSError as exc:
        raise ConfigError("--access-log", config.access_log, exc.strerror or str(exc)) from None
    raise_nofile_limit()
    if config.workers > 1:
        sys.exit(supervise(config, config.workers, access_log, run, loader, report_refused))
    sys.exit(run(config, access_log, loader=loader, handover=handover))


def _check(config: str) -> None:
    """``l4proxy check``: the effective configuration on stdout, or every problem on stderr."""
    heard: list[str] = []
    click.echo(configfile.dump(load_file(config, heard)), nl=False)
    for warning in heard:
        click.echo(f"warning: {warning}", err=True)


_TAKEOVER_HELP = (
    "Serve this UNIX socket so a newer l4proxy started with the same flag can take the listening sockets"
    " over (hitless upgrade); if a running l4proxy serves it already, take its sockets first."
)
_CONFIG_HELP = (
    "Read listeners, pools and settings from this TOML file; with it only the process-level flags (logging,"
    " process) may be given, and they win over the file. 'l4proxy check --config FILE' checks a file."
)

command = _GroupedCommand(
    "l4proxy",
    callback=_start,
    params=[
        *map(_click_option, OPTIONS),
        click.Option(["--config"], metavar="FILE", help=_CONFIG_HELP),
        click.Option(["--takeover"], metavar="SOCKET", help=_TAKEOVER_HELP),
        click.Option(
            ["--version"],
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=_print_version,
            help="Show the version and exit.",
        ),
    ],
    help="A layer-4 (TCP) proxy: least-connections, retries and health checks in front of any service.\n\n"
    "Example: l4proxy --listen :6379 --upstream redis-a,redis-b",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

check_command = click.Command(
    "check",
    callback=_check,
    params=[click.Option(["--config"], metavar="FILE", required=True, help="The TOML file to check.")],
    help="Check a config file: print the effective configuration (every default filled in) as TOML and exit"
    " 0, or print each problem as FILE:LINE: path: problem and exit 2.",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _top(admin: str) -> None:
    """``l4proxy top``: the live view of the proxy whose admin endpoint is at ``admin``."""
    from .top import run as watch  # rich loads only for this command

    address = parse_address(admin, "--admin")
    sys.exit(watch(address, admin))


top_command = click.Command(
    "top",
    callback=_top,
    params=[
        click.Option(["--admin"], metavar="HOST:PORT", required=True, help="The proxy's admin endpoint (its --admin)."),
    ],
    help="A live view of a running proxy's listeners, pools and members, read from its admin endpoint's /status"
    " once a second: state, active sessions, sessions/s, bytes/s, failures. q quits. When stdout is not a"
    " terminal, prints one table and exits 0.",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

SUBCOMMANDS = {"check": check_command, "top": top_command}


def check_tls_files(config: Config) -> None:
    """Load every certificate, key and CA once before binding, so a bad file (or an expired certificate)
    is a start-up error; log the warnings (a certificate that expires soon)."""
    for problem in tls_problems(config, warn=_warn_tls):
        raise flagged(problem)


def _warn_tls(warning: ConfigError, when: str = "") -> None:
    log.warning("%s%s", when, flagged(warning))


def tls_problems(
    config: Config, named: bool = False, warn: Callable[[ConfigError], None] | None = None
) -> list[ConfigError]:
    """What is wrong with each certificate, key and CA the Config names; listeners are placed by index
    (as flags know them) or, ``named``, by name (as a config file does). ``warn`` hears what is worth
    saying but loads (a certificate that expires soon), placed the same way."""
    from .tls import client_context, server_context, warn_under

    problems = []
    for index, listener in enumerate(config.listeners):
        if listener.tls is not None:
            where = f"listeners.{listener.name}.tls" if named else f"listeners[{index}].tls"
            try:
                server_context(listener.tls, warn_under(warn, where))
            except ConfigError as exc:
                problems.append(exc.under(where))
    for pool in config.pools:
        if pool.tls is not None:
            where = f"pools.{pool.name}.tls"
            try:
                client_context(pool.tls, warn_under(warn, where))
            except ConfigError as exc:
                problems.append(exc.under(where))
    return problems


def load_file(path: str, warnings: list[str] | None = None) -> Config:
    """The Config in the file at ``path``, checked as far as can be without binding: ConfigFileError
    with every problem, each on its line. ``warnings`` gets a ``FILE:LINE: ...`` line for each thing worth
    saying that does not stop it (a certificate that expires soon)."""
    try:
        source = open(path, "rb").read()  # noqa: SIM115 - closed when the read returns
    except OSError as exc:
        raise ConfigError("--config", path, exc.strerror or str(exc)) from None
    try:
        document = Document.parse(source)
        config = document.build(FILE_FORMS, os.path.dirname(os.path.abspath(path)), os.path.exists)
    except ConfigFileError as exc:
        raise ConfigFileError(exc.problems, path) from None
    heard: list[ConfigError] = []
    problems = [*tls_problems(config, named=True, warn=heard.append), *self_loops(config)]
    if warnings is not None:
        warnings.extend(document.problem(warning).render(path) for warning in heard)
    if problems:
        raise ConfigFileError(sorted(map(document.problem, problems), key=lambda p: p.line), path)
    return config


def with_process_flags(config: Config, params: Mapping[str, Any]) -> Config:
    """The file's Config with the process-level flags given on the command line in place of its values;
    any other listener or pool flag is refused (the file defines those)."""
    given = _given(params)
    for option in OPTIONS:
        if option.flag in given and option not in PROCESS_OPTIONS:
            problem = f"cannot be combined with --config; set {_file_key(option)} in the file"
            raise ConfigError(option.flag, _shown(option, params), problem)
    try:
        overrides = {o.path: o.parse(params[o.name], o.path, {}) for o in PROCESS_OPTIONS if o.flag in given}
        return dataclasses.replace(config, **overrides)
    except ConfigError as exc:
        raise flagged(exc, {o.flag: params[o.name] for o in PROCESS_OPTIONS if o.flag in given}) from None


def _shown(option: Option, params: Mapping[str, Any]) -> str | None:
    """What the user typed for ``option``, as an error echoes it (repeated values comma-joined)."""
    if option.switch:
        return None
    value = params[option.name]
    return ",".join(value) if option.multiple else value


def _file_key(option: Option) -> str:
    return configfile.generic(option.path).replace("*", "NAME")


def check_credentials_files(config: Config) -> None:
    """Read every health-check credentials file once before binding, so a bad one is a start-up error."""
    for pool in config.pools:
        health = pool.health
        if health.enabled and health.auth is not None:
            try:
                load_credentials(health.auth, health.kind)
            except ConfigError as exc:
                raise flagged(exc.under(f"pools.{pool.name}.health")) from None


Loader = Callable[[], Config]  # the config file read and checked again (SIGHUP)


def run(
    config: Config,
    access_log: AccessLog | None = None,
    shared: Shared | None = None,
    *,
    loader: Loader | None = None,
    handover: str | None = None,
) -> int:
    """Run the proxy on uvloop until SIGTERM/SIGINT; the exit status. ``shared`` is a worker
    process's seam to the supervisor's table (``Proxy(shared=...)``); ``loader`` reads the config
    file again on SIGHUP; ``handover`` is the ``--takeover`` socket's path."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config, access_log, shared, loader=loader, handover=handover))


async def serve(
    config: Config,
    access_log: AccessLog | None = None,
    shared: Shared | None = None,
    *,
    loader: Loader | None = None,
    handover: str | None = None,
) -> int:
    """Start (taking the listening sockets over from a running l4proxy at ``handover``, if one serves
    there), wait for a signal, drain; a second signal closes the remaining sessions at once. SIGHUP
    reloads the file through ``loader`` (or, without one, the TLS files); a worker gets its
    configurations from the supervisor instead."""
    handoff = None if handover is None else await asyncio.to_thread(_ask_for_sockets, handover)
    admin_sockets = None if handoff is None else handoff.sockets.pop(_admin_key(config), None)
    proxy = Proxy(config, access_log, shared=shared, inherited=None if handoff is None else handoff.sockets)
    loop = asyncio.get_running_loop()
    received: list[str] = []
    reloads = _Reloads(proxy, loader)
    admin: AdminServer | None = None
    early_reload: list[bool] = []

    def on_signal(name: str) -> None:
        received.append(name)
        proxy.access_log.flush()  # the lines of sessions that ended before the signal are out before its line
        if len(received) == 1:
            delay = proxy.config.shutdown_delay
            first = f"not ready, accepting for {delay:.1f}s more, then " if delay > 0 else ""
            log.info("%s received: %sdraining for up to %.1fs (again to force)",
                     name, first, proxy.config.drain_timeout)  # fmt: skip
            notify("STOPPING=1")
            proxy.stop()
        else:
            proxy.abort_all("forced_shutdown")

    def handed(pid: int) -> None:
        received.append("takeover")
        proxy.access_log.flush()
        log.info("takeover: pid %d accepts on our listening sockets now; draining for up to %.1fs and exiting",
                 pid, proxy.config.drain_timeout)  # fmt: skip
        if admin is not None:  # the new process answers on the endpoint's socket from now on
            closing.append(asyncio.ensure_future(admin.close()))
        proxy.stop(delayed=False)

    def listening() -> takeover.Listening:
        """What a new process takes over: the listeners' sockets, and the admin endpoint's."""
        handed_over = proxy.handover()
        if admin is not None and admin.server is not None:
            sockets = cast(list[socket.socket], list(admin.server.sockets))  # only their fileno() is sent
            handed_over.append((_admin_key(proxy.config), sockets))
        return handed_over

    # Handled from before "listening on" is logged: a signal sent on seeing it must drain, not kill.
    # They run as loop callbacks, so never before start() has made the event that stop() sets. A SIGHUP
    # during start-up is applied once the proxy runs: a reload must not interleave with start().
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGHUP, early_reload.append, True)
    loop.add_signal_handler(signal.SIGUSR1, log_status, ProxySource(proxy, timed=False))  # no histograms there
    closing: list[asyncio.Future[None]] = []
    server: takeover.Server | None = None
    try:
        try:
            await proxy.start()
        except OSError as exc:
            failed = config.listeners[0].address if proxy.binding is None else proxy.binding.address
            print(f"l4proxy: error: cannot listen on {failed}: {exc.strerror or exc}", file=sys.stderr)
            proxy.access_log.close()
            for sock in admin_sockets or ():
                sock.close()
            if handoff is not None:
                handoff.abandon()
            return 1
        try:
            admin = await _start_admin(proxy, admin_sockets)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # the loop's message repeats the address
            print(f"l4proxy: error: --admin: cannot listen on {config.admin}: {why}", file=sys.stderr)
            if handoff is not None:
                handoff.abandon()
            await proxy.drain(delay=0)  # failing to start: nothing to stay ready for
            return 1
        if handoff is not None:
            handoff.ready()
            log.info("took over %d listening sockets from pid %d, which drains and exits", handoff.count, handoff.pid)
        tune_gc()
        if handover is not None:
            server = takeover.Server(handover, listening, handed)
            server.start()
        if shared is not None:
            shared.follow(reloads.apply)
        loop.add_signal_handler(signal.SIGHUP, reloads.on_sighup)
        if early_reload:
            reloads.on_sighup()
        if not received:  # (a signal during start-up said STOPPING=1 already)
            notify("READY=1")  # listening, and serving the admin endpoint (Type=notify)
        await proxy.serve_until_stopped()
        if server is not None:
            await server.stop()
        await reloads.finish()
        await proxy.drain()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        if admin is not None:
            await admin.close()
    log.info("stopped after %d sessions", proxy.served)
    return 0


def _ask_for_sockets(path: str) -> takeover.Handoff | None:
    try:
        return takeover.request(path)
    except (OSError, ValueError) as exc:
        raise ConfigError("--takeover", path, f"the process serving it did not hand its sockets over: {exc}") from None


class _Reloads:
    """SIGHUP in one process: the file read again (off the loop: it resolves names) and applied, one
    reload at a time; a broken file keeps the running configuration and is counted
    (``Proxy.reloads_failed``). Without a file, the TLS files are re-read, as always."""

    def __init__(self, proxy: Proxy, loader: Loader | None) -> None:
        self.proxy = proxy
        self.loader = loader
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()

    def on_sighup(self) -> None:
        self.proxy.access_log.flush()  # every line of a session that ended before the reload is out first
        if self.loader is None:
            self._tls_only()
            return
        self._spawn(self._from_file(self.loader))

    def apply(self, config: Config) -> None:
        """A worker: the configuration the supervisor checked and sent."""
        self.proxy.access_log.flush()
        self._spawn(self._apply(config, quiet=True))

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def finish(self) -> None:
        """Let a reload under way end before the drain."""
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _tls_only(self) -> None:
        proxy = self.proxy
        if not proxy.uses_tls:
            log.info("SIGHUP: no TLS configured, nothing to reload")
            return
        problems = proxy.reload_tls(warn=_sighup_warning)
        for problem in problems:
            log.error("SIGHUP: kept the previous TLS files: %s", flagged(problem))
        if not problems:
            log.info("SIGHUP: TLS certificates and keys reloaded")

    async def _from_file(self, loader: Loader) -> None:
        async with self.lock:
            try:
                config = await asyncio.to_thread(loader)
            except (ConfigFileError, ConfigError) as exc:
                self.proxy.reloads_failed += 1
                report_refused(exc)
                return
            await self._apply(config, quiet=False)

    async def _apply(self, config: Config, quiet: bool) -> None:
        try:
            steps, problems = await self.proxy.reconfigure(config, warn=_sighup_warning)
        except OSError as exc:
            self.proxy.reloads_failed += 1
            log.error("SIGHUP: kept the running configuration: cannot listen on a new address: %s", exc.strerror or exc)
            return
        for problem in problems:
            log.error("SIGHUP: kept the previous TLS files: %s", problem)
        if not quiet:
            report_applied(steps)


def _sighup_warning(warning: ConfigError) -> None:
    _warn_tls(warning, "SIGHUP: ")


def report_refused(exc: ConfigFileError | ConfigError) -> None:
    """A reload refused: every problem, in the ``check`` format, then what happens."""
    lines = exc.lines() if isinstance(exc, ConfigFileError) else [str(flagged(exc))]
    for line in lines:
        log.error("SIGHUP: %s", line)
    log.error("SIGHUP: kept the running configuration (%d problem%s in the file)", len(lines), "" if len(lines) == 1
              else "s")  # fmt: skip


def report_applied(steps: Plan) -> None:
    for name in steps.restart:
        log.warning("SIGHUP: %s changed in the file; it takes effect when l4proxy is restarted", name)
    log.info("SIGHUP: configuration reloaded: %s", steps.summary())


def _admin_key(config: Config) -> str:
    """The admin endpoint's entry in a takeover (not a listen address, so no listener takes it)."""
    return f"admin {config.admin}"


async def _start_admin(proxy: Proxy, inherited: list[socket.socket] | None = None) -> AdminServer | None:
    """The admin endpoint when ``--admin`` is given (on the socket a takeover handed over, if any);
    raises OSError when it cannot listen."""
    address = proxy.config.admin
    if address is None:
        for unused in inherited or ():
            unused.close()
        return None
    sock: socket.socket | None = None
    if inherited:
        sock, *extra = inherited
        for unused in extra:
            unused.close()
    admin = AdminServer(ProxySource(proxy), address.host, address.port, sock=sock)
    await admin.start()
    return admin


def tune_gc() -> None:
    """Collect cyclic garbage less often. Every session allocates a few dozen objects, so the default
    threshold (700) ran a collection every dozen connections, about 6% of the CPU under a connection
    storm; and freeze what start-up built, so no collection scans it again."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def raise_nofile_limit() -> None:
    """Raise the soft open-files limit to the hard limit, as HAProxy does, so each session can have
    its two descriptors under load."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)


class _Stamped(logging.Formatter):
    """Diagnostics stamped like the access log: ISO 8601 UTC with milliseconds and ``Z``."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return stamp(record.created)  # the access log's own formatter, so the two cannot drift apart


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Stamped("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, exit 2 for user mistakes, never a traceback for them. ``check``
    or ``top`` as the first word runs that command instead of the proxy."""
    args = sys.argv[1:] if argv is None else argv
    chosen = SUBCOMMANDS.get(args[0]) if args else None
    if chosen is not None:
        args, prog = args[1:], f"l4proxy {args[0]}"
    else:
        chosen, prog = command, "l4proxy"
    try:
        chosen.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        _fail(exc.format_message())
    except ConfigFileError as exc:
        print("\n".join(exc.lines()), file=sys.stderr)
        sys.exit(2)
    except ConfigError as exc:
        _fail(str(flagged(exc)))
    except click.exceptions.Abort:
        sys.exit(130)


def _fail(message: str) -> None:
    print(f"l4proxy: error: {message}", file=sys.stderr)
    sys.exit(2)
