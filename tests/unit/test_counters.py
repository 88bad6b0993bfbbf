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
    READY,
    TLS_REASONS,
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
        ("x" * 100, "other"),
        ("SOME_REASON_NOT_IN_THE_TABLE", "other"),
        ("NO_SHARED_CIPHER", "no_shared_cipher"),
        ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "peer_did_not_return_a_certificate"),
    ],
)
def test_tls_reasons_become_short_label_values(cause: str, reason: str) -> None:
    assert tls_reason(cause) == reason


def test_tls_reasons_come_from_the_fixed_table() -> None:
    counters = ListenerCounters()
    for index in range(50):
        counters.tls_failed(f"REASON_{index}")
    counters.tls_failed("HTTP_REQUEST")
    assert counters.tls_failures == {"other": 50, "http_request": 1}
    assert all(tls_reason(reason.upper()) == reason for reason in TLS_REASONS[3:])


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


def test_a_sessions_bytes_count_once_for_its_listener_and_its_member() -> None:
    """One Flow per listener and member: the listener's bytes and the member's are sums over the same
    flows, and a member that is gone (a pool update removed it) leaves its bytes in the listener's."""
    first, second = ListenerCounters(), ListenerCounters()
    a, b = MemberCounters(), MemberCounters()
    for listener, member, sent, received in [(first, a, 10, 100), (first, b, 20, 200), (second, a, 30, 300),
                                             (first, a, 1, 2)]:
        flow = member.flow(listener)
        flow.bytes_in += sent
        flow.bytes_out += received
    first.unconnected_in += 7  # a client that sent bytes and never reached a member
    assert (first.bytes_in, first.bytes_out) == (10 + 20 + 1 + 7, 100 + 200 + 2)
    assert (second.bytes_in, second.bytes_out) == (30, 300)
    assert (a.bytes_in, a.bytes_out) == (10 + 30 + 1, 100 + 300 + 2)
    assert (b.bytes_in, b.bytes_out) == (20, 200)
    assert len(first.flows) == 2 and len(a.flows) == 2  # one flow per pair, made at its first session
    del b
    assert (first.bytes_in, first.bytes_out) == (38, 302)


def test_sessions_begun_are_those_ended_and_those_open() -> None:
    counters = ListenerCounters()
    for _ in range(5):
        counters.active += 1  # a session begins
    for _ in range(3):
        counters.ended += 1  # and ends
        counters.active -= 1
    assert (counters.sessions, counters.active, counters.ended) == (5, 2, 3)


def test_the_table_serves_the_sum_of_every_listeners_ended_sessions() -> None:
    """A reload's replaced listener keeps counting the sessions it still has: its counters stay listed."""
    from l4proxy.sessions import SessionTable

    table = SessionTable()
    old, new = ListenerCounters(), ListenerCounters()
    table.counted += [old, new]
    old.ended, new.ended = 4, 6
    assert table.served == 10
