"""Active health probes: one task per member, each on its own jittered schedule.

A probe is a TCP connect (with a TLS handshake when the pool originates TLS) and, when configured, a
write of ``send`` and a read that must start with ``expect`` (Redis: ``PING\\r\\n`` -> ``+PONG``).
Results go to ``Pool.report``; failure reasons tell refused, timeout, TLS and wrong-reply apart.
Every result is also logged at debug level (``--log-level debug``), with the probe's duration.
Probes use streams: they are off the data path and run once per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from .balancer import Member
from .counters import DISABLED
from .errors import failure_kind, out_of_descriptors
from .health import Event
from .pool import Pool

log = logging.getLogger("l4proxy.health")


class Prober:
    """Runs the probes of one pool until ``stop``: one task per member, kept in step with the pool's
    members by ``sync`` (which ``Pool.update`` calls once the prober has started)."""

    def __init__(self, pool: Pool, rng: random.Random | None = None) -> None:
        self.pool = pool
        self.rng = rng or random.Random()
        self.tasks: dict[Member, asyncio.Task[None]] = {}
        self._leaving: set[asyncio.Task[None]] = set()  # probes of removed members, cancelled
        self._stopping = False

    def start(self) -> None:
        if not self.pool.config.health.enabled:
            return
        self.pool.probes = self
        self.sync()

    def sync(self) -> None:
        """Probe exactly the pool's current members: start the added ones, cancel the removed ones."""
        current = set(self.pool.members)
        for member in [m for m in self.tasks if m not in current]:
            task = self.tasks.pop(member)
            task.cancel()
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

    async def _run(self, member: Member) -> None:
        interval = self.pool.config.health.interval
        me = asyncio.current_task()
        await asyncio.sleep(self.rng.uniform(0, interval))  # spread members' probes apart
        while not self._stopping and self.tasks.get(member) is me:  # until stopped or the member is removed
            if member.admin == DISABLED:  # held by the operator: no checks until enabled
                await asyncio.sleep(interval * self.rng.uniform(0.9, 1.1))
                continue
            started = time.monotonic()
            try:
                ok, reason = await probe(self.pool, member)
            except OSError:  # out of our own descriptors: no verdict on the member this time
                log.debug("probe of %s in pool %s skipped: out of descriptors", member.name, self.pool.name)
            else:
                took = (time.monotonic() - started) * 1000
                log.debug("probe of %s in pool %s: %s (%.1f ms)", member.name, self.pool.name, reason, took)
                member.stats.checked(ok, reason, took / 1000, time.time())
                self.pool.report(member, Event.PROBE_OK if ok else Event.PROBE_FAIL, reason)
            await asyncio.sleep(interval * self.rng.uniform(0.9, 1.1))


async def probe(pool: Pool, member: Member) -> tuple[bool, str]:
    """One probe of ``member``: (passed, reason). Raises OSError when the proxy is out of descriptors."""
    health = pool.config.health
    try:
        async with asyncio.timeout(health.timeout):  # unlike wait_for on 3.11, never swallows a cancel
            return await _probe(pool, member)
    except (TimeoutError, OSError) as exc:
        if out_of_descriptors(exc):
            raise
        return False, f"check failed: {failure_kind(exc)}"


async def _probe(pool: Pool, member: Member) -> tuple[bool, str]:
    health = pool.config.health
    address = member.address
    kwargs: dict[str, object] = {}
    if pool.ssl_context is not None and pool.config.tls is not None:
        from .tls import server_hostname

        kwargs = {"ssl": pool.ssl_context, "server_hostname": server_hostname(pool.config.tls, address.host)}
    reader, writer = await asyncio.open_connection(address.host, address.port, **kwargs)  # type: ignore[arg-type]
    try:
        if health.send:
            writer.write(health.send)
            await writer.drain()
        if health.expect:
            reply = await _read_prefix(reader, len(health.expect))
            if not reply.startswith(health.expect):
                return False, f"check failed: wrong reply {reply[:40]!r}, expected {health.expect!r}"
        return True, "check passed"
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await writer.wait_closed()


async def _read_prefix(reader: asyncio.StreamReader, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await reader.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data
