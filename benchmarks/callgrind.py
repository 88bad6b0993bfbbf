"""User-space instructions per proxied connection, or per request on one held connection, with callgrind.

CPU time on a shared VM swings by tens of percent; callgrind's instruction count repeats to within a
fraction of a percent, so it shows changes of a few percent that timing cannot. The method
(``results/profile.md``): l4proxy runs under ``valgrind --tool=callgrind --instr-atstart=no`` with the
benchmark target's flags (health checks on, an access log to a file), a warm-up load runs uncounted,
``callgrind_control -i on`` switches counting on, the measured load runs, and the dump's total is
divided by its connections (``connect``) or requests (``rr``, one connection): ``per_unit``. Under
callgrind a load takes tens of times longer than it would, so the proxy's timers (the sweeper, health
probes, access-log flushes) add to the count in proportion to the wall time, which a busy machine
stretches; ``--idle`` seconds counted with no load afterwards give their rate, and ``net_per_unit``
takes that share out.

    .venv/bin/python benchmarks/callgrind.py connect --count 3000
    .venv/bin/python benchmarks/callgrind.py rr --count 20000 --keep /tmp/cg     # keep the dump to annotate
    .venv/bin/python benchmarks/callgrind.py rr --tree /path/to/an/older/checkout  # the same on older code
    .venv/bin/python benchmarks/callgrind.py connect --tls --count 500           # a full TLS handshake each

``--tree`` runs the l4proxy package found in that directory with this venv's Python, so two
commits can be compared without a second venv. ``--flag`` appends l4proxy flags (repeatable). ``--tls``
terminates TLS (a throwaway certificate, as the ``tls-connect`` and ``tls-term-rr`` scenarios): the
load generator speaks TLS and, in ``connect``, makes a full handshake per connection. Under callgrind
16 handshakes at a time keep the loop busy past the health probes' 1 s timeout, so ``--tls`` gives the
probes 60 s: else the member goes DOWN mid-load and the connections fail (the probes' own share is
taken out with ``--idle`` as before).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from targets import HERE, Tls, free_port, make_certs, start_upstream, wait_ready

WARMUP = {"connect": 300, "rr": 2000}
# --tree: run the l4proxy package of another checkout. The venv's editable install finds its own package
# before sys.path is searched, so its finder is dropped first; argv[1] is the checkout.
LAUNCH = ("import runpy, sys\n"
          "sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('__editable__')]\n"
          "sys.path.insert(0, sys.argv.pop(1))\n"
          "sys.argv[0] = 'l4proxy'\n"
          "runpy.run_module('l4proxy', run_name='__main__', alter_sys=True)\n")


def loadgen(mode: str, port: int, count: int, certs: Tls | None = None) -> dict[str, object]:
    """One bounded load: ``count`` connections (16 at a time) or ``count`` requests on one connection."""
    conns = "16" if mode == "connect" else "1"
    cmd = [sys.executable, str(HERE / "loadgen.py"), mode, "--json", "--port", str(port), "--conns", conns,
           "--size", "64", "--requests", str(count), "--duration", "600", "--warmup", "0"]
    if certs is not None:
        cmd += ["--tls", "--tls-ca", certs.ca]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, timeout=120, check=True)


def dump(pid: int, tmp: Path) -> Path:
    """Dump the counts since the last dump (or since counting began) and return the new file."""
    before = set(tmp.glob(f"callgrind.out.{pid}.*"))
    control("-d", str(pid))
    new = set(tmp.glob(f"callgrind.out.{pid}.*")) - before
    if not new:
        raise RuntimeError(f"no dump from callgrind in {tmp}")
    return new.pop()


def events(dump: Path) -> dict[str, int]:
    """Every event of a dump's ``totals:`` line by name (``Ir``; with ``--cache-sim=yes`` also ``D1mr``...)."""
    text = dump.read_text(errors="replace")
    names = re.search(r"^events: (.+)$", text, re.M)
    found = re.search(r"^(?:totals|summary): ([\d ]+)$", text, re.M)
    if names is None or found is None:
        raise RuntimeError(f"no totals in {dump}")
    return dict(zip(names.group(1).split(), map(int, found.group(1).split()), strict=False))


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    up_proc, (uh, up) = start_upstream("echo", tmp)
    port = free_port()
    run = ["-c", LAUNCH, str(Path(args.tree).resolve())] if args.tree else ["-m", "l4proxy"]
    out = tmp / "callgrind.out"
    cache = ["--cache-sim=yes"] if args.cache_sim else []
    certs = make_certs(tmp) if args.tls else None
    tls = ["--tls-cert", certs.cert, "--tls-key", certs.key, "--health-timeout", "60s"] if certs is not None else []
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", *cache, f"--callgrind-out-file={out}.%p",
           sys.executable, *run, "--listen", f"127.0.0.1:{port}", "--upstream", f"{uh}:{up}",
           "--access-log", str(tmp / "access.log"), "--log-level", "warning", "--drain-timeout", "1s",
           *tls, *args.flag]
    log = (tmp / "proxy.log").open("ab")
    proxy = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    try:
        wait_ready(("127.0.0.1", port), None, timeout=120)
        loadgen(args.mode, port, WARMUP[args.mode], certs)
        control("-i", "on", str(proxy.pid))
        t0 = time.monotonic()
        res = loadgen(args.mode, port, args.count, certs)
        elapsed = time.monotonic() - t0
        loaded = dump(proxy.pid, tmp)
        time.sleep(args.idle)  # no load: what the timers (sweeper, probes, log flushes) cost per second
        idle = dump(proxy.pid, tmp)
        control("-i", "off", str(proxy.pid))
        n = int(str(res["requests"]))
        counted, quiet = events(loaded), events(idle)
        instructions = counted["Ir"]
        background = quiet["Ir"] / args.idle * elapsed
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(loaded, Path(args.keep) / f"callgrind.{args.mode}.out")
        out = {"mode": args.mode, "count": n, "errors": res.get("errors", 0), "instructions": instructions,
               "per_unit": round(instructions / n), "net_per_unit": round((instructions - background) / n),
               "idle_per_second": round(quiet["Ir"] / args.idle), "seconds": round(elapsed, 1),
               "tls": bool(args.tls), "tree": args.tree or "."}
        return (out | cache_misses(counted, quiet, n, elapsed / args.idle)) if args.cache_sim else out
    finally:
        stop(proxy, 60)
        up_proc.stop()


