"""Every option of the CLI table (``cli.OPTIONS``) given one bad value, through the real command: one
line that names the flag, says what was expected and echoes what was typed, exit 2, nothing on stdout,
no traceback. The same kind of values in a config file, where ``check`` names ``FILE:LINE: path``."""

from __future__ import annotations

from pathlib import Path

import pytest

from l4proxy.cli import OPTIONS

from ..kit import PKI
from ..servers import run_command

BASE = ["--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2", "--access-log", "off"]
DURATION = "expected a duration such as 250ms, 5s, 1m, 1h or 2.5"
WHOLE = "expected a whole number"
TLS_IN = ["--tls-cert", "PKI/server.pem", "--tls-key", "PKI/server.key"]
HTTP = ["--health-check", "http"]
NOT_A_CA = "is not a valid CA bundle (no PEM certificate found)"

# (the flag, the arguments after BASE, the message after "l4proxy: error: "). PKI/ is the test
# certificates' folder; TMP/ the test's own, where bad.pem holds no PEM at all.
BAD_VALUES: list[tuple[str, list[str], str]] = [
    ("--listen", ["--listen", "127.0.0.1:x"], "--listen '127.0.0.1:x': port 'x' is not a number"),
    ("--idle-timeout", ["--idle-timeout", "soon"], f"--idle-timeout 'soon': {DURATION}"),
    ("--half-closed-timeout", ["--half-closed-timeout", "0"], "--half-closed-timeout '0': must be greater than 0"),
    ("--max-connections", ["--max-connections", "many"], f"--max-connections 'many': {WHOLE}"),
    ("--tcp-keepalive", ["--tcp-keepalive", "-1"], f"--tcp-keepalive '-1': {DURATION}"),
    ("--max-session-duration", ["--max-session-duration", "1x"], f"--max-session-duration '1x': {DURATION}"),
    ("--buffer-size", ["--buffer-size", "1g"], "--buffer-size '1g': expected bytes such as 65536, 64k or 1m"),
    ("--relay", ["--relay", "zero"], "--relay 'zero': expected one of auto, splice, transport"),
    ("--upstream", ["--upstream", "a:b"], "--upstream 'a:b': port 'b' is not a number"),
    ("--slow-start", ["--slow-start", "-1s"], f"--slow-start '-1s': {DURATION}"),
    ("--connect-timeout", ["--connect-timeout", "1d"], f"--connect-timeout '1d': {DURATION}"),
    ("--retries", ["--retries", "1.5"], f"--retries '1.5': {WHOLE}"),
    ("--retry-budget", ["--retry-budget", "101"], "--retry-budget '101': must be a percent, 0..100"),
    ("--panic-threshold", ["--panic-threshold", "150"], "--panic-threshold '150': must be a percent, 0..100 (0: off)"),
    ("--on-member-down", ["--on-member-down", "drop"], "--on-member-down 'drop': expected keep or close"),
    ("--queue-timeout", ["--queue-timeout", "0"], "--queue-timeout '0': must be greater than 0"),
    ("--max-queue", ["--max-queue", "-1"], "--max-queue '-1': must be 0 (no queue) or more"),
    ("--eject-after", ["--eject-after", "0"], "--eject-after '0': must be at least 1"),
    ("--eject-time", ["--eject-time", "0"], "--eject-time '0': must be greater than 0"),
    ("--max-eject-time", ["--max-eject-time", "10s"], "--max-eject-time '10s': must be at least the eject time (30s)"),
    ("--max-ejected-percent", ["--max-ejected-percent", "101"],
     "--max-ejected-percent '101': must be a percent, 0..100"),
    ("--resolve-interval", ["--resolve-interval", "x"], f"--resolve-interval 'x': {DURATION}"),
    ("--resolve-empty-after", ["--resolve-empty-after", "-1"], f"--resolve-empty-after '-1': {DURATION}"),
    ("--send-proxy", ["--send-proxy", "v9"], "--send-proxy 'v9': expected v1 or v2"),
    ("--health-interval", ["--health-interval", "0"], "--health-interval '0': must be greater than 0"),
    ("--health-timeout", ["--health-timeout", "x"], f"--health-timeout 'x': {DURATION}"),
    ("--rise", ["--rise", "x"], f"--rise 'x': {WHOLE}"),
    ("--fall", ["--fall", "-2"], "--fall '-2': must be at least 1"),
    ("--health-send", ["--health-send", r"\xZZ"], r"--health-send '\\xZZ': \x needs two hex digits, as in \x0d"),
    ("--health-expect", ["--health-expect", "OK\\x"], r"--health-expect 'OK\\x': \x needs two hex digits, as in \x0d"),
    ("--health-check", ["--health-check", "ping"],
     "--health-check 'ping': expected one of tcp, send-expect, http, redis, redis-primary, postgres, postgres-primary"),
    ("--health-expect-match", ["--health-expect-match", "glob"],
     "--health-expect-match 'glob': expected one of prefix, contains, regex"),
    ("--health-path", [*HTTP, "--health-path", "status"], "--health-path 'status': expected a path starting with '/'"),
    ("--health-port", [*HTTP, "--health-port", "0"], "--health-port '0': port must be 1..65535"),
    ("--health-status", [*HTTP, "--health-status", "700"],
     "--health-status '700': expected statuses such as 2xx, 200, 200-299 or a comma-separated list"),
    ("--health-auth", ["--health-check", "redis", "--health-auth", "TMP/missing"],
     "--health-auth 'TMP/missing': No such file or directory"),
    ("--split-brain", ["--split-brain", "random"], "--split-brain 'random': expected fail-closed or prefer-newest"),
    ("--accept-proxy-from", ["--accept-proxy", "--accept-proxy-from", "10.0.0.0/33"],
     "--accept-proxy-from '10.0.0.0/33': prefix length must be 0..32"),
    ("--proxy-timeout", ["--accept-proxy", "--proxy-timeout", "x"], f"--proxy-timeout 'x': {DURATION}"),
    ("--allow", ["--allow", "nope"], "--allow 'nope': 'nope' is not an IPv4 or IPv6 address"),
    ("--deny", ["--deny", "1.2.3.4/40"], "--deny '1.2.3.4/40': prefix length must be 0..32"),
    ("--max-connections-per-ip", ["--max-connections-per-ip", "x"], f"--max-connections-per-ip 'x': {WHOLE}"),
    ("--rate-per-ip", ["--rate-per-ip", "5/m"], "--rate-per-ip '5/m': expected a rate such as 100/s"),
    ("--tls-cert", ["--tls-cert", "TMP/bad.pem", "--tls-key", "PKI/server.key"],
     "--tls-cert 'TMP/bad.pem': is not a PEM certificate"),
    ("--tls-key", ["--tls-cert", "PKI/server.pem", "--tls-key", "PKI/client.key"],
     "--tls-key 'PKI/client.key': key does not match the certificate 'PKI/server.pem'"),
    ("--tls-client-ca", [*TLS_IN, "--tls-client-ca", "TMP/bad.pem"], f"--tls-client-ca 'TMP/bad.pem': {NOT_A_CA}"),
    ("--tls-alpn", [*TLS_IN, "--tls-alpn", "h2,\u221e"], "--tls-alpn '\u221e': an ALPN protocol name must be ASCII"),
    ("--tls-handshake-timeout", [*TLS_IN, "--tls-handshake-timeout", "x"], f"--tls-handshake-timeout 'x': {DURATION}"),
    ("--tls-min-version", [*TLS_IN, "--tls-min-version", "1.4"], "--tls-min-version '1.4': expected 1.2 or 1.3"),
    ("--tls-ciphers", [*TLS_IN, "--tls-ciphers", "NOPE"],
     "--tls-ciphers 'NOPE': OpenSSL knows no TLS 1.2 cipher in this list"),
    ("--upstream-ca", ["--upstream-tls", "--upstream-ca", "TMP/bad.pem"], f"--upstream-ca 'TMP/bad.pem': {NOT_A_CA}"),
    ("--upstream-sni", ["--upstream-tls", "--upstream-sni", "a..b"],
     "--upstream-sni 'a..b': expected a host name or IP address"),
    ("--upstream-cert", ["--upstream-tls", "--upstream-cert", "TMP/bad.pem", "--upstream-key", "PKI/client.key"],
     "--upstream-cert 'TMP/bad.pem': is not a PEM certificate"),
    ("--upstream-key", ["--upstream-tls", "--upstream-cert", "PKI/client.pem", "--upstream-key", "PKI/server.key"],
     "--upstream-key 'PKI/server.key': key does not match the certificate 'PKI/client.pem'"),
    ("--upstream-alpn", ["--upstream-tls", "--upstream-alpn", ","],
     "--upstream-alpn ',': expected names, comma-separated, such as h2,http/1.1"),
    ("--log-level", ["--log-level", "loud"], "--log-level 'loud': expected one of debug, info, warning, error"),
    ("--access-log", ["--access-log", "syslog:host"], "--access-log 'syslog:host': expected syslog:HOST:PORT (UDP,"
     " port 1..65535) or syslog:/PATH (a UNIX datagram socket)"),
    ("--access-log-format", ["--access-log-format", "csv"], "--access-log-format 'csv': expected one of logfmt, json"),
    ("--drain-timeout", ["--drain-timeout", "x"], f"--drain-timeout 'x': {DURATION}"),
    ("--shutdown-delay", ["--shutdown-delay", "1w"], f"--shutdown-delay '1w': {DURATION}"),
    ("--drain-at", ["--drain-at", "never"], "--drain-at 'never': expected now or safe"),
    ("--drain-protocol", ["--drain-protocol", "http"], "--drain-protocol 'http': expected redis or postgres"),
    ("--workers", ["--workers", "many"], "--workers 'many': expected a number of processes from 1 to 256, or 'auto'"),
    ("--admin", ["--admin", "127.0.0.1:0"], "--admin '127.0.0.1:0': port must be 1..65535"),
]


