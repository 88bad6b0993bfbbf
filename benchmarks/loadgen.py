"""Load generator for l4proxy benchmarks, on uvloop with `asyncio.Protocol`s so it stays cheap.

Modes (each bounded by a request/byte count *and* a time limit, whichever comes first):

* ``rr``: N connections, each doing ping-pong of one SIZE-byte message at a time (like redis-benchmark
  without pipelining). Reports requests/s and latency percentiles.
* ``connect``: a new connection per request (connect, one ping-pong, close): the accept + dial cost.
  With ``--tls`` every connection is a full handshake: the client offers no session to resume (and
  counts in ``tls_resumed`` any connection the server reports as resumed, which should stay 0).
* ``bulk``: N connections each streaming BYTES up, down or both ways against ``upstream.py --mode bulk``;
  reports Gbit/s (payload bytes of both directions) and checks every byte arrived.
* ``hold``: opens N idle sessions (one ping-pong each, so the proxy has dialled the upstream), prints a
  ``ready`` line, and holds them until stdin closes or ``--hold-seconds`` pass; for memory per session.

``--procs P`` splits connections and the request budget over P processes that start together behind a
barrier; their results are merged (latency percentiles from all raw samples). The last stdout line is
JSON with ``--json``, else a short human summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import ssl
import struct
import sys
import time
from array import array
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import uvloop

BULK_HEADER = struct.Struct("!QQ")
BULK_ACK = struct.Struct("!Q")
CHUNK = b"\xa5" * (256 * 1024)
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999))


@dataclass
class Part:
    """What one process measured; merged across processes by `merge`."""

    start: float = 0.0
    end: float = 0.0
    requests: int = 0
    errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    complete: bool = True
    resumed: int = 0
    lat_ns: array = field(default_factory=lambda: array("q"))


def raise_nofile_limit() -> int:
    """Lift the open-files soft limit to the hard limit: idle-session runs open thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def client_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    """Verifying client context; no TLS 1.2 tickets, and no session is ever passed in, so no resumption."""
    if not args.tls:
        return None
    ctx = ssl.create_default_context(cafile=args.tls_ca)
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def connect_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    ctx = client_ssl(args)
    return {"ssl": ctx, "server_hostname": args.sni} if ctx else {}


# --- rr: persistent connections, one message in flight each ---------------------------------------------


class RRClient(asyncio.Protocol):
    """One connection of the ping-pong; all decisions live in `RRRun` so this stays a few lines."""

    def __init__(self, run: RRRun) -> None:
        self.run = run
        self.got = 0
        self.sent_at = 0
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= self.run.size:
            self.got -= self.run.size
            self.busy = False
            self.run.on_response(self, time.perf_counter_ns() - self.sent_at)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.run.on_lost(self)