def cache_misses(counted: dict[str, int], quiet: dict[str, int], n: int, scale: float) -> dict[str, object]:
    """``--cache-sim``: the simulated cache misses per unit (I1/D1: first level; IL/DL: last level), each
    also net of the timers' share like ``net_per_unit``."""
    keys = [k for k in counted if k != "Ir"]
    return {"cache_per_unit": {k: round(counted[k] / n, 2) for k in keys},
            "cache_net_per_unit": {k: round((counted[k] - quiet.get(k, 0) * scale) / n, 2) for k in keys}}


def connect_options(p: argparse.ArgumentParser, count: int) -> None:
    """The options of the scripts that count per proxied connection on a tree (bytecodes.py, syscalls.py)."""
    p.add_argument("--count", type=int, default=count, help="connections counted")
    p.add_argument("--warmup", type=int, default=300, help="connections before counting starts")
    p.add_argument("--tree", help="a checkout whose l4proxy package to run (default: this one)")
    p.add_argument("--flag", action="append", default=[], help="an extra l4proxy argument (repeatable)")


def stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the proxy we started, SIGKILL it after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=sorted(WARMUP))
    p.add_argument("--count", type=int, default=3000, help="connections (connect) or requests (rr) counted")
    p.add_argument("--tree", help="a checkout whose l4proxy package to run (default: the installed one)")
    p.add_argument("--flag", action="append", default=[], help="an extra l4proxy argument (repeatable)")
    p.add_argument("--cache-sim", action="store_true",
                   help="simulate the caches too (callgrind --cache-sim=yes): D1 and LL misses per unit")
    p.add_argument("--tls", action="store_true", help="terminate TLS: the load speaks TLS to the proxy")
    p.add_argument("--keep", help="a folder to copy the dump to, for callgrind_annotate")
    p.add_argument("--idle", type=float, default=5.0,
                   help="seconds counted with no load after it, to take the timers' share out (net_per_unit)")
    args = p.parse_args(argv)
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("callgrind.py: valgrind (with callgrind_control) is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="l4cg-") as tmp:
        print(json.dumps(measure(args, Path(tmp))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
