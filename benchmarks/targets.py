"""Starting, probing and stopping the things a benchmark talks to: upstreams and the proxies under test.

Every process is started by us, remembered by PID, and stopped by that PID (SIGTERM, then SIGKILL after a
grace period), so a run never touches anything else on the machine. A proxy that exits before it accepts
connections is reported as *unsupported* for that scenario (e.g. TLS flags it does not know yet) instead
of failing the whole run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Unsupported(Exception):
    """The target cannot run this scenario; the message says why (shown in the report)."""


@dataclass(frozen=True)
class Tls:
    """Certificates of one run, generated with trustme into the run's temp dir."""

    ca: str
    cert: str  # certificate chain for 'localhost' / 127.0.0.1 / ::1
    key: str
    combined: str  # key + chain in one file, the form HAProxy's 'crt' wants


@dataclass(frozen=True)
class Env:
    """What a target needs to start for one scenario.

    ``tls`` is '' (plain), 'term' (clients speak TLS to the target, which forwards plain) or 'orig' (clients
    speak plain, the target speaks TLS to the upstream). ``plain_upstream`` and ``tls_upstream`` are
    (host, port) of the upstreams serving the scenario's protocol without and with TLS.
    """

    scenario: str
    tls: str
    plain_upstream: tuple[str, int] | None
    tls_upstream: tuple[str, int] | None
    certs: Tls | None
    tmp: Path
    sessions: int = 1000
    edge: bool = False  # both proxies send PROXY v2 to the upstream and check a source ACL (run.py --edge)
    second_upstream: tuple[str, int] | None = None  # a second plain member, for variants that name {b}

    @property
    def proxy_upstream(self) -> tuple[str, int]:
        """Where a proxy forwards to: the TLS upstream when originating TLS, else the plain one."""
        addr = self.tls_upstream if self.tls == "orig" else self.plain_upstream
        assert addr is not None
        return addr


