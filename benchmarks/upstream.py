"""A tiny upstream for the benchmarks, so no external server is needed.

Two modes, both written as `asyncio.Protocol`s on uvloop so the upstream costs as little CPU as possible
and the proxy under test is what the numbers measure:

* ``echo``: writes back every byte it receives (the ``rr``, ``connect`` and idle-session scenarios).
* ``bulk``: reads a 16-byte header ``!QQ`` = (bytes the client will send, bytes it wants back), sources the
  requested bytes at once, sinks the client's bytes, and when both are done sends an 8-byte ``!Q`` count of
  what it received. The count lets the client verify end to end that every uploaded byte arrived, without
  relying on half-close (which not every proxy passes on).

With ``--port 0`` it prints the chosen port on stdout (one line) once it accepts connections.
``--strip-proxy`` drops a PROXY protocol header (v1 or v2) that starts a connection, for the ``--edge``
runs in which the proxies under test send one: a benchmark tool's leniency (the header must come whole in
the first read, and a connection without one is served as it is), not a parser.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
import ssl
import struct
import sys

import uvloop

BULK_HEADER = struct.Struct("!QQ")
BULK_ACK = struct.Struct("!Q")
CHUNK = b"\x5a" * (256 * 1024)


class Echo(asyncio.Protocol):
    """Echo every chunk back; the proxy in front decides the chunking."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too: the client is done


class Bulk(asyncio.Protocol):
    """Sink the client's bytes and source the bytes it asked for, with backpressure on the source side."""

    def __init__(self) -> None:
        self.header = b""
        self.expect_up: int | None = None
        self.received = 0
        self.to_send = 0
        self.paused = False
        self.acked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=1024 * 1024)

    def data_received(self, data: bytes) -> None:
        if self.expect_up is None:
            self._read_header(data)
            return
        self.received += len(data)
        self._maybe_ack()

    def _read_header(self, data: bytes) -> None:
        """Collect the header (it may be split), then start sourcing; leftover bytes count as upload."""
        self.header += data
        if len(self.header) < BULK_HEADER.size:
            return
        self.expect_up, self.to_send = BULK_HEADER.unpack_from(self.header)
        self.received = len(self.header) - BULK_HEADER.size
        self.header = b""
        self._pump()
        self._maybe_ack()

    def _pump(self) -> None:
        """Write chunks until the transport asks us to pause or everything is sent."""
        while self.to_send > 0 and not self.paused:
            n = min(self.to_send, len(CHUNK))
            self.transport.write(CHUNK if n == len(CHUNK) else CHUNK[:n])
            self.to_send -= n
        self._maybe_ack()

    def _maybe_ack(self) -> None:
        if self.acked or self.to_send or self.expect_up is None or self.received < self.expect_up:
            return
        self.acked = True
        self.transport.write(BULK_ACK.pack(self.received))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def eof_received(self) -> bool:
        return False


PROTOCOLS: dict[str, type[asyncio.Protocol]] = {"echo": Echo, "bulk": Bulk}
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def header_length(data: bytes) -> int:
    """The length of the PROXY header that starts ``data`` (whole in it), 0 when none does."""
    if data.startswith(V2_SIGNATURE) and len(data) >= 16:
        return 16 + int.from_bytes(data[14:16], "big")
    if data.startswith(b"PROXY "):
        return data.find(b"\r\n") + 2
    return 0


def stripping(protocol: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """``protocol`` with the PROXY header of each connection's first read taken off."""

    class Stripping(protocol):  # type: ignore[valid-type,misc]
        first = True

        def data_received(self, data: bytes) -> None:
            if self.first:
                self.first = False
                data = data[header_length(data) :]
                if not data:
                    return
            super().data_received(data)

    return Stripping


def raise_nofile_limit() -> int:
    """Lift the open-files soft limit to the hard limit: the idle-session scenario holds thousands."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def server_ssl(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def serve(args: argparse.Namespace) -> None:
    """Listen until SIGTERM/SIGINT; announce the port on stdout so a parent can use port 0."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        stripping(PROTOCOLS[args.mode]) if args.strip_proxy else PROTOCOLS[args.mode], args.host, args.port,
        backlog=4096,
        ssl=server_ssl(args.tls_cert, args.tls_key), reuse_address=True,
    )
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(PROTOCOLS), default="echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert", help="serve TLS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="private key for --tls-cert (PEM)")
    parser.add_argument("--strip-proxy", action="store_true", help="drop a PROXY header starting a connection")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(serve(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