class RRRun:
    """Drives a phase: send until the budget or the deadline is spent, then resolve `finished`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.msg = b"\x61" * size
        self.part = Part()
        self.limit = 0
        self.issued = 0
        self.deadline_ns = 0
        self.record = False
        self.active = 0
        self.finished: asyncio.Future[None] | None = None

    def phase(
        self, clients: list[RRClient], limit: int, seconds: float, record: bool
    ) -> asyncio.Future[None]:
        self.limit, self.issued, self.record = limit, 0, record
        self.deadline_ns = time.perf_counter_ns() + int(seconds * 1e9)
        self.finished = asyncio.get_running_loop().create_future()
        live = [c for c in clients if c.transport is not None]
        self.active = len(live)
        if not live:
            self.finished.set_result(None)
        for c in live:
            self.send(c)
        return self.finished

    def send(self, c: RRClient) -> None:
        now = time.perf_counter_ns()
        if self.issued >= self.limit or now >= self.deadline_ns or c.transport is None:
            self._retire()
            return
        self.issued += 1
        c.busy, c.sent_at = True, now
        c.transport.write(self.msg)

    def on_response(self, c: RRClient, lat: int) -> None:
        if self.record:
            self.part.lat_ns.append(lat)
            self.part.requests += 1
        self.send(c)

    def on_lost(self, c: RRClient) -> None:
        if c.busy:
            self.part.errors += 1
            c.busy = False
            self._retire()

    def _retire(self) -> None:
        self.active -= 1
        if self.active <= 0 and self.finished is not None and not self.finished.done():
            self.finished.set_result(None)


async def rr_worker(args: argparse.Namespace, conns: int, limit: int, sync: Callable[[], None]) -> Part:
    loop = asyncio.get_running_loop()
    run = RRRun(args.size)
    clients = [RRClient(run) for _ in range(conns)]
    kw = connect_kwargs(args)
    await asyncio.gather(
        *(loop.create_connection(lambda c=c: c, args.host, args.port, **kw) for c in clients)
    )
    await run.phase(clients, conns * args.warmup, args.duration, record=False)
    sync()
    run.part.start = time.monotonic()
    await run.phase(clients, limit, args.duration, record=True)
    run.part.end = time.monotonic()
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    return run.part


# --- connect: a fresh connection per request ------------------------------------------------------------


class OneShot(asyncio.Protocol):
    """Send one message on connect; resolve `done` when the echo is complete (or the connection dies)."""

    def __init__(self, msg: bytes) -> None:
        self.msg = msg
        self.got = 0
        self.resumed = False
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = transport.get_extra_info("ssl_object")
        self.resumed = bool(tls is not None and tls.session_reused)
        transport.write(self.msg)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= len(self.msg) and not self.done.done():
            self.done.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


async def connect_worker(args: argparse.Namespace, conns: int, limit: int, sync: Callable[[], None]) -> Part:
    loop = asyncio.get_running_loop()
    part, msg, kw = Part(), b"\x62" * args.size, connect_kwargs(args)
    budget = [limit]

    async def one() -> None:
        t0 = time.perf_counter_ns()
        try:
            tr, proto = await loop.create_connection(lambda: OneShot(msg), args.host, args.port, **kw)
        except OSError:
            part.errors += 1
            return
        ok = await proto.done
        tr.close()
        part.resumed += proto.resumed
        if ok:
            part.requests += 1
            part.lat_ns.append(time.perf_counter_ns() - t0)
        else:
            part.errors += 1

    async def loop_until(deadline: float) -> None:
        while budget[0] > 0 and time.monotonic() < deadline:
            budget[0] -= 1
            await one()

    sync()
    part.start = time.monotonic()
    await asyncio.gather(*(loop_until(part.start + args.duration) for _ in range(conns)))
    part.end = time.monotonic()
    return part


# --- bulk: large transfers with end-to-end byte accounting ----------------------------------------------


class BulkClient(asyncio.Protocol):
    """Send the header and `up` bytes (with backpressure), receive `down` bytes plus the upstream's ack."""

    def __init__(self, up: int, down: int) -> None:
        self.to_send, self.down = up, down
        self.up = up
        self.received = 0
        self.tail = b""
        self.paused = False
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=1024 * 1024)
        self.transport.write(BULK_HEADER.pack(self.up, self.down))
        self._pump()

    def _pump(self) -> None:
        while self.to_send > 0 and not self.paused and self.transport is not None:
            n = min(self.to_send, len(CHUNK))
            self.transport.write(CHUNK if n == len(CHUNK) else CHUNK[:n])
            self.to_send -= n

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self.down + BULK_ACK.size:
            self.tail = (self.tail + data)[-BULK_ACK.size:]
            if not self.done.done():
                self.done.set_result(BULK_ACK.unpack(self.tail)[0] == self.up)
        elif self.received > self.down:
            self.tail = (self.tail + data)[-BULK_ACK.size:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.done.done():
            self.done.set_result(False)

    @property
    def sent(self) -> int:
        return self.up - self.to_send


async def bulk_worker(args: argparse.Namespace, conns: int, limit: int, sync: Callable[[], None]) -> Part:
    loop = asyncio.get_running_loop()
    up = args.bytes if args.direction in ("up", "both") else 0
    down = args.bytes if args.direction in ("down", "both") else 0
    part, kw = Part(), connect_kwargs(args)
    sync()
    part.start = time.monotonic()
    pairs = await asyncio.gather(
        *(loop.create_connection(lambda: BulkClient(up, down), args.host, args.port, **kw)
          for _ in range(conns))
    )
    remaining = part.start + args.duration - time.monotonic()
    _, pending = await asyncio.wait([p.done for _, p in pairs], timeout=max(remaining, 0.001))
    part.end = time.monotonic()
    for tr, p in pairs:
        ok = p.done.done() and p.done.result()
        part.complete &= ok
        part.errors += 0 if ok or not p.done.done() else 1
        part.bytes_up += p.sent if not ok else up
        part.bytes_down += min(p.received, down)
        part.requests += 1 if ok else 0
        tr.abort() if pending else tr.close()
    return part


# --- hold: idle sessions for memory measurement ---------------------------------------------------------


async def hold(args: argparse.Namespace) -> dict[str, Any]:
    """Open sessions in bounded batches, report ready, hold until stdin closes or the hold time passes."""
    loop = asyncio.get_running_loop()
    msg, kw, gate = b"\x63" * args.size, connect_kwargs(args), asyncio.Semaphore(256)
    opened: list[asyncio.BaseTransport] = []
    errors = 0

    async def open_one() -> None:
        nonlocal errors
        async with gate:
            try:
                tr, proto = await loop.create_connection(lambda: OneShot(msg), args.host, args.port, **kw)
            except OSError:
                errors += 1
                return
            opened.append(tr)
            if not await asyncio.wait_for(proto.done, 10):
                errors += 1

    t0 = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(args.conns)), return_exceptions=True)
    print(json.dumps({"ready": len(opened) - errors, "errors": errors}), flush=True)
    await wait_stdin_closed(args.hold_seconds)
    for tr in opened:
        tr.close()
    held = len(opened) - errors
    return {"mode": "hold", "sessions": held, "errors": errors, "open_s": time.monotonic() - t0}


