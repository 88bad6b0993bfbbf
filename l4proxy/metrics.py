"""``GET /metrics``: the Prometheus text format, made by ``prometheus_client`` from a ``Snapshot``.

A custom collector reads the counters at scrape time (``snapshot.Source``), so the data path only
bumps plain ints and pays nothing for metrics between scrapes. The registry is our own, not the
library's global one, so nothing else ends up in the output. Labels: ``listener`` and ``pool`` (names:
"default" from flags, table keys in a config file), ``member`` (its configured host:port) and a few
bounded ones (``kind``, ``reason``, ``state``, ``result``); never a client's address. README's
"Monitoring" section lists every family.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from .counters import CONNECT_KINDS
from .histogram import Buckets
from .snapshot import STATES, Snapshot, Source

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
L, P, M = ["listener"], ["pool"], ["pool", "member"]


class ProxyCollector:
    """A prometheus_client collector over a ``Source``: every scrape reads a fresh Snapshot."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snap = self.source.snapshot()
        yield from _process(snap)
        yield from _listeners(snap)
        yield from _pools(snap)
        yield from _members(snap)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _observed(family: HistogramMetricFamily, labels: list[str], buckets: Buckets) -> None:
    cumulative = [(floatToGoString(le), count) for le, count in buckets.cumulative()]
    family.add_metric(labels, cumulative, buckets.sum)


def _process(snap: Snapshot) -> Iterator[Metric]:
    info = InfoMetricFamily("l4proxy_build", "The running version.")
    info.add_metric([], {"version": snap.version})
    yield info
    yield GaugeMetricFamily("l4proxy_start_time_seconds", "When the proxy started (Unix time).", snap.started_at)
    yield GaugeMetricFamily("l4proxy_uptime_seconds", "Seconds since the proxy started.", snap.now - snap.started_at)
    yield GaugeMetricFamily("l4proxy_open_fds", "Descriptors this process has open.", open_descriptors())
    yield GaugeMetricFamily("l4proxy_workers", "Worker processes configured.", snap.workers)
    yield GaugeMetricFamily("l4proxy_workers_alive", "Worker processes running now.", snap.workers_alive)
    reloads = _counter("l4proxy_reloads", "Reloads (SIGHUP), by result.", ["result"])
    reloads.add_metric(["ok"], snap.reloads)
    reloads.add_metric(["failed"], snap.reloads_failed)
    yield reloads
    digest = InfoMetricFamily("l4proxy_config", "The digest of the configuration in force.")
    digest.add_metric([], {"digest": snap.config_digest})
    yield digest
    yield GaugeMetricFamily("l4proxy_draining", "1 once a drain has started.", int(snap.draining))
    yield GaugeMetricFamily("l4proxy_ready", "1 while /readyz answers 200.", int(snap.ready))


def _listeners(snap: Snapshot) -> Iterator[Metric]:
    accepted = _counter("l4proxy_listener_accepted", "Client connections accepted.", L)
    sessions = _counter("l4proxy_listener_sessions", "Sessions begun (TLS: handshake done).", L)
    active = _gauge("l4proxy_listener_sessions_active", "Sessions open now.", L)
    bytes_in = _counter("l4proxy_listener_bytes_in", "Bytes read from clients (open sessions' included).", L)
    bytes_out = _counter("l4proxy_listener_bytes_out", "Bytes read from upstreams (open sessions' included).", L)
    durations = _histogram(
        "l4proxy_listener_session_duration_seconds", "Sessions that ended, by their time from accept to end.", L
    )
    handshakes = _counter("l4proxy_listener_tls_handshakes", "Client TLS handshakes completed.", L)
    tls = _counter("l4proxy_listener_tls_failures", "Client TLS handshakes that failed, by reason.", [*L, "reason"])
    refused = _counter("l4proxy_listener_refused", "Clients closed at accept by the rules or limits.", [*L, "reason"])
    headers = _counter(
        "l4proxy_listener_proxy_header_errors", "Clients closed for their PROXY header, by reason.", [*L, "reason"]
    )
    pauses = _counter("l4proxy_listener_accept_pauses", "Times accepting paused for want of descriptors.", L)
    for x in snap.listeners:
        accepted.add_metric([x.name], x.accepted)
        sessions.add_metric([x.name], x.sessions)
        active.add_metric([x.name], x.active)
        bytes_in.add_metric([x.name], x.bytes_in)
        bytes_out.add_metric([x.name], x.bytes_out)
        pauses.add_metric([x.name], x.accept_pauses)
        _observed(durations, [x.name], x.durations)
        if x.tls:
            handshakes.add_metric([x.name], x.sessions)  # a TLS listener's session begins with its handshake
        for family, table in ((tls, x.tls_failures), (refused, x.refused), (headers, x.header_errors)):
            for reason, count in table.items():
                family.add_metric([x.name, reason], count)
    yield from (accepted, sessions, active, bytes_in, bytes_out, handshakes, tls, refused, headers, pauses, durations)


