"""The command speaks systemd's readiness protocol (``notify.py``; ``Type=notify`` in
``deploy/l4proxy.service``): READY=1 once a client already gets through, STOPPING=1 on SIGTERM, with
one process and with workers, received on a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ..servers import Command, RedisServer, pending, received, started, systemd_socket


@pytest.mark.parametrize("workers", [1, 2])
def test_the_command_is_ready_once_it_serves_and_stopping_on_sigterm(
    tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY=1 arrives when a client already gets through (one per worker); SIGTERM brings STOPPING=1
    (from the supervisor and every worker) and exit 0."""
    redis = RedisServer(tmp_path)
    with started(redis), systemd_socket(tmp_path / "notify") as (sock, where):
        monkeypatch.setenv("NOTIFY_SOCKET", where)  # the child's environment
        proxy = Command("--upstream", f"127.0.0.1:{redis.port}", "--no-health-checks", "--access-log", "off",
                        "--workers", str(workers)).spawn()
        try:
            assert received(sock) == b"READY=1"
            with proxy.connect() as client:  # serving already
                client.sendall(b"PING\r\n")
                assert client.recv(64) == b"+PONG\r\n"
            states = [b"READY=1"] + [received(sock) for _ in range(workers - 1)]
            assert states == [b"READY=1"] * workers  # every worker listens before any signal reaches it
            proxy.signal(signal.SIGTERM)
            assert received(sock) == b"STOPPING=1"
            assert proxy.wait(15) == 0
            states = [b"STOPPING=1", *pending(sock)]
        finally:
            proxy.kill()
    assert states == [b"STOPPING=1"] * (workers + (workers > 1)), states
    assert "Traceback" not in proxy.stderr, proxy.stderr
