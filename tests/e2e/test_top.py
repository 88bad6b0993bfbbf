"""``l4proxy top`` against a live proxy with two redis members: on a real terminal (a detached tmux
session of 80x24, its screen read with ``capture-pane``) it shows both members UP, then the one whose
server stopped DOWN, and ``q``, Ctrl-C or SIGTERM ends it with the terminal's settings as they were; with stdout
a pipe it prints one table with real rates and exits 0; an admin address that does not answer is one
line naming ``--admin`` and exit 2.

tmux is installed by ``.ci/run``; outside CI (``CI=true``) a machine without it skips the terminal
tests and says why."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..servers import ROOT, Command, RedisServer, free_port, redis_cli, run_command, wait_listening, wait_until

WIDTH, HEIGHT = 80, 24


def tmux_path() -> str:
    """tmux, or a skip (a failure under CI, which installs it)."""
    found = shutil.which("tmux")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is not installed: .ci/run installs it with apt")
        pytest.skip("tmux is not installed (apt install tmux); the terminal tests of l4proxy top need it")
    return found


@dataclass
class Proxy:
    """The real command with an admin endpoint, in front of two redis-servers."""

    command: Command
    members: list[RedisServer]
    admin: str

    def name(self, index: int) -> str:
        return f"127.0.0.1:{self.members[index].port}"


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    members = [RedisServer(tmp_path).start() for _ in range(2)]
    admin = f"127.0.0.1:{free_port()}"
    upstream = ",".join(f"127.0.0.1:{m.port}" for m in members)
    command = Command("--upstream", upstream, "--admin", admin, "--health-interval", "100ms", "--access-log", "off")
    try:
        command.start()
        wait_listening(int(admin.rsplit(":", 1)[1]))  # the admin endpoint starts just after the listeners
        yield Proxy(command, members, admin)
    finally:
        command.kill()
        for member in members:
            member.stop()


class Terminal:
    """``l4proxy top`` in a detached tmux session on its own server socket (the user's tmux is never
    touched). A shell wrapper writes top's exit status to ``done``, and whether ``stty -g`` reads the
    same before and after, so a test learns both once top exits. The wrapper catches SIGINT (and goes on)