def _pools(snap: Snapshot) -> Iterator[Metric]:
    retries = _counter("l4proxy_pool_retries", "Connect attempts after a client's first.", P)
    none = _counter("l4proxy_pool_no_upstream", "Clients closed because no member could be reached.", P)
    eligible = _gauge("l4proxy_pool_members_eligible", "Members that can take new sessions.", P)
    waiting = _gauge("l4proxy_pool_queue_waiting", "Clients waiting for a member below its max_conns or a primary.", P)
    refused = _counter("l4proxy_pool_queue_refused", "Clients closed by the queue, by kind.", [*P, "kind"])
    served = _counter("l4proxy_pool_queue_served", "Clients that got a member after waiting in the queue.", P)
    waited = _counter("l4proxy_pool_queue_wait_seconds", "Time the served clients waited in the queue.", P)
    for pool in snap.pools:
        retries.add_metric([pool.name], pool.retries)
        none.add_metric([pool.name], pool.no_upstream)
        eligible.add_metric([pool.name], pool.eligible)
        queue = pool.queue
        waiting.add_metric([pool.name], queue.waiting)
        refused.add_metric([pool.name, "full"], queue.full)
        refused.add_metric([pool.name, "timeout"], queue.timeouts)
        refused.add_metric([pool.name, "no_primary"], queue.no_primary)
        served.add_metric([pool.name], queue.served)
        waited.add_metric([pool.name], queue.waited_ms / 1000)
    yield from (retries, none, eligible, waiting, refused, served, waited)


def _members(snap: Snapshot) -> Iterator[Metric]:
    active = _gauge("l4proxy_member_sessions_active", "Sessions on the member now (dials included).", M)
    sessions = _counter("l4proxy_member_sessions", "Sessions whose upstream connect to the member succeeded.", M)
    attempts = _counter("l4proxy_member_connect_attempts", "Upstream connect attempts.", M)
    bytes_in = _counter("l4proxy_member_bytes_in", "Bytes from clients to the member (open sessions' included).", M)
    bytes_out = _counter("l4proxy_member_bytes_out", "Bytes from the member to clients (open sessions' included).", M)
    connects = _histogram(
        "l4proxy_member_connect_duration_seconds", "Connects that made sessions, by their time to connected.", M
    )
    failures = _counter("l4proxy_member_connect_failures", "Failed upstream connects, by kind.", [*M, "kind"])
    state = _gauge(
        "l4proxy_member_status", "1 for the member's current state (UP, DOWN, DRAIN, MAINT, EJECTED).", [*M, "state"]
    )
    checks = _counter("l4proxy_member_checks", "Health probe results.", [*M, "result"])
    check_failures = _counter("l4proxy_member_check_failures", "Failed health probes, by kind.", [*M, "kind"])
    latency = _gauge("l4proxy_member_check_duration_seconds", "How long the last health probe took.", M)
    changes = _counter("l4proxy_member_state_changes", "Changes of health or operator state.", M)
    ejections = _counter("l4proxy_member_ejections", "Times failed client connects ejected it (outlier ejection).", M)
    for pool in snap.pools:
        for m in pool.members:
            labels = [pool.name, m.name]
            active.add_metric(labels, m.active)
            sessions.add_metric(labels, m.sessions)
            attempts.add_metric(labels, m.attempts)
            bytes_in.add_metric(labels, m.bytes_in)
            bytes_out.add_metric(labels, m.bytes_out)
            _observed(connects, labels, m.connects)
            for kind in CONNECT_KINDS:
                failures.add_metric([*labels, kind], m.connect_failures.get(kind, 0))
            for name in STATES:
                state.add_metric([*labels, name], int(m.state == name))
            checks.add_metric([*labels, "passed"], m.checks_passed)
            checks.add_metric([*labels, "failed"], m.checks_failed)
            for kind, count in m.check_failures.items():
                check_failures.add_metric([*labels, kind], count)
            latency.add_metric(labels, m.last_check_seconds)
            changes.add_metric(labels, m.state_changes)
            ejections.add_metric(labels, m.ejections)
    yield from (active, sessions, attempts, bytes_in, bytes_out, failures, state, checks, check_failures, latency)
    yield from (changes, ejections, connects)


def registry(source: Source) -> CollectorRegistry:
    """A registry holding only the proxy's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ProxyCollector(source))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)


def open_descriptors() -> int:
    """Entries of ``/proc/self/fd``, less the one the listing uses; -1 where there is no ``/proc``."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        return -1
