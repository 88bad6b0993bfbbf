"""Python bytecodes executed per proxied connection, per function: which code a change made longer.

callgrind (``callgrind.py``) says how many instructions a connection costs, but a third of them are the
interpreter's loop, which it cannot attribute to Python functions. This counts what that loop ran: the
proxy starts with an opcode tracer that a signal switches on after a warm-up of ``connect`` load, a
measured load runs, a second signal writes every function's bytecodes and calls as JSON. The counts
repeat to within a few bytecodes (the timers' share moves with the wall time), so two trees compare
function by function:

    .venv/bin/python benchmarks/bytecodes.py --out /tmp/new.json
    .venv/bin/python benchmarks/bytecodes.py --tree /path/to/an/older/checkout --out /tmp/old.json
    .venv/bin/python benchmarks/bytecodes.py --compare /tmp/old.json /tmp/new.json

Tracing makes the proxy tens of times slower; the numbers are counts, not times.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from callgrind import LAUNCH, connect_options, loadgen, stop
from targets import free_port, start_upstream, wait_ready

TOGGLE = signal.SIGRTMIN + 3  # first: tracing on; second: off, and the counts written
# Run before callgrind.LAUNCH (which starts l4proxy): the tracer, and the handler that toggles it.
TRACER = """
import collections, json, signal, sys
_out = sys.argv.pop(1)
_ops, _calls, _on = collections.Counter(), collections.Counter(), []
def _op(frame, event, arg):
    if event == "opcode":
        _ops[frame.f_code] += 1
    return _op
def _call(frame, event, arg):
    frame.f_trace_opcodes = True
    _calls[frame.f_code] += 1
    return _op
def _toggle(*_):
    if not _on:
        _on.append(1)
        sys.settrace(_call)
        return
    sys.settrace(None)
    rows = {}
    for code in set(_ops) | set(_calls):
        key = f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_qualname}"
        ops, calls = rows.get(key, (0, 0))
        rows[key] = (ops + _ops[code], calls + _calls[code])
    with open(_out, "w") as out:
        json.dump(rows, out)
signal.signal(%d, _toggle)
"""


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    up_proc, (uh, up) = start_upstream("echo", tmp)
    port = free_port()
    dump = tmp / "counts.json"
    tree = str(Path(args.tree or Path(__file__).resolve().parent.parent).resolve())
    cmd = [sys.executable, "-c", TRACER % TOGGLE + LAUNCH, str(dump), tree, "--listen", f"127.0.0.1:{port}",
           "--upstream", f"{uh}:{up}", "--access-log", str(tmp / "access.log"), "--log-level", "warning",
           *args.flag]
    proxy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        wait_ready(("127.0.0.1", port), None, timeout=60)
        loadgen("connect", port, args.warmup)
        os.kill(proxy.pid, TOGGLE)
        time.sleep(0.2)
        done = int(str(loadgen("connect", port, args.count)["requests"]))
        os.kill(proxy.pid, TOGGLE)
        deadline = time.monotonic() + 30
        while not (dump.exists() and dump.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # written in one go; let it finish
        rows = json.loads(dump.read_text())
        return {key: [ops / done, calls / done] for key, (ops, calls) in rows.items()}
    finally:
        stop(proxy, 30)
        up_proc.stop()


def compare(old: dict[str, list[float]], new: dict[str, list[float]], rows: int) -> None:
    """The functions whose bytecodes per connection changed most, then the totals."""
    keys = sorted(set(old) | set(new), key=lambda k: -abs(new.get(k, [0, 0])[0] - old.get(k, [0, 0])[0]))
    print(f"{'change':>7} {'old':>7} {'new':>7}  {'calls':>11}  function")
    for key in keys[:rows]:
        (oo, oc), (no, nc) = old.get(key, [0, 0]), new.get(key, [0, 0])
        print(f"{no - oo:7.1f} {oo:7.1f} {no:7.1f}  {oc:5.2f} {nc:5.2f}  {key}")
    print(f"total bytecodes {sum(v[0] for v in old.values()):.0f} -> {sum(v[0] for v in new.values()):.0f}, "
          f"calls {sum(v[1] for v in old.values()):.1f} -> {sum(v[1] for v in new.values()):.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    connect_options(p, count=1000)
    p.add_argument("--out", help="write the counts per connection here as JSON (default: stdout)")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two --out files instead")
    p.add_argument("--rows", type=int, default=30, help="functions shown by --compare")
    args = p.parse_args(argv)
    if args.compare:
        old, new = (json.loads(Path(name).read_text()) for name in args.compare)
        compare(old, new, args.rows)
        return 0
    with tempfile.TemporaryDirectory(prefix="l4bc-") as tmp:
        counts = measure(args, Path(tmp))
    text = json.dumps(counts, indent=0, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
