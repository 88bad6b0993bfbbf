"""Service discovery decisions: what a pool's DNS-named members stand for after each resolution.

A pool's configured members (its *targets*) are IP addresses, DNS names (``redis.svc:6379``) and SRV
names (``srv:_redis._tcp.cache.svc.cluster.local``). ``resolver.py`` looks the names up every
``resolve_interval``; this module decides what the answers mean. Rules:

* Every address of a name is a member, keyed ``name@ip:port`` (``config.Resolved``), so a member is the
  same object, health and sessions included, for as long as its name keeps answering with its address.
* An IP literal is never resolved. A name with no good answer yet is kept as it is (the dialer resolves
  it at connect time, as without discovery); an SRV name with no good answer yet has no members.
* A failed lookup (timeout, server failure) keeps the name's last good set.
* An empty answer (no such name, no address) keeps the last good set too, unless every answer for
  ``empty_after`` seconds, counted from the first empty one, was empty: then the set is empty (a
  service scaled to zero). A failed lookup in between neither confirms nor ends that streak.
* SRV: only the records of the lowest priority are used (higher priorities would be backups, which
  pools do not have yet, so they are ignored); a record whose target is ``.`` or whose port is 0 says
  "no service here" and is skipped. The port is the record's, the weight is the record's (0, which
  RFC 2782 gives a small share when others are heavier, counts as 1). If any target's lookup failed,
  the whole answer counts as failed, so a glitch on one target does not drain its members.
* Members added because a name's answer *changed* wait for a passing probe before they get sessions
  (``Plan.check_first``); members from a name's first good answer start UP, as at start-up.
* Make before break: an address a name no longer has (``Tracker.leaving``) stays a member while none
  of the name's current addresses is UP, until the next answer, so a name that moved to one new
  address is not left without a member while that address waits for its probe. An empty answer
  that is taken drains at once.

Pure: no sockets, no event loop, no clock (time is an argument).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from .config import Address, MemberConfig, Resolved, Service, is_ip

Target = Address | Service


def needs_resolving(target: Target) -> bool:
    """Whether discovery looks ``target`` up: SRV names and host names, never IP literals."""
    return isinstance(target, Service) or not is_ip(target.host)


def unresolved(targets: Iterable[Target]) -> list[Address]:
    """The members before any resolution: addresses and host names as they are, SRV names none."""
    return [target for target in targets if isinstance(target, Address)]


@dataclass(frozen=True, slots=True)
class SRVRecord:
    """One SRV record (RFC 2782)."""

    priority: int
    weight: int
    port: int
    target: str


def srv_choice(records: Iterable[SRVRecord]) -> list[SRVRecord]:
    """The records to use: those of the lowest priority, without "no service" records."""
    usable = [r for r in records if r.port and r.target.rstrip(".")]
    if not usable:
        return []
    lowest = min(r.priority for r in usable)
    return [r for r in usable if r.priority == lowest]


@dataclass(frozen=True, slots=True)
class Answer:
    """One lookup's outcome: the addresses found (empty: the name has none), or why the lookup failed."""

    addresses: tuple[Resolved, ...] = ()
    error: str = ""  # set: nothing was learnt


def _ip_order(address: Resolved) -> tuple[int, int, int]:
    ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    return ip.version, int(ip), address.port


def address_answer(name: str, port: int, ips: Iterable[str]) -> Answer:
    """The answer for host name ``name``: one member per distinct IP, in a stable order."""
    found = {Resolved(ip, port, name=name) for ip in ips}
    return Answer(tuple(sorted(found, key=_ip_order)))


def srv_answer(records: Iterable[SRVRecord], ips: Mapping[str, Sequence[str]], failed: Mapping[str, str]) -> Answer:
    """The answer for an SRV name from its records, the IPs each target resolved to and the targets whose
    lookup failed (by target name, with the reason)."""
    chosen = srv_choice(records)
    errors = [f"{target}: {failed[target]}" for target in sorted({r.target for r in chosen}) if target in failed]
    if errors:
        return Answer(error="; ".join(errors))
    found: dict[tuple[str, int, str], Resolved] = {}
    for record in chosen:
        name = record.target.rstrip(".")
        weight = max(record.weight, 1)
        for ip in ips.get(record.target, ()):
            found.setdefault((ip, record.port, name), Resolved(ip, record.port, name=name, weight=weight))
    return Answer(tuple(sorted(found.values(), key=lambda a: (a.name, *_ip_order(a)))))


