"""The example config file runs: ``l4proxy check`` passes it and its output reads back as the same
Config, and ``l4proxy --config`` serves real redis-servers (one TLS-only) through all three listeners,
plain, TLS-terminated and TLS-originated. Also the checks that need the machine (a member that is the
proxy itself, a certificate that does not load) and what flags may go with ``--config``."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from l4proxy.cli import load_file
from l4proxy.configfile import ConfigFileError

from ..servers import ROOT, Certs, Command, RedisServer, free_port, redis_cli, run_command, started, tls_ping, tls_redis

EXAMPLE = ROOT / "examples" / "l4proxy.toml"
PORTS = ("7000", "7443", "7100", "7001", "7002", "7101")  # the example's: each gets a free one


@pytest.fixture
def example(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """The example as written, in a copy of the repository layout (``examples/`` beside ``certs/out/``,
    which the development generator fills), on free ports."""
    generated = subprocess.run([sys.executable, str(ROOT / "certs" / "generate.py"), "--out",
                                str(tmp_path / "certs" / "out")], capture_output=True, timeout=60, check=False)
    assert generated.returncode == 0, generated.stderr
    ports = {port: free_port() for port in PORTS}
    text = re.sub(r"(?<!\d)(" + "|".join(PORTS) + r")(?!\d)", lambda m: str(ports[m.group(1)]), EXAMPLE.read_text())
    copy = tmp_path / "examples" / "l4proxy.toml"
    copy.parent.mkdir()
    copy.write_text(text)
    return copy, ports


def test_check_prints_a_configuration_that_checks_to_the_same_config(example: tuple[Path, dict[str, int]]) -> None:
    path, _ports = example
    first = run_command("check", "--config", str(path))
    assert (first.returncode, first.stderr) == (0, ""), first.stderr
    printed = path.parent / "printed.toml"
    printed.write_text(first.stdout)
    again = run_command("check", "--config", str(printed))
    assert (again.returncode, again.stdout, again.stderr) == (0, first.stdout, "")
    assert load_file(str(printed)) == load_file(str(path))


def test_the_example_serves_all_three_listeners(example: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    path, ports = example
    certs = Certs(path.parent.parent / "certs" / "out")
    members = [RedisServer(tmp_path, port=ports[p]) for p in ("7001", "7002")]
    vault = tls_redis(tmp_path, certs, port=ports["7101"])
    access = tmp_path / "access.log"
    proxy = Command("--config", str(path), "--access-log", str(access), listen=False, listeners=3)
    with started(*members, vault, proxy):
        assert redis_cli(ports["7000"], "PING") == "PONG"  # plain
        assert tls_ping(ports["7443"], certs["ca.pem"]) == b"+PONG\r\n"  # TLS terminated
        assert redis_cli(ports["7100"], "PING") == "PONG"  # TLS originated to the TLS-only redis
        assert proxy.stop() == 0, proxy.stderr
    upstreams = re.findall(r"upstream=(\S+)", access.read_text())  # --access-log won over the file's "-"
    cache = {f"127.0.0.1:{ports[p]}" for p in ("7001", "7002")}
    assert len(upstreams) == 3 and set(upstreams[:2]) <= cache and upstreams[2] == f"127.0.0.1:{ports['7101']}"
    assert proxy.stdout == ""


def test_a_member_that_is_a_listen_address_and_a_certificate_that_does_not_load(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    path = tmp_path / "f.toml"
    path.write_text(f'[listeners.a]\naddress = ":{port}"\npool = "p"\n\n[pools.p]\n'
                    f'members = ["127.0.0.1:1", "localhost:{port}"]\n[pools.p.tls]\nca = "junk.pem"\n')  # fmt: skip
    with pytest.raises(ConfigFileError) as caught:
        load_file(str(path))
    [loop, tls] = caught.value.lines()
    assert tls == (f"{path}:8: pools.p.tls.ca: is not a valid CA bundle (no PEM certificate found)"
                   f" (got '{tmp_path}/junk.pem')")  # fmt: skip
    assert loop == (f"{path}:6: pools.p.members[1]: resolves to 127.0.0.1, which is this proxy's own listen"
                    f" address :{port}: it would connect to itself (got 'localhost:{port}')")  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--listen", ":1"], "--listen ':1': cannot be combined with --config; set listeners.NAME.address in the file"),
        (["--upstream", "a:1", "--upstream", "b:1"], "--upstream 'a:1,b:1': cannot be combined with --config; set"
                                                     " pools.NAME.members in the file"),
        (["--upstream-tls"], "--upstream-tls: cannot be combined with --config; set pools.NAME.tls in the file"),
        (["--workers", "0"], "--workers '0': expected a number of processes from 1 to 256, or 'auto'"),
        (["--log-level", "loud"], "--log-level 'loud': expected one of debug, info, warning, error"),
    ],
)  # fmt: skip
def test_with_a_config_file_only_process_flags_may_be_given(tmp_path: Path, flags: list[str], message: str) -> None:
    path = tmp_path / "f.toml"
    path.write_text('[listeners.a]\naddress = "127.0.0.1:1"\npool = "p"\n[pools.p]\nmembers = ["127.0.0.1:2"]\n')
    result = run_command("--config", str(path), *flags)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"l4proxy: error: {message}\n")


def test_check_usage_and_missing_file() -> None:
    assert run_command("check").stderr == "l4proxy: error: Missing option '--config'.\n"
    missing = run_command("check", "--config", "no/such.toml")
    no_file = "l4proxy: error: --config 'no/such.toml': No such file or directory\n"
    assert (missing.returncode, missing.stderr) == (2, no_file)
    assert run_command("check", "--help").stdout.startswith("Usage: l4proxy check [OPTIONS]")


def test_an_address_in_use_is_named_even_when_it_is_not_the_first_listener(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "f.toml"
        path.write_text(f'[listeners.a]\naddress = "127.0.0.1:{free_port()}"\npool = "p"\n[listeners.b]\n'
                        f'address = "127.0.0.1:{port}"\npool = "p"\n[pools.p]\nmembers = ["127.0.0.1:2"]\n'
                        "health.enabled = false\n")  # fmt: skip
        result = run_command("--config", str(path), "--access-log", "off")
    in_use = f"l4proxy: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert (result.returncode, result.stderr.splitlines()[-1]) == (1, in_use)
