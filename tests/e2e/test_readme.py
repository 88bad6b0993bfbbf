"""Every shell command in README.md and benchmarks/README.md runs as written.

The fenced ``sh`` blocks of each file run in order, from the repository root, with ``.venv/bin`` first on
PATH (as after ``source .venv/bin/activate``, which README asks for). A command ending in ``&`` runs in
the background until the file is done; an ``l4proxy`` command (but ``l4proxy check``) is the proxy in
the foreground of its own terminal: it runs until its block is done, and must then drain and exit 0 on
SIGTERM. Either kind must accept connections on the port it names before the next command starts. Every
other command must exit 0, and the ones in CHECKS must also print what README promises. ``$ command``
transcripts (the error examples) must print exactly the lines shown.

What is not run as written, and why, is listed in NOT_RUN; each entry must still match a command in the
docs, so the list cannot go stale. The fixed ports of the examples are swapped for free ones, so parallel
runs on one machine never collide; nothing else in a command is changed.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..servers import free_port, wait_listening

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "benchmarks/README.md")
PORTS = (6380, 7000, 7001, 7002)  # the fixed ports the runnable examples use; each gets a free one
ACCESS_LOG = ROOT / "l4proxy-access.log"  # the Redis example's --access-log, relative to the checkout

NOT_RUN: dict[str, str] = {
    "bash scripts/dev test": "it is the suite that runs this test",
    ".venv/bin/python benchmarks/soak.py --duration 600": "runs for ten minutes; .ci/run runs the same script "
                                                          "for 20 s after the suite",
    "l4proxy --listen :6379 --upstream redis-a,redis-b": "illustrative (marked): redis-a, redis-b are the user's hosts",
    "l4proxy --listen 127.0.0.1:6379 --upstream redis.example.internal:6380":
        "illustrative (marked): a TLS service of the user's, and its CA",
    "redis-cli -p 6379 PING": "talks to the illustrative origination proxy above it",
    "l4proxy --listen 127.0.0.1:6379 --upstream redis-a,redis-b --health-check redis-primary":
        "illustrative (marked): the user's Redis hosts and credentials file",
    "l4proxy --listen :5432 --upstream pg-a,pg-b --health-check postgres-primary":
        "illustrative (marked): the user's PostgreSQL hosts and credentials file",
    "l4proxy --listen :6393 --upstream redis-a,redis-b --health-check redis-primary --split-brain":
        "illustrative (marked): the user's Redis hosts",
    "l4proxy --listen :5433 --upstream pg-a,pg-b --health-check postgres-primary":
        "illustrative (marked): the user's PostgreSQL hosts, credentials file and admin address",
    "l4proxy --listen :5432 --upstream pg-a,pg-b --health-check http":
        "illustrative (marked): the user's Patroni hosts",
    "l4proxy --listen 127.0.0.1:6390 --upstream redis-headless.cache.svc.cluster.local:6379":
        "illustrative (marked): a Kubernetes headless Service of the user's",
    "l4proxy --listen 127.0.0.1:6391 --upstream srv:_redis._tcp.redis.cache.svc.cluster.local":
        "illustrative (marked): an SRV name of the user's",
    "l4proxy --listen :6392 --upstream redis-a,redis-b --accept-proxy":
        "illustrative (marked): the user's Redis hosts behind a load balancer of theirs",
    "bash scripts/dev bench --quick": "installs the bench extra from PyPI and runs for minutes; the same runner "
                                      "with the same flags is checked below as .venv/bin/python benchmarks/run.py",
    ".venv/bin/python benchmarks/callgrind.py connect --count": "runs l4proxy under valgrind for a minute or more "
                                                                "(a measurement, not a check; CI has no valgrind)",
    ".venv/bin/python benchmarks/callgrind.py connect --tls": "the same, a TLS handshake per connection",
    ".venv/bin/python benchmarks/callgrind.py rr": "the same, per request",
    ".venv/bin/python benchmarks/callgrind.py connect --cache-sim": "the same with the cache simulation, on an older "
                                                                    "checkout the reader makes first",
    ".venv/bin/python benchmarks/syscalls.py --count": "attaches strace to a proxy under load (a measurement, not a "
                                                       "check)",
    ".venv/bin/python benchmarks/syscalls.py --tree": "the same on an older checkout the reader makes first",
    "callgrind_annotate /tmp/cg/callgrind.rr.out": "reads the dump the callgrind.py command above it keeps",
}
LOADGEN_DONE = r"(rr|connect): \d+ req/s over \d+ requests, 0 errors,"
PLAN_ONLY = ".venv/bin/python benchmarks/run.py"  # runs for minutes: checked with --plan (flags and names parsed)
CHECKS: dict[str, Callable[[str], bool]] = {  # command prefix -> what its stdout must show
    "redis-cli": lambda out: out.strip() == "PONG",
    "bash scripts/dev demo": lambda out: "== done: drained and stopped" in out and "beta is DOWN" in out,
    ".venv/bin/python certs/generate.py": lambda out: "ca.pem" in out,
    ".venv/bin/python benchmarks/loadgen.py": lambda out: bool(re.match(LOADGEN_DONE, out)),
    PLAN_ONLY: lambda out: "target l4proxy: available" in out,
    "l4proxy check": lambda out: "\n[listeners.cache-tls.tls]\n" in out and "\nworkers = 1\n" in out,
}


@dataclass(frozen=True)
class Command:
    text: str  # as in the docs, continuation lines joined, the comment dropped
    argv: list[str]
    background: bool
    block: int


def fenced(markdown: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block, in order."""
    blocks: list[tuple[str, str]] = []
    lang: str | None = None
    body: list[str] = []
    for line in markdown.splitlines(keepends=True):
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def sh_blocks(markdown: str) -> list[str]:
    return [body for lang, body in fenced(markdown) if lang == "sh"]