class Verdict(enum.Enum):
    """What one answer did to a name's set."""

    FIRST = "first"  # the first good answer
    SAME = "same"
    CHANGED = "changed"
    FAILED = "failed"  # the lookup failed: last good set kept
    EMPTY_KEPT = "empty_kept"  # empty, but not for long enough: last good set kept
    EMPTY_TAKEN = "empty_taken"  # empty for ``empty_after``: the set is now empty


class Tracker:
    """What one name stands for across resolutions (the rules in the module's docstring)."""

    __slots__ = ("addresses", "empty_after", "empty_since", "failing", "leaving")

    def __init__(self, empty_after: float) -> None:
        self.empty_after = empty_after
        self.addresses: tuple[Resolved, ...] | None = None  # None: no good answer yet
        self.empty_since: float | None = None
        self.failing = 0  # lookups failed in a row
        self.leaving: tuple[Resolved, ...] = ()  # addresses the last change took away

    def observe(self, answer: Answer, now: float) -> Verdict:
        if answer.error:
            self.failing += 1
            return Verdict.FAILED
        self.failing = 0
        self.leaving = ()
        if not answer.addresses:
            return self._empty(now)
        self.empty_since = None
        before, self.addresses = self.addresses, answer.addresses
        if before is None:
            return Verdict.FIRST
        if set(before) == set(answer.addresses):
            return Verdict.SAME
        self.leaving = tuple(address for address in before if address not in answer.addresses)
        return Verdict.CHANGED

    def _empty(self, now: float) -> Verdict:
        if self.empty_since is None:
            self.empty_since = now
        if self.addresses == ():
            return Verdict.SAME
        if now - self.empty_since >= self.empty_after:
            self.addresses = ()
            return Verdict.EMPTY_TAKEN
        return Verdict.EMPTY_KEPT


def lingering(tracker: Tracker, up: Collection[str]) -> tuple[Resolved, ...]:
    """The addresses a name no longer has that stay members for now: those its last change took away,
    while none of its current addresses is UP (``up``: the keys of the members that are)."""
    if any(str(address) in up for address in tracker.addresses or ()):
        return ()
    return tracker.leaving


def expand(
    targets: Iterable[Target],
    known: Mapping[Target, tuple[Resolved, ...] | None],
    linger: Mapping[Target, tuple[Resolved, ...]] | None = None,
) -> list[Address]:
    """The pool's members: each target's current addresses, then those lingering, in the targets' order
    (see the rules)."""
    members: list[Address] = []
    for target in targets:
        if isinstance(target, Address) and is_ip(target.host):
            members.append(target)
            continue
        addresses = known.get(target)
        if addresses is not None:
            members.extend(addresses)
            members.extend(linger.get(target, ()) if linger else ())
        elif isinstance(target, Address):
            members.append(target)
    return members


def unresolved_members(members: Iterable[MemberConfig]) -> list[MemberConfig]:
    """``unresolved`` for configured members, keeping each one's settings."""
    return [member for member in members if isinstance(member.address, Address)]


def expand_members(
    members: Iterable[MemberConfig],
    known: Mapping[Target, tuple[Resolved, ...] | None],
    linger: Mapping[Target, tuple[Resolved, ...]] | None = None,
) -> list[MemberConfig]:
    """``expand`` for configured members: every address a member stands for has that member's weight,
    max_conns and role (a ``Resolved`` address also carries its SRV weight, which the balancer multiplies
    in)."""
    return [
        member if address is member.address else replace(member, address=address)
        for member in members
        for address in expand((member.address,), known, linger)
    ]


@dataclass(frozen=True, slots=True)
class Plan:
    """How the members change, by key: ``check_first`` are the added ones that wait for a probe."""

    add: tuple[str, ...]
    keep: tuple[str, ...]
    drain: tuple[str, ...]
    check_first: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.add or self.drain)


def plan(current: Sequence[str], wanted: Sequence[str], first: Collection[str] = ()) -> Plan:
    """From the member keys ``current`` to ``wanted``; added keys in ``first`` (a name's first good
    answer) start UP, every other added key waits for a passing probe."""
    now, then = set(current), set(wanted)
    add = tuple(key for key in wanted if key not in now)
    return Plan(
        add=add,
        keep=tuple(key for key in wanted if key in now),
        drain=tuple(key for key in current if key not in then),
        check_first=tuple(key for key in add if key not in first),
    )