async def wait_stdin_closed(timeout: float) -> None:
    loop = asyncio.get_running_loop()
    closed = loop.create_future()

    def on_readable() -> None:
        if not os.read(sys.stdin.fileno(), 4096) and not closed.done():
            closed.set_result(None)

    try:
        loop.add_reader(sys.stdin.fileno(), on_readable)
    except (OSError, ValueError, PermissionError):
        await asyncio.sleep(timeout)
        return
    try:
        await asyncio.wait_for(closed, timeout)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(sys.stdin.fileno())


# --- processes and merging ------------------------------------------------------------------------------

Worker = Callable[[argparse.Namespace, int, int, Callable[[], None]], Coroutine[Any, Any, Part]]
WORKERS: dict[str, Worker] = {"rr": rr_worker, "connect": connect_worker, "bulk": bulk_worker}


def split(total: int, n: int, i: int) -> int:
    return total // n + (1 if i < total % n else 0)


def run_part(args: argparse.Namespace, i: int, sync: Callable[[], None]) -> Part:
    raise_nofile_limit()
    conns = split(args.conns, args.procs, i)
    limit = split(args.requests, args.procs, i) if args.mode != "bulk" else conns
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(WORKERS[args.mode](args, conns, limit, sync))


def child(args: argparse.Namespace, i: int, barrier: Any, out: Any) -> None:
    part = run_part(args, i, lambda: barrier.wait(timeout=60))
    out.put((part.start, part.end, part.requests, part.errors, part.bytes_up, part.bytes_down,
             part.complete, part.resumed, part.lat_ns.tobytes()))


def run_procs(args: argparse.Namespace) -> list[Part]:
    """Fork `--procs` workers that start measuring together; one process runs inline (no fork cost)."""
    if args.procs == 1:
        return [run_part(args, 0, lambda: None)]
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(args.procs), ctx.Queue()
    procs = [ctx.Process(target=child, args=(args, i, barrier, out)) for i in range(args.procs)]
    for p in procs:
        p.start()
    parts = []
    for _ in procs:
        s, e, n, err, bu, bd, comp, resumed, lat = out.get(timeout=args.duration + 120)
        part = Part(s, e, n, err, bu, bd, comp, resumed, array("q"))
        part.lat_ns.frombytes(lat)
        parts.append(part)
    for p in procs:
        p.join(10)
    return parts