@dataclass
class Proc:
    """A process we started; `stop` signals exactly this PID."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        return ""


@dataclass
class Running:
    """A target ready for load: the address clients use, whether they speak TLS, and its process."""

    address: tuple[str, int]
    client_tls: bool
    proc: Proc | None = None
    notes: list[str] = field(default_factory=list)
    access_log: Path | None = None
    scraper: Scraper | None = None  # the admin variant's: polls the admin endpoint while the target runs
    source: str = ""  # a baseline target's: the l4proxy package file its process imported

    def stop(self) -> None:
        if self.scraper is not None:
            self.scraper.stop()
        if self.proc is not None:
            self.proc.stop()


# --- small process and socket helpers -------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_ready(addr: tuple[str, int], proc: Proc | None, timeout: float = 15.0) -> None:
    """Poll-connect until the port accepts; raise Unsupported if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise Unsupported(f"{proc.name} exited with {proc.popen.returncode} at start: {proc.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(addr, timeout=1):
            return
        time.sleep(0.05)
    raise Unsupported(f"{addr[0]}:{addr[1]} did not accept connections within {timeout:.0f}s")


def spawn(name: str, cmd: list[str], tmp: Path, stdout_to_log: bool = True,
          env: dict[str, str] | None = None) -> Proc:
    log = tmp / f"{name}.log"
    out = log.open("ab")
    popen = subprocess.Popen(cmd, stdout=out if stdout_to_log else subprocess.PIPE, stderr=out,
                             stdin=subprocess.DEVNULL, env=env)
    out.close()
    return Proc(name, popen, log)


def tree_pids(pid: int) -> list[int]:
    """The PID and all its descendants (a proxy may fork workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids.extend(int(c) for c in task.read_text().split())
        i += 1
    return pids


SCHEDSTAT = Path("/proc/self/schedstat").exists()  # a kernel with CONFIG_SCHED_INFO


def cpu_seconds(pid: int) -> float:
    """CPU time of the process tree: with schedstat, the nanosecond run time of every thread
    (/proc/PID/task/TID/schedstat), else utime + stime from /proc/PID/stat in clock ticks (10 ms, which
    alone moves a 0.2 s sample's CPU per request by several percent)."""
    if SCHEDSTAT:
        ns = 0
        for p in tree_pids(pid):
            for task in Path(f"/proc/{p}/task").glob("*/schedstat"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    ns += int(task.read_text().split()[0])
        return ns / 1e9
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def pin_tree(pid: int, cpus: frozenset[int]) -> None:
    """Every thread of the process tree onto ``cpus`` (run.py --pin); children forked later inherit it."""
    for p in tree_pids(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task.name), cpus)


def worker_sessions(log: Path | None) -> dict[str, int]:
    """Sessions per worker slot, from access-log lines ending in ``worker=K`` (multi-worker l4proxy)."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in (log.read_text(errors="replace").splitlines() if log else []):
            last = line.rsplit(" ", 1)[-1]
            if last.startswith("worker="):
                counts[last[7:]] = counts.get(last[7:], 0) + 1
    return dict(sorted(counts.items()))


def rss_kib(pid: int) -> int:
    """VmRSS of the process tree in KiB."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


# --- upstreams -----------------------------------------------------------------------------------------


def start_upstream(
    mode: str, tmp: Path, certs: Tls | None = None, strip_proxy: bool = False
) -> tuple[Proc, tuple[str, int]]:
    """Start benchmarks/upstream.py on port 0 and read the port it prints."""
    proc, addrs = start_upstreams(mode, tmp, certs, strip_proxy)
    return proc, addrs[0]


def start_upstreams(
    mode: str, tmp: Path, certs: Tls | None = None, strip_proxy: bool = False, listeners: int = 1
) -> tuple[Proc, list[tuple[str, int]]]:
    """One benchmarks/upstream.py process serving on ``listeners`` ports (chosen by the kernel)."""
    cmd = [sys.executable, str(HERE / "upstream.py"), "--mode", mode, "--listeners", str(listeners)]
    cmd += ["--strip-proxy"] if strip_proxy else []
    if certs is not None:
        cmd += ["--tls-cert", certs.cert, "--tls-key", certs.key]
    name = f"upstream-{mode}{'-tls' if certs else ''}"
    proc = spawn(name, cmd, tmp, stdout_to_log=False)
    assert proc.popen.stdout is not None
    line = proc.popen.stdout.readline().strip()
    if not line:
        raise RuntimeError(f"{name} did not start: {proc.log_tail()}")
    addrs = [("127.0.0.1", int(port)) for port in line.split()]
    for addr in addrs:
        wait_ready(addr, proc)
    return proc, addrs


def start_redis(tmp: Path) -> tuple[Proc, tuple[str, int]]:
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--protected-mode", "no", "--dir", str(tmp), "--maxclients", "10000"]
    proc = spawn("redis-server", cmd, tmp)
    addr = ("127.0.0.1", port)
    wait_ready(addr, proc)
    return proc, addr


# --- targets -------------------------------------------------------------------------------------------


class Target:
    """A way of reaching the upstream: directly or through one proxy."""

    name = "target"
    workers = 1
    scenarios: frozenset[str] | None = None  # the scenarios it takes part in; None: all

    def runs(self, scenario: str) -> bool:
        return self.scenarios is None or scenario in self.scenarios

    def available(self) -> str | None:
        """None when this target can run on this machine, else why not."""
        return None

    def start(self, env: Env) -> Running:
        raise NotImplementedError


class Direct(Target):
    """The baseline: clients connect to the upstream itself (TLS scenarios: to a TLS upstream)."""

    name = "direct"

    def start(self, env: Env) -> Running:
        if env.tls:
            assert env.tls_upstream is not None
            return Running(env.tls_upstream, client_tls=True)
        assert env.plain_upstream is not None
        return Running(env.plain_upstream, client_tls=False)


class L4proxy(Target):
    """The project's proxy with its default features on: health checks, and an access log to a file."""

    name = "l4proxy"

    def available(self) -> str | None:
        return None if self.binary() else "l4proxy command not found next to this python or on PATH"

    @staticmethod
    def binary() -> str | None:
        local = VENV_BIN / "l4proxy"
        return str(local) if local.exists() else shutil.which("l4proxy")

    def start(self, env: Env) -> Running:
        port = free_port()
        access_log = env.tmp / f"{self.name}-access-{env.scenario}.log"
        proc = spawn(f"{self.name}-{env.scenario}", self.command(env, port, access_log), env.tmp,
                     env=self.spawn_env())
        run = ready(Running(("127.0.0.1", port), env.tls == "term", proc, access_log=access_log))
        settle_workers(proc, self.workers)
        return run

    def spawn_env(self) -> dict[str, str] | None:
        """The process environment; None: the runner's own."""
        return None

    def upstream(self, env: Env) -> str:
        """The ``--upstream`` value: the scenario's one upstream."""
        uh, up = env.proxy_upstream
        return f"{uh}:{up}"

    def command(self, env: Env, port: int, access_log: Path) -> list[str]:
        cmd = [self.binary() or "l4proxy", "--listen", f"127.0.0.1:{port}", "--upstream", self.upstream(env),
               "--access-log", str(access_log), "--log-level", "warning", "--drain-timeout", "1s"]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        cmd += shlex.split(os.environ.get("L4PROXY_ARGS", ""))  # extra flags to compare, e.g. --relay transport
        if env.edge:
            cmd += EDGE_FLAGS
        if env.tls == "term":
            assert env.certs is not None
            cmd += ["--tls-cert", env.certs.cert, "--tls-key", env.certs.key]
        elif env.tls == "orig":
            assert env.certs is not None
            cmd += ["--upstream-tls", "--upstream-ca", env.certs.ca]
        return cmd


class L4proxyWorkers(L4proxy):
    """l4proxy with ``--workers 2`` (SO_REUSEPORT); CPU is the whole tree: supervisor plus workers."""

    name = "l4proxy-w2"
    workers = 2
    scenarios = frozenset({"rr", "connect", "tls-connect"})


class L4proxyPlain(L4proxy):
    """The plain-TCP twin of l4proxy in a TLS scenario: the same load without TLS, in the same run."""

    name = "l4proxy-plain"
    scenarios = frozenset({"bulk-tls"})

    def start(self, env: Env) -> Running:
        return super().start(dataclasses.replace(env, tls=""))


@dataclass(frozen=True)
class Variant:
    """l4proxy with some features on, sampled beside plain l4proxy and HAProxy in the same run
    (``run.py --variant``), for the feature bars: rates with a feature on within a few percent of
    plain, as ratios to HAProxy. Data only, so a variant whose syntax is not there yet is recorded as
    unsupported (with l4proxy's error line) and runs once it is.

    In ``flags`` and ``upstream``, ``{a}`` and ``{b}`` stand for two echo upstreams (``host:port``; one
    process on two ports), ``{admin}`` for a free ``host:port``. ``strip_proxy``: the upstream drops the
    PROXY header each connection starts with. ``scrape``: a path on ``{admin}`` fetched every second
    while the target runs, as a Prometheus server would."""

    name: str
    about: str
    flags: tuple[str, ...] = ()
    upstream: str = "{a}"
    strip_proxy: bool = False
    scrape: str = ""

    @property
    def target(self) -> str:
        """The target's name: plain is the ``l4proxy`` target itself."""
        return "l4proxy" if self.name == "plain" else f"l4proxy+{self.name}"

    @property
    def two_members(self) -> bool:
        return "{b}" in self.upstream or any("{b}" in f for f in self.flags)

    def describe(self) -> str:
        """The flags as a command line would show them, placeholders left in."""
        return shlex.join(["--upstream", self.upstream, *self.flags])


EDGE_FLAGS = ["--send-proxy", "v2", "--allow", "127.0.0.0/8"]  # run.py --edge; HAProxy's twin: haproxy_config
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("plain", "no feature beyond the l4proxy target's defaults (health checks, access log)"),
    Variant("weights", "two members, one with a weight and a session limit: weighted least-connections",
            upstream="{a};weight=3;max_conns=10000,{b}"),
    Variant("edge", "PROXY v2 headers to the member (which drops them) and a source ACL",
            flags=tuple(EDGE_FLAGS), strip_proxy=True),
    Variant("admin", "the admin endpoint on, its /metrics scraped every second", flags=("--admin", "{admin}"),
            scrape="/metrics"),
)}


