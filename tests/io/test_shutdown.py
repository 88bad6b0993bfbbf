"""Graceful termination Kubernetes can rely on: ``--shutdown-delay`` and the spread of the forced closes.

On SIGTERM the proxy turns not ready at once (``Proxy.draining``, what readiness reads), keeps accepting
for the delay (endpoints take seconds to learn the pod is going), then stops accepting, lets sessions
finish up to the drain timeout, and closes what is left over the drain's last second. In process; the
command, with one process and with ``--workers 2``: ``e2e/test_shutdown_e2e.py``.
"""

from __future__ import annotations

import asyncio
import contextlib

from ..kit import Upstream, closed_at, connect, eventually, make_config, roundtrip, running, until_refused, upstreams


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A member that reads everything and never answers or closes."""
    while await reader.read(65536):
        pass


async def test_delay_flips_readiness_first_keeps_accepting_then_drains() -> None:
    delay = 1.5
    async with upstreams(1) as [server], running(
        make_config([server.address], shutdown_delay=delay, drain_timeout=5.0)
    ) as (proxy, log):
        port = proxy.port()
        reader, writer = await connect(port)
        writer.write(b"before ")
        assert await asyncio.wait_for(reader.readexactly(7), 5) == b"before "
        assert not proxy.draining
        loop = asyncio.get_running_loop()
        began = loop.time()
        drain = asyncio.create_task(proxy.drain())
        await eventually(lambda: proxy.draining)
        assert loop.time() - began < 0.5  # not ready at once ...
        assert await roundtrip(port, b"during the delay") == b"during the delay"  # ... yet accepting
        assert not drain.done()
        await until_refused(port)
        closed_after = loop.time() - began
        for word in (b"during ", b"drain"):  # the session opened before still relays both ways
            writer.write(word)
            assert await asyncio.wait_for(reader.readexactly(len(word)), 5) == word
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await asyncio.wait_for(drain, 5)
        writer.close()
    assert delay * 0.9 <= closed_after < delay + 2, closed_after
    served = {s.bytes_in: s.end_cause for s in log.sessions if s.bytes_in}  # the others: refusal probes
    assert served == {len(b"before during drain"): "eof", len(b"during the delay"): "eof"}


async def test_a_second_signal_ends_the_delay_and_closes_everything() -> None:
    async with Upstream(hold) as server, running(
        make_config([server.address], shutdown_delay=30.0, drain_timeout=30.0)
    ) as (proxy, log):
        reader, writer = await connect(proxy.port())
        writer.write(b"stay")
        await eventually(lambda: server.active == 1)
        drain = asyncio.create_task(proxy.drain())
        await eventually(lambda: proxy.draining)
        proxy.abort_all("forced_shutdown")
        await asyncio.wait_for(drain, 5)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert not proxy.sessions
        await eventually(lambda: server.active == 0)
    assert [s.end_cause for s in log.sessions] == ["forced_shutdown"]


async def test_forced_closes_are_spread_over_the_last_second() -> None:
    """20 sessions that never end: none is closed before the last second of the drain begins, and their
    closes span most of that second instead of one instant."""
    count, timeout = 20, 1.5
    async with Upstream(hold) as server, running(make_config([server.address], drain_timeout=timeout)) as (
        proxy,
        log,
    ):
        clients = [await connect(proxy.port()) for _ in range(count)]
        for _reader, writer in clients:
            writer.write(b"stay")
        await eventually(lambda: server.active == count)
        loop = asyncio.get_running_loop()

        watchers = [asyncio.create_task(closed_at(reader)) for reader, _writer in clients]
        began = loop.time()
        await asyncio.wait_for(proxy.drain(), 10)
        closes = sorted(await asyncio.gather(*watchers))
        for _reader, writer in clients:
            writer.close()
        await eventually(lambda: server.active == 0)
    first, last = closes[0] - began, closes[-1] - began
    assert first >= (timeout - 1.0) * 0.9, first  # the drain's first half-second is theirs
    assert last - first >= 0.6, closes  # spread: 20 batches 50 ms apart, not one burst
    assert last < timeout + 1.0, last
    assert [s.end_cause for s in log.sessions] == ["shutdown"] * count
