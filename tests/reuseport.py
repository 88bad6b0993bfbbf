"""SO_REUSEPORT listeners that close with clients still in their accept queue, for tests.

The kernel picks a listener of the group for each connection when its SYN arrives, and a connection
stays on that listener's accept queue until it is accepted. When the listener closes (a worker killed
with SIGKILL), Linux resets every connection still queued there, unless ``net.ipv4.tcp_migrate_req``
is 1: then they move to another listener of the group, which is woken to accept them.

``in_netns`` runs an experiment in a child process that has a network namespace of its own (loopback
up, the sysctl written there, never on the host) and returns what it measured; None when this machine
does not let an unprivileged test make a namespace. The experiments:

* ``queue``: two listeners; clients connect and send a byte; the one listener accepts its own, the
  other closes without accepting. Counts the clients reset and those the survivor accepted.
* ``worker``: ``l4proxy --workers 2`` in front of an echo server; one worker is stopped (SIGSTOP), so
  the clients the kernel gives it wait in its queue, then SIGKILLed. Counts the clients served before
  the kill, those queued, reset and served after it, and how long the worker took to be gone and the
  supervisor to log it.

    python -m tests.reuseport queue 1     # the queue experiment where tcp_migrate_req=1, as JSON
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import select
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIGRATE = Path("/proc/sys/net/ipv4/tcp_migrate_req")
NO_NAMESPACE = 77  # the child's exit status when it may not make a network namespace
_CLONE_NEWNET = 0x40000000
_SIOCSIFFLAGS = 0x8914
_IFF_UP, _IFF_LOOPBACK, _IFF_RUNNING = 0x1, 0x8, 0x40
CLIENTS = 40
STARTED = re.compile(r"worker \d+ started \(pid (\d+)\)")


def in_netns(experiment: str, migrate: int, timeout: float = 60) -> dict[str, Any] | None:
    """Run ``experiment`` in a network namespace of its own with ``tcp_migrate_req`` = ``migrate``."""
    done = subprocess.run([sys.executable, "-m", "tests.reuseport", experiment, str(migrate)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    if done.returncode == NO_NAMESPACE:
        return None
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def _enter_netns(migrate: int) -> bool:
    """Unshare the network namespace, bring its loopback up and set the sysctl there."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        return False
    try:
        with socket.socket() as sock:
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", _IFF_UP | _IFF_LOOPBACK | _IFF_RUNNING))
        MIGRATE.write_text(str(migrate))
    except OSError:  # a namespace, but its loopback or sysctls are not ours to change
        return False
    return True


def _pair() -> tuple[socket.socket, socket.socket]:
    """Two listeners on one port of 127.0.0.1, in one SO_REUSEPORT group."""
    listeners: list[socket.socket] = []
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", listeners[0].getsockname()[1] if listeners else 0))
        sock.listen(128)
        sock.setblocking(False)
        listeners.append(sock)
    return listeners[0], listeners[1]


def _accept_all(sock: socket.socket) -> list[socket.socket]:
    accepted = []
    while True:
        try:
            accepted.append(sock.accept()[0])
        except BlockingIOError:
            return accepted


def _was_reset(client: socket.socket) -> bool:
    """Whether the connection was reset (asked without waiting: the RST is sent as the listener closes)."""
    client.setblocking(False)
    try:
        client.recv(1)
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False
    return False


def queue() -> dict[str, Any]:
    closing, survivor = _pair()
    clients = [socket.create_connection(closing.getsockname()) for _ in range(CLIENTS)]
    for client in clients:
        client.sendall(b"x")
    own = _accept_all(survivor)
    waker = select.epoll()
    waker.register(survivor.fileno(), select.EPOLLIN)
    closing.close()
    migrating = MIGRATE.read_text().strip() != "0"  # else nothing can arrive: no need to wait
    woken = bool(waker.poll(5.0)) if migrating and len(own) < CLIENTS else False
    moved = _accept_all(survivor)
    reset = sum(_was_reset(client) for client in clients)
    return {"own": len(own), "woken": woken, "moved": len(moved), "reset": reset}


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def _queues(port: int) -> list[int]:
    """The accept queue of each listener on 127.0.0.1:``port`` (the rx_queue of its LISTEN row)."""
    queues = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1] == f"0100007F:{port:04X}" and cols[3] == "0A":
            queues.append(int(cols[4].split(":")[1], 16))
    return queues


def _read_echoes(clients: dict[socket.socket, bytes], until: Any, timeout: float) -> tuple[int, int]:
    """Read from ``clients`` (socket -> the message it sent) until ``until()`` or ``timeout``; those that
    echoed or were reset leave the dict. Returns (echoed, reset)."""
    echoed = reset = 0
    deadline = time.monotonic() + timeout
    while clients and not until() and time.monotonic() < deadline:
        readable, _, _ = select.select(list(clients), [], [], 0.05)
        for client in readable:
            try:
                data = client.recv(64)
            except ConnectionResetError:
                reset += 1
                del clients[client]
                continue
            assert data == clients.pop(client), data
            echoed += 1
    return echoed, reset


def worker() -> dict[str, Any]:
    from .servers import Command

    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    member = f"127.0.0.1:{upstream.server_address[1]}"
    flags = ("--upstream", member, "--workers", "2", "--no-health-checks", "--access-log", "off",
             "--drain-timeout", "5s")
    with Command(*flags, listeners=2) as proxy:
        pids = [int(m.group(1)) for line in proxy.err_lines if (m := STARTED.search(line))]
        victim = pids[0]
        os.kill(victim, signal.SIGSTOP)
        opened = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(CLIENTS)]
        clients = {client: b"client %02d" % i for i, client in enumerate(opened)}
        for client, message in clients.items():
            client.sendall(message)

        def settled() -> bool:  # the running worker took all of its own; the rest wait for the stopped one
            queues = _queues(proxy.port)
            return min(queues) == 0 and max(queues) == len(clients)

        before, _ = _read_echoes(clients, settled, timeout=20)
        queued = max(_queues(proxy.port))
        gone = os.pidfd_open(victim)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        select.select([gone], [], [], 10)
        gone_after = time.monotonic() - killed
        os.close(gone)
        proxy.wait_log(f"(pid {victim}) was killed by SIGKILL")
        noticed_after = time.monotonic() - killed
        after, reset = _read_echoes(clients, lambda: False, timeout=10)
        for client in opened:
            client.close()
        stopped = proxy.stop()
    upstream.shutdown()
    return {"before": before, "queued": queued, "after": after, "reset": reset, "unanswered": len(clients),
            "gone_ms": round(gone_after * 1000, 1), "noticed_ms": round(noticed_after * 1000, 1),
            "exit": stopped}  # fmt: skip


def main() -> None:
    experiment, migrate = sys.argv[1], int(sys.argv[2])
    if not _enter_netns(migrate):
        sys.exit(NO_NAMESPACE)
    print(json.dumps({"queue": queue, "worker": worker}[experiment]()), flush=True)


if __name__ == "__main__":
    main()
