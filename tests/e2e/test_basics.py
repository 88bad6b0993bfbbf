"""What a new user meets first, before any proxying: the license, the demo's help, the command runner's usage."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USAGE_FIRST_LINE = "One command runner for README, CI and developers: sets up .venv on first use, then runs the task."


def test_license_file_is_the_one_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    text = (ROOT / "LICENSE").read_text()
    assert declared == "MIT"
    assert text.startswith("MIT License\n\nCopyright (c) the l4proxy authors\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_demo_help_explains_instead_of_running() -> None:
    done = subprocess.run([sys.executable, "-m", "l4proxy.demo", "--help"], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m l4proxy.demo [-h]\n")
    assert "balancing" in done.stdout and "==" not in done.stdout  # the tour's headings never print


def test_demo_rejects_unknown_arguments_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "l4proxy.demo", "--fast"], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[-1] == "python -m l4proxy.demo: error: unrecognized arguments: --fast"


@pytest.mark.parametrize("args", [[], ["help"], ["--help"]])
def test_dev_script_without_a_task_prints_its_usage(args: list[str]) -> None:
    done = subprocess.run(["bash", "scripts/dev", *args], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert lines[0] == USAGE_FIRST_LINE
    assert [line.split()[1] for line in lines[1:]] == ["demo", "test", "lint", "bench"]
    assert "set -euo pipefail" not in done.stdout


def test_dev_script_names_an_unknown_task() -> None:
    done = subprocess.run(["bash", "scripts/dev", "tset"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert (done.returncode, done.stdout) == (2, "")
    first, *usage = done.stderr.splitlines()
    assert first == "scripts/dev: unknown task 'tset'; expected demo, test, lint or bench"
    assert usage[0] == USAGE_FIRST_LINE
