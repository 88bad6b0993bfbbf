"""Health probes of TLS pools: they connect as the sessions' dials do, late verdict included.

A member that requires a client certificate rejects a client without one (or with one from another
CA) in the handshake on TLS 1.2, but only in an alert just after it on TLS 1.3, when the client's side
of the handshake is already done. Either way its probes fail as ``tls`` with OpenSSL's reason, in the
health log and in the probe failures by kind, and it goes DOWN; with the right client certificate
(``--upstream-cert``/``--upstream-key``) the same member is UP, for the tcp check and for checks that
carry bytes after the handshake. The members are Python's ``ssl`` (OpenSSL) in blocking threads and
``openssl s_server -Verify 1``.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import pytest

from l4proxy import HealthConfig
from l4proxy.checks import Failure
from l4proxy.config import UpstreamTLSConfig
from l4proxy.proxyproto import V2_LOCAL

from ..kit import PKI, edge_config, eventually, make_config, refused_address, running
from .test_health_checks import health_changes
from .test_tls_halfclose import (
    LATE,
    VERSIONS,
    End,
    hang_up,
    long_verdict_wait,
    openssl_verify_server,
    own_member,
    silent,
)

# A probe's timeout is no part of what these tests check: a loaded host can stall a probe of a healthy
# member past a second (seen once in 600 runs on a loaded two-core host), failing it as a timeout.
PROBE_TIMEOUT = 10.0
TCP = HealthConfig(enabled=True, interval=0.05, timeout=PROBE_TIMEOUT, rise=1, fall=2)
PING = HealthConfig(
    enabled=True, interval=0.05, timeout=PROBE_TIMEOUT, rise=1, fall=2, send=b"PING\r\n", expect=b"+PONG"
)
PASSES = 3  # probes that must pass in a row before a member counts as kept UP by them


def pong(end: End) -> bytes:
    """A Redis-like member: ``+PONG`` to a ``PING``; a tcp probe closes without a word."""
    try:
        line = end.sock.recv(1024)
    except ssl.SSLZeroReturnError:
        return b""
    if line == b"PING\r\n":
        end.send(b"+PONG\r\n")
    return line


def requiring(pki: PKI, version: str) -> ssl.SSLContext:
    """A member that requires a client certificate from our CA, on exactly ``version``."""
    ctx = pki.upstream_server_ctx(client_ca="ca.pem")
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


def upstream_tls(pki: PKI, cert: str | None) -> UpstreamTLSConfig:
    if cert is None:
        return UpstreamTLSConfig(ca=pki["ca.pem"], sni="localhost")
    return UpstreamTLSConfig(ca=pki["ca.pem"], sni="localhost", cert=pki[f"{cert}.pem"], key=pki[f"{cert}.key"])


async def probed_down(config: Any, caplog: pytest.LogCaptureFixture, kind: Failure = Failure.TLS) -> tuple[str, int]:
    """Run ``config`` until its one member is DOWN: the reason logged and its probe failures, all of ``kind``."""
    async with running(config) as (proxy, _):
        pool = proxy.pools["default"]
        [member] = pool.members
        await eventually(lambda: not member.health.up)
        assert pool.probes is not None
        failures = pool.probes.failures[member.key, kind]
        assert sum(pool.probes.failures.values()) == failures  # no other kind
    return health_changes(caplog, "DOWN")[str(member.address)], failures


async def probed_up(config: Any) -> int:
    """Run ``config`` until its one member has passed ``PASSES`` probes; the failed probes by then."""
    async with running(config) as (proxy, _):
        pool = proxy.pools["default"]
        [member] = pool.members
        await eventually(lambda: member.stats.checks_passed >= PASSES)
        assert member.health.up
        assert member.stats.last_check == "check passed"
        return member.stats.checks_failed


REJECTIONS = [
    # (version, our certificate, the reason the probe fails with)
    ("1.3", None, "check failed: tls: TLSV13_ALERT_CERTIFICATE_REQUIRED"),  # an alert after the handshake
    ("1.2", None, "check failed: tls: SSLV3_ALERT_HANDSHAKE_FAILURE"),  # in the handshake
    ("1.3", "other_client", "check failed: tls: TLSV1_ALERT_UNKNOWN_CA"),
    ("1.2", "other_client", "check failed: tls: TLSV1_ALERT_UNKNOWN_CA"),
]


@pytest.mark.parametrize("health", [TCP, PING], ids=["tcp", "send-expect"])
@pytest.mark.parametrize(("version", "cert", "reason"), REJECTIONS, ids=[f"{v}-{c}" for v, c, _ in REJECTIONS])
async def test_a_member_that_rejects_our_certificate_is_down_with_the_tls_reason(
    pki: PKI, caplog: pytest.LogCaptureFixture, version: str, cert: str | None, reason: str, health: HealthConfig
) -> None:
    """A tcp check passed here before on TLS 1.3: the loop's TLS transport took the handshake for the
    connection and closed it before the member's alert came."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    with own_member(pong, requiring(pki, version)) as member:
        config = make_config([member.address], upstream_tls=upstream_tls(pki, cert), health=health)
        logged, failures = await probed_down(config, caplog)
    assert logged == reason
    assert failures >= health.fall
    assert member.results and all(isinstance(r, ssl.SSLError) for r in member.results)  # it rejected each


