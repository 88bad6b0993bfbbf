"""An older l4proxy tree as one more target of the same run (``run.py --baseline REF``).

Wall-clock numbers of a shared 2-core machine drift between runs by more than the "within 3% of the run
before" the feature bars allow, so the run before is taken in the same interleaved run instead: REF is
checked out into a temporary ``git worktree`` (removed at the end, also on Ctrl-C or an error) and its
l4proxy runs as the target ``l4proxy@SHORT`` with the plain ``l4proxy`` target's flags.

It runs on this venv's python with ``PYTHONPATH`` on the worktree and ``-P``: without ``-P`` the current
directory comes first on ``sys.path`` and, run from this checkout, would import *this* tree's l4proxy.
A one-line launcher prints the file it imported before starting the command, so every start shows which
tree really runs, and a start from the wrong tree is refused.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from targets import HERE, Env, L4proxy, Running, Unsupported

ROOT = HERE.parent
LAUNCH = ("import runpy, sys, l4proxy\n"
          "print('l4proxy from ' + l4proxy.__file__, file=sys.stderr, flush=True)\n"
          "sys.argv[0] = 'l4proxy'\n"
          "runpy.run_module('l4proxy', run_name='__main__')\n")
SOURCE_LINE = "l4proxy from "
# flags of the l4proxy target that only tune it: left out for a tree that does not know them. Any other
# flag the old tree lacks makes the scenario unsupported for it, with the flag named.
TUNING = frozenset({"--log-level", "--drain-timeout"})
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


class BadRef(Exception):
    """A --baseline value git cannot resolve, or a tree that does not run; the message is one line."""


@dataclass(frozen=True)
class Ref:
    """A --baseline value and the commit it names."""

    given: str
    commit: str
    short: str
    subject: str

    @property
    def target(self) -> str:
        return f"l4proxy@{self.short}"


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=120)


def resolve(given: str) -> Ref:
    """The commit ``given`` names in this checkout's repository."""
    done = git("rev-parse", "--verify", "--quiet", f"{given}^{{commit}}")
    if done.returncode != 0:
        raise BadRef(f"--baseline {given!r}: not a commit of the repository at {ROOT}")
    commit = done.stdout.strip()
    short, _, subject = git("log", "-1", "--format=%h %s", commit).stdout.strip().partition(" ")
    return Ref(given, commit, short, subject)


@contextlib.contextmanager
def worktree(ref: Ref, parent: Path) -> Iterator[Path]:
    """A detached worktree of ``ref`` under ``parent``; removed from disk and from git's list afterwards."""
    path = parent / f"baseline-{ref.short}"
    try:
        done = git("worktree", "add", "--detach", "--quiet", str(path), ref.commit)
        if done.returncode != 0:
            raise BadRef(f"--baseline {ref.given!r}: git worktree add failed: {last_line(done.stderr)}")
        yield path
    finally:
        git("worktree", "remove", "--force", str(path))
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def run_env(tree: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(tree)}


def imported_from(log_text: str) -> str:
    """The file the launcher reported importing, '' when it has not said yet."""
    for line in log_text.splitlines():
        if line.startswith(SOURCE_LINE):
            return line.removeprefix(SOURCE_LINE).strip()
    return ""


def within(source: str, tree: Path) -> bool:
    return bool(source) and Path(source).resolve().is_relative_to(tree.resolve())


class L4proxyBaseline(L4proxy):
    """The ``l4proxy`` target, run from an older tree (see the module docstring). ``prepare`` sets it up
    once the worktree exists: which file it imports and which flags its command line knows."""

    def __init__(self, ref: Ref) -> None:
        self.ref, self.name = ref, ref.target
        self.tree: Path | None = None
        self.source = ""
        self.flags: frozenset[str] = frozenset()
        self.dropped: set[str] = set()

    def available(self) -> str | None:
        return None

    def prepare(self, tree: Path) -> None:
        """Ask the old tree's command for its --help: proves it imports from ``tree``, lists its flags."""
        done = subprocess.run([*self.launcher(), "--help"], capture_output=True, text=True, timeout=60,
                              env=run_env(tree), stdin=subprocess.DEVNULL)
        source = imported_from(done.stderr)
        if done.returncode != 0 or not within(source, tree):
            why = f"imports {source}, not from {tree}" if source else last_line(done.stderr or done.stdout)
            raise BadRef(f"--baseline {self.ref.given!r}: its l4proxy does not start: {why}")
        self.tree, self.source, self.flags = tree, source, frozenset(FLAG.findall(done.stdout))

    @staticmethod
    def launcher() -> list[str]:
        return [sys.executable, "-P", "-c", LAUNCH]

    def command(self, env: Env, port: int, access_log: Path) -> list[str]:
        """The l4proxy target's command, on the launcher, with only the flags this tree knows."""
        return [*self.launcher(), *self.known_flags(super().command(env, port, access_log)[1:])]

    def known_flags(self, args: list[str]) -> list[str]:
        out: list[str] = []
        skip = False
        for arg in args:
            name = arg.split("=", 1)[0]
            if skip:
                skip = False
            elif not arg.startswith("--") or name in self.flags:
                out.append(arg)
            elif name in TUNING:
                self.dropped.add(name)
                skip = "=" not in arg  # and its value
            else:
                raise Unsupported(f"{self.name} ({self.ref.given}) has no {name}, which the l4proxy target "
                                  "passes here")
        return out

    def spawn_env(self) -> dict[str, str] | None:
        assert self.tree is not None, "prepare() first"
        return run_env(self.tree)

    def start(self, env: Env) -> Running:
        run = super().start(env)
        assert self.tree is not None and run.proc is not None
        run.source = imported_from(run.proc.log.read_text(errors="replace"))
        if not within(run.source, self.tree):
            run.stop()
            raise Unsupported(f"{self.name} imported {run.source or 'an unknown l4proxy'}, not from {self.tree}")
        return run

    def describe(self) -> str:
        return f"{self.ref.given} = {self.ref.commit[:12]} {self.ref.subject!r}"
