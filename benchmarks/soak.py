"""Soak: the real ``l4proxy`` command under mixed load and chaos for ``--duration`` seconds, proving that
no byte is lost or changed and that only the sessions the chaos itself cut see a failure.

    .venv/bin/python benchmarks/soak.py --duration 600

Four proxies run at once, each a real ``l4proxy`` process on 127.0.0.1:

* ``plain``: one process in front of three echo servers (request/response, bulk both ways, churn);
* ``workers``: two workers in front of two echo servers (the same traffic);
* ``redis``: one process in front of two real redis-servers (SET/GET with checked values);
* ``tls``: terminates TLS from clients and originates TLS to two TLS echo servers (trustme certificates).

Meanwhile the chaos loop kills and restarts echo servers and redis-servers (their sessions are cut),
flaps echo servers' listeners (their health goes DOWN and back, their sessions stay), sends SIGHUP to
every proxy, SIGKILLs a worker of the ``workers`` proxy, and opens abusive clients: slowloris TLS
handshakes, garbage, idle (half-open) clients, readers that never read, and clients that reset.

``plain`` and ``workers`` run from a TOML file (``--config``) that ``l4proxy check`` must pass at the
start; ``redis`` and ``tls`` from flags, so SIGHUP's TLS-only reload runs too. Before some SIGHUPs the
soak rewrites a file with a real change (it adds a member, from one more echo server it started for that,
removes one, changes a member's weight or max_conns, or a timeout), or with a mistake (a syntax error, an
unknown key, a bad duration, a missing pool, a member listed twice). After each SIGHUP it waits for the
proxy's outcome line: a change must be reloaded with the summary it implies (a listener rebuilt, or the
pool updated), a broken file refused with its ``FILE:LINE:`` line, the running configuration kept (the
next summary is taken against it). The sessions a removed member held must run to their end, unharmed.

Every message carries its session id, sequence number, length and CRC32, and the echo must return it
whole and in order. A client-visible failure is *expected* when the chaos cut that session (its echo
server or redis-server was killed while it was held, or the worker holding the client was killed) and
*unexpected* otherwise. A killed worker also takes the clients queued on its SO_REUSEPORT listener:
the kernel gives each connection to a listener when its SYN arrives and resets the queue of one that
closes (unless ``net.ipv4.tcp_migrate_req`` is 1; README, "Several processes"). Such a client fails
with no access-log line, and the listener is closed only once the process is gone, which takes some
milliseconds after the SIGKILL: each kill's gone time is taken from a pidfd, and a failure that no
access-log line explains counts as that kill's when its session started before the worker was gone
and failed after the kill. The report gives the gone and the supervisor's notice times per kill.

The report gives sessions and bytes per traffic kind, losses and corruptions,
failures split expected/unexpected, each proxy's RSS (start, peak, end) and descriptors (start, end),
and the exit status is 1 when any check fails. Everything is bounded in count and time, listens on
loopback only, and every process is started, and stopped, by this script, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import uvloop

HEADER = struct.Struct("!IIII")  # session id, sequence number, body length, CRC32 of the body
LINGER_RST = struct.pack("ii", 1, 0)
STEP_TIMEOUT = 15.0  # the longest any one read, write or connect may take before the session fails
PROXY_FLAGS = ["--connect-timeout", "1s", "--retries", "2", "--health-interval", "300ms", "--health-timeout",
               "1s", "--rise", "2", "--fall", "2", "--idle-timeout", "8s", "--half-closed-timeout", "3s",
               "--drain-timeout", "3s", "--log-level", "warning"]
FD_SLACK = 40  # per process: up to 16 idle splice pipes (32 descriptors), and probes in flight
CALM = 2.0  # seconds a pool's members must all have been in service before the chaos takes one out
MAX_ROUNDS = 1_000_000  # every loop also stops after this many rounds, whatever the clock says
RSS_GROWTH = 1.5  # the end RSS may exceed the first half's peak by this factor (plus 16 MiB) at most
# Levelling off: the last quarter's peak may exceed the second quarter's by 10% or 6 MiB, whichever is
# more. Peaks, not single samples: a worker being replaced makes the sum dip, never rise. Growth that
# goes on (each failed TLS handshake once left its session and 256 KiB buffer to the cyclic GC: 43 MiB
# at the second quarter, 54 at the end of 150 s) fails it; a heap warming up in the first quarter does not.
RSS_LATE_GROWTH, RSS_LATE_SLACK = 1.10, 6.0


# --- upstreams ---------------------------------------------------------------------------------------


class EchoServer:
    """An echo server in this process that knows which session each of its connections carries (from
    the first header), so a kill can name the sessions it cut."""

    def __init__(self, name: str, cut: set[int], tls: ssl.SSLContext | None = None) -> None:
        self.name, self.cut, self.tls = name, cut, tls
        self.port = 0
        self.server: asyncio.Server | None = None
        self.held: dict[asyncio.StreamWriter, int | None] = {}
        self.kills = 0
        self.back_at = 0.0  # when it last started listening

    async def start(self) -> EchoServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.tls,
                                                 reuse_address=True, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        self.back_at = time.monotonic()
        return self

    def in_service(self) -> bool:
        return self.server is not None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.held[writer] = None
        try:
            first = await reader.readexactly(HEADER.size)
            self.held[writer] = HEADER.unpack(first)[0]
            writer.write(first)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof() and not writer.transport.is_closing():
                writer.write_eof()
            await writer.drain()
        except (OSError, RuntimeError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # killed by the chaos loop (uvloop raises RuntimeError on a closed handle)
        finally:
            self.held.pop(writer, None)
            writer.close()

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def kill(self) -> int:
        """Stop listening and reset every connection, as a crashed host would; how many were cut."""
        self.stop_listening()
        self.kills += 1
        held = list(self.held.items())
        for writer, session in held:
            if session is not None:
                self.cut.add(session)
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError, ValueError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            writer.transport.abort()
        return len(held)


class Redis:
    """A redis-server process on a fixed loopback port, killed and restarted by PID."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir, self.port = workdir, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills: list[float] = []
        self.back_at = 0.0

    def in_service(self) -> bool:
        return self.proc is not None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port)
        self.back_at = time.monotonic()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


