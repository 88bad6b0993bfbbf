"""Accepting under descriptor exhaustion, through the real ``l4proxy`` command in a child process.

RELIABILITY.md case 31 (after Envoy CVE-2020-8663): with a 64-descriptor limit and 80 clients held open,
the proxy stays alive, logs one line (not one per attempt), does not spin, serves the clients it took,
and accepts again once descriptors free up; SIGTERM then exits 0. The limit is set in the child before
exec with ``setrlimit`` (soft = hard = 64), so the proxy's own raise to the hard limit changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from ..kit import Upstream, eventually, roundtrip

LIMIT = 64
CLIENTS = 80
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` from /proc (fields 14 and 15, after the command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StderrLines:
    """Collects the child's stderr lines as they arrive."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self.task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


@contextlib.asynccontextmanager
async def child_proxy(
    port: int, upstream: Upstream, *args: str, limit: int | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, StderrLines]]:
    """The ``l4proxy`` command in front of ``upstream``, with its open-files limit set to ``limit`` (soft
    and hard) before exec; once it is listening. Leaving sends SIGTERM and expects exit 0, no traceback."""

    def set_limit() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "l4proxy", "--listen", f"127.0.0.1:{port}", "--upstream", str(upstream.address),
        "--access-log", "off", *args,
        cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, preexec_fn=set_limit,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = StderrLines(proc.stderr)
    try:
        await eventually(lambda: stderr.count(f"listening on 127.0.0.1:{port}") == 1)
        yield proc, stderr
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        await asyncio.wait_for(stderr.task, 5)
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
        stderr.task.cancel()
    assert not any("Traceback" in line for line in stderr.lines), "\n".join(stderr.lines)


async def test_descriptor_exhaustion_pauses_accepting_once_and_recovers() -> None:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    args = ("--health-interval", "100ms", "--drain-timeout", "2s")
    async with Upstream() as server, child_proxy(port, server, *args, limit=LIMIT) as (proc, stderr):
        clients: list[asyncio.StreamWriter] = []
        try:
            readers = []
            for _ in range(CLIENTS):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                readers.append(reader)
                clients.append(writer)
            await eventually(lambda: stderr.count(f"accept on {listen} paused") == 1)

            began = cpu_seconds(proc.pid)
            await asyncio.sleep(1.0)
            spent = cpu_seconds(proc.pid) - began
            assert proc.returncode is None
            assert spent < 0.5, f"{spent:.2f}s of CPU in 1s of exhaustion: a busy loop"
            assert stderr.count(f"accept on {listen} paused") == 1, "\n".join(stderr.lines)
            # each session holds two of the 64 descriptors: some clients are served, the rest wait
            assert 10 <= server.active <= LIMIT // 2

            # a client that got in is still relayed while the others wait
            clients[0].write(b"still here")
            assert await asyncio.wait_for(readers[0].readexactly(10), 5) == b"still here"

            for writer in clients:
                writer.transport.abort()
            clients.clear()
            await eventually(lambda: stderr.count(f"accepting on {listen} again") == 1, timeout=5)
            assert await roundtrip(port, b"after the storm") == b"after the storm"
            await eventually(lambda: server.active == 0)
            assert not any("DOWN" in line for line in stderr.lines), "\n".join(stderr.lines)
            assert stderr.count(f"accept on {listen} paused") == 1, "\n".join(stderr.lines)
        finally:
            for writer in clients:
                writer.transport.abort()
