"""Graceful termination of the command, in the order Kubernetes relies on (``--shutdown-delay``,
``--drain-timeout``), with one process and with ``--workers 2``: /readyz answers 503 at once, clients
are served during the delay, then refused, sessions drain, the rest close spread over the drain's last
second, exit 0. In process: ``io/test_shutdown.py``."""

from __future__ import annotations

import asyncio
import signal

import pytest

from ..kit import Upstream, closed_at, connect, roundtrip, until_refused
from ..servers import Command, free_port


async def readyz(port: int) -> int:
    """The status of ``GET /readyz`` on the admin port; 0 when nothing answers there."""
    try:
        reader, writer = await asyncio.wait_for(connect(port), 2)
    except OSError:
        return 0
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: l4proxy\r\nConnection: close\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 5)
    except (TimeoutError, OSError):
        return 0
    finally:
        writer.close()
    return int(status.split()[1]) if status.startswith(b"HTTP/1.1 ") else 0


async def echoed(port: int, payload: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client whose session is up: ``payload`` went through the echo member and came back."""
    reader, writer = await connect(port)
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    return reader, writer


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_with_a_delay_serves_then_drains_and_exits_zero(workers: str) -> None:
    """The command, in the order Kubernetes relies on: SIGTERM makes /readyz 503 at once, a client
    connecting during the delay is still served, then connects are refused, a session open from before
    finishes during the drain, and the 20 that never end are closed at its deadline, spread over its
    last second; exit 0 (with workers, the supervisor's /readyz and exit)."""
    delay, drain, held = 1.5, 1.5, 20
    admin = free_port()
    async with Upstream() as server, Command(
        "--upstream", str(server.address), "--access-log", "-", "--no-health-checks", "--shutdown-delay",
        f"{delay}s", "--drain-timeout", f"{drain}s", "--workers", workers, "--admin", f"127.0.0.1:{admin}",
        listeners=int(workers),
    ) as proxy:
        port = proxy.port
        deadline = asyncio.get_running_loop().time() + 10
        while await readyz(admin) != 200:  # the supervisor's admin opens just after the workers
            assert asyncio.get_running_loop().time() < deadline, "/readyz never 200"
            await asyncio.sleep(0.05)
        finishing, finisher = await echoed(port, b"open")
        clients = [await echoed(port, b"hold") for _ in range(held)]
        watchers = [asyncio.create_task(closed_at(reader)) for reader, _writer in clients]
        loop = asyncio.get_running_loop()
        began = loop.time()
        proxy.signal(signal.SIGTERM)
        await proxy.logged(f"not ready, accepting for {delay:.1f}s more")
        assert await readyz(admin) == 503  # not ready first ...
        not_ready = loop.time() - began
        try:
            assert await roundtrip(port, b"during the delay") == b"during the delay"  # ... still serving
        except ConnectionError as exc:
            raise AssertionError(f"{exc!r} {loop.time() - began:.2f}s after SIGTERM") from exc
        await until_refused(port)
        refused = loop.time() - began
        finisher.write(b"drain")  # the drain lets a session from before finish
        assert await asyncio.wait_for(finishing.readexactly(5), 5) == b"drain"
        finisher.write_eof()
        assert await asyncio.wait_for(finishing.read(), 5) == b""
        finished = loop.time() - began
        closes = sorted(t - began for t in await asyncio.gather(*watchers))
        finisher.close()
        for _reader, writer in clients:
            writer.close()
        assert await proxy.exited(15) == 0
    timeline = f"503 {not_ready:.2f}s, refused {refused:.2f}s, finished {finished:.2f}s, closes {closes}"
    assert not_ready < delay * 0.5 and refused >= delay * 0.9, timeline
    assert finished < closes[0], timeline  # finished before the forced closes began ...
    assert closes[0] >= (delay + drain - 1.0) * 0.9, timeline  # ... which wait for the drain's last second
    assert closes[-1] - closes[0] >= 0.6 and closes[-1] < delay + drain + 1.0, timeline  # spread over it
    records = [dict(f.split("=", 1) for f in line.split()[1:]) for line in proxy.stdout.splitlines()]
    by_bytes = sorted((r["in"], r["end"]) for r in records if r["in"] != "0")  # in=0: the refusal probes
    assert by_bytes == sorted([("16", "eof"), ("9", "eof"), *[("4", "shutdown")] * held]), proxy.stdout
    assert all(r["end"] == "eof" for r in records if r["in"] == "0"), proxy.stdout
    assert "Traceback" not in proxy.stderr, proxy.stderr
