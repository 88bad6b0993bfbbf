"""The machine and software a result came from, so numbers are never quoted without their context."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def first_line(cmd: list[str]) -> str | None:
    """First non-empty output line of a command, or None when it is missing or fails."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT)
        if done.returncode == 0:
            lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
            return lines[0].strip() if lines else ""
    return None


def version(dist: str) -> str | None:
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(dist)
    return None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_state() -> dict[str, Any]:
    """Commit and whether the tree had uncommitted changes (results from a dirty tree say so)."""
    commit = first_line(["git", "rev-parse", "HEAD"])
    status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT,
                            timeout=10, check=False).stdout if commit is not None else ""
    return {"commit": commit or "none (no commits yet)", "dirty": bool(status.strip())}


def machine() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "uvloop": version("uvloop"),
        "l4proxy": version("l4proxy"),
        "pproxy": version("pproxy"),
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "redis": first_line(["redis-server", "--version"]),
        "git": git_state(),
    }
