"""Who may connect: CIDR allow/deny sets, and per-source connection counts and rates.

ACL rules:

* ``allow`` and ``deny`` are CIDR ranges, IPv4 and IPv6. With no allow range every source is allowed;
  with any, only sources in an allow range are (of either family: an IPv4-only allow list refuses every
  IPv6 source). Deny wins over allow.
* An IPv4-mapped IPv6 source (``::ffff:10.1.2.3``, what a dual-stack socket reports for an IPv4 client)
  is matched as the IPv4 address, and a rule written inside ``::ffff:0:0/96`` is turned into the IPv4
  range it covers. A wider IPv6 rule (``::/0``) therefore matches IPv6 clients only.
* The rules are compiled once into sorted, disjoint integer ranges per family, deny already taken out,
  so a check is one address parse and one bisection; a bounded cache of recent verdicts (cleared
  when full, so a flood of new sources costs a parse each and nothing more) makes a repeat source a
  dict lookup.

Per-source limits (``SourceTable``), keyed by the source's text as the kernel reports it (an IPv4-mapped
address as its IPv4 text):

* ``max_connections_per_ip``: a source with that many live connections is refused more.
* ``rate_per_ip``: a token bucket per source, ``rate`` tokens a second and a burst of ``rate``; each
  admitted connection takes a token, a source with less than one is refused.
* Memory: a source with live connections has an entry until its last one ends (bounded by the live
  connections, which the listener already limits) and is never evicted. Without a rate, an entry goes
  with its last connection. With a rate, an idle entry is kept for its bucket, at most ``capacity``
  of them; past that the least recently used idle entry is evicted. Forgetting a bucket that has
  refilled loses nothing; forgetting one that has not gives that source a fresh burst, which is the
  price of the bound (``evicted`` counts it).

Pure: no sockets, no clock; ``now`` is passed in.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_EXAMPLE = "expected an address or CIDR range such as 10.0.0.0/8 or 2001:db8::/32"
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_MAX_PREFIX = {4: 32, 6: 128}


def parse_cidr(text: str, field_name: str) -> Network:
    """A CIDR range (``10.0.0.0/8``, ``2001:db8::/32``) or one address (``10.1.2.3``, ``::1``)."""
    address_text, slash, prefix_text = text.strip().partition("/")
    if not address_text:
        raise ConfigError(field_name, text, _EXAMPLE)
    address = _parse_address(address_text, text, field_name)
    top = _MAX_PREFIX[address.version]
    if not slash:
        prefix = top
    elif not (prefix_text.isascii() and prefix_text.isdigit()):
        raise ConfigError(field_name, text, f"prefix length {prefix_text!r} is not a number")
    else:
        prefix = int(prefix_text)
    if not 0 <= prefix <= top:
        raise ConfigError(field_name, text, f"prefix length must be 0..{top}")
    network = ipaddress.ip_network((address, prefix), strict=False)
    if network.network_address != address:
        raise ConfigError(field_name, text, f"has host bits set: the range is {network}")
    return network


def _parse_address(address_text: str, text: str, field_name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(address_text)
    except ValueError:
        raise ConfigError(field_name, text, f"{address_text!r} is not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ConfigError(field_name, text, "a range cannot carry a zone index (%...)")
    return address


_RATE = re.compile(r"^\s*(\d+)\s*(?:/\s*s)?\s*$")


def parse_rate(text: str, field_name: str) -> int:
    """Connections a second from ``100/s`` or ``100``: at least 1."""
    match = _RATE.match(text)
    if not match or not text.isascii():
        raise ConfigError(field_name, text, "expected a rate such as 100/s")
    rate = int(match.group(1))
    if rate < 1:
        raise ConfigError(field_name, text, "must be at least 1/s")
    return rate


# --- allow / deny -----------------------------------------------------------------------------------

_Ranges = list[tuple[int, int]]  # sorted, disjoint, inclusive [first, last]


def _as_v4(network: Network) -> Network:
    """A rule inside the IPv4-mapped block, as the IPv4 range it covers."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _merge(ranges: Iterable[tuple[int, int]]) -> _Ranges:
    merged: _Ranges = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _subtract(keep: _Ranges, remove: _Ranges) -> _Ranges:
    """``keep`` minus ``remove``, both sorted and disjoint."""
    out: _Ranges = []
    for first, last in keep:
        for r_first, r_last in remove:
            if r_last < first or r_first > last:
                continue
            if r_first > first:
                out.append((first, r_first - 1))
            first = r_last + 1
            if first > last:
                break
        if first <= last:
            out.append((first, last))
    return out


