"""A failover with ``--workers 2``, the real command in front of real redis-servers: the supervisor runs
the probes and publishes the primary pool's routing in the shared table (``table.py``: each member's
role byte), so a client that a worker accepts while no member claims the primary role waits in that
worker's queue and is served by the new primary once it is promoted, what it sent meanwhile delivered
there; a split brain is still refused at once, and counted, whichever worker accepted the client."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from l4proxy.balancer import SPLIT_BRAIN

from ..servers import Command, RedisServer, free_port, redis_servers

PING = b"*1\r\n$4\r\nPING\r\n"
CLIENTS = 8  # enough that both workers most likely take some (SO_REUSEPORT spreads them by hash)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    with redis_servers(tmp_path, 2) as (a, b):
        yield a, b


class Workers(Command):
    """``l4proxy --workers 2`` over a primary pool of ``a`` and ``b``, with an admin endpoint and an access log."""

    def __init__(self, tmp_path: Path, a: RedisServer, b: RedisServer) -> None:
        self.admin = free_port()
        self.access_log = tmp_path / "access.log"
        super().__init__(
            "--upstream", f"127.0.0.1:{a.port},127.0.0.1:{b.port}", "--health-check", "redis-primary",
            "--health-interval", "50ms", "--health-timeout", "1s", "--rise", "1", "--fall", "1",
            "--queue-timeout", "30s", "--workers", "2", "--admin", f"127.0.0.1:{self.admin}",
            "--access-log", str(self.access_log), listeners=2,
        )  # fmt: skip

    def metric(self, name: str) -> float:
        """A pool counter or gauge of ``/metrics``, summed over the workers by the supervisor."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as response:
            text = response.read().decode()
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert match is not None, f"{name} not in /metrics"
        return float(match.group(1))

    def records(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []


def settle(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for ``predicate()`` (the admin counters are copied from the workers every 0.25 s)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        time.sleep(0.05)


def client(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(payload)
    return sock


def replies(sock: socket.socket, count: int) -> list[bytes]:
    """The first ``count`` reply lines, or fewer if the proxy closes the client first (a reset, as the
    proxy closes one whose bytes it did not read, counts as nothing more sent)."""
    lines: list[bytes] = []
    with sock.makefile("rb") as stream:
        while len(lines) < count:
            try:
                line = stream.readline()
            except ConnectionResetError:
                break
            if not line:
                break
            lines.append(line)
    return lines


def test_a_client_queued_in_a_worker_is_served_by_the_new_primary(
    tmp_path: Path, servers: tuple[RedisServer, RedisServer]
) -> None:
    a, b = servers
    b.cli("REPLICAOF", "127.0.0.1", str(a.port))
    with Workers(tmp_path, a, b) as proxy:
        proxy.wait_log(f"member 127.0.0.1:{b.port} is DOWN")  # the replica: a alone claims the role
        a.cli("REPLICAOF", "127.0.0.1", str(b.port))  # demoted: no primary now, and no split brain
        proxy.wait_log(f"member 127.0.0.1:{a.port} is DOWN")
        clients = [
            client(proxy.port, b"*3\r\n$3\r\nSET\r\n$2\r\nk%d\r\n$2\r\nv%d\r\n" % (i, i) + PING)
            for i in range(CLIENTS)
        ]
        try:
            settle(lambda: proxy.metric('l4proxy_pool_queue_waiting{pool="default"}') == CLIENTS, "every client queued")
            b.cli("REPLICAOF", "NO", "ONE")  # promoted: each worker serves its queue once it sees b chosen
            assert [replies(sock, 2) for sock in clients] == [[b"+OK\r\n", b"+PONG\r\n"]] * CLIENTS
        finally:
            for sock in clients:
                sock.close()
        assert [b.cli("GET", f"k{i}") for i in range(CLIENTS)] == [f"v{i}" for i in range(CLIENTS)]
        settle(lambda: proxy.metric('l4proxy_pool_queue_served_total{pool="default"}') == CLIENTS, "served counted")
        assert proxy.metric('l4proxy_pool_no_upstream_total{pool="default"}') == 0
        settle(lambda: len(proxy.records()) == CLIENTS, "access records")
        assert proxy.stop() == 0
    records = proxy.records()
    assert all(f"upstream=127.0.0.1:{b.port} " in line for line in records), records
    assert "Traceback" not in proxy.stderr


def test_a_split_brain_with_workers_is_refused_at_once_and_counted(
    tmp_path: Path, servers: tuple[RedisServer, RedisServer]
) -> None:
    a, b = servers  # two masters
    with Workers(tmp_path, a, b) as proxy:
        proxy.wait_log("split brain: 2 members claim the primary role")
        started = time.monotonic()
        clients = [client(proxy.port, PING) for _ in range(CLIENTS)]
        try:
            assert [replies(sock, 1) for sock in clients] == [[]] * CLIENTS  # closed, nothing forwarded
        finally:
            for sock in clients:
                sock.close()
        assert time.monotonic() - started < 10  # at once, far sooner than the queue's 30 s
        settle(lambda: proxy.metric('l4proxy_pool_no_upstream_total{pool="default"}') == CLIENTS, "refusals counted")
        assert proxy.metric('l4proxy_pool_queue_served_total{pool="default"}') == 0
        settle(lambda: len(proxy.records()) == CLIENTS, "access records")
        assert proxy.stop() == 0
    records = proxy.records()
    assert all(SPLIT_BRAIN in line and "queue" not in line for line in records), records
    assert proxy.count("split brain: 2 members claim") == 1  # logged once, by the supervisor