def test_every_option_that_takes_a_value_has_a_bad_value_row() -> None:
    """The table below walks the whole option table: a new option needs its row."""
    assert [flag for flag, _, _ in BAD_VALUES] == [option.flag for option in OPTIONS if not option.switch]


@pytest.mark.parametrize(("flag", "args", "message"), BAD_VALUES, ids=[row[0] for row in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_flag_and_exit_2(
    tmp_path: Path, pki: PKI, flag: str, args: list[str], message: str
) -> None:
    (tmp_path / "bad.pem").write_text("not PEM at all\n")

    def placed(text: str) -> str:
        return text.replace("PKI/", f"{pki.dir}/").replace("TMP/", f"{tmp_path}/")

    result = run_command(*BASE, *map(placed, args))
    assert (result.returncode, result.stderr, result.stdout) == (2, f"l4proxy: error: {placed(message)}\n", "")


def test_bad_values_in_a_config_file_are_each_one_line_with_the_file_line_and_path(tmp_path: Path) -> None:
    """``check`` reports every bad value at once, each with the value as the file has it (``'0'`` and
    ``0``, not the ``0.0`` they became)."""
    path = tmp_path / "l4proxy.toml"
    path.write_text(
        'drain_timeout = 0\nworkers = "many"\n'
        '[listeners.a]\naddress = "127.0.0.1:1"\npool = "p"\nidle_timeout = "soon"\n'
        '[pools.p]\nmembers = ["127.0.0.1:2"]\nconnect_timeout = "0"\n'
        '[pools.p.health]\ncheck = "ping"\n'
        '[pools.p.tls]\nsni = "a..b"\n'
    )
    result = run_command("check", "--config", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"{path}:1: drain_timeout: must be greater than 0 (got 0)",
        f"{path}:2: workers: expected a number of processes from 1 to 256, or 'auto' (got 'many')",
        f"{path}:6: listeners.a.idle_timeout: {DURATION} (got 'soon')",
        f"{path}:9: pools.p.connect_timeout: must be greater than 0 (got '0')",
        f"{path}:11: pools.p.health.check: expected one of tcp, send-expect, http, redis, redis-primary, postgres,"
        " postgres-primary (got 'ping')",
        f"{path}:13: pools.p.tls.sni: expected a host name or IP address (got 'a..b')",
    ]