class Acl:
    """Allow/deny rules compiled for fast membership checks of source addresses."""

    CACHE_SIZE = 4096

    def __init__(self, allow: Sequence[Network] = (), deny: Sequence[Network] = ()) -> None:
        self.allow = tuple(_as_v4(n) for n in allow)
        self.deny = tuple(_as_v4(n) for n in deny)
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version in (4, 6):
            if allow:
                keep = _merge(_span(n) for n in self.allow if n.version == version)
            else:
                keep = [(0, (1 << _MAX_PREFIX[version]) - 1)]
            ranges = _subtract(keep, _merge(_span(n) for n in self.deny if n.version == version))
            self._starts[version] = [first for first, _ in ranges]
            self._ends[version] = [last for _, last in ranges]
        self._cache: dict[str, bool] = {}

    def allows(self, host: str) -> bool:
        """Whether a client from ``host`` (an IP address's text) may connect; not an address: no."""
        verdict = self._cache.get(host)
        if verdict is None:
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            verdict = self._cache[host] = self._check(host)
        return verdict

    def _check(self, host: str) -> bool:
        parsed = _source_int(host)
        if parsed is None:
            return False
        version, value = parsed
        i = bisect_right(self._starts[version], value) - 1
        return i >= 0 and value <= self._ends[version][i]

    def refusal(self, host: str) -> str | None:
        """Why ``host`` is refused, for the log (slow: for refused clients only); None if it is allowed."""
        parsed = _source_int(host)
        if parsed is None:
            return "not an IP address"
        address = ipaddress.ip_address(parsed[1]) if parsed[0] == 4 else ipaddress.IPv6Address(parsed[1])
        denied = next((n for n in self.deny if address in n), None)
        if denied is not None:
            return f"denied by {denied}"
        if self.allow and not any(address in n for n in self.allow):
            return "in no allowed range"
        return None


def _span(network: Network) -> tuple[int, int]:
    return int(network.network_address), int(network.broadcast_address)


def _source_int(host: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an int), an IPv4-mapped address as IPv4; None if ``host`` is no address."""
    try:
        if ":" not in host:
            return 4, int(ipaddress.IPv4Address(host))
        if host.startswith("::ffff:") and "." in host:  # the kernel's form of a mapped address: parse once
            return 4, int(ipaddress.IPv4Address(host[7:]))
        address = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return None
    mapped = address.ipv4_mapped
    return (4, int(mapped)) if mapped is not None else (6, int(address))


# --- per-source limits ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """Per-source limits of one listener (per process with ``--workers``); None switches a limit off."""

    max_connections_per_ip: int | None = None
    rate_per_ip: int | None = None
    capacity: int = 65536  # idle entries kept for their buckets

    def __post_init__(self) -> None:
        if self.max_connections_per_ip is not None and self.max_connections_per_ip < 1:
            raise ConfigError("max_connections_per_ip", self.max_connections_per_ip, "must be at least 1")
        if self.rate_per_ip is not None and self.rate_per_ip < 1:
            raise ConfigError("rate_per_ip", self.rate_per_ip, "must be at least 1/s")
        if self.capacity < 1:
            raise ConfigError("source_table_capacity", self.capacity, "must be at least 1")


class _Source:
    __slots__ = ("count", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.count = 0
        self.tokens = tokens
        self.stamp = stamp


class SourceTable:
    """Live connections and token buckets per source, bounded in memory (see the module docstring).

    Build one only when a limit is set: with none, a listener needs no table and pays nothing.
    """

    def __init__(self, limits: SourceLimits) -> None:
        self.max_connections = limits.max_connections_per_ip
        self.rate = limits.rate_per_ip
        self.capacity = limits.capacity
        self.live: dict[str, _Source] = {}  # sources with live connections: never evicted
        self.idle: dict[str, _Source] = {}  # oldest use first; kept for their buckets (with a rate only)
        self.evicted = 0

    def admit(self, source: str, now: float) -> str | None:
        """Count a new connection from ``source``; None if admitted, else why it is refused.

        Every admitted connection must be ``release``d once when it ends.
        """
        source = source_key(source)
        entry = self.live.get(source)
        if entry is None:
            entry = self.idle.pop(source, None) or _Source(float(self.rate or 0), now)
        elif self.max_connections is not None and entry.count >= self.max_connections:
            return f"max_connections_per_ip {self.max_connections} reached"
        rate = self.rate
        if rate is not None:
            if now > entry.stamp:
                entry.tokens = min(float(rate), entry.tokens + (now - entry.stamp) * rate)
                entry.stamp = now
            if entry.tokens < 1:
                if entry.count == 0:
                    self._keep_idle(source, entry)
                return f"rate_per_ip {rate}/s exceeded"
            entry.tokens -= 1
        entry.count += 1
        self.live[source] = entry
        return None

    def release(self, source: str) -> None:
        """A connection ``admit`` let in has ended."""
        source = source_key(source)
        entry = self.live[source]
        entry.count -= 1
        if entry.count == 0:
            del self.live[source]
            if self.rate is not None:
                self._keep_idle(source, entry)

    def _keep_idle(self, source: str, entry: _Source) -> None:
        idle = self.idle
        idle[source] = entry
        if len(idle) > self.capacity:
            del idle[next(iter(idle))]
            self.evicted += 1

    def __len__(self) -> int:
        return len(self.live) + len(self.idle)


def source_key(host: str) -> str:
    """The table key for a peer address: an IPv4-mapped IPv6 address counts as its IPv4 address."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host
