"""Benchmark runner: the same load against a direct connection, l4proxy, HAProxy, nginx and pproxy, interleaved.

For each scenario it starts the upstream(s) and every available target, then takes samples in the order
A B C A B C ... so slow drift of a shared, noisy machine falls on every target alike. Around each sample
it reads the proxy's CPU time (utime + stime from /proc/PID/stat) to report CPU per request or per GB;
the memory scenario reads VmRSS with N idle sessions open. Results go to ``--out`` as ``results.json``
(everything, including raw samples and the machine), ``results.md`` (medians and ratios) and PNG charts.

    .venv/bin/python benchmarks/run.py --quick
    .venv/bin/python benchmarks/run.py --scenarios rr,bulk --targets direct,l4proxy,haproxy
    .venv/bin/python benchmarks/run.py --quick --variant weights,edge,admin    # rr and connect, features on
    .venv/bin/python benchmarks/run.py --quick --baseline ce7993a              # and an older tree, same run
    .venv/bin/python benchmarks/run.py --quick --baseline ce7993a --repeats 20 --pin   # a bar: paired, pinned

Each sample records its round; ratios are also taken within each round, and their median is reported
with a distribution-free interval (``stats.py``), which a bar of a few percent is read against.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import baseline
import report
import stats
import sysinfo
from targets import (
    HERE,
    TARGETS,
    VARIANTS,
    Env,
    L4proxyVariant,
    Proc,
    Running,
    Tls,
    Unsupported,
    cpu_seconds,
    make_certs,
    pin_tree,
    rss_kib,
    start_redis,
    start_upstreams,
    worker_sessions,
)


@dataclass(frozen=True)
class Scenario:
    """One workload. ``kind`` picks how a sample is taken; ``load`` are loadgen/redis-benchmark knobs.

    ``twin`` is a target added next to l4proxy in this scenario only (``l4proxy-plain`` in ``bulk-tls``).
    """

    name: str
    kind: str  # rr | connect | bulk | memory | redis
    about: str
    tls: str = ""
    load: dict[str, Any] = field(default_factory=dict)
    twin: str = ""


PROFILES: dict[str, dict[str, Any]] = {
    "full": {"repeats": 5, "rr_requests": 300_000, "rr_seconds": 5.0, "bulk_bytes": 1 << 30,
             "bulk_seconds": 20.0, "connect_requests": 20_000, "connect_seconds": 5.0, "sessions": 10_000,
             "redis_requests": 100_000, "tls_connect_requests": 5_000},
    "quick": {"repeats": 3, "rr_requests": 50_000, "rr_seconds": 1.0, "bulk_bytes": 256 << 20,
              "bulk_seconds": 5.0, "connect_requests": 2_000, "connect_seconds": 1.0, "sessions": 1_000,
              "redis_requests": 15_000, "tls_connect_requests": 500},
    "smoke": {"repeats": 1, "rr_requests": 2_000, "rr_seconds": 1.0, "bulk_bytes": 8 << 20,
              "bulk_seconds": 5.0, "connect_requests": 200, "connect_seconds": 1.0, "sessions": 100,
              "redis_requests": 2_000, "tls_connect_requests": 50},
}
DEFAULT_SCENARIOS = {
    "full": "rr,rr1,bulk,bulk-duplex,memory,connect,redis,tls-term-rr,tls-orig-rr,tls-connect,tls-orig-connect,"
            "bulk-tls",
    "quick": "rr,rr1,bulk,memory,connect,redis,tls-term-rr,tls-orig-rr,tls-connect,bulk-tls",
    "smoke": "rr,bulk,memory,connect,tls-term-rr,tls-connect,bulk-tls",
}
# l4proxy-w2 takes part only in the scenarios it lists (rr, connect, tls-connect); see targets.py
DEFAULT_TARGETS = {"full": "direct,l4proxy,l4proxy-w2,haproxy,nginx,pproxy",
                   "quick": "direct,l4proxy,l4proxy-w2,haproxy,nginx,pproxy", "smoke": "direct,l4proxy,l4proxy-w2"}


def scenarios(p: dict[str, Any]) -> dict[str, Scenario]:
    """All scenarios, sized by a profile."""
    rr = {"mode": "rr", "conns": 50, "size": 64, "requests": p["rr_requests"], "duration": p["rr_seconds"]}
    conn = {"mode": "connect", "conns": 16, "size": 64, "requests": p["connect_requests"],
            "duration": p["connect_seconds"]}
    bulk = {"mode": "bulk", "conns": 1, "bytes": p["bulk_bytes"], "duration": p["bulk_seconds"]}
    tls_conn = conn | {"requests": p["tls_connect_requests"]}
    all_ = [
        Scenario("rr", "rr", "50 connections, 64 B request/response ping-pong", load=rr),
        Scenario("rr1", "rr", "1 connection, 64 B request/response: the latency a proxy adds",
                 load=rr | {"conns": 1, "requests": p["rr_requests"] // 5}),
        Scenario("bulk", "bulk", "1 connection streaming upstream -> client", load=bulk | {"direction": "down"}),
        Scenario("bulk-duplex", "bulk", "1 connection streaming both ways at once",
                 load=bulk | {"direction": "both", "bytes": p["bulk_bytes"] // 2}),
        Scenario("memory", "memory", f"RSS per idle session pair with {p['sessions']} sessions open",
                 load={"sessions": p["sessions"]}),
        Scenario("connect", "connect", "new connection per 64 B request, 16 concurrent", load=conn),
        Scenario("redis", "redis", "redis-benchmark -c 50 -t set,get against redis-server",
                 load={"requests": p["redis_requests"], "conns": 50}),
        Scenario("tls-term-rr", "rr", "rr with TLS from client to target, plain to upstream", "term", rr),
        Scenario("tls-orig-rr", "rr", "rr with plain from client, TLS from target to upstream", "orig", rr),
        Scenario("tls-connect", "connect", "a new TLS connection per request (full handshake), terminated",
                 "term", tls_conn),
        Scenario("tls-orig-connect", "connect", "a new connection per request, plain from the client, a new TLS"
                 " connection (full handshake) from the target to the upstream", "orig", tls_conn),
        Scenario("bulk-tls", "bulk", "bulk through TLS termination, and through plain l4proxy in the same run",
                 "term", bulk | {"direction": "down"}, twin="l4proxy-plain"),
    ]
    return {s.name: s for s in all_}


# --- one sample ----------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """Run-wide settings each sample needs."""

    tmp: Path
    certs: Tls | None
    procs: int
    log: list[str] = field(default_factory=list)
    edge: bool = False  # --edge
    pin: Pin | None = None  # --pin


@dataclass(frozen=True)
class Pin:
    """``--pin``: the proxy under test on ``proxy`` CPUs; load generators and upstreams on ``others``."""

    proxy: frozenset[int]
    others: frozenset[int]

    def runner(self) -> None:
        """The runner's own thread onto the other CPUs: everything it starts (load generators, upstreams,
        proxies) inherits them, and `start_target` moves each proxy onto its own."""
        os.sched_setaffinity(0, self.others)

    @staticmethod
    def choose() -> Pin:
        """The first CPU this process may use for the proxy, the rest for everything else."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            print(f"run.py: error: --pin: needs at least 2 CPUs, this process may use {len(cpus)}", file=sys.stderr)
            raise SystemExit(2)
        return Pin(frozenset(cpus[:1]), frozenset(cpus[1:]))

    def describe(self) -> dict[str, list[int]]:
        return {"proxy": sorted(self.proxy), "others": sorted(self.others)}