def commands(markdown: str) -> list[Command]:
    out = []
    for index, block in enumerate(sh_blocks(markdown)):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if not argv:
                continue
            background = argv[-1] == "&"
            argv = argv[:-1] if background else argv
            out.append(Command(shlex.join(argv), argv, background, index))
    return out


def transcripts(markdown: str) -> list[tuple[str, list[str]]]:
    """Plain blocks that start with ``$ command``: the command, and the output lines shown under it."""
    return [(body.splitlines()[0][2:], body.splitlines()[1:]) for lang, body in fenced(markdown)
            if not lang and body.startswith("$ ")]


def excluded(cmd: Command) -> bool:
    return any(cmd.text.startswith(prefix) for prefix in NOT_RUN)


def long_running(cmd: Command) -> bool:
    return cmd.background or (cmd.argv[0] == "l4proxy" and cmd.argv[1:2] != ["check"])


def listen_port(argv: list[str]) -> int:
    """The port a server command accepts on (--port N or --listen [HOST]:PORT)."""
    for flag, value in itertools.pairwise(argv):
        if flag == "--port":
            return int(value)
        if flag == "--listen":
            return int(value.rsplit(":", 1)[1])
    raise AssertionError(f"a long-running command must name its port: {shlex.join(argv)}")


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1"}


def free_ports(ports: tuple[int, ...]) -> dict[str, str]:
    return {str(port): str(free_port()) for port in ports}


def with_ports(argv: list[str], ports: dict[str, str]) -> list[str]:
    pattern = re.compile(r"(?<!\d)(" + "|".join(ports) + r")(?!\d)")
    return [pattern.sub(lambda m: ports[m.group(1)], arg) for arg in argv]


@dataclass(frozen=True)
class Server:
    proc: subprocess.Popen[bytes]
    argv: list[str]
    log: Path  # its stdout and stderr
    block: int  # the sh block it belongs to; -1: runs in the background until the file is done