@pytest.mark.parametrize("health", [TCP, PING], ids=["tcp", "send-expect"])
@pytest.mark.parametrize("version", VERSIONS)
async def test_with_the_right_client_certificate_the_same_member_is_up(
    pki: PKI, version: str, health: HealthConfig
) -> None:
    """The member records a connection when its script ends, which for a tcp check is when our
    close_notify arrives, after the probe has passed: wait for the member's own count, not ours."""
    with own_member(pong, requiring(pki, version)) as member:
        failed = await probed_up(make_config([member.address], upstream_tls=upstream_tls(pki, "client"), health=health))
        await eventually(lambda: len(member.results) >= PASSES)
        results = list(member.results)
    assert failed == 0
    expected = b"PING\r\n" if health is PING else b""
    assert len(results) >= PASSES and all(r == expected for r in results[:PASSES])


async def test_openssl_s_server_verify_marks_us_down_without_a_certificate_and_up_with_one(
    pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """``openssl s_server -Verify 1 -tls1_3``, the brief's reference server for a late rejection."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    with openssl_verify_server(pki) as member:
        logged, failures = await probed_down(make_config([member], upstream_tls=upstream_tls(pki, None), health=TCP),
                                             caplog)  # fmt: skip
        failed = await probed_up(make_config([member], upstream_tls=upstream_tls(pki, "client"), health=TCP))
    assert logged == "check failed: tls: TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert failures >= TCP.fall
    assert failed == 0


async def test_a_tls13_member_that_sends_no_tickets_passes_after_the_bounded_wait(pki: PKI) -> None:
    """Without session tickets nothing follows the handshake: the probe waits its bound
    (``tlsengine.confirm_wait``, at most 1 s, under the probe timeout) and passes."""
    ctx = requiring(pki, "1.3")
    ctx.num_tickets = 0
    with own_member(pong, ctx) as member:
        failed = await probed_up(make_config([member.address], upstream_tls=upstream_tls(pki, "client"), health=TCP))
    assert failed == 0


async def test_a_member_without_tickets_passes_when_the_verdict_wait_would_outlast_the_probe(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for a late verdict leaves the probe half of the time it has left: with the wait stretched
    to 5 s (as on a member far away, whose handshake takes over a third of the probe timeout) and a 1 s
    probe timeout, a healthy member that sends no tickets still passes every probe instead of timing out."""
    long_verdict_wait(monkeypatch)
    ctx = requiring(pki, "1.3")
    ctx.num_tickets = 0
    health = HealthConfig(enabled=True, interval=0.05, timeout=1.0, rise=1, fall=2)
    with own_member(pong, ctx) as member:
        failed = await probed_up(make_config([member.address], upstream_tls=upstream_tls(pki, "client"), health=health))
    assert failed == 0


HANG_UPS = [
    # (how the member hangs up, our certificate, the reason the probe fails with)
    (False, "client", f"check failed: tls: closed {LATE}"),
    (True, "client", f"check failed: tls: reset {LATE}"),
    (False, None, "check failed: error: reset"),  # no certificate of ours it could have refused
    (True, None, "check failed: error: reset"),
]


@pytest.mark.parametrize(
    ("reset", "cert", "reason"), HANG_UPS, ids=[f"{'rst' if r else 'fin'}-{c}" for r, c, _ in HANG_UPS]
)
async def test_a_tls13_member_that_hangs_up_after_the_handshake_fails_as_tls_after_our_certificate(
    pki: PKI,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    reset: bool,
    cert: str | None,
    reason: str,
) -> None:
    """A member that ends the connection after the TLS 1.3 handshake without an alert (one that refuses
    a certificate silently) fails the probe as ``tls``, saying what happened, when we sent one, and as a
    reset when we did not; either way it goes DOWN."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    long_verdict_wait(monkeypatch)
    health = HealthConfig(enabled=True, interval=0.05, timeout=PROBE_TIMEOUT, rise=1, fall=2)
    kind = Failure.TLS if cert else Failure.OTHER
    with own_member(hang_up(reset), silent(pki, client_ca=cert is not None)) as member:
        config = make_config([member.address], upstream_tls=upstream_tls(pki, cert), health=health)
        logged, failures = await probed_down(config, caplog, kind)
    assert logged == reason
    assert failures >= health.fall
    assert member.results and set(member.results) == {b""}  # each handshake passed: the hang-up came after


class HeaderThenTLS:
    """A member behind ``accept-proxy``: reads the PROXY header in the clear, then serves ``pong`` in TLS."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.headers: list[bytes] = []

    def __call__(self, end: End) -> bytes:
        header = b""
        while len(header) < len(V2_LOCAL) and (chunk := end.sock.recv(len(V2_LOCAL) - len(header))):
            header += chunk
        self.headers.append(header)
        with self.ctx.wrap_socket(end.sock, server_side=True) as tls:
            return pong(End(tls, tls))


def http_ok(end: End) -> bytes:
    """An HTTP side port (Patroni's API): 200 to any request."""
    request = end.sock.recv(4096)
    end.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    return request


@pytest.mark.parametrize("cert", [None, "client"], ids=["no_certificate", "client_certificate"])
async def test_send_proxy_probes_send_local_in_the_clear_then_tls_with_its_late_verdict(
    pki: PKI, caplog: pytest.LogCaptureFixture, cert: str | None
) -> None:
    """``--send-proxy v2`` with ``--upstream-tls``: the probe's ``LOCAL`` header goes before the
    handshake, and the TLS 1.3 rejection after it still fails the probe."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    script = HeaderThenTLS(requiring(pki, "1.3"))
    with own_member(script) as member:
        config = edge_config([member.address], upstream_tls=upstream_tls(pki, cert), health=PING, send_proxy="v2")
        if cert is None:
            logged, _ = await probed_down(config, caplog)
            assert logged == "check failed: tls: TLSV13_ALERT_CERTIFICATE_REQUIRED"
        else:
            assert await probed_up(config) == 0
    assert script.headers and set(script.headers) == {V2_LOCAL}


@pytest.mark.parametrize("cert", [None, "client"], ids=["no_certificate", "client_certificate"])
async def test_an_http_check_on_a_side_port_runs_in_tls_with_its_late_verdict(
    pki: PKI, caplog: pytest.LogCaptureFixture, cert: str | None
) -> None:
    """The http check's ``port`` speaks TLS as the member does, and rejects us the same way."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    with own_member(http_ok, requiring(pki, "1.3")) as side:
        health = HealthConfig(enabled=True, interval=0.05, timeout=PROBE_TIMEOUT, rise=1, fall=2, check="http",
                              port=side.address.port)  # fmt: skip
        config = make_config([refused_address(side.address.host)], upstream_tls=upstream_tls(pki, cert), health=health)
        if cert is None:
            logged, _ = await probed_down(config, caplog)
            assert logged == "check failed: tls: TLSV13_ALERT_CERTIFICATE_REQUIRED"
        else:
            assert await probed_up(config) == 0
            assert isinstance(side.results[0], bytes) and side.results[0].startswith(b"GET / HTTP/1.1\r\n")