def loadgen_cmd(s: Scenario, run: Running, ctx: Ctx) -> list[str]:
    load = dict(s.load)
    cmd = [sys.executable, str(HERE / "loadgen.py"), load.pop("mode"), "--json",
           "--host", run.address[0], "--port", str(run.address[1])]
    if load.get("conns", 1) >= ctx.procs and s.kind in ("rr", "connect"):
        cmd += ["--procs", str(ctx.procs)]
    for k, v in load.items():
        cmd += [f"--{k}", str(v)]
    if run.client_tls and ctx.certs:
        cmd += ["--tls", "--tls-ca", ctx.certs.ca]
    return cmd


def last_json(out: str) -> dict[str, Any]:
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON from load generator: {out[-300:]!r}")
    return json.loads(lines[-1])


def sample_loadgen(s: Scenario, run: Running, ctx: Ctx) -> dict[str, Any]:
    """Run the load generator once; attach the proxy's CPU time spent during it."""
    cmd = loadgen_cmd(s, run, ctx)
    scraped = (run.scraper.ok, run.scraper.failed) if run.scraper is not None else (0, 0)
    cpu0 = cpu_seconds(run.proc.pid) if run.proc else 0.0
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=s.load["duration"] + 90)
    cpu = cpu_seconds(run.proc.pid) - cpu0 if run.proc else None
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    res = last_json(done.stdout)
    res["cpu_s"] = cpu
    if run.scraper is not None:  # the scrapes that fell within this sample, and any that failed
        res["scrapes"], res["scrape_failures"] = run.scraper.ok - scraped[0], run.scraper.failed - scraped[1]
    if cpu is not None and s.kind == "bulk":
        gb = (res["bytes_up"] + res["bytes_down"]) / 1e9
        res["cpu_us_per_gb"] = cpu * 1e6 / gb if gb else None
    elif cpu is not None:
        res["cpu_us_per_req"] = cpu * 1e6 / res["requests"] if res["requests"] else None
    return res


