"""Micro benchmark: what one access-log record costs, per format, without sockets.

    .venv/bin/python benchmarks/accesslog.py                 # this tree
    .venv/bin/python benchmarks/accesslog.py --tree DIR      # another checkout's l4proxy (e.g. a git worktree)

Each sample records ``--records`` finished sessions (IPv4 client, a member, no TLS: the common case)
into an in-memory stream, exactly the proxy's ``AccessLog.record`` path; the best of ``--repeats``
samples is reported in nanoseconds per record, since the fastest sample is the one least disturbed by
other load on the machine. Compare two trees by running it on both, interleaved.
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
import time
from types import SimpleNamespace
from typing import Any


def session(index: int) -> Any:
    return SimpleNamespace(
        started=time.time() - 0.25,
        member=SimpleNamespace(name="10.0.0.11:6379"),
        client=SimpleNamespace(nbytes=120 + index % 7),
        upstream=SimpleNamespace(nbytes=4096),
        end_cause="eof",
        client_address=("127.0.0.1", 40000 + index % 20000),
        tls_info=None,
        limits=SimpleNamespace(name="default", pool="default"),
    )


def sample(make: Any, sessions: list[Any]) -> float:
    """Nanoseconds per record for one pass over ``sessions``."""
    log = make()
    started = time.perf_counter_ns()
    for finished in sessions:
        log.record(finished)
    return (time.perf_counter_ns() - started) / len(sessions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", help="import l4proxy from this directory instead")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--formats", default="logfmt,json", help="comma-separated (json needs a tree that has it)")
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    accesslog = importlib.import_module("l4proxy.accesslog")
    sessions = [session(i) for i in range(args.records)]
    makers = {"logfmt": lambda: accesslog.AccessLog(io.StringIO())}
    if "fmt" in accesslog.AccessLog.__init__.__code__.co_varnames:
        makers["json"] = lambda: accesslog.AccessLog(io.StringIO(), fmt="json")
    makers = {name: make for name, make in makers.items() if name in args.formats.split(",")}
    best = {name: min(sample(make, sessions) for _ in range(args.repeats)) for name, make in makers.items()}
    print(f"{accesslog.__file__}: " + ", ".join(f"{name} {ns:.0f} ns/record" for name, ns in best.items()))


if __name__ == "__main__":
    main()