so that Ctrl-C ends only top, as it does at a shell prompt."""

    def __init__(self, tmp: Path, admin: str) -> None:
        self.tmux = tmux_path()
        self.socket = tmp / "tmux.sock"
        self.done = tmp / "done"
        top = shlex.join([sys.executable, "-m", "l4proxy", "top", "--admin", admin])
        self.script = (
            f"trap : INT; before=$(stty -g); {top}; status=$?; after=$(stty -g); "
            f'[ "$before" = "$after" ] && same=restored || same=changed; echo "$status $same" > {self.done}.tmp; '
            f"mv {self.done}.tmp {self.done}"
        )

    def run(self, *args: str) -> str:
        out = subprocess.run([self.tmux, "-S", str(self.socket), *args], capture_output=True, text=True, timeout=10,
                             check=True)  # fmt: skip
        return out.stdout

    def start(self) -> Terminal:
        self.run("-f", "/dev/null", "new-session", "-d", "-x", str(WIDTH), "-y", str(HEIGHT), "-s", "top",
                 "-c", str(ROOT), "sh", "-c", self.script)  # fmt: skip
        return self

    def screen(self) -> list[str]:
        return self.run("capture-pane", "-p", "-t", "top").splitlines()

    def shows(self, member: str, state: str) -> bool:
        return any(line.split()[:2] == [member, state] for line in self.screen() if line.strip())

    def wait_for(self, member: str, state: str) -> None:
        """Until the screen shows ``member`` in ``state``; a failure shows the screen."""
        try:
            wait_until(lambda: self.shows(member, state))
        except AssertionError:
            raise AssertionError(f"{member} not {state} on the screen:\n" + "\n".join(self.screen())) from None

    def exit_status(self) -> str:
        wait_until(self.done.exists, timeout=10)
        return self.done.read_text().strip()

    def close(self) -> None:
        subprocess.run([self.tmux, "-S", str(self.socket), "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def terminal(tmp_path: Path, proxy: Proxy) -> Iterator[Terminal]:
    term = Terminal(tmp_path, proxy.admin)
    try:
        yield term.start()
    finally:
        term.close()


def test_top_shows_a_member_going_down_and_q_quits(proxy: Proxy, terminal: Terminal) -> None:
    terminal.wait_for(proxy.name(0), "UP")
    terminal.wait_for(proxy.name(1), "UP")
    screen = terminal.screen()
    assert len(screen) <= HEIGHT and all(len(line) <= WIDTH for line in screen)
    assert screen[0].startswith(f"{proxy.admin}  ready  up ") and "members 2/2 UP" in screen[0]
    assert screen[1].split() == ["NAME", "STATE", "ACTIVE", "SESS/s", "BYTES/s", "FAIL", "EJECT", "QUEUE"]
    assert screen[2].split()[:3] == ["default", f"127.0.0.1:{proxy.command.port}", "OPEN"]
    assert screen[3].split()[:4] == ["pool", "default", "2/2", "UP"]
    assert "q quits" in screen

    proxy.members[1].stop()
    terminal.wait_for(proxy.name(1), "DOWN")
    assert terminal.shows(proxy.name(0), "UP")
    assert any(line.split()[:4] == ["pool", "default", "1/2", "UP"] for line in terminal.screen())

    terminal.run("send-keys", "-t", "top", "q")
    assert terminal.exit_status() == "0 restored"


def test_ctrl_c_quits_and_restores_the_terminal(proxy: Proxy, terminal: Terminal) -> None:
    terminal.wait_for(proxy.name(0), "UP")
    terminal.run("send-keys", "-t", "top", "C-c")
    assert terminal.exit_status() == "130 restored"


def test_sigterm_restores_the_terminal_too(proxy: Proxy, terminal: Terminal) -> None:
    terminal.wait_for(proxy.name(0), "UP")
    shell = int(terminal.run("display-message", "-p", "-t", "top", "#{pane_pid}"))
    [top] = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
    os.kill(int(top), signal.SIGTERM)
    assert terminal.exit_status() == f"{128 + signal.SIGTERM} restored"


def test_not_a_terminal_prints_one_table_with_rates(proxy: Proxy) -> None:
    wait_until(lambda: redis_cli(proxy.command.port, "PING") == "PONG")
    stop = threading.Event()

    def traffic() -> None:  # sessions while top reads twice, a second apart
        while not stop.is_set():
            redis_cli(proxy.command.port, "PING")

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        result = run_command("top", "--admin", proxy.admin)
    finally:
        stop.set()
        worker.join(10)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert all(len(line) <= WIDTH for line in lines)  # a pipe is 80 columns wide unless COLUMNS says more
    assert lines[1].split()[:2] == ["NAME", "STATE"]
    listener = lines[2].split()
    assert listener[:3] == ["default", f"127.0.0.1:{proxy.command.port}", "OPEN"]
    assert float(listener[4].rstrip("k")) > 0 and listener[5] != "0"  # sessions/s and bytes/s from the traffic
    rows = {line.split()[0]: line.split() for line in lines[4:]}
    assert rows[proxy.name(0)][1] == rows[proxy.name(1)][1] == "UP"
    assert len(lines) == 6 and "q quits" not in result.stdout  # no keys to read: no hint


def test_an_admin_address_that_does_not_answer_is_one_line_and_exit_2() -> None:
    port = free_port()
    result = run_command("top", "--admin", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert result.stderr == (
        f"l4proxy: error: --admin '127.0.0.1:{port}': cannot read http://127.0.0.1:{port}/status: Connection refused\n"
    )
    assert result.stdout == ""


def test_a_bad_admin_address_and_a_missing_one_name_the_flag() -> None:
    bad = run_command("top", "--admin", "localhost")
    assert (bad.returncode, bad.stderr) == (2, "l4proxy: error: --admin 'localhost': a port is required, as HOST:PORT"
                                            " or :PORT\n")  # fmt: skip
    missing = run_command("top")
    assert (missing.returncode, missing.stderr) == (2, "l4proxy: error: Missing option '--admin'.\n")
