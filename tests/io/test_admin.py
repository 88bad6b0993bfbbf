"""The admin endpoint against a running Proxy: /metrics counts a known traffic pattern exactly (parsed
with prometheus_client's parser and checked by promtool), /readyz follows pools and drains, member
actions change routing, and errors are JSON naming what was not found."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from l4proxy import Address, HealthConfig, ServerTLSConfig
from l4proxy.admin import MAX_CONNECTIONS, AdminApp, AdminServer
from l4proxy.counters import TLS_REASONS
from l4proxy.proxy import Proxy
from l4proxy.sharedstats import LISTENER_FIELDS, SharedCounters
from l4proxy.snapshot import NotFound, ProxySource, Snapshot

from ..kit import blackhole, connect, eventually, make_config, open_session, refused_address, running, upstreams
from ..servers import require

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CHECK_KINDS = {"refused", "timeout", "wrong_role", "auth_failed", "bad_reply", "server_error", "tls", "other"}


async def http(port: int, method: str, target: str) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (h11 on the client side too); the status, headers and body."""
    reader, writer = await connect(port)
    conn = h11.Connection(h11.CLIENT)
    writer.write(conn.send(h11.Request(method=method, target=target, headers=[("Host", "admin")])))
    writer.write(conn.send(h11.EndOfMessage()))
    status, headers, body = 0, {}, b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await asyncio.wait_for(reader.read(65536), 5))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def get_json(port: int, method: str, target: str) -> tuple[int, Any]:
    status, headers, body = await http(port, method, target)
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)


