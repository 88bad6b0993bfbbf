"""System calls, socket options and timers per proxied connection: what callgrind's user-space count misses.

callgrind counts the proxy's own instructions; a change that adds a system call, a socket option or a
timer per session costs kernel time that it does not see. This runs l4proxy (this tree, or another
checkout's package with ``--tree``) with the benchmark target's flags in front of ``upstream.py``, runs
an uncounted warm-up of ``connect`` load, then attaches ``strace -f`` to the proxy and runs the measured
load. Every traced call is counted by name; ``setsockopt`` calls are counted by level and option, so an
option set per connection (rather than inherited from the listening socket) shows. Page faults and
context switches of the proxy come beside them, read from ``/proc``; ``--no-strace`` reads those alone,
without the tracer's stops. (Timers are not system calls: uvloop arms them in libuv; count
``uv_timer_start`` in a ``callgrind.py --keep`` dump.)

    .venv/bin/python benchmarks/syscalls.py --count 3000
    .venv/bin/python benchmarks/syscalls.py --count 3000 --tree /tmp/old  # git archive REF l4proxy | tar -x -C /tmp/old

The counts are per connection of the measured load, and include the proxy's timers (health probes,
sweeper, log flushes) for the load's wall time, which strace stretches: read the small fractional
part as that, and compare trees measured the same way.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from callgrind import LAUNCH, connect_options, loadgen, stop
from targets import free_port, start_upstream, wait_ready

LINE = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)")
SETSOCKOPT = re.compile(r"^\d+, (\w+), (\w+),")


def parse(trace: str) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """System calls by name, and setsockopt calls by ``LEVEL/OPTION``, from ``strace -f`` output.

    A call interrupted by another thread's shows as ``<unfinished ...>`` and again as ``<... resumed>``;
    only the first is counted."""
    calls: collections.Counter[str] = collections.Counter()
    opts: collections.Counter[str] = collections.Counter()
    for line in trace.splitlines():
        m = LINE.match(line)
        if m is None or "resumed>" in line[:60]:
            continue
        name, rest = m.groups()
        calls[name] += 1
        if name == "setsockopt" and (o := SETSOCKOPT.match(rest)):
            opts[f"{o.group(1)}/{o.group(2)}"] += 1
    return calls, opts


def command(args: argparse.Namespace, tmp: Path, port: int, upstream: tuple[str, int]) -> list[str]:
    tree = str(Path(args.tree or Path(__file__).resolve().parent.parent).resolve())
    return [sys.executable, "-c", LAUNCH, tree, "--listen", f"127.0.0.1:{port}",
            "--upstream", f"{upstream[0]}:{upstream[1]}", "--access-log", str(tmp / "access.log"),
            "--log-level", "warning", "--drain-timeout", "1s", *args.flag]


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    up_proc, upstream = start_upstream("echo", tmp)
    port = free_port()
    proxy = subprocess.Popen(command(args, tmp, port, upstream), stdin=subprocess.DEVNULL)
    tracer: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(("127.0.0.1", port), None, timeout=60)
        loadgen("connect", port, args.warmup)
        trace = tmp / "strace.out"
        if not args.no_strace:
            tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), "-p", str(proxy.pid)],
                                      stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            attached(proxy.pid)
        before, t0 = kernel_counts(proxy.pid), time.monotonic()
        res = loadgen("connect", port, args.count)
        elapsed, after = time.monotonic() - t0, kernel_counts(proxy.pid)
        n = int(str(res["requests"]))
        out: dict[str, object] = {"count": n, "errors": res.get("errors", 0), "seconds": round(elapsed, 1),
                                  "tree": args.tree or "."}
        out |= {f"{k}_per_conn": round((after[k] - before[k]) / n, 3) for k in after}
        if tracer is None:
            return out
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
        calls, opts = parse(trace.read_text(errors="replace"))
        out["syscalls_per_conn"] = round(sum(calls.values()) / n, 2)
        out["by_name"] = {k: round(v / n, 3) for k, v in sorted(calls.items())}
        out["setsockopt_per_conn"] = {k: round(v / n, 3) for k, v in sorted(opts.items())}
        return out
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        stop(proxy, 30)
        up_proc.stop()


def kernel_counts(pid: int) -> dict[str, int]:
    """Page faults (``/proc/PID/stat``) and context switches (``/proc/PID/status``) of the proxy so far,
    its threads included. Under strace every call stops the proxy, so read the switches with --no-strace."""
    stat = Path(f"/proc/{pid}/stat").read_text()  # the process's line sums its threads
    fields = stat[stat.rindex(")") + 2:].split()
    out = {"minflt": int(fields[7]), "majflt": int(fields[9]), "voluntary_ctxt_switches": 0,
           "nonvoluntary_ctxt_switches": 0}
    for task in Path(f"/proc/{pid}/task").glob("*/status"):  # a status is one thread's
        for line in task.read_text().splitlines():
            key, _, v = line.partition(":")
            if key in out and key.endswith("switches"):
                out[key] += int(v)
    return out


def attached(pid: int, timeout: float = 10.0) -> None:
    """Wait until a tracer holds the proxy (TracerPid in /proc/PID/status), so no measured call is missed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        if re.search(r"^TracerPid:\s+[1-9]", status, re.M):
            time.sleep(0.2)  # strace attaches the threads one after another
            return
        time.sleep(0.05)
    raise RuntimeError(f"strace did not attach to {pid} within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    connect_options(p, count=3000)
    p.add_argument("--no-strace", action="store_true",
                   help="count page faults and context switches only, without strace (which adds switches)")
    args = p.parse_args(argv)
    if not args.no_strace and not shutil.which("strace"):
        print("syscalls.py: strace is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="l4sc-") as tmp:
        print(json.dumps(measure(args, Path(tmp)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
