"""Accepting under descriptor exhaustion, through the real ``l4proxy`` command in a child process.

RELIABILITY.md case 31 (after Envoy CVE-2020-8663): with a 64-descriptor limit and 80 clients held open,
the proxy stays alive, logs one line (not one per attempt), does not spin, serves the clients it took,
and accepts again once descriptors free up; SIGTERM then exits 0. The limit is set in the child before
exec with ``setrlimit`` (soft = hard = 64), so the proxy's own raise to the hard limit changes nothing.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from ..kit import Upstream, eventually, roundtrip
from ..servers import Command

LIMIT = 64
CLIENTS = 80


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` from /proc (fields 14 and 15, after the command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_descriptor_exhaustion_pauses_accepting_once_and_recovers() -> None:
    args = ("--health-interval", "100ms", "--drain-timeout", "2s")
    async with Upstream() as server, Command("--upstream", str(server.address), "--access-log", "off", *args,
                                             limit=LIMIT) as proxy:
        port = proxy.port
        listen = f"127.0.0.1:{port}"
        clients: list[asyncio.StreamWriter] = []
        try:
            readers = []
            for _ in range(CLIENTS):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                readers.append(reader)
                clients.append(writer)
            await eventually(lambda: proxy.count(f"accept on {listen} paused") == 1)

            began = cpu_seconds(proxy.pid)
            await asyncio.sleep(1.0)  # the behaviour under test: a second of exhaustion, measured
            spent = cpu_seconds(proxy.pid) - began
            assert proxy.poll() is None
            assert spent < 0.5, f"{spent:.2f}s of CPU in 1s of exhaustion: a busy loop"
            assert proxy.count(f"accept on {listen} paused") == 1, proxy.stderr
            # each session holds two of the 64 descriptors: some clients are served, the rest wait
            assert 10 <= server.active <= LIMIT // 2

            # a client that got in is still relayed while the others wait
            clients[0].write(b"still here")
            assert await asyncio.wait_for(readers[0].readexactly(10), 5) == b"still here"

            for writer in clients:
                writer.transport.abort()
            clients.clear()
            await eventually(lambda: proxy.count(f"accepting on {listen} again") == 1, timeout=5)
            assert await roundtrip(port, b"after the storm") == b"after the storm"
            await eventually(lambda: server.active == 0)
            assert not any("DOWN" in line for line in proxy.err_lines), proxy.stderr
            assert proxy.count(f"accept on {listen} paused") == 1, proxy.stderr
        finally:
            for writer in clients:
                writer.transport.abort()
        assert await proxy.stopped() == 0
    assert "Traceback" not in proxy.stderr, proxy.stderr
