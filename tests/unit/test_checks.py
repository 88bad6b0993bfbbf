"""The pure parts of the health checks as tables: send-expect matching, statuses, credentials files,
the rules between check settings, the HTTP conversation and the split-brain rule."""

from __future__ import annotations

import pytest

from l4proxy import HealthConfig
from l4proxy.checks import (
    PASSED,
    Credentials,
    Episode,
    Failure,
    SendExpect,
    SplitBrain,
    Verdict,
    from_exception,
    parse_credentials,
    parse_status,
)
from l4proxy.counters import connect_kind
from l4proxy.errors import ConfigError, failure_kind
from l4proxy.httpcheck import HttpCheck
from l4proxy.tlsengine import EndedBeforeVerdict, judged

BAD = Failure.BAD_REPLY


def converse(check: SendExpect | HttpCheck, *chunks: bytes) -> list[Verdict | None]:
    """The verdict after each chunk the member sends."""
    return [check.feed(chunk)[1] for chunk in chunks]


@pytest.mark.parametrize(
    ("expect", "match", "chunks", "verdicts"),
    [
        (b"+PONG", "prefix", [b"+PO", b"NG\r\n"], [None, PASSED]),
        (b"+PONG", "prefix", [b"-ERR x\r\n"], [Verdict(BAD, "b'-ERR ', expected b'+PONG'")]),
        (b"role:master", "contains", [b"# Replication\r\n", b"role:master\r\n"], [None, PASSED]),
        (b"role:master", "contains", [b"role:slave\n" * 6000],
         [Verdict(BAD, r"b'role:slave\nrole:slave\nrole:slave\nrole:sl', expected it to contain b'role:master'")]),
        (rb"^\+OK \d+", "regex", [b"+OK 12\r\n"], [PASSED]),
        (rb"^\+OK \d+", "regex", [b"+OK x"], [None]),
    ],
)
def test_send_expect_matches_the_reply(
    expect: bytes, match: str, chunks: list[bytes], verdicts: list[Verdict | None]
) -> None:
    check = SendExpect(b"PING\r\n", expect, match)
    assert check.start() == (b"PING\r\n", None)
    assert converse(check, *chunks) == verdicts


def test_send_expect_closed_or_stalled_is_a_bad_reply_and_silence_a_timeout() -> None:
    check = SendExpect(b"", b"OK", "contains")
    assert check.stalled() is None  # nothing came: a plain timeout
    check.feed(b"nope")
    assert check.stalled() == check.closed() == Verdict(BAD, "b'nope', expected it to contain b'OK'")
    assert SendExpect(b"hello", b"").start() == (b"hello", PASSED)  # nothing to hear back


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (ConnectionRefusedError(), Verdict(Failure.REFUSED)),
        (TimeoutError(), Verdict(Failure.TIMEOUT)),
        (ConnectionResetError(104, "Connection reset by peer"), Verdict(Failure.OTHER, "reset")),
    ],
)
def test_connect_failures_have_kinds(exc: BaseException, verdict: Verdict) -> None:
    assert from_exception(exc) == verdict


LATE = "after the handshake, before any data: the member may have rejected our certificate"
DURING = ConnectionResetError("the peer closed the connection during the TLS handshake")


@pytest.mark.parametrize(
    ("exc", "certificate", "cause", "verdict"),
    [
        # a TLS 1.3 member hung up after our side of the handshake, before its first record
        (EndedBeforeVerdict(reset=False), True, f"tls: closed {LATE}", Verdict(Failure.TLS, f"closed {LATE}")),
        (EndedBeforeVerdict(reset=True), True, f"tls: reset {LATE}", Verdict(Failure.TLS, f"reset {LATE}")),
        (EndedBeforeVerdict(reset=False), False, "reset", Verdict(Failure.OTHER, "reset")),  # no certificate to blame
        (EndedBeforeVerdict(reset=True), False, "reset", Verdict(Failure.OTHER, "reset")),
        (DURING, True, "reset", Verdict(Failure.OTHER, "reset")),  # before our side was done: not a verdict on it
        (TimeoutError(), True, "timeout", Verdict(Failure.TIMEOUT)),
    ],
)
def test_a_hang_up_after_the_tls13_handshake_is_tls_only_when_we_sent_a_certificate(
    exc: BaseException, certificate: bool, cause: str, verdict: Verdict
) -> None:
    """Sessions see ``cause`` (and its connect failure kind), probes ``verdict``."""
    judgement = judged(exc, certificate)
    assert failure_kind(judgement) == cause
    assert connect_kind(cause) == cause.split(":")[0]
    assert from_exception(judgement) == verdict


@pytest.mark.parametrize(
    ("verdict", "reason"),
    [
        (PASSED, "check passed"),
        (Verdict(Failure.TIMEOUT), "check failed: timeout"),
        (Verdict(Failure.WRONG_ROLE, "slave"), "check failed: wrong role: slave"),
    ],
)
def test_reasons_name_the_kind(verdict: Verdict, reason: str) -> None:
    assert verdict.reason == reason


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("2xx", ((200, 299),)),
        ("200", ((200, 200),)),
        ("200-204, 3XX", ((200, 204), (300, 399))),
    ],
)
def test_status_lists(text: str, ranges: tuple[tuple[int, int], ...]) -> None:
    assert parse_status(text) == ranges


