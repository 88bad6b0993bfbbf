"""End to end: the real ``l4proxy`` command in front of two real redis-servers.

redis-cli and redis-benchmark talk through it; one redis stops mid-run and clients keep being
served, health checks mark it DOWN, and it comes back UP after it restarts.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ..servers import Command, RedisServer, redis_cli, require, started

HEALTH = ["--health-send", r"PING\r\n", "--health-expect", "+PONG", "--health-interval", "200ms",
          "--health-timeout", "500ms", "--rise", "2", "--fall", "2", "--connect-timeout", "1s"]


def connections(server: RedisServer) -> int:
    info = server.cli("INFO", "stats")
    return int(re.search(r"total_connections_received:(\d+)", info).group(1))  # type: ignore[union-attr]


def test_redis_cli_and_benchmark_through_the_proxy(tmp_path: Path) -> None:
    a, b = RedisServer(tmp_path), RedisServer(tmp_path)
    proxy = Command("--upstream", f"127.0.0.1:{a.port},127.0.0.1:{b.port}", *HEALTH,
                    "--access-log", str(tmp_path / "access.log"))
    with started(a, b, proxy):
        assert redis_cli(proxy.port, "SET", "greeting", "hello") == "OK"
        # the key lives on whichever member served the SET: exactly one of them
        assert sorted([a.cli("EXISTS", "greeting"), b.cli("EXISTS", "greeting")]) == ["0", "1"]
        before = connections(a), connections(b)
        out = subprocess.run([require("redis-benchmark"), "-h", "127.0.0.1", "-p", str(proxy.port), "-n", "20000",
                              "-c", "20", "-t", "set,get", "-q"], capture_output=True, timeout=120, check=True)
        text = out.stdout.decode()
        assert re.search(r"SET: [\d.]+ requests per second", text), text
        assert re.search(r"GET: [\d.]+ requests per second", text), text
        gained = connections(a) - before[0], connections(b) - before[1]
        # 2 tests x 20 benchmark clients (+ probes): least-connections spreads them over both members
        assert min(gained) >= 15, gained
        assert proxy.stop() == 0
    log = (tmp_path / "access.log").read_text().splitlines()
    assert len(log) >= 41  # one record per session: redis-cli + 40 benchmark clients (+ its CONFIG probe)
    assert all(re.search(r" in=\d+ out=\d+ duration=[\d.]+s end=", line) for line in log)
    assert "Traceback" not in proxy.stderr


def test_member_failure_is_invisible_to_clients_and_recovery_is_detected(tmp_path: Path) -> None:
    a, b = RedisServer(tmp_path), RedisServer(tmp_path)
    proxy = Command("--upstream", f"127.0.0.1:{a.port},127.0.0.1:{b.port}", *HEALTH, "--access-log", "-")
    access = proxy.out_lines

    def served_by(port: int, since: int) -> int:
        proxy.wait_for(lambda: len(access) >= since + sessions, what="access records")  # records land at close
        return sum(f"upstream=127.0.0.1:{port} " in line for line in access[since:])

    with started(a, b, proxy):
        for i in range(6):
            assert redis_cli(proxy.port, "PING") == "PONG", i
        sessions = 6
        assert served_by(a.port, 0) == served_by(b.port, 0) == 3
        b.stop()
        mark = len(access)
        for i in range(20):  # every later client is still served: failed connects to b retry on a
            assert redis_cli(proxy.port, "PING") == "PONG", i
        sessions = 20
        assert served_by(a.port, mark) == 20
        proxy.wait_log(f"member 127.0.0.1:{b.port} is DOWN")

        b.start()
        proxy.wait_log(f"member 127.0.0.1:{b.port} is UP")
        mark = len(access)
        for _ in range(10):
            assert redis_cli(proxy.port, "PING") == "PONG"
        sessions = 10
        assert served_by(b.port, mark) == 5  # b takes its share of new clients again
        assert proxy.stop() == 0
    assert proxy.stderr.count(f"member 127.0.0.1:{b.port} is DOWN") == 1
    assert "Traceback" not in proxy.stderr
