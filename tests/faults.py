"""A fault-injecting TCP link for tests: it sits between a peer that connects (a client, or the proxy
dialling a member) and a target that is listened to (the proxy, or an upstream), on loopback, in the
test's own event loop.

    async with upstreams(1) as [server], FaultLink(server.address, Fault(cut_after=1000)) as link:
        config = make_config([link.address])   # the proxy dials the link, the link dials the upstream

Each accepted connection reads the link's current ``fault`` (change it at any time; it applies to the
connections accepted afterwards) and relays bytes both ways with that fault applied:

* ``refuse``: nothing listens on the address (``refuse()`` closes the socket, ``listen_again()`` binds
  the same port); ``Fault(reset_on_accept=True)`` accepts and resets at once;
* ``blackhole``: accept, read and discard, never answer, never close;
* ``stall``: relay nothing for that long (each faulted direction), then carry on;
* ``dribble``: relay one byte per write; ``delay``: sleep before relaying each chunk;
* ``cut_after``: after that many bytes in a faulted direction, end the connection on both sides with a
  FIN (``cut_with="fin"``) or an RST (``cut_with="rst"``);
* ``greeting``: bytes the link sends to the connecting peer before anything else (a server speaking first).

``direction`` picks which way the timing and cut faults apply: ``"down"`` (target to peer), ``"up"``
(peer to target) or ``"both"``. ``cut_all(rst=True)`` resets every live connection at the same moment.
Half-close is relayed: an EOF from one side becomes ``write_eof()`` on the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass

from l4proxy import Address

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST


@dataclass(frozen=True)
class Fault:
    """What the link does to a connection; the default relays faithfully."""

    blackhole: bool = False
    reset_on_accept: bool = False
    stall: float = 0.0
    dribble: bool = False
    delay: float = 0.0
    cut_after: int | None = None
    cut_with: str = "fin"
    greeting: bytes = b""
    direction: str = "down"

    def __post_init__(self) -> None:
        assert self.cut_with in ("fin", "rst"), self.cut_with
        assert self.direction in ("up", "down", "both"), self.direction

    def applies(self, direction: str) -> bool:
        return self.direction in (direction, "both")


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN."""
    if writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class _Cut(Exception):
    """A faulted direction reached ``cut_after``."""


class _Connection:
    """One peer connection and, unless blackholed, its connection to the target."""

    def __init__(self, link: FaultLink, fault: Fault, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.link = link
        self.fault = fault
        self.peer = (reader, writer)
        self.target: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def run(self) -> None:
        fault = self.fault
        if fault.reset_on_accept:
            reset(self.peer[1])
            return
        if fault.blackhole:
            while await self.peer[0].read(65536):
                pass
            await asyncio.Event().wait()  # never answer, never close: only cut_all() or stop() end this
        if fault.greeting:
            self.peer[1].write(fault.greeting)
        self.target = await asyncio.open_connection(self.link.target.host, self.link.target.port)
        pumps = [asyncio.ensure_future(self._pump(self.peer[0], self.target[1], "up")),
                 asyncio.ensure_future(self._pump(self.target[0], self.peer[1], "down"))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for pump in pumps:
                pump.cancel()
            outcomes = await asyncio.gather(*pumps, return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, Exception)]
        if any(isinstance(o, _Cut) for o in failures):
            self.close(rst=fault.cut_with == "rst")
        else:  # one side reset: pass it on, as a dying host would; both ended: close cleanly
            self.close(rst=bool(failures))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        fault = self.fault if self.fault.applies(direction) else Fault()
        if fault.stall:
            await asyncio.sleep(fault.stall)
        moved = 0
        while data := await reader.read(65536):
            if fault.cut_after is not None and moved + len(data) >= fault.cut_after:
                data = data[: fault.cut_after - moved]
            for piece in _pieces(data, fault.dribble):
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                writer.write(piece)
                await writer.drain()
            moved += len(data)
            self.link.relayed[direction] += len(data)
            if fault.cut_after is not None and moved >= fault.cut_after:
                raise _Cut
        if writer.can_write_eof():
            writer.write_eof()

    def close(self, rst: bool) -> None:
        for pair in (self.peer, self.target):
            if pair is not None and not pair[1].transport.is_closing():
                reset(pair[1]) if rst else pair[1].close()


def _pieces(data: bytes, dribble: bool) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))] if dribble else [data]


class FaultLink:
    """A listener on ``host`` port 0 that relays every connection to ``target`` through a ``Fault``."""

    def __init__(self, target: Address, fault: Fault | None = None, host: str | None = None) -> None:
        self.target = target
        self.fault = fault or Fault()
        self.host = host or target.host
        self.port = 0
        self.accepted = 0
        self.relayed = {"up": 0, "down": 0}
        self.server: asyncio.Server | None = None
        self.live: dict[asyncio.Task[None], _Connection] = {}

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    @property
    def active(self) -> int:
        return len(self.live)

    async def start(self) -> FaultLink:
        self.server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        connection = self.live[task] = _Connection(self, self.fault, reader, writer)
        try:
            await connection.run()
        except (OSError, asyncio.CancelledError):
            connection.close(rst=True)  # the target refused, or the link is stopping
        finally:
            self.live.pop(task, None)

    def cut_all(self, rst: bool = True) -> int:
        """End every live connection now (RST by default); how many were cut."""
        cut = list(self.live.items())
        for task, connection in cut:
            connection.close(rst)
            task.cancel()
        return len(cut)

    async def refuse(self) -> None:
        """Stop listening, so connects to the address are refused; live connections carry on."""
        if self.server is not None:
            self.server.close()
            self.server = None

    async def listen_again(self) -> None:
        """Listen on the same port again after ``refuse()``."""
        await self.start()

    async def stop(self) -> None:
        await self.refuse()
        tasks = list(self.live)
        self.cut_all(rst=False)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> FaultLink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
