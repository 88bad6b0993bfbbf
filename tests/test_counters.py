"""The pure counters behind /metrics (failure kinds and TLS reasons as bounded labels) and the
operator's hold in the pick, as tables."""

from __future__ import annotations

import pytest

from l4proxy.balancer import Balancer
from l4proxy.config import Address, HealthConfig
from l4proxy.counters import (
    CONNECT_KINDS,
    DISABLED,
    DRAIN,
    MAX_REASONS,
    READY,
    ListenerCounters,
    MemberCounters,
    connect_kind,
    tls_reason,
)
from l4proxy.errors import failure_kind


@pytest.mark.parametrize(
    ("cause", "kind"),
    [
        ("refused", "refused"),
        ("timeout", "timeout"),
        ("dns: Name or service not known", "dns"),
        ("tls: certificate verify failed: unable to get local issuer certificate", "tls"),
        ("reset", "reset"),
        ("Network is unreachable", "other"),
        ("", "other"),
    ],
)
def test_connect_failures_fold_into_a_few_kinds(cause: str, kind: str) -> None:
    assert connect_kind(cause) == kind


@pytest.mark.parametrize(
    ("exc", "kind"),
    [(ConnectionRefusedError(), "refused"), (TimeoutError(), "timeout"), (ConnectionResetError(), "reset")],
)
def test_the_kinds_match_what_the_dialer_reports(exc: BaseException, kind: str) -> None:
    assert connect_kind(failure_kind(exc)) == kind


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        ("handshake timeout", "timeout"),
        ("the client reset the connection during the handshake", "client_reset"),
        ("the client closed the connection during the handshake", "client_closed"),
        ("WRONG_VERSION_NUMBER", "wrong_version_number"),
        ("HTTP_REQUEST", "http_request"),
        ("tlsv1 alert unknown ca", "tlsv1_alert_unknown_ca"),
        ("", "other"),
        ("x" * 100, "x" * 48),
    ],
)
def test_tls_reasons_become_short_label_values(cause: str, reason: str) -> None:
    assert tls_reason(cause) == reason


def test_tls_reasons_are_bounded_per_listener() -> None:
    counters = ListenerCounters()
    for index in range(MAX_REASONS + 10):
        counters.tls_failed(f"REASON_{index}")
    counters.tls_failed("REASON_0")
    assert len(counters.tls_failures) == MAX_REASONS + 1  # the first ones, and "other" for the rest
    assert counters.tls_failures["other"] == 10
    assert counters.tls_failures["reason_0"] == 2
    assert sum(counters.tls_failures.values()) == MAX_REASONS + 11


def test_member_counters_keep_every_kind_and_the_last_check() -> None:
    counters = MemberCounters()
    assert counters.connect_failures == dict.fromkeys(CONNECT_KINDS, 0)
    counters.connect_failed("refused")
    counters.connect_failed("dns: nope")
    counters.checked(True, "check passed", 0.002, 100.0)
    counters.checked(False, "check failed: refused", 0.001, 101.0)
    counters.changed("check failed: refused", 101.0)
    assert counters.connect_failures == {**dict.fromkeys(CONNECT_KINDS, 0), "refused": 1, "dns": 1}
    assert (counters.checks_passed, counters.checks_failed) == (1, 1)
    assert (counters.last_check, counters.last_check_ok, counters.last_check_seconds) == (
        "check failed: refused",
        False,
        0.001,
    )
    assert (counters.why, counters.since) == ("check failed: refused", 101.0)


@pytest.mark.parametrize(
    ("held", "picked"),
    [
        ({}, ["a:1", "b:1", "c:1"]),
        ({"a:1": DRAIN}, ["b:1", "c:1", "b:1"]),
        ({"a:1": DRAIN, "c:1": DISABLED}, ["b:1", "b:1", "b:1"]),
        ({"a:1": DRAIN, "b:1": DRAIN, "c:1": DISABLED}, [None, None, None]),
    ],
)
def test_the_pick_leaves_members_held_by_the_operator_alone(held: dict[str, str], picked: list[str | None]) -> None:
    balancer = Balancer([Address("a", 1), Address("b", 1), Address("c", 1)], HealthConfig())
    for member in balancer.members:
        member.admin = held.get(member.key, READY)
    assert [getattr(balancer.pick(), "key", None) for _ in picked] == picked
    assert balancer.any_up is (picked[0] is not None)
