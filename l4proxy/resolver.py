"""DNS discovery at run time: a pool's named members looked up every ``resolve_interval``.

Host names go through the system resolver, as every other program on the host resolves them
(resolv.conf search domains, /etc/hosts, nsswitch), by the loop's ``getaddrinfo`` (a thread, so the
loop never blocks); SRV names through dnspython's asyncio resolver (configured from /etc/resolv.conf).
Every lookup is bounded by ``LOOKUP_TIMEOUT``. What the answers mean (which members to add, keep and
drain, when an empty answer counts, which new members wait for a probe) is decided in
``discovery.py``; this module only asks and applies, through ``Pool.set_members``.

The first round runs before the proxy accepts clients, so the first clients already see every
address; its members start UP, as members do at start-up. While addresses a name left linger (until
one of its new addresses passes its first probe), ``apply`` runs again every 1.5 health timeouts.
Failed lookups and empty answers that are not taken are logged (once per streak) and counted in
``failures`` and ``empty``.

Both seams are arguments, so tests point them at a DNS server of their own: ``getaddrinfo`` (the
loop's by default) and ``dns`` (a ``dns.asyncresolver.Resolver``; made on first use by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .balancer import member_keys
from .config import Address, PoolConfig, Resolved, Service
from .discovery import (
    Answer,
    SRVRecord,
    Target,
    Tracker,
    Verdict,
    address_answer,
    expand_members,
    lingering,
    needs_resolving,
    plan,
    srv_answer,
    srv_choice,
)
from .errors import ConfigError
from .pool import Pool

log = logging.getLogger("l4proxy.discovery")

LOOKUP_TIMEOUT = 5.0  # seconds one lookup (a name, or an SRV name with its targets) may take
GetAddrInfo = Callable[..., Awaitable[list[tuple[Any, ...]]]]
# getaddrinfo's "this name has no address" (NXDOMAIN, or no A/AAAA record): an answer, not a failure
_NO_ADDRESS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class Resolver:
    """Keeps one pool's members in step with DNS until ``stop``."""

    def __init__(self, pool: Pool, getaddrinfo: GetAddrInfo | None = None, dns: Any = None) -> None:
        self.pool = pool
        self.getaddrinfo = getaddrinfo
        self.dns = dns
        self.clock: Callable[[], float] = time.monotonic
        self.trackers: dict[Target, Tracker] = {}
        self.rounds = 0
        self.failures = 0  # lookups that failed (the last good set was kept)
        self.empty = 0  # empty answers not taken (the last good set was kept)
        self._task: asyncio.Task[None] | None = None
        self._recheck: asyncio.TimerHandle | None = None  # re-applies while old addresses linger

    @staticmethod
    def wanted(config: PoolConfig) -> bool:
        """Whether ``config`` has any member to look up (a pool of IP addresses needs no resolver)."""
        return any(needs_resolving(member.address) for member in config.members)

    def start(self) -> None:
        """Resolve every ``resolve_interval`` from now on (after a first ``resolve``)."""
        self._task = asyncio.create_task(self._run(), name=f"resolve pool {self.pool.name}")

    async def stop(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.pool.config.resolve_interval)
            try:
                await self.resolve()
            except Exception:  # a bug must not end discovery for good: say so, try again next time
                log.exception("pool %s: resolving its members failed", self.pool.name)

    async def resolve(self) -> None:
        """One round: look every named member up, then apply what the answers mean."""
        config = self.pool.config
        targets = [t for t in dict.fromkeys(m.address for m in config.members) if needs_resolving(t)]
        answers = await asyncio.gather(*(self._lookup(target) for target in targets))
        self.rounds += 1
        now = self.clock()
        first: set[str] = set()
        for target, answer in zip(targets, answers, strict=True):
            tracker = self.trackers.setdefault(target, Tracker(config.resolve_empty_after))
            failing = tracker.failing
            verdict = tracker.observe(answer, now)
            self._say(target, tracker, verdict, answer, failing, now)
            if verdict is Verdict.FIRST:
                first.update(str(address) for address in answer.addresses)
        for gone in [t for t in self.trackers if t not in targets]:  # no longer configured
            del self.trackers[gone]
        self.apply(first)

    def apply(self, first: set[str] | frozenset[str] = frozenset()) -> None:
        """Make the pool's members what the names stand for now (no lookup); ``first``: the keys from
        names' first good answers, which start UP."""
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        pool = self.pool
        current = [m.key for m in pool.members]
        linger: dict[Target, tuple[Resolved, ...]] = {}
        if pool.config.health.enabled:  # without probes, new addresses are UP at once: nothing to bridge
            up = {m.key for m in pool.members if m.health.up}
            linger = {t: lingering(tracker, up) for t, tracker in self.trackers.items()}
            linger = {t: tuple(a for a in kept if str(a) in current) for t, kept in linger.items()}
        known = {t: tracker.addresses for t, tracker in self.trackers.items()}
        members = expand_members(pool.config.members, known, linger)
        change = plan(current, member_keys([m.address for m in members]), first)
        if change.changed:
            try:
                pool.set_members(members, change.check_first)
            except ConfigError as exc:  # the workers' shared table is full: keep the members as they are
                self.failures += 1
                log.error("pool %s: cannot take the resolved members: %s", pool.name, exc.problem)
        if any(linger.values()):  # drain them once a new address has passed its first probe
            delay = pool.config.health.timeout * 1.5
            self._recheck = asyncio.get_running_loop().call_later(delay, self.apply)

    def _say(
        self, target: Target, tracker: Tracker, verdict: Verdict, answer: Answer, failing: int, now: float
    ) -> None:
        """Log what a lookup did: each failure or empty streak once, and its end."""
        pool = self.pool.name
        count = -1 if tracker.addresses is None else len(tracker.addresses)
        kept = {-1: "keeping it as it is", 1: "keeping its address"}.get(count, f"keeping its {count} addresses")
        if verdict is Verdict.FAILED:
            self.failures += 1
            level = logging.WARNING if tracker.failing == 1 else logging.DEBUG
            log.log(level, "pool %s: looking up %s failed (%s); %s", pool, target, answer.error, kept)
            return
        if failing:
            log.info("pool %s: looking up %s works again after %d failures", pool, target, failing)
        if verdict is Verdict.EMPTY_KEPT:
            self.empty += 1
            level = logging.WARNING if tracker.empty_since == now else logging.DEBUG
            after = self.pool.config.resolve_empty_after
            log.log(level, "pool %s: %s has no address; %s unless that lasts %gs", pool, target, kept, after)
        elif verdict is Verdict.EMPTY_TAKEN:
            log.warning("pool %s: %s has had no address for %gs; its members drain", pool, target, tracker.empty_after)

    async def _lookup(self, target: Target) -> Answer:
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                if isinstance(target, Service):
                    return await self._lookup_srv(target.name)
                return await self._lookup_host(target)
        except TimeoutError:
            return Answer(error=f"no answer in {LOOKUP_TIMEOUT:g}s")

    async def _lookup_host(self, address: Address) -> Answer:
        getaddrinfo = self.getaddrinfo or asyncio.get_running_loop().getaddrinfo
        try:
            infos = await getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in _NO_ADDRESS:
                return Answer()
            return Answer(error=exc.strerror or str(exc))
        except (OSError, UnicodeError) as exc:
            return Answer(error=str(exc) or type(exc).__name__)
        return address_answer(address.host, address.port, (str(info[4][0]) for info in infos))

    async def _lookup_srv(self, name: str) -> Answer:
        import dns.exception
        import dns.resolver

        try:
            if self.dns is None:
                import dns.asyncresolver

                self.dns = dns.asyncresolver.Resolver()
            try:
                reply = await self.dns.resolve(name, "SRV")
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return Answer()
            records = [SRVRecord(r.priority, r.weight, r.port, r.target.to_text()) for r in reply]
            targets = sorted({record.target for record in srv_choice(records)})
            found = await asyncio.gather(*(self._target_ips(target) for target in targets))
        except dns.exception.DNSException as exc:
            return Answer(error=str(exc) or type(exc).__name__)
        ips = {target: got for target, got in zip(targets, found, strict=True) if isinstance(got, list)}
        failed = {target: got for target, got in zip(targets, found, strict=True) if isinstance(got, str)}
        return srv_answer(records, ips, failed)

    async def _target_ips(self, target: str) -> list[str] | str:
        """An SRV target's IPv4 and IPv6 addresses, or why they could not be looked up."""
        import dns.exception
        import dns.resolver

        ips: list[str] = []
        for kind in ("A", "AAAA"):
            try:
                reply = await self.dns.resolve(target, kind)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                return str(exc) or type(exc).__name__
            ips.extend(r.address for r in reply)
        return ips
