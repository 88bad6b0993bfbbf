"""Active health probes: one task per member, each on its own jittered schedule.

A probe is a TCP connect (with a TLS handshake when the pool originates TLS) and, when configured, a
write of ``send`` and a read that must start with ``expect`` (Redis: ``PING\\r\\n`` -> ``+PONG``).
Results go to ``Pool.report``; failure reasons tell refused, timeout, TLS and wrong-reply apart.
Probes use streams: they are off the data path and run once per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

from .balancer import Member
from .errors import failure_kind, out_of_descriptors
from .health import Event
from .pool import Pool


class Prober:
    """Runs the probes of one pool until ``stop``."""

    def __init__(self, pool: Pool, rng: random.Random | None = None) -> None:
        self.pool = pool
        self.rng = rng or random.Random()
        self.tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        if not self.pool.config.health.enabled:
            return
        for member in self.pool.members:
            self.tasks.append(asyncio.create_task(self._run(member), name=f"probe {member.name}"))

    async def stop(self) -> None:
        """Cancel every probe and wait for it; cancel again if a probe swallowed the first one."""
        self._stopping = True
        for task in self.tasks:
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.1)
            if not task.cancelled():
                with contextlib.suppress(Exception):
                    task.result()
        self.tasks.clear()

    async def _run(self, member: Member) -> None:
        interval = self.pool.config.health.interval
        await asyncio.sleep(self.rng.uniform(0, interval))  # spread members' probes apart
        while not self._stopping:
            try:
                ok, reason = await probe(self.pool, member)
            except OSError:  # out of our own descriptors: no verdict on the member this time
                pass
            else:
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
