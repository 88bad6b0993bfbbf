"""The ``l4proxy`` command reloading its file on SIGHUP, in one process and with workers, and handing its
listening sockets to a new process (RELIABILITY cases 32, 35 and 36)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..servers import Command, free_port, run_command, wait_listening, wait_until


def echo_server() -> tuple[socket.socket, threading.Thread]:
    """A threaded echo server on loopback (every connection echoed until EOF)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener, thread


def write_config(path: Path, listeners: dict[str, int], members: list[int], *, workers: int = 1,
                 extra: str = "") -> None:
    lines = ['access_log = "off"', 'drain_timeout = "5s"', f"workers = {workers}", extra]
    for name, port in listeners.items():
        lines += [f"[listeners.{name}]", f'address = "127.0.0.1:{port}"', 'pool = "main"']
    lines += ["[pools.main]", "members = [" + ", ".join(f'"127.0.0.1:{p}"' for p in members) + "]",
              "[pools.main.health]", "enabled = false"]
    path.write_text("\n".join(lines) + "\n")


def echo_once(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while data := conn.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


class ClientLoop:
    """Clients connecting without pause in a thread: every refused connect or short echo is kept."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.done = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            payload = os.urandom(1 + self.done % 30_000)
            try:
                back = echo_once(self.port, payload)
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if back != payload:
                self.failures.append(f"{len(back)} of {len(payload)} bytes back")
            self.done += 1

    def at_least(self, count: int) -> None:
        start = self.done
        wait_until(lambda: self.done >= start + count, 20)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(20)


@pytest.fixture
def members() -> Iterator[list[int]]:
    servers = [echo_server() for _ in range(2)]
    yield [listener.getsockname()[1] for listener, _ in servers]
    for listener, _ in servers:
        listener.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_file_reloads_under_live_traffic_refuse_nothing_and_a_broken_file_keeps_the_config(
    tmp_path: Path, members: list[int], workers: int
) -> None:
    """Case 35 and 32 through the command: a client loop runs through reloads that add a member and a
    listener, a broken file (kept out, every problem logged with its line), then one that removes the
    listener again; no connect is refused, no byte lost."""
    path = tmp_path / "l4proxy.toml"
    main, extra = free_port(), free_port()
    write_config(path, {"main": main}, members[:1], workers=workers)
    proxy = Command("--config", str(path), listen=False, listeners=workers)
    try:
        proxy.start()
        loop = ClientLoop(main)
        loop.at_least(20)
        write_config(path, {"main": main, "extra": extra}, members, workers=workers)
        proxy.signal(signal.SIGHUP)
        proxy.wait_log("SIGHUP: configuration reloaded")
        wait_listening(extra)
        assert echo_once(extra, b"extra") == b"extra"
        loop.at_least(20)
        path.write_text(path.read_text().replace('pool = "main"', 'pool = "mian"', 1) + "bogus = 1\n")
        proxy.signal(signal.SIGHUP)
        proxy.wait_log("SIGHUP: kept the running configuration (2 problems in the file)")
        assert f"SIGHUP: {path}:7: listeners.main.pool: no such pool; did you mean 'main'? (got 'mian')" \
            in proxy.stderr
        assert f"SIGHUP: {path}:15: pools.main.health.bogus: no such setting" in proxy.stderr
        assert echo_once(extra, b"still") == b"still"  # the old configuration runs on
        loop.at_least(20)
        write_config(path, {"main": main}, members[1:], workers=workers)
        proxy.signal(signal.SIGHUP)
        proxy.wait_log("SIGHUP: configuration reloaded", count=2)
        wait_until(lambda: _refused(extra), 10)
        loop.at_least(20)
        loop.stop()
        assert loop.failures == []
        assert proxy.stop() == 0
    finally:
        proxy.kill()
    assert "Traceback" not in proxy.stderr
    summary = "listeners: 1 kept, 0 rebuilt, 1 opened, 0 closed; pools: 0 unchanged, 1 updated, 0 added, 0 removed"
    assert summary in proxy.stderr


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_takeover_refuses_no_connection_and_the_old_sessions_run_to_their_end(
    tmp_path: Path, members: list[int]
) -> None:
    """Case 36: a client loop across the takeover never sees a refused connect; a session open on the old
    process keeps working after the new one took over, and the old one exits 0 once it ends."""
    path = tmp_path / "l4proxy.toml"
    port = free_port()
    write_config(path, {"main": port}, members)
    control = str(tmp_path / "l4proxy.sock")
    old = Command("--config", str(path), "--takeover", control, listen=False)
    new = None
    try:
        old.start()
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"before")
        assert held.recv(6) == b"before"
        loop = ClientLoop(port)
        loop.at_least(20)
        new = Command("--config", str(path), "--takeover", control, listen=False).spawn()
        new.wait_log("took over 1 listening sockets from pid")
        old.wait_log("takeover: pid")
        loop.at_least(50)
        held.sendall(b"after")  # the old process still relays its session
        assert held.recv(5) == b"after"
        assert old.poll() is None
        held.close()
        assert old.wait(20) == 0  # its last session ended: it exits without waiting the deadline
        loop.at_least(20)
        loop.stop()
        assert loop.failures == []
        assert os.path.exists(control)  # the new process serves it now, for the next upgrade
        assert new.stop() == 0
    finally:
        old.kill()
        if new is not None:
            new.kill()
    assert "Traceback" not in old.stderr + (new.stderr if new else "")


def test_takeover_with_workers_is_refused(tmp_path: Path, members: list[int]) -> None:
    path = tmp_path / "l4proxy.toml"
    write_config(path, {"main": free_port()}, members, workers=2)
    proc = run_command("--config", str(path), "--takeover", str(tmp_path / "s"))
    assert proc.returncode == 2
    assert proc.stderr == (f"l4proxy: error: --takeover '{tmp_path / 's'}': works with one process only, not with"
                           " --workers/workers above 1\n")


def test_a_new_process_that_cannot_start_leaves_the_old_one_serving(tmp_path: Path, members: list[int]) -> None:
    path = tmp_path / "l4proxy.toml"
    port, taken = free_port(), socket.create_server(("127.0.0.1", 0))
    write_config(path, {"main": port}, members)
    control = str(tmp_path / "l4proxy.sock")
    old = Command("--config", str(path), "--takeover", control, listen=False)
    try:
        old.start()
        write_config(tmp_path / "new.toml", {"main": port, "clash": taken.getsockname()[1]}, members)
        new = run_command("--config", str(tmp_path / "new.toml"), "--takeover", control)
        assert new.returncode == 1 and "cannot listen on 127.0.0.1:" in new.stderr
        old.wait_log("takeover: the new process did not start; still serving")
        assert echo_once(port, b"still") == b"still"
        assert old.stop() == 0
    finally:
        old.kill()
        taken.close()


@contextlib.contextmanager
def taken_over(old_flags: tuple[str, ...], new_flags: tuple[str, ...], old_ready: str = "listening on",
               ) -> Iterator[tuple[Command, Command]]:
    """An old process (once it logged ``old_ready``) and a new one that took its sockets over; both are
    stopped after, and neither may have logged a traceback."""
    old = Command(*old_flags, listen=False)
    new = None
    try:
        old.start()
        old.wait_log(old_ready)
        new = Command(*new_flags, listen=False).spawn()
        new.wait_log("took over 1 listening sockets from pid")
        yield old, new
    finally:
        old.kill()
        if new is not None:
            new.kill()
    assert "Traceback" not in old.stderr + (new.stderr if new else "")


def test_takeover_hands_the_admin_endpoint_over_too(tmp_path: Path, members: list[int]) -> None:
    """The new process answers on the same --admin address: it took the old one's socket, so binding it
    does not fail while the old process drains."""
    path = tmp_path / "l4proxy.toml"
    port, admin = free_port(), free_port()
    write_config(path, {"main": port}, members)
    flags = ("--config", str(path), "--takeover", str(tmp_path / "l4proxy.sock"), "--admin", f"127.0.0.1:{admin}")
    with taken_over(flags, flags, old_ready="admin endpoint on http://127.0.0.1:") as (old, new):
        new.wait_log("admin endpoint on http://127.0.0.1:")
        assert old.wait(20) == 0
        with socket.create_connection(("127.0.0.1", admin), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(12) == b"HTTP/1.1 200"
        assert echo_once(port, b"after") == b"after"
        assert new.stop() == 0


def test_a_process_taken_over_does_not_wait_its_shutdown_delay(tmp_path: Path, members: list[int]) -> None:
    """The new process accepts on the very sockets at once, so there are no endpoints to wait for: the old
    one, though started with a minute of --shutdown-delay, stops accepting and exits as soon as its
    sessions are done."""
    path = tmp_path / "l4proxy.toml"
    port = free_port()
    write_config(path, {"main": port}, members)
    flags = ("--config", str(path), "--takeover", str(tmp_path / "l4proxy.sock"))
    with taken_over((*flags, "--shutdown-delay", "60s"), flags) as (old, new):
        assert old.wait(20) == 0
        assert echo_once(port, b"after") == b"after"
        assert new.stop() == 0
    assert "shutdown delay over" not in old.stderr


@pytest.mark.parametrize(("sig", "logged"), [
    (signal.SIGHUP, "SIGHUP: configuration reloaded"),
    (signal.SIGUSR1, "status: pool main member 127.0.0.1:"),
    (signal.SIGTERM, "SIGTERM received: draining"),
])  # fmt: skip
def test_a_signal_sent_on_seeing_listening_on_is_handled_not_fatal(
    tmp_path: Path, members: list[int], sig: signal.Signals, logged: str
) -> None:
    """The handlers are in place before 'listening on' is logged: a SIGHUP reloads, a SIGUSR1 logs the
    status, a SIGTERM drains; none takes the default action, which kills the process. The admin endpoint
    starts after that line, which widens the window a late handler would leave."""
    path = tmp_path / "l4proxy.toml"
    write_config(path, {"main": free_port()}, members)
    proxy = Command("--config", str(path), "--admin", f"127.0.0.1:{free_port()}", listen=False)
    try:
        proxy.start()
        proxy.signal(sig)
        proxy.wait_log(logged)
        # the SIGTERM's drain exits by itself (a second SIGTERM could land after the handlers are gone)
        assert (proxy.wait() if sig is signal.SIGTERM else proxy.stop()) == 0
    finally:
        proxy.kill()
    assert "Traceback" not in proxy.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_a_removed_members_held_session_is_closed_at_the_drain_timeout(
    tmp_path: Path, members: list[int], workers: int
) -> None:
    """A reload that removes a member closes its open sessions once ``--drain-timeout`` has run
    (``--drain-at now``), with workers as in one process: the held client sees its connection close
    about 1 s after the reload, the access log says ``end=shutdown`` on that member, and new clients
    go to the member that replaced it."""
    old, new = members
    path = tmp_path / "l4proxy.toml"
    main = free_port()
    write_config(path, {"main": main}, [old], workers=workers)
    path.write_text(path.read_text().replace('access_log = "off"', 'access_log = "-"'))
    proxy = Command("--config", str(path), "--drain-timeout", "1s", listen=False, listeners=workers)
    try:
        proxy.start()
        held = socket.create_connection(("127.0.0.1", main), timeout=10)
        with held:
            held.sendall(b"ping")
            assert held.recv(16) == b"ping"
            path.write_text(path.read_text().replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}"))
            proxy.signal(signal.SIGHUP)
            proxy.wait_log("SIGHUP: configuration reloaded")
            reloaded = time.monotonic()
            assert echo_once(main, b"fresh") == b"fresh"
            try:
                closed = held.recv(16)
            except ConnectionResetError:
                closed = b""
            waited = time.monotonic() - reloaded
        assert closed == b""
        assert 0.5 < waited < 4.0, f"closed {waited:.2f}s after the reload (--drain-timeout 1s)"
        proxy.wait_for(lambda: any(f"upstream=127.0.0.1:{old}" in line and "end=shutdown" in line
                                   for line in proxy.out_lines), 10, "the held session's access log line")
        assert any(f"upstream=127.0.0.1:{new}" in line for line in proxy.out_lines)
        assert proxy.stop() == 0
    finally:
        proxy.kill()
    assert "Traceback" not in proxy.stderr