class L4proxyVariant(L4proxy):
    """l4proxy with a variant's flags (``Variant``), in the rr and connect scenarios."""

    scenarios = frozenset({"rr", "connect"})

    def __init__(self, variant: Variant) -> None:
        self.variant = variant
        self.name = variant.target
        self.places: dict[str, str] = {}

    def upstream(self, env: Env) -> str:
        return self.variant.upstream.format(**self.places)

    def command(self, env: Env, port: int, access_log: Path) -> list[str]:
        (ah, ap), second = env.proxy_upstream, env.second_upstream
        self.places = {"a": f"{ah}:{ap}", "b": f"{second[0]}:{second[1]}" if second else "{b}",
                       "admin": f"127.0.0.1:{free_port()}"}
        cmd = super().command(env, port, access_log)
        return cmd + [flag.format(**self.places) for flag in self.variant.flags]

    def start(self, env: Env) -> Running:
        run = super().start(env)
        if self.variant.scrape:
            # the admin endpoint may open after the listener. The first answer may pay for imports and
            # set-up: over before the first sample, as it would be long before any under a real Prometheus
            host, port = self.places["admin"].rsplit(":", 1)
            wait_ready((host, int(port)), run.proc)
            run.scraper = Scraper(f"http://{self.places['admin']}{self.variant.scrape}")
            run.scraper.first.wait(10)
        return run


