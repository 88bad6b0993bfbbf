"""Real servers for end-to-end tests: redis-server processes and the l4proxy command, by PID."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .kit import eventually


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, host: str = "127.0.0.1", timeout: float = 10.0,
                   exited: Callable[[], object] = lambda: None) -> bool:
    """Wait until a connect to the port succeeds (True), or ``exited()`` says the server is gone (False).
    A server that tells nobody it is ready can only be asked by connecting; nothing else here polls."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            if exited() is not None:
                return False
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """``kit.eventually`` for a test without a loop, asking a server that announces nothing (an HTTP
    endpoint, a count in redis); output of the command is waited on with ``Command.wait_for``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


def require(command: str) -> str:
    """The path of ``command``; a missing server fails the test (CI installs it), it never skips."""
    path = shutil.which(command)
    assert path, f"{command} is not installed: run the test command from README.md (it installs it)"
    return path


class RedisServer:
    """A throwaway redis-server on a loopback port, no persistence."""

    def __init__(self, tmp: Path, port: int | None = None, extra: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.dir = tmp
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        args = [require("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cli(self, *args: str, port: int | None = None) -> str:
        return redis_cli(port or self.port, *args)


def redis_cli(port: int, *args: str, timeout: float = 10) -> str:
    out = subprocess.run([require("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, timeout=timeout, check=True)
    return out.stdout.decode().strip()


ROOT = Path(__file__).resolve().parent.parent
COMMAND = (sys.executable, "-m", "l4proxy")


def run_command(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The ``l4proxy`` command run to its end (a mistake, ``--help``, ``check``): exit code and output."""
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)