def sample_redis(s: Scenario, run: Running, ctx: Ctx) -> dict[str, Any]:
    """redis-benchmark (no pipelining) through the target; merges SET and GET into one rate."""
    n, c = s.load["requests"], s.load["conns"]
    cmd = ["redis-benchmark", "-h", run.address[0], "-p", str(run.address[1]), "-c", str(c), "-n", str(n),
           "-t", "set,get", "--csv"]
    cpu0 = cpu_seconds(run.proc.pid) if run.proc else 0.0
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(run.proc.pid) - cpu0 if run.proc else None
    rows = [r for r in csv.reader(done.stdout.splitlines()) if r and r[0] in ("SET", "GET")]
    if done.returncode != 0 or len(rows) != 2:
        raise RuntimeError(f"redis-benchmark failed: {(done.stderr or done.stdout)[-300:]}")
    tests = {r[0]: {"rps": float(r[1]), "p50_us": float(r[4]) * 1e3, "p99_us": float(r[6]) * 1e3}
             for r in rows}
    rate = 2 * n / sum(n / t["rps"] for t in tests.values())
    res = {"requests": 2 * n, "rate": rate, "elapsed_s": elapsed, "tests": tests, "cpu_s": cpu,
           "latency_us": {"p50": max(t["p50_us"] for t in tests.values()),
                          "p99": max(t["p99_us"] for t in tests.values())}}
    if cpu is not None:
        res["cpu_us_per_req"] = cpu * 1e6 / (2 * n)
    return res


