"""Active health probes: one task per member, each on its own jittered schedule.

A probe connects (with a TLS handshake when the pool originates TLS) and then holds the conversation
of the pool's check kind (``checks``: tcp, send-expect, and the ``httpcheck``, ``resp`` and ``pgwire``
kinds), which are pure; this module only moves their bytes. The TLS handshake is the sessions' own
(``dialer.connect_tls`` on ``tlsengine.TLSEngine``), late verdict included: a TLS 1.3 member that
rejects our client certificate (or its absence) says so in an alert just after the handshake, and
that fails the probe as ``tls`` as it fails a session's connect, where the loop's TLS transport would
have taken the connection for a pass. A probe of a plain pool opens a plain stream.

Results go to ``Pool.report`` with a reason naming the failure kind (refused, timeout, wrong role,
auth failed, bad reply, server error, tls), and each failure is counted by member and kind in
``Prober.failures``. Every result is also logged at debug level (``--log-level debug``), with the
probe's duration. Probes use streams: they are off the data path and run once per interval.

In a pool with a ``*-primary`` check, the members UP that passed it (and have not said another role
since) claim the primary role, and new sessions go only to a lone claimant (``Pool.restrict``): none
before the first probe passes. More than one at once is a split brain, logged once per episode
(``checks.SplitBrain``) and counted; it routes to none of them (fail closed), or with ``split_brain =
"prefer-newest"`` to the one that turned primary last (the latest first pass among the claimants).

With ``send_proxy`` a probe starts with the header of a connection of the proxy's own (``LOCAL`` in
v2, ``PROXY UNKNOWN`` in v1), before TLS when the pool speaks it, as HAProxy's ``check-send-proxy``;
and like HAProxy's, not to a side port (an http check's ``port``), which serves something else.

The local address of each member's latest probe connection stays in ``outgoing`` (the proxy's set)
until the next probe of that member replaces it, so a member that leads back to the proxy is caught
however fast the probe itself is done (``dialer.py``, Loops).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Collection

from .balancer import Member
from .checks import (
    PRIMARY_KINDS,
    Connect,
    Conversation,
    Credentials,
    Failure,
    SendExpect,
    SplitBrain,
    Verdict,
    from_exception,
    load_credentials,
)
from .counters import DISABLED
from .dialer import connect_tls, connected_after
from .errors import out_of_descriptors
from .health import Event
from .pool import Pool
from .proxyproto import V1_UNKNOWN, V2_LOCAL

log = logging.getLogger("l4proxy.health")


class Prober:
    """Runs the probes of one pool until ``stop``: one task per member, kept in step with the pool's
    members by ``sync`` (which ``Pool.update`` calls once the prober has started)."""

    def __init__(
        self,
        pool: Pool,
        rng: random.Random | None = None,
        outgoing: set[object] | None = None,
        ports: Collection[int] = (),
    ) -> None:
        self.pool = pool
        self.rng = rng or random.Random()
        self.outgoing = outgoing if outgoing is not None else set()
        self.ports = ports  # the ports we listen on: only a member on one of them can lead back here
        self._held: dict[Member, object] = {}  # each member's latest probe address in outgoing
        self.tasks: dict[Member, asyncio.Task[None]] = {}
        self._leaving: set[asyncio.Task[None]] = set()  # probes of removed members, cancelled
        self._stopping = False
        self.failures: Counter[tuple[str, Failure]] = Counter()  # by member key and kind
        self.credentials: Credentials | None = None
        self._keys: dict[tuple[bytes, int], bytes] = {}  # SCRAM salted passwords, derived once
        primary = pool.config.health.kind in PRIMARY_KINDS
        self.split_brain: SplitBrain | None = SplitBrain() if primary else None
        self._passing: dict[Member, float] = {}  # members claiming the primary role: since when (monotonic)
        self._allowed: tuple[Member, ...] | None = None  # where a primary pool routes now

    def start(self) -> None:
        """Start probing; a credentials file that cannot be used raises ConfigError (``auth``)."""
        health = self.pool.config.health
        if not health.enabled:
            return
        if health.auth is not None:
            self.credentials = load_credentials(health.auth, health.kind)
        self._allowed = () if self.split_brain is not None else None  # a primary pool: none until one claims it
        self.pool.restrict(self._allowed)
        self.pool.probes = self
        self.sync()

    def sync(self) -> None:
        """Probe exactly the pool's current members: start the added ones, cancel the removed ones."""
        current = set(self.pool.members)
        for member in [m for m in self.tasks if m not in current]:
            task = self.tasks.pop(member)
            self._passing.pop(member, None)
            task.cancel()
            self._hold(member, None)
            self._leaving.add(task)
            task.add_done_callback(self._left)
        for member in self.pool.members:
            if member not in self.tasks:
                self.tasks[member] = asyncio.create_task(self._run(member), name=f"probe {member.name}")

    def _left(self, task: asyncio.Task[None]) -> None:
        self._leaving.discard(task)
        if not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()

    async def stop(self) -> None:
        """Cancel every probe and wait for it; cancel again if a probe swallowed the first one."""
        self._stopping = True
        if self.pool.probes is self:
            self.pool.probes = None
        for task in [*self.tasks.values(), *self._leaving]:
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.1)
            if not task.cancelled():
                with contextlib.suppress(Exception):
                    task.result()
        self.tasks.clear()
        self._leaving.clear()
        for member in list(self._held):
            self._hold(member, None)

    def conversation(self, member: Member) -> Conversation:
        """A fresh conversation of the pool's check kind with ``member``."""
        health = self.pool.config.health
        kind = health.kind
        if kind == "tcp":
            return Connect()
        if kind == "send-expect":
            return SendExpect(health.send, health.expect, health.expect_match)
        if kind == "http":
            from .httpcheck import HttpCheck

            port = health.port or member.address.port
            host = f"[{member.address.host}]" if ":" in member.address.host else member.address.host
            return HttpCheck(f"{host}:{port}", health.path or "/", health.status or "2xx")
        if kind.startswith("redis"):
            from .resp import RedisCheck

            return RedisCheck(kind == "redis-primary", self.credentials)
        from .pgwire import PostgresCheck

        assert self.credentials is not None, "validated: the postgres checks need credentials"
        return PostgresCheck(kind == "postgres-primary", self.credentials, secrets.token_urlsafe(18), self._keys)

    async def _run(self, member: Member) -> None:
        interval = self.pool.config.health.interval
        me = asyncio.current_task()
        if member.health.up:  # spread members' probes apart; one waiting for its first probe gets it now
            await asyncio.sleep(self.rng.uniform(0, interval))
        while not self._stopping and self.tasks.get(member) is me:  # until stopped or the member is removed
            if member.admin == DISABLED:  # held by the operator: no checks until enabled
                await asyncio.sleep(interval * self.rng.uniform(0.9, 1.1))
                continue
            started = time.monotonic()
            try:
                verdict = await probe(
                    self.pool, member, self.conversation(member), lambda sockname: self._hold(member, sockname)
                )
            except OSError:  # out of our own descriptors: no verdict on the member this time
                log.debug("probe of %s in pool %s skipped: out of descriptors", member.name, self.pool.name)
            else:
                took = (time.monotonic() - started) * 1000
                log.debug("probe of %s in pool %s: %s (%.1f ms)", member.name, self.pool.name, verdict.reason, took)
                member.stats.checked(verdict.ok, verdict.reason, took / 1000, time.time())
                if verdict.failure is not None:
                    self.failures[member.key, verdict.failure] += 1
                self.pool.report(member, Event.PROBE_OK if verdict.ok else Event.PROBE_FAIL, verdict.reason)
                if self.split_brain is not None:
                    self._watch_primaries(member, verdict)
            await asyncio.sleep(interval * self.rng.uniform(0.9, 1.1))
        self._hold(member, None)

    def _hold(self, member: Member, sockname: object) -> None:
        """Keep ``sockname`` in ``outgoing`` as the member's latest probe address (None: forget it)."""
        self.outgoing.discard(self._held.pop(member, None))
        # A member on another port is not us, and recording its probe's address would take a client
        # that the kernel later gives the same local port for a loop.
        if sockname is not None and member.address.port in self.ports:
            self.outgoing.add(sockname)
            self._held[member] = sockname

    def _watch_primaries(self, member: Member, verdict: Verdict) -> None:
        """Route a primary pool to its one primary, and log the start and the end of each split-brain
        episode, once each. A member claims the primary role from its first passing probe until one
        says it has another role, while it is UP (other failures take it DOWN by the fall rule)."""
        assert self.split_brain is not None
        if verdict.ok:
            self._passing.setdefault(member, time.monotonic())
        elif verdict.failure is Failure.WRONG_ROLE:
            self._passing.pop(member, None)
        claimants = [m for m in self.pool.members if m.health.up and m in self._passing]
        self._route(claimants)
        episode = self.split_brain.observe([m.name for m in claimants])
        if episode is None:
            return
        if episode.began:
            routed = (f"new sessions go to {self._allowed[0].name}, the last to turn primary" if self._allowed
                      else "no member gets new sessions until one alone claims it")  # fmt: skip
            log.error(
                "pool %s split brain: %d members claim the primary role: %s; %s",
                self.pool.name, len(episode.claimants), ", ".join(episode.claimants), routed,
            )  # fmt: skip
        else:
            now = f"{episode.claimants[0]} claims" if episode.claimants else "no member claims"
            log.warning("pool %s split brain over: %s the primary role", self.pool.name, now)

    def _route(self, claimants: list[Member]) -> None:
        """New sessions go to the one claimant; with several, to none (``split_brain = "fail-closed"``)
        or to the one that turned primary last (``"prefer-newest"``). A primary routed to before and not
        now (demoted, or one of a split brain) that is still UP has its sessions closed with
        ``on_member_down = "close"``, as a member DOWN has (``Pool.report``)."""
        pool = self.pool
        allowed: tuple[Member, ...] = ()
        if len(claimants) == 1:
            allowed = (claimants[0],)
        elif claimants and pool.config.split_brain == "prefer-newest":
            allowed = (max(claimants, key=self._passing.__getitem__),)
        split = len(claimants) > 1 and not allowed
        if allowed == self._allowed and split == pool.balancer.split:
            return
        lost = [m for m in self._allowed or () if m not in allowed and m.health.up]
        self._allowed = allowed
        pool.restrict(allowed, split)
        if pool.on_down is not None and pool.config.on_member_down == "close":
            for member in lost:
                pool.on_down(pool, member, "is no longer the primary")