class Command:
    """The real ``l4proxy`` command as a child process, stopped by its PID.

    ``start()`` returns once it logged "listening on" ``listeners`` times (a TCP probe would itself be a
    session, or a failed handshake on a TLS listener). Threads collect stderr and stdout as lines (the
    access log is on stdout with ``--access-log -``) under one condition, so ``wait_for`` wakes on each
    new line, and sync and async tests read the same lists. Unless ``listen`` is False, ``--listen`` goes
    first, on a free port of ``host``; ``limit`` sets the child's open-files limit before exec."""

    def __init__(self, *args: str, host: str = "127.0.0.1", listen: bool = True, listeners: int = 1,
                 limit: int | None = None) -> None:
        self.host = host
        self.port = free_port(host) if listen else 0
        bracketed = f"[{host}]" if ":" in host else host
        self.args = [*(["--listen", f"{bracketed}:{self.port}"] if listen else []), *args]
        self.listeners = listeners
        self.limit = limit
        self.err_lines: list[str] = []
        self.out_lines: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._changed = threading.Condition()
        self._readers: list[threading.Thread] = []

    def spawn(self) -> Command:
        """Start the child without waiting for it (async tests wait with ``kit.eventually(cmd.ready)``)."""
        limit = self.limit

        def set_limit() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.proc = subprocess.Popen([*COMMAND, *self.args], cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=set_limit,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, lines in ((self.proc.stderr, self.err_lines), (self.proc.stdout, self.out_lines)):
            reader = threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _collect(self, stream: IO[bytes], lines: list[str]) -> None:
        with stream:
            for raw in stream:
                with self._changed:
                    lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()  # the child closed its end: waits for a line can give up now

    def ready(self) -> bool:
        """Listening on every listener, or exited (``start`` then fails with its stderr)."""
        return self.count("listening on") >= self.listeners or self.poll() is not None

    def start(self, timeout: float = 10.0) -> Command:
        self.spawn()
        self.wait_for(self.ready, timeout, "listening on")
        assert self.poll() is None, f"l4proxy exited {self.poll()} at start:\n{self.stderr}"
        return self

    def count(self, text: str) -> int:
        """How many stderr lines contain ``text``."""
        return sum(text in line for line in list(self.err_lines))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        """Block until ``predicate()`` holds, re-checked on every new line of output."""
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise AssertionError(f"{what} not within {timeout}s; stderr:\n{self.stderr}")

    def wait_log(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        self.wait_for(lambda: self.count(text) >= count, timeout, repr(text))

    async def logged(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        """``wait_log`` for async tests: the loop keeps running their servers meanwhile."""
        await eventually(lambda: self.count(text) >= count, timeout)

    @property
    def stderr(self) -> str:
        return "".join(f"{line}\n" for line in list(self.err_lines))

    @property
    def stdout(self) -> str:
        return "".join(f"{line}\n" for line in list(self.out_lines))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        """The exit code, once the child exited and its output is read to the end."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (a drain) and the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """End the child if it still runs (a test that failed midway) and close its pipes."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.wait(10)

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=5)

    def __enter__(self) -> Command:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    async def __aenter__(self) -> Command:
        """``start`` for a test whose own servers run on its loop, which must not block meanwhile."""
        await eventually(self.spawn().ready, 10)
        assert self.poll() is None, f"l4proxy exited {self.poll()} at start:\n{self.stderr}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.kill()

    async def exited(self, timeout: float = 10.0) -> int:
        """The exit code once the child exits, the loop running meanwhile (a drain may need its servers)."""
        await eventually(lambda: self.poll() is not None, timeout)
        return self.wait(5)

    async def stopped(self, timeout: float = 10.0) -> int:
        """SIGTERM, and the exit code as ``exited``."""
        self.signal(signal.SIGTERM)
        return await self.exited(timeout)


@contextlib.contextmanager
def started(*servers: RedisServer | Command) -> Iterator[None]:
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in reversed(servers):
            server.kill() if isinstance(server, Command) else server.stop()


PING = b"*1\r\n$4\r\nPING\r\n"


@dataclass(frozen=True)
class Certs:
    """Paths of PEM files: ``ca`` signs server/client; ``ca2`` signs server2/client2 (a second PKI)."""

    dir: Path

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


def tls_redis(tmp: Path, certs: Certs, auth_clients: str = "no", port: int | None = None) -> RedisServer:
    """A redis-server that speaks TLS only: its plain port is off (``--port 0``)."""
    port = port or free_port()
    return RedisServer(tmp, port=port, extra=[
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", certs["server.pem"],
        "--tls-key-file", certs["server.key"], "--tls-ca-cert-file", certs["ca.pem"],
        "--tls-auth-clients", auth_clients,
    ])  # fmt: skip


def tls_ping(port: int, ca: str, cert: str | None = None, key: str | None = None) -> bytes:
    """A RESP PING over TLS from Python's ssl module; the reply bytes."""
    ctx = ssl.create_default_context(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(
        raw, server_hostname="localhost"
    ) as sock:
        sock.sendall(PING)
        return sock.recv(100)


class PostgresCluster:
    """A throwaway PostgreSQL cluster on a loopback port under ``root``, run by an unprivileged user
    (``nobody`` when the tests run as root, else the current user): initdb, or pg_basebackup of
    another cluster (``standby_of``: a streaming standby with ``-R``; ``copy_of``: a standalone copy)."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.data = root / name
        self.port = free_port()
        self.log = root / f"{name}.log"

    @staticmethod
    def bin(command: str) -> str:
        found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{command}"))
        return str(found[-1]) if found else require(command)

    def run(self, *args: str) -> None:
        """Run a server-side command as the cluster's owner."""
        owner = {"user": "nobody", "group": "nogroup", "extra_groups": []} if os.geteuid() == 0 else {}
        subprocess.run(args, check=True, capture_output=True, timeout=60, cwd=self.root, **owner)  # type: ignore[call-overload]

    def init(self, hba: str) -> PostgresCluster:
        self.run(self.bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                 "--no-sync", "--no-instructions")
        (self.data / "pg_hba.conf").write_text(hba)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\nfsync = off\n")
        return self

    def backup_of(self, source: PostgresCluster, standby: bool) -> PostgresCluster:
        self.run(self.bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(source.port), "-U", "postgres",
                 "-D", str(self.data), "-X", "stream", "--no-sync", *(["-R"] if standby else []))
        return self

    def start(self) -> PostgresCluster:
        self.run(self.bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-o", f"-p {self.port}", "start")
        return self

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.run(self.bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def promote(self) -> None:
        self.run(self.bin("pg_ctl"), "-D", str(self.data), "-w", "promote")

    def sql(self, statement: str) -> str:
        out = subprocess.run([require("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d",
                              "postgres", "-AXqt", "-v", "ON_ERROR_STOP=1", "-c", statement],
                             capture_output=True, timeout=30, check=True, text=True)
        return out.stdout.strip()


@contextlib.contextmanager
def postgres_root() -> Iterator[Path]:
    """A directory the clusters' owner can use (``nobody`` cannot enter a root-only temp dir)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="l4proxy-pg-"))
    try:
        root.chmod(0o777)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def systemd_socket(path: Path | None = None) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket and the ``$NOTIFY_SOCKET`` that names it (abstract when ``path`` is None)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if path is None:
            sock.bind("\0l4proxy-test-" + os.urandom(6).hex())
            yield sock, "@" + sock.getsockname()[1:].decode()
        else:
            sock.bind(str(path))
            yield sock, str(path)


def received(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    return sock.recv(4096)


def pending(sock: socket.socket) -> list[bytes]:
    """The datagrams queued on ``sock`` now."""
    sock.setblocking(False)
    out = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(sock.recv(4096))
    return out


@contextlib.contextmanager
def redis_servers(tmp: Path, count: int) -> Iterator[list[RedisServer]]:
    """``count`` independent redis-servers (each a master), each in its own directory under ``tmp``."""
    servers: list[RedisServer] = []
    try:
        for index in range(count):
            (tmp / f"redis-{index}").mkdir()
            servers.append(RedisServer(tmp / f"redis-{index}").start())
        yield servers
    finally:
        for server in servers:
            server.stop()