class Scraper:
    """Fetches ``url`` at once and then every ``interval`` seconds, in a thread of the runner, until
    stopped; counts the answers and failures (a sample reads how many fell within it)."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        self.url, self.interval = url, interval
        self.ok = self.failed = 0
        self.last_error = ""
        self._stopping = threading.Event()
        self.first = threading.Event()  # set once the first fetch is over, answered or not
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=2) as answer:
                    answer.read()
                self.ok += 1
            except OSError as exc:
                self.failed += 1
                self.last_error = str(exc)
            self.first.set()
            if self._stopping.wait(self.interval):
                return

    def totals(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "failed": self.failed, "last_error": self.last_error}

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)


def settle_workers(proc: Proc, workers: int, timeout: float = 10.0) -> None:
    """With several workers, wait until all are forked, plus a moment for each to bind its listener."""
    if workers <= 1:
        return
    deadline = time.monotonic() + timeout
    while len(tree_pids(proc.pid)) < workers + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)


class Haproxy(Target):
    """HAProxy as the reference: mode tcp, balance leastconn, nbthread 1, checks and a log file like ours."""

    name = "haproxy"

    def available(self) -> str | None:
        return None if shutil.which("haproxy") else "haproxy not on PATH"

    def start(self, env: Env) -> Running:
        port, (uh, up) = free_port(), env.proxy_upstream
        cfg = env.tmp / f"haproxy-{env.scenario}.cfg"
        cfg.write_text(haproxy_config(port, uh, up, env))
        proc = spawn(f"haproxy-{env.scenario}", ["haproxy", "-db", "-f", str(cfg)], env.tmp)
        return ready(Running(("127.0.0.1", port), env.tls == "term", proc))


def haproxy_maxconn(sessions: int) -> int:
    """Enough for the idle sessions, but within our open-files limit (HAProxy needs ~2 fds per conn)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return max(100, min(sessions + 500, (hard - 100) // 2))


def haproxy_config(port: int, uh: str, up: int, env: Env) -> str:
    """One frontend, one backend, one server; the access log goes to stdout, which we send to a file."""
    bind_tls = f" ssl crt {env.certs.combined}" if env.tls == "term" and env.certs else ""
    srv_tls = f" ssl verify required ca-file {env.certs.ca}" if env.tls == "orig" and env.certs else ""
    srv_tls += " send-proxy-v2" if env.edge else ""
    acl = "\n    tcp-request connection reject if !{ src 127.0.0.0/8 }" if env.edge else ""
    return f"""global
    nbthread 1
    maxconn {haproxy_maxconn(env.sessions)}
    log stdout format raw local0
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fe
    bind 127.0.0.1:{port}{bind_tls}{acl}
    default_backend be
backend be
    balance leastconn
    server s1 {uh}:{up} check inter 2s{srv_tls}
"""


class Nginx(Target):
    """nginx's stream module: least_conn, one worker process, the timeouts and a log file like the others."""

    name = "nginx"
    MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/usr/local/nginx/modules")

    def available(self) -> str | None:
        if not shutil.which("nginx"):
            return "nginx not on PATH"
        if not stream_built_in() and not self.stream_module():
            return "nginx has no stream module (Debian: apt-get install libnginx-mod-stream)"
        return None

    def stream_module(self) -> str | None:
        """The dynamic stream module's path, when nginx was built with --with-stream=dynamic."""
        for d in self.MODULE_DIRS:
            path = Path(d) / "ngx_stream_module.so"
            if path.exists():
                return str(path)
        return None

    def start(self, env: Env) -> Running:
        port, (uh, up) = free_port(), env.proxy_upstream
        cfg = env.tmp / f"nginx-{env.scenario}.conf"
        module = None if stream_built_in() else self.stream_module()
        cfg.write_text(nginx_config(port, uh, up, env, module))
        # -e: the error log from the first moment (before the config is read) goes to stderr, not /var/log
        cmd = ["nginx", "-e", "stderr", "-p", str(env.tmp), "-c", str(cfg)]
        proc = spawn(f"nginx-{env.scenario}", cmd, env.tmp)
        return ready(Running(("127.0.0.1", port), env.tls == "term", proc))


def stream_built_in() -> bool:
    """Whether nginx was compiled with the stream module linked in (``--with-stream`` not ``=dynamic``)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        flags = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10).stderr.split()
        return "--with-stream" in flags
    return False


def nginx_config(port: int, uh: str, up: int, env: Env, module: str | None) -> str:
    """One worker process, one stream server, one upstream; the access log goes to a file.

    nginx open source has no active health checks: ``max_fails``/``fail_timeout`` are its passive ones.
    ``proxy_timeout`` is nginx's idle timeout between two reads or writes, like l4proxy's --idle-timeout.
    """
    conns = haproxy_maxconn(env.sessions) * 2  # a session is two connections for nginx
    load = f"load_module {module};\n" if module else ""
    server_tls = (f"        ssl_certificate {env.certs.cert};\n        ssl_certificate_key {env.certs.key};\n"
                  if env.tls == "term" and env.certs else "")
    orig_tls = (f"        proxy_ssl on;\n        proxy_ssl_verify on;\n"
                f"        proxy_ssl_trusted_certificate {env.certs.ca};\n        proxy_ssl_name localhost;\n"
                if env.tls == "orig" and env.certs else "")
    log = env.tmp / f"nginx-access-{env.scenario}.log"
    return f"""{load}worker_processes 1;
daemon off;
pid {env.tmp}/nginx-{env.scenario}.pid;
error_log stderr warn;
worker_rlimit_nofile {conns + 100};
events {{
    worker_connections {conns};
}}
stream {{
    log_format tcp '$time_iso8601 client=$remote_addr:$remote_port upstream=$upstream_addr '
                   'in=$bytes_received out=$bytes_sent duration=$session_time status=$status';
    access_log {log} tcp;
    upstream be {{
        least_conn;
        server {uh}:{up} max_fails=3 fail_timeout=10s;
    }}
    server {{
        listen 127.0.0.1:{port}{' ssl' if env.tls == 'term' else ''};
        proxy_pass be;
        proxy_connect_timeout 5s;
        proxy_timeout 1h;
{server_tls}{orig_tls}    }}
}}
"""


class Pproxy(Target):
    """pproxy in tunnel mode: the most complete pure-Python TCP proxy, for a same-language comparison."""

    name = "pproxy"
    # pproxy calls asyncio.get_event_loop() after uvloop.install(), which uvloop >= 0.21 rejects when no
    # loop is set; this launcher makes one current first and then runs pproxy's own main().
    LAUNCH = ("import asyncio, sys, uvloop, pproxy.server as s\n"
              "def install():\n"
              "    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n"
              "    asyncio.set_event_loop(asyncio.new_event_loop())\n"
              "uvloop.install = install\n"
              "sys.argv[0] = 'pproxy'\n"
              "sys.exit(s.main())\n")

    def available(self) -> str | None:
        return None if importlib.util.find_spec("pproxy") else "pproxy not importable (pip install pproxy)"

    def start(self, env: Env) -> Running:
        if env.tls:
            raise Unsupported("TLS scenarios are not configured for pproxy")
        port, (uh, up) = free_port(), env.proxy_upstream
        cmd = [sys.executable, "-c", self.LAUNCH, "-l", f"tunnel{{{uh}:{up}}}://127.0.0.1:{port}"]
        proc = spawn(f"pproxy-{env.scenario}", cmd, env.tmp)
        return ready(Running(("127.0.0.1", port), False, proc))


def ready(run: Running) -> Running:
    """Wait until the target accepts; on failure stop it (it may still be alive) and re-raise."""
    try:
        wait_ready(run.address, run.proc)
    except Unsupported:
        if run.proc is not None:
            run.proc.stop(1)
        raise
    return run


TARGETS: dict[str, Target] = {
    t.name: t for t in (Direct(), L4proxy(), L4proxyWorkers(), L4proxyPlain(), Haproxy(), Nginx(), Pproxy(),
                        *(L4proxyVariant(v) for v in VARIANTS.values() if v.name != "plain"))
}


def make_certs(tmp: Path) -> Tls:
    """A throwaway CA and a server certificate for localhost, 127.0.0.1 and ::1."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    paths = {n: str(tmp / f"{n}.pem") for n in ("ca", "cert", "key", "combined")}
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(paths["cert"], append=True)
    server.private_key_pem.write_to_path(paths["key"])
    server.private_key_and_cert_chain_pem.write_to_path(paths["combined"])
    return Tls(**paths)