async def probe(
    pool: Pool, member: Member, conversation: Conversation, connected: Callable[[object], None] | None = None
) -> Verdict:
    """One probe of ``member``: its verdict. Raises OSError when the proxy is out of descriptors.
    ``connected`` is given the probe connection's local address."""
    try:
        async with asyncio.timeout(pool.config.health.timeout):  # unlike wait_for on 3.11, never swallows a cancel
            return await _converse(pool, member, conversation, connected)
    except TimeoutError:
        return conversation.stalled() or Verdict(Failure.TIMEOUT)
    except OSError as exc:
        if out_of_descriptors(exc):
            raise
        return from_exception(exc)


async def _converse(
    pool: Pool, member: Member, conversation: Conversation, connected: Callable[[object], None] | None
) -> Verdict:
    health = pool.config.health
    address = member.address
    port = health.port if health.port is not None else address.port
    header = _HEADERS.get(pool.config.send_proxy or "") if health.port is None else None
    if pool.ssl_context is not None:
        reader, writer = await _open_tls(pool, member, port, header, time.monotonic() + health.timeout)
    else:
        reader, writer = await asyncio.open_connection(address.host, port)
        if header is not None:
            writer.write(header)
    if connected is not None:
        connected(writer.get_extra_info("sockname"))
    try:
        out, verdict = conversation.start()
        if verdict is not None:  # nothing to hear back: the write itself must succeed
            if out:
                writer.write(out)
                await writer.drain()
            return verdict
        while verdict is None:
            if out:
                writer.write(out)
            data = await reader.read(65536)
            if not data:
                return conversation.closed()
            out, verdict = conversation.feed(data)
        if out:  # a courtesy (PostgreSQL's Terminate): the verdict stands whatever happens to it
            with contextlib.suppress(OSError):
                writer.write(out)
                await writer.drain()
        return verdict
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await writer.wait_closed()


async def _open_tls(
    pool: Pool, member: Member, port: int, header: bytes | None, by: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over the sessions' own TLS dial (``dialer.connect_tls``): the same engine, so the same
    late verdict of a TLS 1.3 member that rejects our certificate (or its absence) after the handshake,
    which the loop's TLS transport would take for a connection. ``header`` goes first, in the clear.
    ``by``, the probe's deadline, bounds that wait, so a member that sends no tickets passes in time."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_LIMIT, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    if header is None:
        _, engine = await connect_tls(loop, pool, member, protocol, {"host": member.address.host, "port": port}, by)
    else:
        sock = await connected_after(loop, member.address.host, port, header)
        try:
            _, engine = await connect_tls(loop, pool, member, protocol, {"sock": sock}, by)
        except BaseException:
            sock.close()
            raise
    return reader, asyncio.StreamWriter(engine, protocol, reader, loop)  # type: ignore[arg-type]


_HEADERS = {"v1": V1_UNKNOWN, "v2": V2_LOCAL}  # a probe is the proxy's own connection
_LIMIT = 2**16  # asyncio.open_connection's default buffer limit