# --- proxies -----------------------------------------------------------------------------------------

# A file-run proxy's settings: those of PROXY_FLAGS, but for the drain timeout, which here also bounds
# how long the sessions of a removed member may go on: longer than any soak session, so none is cut.
# The log level is info, so that every reload's outcome line ("configuration reloaded: ...", or "kept the
# running configuration") can be checked against what the file says.
FILE_DRAIN_TIMEOUT = "10s"
TIMEOUTS = {  # the timeouts a config change may set, by (table, key): the first value is the start's
    ("listener", "idle_timeout"): ("8s", "6s", "12s"),
    ("listener", "half_closed_timeout"): ("3s", "5s"),
    ("pool", "connect_timeout"): ("1s", "2s"),
    ("health", "timeout"): ("1s", "800ms"),
}
MAX_CONNS = (8, 16, 32)  # never so low that the rest of the pool cannot take the load
MISTAKES = ("syntax error", "unknown key", "bad duration", "no such pool", "member listed twice")
RELOAD_WAIT = 10.0  # seconds a file-run proxy has to log the outcome of a SIGHUP
OUTCOME = re.compile(r"\S+ \S+ \S+: SIGHUP: (?:configuration reloaded(?: in \d+ workers)?: (.*)"
                     r"|kept the running configuration \((\d+) problems? in the file\))$", re.M)


@dataclass
class MemberOptions:
    weight: int = 1
    max_conns: int | None = None


@dataclass
class FileConfig:
    """What a file-run proxy's TOML file says: one listener, one pool. Rewritten whole (and renamed into
    place, so the proxy never reads half a file) before some SIGHUPs; it is the soak's record of the
    configuration the proxy runs, since a broken file is never written here."""

    path: Path
    port: int
    access_log: Path
    workers: int
    members: dict[int, MemberOptions]  # port -> options, in the file's order
    timeouts: dict[tuple[str, str], str] = field(default_factory=lambda: {k: v[0] for k, v in TIMEOUTS.items()})

    def render(self, mistake: str = "") -> str:
        """The file; with ``mistake`` (one of MISTAKES), the same file with that one thing wrong."""
        listener = {key: value for (table, key), value in self.timeouts.items() if table == "listener"}
        members = [f'  {{address = "127.0.0.1:{port}", weight = {m.weight}'
                   + (f", max_conns = {m.max_conns}" if m.max_conns else "") + "},"
                   for port, m in self.members.items()]
        if mistake == "member listed twice":
            members.append(members[0])
        lines = ["# written by benchmarks/soak.py", 'log_level = "info"', f'access_log = "{self.access_log}"',
                 f'drain_timeout = "{FILE_DRAIN_TIMEOUT}"', f"workers = {self.workers}", "",
                 "[listeners.echo]", f'address = "127.0.0.1:{self.port}"',
                 'pool = "ehco"' if mistake == "no such pool" else 'pool = "echo"',
                 *(f'{key} = "{value}"' for key, value in listener.items()),
                 *(['idle_timeut = "8s"'] if mistake == "unknown key" else []), "",
                 "[pools.echo]", "members = [", *members, "]", "retries = 2",
                 'connect_timeout = "1sec"' if mistake == "bad duration"
                 else f'connect_timeout = "{self.timeouts["pool", "connect_timeout"]}"',
                 *(["max_queue 64"] if mistake == "syntax error" else []), "",
                 "[pools.echo.health]", 'interval = "300ms"', f'timeout = "{self.timeouts["health", "timeout"]}"',
                 "rise = 2", "fall = 2"]
        return "\n".join(lines) + "\n"

    def write(self, mistake: str = "") -> None:
        staged = self.path.with_suffix(".new")
        staged.write_text(self.render(mistake))
        staged.replace(self.path)


class Proxy:
    """One ``l4proxy`` command; its process tree's RSS and descriptors are sampled from /proc. With
    ``workers`` (1 or more) it runs from a TOML file the soak writes, and rewrites before some SIGHUPs;
    without, from flags."""

    def __init__(self, name: str, workdir: Path, upstreams: list[int], extra: list[str], workers: int = 0) -> None:
        self.name = name
        self.port = free_port()
        self.stderr_path = workdir / f"{name}.stderr"
        self.access_path = workdir / f"{name}.access"  # read to explain unexpected failures
        self.config: FileConfig | None = None
        self.log_offset = 0  # how far its stderr has been read for reload outcomes
        if workers:
            self.config = FileConfig(workdir / f"{name}.toml", self.port, self.access_path, workers,
                                     {port: MemberOptions() for port in upstreams})
            self.config.write()
            self.args = [sys.executable, "-m", "l4proxy", "--config", str(self.config.path), *extra]
        else:
            self.args = [sys.executable, "-m", "l4proxy", "--listen", f"127.0.0.1:{self.port}",
                         "--upstream", ",".join(f"127.0.0.1:{p}" for p in upstreams), *PROXY_FLAGS, *extra,
                         "--access-log", str(self.access_path)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.rss: list[int] = []
        self.fds_start = 0
        self.kill_times: list[float] = []  # when one of its upstreams or workers was killed
        self.killed_clients: list[tuple[float, set[int]]] = []  # worker kills: the client ports it held
        self.worker_kills: list[WorkerKill] = []

    def start(self) -> None:
        if self.config is not None:
            check = subprocess.run([sys.executable, "-m", "l4proxy", "check", "--config", str(self.config.path)],
                                   capture_output=True, text=True, timeout=60)
            if check.returncode != 0:
                raise SystemExit(f"soak: l4proxy check --config {self.config.path} exited {check.returncode}:\n"
                                 f"{check.stderr.strip()}")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=err)
        wait_listening(self.port)

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *children(self.proc.pid)]

    def sample_rss(self) -> None:
        self.rss.append(sum(rss_kib(pid) for pid in self.pids()))

    def fds(self) -> int:
        return sum(fd_count(pid) for pid in self.pids())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode


