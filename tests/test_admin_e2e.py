"""The admin endpoint of the real ``l4proxy`` command: a real Prometheus server scrapes it every second
and its query API returns the session count; SIGUSR1 logs one line per member; a taken admin port is
one line and exit 1."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .servers import L4Proxy, RedisServer, free_port, redis_cli, require, started, wait_listening, wait_until


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def query(port: int, expression: str) -> list[dict[str, Any]]:
    """The result vector of a Prometheus instant query."""
    status, body = fetch(f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expression)}")
    assert status == 200, body
    return json.loads(body)["data"]["result"]


class Prometheus:
    """A real Prometheus server scraping ``target`` every second, with its data in a temporary folder."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.config = tmp / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: l4proxy\n    static_configs:\n      - targets: ['{target}']\n"
        )
        self.data = tmp / "tsdb"
        self.log = tmp / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [require("prometheus"), f"--config.file={self.config}", f"--storage.tsdb.path={self.data}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=log,
            )  # fmt: skip
        wait_listening(self.port, timeout=30)
        wait_until(lambda: fetch(f"http://127.0.0.1:{self.port}/-/ready")[0] == 200, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def redis(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def test_prometheus_scrapes_the_session_count(tmp_path: Path, redis: RedisServer) -> None:
    admin = free_port()
    proxy = L4Proxy(tmp_path, ["--upstream", f"127.0.0.1:{redis.port}", "--admin", f"127.0.0.1:{admin}"])
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{admin}")
    with started(proxy):
        for _ in range(3):
            assert redis_cli(proxy.port, "PING") == "PONG"
        try:
            prometheus.start()
            expression = "l4proxy_listener_sessions_total"

            def counted() -> bool:  # the start-up check that the proxy listens is a session too
                result = query(prometheus.port, expression)
                return bool(result) and result[0]["value"][1] == "4"

            wait_until(counted, timeout=30)
            [series] = query(prometheus.port, 'l4proxy_member_status{state="UP"}')
            assert series["metric"]["member"] == f"127.0.0.1:{redis.port}" and series["value"][1] == "1"
            [up] = query(prometheus.port, 'up{job="l4proxy"}')
            assert up["value"][1] == "1"  # every scrape succeeded
        finally:
            prometheus.stop()
        assert proxy.terminate() == 0


def test_sigusr1_logs_every_member_and_the_admin_answers(tmp_path: Path, redis: RedisServer) -> None:
    admin = free_port()
    member = f"127.0.0.1:{redis.port}"
    proxy = L4Proxy(tmp_path, ["--upstream", member, "--admin", f"127.0.0.1:{admin}", "--no-health-checks"])
    with started(proxy):
        wait_listening(admin)  # the admin endpoint starts just after the listeners
        assert fetch(f"http://127.0.0.1:{admin}/healthz") == (200, b"ok\n")
        assert redis_cli(proxy.port, "PING") == "PONG"
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGUSR1)
        proxy.wait_log(f"status: pool default member {member} UP since ")
        line = next(x for x in proxy.stderr.splitlines() if "status: pool default" in x)
        assert line.endswith("(started); active 0, sessions 2, last check none")  # with the start-up check
        assert proxy.terminate() == 0


def test_a_taken_admin_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = free_port()
        result = subprocess.run(
            [sys.executable, "-m", "l4proxy", "--listen", f"127.0.0.1:{listen}", "--upstream", "127.0.0.1:1",
             "--admin", f"127.0.0.1:{port}", "--no-health-checks"], capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"l4proxy: error: --admin: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_a_bad_admin_address_names_the_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "l4proxy", "--listen", ":7000", "--upstream", "a", "--admin", "localhost"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "l4proxy: error: --admin 'localhost': a port is required, as HOST:PORT or :PORT\n"


def status_of(port: int) -> dict[str, Any]:
    code, body = fetch(f"http://127.0.0.1:{port}/status")
    assert code == 200
    return json.loads(body)


def test_with_workers_the_supervisor_answers_for_all_of_them(tmp_path: Path, redis: RedisServer) -> None:
    admin = free_port()
    member = f"127.0.0.1:{redis.port}"
    proxy = L4Proxy(tmp_path, ["--upstream", member, "--admin", f"127.0.0.1:{admin}", "--workers", "2"])
    with started(proxy):
        wait_listening(admin)
        for _ in range(6):
            assert redis_cli(proxy.port, "PING") == "PONG"
        expected = 7  # with the start-up check that the proxy listens

        def counted() -> bool:
            return status_of(admin)["totals"]["sessions"] == expected

        wait_until(counted)  # the workers copy their counters every quarter second
        [pool] = status_of(admin)["pools"]
        [seen] = pool["members"]
        assert (seen["name"], seen["state"], seen["sessions"], seen["connect_attempts"]) == (member, "UP", 7, 7)
        code, body = fetch(f"http://127.0.0.1:{admin}/metrics")
        assert code == 200 and b'l4proxy_workers 2.0' in body

        assert proxy.proc is not None
        worker = next(int(w) for w in re.findall(r"worker 0 started \(pid (\d+)\)", proxy.stderr))
        os.kill(worker, signal.SIGKILL)
        proxy.wait_log("worker 0 (pid")
        proxy.wait_log("worker 0 started", timeout=10)
        assert status_of(admin)["totals"]["sessions"] == expected  # a dead worker's counts are kept

        request = urllib.request.Request(f"http://127.0.0.1:{admin}/members/default/{member}/drain", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read())["member"]["state"] == "DRAIN"
        assert fetch(f"http://127.0.0.1:{admin}/readyz") == (503, b"not ready: no eligible member in pool default\n")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            assert client.recv(1) == b""  # no worker sends a new session to the drained member
        request = urllib.request.Request(f"http://127.0.0.1:{admin}/members/default/{member}/enable", method="POST")
        urllib.request.urlopen(request, timeout=5).close()
        wait_until(lambda: redis_cli(proxy.port, "PING") == "PONG")

        proxy.proc.send_signal(signal.SIGUSR1)
        proxy.wait_log(f"status: pool default member {member} UP since ")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as held:
            held.sendall(b"PING\r\n")
            assert held.recv(7) == b"+PONG\r\n"
            proxy.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: fetch(f"http://127.0.0.1:{admin}/readyz") == (503, b"not ready: draining\n"))
        assert proxy.proc.wait(15) == 0
