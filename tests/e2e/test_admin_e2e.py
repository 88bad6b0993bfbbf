"""The admin endpoint of the real ``l4proxy`` command: a real Prometheus server scrapes it every second
and its query API returns the session count; SIGUSR1 logs one line per member; a taken admin port is
one line and exit 1."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..servers import (
    Command,
    RedisServer,
    free_port,
    redis_cli,
    require,
    run_command,
    started,
    wait_listening,
    wait_until,
)


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
    proxy = Command("--upstream", f"127.0.0.1:{redis.port}", "--admin", f"127.0.0.1:{admin}")
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{admin}")
    with started(proxy):
        for _ in range(3):
            assert redis_cli(proxy.port, "PING") == "PONG"
        try:
            prometheus.start()
            expression = "l4proxy_listener_sessions_total"

            def counted() -> bool:
                result = query(prometheus.port, expression)
                return bool(result) and result[0]["value"][1] == "3"

            wait_until(counted, timeout=30)
            [series] = query(prometheus.port, 'l4proxy_member_status{state="UP"}')
            assert series["metric"]["member"] == f"127.0.0.1:{redis.port}" and series["value"][1] == "1"
            [up] = query(prometheus.port, 'up{job="l4proxy"}')
            assert up["value"][1] == "1"  # every scrape succeeded
        finally:
            prometheus.stop()
        assert proxy.stop() == 0


def test_sigusr1_logs_every_member_and_the_admin_answers(redis: RedisServer) -> None:
    admin = free_port()
    member = f"127.0.0.1:{redis.port}"
    proxy = Command("--upstream", member, "--admin", f"127.0.0.1:{admin}", "--no-health-checks")
    with started(proxy):
        wait_listening(admin)  # the admin endpoint starts just after the listeners
        assert fetch(f"http://127.0.0.1:{admin}/healthz") == (200, b"ok\n")
        assert redis_cli(proxy.port, "PING") == "PONG"
        status = f"http://127.0.0.1:{admin}/status"
        wait_until(lambda: json.loads(fetch(status)[1])["totals"]["active_sessions"] == 0)  # the PING's session ended
        proxy.signal(signal.SIGUSR1)
        proxy.wait_log(f"status: pool default member {member} UP since ")
        line = next(x for x in proxy.stderr.splitlines() if "status: pool default" in x)
        assert line.endswith("(started); active 0, sessions 1, last check none")
        assert proxy.stop() == 0


def test_the_admin_endpoint_starts_no_thread(redis: RedisServer) -> None:
    """Once a process has a second thread, glibc sends every system call through its cancellation
    wrappers, a few percent more instructions per relayed request: binding the endpoint must not start
    the loop's resolver threads."""
    admin = free_port()
    proxy = Command("--upstream", f"127.0.0.1:{redis.port}", "--admin", f"127.0.0.1:{admin}")
    with started(proxy):
        wait_listening(admin)
        assert fetch(f"http://127.0.0.1:{admin}/metrics")[0] == 200
        assert redis_cli(proxy.port, "PING") == "PONG"
        assert os.listdir(f"/proc/{proxy.pid}/task") == [str(proxy.pid)]
        assert proxy.stop() == 0


def test_a_taken_admin_port_is_one_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = free_port()
        result = run_command("--listen", f"127.0.0.1:{listen}", "--upstream", "127.0.0.1:1",
                             "--admin", f"127.0.0.1:{port}", "--no-health-checks",
                             "--shutdown-delay", "60s")  # not waited for: the start failed (exit 1 within 30 s)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"l4proxy: error: --admin: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_a_bad_admin_address_names_the_flag() -> None:
    result = run_command("--listen", ":7000", "--upstream", "a", "--admin", "localhost")
    assert result.returncode == 2
    assert result.stderr == "l4proxy: error: --admin 'localhost': a port is required, as HOST:PORT or :PORT\n"


def status_of(port: int) -> dict[str, Any]:
    code, body = fetch(f"http://127.0.0.1:{port}/status")
    assert code == 200
    return json.loads(body)