class Servers:
    """Long-running commands we started, stopped by their PID; an l4proxy must exit 0 on SIGTERM."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[Server] = []

    def start(self, argv: list[str], block: int) -> None:
        log = self.logs / f"server-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env(), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs.append(Server(proc, argv, log, block))
        accepting = wait_listening(listen_port(argv), timeout=15, exited=proc.poll)
        assert accepting, f"{shlex.join(argv)} exited {proc.returncode} at start: {log.read_text()[-1500:]}"

    def stop(self, keep: Callable[[int], bool] = lambda block: False) -> None:
        for server in [s for s in self.procs if not keep(s.block)]:
            self.procs.remove(server)
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
                try:
                    code = server.proc.wait(15)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    server.proc.wait(5)
                    raise AssertionError(f"{shlex.join(server.argv)} ignored SIGTERM") from None
                if server.argv[0] == "l4proxy":
                    assert code == 0, f"l4proxy exited {code} on SIGTERM: {server.log.read_text()[-1500:]}"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    kept = ACCESS_LOG.exists()
    running = Servers(tmp_path)
    try:
        yield running
    finally:
        running.stop()
        if not kept:
            ACCESS_LOG.unlink(missing_ok=True)


def run_one(cmd: Command, argv: list[str]) -> None:
    if cmd.text.startswith(PLAN_ONLY):
        argv = [*argv, "--plan"]
    done = subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=90,
                          stdin=subprocess.DEVNULL)
    ran = shlex.join(argv)
    assert done.returncode == 0, f"{ran}: exit {done.returncode}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
    for prefix, shows in CHECKS.items():
        if cmd.text.startswith(prefix):
            assert shows(done.stdout), f"{ran}: unexpected output\n{done.stdout[-1500:]}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_sh_command_runs_as_written(doc: str, servers: Servers) -> None:
    ports = free_ports(PORTS)
    block = -1
    for cmd in commands((ROOT / doc).read_text()):
        if cmd.block != block:
            servers.stop(keep=lambda b: b < 0)  # the previous block's foreground proxy: Ctrl-C before moving on
            block = cmd.block
        if excluded(cmd):
            continue
        argv = with_ports(cmd.argv, ports)
        if long_running(cmd):
            servers.start(argv, -1 if cmd.background else cmd.block)
        else:
            run_one(cmd, argv)
    if doc == "README.md":  # the Redis example's sessions were logged, to the file it names
        members = [f"upstream=127.0.0.1:{ports[p]} " for p in ("7001", "7002")]
        servers.stop()
        lines = ACCESS_LOG.read_text().splitlines()
        assert any(m in line for line in lines for m in members), lines[-5:]


def test_the_error_transcripts_print_what_readme_shows() -> None:
    shown_in_readme = transcripts((ROOT / "README.md").read_text())
    assert shown_in_readme
    for command, shown in shown_in_readme:
        done = subprocess.run(shlex.split(command), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stdout, done.stderr.splitlines()) == (2, "", shown), command


def test_every_command_that_is_not_run_is_in_the_docs_and_says_why() -> None:
    texts = [c.text for doc in DOCS for c in commands((ROOT / doc).read_text())]
    for prefix, why in NOT_RUN.items():
        assert sum(t.startswith(prefix) for t in texts) == 1, prefix
        assert why
    assert all(any(t.startswith(prefix) for t in texts) for prefix in CHECKS), "a CHECKS entry matches nothing"


def test_illustrative_examples_are_marked_in_the_readme() -> None:
    text = (ROOT / "README.md").read_text()
    for prefix, why in NOT_RUN.items():
        if why.startswith("illustrative"):
            line = next(ln for ln in text.splitlines() if ln.startswith(prefix.split(" --upstream")[0]) and
                        prefix.split()[-1] in ln)
            block = next(b for b in sh_blocks(text) if line in b)
            assert "# illustrative:" in line or block.startswith("# illustrative:"), line


def test_every_fixed_port_is_used_and_swapped() -> None:
    argvs = [c.argv for doc in DOCS for c in commands((ROOT / doc).read_text()) if not excluded(c)]
    used = {str(p) for p in PORTS}
    ports = free_ports(PORTS)
    assert all(any(p in " ".join(argv) for argv in argvs) for p in used)
    assert not any(p in " ".join(with_ports(argv, ports)) for argv in argvs for p in used - set(ports.values()))