@dataclass
class WorkerKill:
    """One SIGKILL of a worker: when it was sent, and when the process was gone (its listener closed)."""

    pid: int
    killed: float  # monotonic
    killed_wall: float
    gone: float  # monotonic: the pidfd became readable (the process exited, its descriptors closed)


def calm(members: list[Any]) -> bool:
    """Every member of a pool in service, and long enough for its health checks to have seen it
    (rise 2 x 300 ms, with jitter): the chaos takes out one member at a time, never the whole pool."""
    now = time.monotonic()
    return all(m.in_service() and now - m.back_at >= CALM for m in members)


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return 0


def client_ports_held_by(pid: int, listen_port: int) -> set[int]:
    """The client ports of the connections accepted on ``listen_port`` that process ``pid`` holds."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if match := re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}")):
                    inodes.add(match.group(1))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                local, remote, inode = cols[1], cols[2], cols[9]
                if inode in inodes and int(local.rsplit(":", 1)[1], 16) == listen_port:
                    ports.add(int(remote.rsplit(":", 1)[1], 16))
    return ports


async def writable(sock: socket.socket) -> None:
    """Wait until ``sock`` (connecting, non-blocking) is writable: its connect completed or failed."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_writer(sock.fileno())


def gone_at(pidfd: int, timeout: float = 10.0) -> float:
    """When the process of ``pidfd`` is gone (its pidfd readable; after ``timeout``, the time then)."""
    select.select([pidfd], [], [], timeout)
    return time.monotonic()


def noticed_after(kills: list[WorkerKill], stderr: Path) -> list[float]:
    """Seconds from each SIGKILL to the supervisor's line about that worker (its time stamp)."""
    killed = r"(\S+) \S+ l4proxy\.workers: worker \d+ \(pid (\d+)\) was killed by SIGKILL"
    logged = {int(match.group(2)): stamp for stamp, match in stamped(stderr, killed)}
    return [logged[k.pid] - k.killed_wall for k in kills if k.pid in logged]


def spread(values: list[float]) -> str:
    """``median X, max Y ms`` of values in seconds."""
    if not values:
        return "none"
    ordered = sorted(values)
    return f"median {ordered[len(ordered) // 2] * 1000:.1f}, max {ordered[-1] * 1000:.1f} ms"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"soak: nothing listening on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.05)


# --- traffic -----------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Per traffic kind: sessions, bytes, and every kind of failure."""

    sessions: int = 0
    sent: int = 0
    received: int = 0
    lost: int = 0
    corrupted: int = 0
    mismatched: int = 0
    expected: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)


class Failed(Exception):
    """A session ended before its traffic was done (a reset, an early EOF, a timeout)."""


@dataclass
class Unexplained:
    """A failure nothing explained when it happened; ``Soak.settle_queued`` looks again at the end."""

    session: Session
    tally: Tally
    message: str
    failed: float  # monotonic
    failed_wall: float


