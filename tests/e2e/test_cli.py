"""The ``l4proxy`` command as users run it: a real subprocess, real loopback sockets, real signals.

A user mistake is one line on stderr, ``l4proxy: error: ...`` naming the flag and the value, exit code
2 and never a traceback; an address that cannot be bound is one line naming it and exit code 1. The
happy path relays bytes to an echo server and writes the access-log line with exact byte counts.

RELIABILITY.md cases 9 (shutdown with sessions in flight: no crash, no traceback), 11 (one access-log
record per session with exact counts, upstream and cause) and 32 (SIGTERM drains: stop accepting, let
sessions finish until the deadline, then close the rest; a second signal forces it at once).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy import Address, Config, ListenerConfig, MemberConfig, PoolConfig, __version__
from l4proxy.cli import GROUPS, OPTIONS, build_config, command, flagged, option_for, without_repeats
from l4proxy.config import Service
from l4proxy.errors import ConfigError

from ..servers import Command, free_port, run_command

HOSTS = ["127.0.0.1", "::1"]


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --- user mistakes ---------------------------------------------------------------------------------

BAD_INPUTS = [
    # (arguments, the one stderr line)
    (["--upstream", "a"], "Missing option '--listen'."),
    (["--listen", ":6379"], "Missing option '--upstream'."),
    (["--listen", ":6379", "--upstream", "a", "--connect-timeout", "5x"],
     "--connect-timeout '5x': expected a duration such as 250ms, 5s, 1m, 1h or 2.5"),
    (["--listen", ":6379", "--upstream", "a", "--idle-timeout", "-1s"],
     "--idle-timeout '-1s': expected a duration such as 250ms, 5s, 1m, 1h or 2.5"),
    (["--listen", ":6379", "--upstream", "a", "--drain-timeout", "0"], "--drain-timeout '0': must be greater than 0"),
    (["--listen", ":6379", "--upstream", "a", "--shutdown-delay", "-5s"],
     "--shutdown-delay '-5s': expected a duration such as 250ms, 5s, 1m, 1h or 2.5"),
    (["--listen", ":70000", "--upstream", "a"], "--listen ':70000': port must be 1..65535"),
    (["--listen", ":0", "--upstream", "a:1"], "--listen ':0': port must be 1..65535"),
    (["--listen", "6379", "--upstream", "a"], "--listen '6379': a port is required, as HOST:PORT or :PORT"),
    (["--listen", "[::1:6379", "--upstream", "a"], "--listen '[::1:6379': missing ']' after the IPv6 address"),
    (["--listen", ":6379", "--upstream", "redis-a:70000"], "--upstream 'redis-a:70000': port must be 1..65535"),
    (["--listen", ":6379", "--upstream", "a,,b"], "--upstream 'a,,b': empty member in the list"),
    (["--listen", ":6379", "--upstream", "host:\u00b2"], "--upstream 'host:\u00b2': port '\u00b2' is not a number"),
    (["--listen", ":6379", "--upstream", "a", "--bogus"], "No such option '--bogus'."),
    (["--listen", ":6379", "--upstream", "a", "--upstream-tsl"],
     "No such option '--upstream-tsl'. (Did you mean one of: '--upstream', '--upstream-sni', '--upstream-tls'?)"),
    (["--listen", ":6379", "--upstream", "a", "extra"], "Got unexpected extra argument (extra)"),
    (["--listen", ":6379", "--upstream", "a", "--listen"], "Option '--listen' requires an argument."),
    (["--listen", ":6379", "--upstream", "a", "--retries", "x"], "--retries 'x': expected a whole number"),
    (["--listen", ":6379", "--upstream", "a", "--retries", "-1"], "--retries '-1': must be 0 or more"),
    (["--listen", ":6379", "--upstream", "a", "--retries="], "--retries '': expected a whole number"),
    (["--listen", ":6379", "--upstream", "a", "--tls-alpn="], "--tls-alpn '': needs --tls-cert and --tls-key"),
    (["--listen", ":6379", "--upstream", "a", "--rise", "0"], "--rise '0': must be at least 1"),
    (["--listen", ":6379", "--upstream", "a", "--fall", "0"], "--fall '0': must be at least 1"),
    (["--listen", ":6379", "--upstream", "a", "--eject-after", "0"], "--eject-after '0': must be at least 1"),
    (["--listen", ":6379", "--upstream", "a", "--eject-after", "x"], "--eject-after 'x': expected a whole number"),
    (["--listen", ":6379", "--upstream", "a", "--eject-time", "0s"], "--eject-time '0s': must be greater than 0"),
    (["--listen", ":6379", "--upstream", "a", "--eject-time", "soon"],
     "--eject-time 'soon': expected a duration such as 250ms, 5s, 1m, 1h or 2.5"),
    (["--listen", ":6379", "--upstream", "a", "--max-eject-time", "10s"],
     "--max-eject-time '10s': must be at least the eject time (30s)"),
    (["--listen", ":6379", "--upstream", "a", "--eject-time", "1m", "--max-eject-time", "30s"],
     "--max-eject-time '30s': must be at least the eject time (60s)"),
    (["--listen", ":6379", "--upstream", "a", "--max-ejected-percent", "101"],
     "--max-ejected-percent '101': must be a percent, 0..100"),
    (["--listen", ":6379", "--upstream", "a", "--max-ejected-percent", "-1"],
     "--max-ejected-percent '-1': must be a percent, 0..100"),
    (["--listen", ":6379", "--upstream", "a", "--log-level", "trace"],
     "--log-level 'trace': expected one of debug, info, warning, error"),
    (["--listen", ":6379", "--upstream", "a", "--buffer-size", "12q"],
     "--buffer-size '12q': expected bytes such as 65536, 64k or 1m"),
    (["--listen", ":6379", "--upstream", "a", "--buffer-size", "512"],
     "--buffer-size '512': must be at least 1024 bytes"),
    (["--listen", ":6379", "--upstream", "a", "--health-send", r"PING\x4"],
     r"--health-send 'PING\\x4': \x needs two hex digits, as in \x0d"),
    (["--listen", ":6379", "--upstream", "a", "--access-log", "/nonexistent/dir/x.log"],
     "--access-log '/nonexistent/dir/x.log': No such file or directory"),
    # what the first run tripped over: each says what is actually wrong
    (["--listen", ":6379", "--upstream", "http://127.0.0.1:16391"],
     "--upstream 'http://127.0.0.1:16391': a URL scheme is not allowed here; give HOST:PORT"),
    (["--listen", ":6379", "--upstream", "127.0.0.1:16391 127.0.0.1:16392"],
     "--upstream '127.0.0.1:16391 127.0.0.1:16392': separate members with commas, not spaces"),
    (["--listen", ":6379", "--upstream", "127.0.0.1:-1"], "--upstream '127.0.0.1:-1': port must be 1..65535"),
    (["--listen", "127.0.0.1:-1", "--upstream", "a"], "--listen '127.0.0.1:-1': port must be 1..65535"),
    (["--listen", "http://:6379", "--upstream", "a"],
     "--listen 'http://:6379': a URL scheme is not allowed here; give HOST:PORT"),
    (["--listen", ":6379", "--upstream", "a", "--tls-cert", "c", "--tls-key", "k", "--tls-min-version", "1.1"],
     "--tls-min-version '1.1': expected 1.2 or 1.3"),
    (["--listen", ":6379", "--upstream", "a", "--tls-cert", "c", "--tls-key", "k", "--tls-min-version", "1.3",
      "--tls-ciphers", "ECDHE+AESGCM"],
     "--tls-ciphers 'ECDHE+AESGCM': sets TLS 1.2 ciphers, which a minimum version of 1.3 never uses"),
    (["--listen", ":6379", "--upstream", "a", "--tls-cert", "c", "--tls-key", "k", "--tls-ciphers", "BOGUS"],
     "--tls-ciphers 'BOGUS': OpenSSL knows no TLS 1.2 cipher in this list"),
    (["--listen", ":6379", "--upstream", "a", "--tls-cert", "c", "--tls-cert", "d", "--tls-key", "k"],
     "--tls-key: expected one key per certificate, in the same order; got 2 certificates and 1 key"),
    (["--listen", ":6379", "--upstream", "a", "--relay", "fast"],
     "--relay 'fast': expected one of auto, splice, transport"),
    (["--listen", ":6379", "--upstream", "a", "--drain-at", "later"], "--drain-at 'later': expected now or safe"),
    (["--listen", ":6379", "--upstream", "a", "--drain-protocol", "mysql"],
     "--drain-protocol 'mysql': expected redis or postgres"),
    (["--listen", ":6379", "--upstream", "a", "--split-brain", "newest"],
     "--split-brain 'newest': expected fail-closed or prefer-newest"),
    (["--listen", ":6379", "--upstream", "a", "--health-check", "redis", "--split-brain", "prefer-newest"],
     "--split-brain 'prefer-newest': applies only to a pool with a *-primary health check, not redis"),
    (["--listen", ":6379", "--upstream", "a", "--workers", "0"],
     "--workers '0': expected a number of processes from 1 to 256, or 'auto'"),
    (["--listen", ":6379", "--upstream", "a", "--health-timeout", "0s"],
     "--health-timeout '0s': must be greater than 0"),
    (["--listen", ":6379", "--upstream", "a", "--connect-timeout", "0"],
     "--connect-timeout '0': must be greater than 0"),
    # a flag the rest of the command line would make ineffective is refused
    (["--listen", ":6379", "--upstream", "a", "--health-send", r"PING\r\n", "--no-health-checks"],
     r"--health-send 'PING\\r\\n': has no effect with --no-health-checks"),
    (["--listen", ":6379", "--upstream", "a", "--no-health-checks", "--health-interval", "1s"],
     "--health-interval '1s': has no effect with --no-health-checks"),
    (["--listen", ":6379", "--upstream", "a", "--rise", "1", "--no-health-checks"],
     "--rise '1': has no effect with --no-health-checks"),
    (["--listen", ":6379", "--upstream", "a", "--fall", "2", "--no-health-checks"],
     "--fall '2': has no effect with --no-health-checks"),
    (["--listen", ":6379", "--upstream", "a", "--tls-handshake-timeout", "5s"],
     "--tls-handshake-timeout '5s': needs --tls-cert and --tls-key"),
    (["--listen", ":6379", "--upstream", "a", "--tls-min-version", "1.3"],
     "--tls-min-version '1.3': needs --tls-cert and --tls-key"),
    (["--listen", ":6379", "--upstream", "a", "--tls-ciphers", "ECDHE+AESGCM"],
     "--tls-ciphers 'ECDHE+AESGCM': needs --tls-cert and --tls-key"),
    (["--listen", ":6379", "--upstream", "a", "--upstream-tls", "--upstream-insecure", "--upstream-ca", "ca.pem"],
     "--upstream-ca 'ca.pem': has no effect with --upstream-insecure (nothing is verified)"),
    (["--listen", ":6379", "--upstream", "a", "--upstream-insecure"], "--upstream-insecure: needs --upstream-tls"),
    (["--listen", ":6379", "--upstream", "a", "--upstream-sni", "x"], "--upstream-sni 'x': needs --upstream-tls"),
    # discovery
    (["--listen", ":6379", "--upstream", "10.0.0.1,[::1]:7", "--resolve-interval", "1s"],
     "--resolve-interval '1s': has no effect: every --upstream is an IP address"),
    (["--listen", ":6379", "--upstream", "10.0.0.1", "--resolve-empty-after", "1m"],
     "--resolve-empty-after '1m': has no effect: every --upstream is an IP address"),
    (["--listen", ":6379", "--upstream", "a", "--resolve-interval", "0"],
     "--resolve-interval '0': must be greater than 0"),
    (["--listen", ":6379", "--upstream", "srv:_redis._tcp.x:6379"],
     "--upstream 'srv:_redis._tcp.x:6379': expected srv:NAME with a DNS name, such as srv:_redis._tcp.example.com"),
    # member options (the spec as typed names the member; the problem names the option)
    (["--listen", ":6379", "--upstream", "redis-a:6379;weight=0,redis-b"],
     "--upstream 'redis-a:6379;weight=0': weight=0: must be a whole number 1..256"),
    (["--listen", ":6379", "--upstream", "redis-a", "--upstream", "redis-b;max_conns=x"],
     "--upstream 'redis-b;max_conns=x': max_conns=x: must be a whole number 1 or more"),
    (["--listen", ":6379", "--upstream", "redis-a;colour=red"],
     "--upstream 'redis-a;colour=red': colour=red: unknown member option; known: weight=N, max_conns=N, backup"),
    (["--listen", ":6379", "--upstream", "a", "--slow-start", "soon"],
     "--slow-start 'soon': expected a duration such as 250ms, 5s, 1m, 1h or 2.5"),
    (["--listen", ":6379", "--upstream", "a", "--send-proxy", "v3"], "--send-proxy 'v3': expected v1 or v2"),
    (["--listen", ":6379", "--upstream", "a", "--proxy-timeout", "1s"], "--proxy-timeout '1s': needs --accept-proxy"),
    (["--listen", ":6379", "--upstream", "a", "--accept-proxy-from", "10.0.0.0/8"],
     "--accept-proxy-from '10.0.0.0/8': needs --accept-proxy"),
    (["--listen", ":6379", "--upstream", "a", "--accept-proxy", "--proxy-timeout", "0"],
     "--proxy-timeout '0': must be greater than 0"),
    (["--listen", ":6379", "--upstream", "a", "--allow", "10.0.0.1/8"],
     "--allow '10.0.0.1/8': has host bits set: the range is 10.0.0.0/8"),
    (["--listen", ":6379", "--upstream", "a", "--deny", "10.0.0.0/8,bad"],
     "--deny 'bad': 'bad' is not an IPv4 or IPv6 address"),
    (["--listen", ":6379", "--upstream", "a", "--allow", "::1/129"], "--allow '::1/129': prefix length must be 0..128"),
    (["--listen", ":6379", "--upstream", "a", "--max-connections-per-ip", "0"],
     "--max-connections-per-ip '0': must be at least 1"),
    (["--listen", ":6379", "--upstream", "a", "--rate-per-ip", "fast"],
     "--rate-per-ip 'fast': expected a rate such as 100/s"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_user_mistake_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_command(*args)
    assert (result.returncode, result.stderr, result.stdout) == (2, f"l4proxy: error: {message}\n", "")


def test_access_log_that_is_a_directory(tmp_path: Path) -> None:
    result = run_command("--listen", "127.0.0.1:6379", "--upstream", "a", "--access-log", str(tmp_path))
    assert (result.returncode, result.stderr) == (2, f"l4proxy: error: --access-log '{tmp_path}': Is a directory\n")


@pytest.mark.parametrize("host", HOSTS)
def test_address_in_use_is_one_line_and_exit_1(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as taken:
        taken.bind((host, 0))
        taken.listen()
        address = f"{bracket(host)}:{taken.getsockname()[1]}"
        result = run_command("--listen", address, "--upstream", "127.0.0.1:1", "--access-log", "off")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == f"l4proxy: error: cannot listen on {address}: Address already in use"
    assert "Traceback" not in result.stderr


def test_help_lists_every_flag() -> None:
    result = run_command("--help")
    assert (result.returncode, result.stderr) == (0, "")
    flags = [opt for param in command.params for opt in param.opts if opt.startswith("--")]
    assert len(flags) >= 18
    missing = [flag for flag in flags if not re.search(rf"(^|[\s,]){re.escape(flag)}\b", result.stdout)]
    assert missing == []
    assert "Usage: l4proxy [OPTIONS]" in result.stdout
    assert run_command("-h").stdout == result.stdout


# --- running it ------------------------------------------------------------------------------------


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn: socket.socket = self.request
        with contextlib.suppress(ConnectionError):
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _EchoServer6(_EchoServer):
    address_family = socket.AF_INET6


@contextlib.contextmanager
def echo_server(host: str) -> Iterator[str]:
    """A threaded echo server on loopback; yields its address as the proxy's --upstream."""
    server = (_EchoServer6 if ":" in host else _EchoServer)((host, 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"{bracket(host)}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def running_proxy(host: str, upstream: str, *extra: str) -> Command:
    """The command on ``host``, its access log on stdout; a ``with`` starts it and kills what is left."""
    return Command("--upstream", upstream, "--access-log", "-", *extra, host=host)


def timed_wait(proxy: Command, timeout: float) -> tuple[int, float]:
    """Exit code and seconds waited."""
    started = time.monotonic()
    code = proxy.wait(timeout)
    return code, time.monotonic() - started


def access_records(text: str) -> list[dict[str, str]]:
    """The logfmt fields of each access-log line (the timestamp comes first and has no '=')."""
    return [dict(f.split("=", 1) for f in line.split()[1:]) for line in text.splitlines()]


def exchange(client: socket.socket, payload: bytes) -> bytes:
    client.sendall(payload)
    received = bytearray()
    while len(received) < len(payload):
        chunk = client.recv(65536)
        if not chunk:
            break
        received.extend(chunk)
    return bytes(received)


@pytest.mark.parametrize("host", HOSTS)
def test_relays_logs_exact_counts_and_exits_0_on_sigterm(host: str) -> None:
    payload = os.urandom(200_000)
    with echo_server(host) as upstream, running_proxy(host, upstream, "--drain-timeout", "5s") as proxy:
        with proxy.connect() as client:
            client_address = client.getsockname()
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            echoed = bytearray()
            while chunk := client.recv(65536):
                echoed.extend(chunk)
        assert bytes(echoed) == payload
        proxy.signal(signal.SIGTERM)
        code, waited = timed_wait(proxy, 5)
    assert code == 0 and waited < 5
    [record] = access_records(proxy.stdout)
    assert record["client"] == f"{bracket(host)}:{client_address[1]}"
    assert (record["upstream"], record["in"], record["out"], record["end"]) == (
        upstream, str(len(payload)), str(len(payload)), "eof"
    )
    assert re.fullmatch(r"\d+\.\d{3}s", record["duration"])
    err = proxy.stderr
    assert "Traceback" not in err and "stopped after 1 sessions" in err


def test_sigint_drains_like_sigterm() -> None:
    with echo_server("127.0.0.1") as upstream, running_proxy("127.0.0.1", upstream) as proxy:
        proxy.signal(signal.SIGINT)
        code, _ = timed_wait(proxy, 5)
    assert code == 0
    assert "SIGINT received" in proxy.stderr and "Traceback" not in proxy.stderr
    assert proxy.stdout == ""


def test_drain_stops_accepting_and_lets_open_sessions_finish() -> None:
    """Case 32: after SIGTERM a live session keeps working; the process exits once it ends."""
    host = "127.0.0.1"
    with echo_server(host) as upstream, running_proxy(host, upstream, "--drain-timeout", "30s") as proxy:
        with proxy.connect() as client:
            assert exchange(client, b"before") == b"before"
            proxy.signal(signal.SIGTERM)
            proxy.wait_log("draining 1 session for up to", timeout=5)
            with pytest.raises(ConnectionRefusedError):
                proxy.connect().close()
            assert exchange(client, b"during drain") == b"during drain"
            assert proxy.poll() is None
        code, waited = timed_wait(proxy, 5)  # the client closed: the drain ends long before 30 s
    assert code == 0 and waited < 5
    [record] = access_records(proxy.stdout)
    assert (record["in"], record["out"]) == ("18", "18")
    assert "Traceback" not in proxy.stderr


def test_drain_deadline_closes_what_is_left() -> None:
    host = "127.0.0.1"
    with (
        echo_server(host) as upstream,
        running_proxy(host, upstream, "--drain-timeout", "0.5s") as proxy,
        proxy.connect() as client,
    ):
        assert exchange(client, b"idle") == b"idle"
        sent = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert client.recv(100) == b""  # closed by the proxy at the deadline
        closed_after = time.monotonic() - sent
        code, _ = timed_wait(proxy, 5)
    assert code == 0
    assert 0.4 <= closed_after < 3
    [record] = access_records(proxy.stdout)
    assert (record["in"], record["out"], record["end"]) == ("4", "4", "shutdown")
    assert "Traceback" not in proxy.stderr


def test_second_sigterm_forces_exit_during_drain() -> None:
    """Cases 9 and 32: a second signal closes open sessions at once, cleanly."""
    host = "127.0.0.1"
    with (
        echo_server(host) as upstream,
        running_proxy(host, upstream, "--drain-timeout", "30s") as proxy,
        proxy.connect() as client,
    ):
        assert exchange(client, b"hello") == b"hello"
        proxy.signal(signal.SIGTERM)
        proxy.wait_log("draining 1 session for up to", timeout=5)
        time.sleep(0.2)  # the behaviour under test: the drain holds the process while the session is open
        assert proxy.poll() is None
        proxy.signal(signal.SIGTERM)
        code, waited = timed_wait(proxy, 3)
        with contextlib.suppress(ConnectionResetError):
            assert client.recv(100) == b""
    assert code == 0 and waited < 3
    [record] = access_records(proxy.stdout)
    assert (record["in"], record["out"], record["end"]) == ("5", "5", "forced_shutdown")
    assert "Traceback" not in proxy.stderr


# --- the option table, help and version --------------------------------------------------------------


def test_version() -> None:
    result = run_command("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"l4proxy {__version__}\n", "")


def test_help_shows_the_groups_in_order_then_syntax_and_exit_codes() -> None:
    out = run_command("--help").stdout
    titles = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles == [
        *GROUPS.values(),
        "Other",
        "Durations",
        "Escapes in --health-send and --health-expect",
        "Commands",
        "Exit codes",
    ]
    sections = dict(re.findall(r"(?ms)^(\S[^\n]*):\n(.*?)(?=^\S|\Z)", out))
    for option in OPTIONS:  # each flag in its own group
        assert re.search(rf"^  {re.escape(option.flag)}\b", sections[GROUPS[option.group]], re.M), option.flag
    assert r"\xNN" in sections["Escapes in --health-send and --health-expect"]
    assert "check --config FILE" in sections["Commands"]
    assert re.search(r"^  --config FILE\b", sections["Process"], re.M)
    assert "250ms" in sections["Durations"]
    assert [line.split()[0] for line in sections["Exit codes"].splitlines() if line[2:3].isdigit()] == ["0", "1", "2"]


def readme_flags() -> set[str]:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    rows = [line.split("|")[1] for line in readme.splitlines() if line.startswith("| `-")]
    return {flag for row in rows for flag in re.findall(r"`(--?[a-z][a-z-]*)", row)}


def test_readme_flag_table_matches_help() -> None:
    in_help = {opt for param in command.get_params(command.make_context("l4proxy", ["--listen", ":1", "--upstream",
               "a"])) for opt in param.opts}  # fmt: skip
    assert readme_flags() == in_help


def test_discovery_flags_set_the_pool() -> None:
    args = ["--listen", ":6379", "--upstream", "redis.svc,srv:_redis._tcp.cache", "--resolve-interval", "2s",
            "--resolve-empty-after", "1m"]  # fmt: skip
    pool = build_config(command.make_context("l4proxy", args).params).pools[0]
    assert (pool.members, pool.resolve_interval, pool.resolve_empty_after) == (
        (MemberConfig(Address("redis.svc", 6379)), MemberConfig(Service("_redis._tcp.cache"))),
        2.0,
        60.0,
    )


def test_defaults_in_the_table_are_the_config_defaults() -> None:
    """The table's defaults are what --help shows; the dataclasses' are what a program embedding l4proxy
    gets: they must agree."""
    params = command.make_context("l4proxy", ["--listen", "127.0.0.1:6379", "--upstream", "a"]).params
    assert build_config(params) == Config(
        listeners=(ListenerConfig(Address("127.0.0.1", 6379)),), pools=(PoolConfig(members=(Address("a", 6379),)),)
    )


@pytest.mark.parametrize(
    ("extra", "effective"),
    [([], "close"), (["--on-member-down", "keep"], "keep"), (["--health-check", "redis"], "keep")],
)
def test_a_primary_check_closes_a_down_members_sessions_unless_told_to_keep_them(
    extra: list[str], effective: str
) -> None:
    args = ["--listen", ":6379", "--upstream", "a", "--health-check", "redis-primary", *extra]
    assert build_config(command.make_context("l4proxy", args).params).pool("default").on_member_down == effective


def test_member_options_and_slow_start_reach_the_config() -> None:
    args = ["--listen", ":6379", "--upstream", "a:1;weight=3;max_conns=200,b;backup", "--slow-start", "30s"]
    pool = build_config(command.make_context("l4proxy", args).params).pool("default")
    assert pool.members == (MemberConfig(Address("a", 1), 3, 200), MemberConfig(Address("b", 6379), backup=True))
    assert pool.slow_start == 30.0


def test_a_member_listed_twice_keeps_its_first_options() -> None:
    args = ["--listen", ":6379", "--upstream", "a;weight=2,b,a;weight=5"]
    config, warnings = without_repeats(build_config(command.make_context("l4proxy", args).params))
    assert config.pool("default").members == (MemberConfig(Address("a", 6379), 2), MemberConfig(Address("b", 6379)))
    assert warnings == ["a:6379 is listed 2 times; it is used once, with its first options"]


@pytest.mark.parametrize(
    ("path", "flag"),
    [
        ("listeners[0].address", "--listen"),
        ("listeners[0].address.port", "--listen"),
        ("pools.default.members", "--upstream"),
        ("pools.default.members[3]", "--upstream"),
        ("pools.default.health.interval", "--health-interval"),
        ("pools.default.health.enabled", "--no-health-checks"),
        ("pools.default.tls", "--upstream-tls"),
        ("pools.default.tls.cert", "--upstream-cert"),
        ("listeners[0].tls.cert", "--tls-cert"),
        ("listeners[0].tls.min_version", "--tls-min-version"),
        ("drain_timeout", "--drain-timeout"),
        ("shutdown_delay", "--shutdown-delay"),
        ("workers", "--workers"),
        ("pools.default.resolve_interval", "--resolve-interval"),
        ("pools.default.send_proxy", "--send-proxy"),
        ("listeners[0].allow[2]", "--allow"),
        ("listeners[0].accept_proxy_from", "--accept-proxy-from"),
        ("listeners[0].accept_proxy", "--accept-proxy"),
        ("listeners[0].pool", None),  # no flag sets it: the error keeps its path
        ("pools.defaults.tls", None),
    ],
)
def test_error_paths_map_to_flags(path: str, flag: str | None) -> None:
    option = option_for(path)
    assert (option.flag if option else None) == flag
    error = flagged(ConfigError(path, 0.0, "bad"), {"--drain-timeout": "0", "--upstream": ("a", "b")})
    assert error.path == (flag or path)
    if flag == "--drain-timeout":
        assert str(error) == "--drain-timeout '0': bad"  # as typed, not as parsed


def test_every_option_path_is_a_distinct_place_in_the_tree() -> None:
    paths = [option.path for option in OPTIONS]
    assert len(set(paths)) == len(paths)
    assert all(option_for(option.path) is option for option in OPTIONS)


# --- start-up checks -------------------------------------------------------------------------------


def test_a_member_that_is_the_proxy_itself_is_refused() -> None:
    port = free_port()
    result = run_command("--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1", "--access-log", "off")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"l4proxy: error: --upstream '127.0.0.1:{port}': is this proxy's own listen address 127.0.0.1:{port}:"
        " it would connect to itself\n"
    )


def test_a_name_that_resolves_to_a_wildcard_listen_address_is_refused() -> None:
    port = free_port()
    result = run_command("--listen", f":{port}", "--upstream", f"127.0.0.1:1,localhost:{port}", "--access-log", "off")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"l4proxy: error: --upstream 'localhost:{port}': resolves to 127.0.0.1, which is this proxy's own listen"
        f" address :{port}: it would connect to itself\n"
    )


STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def test_a_member_listed_twice_is_a_warning_and_used_once() -> None:
    """Also: every diagnostic line carries the access log's time stamp."""
    host = "127.0.0.1"
    with echo_server(host) as upstream, running_proxy(host, f"{upstream},{upstream}") as proxy:
        with proxy.connect() as client:
            assert exchange(client, b"once") == b"once"
        proxy.signal(signal.SIGTERM)
        code, _ = timed_wait(proxy, 5)
    assert code == 0
    lines = proxy.stderr.splitlines()
    assert f"WARNING l4proxy: --upstream: {upstream} is listed 2 times; it is used once" in proxy.stderr
    assert all(re.match(rf"{STAMP} (DEBUG|INFO|WARNING|ERROR) l4proxy", line) for line in lines), lines
    [record] = access_records(proxy.stdout)
    assert (record["upstream"], record["out"]) == (upstream, "4")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--health-check", "redis", "--health-send", "PING"],
         "--health-send 'PING': applies only to the send-expect check, not redis"),
        (["--health-path", "/primary"], "--health-path '/primary': applies only to the http check, not tcp"),
        (["--health-check", "http", "--health-status", "6xx"],
         "--health-status '6xx': expected statuses such as 2xx, 200, 200-299 or a comma-separated list"),
        (["--health-check", "http", "--health-port", "0"], "--health-port '0': port must be 1..65535"),
        (["--health-check", "postgres"],
         "--health-check 'postgres': the postgres checks need a credentials file (auth) naming user and database"),
        (["--health-expect-match", "contains"],
         "--health-expect-match 'contains': applies only to the send-expect check with a reply"),
        (["--health-check", "redis", "--no-health-checks"],
         "--health-check 'redis': has no effect with --no-health-checks"),
    ],
)  # fmt: skip
def test_health_check_flags_that_cannot_take_effect(args: list[str], message: str) -> None:
    result = run_command("--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2", *args)
    assert (result.returncode, result.stderr) == (2, f"l4proxy: error: {message}\n")


@pytest.mark.parametrize(
    ("kind", "text", "problem"),
    [
        ("redis", None, "No such file or directory"),
        ("redis", "", "is empty; expected 'password' or 'user password'"),
        ("postgres", "health\n", "names only a user; expected 'user database [password]'"),
        ("redis-primary", "one\ntwo\n", "has more than one line; expected 'password' or 'user password'"),
    ],
)
def test_bad_credentials_files_are_start_up_errors_naming_the_file(
    tmp_path: Path, kind: str, text: str | None, problem: str
) -> None:
    path = tmp_path / "credentials"
    if text is not None:
        path.write_text(text)
    port = free_port()
    result = run_command("--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:2", "--health-check", kind,
                     "--health-auth", str(path))  # fmt: skip
    assert (result.returncode, result.stderr) == (2, f"l4proxy: error: --health-auth '{path}': {problem}\n")
