"""systemd's readiness protocol (``notify.py``), against a real AF_UNIX datagram socket standing in
for systemd's: what ``notify`` sends for each form of ``$NOTIFY_SOCKET``, and the command's
``READY=1`` (once it serves) and ``STOPPING=1`` (on SIGTERM), with one process and with workers."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy.notify import notify

from .servers import RedisServer, free_port, started


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


@pytest.mark.parametrize("abstract", [False, True])
def test_a_state_reaches_the_socket(tmp_path: Path, abstract: bool) -> None:
    with systemd_socket(None if abstract else tmp_path / "notify") as (sock, where):
        assert notify("READY=1", {"NOTIFY_SOCKET": where})
        assert received(sock) == b"READY=1"


@pytest.mark.parametrize(("where", "logged"), [
    ("", None),  # not under systemd: nothing to do, nothing said
    ("relative/notify", "expected an absolute path or @name"),
    ("/nonexistent/notify", "cannot send READY=1: No such file or directory"),
])  # fmt: skip
def test_nothing_sent_and_the_proxy_carries_on(
    where: str, logged: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "l4proxy"):
        assert notify("READY=1", {"NOTIFY_SOCKET": where} if where else {}) is False
    messages = [r.getMessage() for r in caplog.records]
    assert [logged in m for m in messages] == ([] if logged is None else [True]), messages


def test_a_full_queue_does_not_block(tmp_path: Path) -> None:
    """systemd not reading: the send fails at once (non-blocking) instead of stalling the loop."""
    with systemd_socket(tmp_path / "notify") as (_sock, where):
        sent = 0
        while notify("WATCHDOG=1", {"NOTIFY_SOCKET": where}):
            sent += 1
            assert sent < 100_000, "the queue never filled"
        assert sent > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_the_command_is_ready_once_it_serves_and_stopping_on_sigterm(tmp_path: Path, workers: int) -> None:
    """READY=1 arrives when a client already gets through (one per worker); SIGTERM brings STOPPING=1
    (from the supervisor and every worker) and exit 0."""
    port = free_port()
    redis = RedisServer(tmp_path)
    with started(redis), systemd_socket(tmp_path / "notify") as (sock, where):
        argv = [sys.executable, "-m", "l4proxy", "--listen", f"127.0.0.1:{port}", "--upstream",
                f"127.0.0.1:{redis.port}", "--no-health-checks", "--access-log", "off", "--workers", str(workers)]
        err = tmp_path / "stderr"
        with err.open("wb") as stderr:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr,
                                    env={**os.environ, "NOTIFY_SOCKET": where})  # fmt: skip
        try:
            assert received(sock) == b"READY=1"
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:  # serving already
                client.sendall(b"PING\r\n")
                assert client.recv(64) == b"+PONG\r\n"
            states = [b"READY=1"] + [received(sock) for _ in range(workers - 1)]
            assert states == [b"READY=1"] * workers  # every worker listens before any signal reaches it
            proc.send_signal(signal.SIGTERM)
            assert received(sock) == b"STOPPING=1"
            assert proc.wait(15) == 0
            states = [b"STOPPING=1", *pending(sock)]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert states == [b"STOPPING=1"] * (workers + (workers > 1)), states
    assert "Traceback" not in err.read_text(), err.read_text()
