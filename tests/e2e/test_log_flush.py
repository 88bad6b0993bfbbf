"""When access-log lines reach the file: at the latest with the line a SIGHUP or SIGTERM writes.

Lines are buffered and flushed once a second; a reload and the start of a drain flush them at once, so
an operator who sees ``SIGHUP: ...`` or ``SIGTERM received`` in the diagnostics finds every session
that ended before it in the file. The real command runs as a subprocess; SIGUSR1's status lines say
when the session has ended inside the proxy (its member's active count is back to 0), which is what
"ended just before the signal" means here, with no sleep.
"""

from __future__ import annotations

import re
import signal
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..servers import Command, started, wait_until


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def one_session(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def ended_inside(proxy: Command) -> int:
    """Wait until the proxy itself counts every session so far as over (SIGUSR1: ``active 0``, at
    least one session: ours); how many there were."""
    seen: list[int] = []

    def over() -> bool:
        proxy.signal(signal.SIGUSR1)
        status = re.findall(r"; active (\d+), sessions (\d+),", proxy.stderr)
        if status and status[-1][0] == "0" and int(status[-1][1]) >= 1:
            seen.append(int(status[-1][1]))
        return bool(seen)

    try:
        wait_until(over, timeout=10)
    except AssertionError:
        raise AssertionError(proxy.stderr) from None
    return seen[0]


@pytest.mark.parametrize(
    ("sig", "line"),
    [(signal.SIGHUP, "SIGHUP: no TLS configured, nothing to reload"), (signal.SIGTERM, "SIGTERM received")],
)
def test_lines_of_ended_sessions_are_in_the_file_when_the_signal_is_logged(
    tmp_path: Path, echo_port: int, sig: signal.Signals, line: str
) -> None:
    access = tmp_path / "access.log"
    proxy = Command("--upstream", f"127.0.0.1:{echo_port}", "--no-health-checks", "--access-log", str(access),
                    "--drain-timeout", "10s")  # fmt: skip
    with started(proxy):
        assert one_session(proxy.port, b"before the signal") == b"before the signal"
        ended = ended_inside(proxy)
        # a session still open keeps a SIGTERM's drain (and the log's close at its end) from flushing for us
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as held:
            held.sendall(b"x")
            assert held.recv(1) == b"x"
            proxy.signal(sig)
            proxy.wait_log(line)
            lines = access.read_text().splitlines()
        assert len(lines) == ended
        assert [line for line in lines if " in=17 out=17 " in line and line.endswith(" end=eof")] != []
