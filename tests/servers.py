"""Real servers for end-to-end tests: redis-server processes and the l4proxy command, by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
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


class L4Proxy:
    """The real ``l4proxy`` command as a subprocess; stderr and stdout go to files we can read."""

    def __init__(self, tmp: Path, args: list[str]) -> None:
        self.port = free_port()
        self.args = ["--listen", f"127.0.0.1:{self.port}", *args]
        self.stderr_path = tmp / f"l4proxy-{self.port}.err"
        self.stdout_path = tmp / f"l4proxy-{self.port}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> L4Proxy:
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "l4proxy", *self.args], stdout=out, stderr=err,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_listening(self.port)
        return self

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout}s; stderr:\n{self.stderr}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def started(*servers: RedisServer | L4Proxy) -> Iterator[None]:
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in reversed(servers):
            server.kill() if isinstance(server, L4Proxy) else server.stop()


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