@pytest.mark.parametrize(
    ("text", "problem"), [("6xx", "expected statuses"), ("204-200", "runs backwards"), ("", "expected statuses")]
)
def test_bad_status_lists(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_status(text)


@pytest.mark.parametrize(
    ("kind", "text", "credentials"),
    [
        ("redis", "s3cret\n", Credentials(password="s3cret")),
        ("redis-primary", "# probe user\nprobe my pass\n", Credentials("probe", "my pass")),
        ("postgres", "health app s3 cret", Credentials("health", "s3 cret", "app")),
        ("postgres-primary", "health app\n", Credentials("health", "", "app")),
    ],
)
def test_credentials_files(kind: str, text: str, credentials: Credentials) -> None:
    assert parse_credentials(text, kind) == credentials


@pytest.mark.parametrize(
    ("kind", "text", "problem"),
    [
        ("redis", "\n\n", "is empty; expected 'password' or 'user password'"),
        ("redis", "a\nb\n", "has more than one line; expected 'password' or 'user password'"),
        ("postgres", "health\n", "names only a user; expected 'user database [password]'"),
    ],
)
def test_bad_credentials_files(kind: str, text: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_credentials(text, kind)
    assert str(caught.value) == problem


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"check": "ping"}, "check 'ping': expected one of tcp, send-expect, http, redis, redis-primary, postgres, "
                            "postgres-primary"),
        ({"check": "redis", "send": b"PING"}, "send b'PING': applies only to the send-expect check, not redis"),
        ({"check": "send-expect"}, "check 'send-expect': send-expect needs a payload to send or a reply to expect"),
        ({"expect_match": "contains"}, "expect_match 'contains': applies only to the send-expect check with a reply"),
        ({"expect": b"(", "expect_match": "regex"}, "expect b'(': is not a regular expression: missing ), "
                                                    "unterminated subpattern at position 0"),
        ({"check": "redis", "path": "/"}, "path '/': applies only to the http check, not redis"),
        ({"check": "http", "path": "primary"}, "path 'primary': expected a path starting with '/'"),
        ({"check": "http", "port": 70000}, "port 70000: must be 1..65535"),
        ({"auth": "/etc/x"}, "auth '/etc/x': applies only to the redis and postgres checks, not tcp"),
        ({"check": "postgres"}, "check 'postgres': the postgres checks need a credentials file (auth) naming user "
                                "and database"),
    ],
)  # fmt: skip
def test_check_settings_that_contradict_each_other(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        HealthConfig(**settings)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_the_kind_defaults_to_send_expect_with_a_payload() -> None:
    assert (HealthConfig().kind, HealthConfig(expect=b"+PONG").kind) == ("tcp", "send-expect")


def test_http_request_and_statuses() -> None:
    check = HttpCheck("10.0.0.1:8008", "/primary", "200")
    request, verdict = check.start()
    assert verdict is None
    assert request == (b"GET /primary HTTP/1.1\r\nHost: 10.0.0.1:8008\r\nUser-Agent: l4proxy-health\r\n"
                       b"Connection: close\r\n\r\n")  # fmt: skip
    assert converse(check, b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n\r\nok") == [None, PASSED]
    replica = HttpCheck("h:1", "/primary", "200")
    replica.start()
    assert converse(replica, b"HTTP/1.1 503 Service Unavailable\r\n\r\n") == [
        Verdict(BAD, "status 503 Service Unavailable, expected 200")
    ]


@pytest.mark.parametrize(
    ("chunks", "verdict"),
    [
        ([b"SSH-2.0-OpenSSH\r\n\r\n"], Verdict(BAD, "not HTTP: illegal status line: bytearray(b'SSH-2.0-OpenSSH')")),
        ([b"HTTP/1.1 200 O"], None),
    ],
)
def test_http_replies_that_are_not_http(chunks: list[bytes], verdict: Verdict | None) -> None:
    check = HttpCheck("h:1")
    check.start()
    assert converse(check, *chunks)[-1] == verdict
    assert check.closed().failure is BAD


# Claimants after each probe -> the episode reported then (None: nothing to report).
SPLIT_BRAIN = [
    ([], None),
    (["a"], None),
    (["a", "b"], Episode(True, ("a", "b"))),
    (["b", "a"], None),  # same episode
    (["a", "b", "c"], None),  # still the same episode, even with a third claimant
    (["b"], Episode(False, ("b",))),
    (["b"], None),
    (["c", "b"], Episode(True, ("b", "c"))),
    ([], Episode(False, ())),
]


def test_split_brain_is_reported_once_per_episode() -> None:
    rule = SplitBrain()
    seen = [rule.observe(claimants) for claimants, _ in SPLIT_BRAIN]
    assert seen == [expected for _, expected in SPLIT_BRAIN]
    assert rule.episodes == 2 and not rule.active