async def scrape(port: int) -> tuple[str, Samples]:
    status, headers, body = await http(port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@contextlib.asynccontextmanager
async def admin_of(proxy: Proxy) -> AsyncIterator[int]:
    async with AdminServer(ProxySource(proxy), "127.0.0.1", 0) as admin:
        yield admin.port


async def exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload``, read its echo, close: one whole session."""
    reader, writer = await connect(port)
    writer.write(payload)
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    writer.close()
    await writer.wait_closed()
    return echoed


async def test_metrics_count_sessions_bytes_retries_and_refused_connects_exactly() -> None:
    refused = refused_address()
    async with upstreams(2) as (u0, u1):
        config = make_config([refused, u0.address, u1.address], retries=2, eject_after=3)
        async with running(config) as (proxy, access), admin_of(proxy) as admin:
            sizes = [1, 10, 100, 1000, 10_000, 100_000]
            for size in sizes:
                assert await exchange(proxy.port(), b"x" * size) == b"x" * size
            await access.wait_for(len(sizes))
            text, samples = await scrape(admin)
            _, snapshot = await get_json(admin, "GET", "/status")
            ejected_at = time.time()
    listener = {"listener": "default"}
    assert value(samples, "l4proxy_listener_accepted_total", **listener) == 6
    assert value(samples, "l4proxy_listener_sessions_total", **listener) == 6
    assert value(samples, "l4proxy_listener_sessions_active", **listener) == 0
    assert value(samples, "l4proxy_listener_bytes_in_total", **listener) == sum(sizes)
    assert value(samples, "l4proxy_listener_bytes_out_total", **listener) == sum(sizes)
    # the refused member is tried first on every other client (ties rotate) until eject_after=3 ejects it
    bad = {"pool": "default", "member": str(refused)}
    assert value(samples, "l4proxy_member_connect_failures_total", **bad, kind="refused") == 3
    assert value(samples, "l4proxy_member_connect_attempts_total", **bad) == 3
    assert value(samples, "l4proxy_member_sessions_total", **bad) == 0
    assert value(samples, "l4proxy_member_status", **bad, state="EJECTED") == 1
    assert value(samples, "l4proxy_member_status", **bad, state="DOWN") == 0
    assert value(samples, "l4proxy_member_status", **bad, state="UP") == 0
    assert value(samples, "l4proxy_member_state_changes_total", **bad) == 1  # ejected
    assert value(samples, "l4proxy_member_ejections_total", **bad) == 1
    pool_json = snapshot["pools"][0]
    assert (pool_json["ejections"], pool_json["ejected_members"], pool_json["eligible_members"]) == (1, 1, 2)
    bad_json = pool_json["members"][0]
    assert (bad_json["state"], bad_json["health"], bad_json["ejections"]) == ("EJECTED", "up", 1)
    assert bad_json["why"] == "ejected for 30s after 3 failures in a row: connect failed: refused"
    until = calendar.timegm(time.strptime(bad_json["ejected_until"], "%Y-%m-%dT%H:%M:%SZ"))
    assert ejected_at + 30 - 5 < until <= ejected_at + 30 + 1  # the stamp has whole seconds
    assert all(m["ejected_until"] is None for m in pool_json["members"][1:])
    assert value(samples, "l4proxy_pool_retries_total", pool="default") == 3
    assert value(samples, "l4proxy_pool_no_upstream_total", pool="default") == 0
    for good in (u0, u1):
        labels = {"pool": "default", "member": str(good.address)}
        assert value(samples, "l4proxy_member_sessions_total", **labels) == 3
        assert value(samples, "l4proxy_member_sessions_active", **labels) == 0
        assert value(samples, "l4proxy_member_status", **labels, state="UP") == 1
        assert value(samples, "l4proxy_member_state_changes_total", **labels) == 0
        for kind in ("refused", "timeout", "dns", "tls", "reset", "other"):
            assert value(samples, "l4proxy_member_connect_failures_total", **labels, kind=kind) == 0
    for direction in ("in", "out"):  # each session's bytes go to the member that served it
        name = f"l4proxy_member_bytes_{direction}_total"
        assert value(samples, name, **bad) == 0
        assert sum(value(samples, name, pool="default", member=str(m.address)) for m in (u0, u1)) == sum(sizes)
    assert value(samples, "l4proxy_pool_members_eligible", pool="default") == 2
    assert value(samples, "l4proxy_ready") == 1
    assert value(samples, "l4proxy_open_fds") > 0
    # one duration per session ended, one connect time per session a member served
    assert value(samples, "l4proxy_listener_session_duration_seconds_count", **listener) == 6
    assert value(samples, "l4proxy_listener_session_duration_seconds_bucket", **listener, le="+Inf") == 6
    assert value(samples, "l4proxy_member_connect_duration_seconds_count", **bad) == 0
    for good in (u0, u1):
        labels = {"pool": "default", "member": str(good.address)}
        assert value(samples, "l4proxy_member_connect_duration_seconds_count", **labels) == 3
        assert value(samples, "l4proxy_member_connect_duration_seconds_sum", **labels) > 0
    label_names = {name for _sample, labels in samples for name, _value in labels}
    expected = {"listener", "pool", "member", "kind", "state", "result", "version", "digest", "le"}
    assert label_names == expected  # no client
    await promtool_accepts(text)


async def promtool_accepts(text: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        require("promtool"),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 30)
    assert proc.returncode == 0, out.decode()
    assert out.decode().strip() == "", out.decode()  # not even a lint warning


async def test_timeouts_and_no_upstream_are_counted() -> None:
    with blackhole() as hole:
        config = make_config([hole], retries=1, connect_timeout=0.2)
        async with running(config) as (proxy, access), admin_of(proxy) as admin:
            reader, writer = await connect(proxy.port())
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed: no upstream
            writer.close()
            await access.wait_for(1)
            _, samples = await scrape(admin)
    labels = {"pool": "default", "member": str(hole)}
    assert value(samples, "l4proxy_member_connect_failures_total", **labels, kind="timeout") == 2
    assert value(samples, "l4proxy_member_connect_attempts_total", **labels) == 2
    assert value(samples, "l4proxy_member_sessions_total", **labels) == 0
    assert value(samples, "l4proxy_pool_retries_total", pool="default") == 1
    assert value(samples, "l4proxy_pool_no_upstream_total", pool="default") == 1


async def test_failed_checks_are_counted_by_kind() -> None:
    refused = refused_address()
    async with upstreams(1) as (u0,):
        config = make_config([refused, u0.address], health=HealthConfig(interval=0.05, timeout=0.5))
        async with running(config) as (proxy, _access), admin_of(proxy) as admin:
            bad, good = proxy.pools["default"].members
            await eventually(lambda: bad.stats.checks_failed >= 3 and good.stats.checks_passed >= 3)
            _, samples = await scrape(admin)
            code, snapshot = await get_json(admin, "GET", "/status")
    assert code == 200
    failed = value(samples, "l4proxy_member_checks_total", pool="default", member=str(refused), result="failed")
    kinds = {
        dict(labels)["kind"]: n
        for (name, labels), n in samples.items()
        if name == "l4proxy_member_check_failures_total" and dict(labels)["member"] == str(refused)
    }
    assert failed >= 3 and kinds == {**dict.fromkeys(kinds, 0), "refused": failed}
    assert set(kinds) == CHECK_KINDS
    assert value(samples, "l4proxy_member_status", pool="default", member=str(refused), state="DOWN") == 1
    assert value(samples, "l4proxy_member_check_duration_seconds", pool="default", member=str(u0.address)) > 0
    bad_json, good_json = snapshot["pools"][0]["members"]
    assert (bad_json["state"], bad_json["why"]) == ("DOWN", "check failed: refused")
    assert bad_json["last_check"]["result"] == "check failed: refused" and bad_json["last_check"]["ok"] is False
    assert good_json["last_check"]["ok"] is True and good_json["last_check"]["latency_ms"] > 0


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> ServerTLSConfig:
    tmp: Path = tmp_path_factory.mktemp("admin-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "server.pem"))
    return ServerTLSConfig(cert=str(tmp / "server.pem"), key=str(tmp / "server.key"), handshake_timeout=0.3)


async def test_tls_handshake_failures_are_counted_by_reason(tls_files: ServerTLSConfig) -> None:
    async with upstreams(1) as (u0,):
        config = make_config([u0.address], tls=tls_files)
        async with running(config) as (proxy, _access), admin_of(proxy) as admin:
            for _ in range(2):  # plaintext to a TLS port
                reader, writer = await connect(proxy.port())
                writer.write(b"GET / HTTP/1.0\r\n\r\n")
                assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
            silent = await connect(proxy.port())  # says nothing: the handshake timeout closes it
            assert await asyncio.wait_for(silent[0].read(), 5) == b""
            silent[1].close()
            await eventually(lambda: sum(proxy.frontends[0].counters.tls_failures.values()) == 3)
            _, samples = await scrape(admin)
    listener = "default"
    failures = {dict(labels)["reason"]: n for (name, labels), n in samples.items() if "tls_failures" in name}
    assert failures == {**dict.fromkeys(TLS_REASONS, 0), "http_request": 2, "timeout": 1}  # the fixed table
    assert value(samples, "l4proxy_listener_tls_handshakes_total", listener=listener) == 0
    assert value(samples, "l4proxy_listener_accepted_total", listener=listener) == 3
    assert value(samples, "l4proxy_listener_sessions_total", listener=listener) == 0


async def test_drain_disable_and_enable_change_routing_and_readiness() -> None:
    health = HealthConfig(interval=0.05, timeout=0.5)
    async with upstreams(2) as (u0, u1):
        config = make_config([u0.address, u1.address], health=health, retries=0)
        async with running(config) as (proxy, _access), admin_of(proxy) as admin:
            reader, writer, first = await open_session(proxy)
            other = next(m for m in proxy.pools["default"].members if m is not first)
            status, body = await get_json(admin, "POST", f"/members/default/{first.key}/drain")
            assert status == 200 and body["member"]["state"] == "DRAIN"
            clients = [await connect(proxy.port()) for _ in range(4)]
            for r, w in clients:
                w.write(b"ping")
                assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
            assert (first.active, other.active) == (1, 4)  # no new session on the drained member
            writer.write(b"still")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"  # its session goes on
            checks = first.stats.checks_passed
            await eventually(lambda: first.stats.checks_passed >= checks + 2)  # a drained member is still probed
            assert (await http(admin, "GET", "/readyz"))[0] == 200

            status, body = await get_json(admin, "POST", f"/members/default/{other.key}/disable")
            assert status == 200 and body["member"]["state"] == "MAINT"
            code, _, text = await http(admin, "GET", "/readyz")
            assert (code, text) == (503, b"not ready: no eligible member in pool default\n")
            refused_client = await connect(proxy.port())
            assert await asyncio.wait_for(refused_client[0].read(), 5) == b""  # nobody to serve it
            refused_client[1].close()
            stopped = other.stats.checks_passed + other.stats.checks_failed
            clock = first.stats.checks_passed
            await eventually(lambda: first.stats.checks_passed >= clock + 4)  # four intervals go by
            assert other.stats.checks_passed + other.stats.checks_failed <= stopped + 1  # at most one in flight

            for member in (first, other):
                status, body = await get_json(admin, "POST", f"/members/default/{member.key}/enable")
                assert status == 200 and body["member"]["state"] == "UP"
            assert (await http(admin, "GET", "/readyz"))[0] == 200
            more = [await connect(proxy.port()) for _ in range(3)]
            for r, w in more:
                w.write(b"ping")
                assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
            assert (first.active, other.active) == (4, 4)  # least-connections evens them out again
            status, snapshot = await get_json(admin, "GET", "/status")
            states = {m["name"]: (m["state"], m["why"]) for m in snapshot["pools"][0]["members"]}
            enabled = ("UP", "enabled by the operator")
            assert states == {first.key: enabled, other.key: enabled}
            assert snapshot["totals"]["active_sessions"] == 8
            for _r, w in [*clients, *more, (reader, writer)]:
                w.close()


async def test_readiness_turns_503_as_soon_as_a_drain_starts() -> None:
    async with upstreams(1) as (u0,):
        config = make_config([u0.address])
        async with running(config) as (proxy, _access), admin_of(proxy) as admin:
            assert (await http(admin, "GET", "/readyz"))[::2] == (200, b"ready\n")
            _reader, writer, _member = await open_session(proxy)
            drain = asyncio.create_task(proxy.drain(timeout=10))
            await eventually(lambda: proxy.draining)
            code, _, text = await http(admin, "GET", "/readyz")
            assert (code, text) == (503, b"not ready: draining\n")
            assert len(proxy.sessions) == 1  # the session is still open: readiness went first
            assert (await http(admin, "GET", "/healthz"))[:1] == (200,)
            writer.close()
            await asyncio.wait_for(drain, 5)


class _Fixed:
    """A Source with no pools, for the route table."""

    def snapshot(self) -> Snapshot:
        return Snapshot((), (), 0.0, 1.0, False)

    def set_admin(self, pool: str, member: str, action: str) -> Any:
        raise NotFound(f"no pool {pool!r}; known: ")


@pytest.mark.parametrize(
    ("method", "target", "status", "error"),
    [
        ("GET", "/nope", 404, "no such path '/nope'; try /metrics, /healthz, /readyz, /status or /members/..."),
        ("POST", "/metrics", 405, "/metrics takes GET, not POST"),
        ("GET", "/members/default/a:1/drain", 405, "/members/default/a:1/drain takes POST, not GET"),
        ("POST", "/members/default/a:1/reboot", 404, "no action 'reboot'; expected drain, enable or disable"),
        ("POST", "/members/default/drain", 404, "no such path '/members/default/drain';"
         " expected /members/POOL/MEMBER/drain|enable|disable"),
        ("POST", "/members/nopool/a:1/drain", 404, "no pool 'nopool'; known: "),
    ],
)  # fmt: skip
def test_routes_answer_mistakes_with_json(method: str, target: str, status: int, error: str) -> None:
    reply = AdminApp(_Fixed()).handle(method, target)
    assert (reply.status, reply.content_type) == (status, "application/json")
    assert json.loads(reply.body) == {"error": error}


async def test_unknown_members_are_404s_naming_them_and_bad_requests_400() -> None:
    async with upstreams(1) as (u0,):
        config = make_config([u0.address])
        async with running(config) as (proxy, _access), admin_of(proxy) as admin:
            status, body = await get_json(admin, "POST", "/members/default/10.9.9.9:1/disable")
            assert (status, body) == (404, {"error": f"no member '10.9.9.9:1' in pool 'default'; known: {u0.address}"})
            status, body = await get_json(admin, "POST", f"/members/other/{u0.address}/disable")
            assert (status, body) == (404, {"error": "no pool 'other'; known: default"})
            reader, writer = await connect(admin)
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            reply = await asyncio.wait_for(reader.read(), 5)
            assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            writer.close()
            assert proxy.pools["default"].members[0].admin == ""


async def test_ipv6_members_can_be_named_url_encoded() -> None:
    async with upstreams(1, host="::1") as (u0,):
        config = make_config([u0.address], listen=Address("::1", 0))
        async with running(config) as (proxy, _access), admin_of(proxy) as admin:
            target = f"/members/default/%5B::1%5D:{u0.port}/drain"
            status, body = await get_json(admin, "POST", target)
            assert (status, body["member"]["name"], body["member"]["state"]) == (200, f"[::1]:{u0.port}", "DRAIN")


def test_a_dead_workers_totals_are_kept_and_its_gauges_dropped() -> None:
    config = make_config([Address("127.0.0.1", 1)])
    shared = SharedCounters(config, workers=2, capacity=4)
    listener, slot = shared.listener(0), shared.slot(3)
    for worker, (sessions, active, attempts) in enumerate([(5, 2, 7), (3, 1, 4)]):
        row = worker * shared.row
        shared.cells[row + listener + LISTENER_FIELDS.index("sessions")] = sessions
        shared.cells[row + listener + LISTENER_FIELDS.index("active")] = active
        shared.cells[row + slot] = attempts
    width = len(LISTENER_FIELDS)
    assert shared.total(listener, width)[1:3] == [8, 3] and shared.total(slot, 1) == [11]
    shared.retire(0)
    assert shared.total(listener, width)[1:3] == [8, 1]  # sessions kept, its active sessions are gone
    assert shared.total(slot, 1) == [11]
    assert all(shared.cells[offset] == 0 for offset in range(shared.row))  # a fresh row for the replacement


async def test_admin_clients_beyond_the_limit_are_closed_and_the_rest_served() -> None:
    async with upstreams(1) as (u0,), running(make_config([u0.address])) as (proxy, _access), AdminServer(
        ProxySource(proxy), "127.0.0.1", 0
    ) as server:
        idle = [await connect(server.port) for _ in range(MAX_CONNECTIONS)]
        await eventually(lambda: len(server.connections) == MAX_CONNECTIONS)
        reader, writer = await connect(server.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # one too many: closed at once
        writer.close()
        idle.pop()[1].close()
        await eventually(lambda: len(server.connections) == MAX_CONNECTIONS - 1)
        assert (await http(server.port, "GET", "/healthz"))[0] == 200
        for _r, w in idle:
            w.close()
