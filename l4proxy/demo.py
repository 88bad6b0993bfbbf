"""A self-contained tour: two local upstreams, l4proxy in front, balancing, failover and recovery.

    python -m l4proxy.demo

It starts two tiny line servers ("alpha" and "beta") on loopback, runs the same engine as the
``l4proxy`` command in front of them, and narrates what happens as beta goes away and comes back.
Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import sys

import uvloop

from .config import Address, Config, HealthConfig, ListenerConfig, MemberConfig, PoolConfig
from .proxy import Proxy


class LineServer:
    """Answers each line with ``<name>: <line>``; can be stopped and started on the same port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                writer.write(f"{self.name}: ".encode() + line)
                await writer.drain()
        writer.close()


async def ask(port: int, text: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(text.encode() + b"\n")
    answer = await asyncio.wait_for(reader.readline(), 5)
    writer.write_eof()
    await reader.read()  # the server's close, passed through by the proxy
    writer.close()
    return answer.decode().strip() or "(closed)"


async def burst(port: int, count: int, label: str) -> None:
    answers = [await ask(port, f"{label} #{i}") for i in range(count)]
    served = collections.Counter(a.split(":")[0] for a in answers)
    print(f"  {count} clients -> " + ", ".join(f"{name}: {n}" for name, n in sorted(served.items())))


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def main() -> None:
    alpha, beta = LineServer("alpha"), LineServer("beta")
    await alpha.start()
    await beta.start()
    members = (MemberConfig(Address("127.0.0.1", alpha.port)), MemberConfig(Address("127.0.0.1", beta.port)))
    config = Config(
        listeners=(ListenerConfig(Address("127.0.0.1", 0)),),
        pools=(PoolConfig(members=members, health=HealthConfig(interval=0.5, timeout=0.5, rise=2, fall=2)),),
        access_log="off",
        drain_timeout=2,
    )
    async with Proxy(config) as proxy:
        port = proxy.port()
        say(
            f"l4proxy on 127.0.0.1:{port} in front of alpha (:{alpha.port}) and beta (:{beta.port});"
            f" the same as: l4proxy --listen 127.0.0.1:{port} --upstream "
            f"127.0.0.1:{alpha.port},127.0.0.1:{beta.port} --health-interval 500ms --rise 2 --fall 2"
        )
        say("least-connections: idle members share new clients evenly")
        await burst(port, 6, "hello")

        say("beta stops: every client is still served (failed connects retry on alpha)")
        await beta.stop()
        await burst(port, 6, "during outage")
        await _until(lambda: not proxy.pools["default"].members[1].up)
        say("beta is DOWN (two failed probes in a row: see the log); it gets no new clients")
        await burst(port, 4, "while down")

        say("beta comes back on the same port; after 2 passing probes it is UP again")
        await beta.start()
        await _until(lambda: proxy.pools["default"].members[1].up)
        await burst(port, 6, "recovered")
    await alpha.stop()
    await beta.stop()
    say("done: drained and stopped")


async def _until(condition: collections.abc.Callable[[], bool], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


def run(argv: list[str] | None = None) -> None:
    """Parse the (flag-less) command line first, so ``--help`` explains the tour instead of starting it."""
    paragraphs = (__doc__ or "").replace("``", "").split("\n\n")
    parser = argparse.ArgumentParser(prog="python -m l4proxy.demo", description=paragraphs[0],
                                     epilog=" ".join(paragraphs[-1].split()))
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="  [log] %(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


if __name__ == "__main__":
    run()