@contextlib.contextmanager
def two_workers_after_six_pings(redis: RedisServer) -> Iterator[tuple[Command, int, str]]:
    """The proxy with two workers and an admin port, six sessions served: (proxy, admin port, member)."""
    admin = free_port()
    member = f"127.0.0.1:{redis.port}"
    proxy = Command("--upstream", member, "--admin", f"127.0.0.1:{admin}", "--workers", "2")
    with started(proxy):
        wait_listening(admin)
        for _ in range(6):
            assert redis_cli(proxy.port, "PING") == "PONG"
        yield proxy, admin, member


def test_with_workers_the_supervisor_answers_for_all_of_them(redis: RedisServer) -> None:
    with two_workers_after_six_pings(redis) as (proxy, admin, member):
        expected = 6

        def counted() -> bool:  # a session is counted as it opens, its bytes as each worker copies them
            status = status_of(admin)
            totals, [seen] = status["totals"], status["pools"][0]["members"]
            return totals["sessions"] == expected and (totals["bytes_in"], seen["bytes_out"]) == (6 * 14, 6 * 7)

        wait_until(counted)  # the workers copy their counters every quarter second
        [pool] = status_of(admin)["pools"]
        [seen] = pool["members"]
        assert (seen["name"], seen["state"], seen["sessions"], seen["connect_attempts"]) == (member, "UP", 6, 6)
        totals = status_of(admin)["totals"]  # the one member served every byte, through both workers
        assert (seen["bytes_in"], seen["bytes_out"]) == (totals["bytes_in"], totals["bytes_out"]) == (6 * 14, 6 * 7)
        code, body = fetch(f"http://127.0.0.1:{admin}/metrics")
        assert code == 200 and b'l4proxy_workers 2.0' in body

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

        proxy.signal(signal.SIGUSR1)
        proxy.wait_log(f"status: pool default member {member} UP since ")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as held:
            held.sendall(b"PING\r\n")
            assert held.recv(7) == b"+PONG\r\n"
            proxy.signal(signal.SIGTERM)
            wait_until(lambda: fetch(f"http://127.0.0.1:{admin}/readyz") == (503, b"not ready: draining\n"))
        assert proxy.wait(15) == 0


def test_with_workers_the_histograms_and_open_bytes_are_summed_over_them(redis: RedisServer) -> None:
    """Six sessions through two workers: the supervisor's histograms count every one of them, and a
    session still open has its bytes in the totals."""
    from prometheus_client.parser import text_string_to_metric_families

    with two_workers_after_six_pings(redis) as (proxy, admin, member):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as held:
            held.sendall(b"PING\r\n")
            assert held.recv(7) == b"+PONG\r\n"

            def samples() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
                code, body = fetch(f"http://127.0.0.1:{admin}/metrics")
                assert code == 200
                return {
                    (s.name, frozenset(s.labels.items())): s.value
                    for family in text_string_to_metric_families(body.decode())
                    for s in family.samples
                }

            listener, upstream = {"listener": "default"}, {"pool": "default", "member": member}
            durations, connects = "l4proxy_listener_session_duration_seconds", "l4proxy_member_connect_duration_seconds"

            def counted() -> bool:  # the workers copy their counters every quarter second
                found = samples()
                return (
                    found[(f"{durations}_count", frozenset(listener.items()))] == 6
                    and found[(f"{connects}_count", frozenset(upstream.items()))] == 7
                    and found[("l4proxy_listener_bytes_in_total", frozenset(listener.items()))] == 6 * 14 + 6
                )

            wait_until(counted)
            found = samples()
            for name in ("l4proxy_listener_bytes_out_total", "l4proxy_member_bytes_out_total"):
                labels = listener if "listener" in name else upstream
                assert found[(name, frozenset(labels.items()))] == 7 * 7  # six ended, one open
            assert found[(f"{durations}_bucket", frozenset({**listener, "le": "+Inf"}.items()))] == 6
            assert found[(f"{connects}_bucket", frozenset({**upstream, "le": "+Inf"}.items()))] == 7
            assert found[(f"{connects}_bucket", frozenset({**upstream, "le": "5.0"}.items()))] == 7  # local: fast
            assert found[(f"{connects}_sum", frozenset(upstream.items()))] > 0
            code, body = fetch(f"http://127.0.0.1:{admin}/metrics")
            assert code == 200
            checked = subprocess.run(
                [require("promtool"), "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
            )
            assert checked.returncode == 0 and checked.stdout + checked.stderr == b"", checked
            proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0