def sample_memory(s: Scenario, run: Running, ctx: Ctx) -> dict[str, Any]:
    """RSS before and with N idle sessions (each has done one ping-pong, so both sides are connected)."""
    if run.proc is None:
        raise Unsupported("no proxy process to measure")
    n = s.load["sessions"]
    warm = {"mode": "hold", "conns": 10, "hold-seconds": 0.1, "duration": 30}
    subprocess.run(loadgen_cmd(replace(s, load=warm), run, ctx), capture_output=True, timeout=60)
    time.sleep(0.3)
    before = rss_kib(run.proc.pid)
    hold = {"mode": "hold", "conns": n, "hold-seconds": 60, "duration": 60}
    p = subprocess.Popen(loadgen_cmd(replace(s, load=hold), run, ctx), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        ready = json.loads(p.stdout.readline() or "{}")
        time.sleep(0.5)
        with_n = rss_kib(run.proc.pid)
        p.stdin.close()
        tail = p.stdout.read()
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(30)
        if p.poll() is None:
            p.kill()
            p.wait()
    held = ready.get("ready", 0)
    if held <= 0:
        raise RuntimeError(f"no idle sessions opened: {ready} {tail[-200:]}")
    return {"sessions": held, "errors": ready.get("errors", 0), "rss_before_kib": before,
            "rss_with_kib": with_n, "kib_per_session": (with_n - before) / held}


SAMPLERS = {"rr": sample_loadgen, "connect": sample_loadgen, "bulk": sample_loadgen,
            "redis": sample_redis, "memory": sample_memory}


# --- a scenario: upstreams, targets, interleaved samples -----------------------------------------------


@contextlib.contextmanager
def upstreams(s: Scenario, ctx: Ctx, sessions: int, names: list[str]) -> Any:
    """Start what the scenario's targets ``names`` forward to; stop it afterwards by PID. A variant with
    PROXY headers makes the upstream drop them (for every target: one without sends none), one with two
    members gets a second port on the same upstream process."""
    variants = [t.variant for n in names if isinstance(t := TARGETS[n], L4proxyVariant)]
    strip = ctx.edge or any(v.strip_proxy for v in variants)
    listeners = 2 if any(v.two_members for v in variants) else 1
    procs: list[Proc] = []
    plain = tls = second = None
    try:
        if s.kind == "redis":
            proc, plain = start_redis(ctx.tmp)
            procs.append(proc)
        else:
            mode = "bulk" if s.kind == "bulk" else "echo"
            proc, plains = start_upstreams(mode, ctx.tmp, strip_proxy=strip, listeners=listeners)
            procs.append(proc)
            plain, second = plains[0], (plains[1] if listeners > 1 else None)
            if s.tls:
                proc, (tls,) = start_upstreams(mode, ctx.tmp, ctx.certs, strip_proxy=strip)
                procs.append(proc)
        yield Env(s.name, s.tls, plain, tls, ctx.certs, ctx.tmp, sessions, ctx.edge, second)
    finally:
        for p in procs:
            p.stop()


def start_target(name: str, env: Env, pin: Pin | None = None) -> tuple[Running | None, dict[str, Any]]:
    """Start one target (pinned to ``pin.proxy`` if given); an early exit becomes status 'unsupported'
    with the reason."""
    target = TARGETS[name]
    why = target.available()
    if why:
        return None, {"status": "skipped", "reason": why, "samples": []}
    try:
        run = target.start(env)
    except Unsupported as e:
        return None, {"status": "unsupported", "reason": str(e), "samples": []}
    if pin and run.proc is not None:
        pin_tree(run.proc.pid, pin.proxy)
    return run, {"status": "ok", "samples": []} | ({"source": run.source} if run.source else {})


def progress(s: Scenario, name: str, rep: int, res: dict[str, Any]) -> None:
    if "gbps" in res:
        main = f"{res['gbps']:.2f} Gbit/s"
    elif "kib_per_session" in res:
        main = f"{res['kib_per_session']:.1f} KiB/session ({res['sessions']} sessions)"
    else:
        main = f"{res['rate']:.0f}/s p99={res.get('latency_us', {}).get('p99', 0):.0f}us"
    cpu = res.get("cpu_us_per_req") or res.get("cpu_us_per_gb")
    cpu_txt = f" cpu={cpu:.1f}us/{'GB' if 'gbps' in res else 'req'}" if cpu else ""
    print(f"[{s.name} #{rep + 1}] {name:15s} {main}{cpu_txt}", file=sys.stderr, flush=True)


def take(s: Scenario, name: str, rep: int, run: Running, ctx: Ctx, out: dict[str, Any]) -> None:
    try:
        res = SAMPLERS[s.kind](s, run, ctx)
    except Unsupported as e:
        out.update(status="unsupported", reason=str(e))
        return
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
        out.setdefault("errors", []).append(str(e)[-500:])
        print(f"[{s.name} #{rep + 1}] {name:15s} FAILED: {str(e)[-200:]}", file=sys.stderr, flush=True)
        return
    res["round"] = rep  # pairs the targets' samples of one round (stats.paired_ratios)
    out["samples"].append(res)
    progress(s, name, rep, res)


def run_scenario(s: Scenario, names: list[str], repeats: int, ctx: Ctx, sessions: int) -> dict[str, Any]:
    """Start the upstreams, sample every target, and summarise each target's samples by their medians.

    Targets that do not take part in this scenario are left out; the scenario's twin joins next to l4proxy.
    """
    names = [n for n in names if TARGETS[n].runs(s.name)]
    if s.twin and "l4proxy" in names and s.twin not in names:
        names.insert(names.index("l4proxy") + 1, s.twin)
    with upstreams(s, ctx, sessions, names) as env:
        sampler = sample_fresh if s.kind == "memory" else sample_interleaved
        results = sampler(s, names, repeats, ctx, env)
    for out in results.values():
        if out["status"] == "ok" and not out["samples"]:
            out["status"] = "failed"
        out["median"] = report.medians(out["samples"])
        out["spread"] = report.spreads(out["samples"], s.kind)
    return {"about": s.about, "kind": s.kind, "tls": s.tls, "load": s.load, "targets": results}


def sample_interleaved(s: Scenario, names: list[str], repeats: int, ctx: Ctx, env: Env) -> dict[str, Any]:
    """Start all targets once, then sample them in rounds, every other round reversed: A B C, C B A, ..."""
    running = {n: start_target(n, env, ctx.pin) for n in names}
    try:
        for rep in range(repeats):
            for n in stats.round_order(names, rep):
                run, out = running[n]
                if run is not None and out["status"] == "ok":
                    take(s, n, rep, run, ctx, out)
    finally:
        for n, (run, out) in running.items():
            stop(run)
            if run is not None and TARGETS[n].workers > 1:
                out["worker_sessions"] = worker_sessions(run.access_log)
            if run is not None and run.scraper is not None:
                out["scrapes"] = run.scraper.totals()
    return {n: out for n, (_, out) in running.items()}


def sample_fresh(s: Scenario, names: list[str], repeats: int, ctx: Ctx, env: Env) -> dict[str, Any]:
    """Like `sample_interleaved`, but each sample gets a freshly started target so RSS starts clean."""
    results: dict[str, Any] = {}
    for rep in range(repeats):
        for n in names:
            if n == "direct":
                results[n] = {"status": "skipped", "reason": "no proxy process to measure", "samples": []}
                continue
            run, info = start_target(n, env, ctx.pin)
            out = results.setdefault(n, info)
            if run is None:
                out.update(status=info["status"], reason=info.get("reason", ""))
                continue
            try:
                if out["status"] == "ok":
                    take(s, n, rep, run, ctx, out)
            finally:
                stop(run)
    return results


def stop(run: Running | None) -> None:
    if run is not None:
        run.stop()


# --- command line ---------------------------------------------------------------------------------------


def raise_nofile(sessions: int) -> tuple[int, int]:
    """Soft limit to the hard limit, and both higher when allowed: the proxy holds 2 fds per session."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = max(hard, sessions * 2 + 4096)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        return want, want
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard, hard


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small budgets, 3 repeats: under 2.5 minutes")
    g.add_argument("--smoke", action="store_true", help="tiny budgets, 1 repeat, direct + l4proxy (1 and 2 workers)")
    p.add_argument("--scenarios", help="comma-separated; default depends on the profile")
    p.add_argument("--targets", help="comma-separated from " + ",".join(TARGETS))
    p.add_argument("--repeats", type=int, help="samples per target and scenario")
    p.add_argument("--sessions", type=int, help="idle sessions for the memory scenario")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=NUMBER",
                   help="override one of the profile's budgets (see --plan), e.g. connect_requests=8000; "
                        "repeatable")
    p.add_argument("--procs", type=int, default=1, help="load generator processes for rr/connect")
    p.add_argument("--out", type=Path, default=HERE / "out",
                   help="output folder (default benchmarks/out/, git-ignored; commit a run on purpose with "
                        "--out benchmarks/results/NAME)")
    p.add_argument("--edge", action="store_true",
                   help="l4proxy and HAProxy send PROXY v2 headers upstream and check a source ACL (l4proxy: "
                        "--send-proxy v2 --allow 127.0.0.0/8); the upstreams drop the headers")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[,NAME...]",
                   help="l4proxy with features on, beside plain l4proxy and HAProxy in the same run, from "
                        + ",".join(VARIANTS) + "; repeatable. Default scenarios then: rr,connect; default "
                        "targets: l4proxy,haproxy and the variants")
    p.add_argument("--baseline", action="append", default=[], metavar="REF[,REF...]",
                   help="l4proxy from an older commit (a git ref) as the target l4proxy@SHORT, beside plain "
                        "l4proxy and HAProxy in the same run, from a temporary git worktree; repeatable. "
                        "Default scenarios and targets as with --variant")
    p.add_argument("--pin", action="store_true",
                   help="pin the proxy under test (every target's, HAProxy's too) to the first CPU this process "
                        "may use, and the load generator and upstreams to the others")
    p.add_argument("--no-charts", action="store_true")
    p.add_argument("--plan", action="store_true",
                   help="print the scenarios, targets (and which are missing here) and budgets, then exit")
    args = p.parse_args(argv)
    args.profile = "quick" if args.quick else "smoke" if args.smoke else "full"
    args.budgets = budgets(args.budget, p)
    args.variants = [v for given in args.variant for v in given.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variant {','.join(bad)!r}: unknown; expected some of {','.join(VARIANTS)}")
    if args.variants and args.edge:
        p.error("--edge: gives every proxy the edge features; with --variant use the edge variant instead")
    try:
        refs = [baseline.resolve(r) for given in args.baseline for r in given.split(",") if r]
    except baseline.BadRef as e:
        p.error(str(e))
    args.baselines = list({r.commit: r for r in refs}.values())
    for ref in args.baselines:
        TARGETS[ref.target] = baseline.L4proxyBaseline(ref)
    return args


def budgets(given: list[str], p: argparse.ArgumentParser) -> dict[str, int | float]:
    """``--budget KEY=NUMBER`` values, typed like the profiles' (a count stays an integer)."""
    known = PROFILES["full"]
    out: dict[str, int | float] = {}
    for item in given:
        key, equals, num = item.partition("=")
        if key not in known or not equals:
            p.error(f"--budget {item!r}: expected KEY=NUMBER with KEY one of {','.join(known)}")
        kind = type(known[key])
        try:
            out[key] = kind(num)
        except ValueError:
            out[key] = 0
        if out[key] <= 0:
            p.error(f"--budget {item!r}: expected a positive {'whole ' if kind is int else ''}number for {key}")
    return out


def variant_targets(args: argparse.Namespace) -> list[str]:
    """The targets ``--variant`` and ``--baseline`` add: plain l4proxy (the reference), each variant's and
    each older tree's."""
    if not args.variants and not args.baselines:
        return []
    added = [VARIANTS[v].target for v in args.variants] + [r.target for r in args.baselines]
    return list(dict.fromkeys(["l4proxy", *added]))


def plan(args: argparse.Namespace) -> tuple[dict[str, Any], list[str], list[str], tuple[int, int]]:
    """Budgets, scenario and target names for this run; sessions capped to what the fd limit allows."""
    prof = dict(PROFILES[args.profile]) | args.budgets
    if args.sessions:
        prof["sessions"] = args.sessions
    extra = variant_targets(args)
    names = (args.scenarios or ("rr,connect" if extra else DEFAULT_SCENARIOS[args.profile])).split(",")
    tnames = (args.targets or ("haproxy" if extra else DEFAULT_TARGETS[args.profile])).split(",")
    tnames = list(dict.fromkeys(tnames + extra))
    for flag, given, known in (("--scenarios", names, list(scenarios(prof))), ("--targets", tnames, list(TARGETS))):
        bad = [n for n in given if n not in known]
        if bad:
            print(f"run.py: error: {flag} {','.join(bad)!r}: unknown; expected some of {','.join(known)}",
                  file=sys.stderr)
            raise SystemExit(2)
    if "redis" in names and not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
        print("redis scenario skipped: redis-server/redis-benchmark not installed", file=sys.stderr)
        names.remove("redis")
    nofile = raise_nofile(prof["sessions"])
    cap = (nofile[1] - 200) // 2
    if prof["sessions"] > cap:
        print(f"memory scenario: {prof['sessions']} sessions need ~{2 * prof['sessions']} fds in the proxy, "
              f"RLIMIT_NOFILE is {nofile[1]}: using {cap}", file=sys.stderr)
        prof["sessions_wanted"], prof["sessions"] = prof["sessions"], cap
    return prof, names, tnames, nofile


def describe_plan(args: argparse.Namespace, prof: dict[str, Any], names: list[str], tnames: list[str],
                  repeats: int) -> str:
    """What a run with these flags would do, without starting anything: a check of the command line."""
    lines = [f"profile {args.profile}: {repeats} repeats, results to {args.out}",
             f"scenarios: {','.join(names)}"]
    for t in tnames:
        target = TARGETS[t]
        why = target.available()
        lines.append(f"target {t}: {'skipped: ' + why if why else 'available'}")
        if isinstance(target, baseline.L4proxyBaseline):
            lines[-1] += f" (from a temporary worktree of {target.describe()})"
    lines.append("budgets: " + ", ".join(f"{k}={v}" for k, v in prof.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    prof, names, tnames, nofile = plan(args)
    known, repeats = scenarios(prof), args.repeats or prof["repeats"]
    if args.plan:
        print(describe_plan(args, prof, names, tnames, repeats))
        return 0
    pin = Pin.choose() if args.pin else None
    if pin:
        pin.runner()
    t0, started = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = sysinfo.machine()
    signal.signal(signal.SIGTERM, terminated)  # unwinds like Ctrl-C: the worktrees are removed
    with tempfile.TemporaryDirectory(prefix="l4bench-") as tmpdir, contextlib.ExitStack() as trees:
        tmp = Path(tmpdir)
        olds = prepare_baselines(args.baselines, tmp, trees)
        certs = make_certs(tmp) if any(known[n].tls for n in names) else None
        ctx = Ctx(tmp, certs, args.procs, edge=args.edge, pin=pin)
        results = {n: run_scenario(known[n], tnames, repeats, ctx, prof["sessions"]) for n in names}
    doc: dict[str, Any] = {
        "machine": machine,
        "run": {"profile": args.profile, "repeats": repeats, "targets": tnames, "scenarios": names,
                "procs": args.procs, "edge": args.edge,
                "pin": pin.describe() if pin else None, "nofile": nofile, "seconds": round(time.monotonic() - t0, 1),
                "started": started, "budgets": prof,
                "variants": compared(args.variants, olds),
                "baselines": {old.name: {"ref": old.ref.given, "commit": old.ref.commit, "subject": old.ref.subject,
                                         "tree": str(old.tree), "imports": old.source,
                                         "flags_left_out": sorted(old.dropped)} for old in olds}},
        "scenarios": results,
    }
    doc["bar"] = [asdict(c) for c in report.bar_checks(doc)]
    doc["variant_ratios"] = report.variant_ratios(doc)
    print(report.write_all(doc, args.out, charts_on=not args.no_charts))
    return 0


def prepare_baselines(refs: list[baseline.Ref], tmp: Path,
                      trees: contextlib.ExitStack) -> list[baseline.L4proxyBaseline]:
    """A worktree per --baseline REF (removed when ``trees`` closes), each checked to run from its tree."""
    olds = []
    for ref in refs:
        old = TARGETS[ref.target]
        assert isinstance(old, baseline.L4proxyBaseline)
        try:
            old.prepare(trees.enter_context(baseline.worktree(ref, tmp)))
        except baseline.BadRef as e:
            print(f"run.py: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"{old.name}: {old.describe()}, imports {old.source}", file=sys.stderr, flush=True)
        olds.append(old)
    return olds


def compared(variants: list[str], olds: list[baseline.L4proxyBaseline]) -> dict[str, dict[str, str]]:
    """``run.variants``: the targets the Variants table sets against plain l4proxy (itself the first)."""
    if not variants and not olds:
        return {}
    out = {VARIANTS[v].target: {"variant": v, "about": VARIANTS[v].about, "flags": VARIANTS[v].describe()}
           for v in ["plain", *variants]}
    return out | {old.name: {"variant": old.name, "about": f"l4proxy at {old.describe()}",
                             "flags": "the l4proxy target's"} for old in olds}


def terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