def percentiles(lat_ns: array) -> dict[str, float]:
    """Exact percentiles (nearest rank) in microseconds from all raw samples."""
    if not lat_ns:
        return {}
    s = sorted(lat_ns)
    out = {name: s[min(len(s) - 1, int(q * len(s)))] / 1000 for name, q in PERCENTILES}
    out["max"] = s[-1] / 1000
    out["mean"] = sum(s) / len(s) / 1000
    return out


def merge(args: argparse.Namespace, parts: list[Part]) -> dict[str, Any]:
    lat = array("q")
    for p in parts:
        lat.extend(p.lat_ns)
    elapsed = max(p.end for p in parts) - min(p.start for p in parts)
    n = sum(p.requests for p in parts)
    up, down = sum(p.bytes_up for p in parts), sum(p.bytes_down for p in parts)
    res: dict[str, Any] = {
        "mode": args.mode, "conns": args.conns, "procs": args.procs, "size": args.size,
        "tls": bool(args.tls), "requests": n, "errors": sum(p.errors for p in parts),
        "elapsed_s": elapsed, "rate": n / elapsed if elapsed > 0 else 0.0,
    }
    if args.mode == "bulk":
        expect = args.bytes * args.conns
        res |= {"direction": args.direction, "bytes_up": up, "bytes_down": down,
                "expected_up": expect if args.direction != "down" else 0,
                "expected_down": expect if args.direction != "up" else 0,
                "complete": all(p.complete for p in parts),
                "gbps": (up + down) * 8 / elapsed / 1e9 if elapsed > 0 else 0.0}
    else:
        res["latency_us"] = percentiles(lat)
    if args.mode == "connect" and args.tls:
        res["tls_resumed"] = sum(p.resumed for p in parts)
    return res


def human(res: dict[str, Any]) -> str:
    if res["mode"] == "hold":
        return f"hold: {res['sessions']} sessions, {res['errors']} errors, opened in {res['open_s']:.2f}s"
    if res["mode"] == "bulk":
        return (f"bulk {res['direction']}: {res['gbps']:.2f} Gbit/s, up {res['bytes_up']} down "
                f"{res['bytes_down']} B in {res['elapsed_s']:.3f}s, complete={res['complete']}")
    lat = res.get("latency_us", {})
    pct = " ".join(f"{k}={lat[k]:.0f}us" for k, _ in PERCENTILES if k in lat)
    return (f"{res['mode']}: {res['rate']:.0f} req/s over {res['requests']} requests, "
            f"{res['errors']} errors, {res['elapsed_s']:.2f}s; {pct}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["rr", "connect", "bulk", "hold"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=50, help="concurrent connections (sessions for hold)")
    p.add_argument("--size", type=int, default=64, help="message size for rr/connect/hold")
    p.add_argument("--requests", type=int, default=100_000, help="request budget (rr/connect)")
    p.add_argument("--duration", type=float, default=10.0, help="time limit in seconds")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per connection (rr)")
    p.add_argument("--bytes", type=int, default=256 << 20, help="bytes per connection and direction (bulk)")
    p.add_argument("--direction", choices=["up", "down", "both"], default="down")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--hold-seconds", type=float, default=60.0)
    p.add_argument("--tls", action="store_true", help="speak TLS to the target")
    p.add_argument("--tls-ca", help="CA bundle (PEM) to verify the target with")
    p.add_argument("--sni", default="localhost")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.procs < 1 or args.conns < 1 or args.procs > args.conns:
        p.error("need 1 <= --procs <= --conns")
    if args.mode == "hold":
        args.procs = 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    raise_nofile_limit()
    if args.mode == "hold":
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            res = r.run(hold(args))
    else:
        res = merge(args, run_procs(args))
    print(json.dumps(res) if args.json else human(res), flush=True)


if __name__ == "__main__":
    main()