@dataclass
class Session:
    id: int
    proxy: Proxy
    kind: str
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    client_port: int = 0
    member: int = 0  # redis: the member's port, asked through the proxy
    sent: int = 0
    received: int = 0
    corrupted: int = 0


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.deadline = 0.0
        self.ids = iter(range(1, 1 << 31))
        self.cut: set[int] = set()  # sessions an echo server held when it was killed
        self.tallies: dict[str, Tally] = defaultdict(Tally)
        self.abuse: Counter[str] = Counter()
        self.chaos: Counter[str] = Counter()
        self.proxies: dict[str, Proxy] = {}
        self.echo: dict[str, list[EchoServer]] = {}
        self.redis: list[Redis] = []
        self.client_tls: ssl.SSLContext | None = None
        self.unexplained: list[Unexplained] = []  # unexpected failures, until the access logs are read
        self.config_changes: Counter[str] = Counter()  # file rewrites with a real change, by kind
        self.broken_files: Counter[str] = Counter()  # file rewrites with a mistake, by mistake
        self.reload_problems: list[str] = []  # a reload outcome that is not what the file asked for
        self.on_removed: set[int] = set()  # sessions a member held when a reload removed it
        self.removed_ends: Counter[str] = Counter()  # how those sessions ended
        self.refusals_logged = 0  # broken files refused, each with its FILE:LINE line

    # set-up

    async def start(self) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.workdir / "server.pem"))
        cert.private_key_pem.write_to_path(str(self.workdir / "server.key"))
        ca.cert_pem.write_to_path(str(self.workdir / "ca.pem"))
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(server_tls)
        self.client_tls = ssl.create_default_context(cafile=str(self.workdir / "ca.pem"))

        # plain and workers each have one echo server more than their file starts with: config changes add it
        self.echo = {
            "plain": [await EchoServer(f"plain-e{i}", self.cut).start() for i in range(4)],
            "workers": [await EchoServer(f"workers-e{i}", self.cut).start() for i in range(3)],
            "tls": [await EchoServer(f"tls-e{i}", self.cut, server_tls).start() for i in range(2)],
        }
        self.redis = [Redis(self.workdir, free_port()) for _ in range(2)]
        for redis in self.redis:
            redis.start()
        ports = {name: [e.port for e in servers] for name, servers in self.echo.items()}
        tls_flags = ["--tls-cert", str(self.workdir / "server.pem"), "--tls-key", str(self.workdir / "server.key"),
                     "--tls-handshake-timeout", "2s", "--upstream-tls", "--upstream-ca", str(self.workdir / "ca.pem")]
        self.proxies = {
            "plain": Proxy("plain", self.workdir, ports["plain"][:3], [], workers=1),
            "workers": Proxy("workers", self.workdir, ports["workers"][:2], [], workers=2),
            "redis": Proxy("redis", self.workdir, [r.port for r in self.redis],
                           ["--health-send", r"PING\r\n", "--health-expect", "+PONG"]),
            "tls": Proxy("tls", self.workdir, ports["tls"], tls_flags),
        }
        for proxy in self.proxies.values():
            proxy.start()
        await asyncio.sleep(1.0)  # workers started, first probes done: the baseline
        for proxy in self.proxies.values():
            proxy.fds_start = proxy.fds()
            proxy.sample_rss()

    async def stop(self) -> dict[str, int | None]:
        servers = [server for group in self.echo.values() for server in group]
        for server in servers:
            server.kill()
        for _ in range(500):  # let the cut connections' handlers end (10 s at most) before the loop stops
            if not any(server.held for server in servers):
                break
            await asyncio.sleep(0.02)
        for redis in self.redis:
            redis.kill()
        return {name: proxy.stop() for name, proxy in self.proxies.items()}

    # clients

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    async def open(self, session: Session, tls: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the session's proxy, with ``session.client_port`` known from the ``connect()`` call on,
        so even a client reset before its connect completes can be looked up in the access log."""
        sock = socket.socket()
        try:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", session.proxy.port))
            session.client_port = sock.getsockname()[1]
            await asyncio.wait_for(writable(sock), STEP_TIMEOUT)
            if error := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise OSError(error, os.strerror(error))
            return await asyncio.wait_for(
                asyncio.open_connection(sock=sock, ssl=self.client_tls if tls else None,
                                        server_hostname="localhost" if tls else None), STEP_TIMEOUT)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            sock.close()
            raise Failed(f"connect: {type(exc).__name__}") from exc

    async def framed(self, session: Session, sizes: list[int], pipelined: bool, tls: bool = False) -> None:
        """Send one frame per size and check each echo, whole and in order; end with a half-close (plain)
        or a close (TLS sides half-close too, but a TLS client here closes) and expect the end from the
        other side."""
        reader, writer = await self.open(session, tls)
        try:
            if pipelined:
                await both(self._send(session, writer, sizes), self._receive(session, reader, sizes))
            else:
                for seq, size in enumerate(sizes):
                    await self._send(session, writer, [size], first=seq)
                    await self._receive(session, reader, [size], first=seq)
            if not tls:
                writer.write_eof()
                if await asyncio.wait_for(reader.read(1), STEP_TIMEOUT):
                    session.corrupted += 1  # bytes after the last echo
        except (TimeoutError, OSError, RuntimeError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            # uvloop raises RuntimeError when writing to a transport the peer's reset has closed
            raise Failed(type(exc).__name__) from exc
        finally:
            writer.close()

    async def _send(self, session: Session, writer: asyncio.StreamWriter, sizes: list[int], first: int = 0) -> None:
        for seq, size in enumerate(sizes, first):
            body = self.rng.randbytes(size)
            writer.write(HEADER.pack(session.id, seq, size, zlib.crc32(body)) + body)
            session.sent += HEADER.size + size
            await asyncio.wait_for(writer.drain(), STEP_TIMEOUT)

    async def _receive(self, session: Session, reader: asyncio.StreamReader, sizes: list[int], first: int = 0) -> None:
        for seq, size in enumerate(sizes, first):
            header = await asyncio.wait_for(reader.readexactly(HEADER.size), STEP_TIMEOUT)
            sid, got_seq, length, crc = HEADER.unpack(header)
            if (sid, got_seq, length) != (session.id, seq, size) or length > 64 << 20:
                session.corrupted += 1
                raise Failed("wrong frame header")
            body = await asyncio.wait_for(reader.readexactly(length), STEP_TIMEOUT)
            if zlib.crc32(body) != crc:
                session.corrupted += 1
            session.received += HEADER.size + length

    async def redis_session(self, session: Session, commands: int) -> None:
        reader, writer = await self.open(session)
        try:
            writer.write(resp(b"CONFIG", b"GET", b"port"))
            reply = await asyncio.wait_for(read_resp(reader), STEP_TIMEOUT)
            session.member = int(reply[1]) if isinstance(reply, list) and len(reply) == 2 else 0
            for seq in range(commands):
                body = self.rng.randbytes(self.rng.randint(1, 4000))
                value = HEADER.pack(session.id, seq, len(body), zlib.crc32(body)) + body
                key = b"soak:%d:%d" % (session.id, seq)
                request = resp(b"SET", key, value) + resp(b"GET", key)
                writer.write(request)
                session.sent += len(value)
                if await asyncio.wait_for(read_resp(reader), STEP_TIMEOUT) != b"OK":
                    session.corrupted += 1
                got = await asyncio.wait_for(read_resp(reader), STEP_TIMEOUT)
                if got != value:
                    session.corrupted += 1
                else:
                    session.received += len(got)
        except (TimeoutError, OSError, RuntimeError, asyncio.IncompleteReadError, ValueError) as exc:
            raise Failed(type(exc).__name__) from exc
        finally:
            writer.close()

    async def lane(self, proxy_name: str, kind: str) -> None:
        """Run sessions of one kind, one after another, until the deadline."""
        proxy = self.proxies[proxy_name]
        tally = self.tallies[f"{proxy_name} {kind}"]
        for _ in range(MAX_ROUNDS):
            if not self.running():
                break
            session = Session(next(self.ids), proxy, kind)
            try:
                if kind == "rr":
                    await self.framed(session, [self.rng.randint(1, 2000) for _ in range(self.rng.randint(5, 60))],
                                      pipelined=False, tls=proxy_name == "tls")
                elif kind == "bulk":
                    size = 64 * 1024
                    await self.framed(session, [size] * self.rng.randint(8, 64), pipelined=True,
                                      tls=proxy_name == "tls")
                elif kind == "churn":
                    await self.framed(session, [self.rng.randint(1, 300)], pipelined=False)
                elif kind == "redis":
                    await self.redis_session(session, self.rng.randint(5, 40))
                failure = ""
            except Failed as exc:
                failure = str(exc) or "failed"
            self.account(tally, session, failure)

    def account(self, tally: Tally, session: Session, failure: str) -> None:
        if session.id in self.on_removed:
            self.removed_ends["failed" if failure else "ended normally"] += 1
        tally.sessions += 1
        tally.sent += session.sent
        tally.received += session.received
        tally.corrupted += session.corrupted
        if session.corrupted:
            tally.mismatched += 1
        if not failure:
            if session.received != session.sent:
                tally.lost += session.sent - session.received
                tally.mismatched += 1
            return
        cause = self.expected_cause(session)
        if cause:
            tally.expected[cause] += 1
        else:
            message = f"session {session.id} on {session.proxy.name} ({session.kind}): {failure}"
            tally.unexpected.append(message)
            self.unexplained.append(Unexplained(session, tally, message, time.monotonic(), time.time()))

    def settle_queued(self) -> None:
        """Move to *expected* the unexpected failures a worker kill explains through its listener's queue:
        no access-log line for the client's port from the session's start to its failure (no live
        worker saw it), started before a killed worker was gone, failed after that kill. Run once the
        proxies have stopped, so every surviving worker has written its lines."""
        logs = {name: access_ends(p.access_path) for name, p in self.proxies.items() if p.worker_kills}
        left = []
        for item in self.unexplained:
            session = item.session
            kills = session.proxy.worker_kills
            lines = logs.get(session.proxy.name, {}).get(session.client_port, [])
            logged = any(session.started_wall - 1 <= stamp <= item.failed_wall + 2 for stamp, _ in lines)
            if session.client_port and not logged and any(
                session.started <= k.gone and item.failed >= k.killed for k in kills
            ):
                item.tally.unexpected.remove(item.message)
                item.tally.expected["worker killed (queued on its listener)"] += 1
            else:
                left.append(item)
        self.unexplained = left

    def expected_cause(self, session: Session) -> str:
        """Why the chaos, not the proxy, ended this session; '' when nothing explains it."""
        now = time.monotonic()
        if session.id in self.cut:
            return "upstream killed"
        for killed, ports in session.proxy.killed_clients:
            if session.started <= killed and session.client_port in ports:
                return "worker killed"
        overlapping = [t for t in session.proxy.kill_times if session.started <= t <= now]
        if session.member:
            redis = next((r for r in self.redis if r.port == session.member), None)
            if redis and any(session.started <= k <= now for k in redis.kills):
                return "upstream killed"
        if session.id in self.on_removed:
            # Its member left the file while it ran. A removal is not chaos that may cut a session: the
            # member keeps serving and its sessions must run to their end (the file's drain_timeout is
            # longer than any soak session), so a removal adds nothing to kill_times, and a failure here is
            # unexpected unless the member was also killed (the session is in self.cut, above) or the
            # worker holding it was (killed_clients, above). The next rule does not apply either: its
            # bytes reached the member, which is how the removed member came to hold it.
            return ""
        if overlapping and session.received == 0:
            # killed before its first byte reached the upstream (or in a worker's accept queue)
            return "upstream or worker killed before the first reply"
        return ""

    # chaos

    async def chaos_loop(self) -> None:
        # SIGHUP twice as often as the rest: most of them also carry a config change or a broken file
        actions = [self.kill_echo, self.flap_echo, self.kill_redis, self.sighup, self.sighup, self.kill_worker]
        for _ in range(MAX_ROUNDS):
            if not self.running():
                break
            await asyncio.sleep(self.rng.uniform(0.5, 1.5))
            if self.running():
                await self.rng.choice(actions)()

    async def kill_echo(self) -> None:
        name = self.rng.choice(["plain", "workers"])
        server = self.rng.choice(self.echo[name])
        if not calm(self.echo[name]):
            return
        self.proxies[name].kill_times.append(time.monotonic())
        self.chaos["echo server killed"] += 1
        self.chaos["sessions cut by echo kills"] += server.kill()
        await asyncio.sleep(self.rng.uniform(0.3, 1.5))
        await server.start()

    async def flap_echo(self) -> None:
        name = self.rng.choice(["plain", "tls"])
        server = self.rng.choice(self.echo[name])
        if not calm(self.echo[name]):
            return
        self.proxies[name].kill_times.append(time.monotonic())  # the kernel resets connections still queued
        server.stop_listening()  # probes fail: DOWN after --fall; held sessions carry on
        self.chaos["health flapped"] += 1
        await asyncio.sleep(self.rng.uniform(0.8, 2.0))
        await server.start()

    async def kill_redis(self) -> None:
        if not calm(self.redis):
            return
        redis = self.rng.choice(self.redis)
        killed = time.monotonic()
        self.proxies["redis"].kill_times.append(killed)
        redis.kills.append(killed)
        redis.kill()
        self.chaos["redis-server killed"] += 1
        await asyncio.sleep(self.rng.uniform(0.3, 1.5))
        await asyncio.to_thread(redis.start)

    async def sighup(self) -> None:
        """SIGHUP to every proxy. Before it, a file-run proxy's file may get a real change (``rewrite``)
        or a mistake; after it, each file-run proxy's outcome line is waited for and checked."""
        expected: dict[str, tuple[str | None, int | None]] = {}
        for name, proxy in self.proxies.items():
            if proxy.config is not None and proxy.alive():
                expected[name] = self.rewrite(name, proxy.config)
        for proxy in self.proxies.values():
            if proxy.alive():
                proxy.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        self.chaos["SIGHUP to every proxy"] += 1
        for name, (summary, removed) in expected.items():
            if await self.reload_outcome(self.proxies[name], summary) and removed is not None:
                server = next(e for e in self.echo[name] if e.port == removed)
                self.on_removed.update(sid for sid in server.held.values() if sid is not None)

    def rewrite(self, name: str, config: FileConfig) -> tuple[str | None, int | None]:
        """Maybe rewrite ``config``'s file: a real change (a member added or removed, a weight, max_conns
        or a timeout changed), a mistake, or nothing. Returns the reload summary the proxy must log (None:
        it must refuse the file) and the port of a member removed."""
        draw = self.rng.random()
        if draw < 0.15:
            mistake = self.rng.choice(MISTAKES)
            config.write(mistake)
            self.broken_files[mistake] += 1
            return None, None
        listener = pool = False
        removed: int | None = None
        if draw < 0.7:
            servers = self.echo[name]
            absent = [e.port for e in servers if e.port not in config.members]
            kinds = ["weight", "max_conns", "timeout"]
            kinds += ["member added"] * bool(absent)
            kinds += ["member removed"] * (len(config.members) > 2 and calm(servers))  # a kill leaves one
            kind = self.rng.choice(kinds)
            ports = list(config.members)
            if kind == "member added":
                config.members[self.rng.choice(absent)] = MemberOptions()
            elif kind == "member removed":
                removed = self.rng.choice(ports)
                del config.members[removed]
            elif kind == "weight":
                member = config.members[self.rng.choice(ports)]
                member.weight = self.rng.choice([w for w in (1, 2, 3, 4) if w != member.weight])
            elif kind == "max_conns":  # at most one member capped: the others can always take its load
                port = self.rng.choice(ports)
                cap = None if config.members[port].max_conns else self.rng.choice(MAX_CONNS)
                for other in ports:
                    config.members[other].max_conns = None
                config.members[port].max_conns = cap
            else:
                key = self.rng.choice(list(TIMEOUTS))
                config.timeouts[key] = self.rng.choice([v for v in TIMEOUTS[key] if v != config.timeouts[key]])
                kind = f"timeout ({'health.' * (key[0] == 'health')}{key[1]})"
                listener = key[0] == "listener"
            pool = not listener
            self.config_changes[kind] += 1
        config.write()
        return (f"listeners: {1 - listener} kept, {int(listener)} rebuilt, 0 opened, 0 closed;"
                f" pools: {1 - pool} unchanged, {int(pool)} updated, 0 added, 0 removed"), removed

    async def reload_outcome(self, proxy: Proxy, summary: str | None) -> bool:
        """Wait for the proxy's log line on the SIGHUP just sent: the summary that ``summary`` says, or
        (None) a refusal, after at least one ``SIGHUP: FILE:LINE: ...`` line. False, and a problem, when
        it is not that."""
        assert proxy.config is not None
        deadline = time.monotonic() + RELOAD_WAIT
        while True:
            with open(proxy.stderr_path, "rb") as err:
                err.seek(proxy.log_offset)
                text = err.read().decode("latin-1")  # one character a byte: the offset stays exact
            match = OUTCOME.search(text)
            if match:
                break
            if time.monotonic() > deadline or not proxy.alive():
                self.reload_problems.append(f"{proxy.name}: no reload outcome logged {RELOAD_WAIT:.0f}s after SIGHUP")
                return False
            await asyncio.sleep(0.05)
        proxy.log_offset += match.end()
        where = re.compile(rf"SIGHUP: {re.escape(str(proxy.config.path))}:\d+: ")
        if summary is None and match.group(2) and where.search(text[: match.start()]):
            self.refusals_logged += 1
            return True
        if summary is not None and match.group(1) == summary:
            return True
        wanted = "a refusal with FILE:LINE lines" if summary is None else f"'{summary}'"
        self.reload_problems.append(f"{proxy.name}: SIGHUP after a rewrite: wanted {wanted}, got '{match.group(0)}'")
        return False

    async def kill_worker(self) -> None:
        proxy = self.proxies["workers"]
        workers = children(proxy.proc.pid) if proxy.proc else []
        if len(workers) < 2:
            return  # the supervisor is still replacing the last one
        victim = self.rng.choice(workers)
        held = client_ports_held_by(victim, proxy.port)
        try:
            pidfd = os.pidfd_open(victim)
        except OSError:
            return  # it is gone already
        try:
            killed, killed_wall = time.monotonic(), time.time()
            os.kill(victim, signal.SIGKILL)
            proxy.killed_clients.append((killed, held))
            proxy.kill_times.append(killed)
            gone = await asyncio.to_thread(gone_at, pidfd)
        finally:
            os.close(pidfd)
        proxy.worker_kills.append(WorkerKill(victim, killed, killed_wall, gone))
        self.chaos["worker SIGKILLed"] += 1

    # abusive clients

    async def abuse_loop(self) -> None:
        kinds = [self.slowloris, self.garbage, self.half_open, self.never_reads, self.resets]
        for _ in range(MAX_ROUNDS):
            if not self.running():
                break
            await asyncio.gather(*(kind() for kind in kinds), return_exceptions=True)

    async def slowloris(self) -> None:
        """A TLS ClientHello dribbled one byte every 200 ms: closed at the handshake timeout."""
        _, writer = await asyncio.open_connection("127.0.0.1", self.proxies["tls"].port)
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(32)
        try:
            for byte in hello[:15]:
                if writer.transport.is_closing():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.2)
        finally:
            writer.close()
        self.abuse["slowloris TLS handshakes"] += 1

    async def garbage(self) -> None:
        for name in ("tls", "plain", "redis"):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.proxies[name].port)
            writer.write(os.urandom(self.rng.randint(1, 3000)))
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(65536), 0.5)
            writer.close()
            self.abuse["garbage clients"] += 1

    async def half_open(self) -> None:
        """Connect, send a partial frame, then go quiet: reaped by the idle timeout, or closed by us."""
        _, writer = await asyncio.open_connection("127.0.0.1", self.proxies["plain"].port)
        writer.write(b"\x00\x00")
        await asyncio.sleep(self.rng.uniform(1, 3))
        writer.close()
        self.abuse["half-open clients"] += 1

    async def never_reads(self) -> None:
        """Send 8 MiB to the echo and never read the reply: the proxy must push back, not buffer."""
        _, writer = await asyncio.open_connection("127.0.0.1", self.proxies["workers"].port, limit=1024)
        transport = writer.transport
        transport.pause_reading()
        data = b"\xee" * (8 << 20)
        transport.write(data)
        await asyncio.sleep(self.rng.uniform(1, 3))
        writer.close()
        self.abuse["clients that never read"] += 1

    async def resets(self) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", self.proxies["plain"].port)
        writer.write(HEADER.pack(0, 0, 100, 0) + b"x" * 50)
        await asyncio.sleep(0.05)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        writer.transport.abort()
        self.abuse["clients that reset"] += 1

    # the run

    async def sample_loop(self) -> None:
        for _ in range(MAX_ROUNDS):
            if not self.running():
                break
            await asyncio.sleep(1.0)
            for proxy in self.proxies.values():
                if proxy.alive():
                    proxy.sample_rss()

    async def run(self) -> int:
        await self.start()
        self.deadline = time.monotonic() + self.args.duration
        lanes = [("plain", "rr")] * 3 + [("plain", "bulk")] * 2 + [("plain", "churn")] * 2
        lanes += [("workers", "rr")] * 2 + [("workers", "bulk")] + [("workers", "churn")] * 2
        lanes += [("redis", "redis")] * 3 + [("tls", "rr")] * 2 + [("tls", "bulk")]
        background = [asyncio.ensure_future(c) for c in (self.chaos_loop(), self.abuse_loop(), self.sample_loop())]
        crashed = [r for r in await asyncio.gather(*(self.lane(p, k) for p, k in lanes), return_exceptions=True)
                   if isinstance(r, BaseException)]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        fds_end = await self.settled_fds()
        for proxy in self.proxies.values():
            if proxy.alive():
                proxy.sample_rss()
        tracebacks = {name: p.stderr_path.read_text().count("Traceback") for name, p in self.proxies.items()}
        alive = {name: p.alive() for name, p in self.proxies.items()}
        statuses = await self.stop()
        self.settle_queued()
        return self.report(fds_end, tracebacks, alive, statuses, crashed)

    async def settled_fds(self, timeout: float = 10.0) -> dict[str, int]:
        """Each proxy's descriptors once the clients are gone (sessions end, idle clients time out)."""
        deadline = time.monotonic() + timeout
        while True:
            counts = {name: p.fds() for name, p in self.proxies.items()}
            if all(counts[n] <= p.fds_start + FD_SLACK for n, p in self.proxies.items()):
                return counts
            if time.monotonic() > deadline:
                return counts
            await asyncio.sleep(0.2)

    def explain(self) -> list[str]:
        """Unexpected failures counted by the end cause of the nearest access-log line for the client's port."""
        logs = {name: access_ends(p.access_path) for name, p in self.proxies.items()}
        causes: Counter[str] = Counter()
        for item in self.unexplained[:10000]:
            session, failed_at = item.session, item.failed_wall
            candidates = logs[session.proxy.name].get(session.client_port, [])
            nearest = min(candidates, key=lambda c: abs(c[0] - failed_at), default=None)
            cause = nearest[1] if nearest and abs(nearest[0] - failed_at) < 5 else "no access-log line for the port"
            causes[f"{session.proxy.name} {session.kind}: {cause}"] += 1
        return [f"{count:>6}  {cause}" for cause, count in causes.most_common()]

    def kill_lines(self) -> list[str]:
        """How long each killed worker took to be gone (its listener closed) and the supervisor to log it."""
        lines = []
        for name, proxy in self.proxies.items():
            if proxy.worker_kills:
                kills = proxy.worker_kills
                gone = spread([k.gone - k.killed for k in kills])
                noticed = spread(noticed_after(kills, proxy.stderr_path))
                lines.append(f"worker kills ({name}): {len(kills)}; SIGKILL to gone: {gone};"
                             f" to the supervisor's line: {noticed}")
        return lines

    def report(self, fds_end: dict[str, int], tracebacks: dict[str, int], alive: dict[str, bool],
               statuses: dict[str, int | None], crashed: list[BaseException]) -> int:
        problems = [f"a traffic lane of the soak itself crashed: {exc!r}" for exc in crashed]
        lines = [f"soak: {self.args.duration:.0f}s, seed {self.args.seed}", "",
                 f"{'traffic':<16}{'sessions':>9}{'MiB sent':>10}{'MiB back':>10}{'lost B':>8}{'corrupt':>8}"
                 f"{'mismatch':>9}{'expected':>9}{'unexpected':>11}"]
        total = Tally()
        for kind in sorted(self.tallies):
            t = self.tallies[kind]
            lines.append(f"{kind:<16}{t.sessions:>9}{t.sent / 2**20:>10.1f}{t.received / 2**20:>10.1f}{t.lost:>8}"
                         f"{t.corrupted:>8}{t.mismatched:>9}{sum(t.expected.values()):>9}{len(t.unexpected):>11}")
            total.sessions += t.sessions
            total.sent += t.sent
            total.received += t.received
            total.lost += t.lost
            total.corrupted += t.corrupted
            total.mismatched += t.mismatched
            total.expected += t.expected
            total.unexpected += t.unexpected
        lines.append(f"{'total':<16}{total.sessions:>9}{total.sent / 2**20:>10.1f}{total.received / 2**20:>10.1f}"
                     f"{total.lost:>8}{total.corrupted:>8}{total.mismatched:>9}{sum(total.expected.values()):>9}"
                     f"{len(total.unexpected):>11}")
        lines += ["", "expected failures: " + (", ".join(f"{c} {n}" for c, n in total.expected.items()) or "none"),
                  "chaos: " + ", ".join([*(f"{c} {n}" for c, n in sorted(self.chaos.items())),
                                         f"config changes {counted(self.config_changes)}",
                                         f"broken files {counted(self.broken_files)}"]),
                  f"reloads from a file: {self.refusals_logged} of {self.broken_files.total()} broken files"
                  f" refused and logged as FILE:LINE; sessions open on a removed member"
                  f" {counted(self.removed_ends)}",
                  "abusive clients: " + ", ".join(f"{c} {n}" for c, n in sorted(self.abuse.items())),
                  *self.kill_lines(), "",
                  f"{'proxy':<9}{'RSS start':>10}{'peak':>8}{'end':>8} MiB{'fds start':>11}{'end':>6}  exit"
                  f"   (fds: the whole process tree; up to {FD_SLACK} more per process allowed for idle splice pipes)"]
        for name, proxy in self.proxies.items():
            rss = proxy.rss or [0]
            start, peak, end = rss[0] / 1024, max(rss) / 1024, rss[-1] / 1024
            first_half_peak = max(rss[: max(1, len(rss) // 2)]) / 1024
            quarters = "/".join(f"{rss[min(len(rss) - 1, len(rss) * q // 4)] / 1024:.0f}" for q in (1, 2, 3))
            lines.append(f"{name:<9}{start:>10.1f}{peak:>8.1f}{end:>8.1f}    {proxy.fds_start:>11}{fds_end[name]:>6}"
                         f"  {statuses[name]}    RSS at 1/4, 1/2, 3/4: {quarters} MiB")
            if end > first_half_peak * RSS_GROWTH + 16:
                problems.append(f"{name}: RSS grew from {first_half_peak:.1f} MiB (first half's peak) to {end:.1f}")
            second, last = quarter_peak(rss, 1) / 1024, quarter_peak(rss, 3) / 1024
            if last > max(second * RSS_LATE_GROWTH, second + RSS_LATE_SLACK):
                problems.append(f"{name}: RSS did not level off: peak {second:.1f} MiB in the second quarter,"
                                f" {last:.1f} in the last")
            if fds_end[name] > proxy.fds_start + FD_SLACK:
                problems.append(f"{name}: {fds_end[name]} descriptors at the end, {proxy.fds_start} at the start")
            if not alive[name]:
                problems.append(f"{name}: the proxy process died")
            if tracebacks[name]:
                problems.append(f"{name}: {tracebacks[name]} tracebacks on stderr ({proxy.stderr_path})")
            if statuses[name] != 0:
                problems.append(f"{name}: SIGTERM did not end it with status 0 (got {statuses[name]})")
        if total.lost or total.corrupted or total.mismatched:
            problems.append(f"{total.lost} bytes lost, {total.corrupted} corrupted, "
                            f"{total.mismatched} sessions mismatched")
        if total.unexpected:
            problems.append(f"{len(total.unexpected)} unexpected failures: " + "; ".join(total.unexpected[:10]))
        if total.sessions == 0:
            problems.append("no session ran")
        problems += self.reload_problems
        if self.unexplained:
            lines += ["", "unexpected failures, as the proxy's access log ended them:",
                      *(f"  {line}" for line in self.explain())]
        lines += ["", "result: " + ("PASS" if not problems else "FAIL"), *(f"  - {p}" for p in problems)]
        print("\n".join(lines), flush=True)
        return 1 if problems else 0


def counted(kinds: Counter[str]) -> str:
    """``5 (member added 2, weight 3)``: the total, then each kind."""
    return f"{kinds.total()}" + (f" ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})" if kinds else "")


def quarter_peak(samples: list[int], quarter: int) -> int:
    """The largest sample in quarter ``quarter`` (0..3) of the run; the nearest sample for short runs."""
    n = len(samples)
    part = samples[n * quarter // 4: max(n * (quarter + 1) // 4, n * quarter // 4 + 1)]
    return max(part or samples[-1:] or [0])


async def both(*steps: Any) -> None:
    """Run ``steps`` together; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome


def access_ends(path: Path) -> dict[int, list[tuple[float, str]]]:
    """Client port -> [(wall time, end cause)] from an access log."""
    ends: dict[int, list[tuple[float, str]]] = defaultdict(list)
    for stamp, match in stamped(path, r'(\S+) client=\S+:(\d+) .*end=("[^"]*"|\S+)'):
        ends[int(match.group(2))].append((stamp, match.group(3)))
    return ends


def stamped(path: Path, pattern: str) -> list[tuple[float, re.Match[str]]]:
    """The lines of a log file that match ``pattern``, whose first group is the line's ISO time stamp,
    with that time as a POSIX timestamp."""
    found = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            match = re.match(pattern, line)
            if match:
                with contextlib.suppress(ValueError):
                    found.append((datetime.fromisoformat(match.group(1).replace("Z", "+00:00")).timestamp(), match))
    return found


def resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


async def read_resp(reader: asyncio.StreamReader) -> Any:
    """One RESP reply: simple strings and bulk strings as bytes, arrays as lists; errors raise ValueError."""
    line = (await reader.readuntil(b"\r\n"))[:-2]
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise ValueError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else (await reader.readexactly(size + 2))[:-2]
    if kind == b"*":
        return [await read_resp(reader) for _ in range(int(rest))]
    raise ValueError(f"unexpected reply {line[:40]!r}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and chaos (default 60)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000, help="random seed, to rerun a run")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 24 * 3600:
        parser.error(f"--duration {args.duration!r}: expected 1..86400 seconds")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if shutil.which("redis-server") is None:
        raise SystemExit("soak: redis-server is required (scripts/dev test installs it)")
    with tempfile.TemporaryDirectory(prefix="l4proxy-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            status = uvloop.run(soak.run())
        finally:
            for proxy in soak.proxies.values():
                if proxy.alive():
                    proxy.proc.kill()  # type: ignore[union-attr]
            for redis in soak.redis:
                redis.kill()
    sys.exit(status)


if __name__ == "__main__":
    main()
