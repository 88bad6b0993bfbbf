"""Graceful termination Kubernetes can rely on: ``--shutdown-delay`` and the spread of the forced closes.

On SIGTERM the proxy turns not ready at once (``Proxy.draining``, what readiness reads), keeps accepting
for the delay (endpoints take seconds to learn the pod is going), then stops accepting, lets sessions
finish up to the drain timeout, and closes what is left over the drain's last second; exit 0. In
process first, then the real command with one process and with ``--workers 2``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import pytest

from .kit import Upstream, connect, eventually, make_config, roundtrip, running, upstreams
from .servers import free_port

ROOT = Path(__file__).resolve().parent.parent


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A member that reads everything and never answers or closes."""
    while await reader.read(65536):
        pass


async def until_refused(port: int, timeout: float = 10.0) -> None:
    """Wait until the listener is gone: a connect is refused (each one accepted before is closed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _reader, writer = await asyncio.wait_for(connect(port), 2)
        except ConnectionRefusedError:
            return
        writer.close()
        assert asyncio.get_running_loop().time() < deadline, "still accepting"
        await asyncio.sleep(0.02)


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

        async def closed_at(reader: asyncio.StreamReader) -> float:
            with contextlib.suppress(ConnectionResetError):  # an aborted session may end in a reset
                assert await asyncio.wait_for(reader.read(), 10) == b""
            return loop.time()

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


def command(port: int, upstream: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "l4proxy", "--listen", f"127.0.0.1:{port}", "--upstream", upstream,
            "--access-log", "-", "--no-health-checks", *extra]  # fmt: skip


async def read_until(stream: asyncio.StreamReader, text: bytes, seen: bytearray, timeout: float = 10) -> None:
    """Read lines of ``stream`` into ``seen`` until ``text`` appears in them."""
    while text not in seen:
        line = await asyncio.wait_for(stream.readline(), timeout)
        assert line, f"{text!r} never logged; stderr:\n{seen.decode()}"
        seen.extend(line)


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


async def closed_at(reader: asyncio.StreamReader) -> float:
    """When the proxy closes this client (an aborted session may end in a reset)."""
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 15) == b""
    return asyncio.get_running_loop().time()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_with_a_delay_serves_then_drains_and_exits_zero(workers: str) -> None:
    """The command, in the order Kubernetes relies on: SIGTERM makes /readyz 503 at once, a client
    connecting during the delay is still served, then connects are refused, a session open from before
    finishes during the drain, and the 20 that never end are closed at its deadline, spread over its
    last second; exit 0 (with workers, the supervisor's /readyz and exit)."""
    delay, drain, held = 1.5, 1.5, 20
    port, admin = free_port(), free_port()
    async with Upstream() as server:
        proc = await asyncio.create_subprocess_exec(
            *command(port, str(server.address), "--shutdown-delay", f"{delay}s", "--drain-timeout", f"{drain}s",
                     "--workers", workers, "--admin", f"127.0.0.1:{admin}"),
            cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        err = bytearray()
        try:
            for _ in range(int(workers)):
                await read_until(proc.stderr, b"listening on", err)
                err.extend(b"\n")  # the next worker's line is another one
            deadline = asyncio.get_running_loop().time() + 10
            while await readyz(admin) != 200:  # the supervisor's admin opens just after the workers
                assert asyncio.get_running_loop().time() < deadline, "/readyz never 200"
                await asyncio.sleep(0.05)
            finishing, finisher = await echoed(port, b"open")
            clients = [await echoed(port, b"hold") for _ in range(held)]
            watchers = [asyncio.create_task(closed_at(reader)) for reader, _writer in clients]
            loop = asyncio.get_running_loop()
            began = loop.time()
            proc.send_signal(signal.SIGTERM)
            await read_until(proc.stderr, f"not ready, accepting for {delay:.1f}s more".encode(), err)
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
            assert await asyncio.wait_for(proc.wait(), 15) == 0
            out = (await proc.stdout.read()).decode()
            err.extend(await proc.stderr.read())
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    timeline = f"503 {not_ready:.2f}s, refused {refused:.2f}s, finished {finished:.2f}s, closes {closes}"
    assert not_ready < delay * 0.5 and refused >= delay * 0.9, timeline
    assert finished < closes[0], timeline  # finished before the forced closes began ...
    assert closes[0] >= (delay + drain - 1.0) * 0.9, timeline  # ... which wait for the drain's last second
    assert closes[-1] - closes[0] >= 0.6 and closes[-1] < delay + drain + 1.0, timeline  # spread over it
    records = [dict(f.split("=", 1) for f in line.split()[1:]) for line in out.splitlines()]
    by_bytes = sorted((r["in"], r["end"]) for r in records if r["in"] != "0")  # in=0: the refusal probes
    assert by_bytes == sorted([("16", "eof"), ("9", "eof"), *[("4", "shutdown")] * held]), out
    assert all(r["end"] == "eof" for r in records if r["in"] == "0"), out
    assert b"Traceback" not in err, err.decode()
