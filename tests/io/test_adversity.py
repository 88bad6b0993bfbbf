"""Failure cases from ``docs/reliability.md`` that the older tests did not cover, or covered on IPv4
only, built on the fault kit (``tests/faults.py``): the proxy dials a FaultLink in front of an echo
upstream, and the link misbehaves on demand. Each test names its case."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from l4proxy import Address, HealthConfig, UpstreamTLSConfig

from ..faults import Fault, FaultLink
from ..kit import ENGINES, connect, echo, eventually, make_config, read_until_closed, roundtrip, running, upstreams
from ..servers import Command

HOSTS = ["127.0.0.1", "::1"]


@pytest.mark.parametrize("relay", ENGINES)
@pytest.mark.parametrize("host", HOSTS)
async def test_client_half_close_on_both_families(host: str, relay: str) -> None:
    """Case 1: the client's FIN goes upstream (through a link that delays each chunk) and the reply
    still flows back until the upstream closes."""
    payload = os.urandom(100_000)
    async with upstreams(1, host=host) as [server], FaultLink(server.address, Fault(delay=0.001)) as link, running(
        make_config([link.address], Address(host, 0), relay=relay)
    ) as (proxy, log):
        assert await roundtrip(proxy.port(), payload, host=host) == payload
        await log.wait_for(1)
    assert (log.sessions[0].bytes_in, log.sessions[0].bytes_out, log.sessions[0].end_cause) == (
        len(payload), len(payload), "eof")


@pytest.mark.parametrize("host", HOSTS)
async def test_upstream_half_close_on_both_families(host: str) -> None:
    """Case 2: the upstream speaks first and half-closes (the link greets, then its target, a server
    that closes at once, ends the direction); the client still sends and gets its bytes upstream."""
    received = bytearray()

    async def greet_then_collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        writer.write_eof()
        received.extend(await reader.read())

    async with upstreams(1, greet_then_collect, host=host) as [server], running(
        make_config([server.address], Address(host, 0))
    ) as (proxy, log):
        reader, writer = await connect(proxy.port(), host)
        assert await asyncio.wait_for(reader.read(), 5) == b"hello"  # the upstream's FIN reached us
        writer.write(b"still talking")
        writer.write_eof()
        await log.wait_for(1)
        writer.close()
    assert bytes(received) == b"still talking"
    assert log.sessions[0].end_cause == "eof"


@pytest.mark.parametrize("relay", ENGINES)
@pytest.mark.parametrize("host", HOSTS)
async def test_upstream_cut_with_fin_delivers_every_byte_first(host: str, relay: str) -> None:
    """Case 5: the upstream side ends with a FIN after 300,000 bytes; all of them reach the client."""
    payload = os.urandom(1_000_000)
    fault = Fault(cut_after=300_000, cut_with="fin")
    async with upstreams(1, host=host) as [server], FaultLink(server.address, fault) as link, running(
        make_config([link.address], Address(host, 0), relay=relay)
    ) as (proxy, log):
        reader, writer = await connect(proxy.port(), host)
        writer.write(payload)
        got = await read_until_closed(reader)
        writer.close()
        await log.wait_for(1)
    assert got == payload[:300_000]
    assert log.sessions[0].bytes_out == 300_000


@pytest.mark.parametrize("relay", ENGINES)
@pytest.mark.parametrize("host", HOSTS)
async def test_upstream_rst_mid_stream_tears_the_client_down(host: str, relay: str) -> None:
    """Case 6: an RST from the upstream side mid-stream closes the client promptly, frees the member's
    slot and is logged as a reset."""
    fault = Fault(cut_after=50_000, cut_with="rst")
    async with upstreams(1, host=host) as [server], FaultLink(server.address, fault) as link, running(
        make_config([link.address], Address(host, 0), relay=relay)
    ) as (proxy, log):
        reader, writer = await connect(proxy.port(), host)
        writer.write(os.urandom(200_000))
        started = time.monotonic()
        got = await read_until_closed(reader)
        assert time.monotonic() - started < 2.0
        writer.close()
        await log.wait_for(1)
        await eventually(lambda: server.active == 0)
    assert len(got) <= 50_000
    assert log.sessions[0].end_cause == "upstream_reset"
    assert proxy.pools["default"].members[0].active == 0


@pytest.mark.parametrize("host", HOSTS)
async def test_blackholed_member_on_both_families_times_out_then_the_next_serves(host: str) -> None:
    """Case 13: a member whose SYNs go unanswered (a listener whose accept queue is full) costs one
    connect timeout, then the next member serves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as full:
        full.bind((host, 0))
        full.listen(0)
        fillers = [socket.socket(family, socket.SOCK_STREAM) for _ in range(4)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(full.getsockname()[:2])
            silent = Address(host, full.getsockname()[1])
            async with upstreams(1, host=host) as [good], running(
                make_config([silent, good.address], Address(host, 0), retries=1, connect_timeout=0.3)
            ) as (proxy, log):
                started = time.monotonic()
                assert await roundtrip(proxy.port(), b"through", host=host) == b"through"
                elapsed = time.monotonic() - started
                await log.wait_for(1)
        finally:
            for filler in fillers:
                filler.close()
    assert 0.25 <= elapsed < 3.0
    assert log.sessions[0].member == proxy.pools["default"].members[1]


async def test_member_that_accepts_and_never_answers_is_reaped_at_the_idle_timeout() -> None:
    """Case 23 with a blackhole after accept: the connect succeeds, nothing ever comes back; the idle
    timeout closes both sides instead of holding the client forever."""
    async with upstreams(1) as [server], FaultLink(server.address, Fault(blackhole=True)) as link, running(
        make_config([link.address], idle_timeout=0.3)
    ) as (proxy, log):
        reader, writer = await connect(proxy.port())
        writer.write(b"anyone?")
        started = time.monotonic()
        assert await read_until_closed(reader) == b""
        assert time.monotonic() - started < 3.0
        await log.wait_for(1)
        await eventually(lambda: link.active == 0 or link.relayed["up"] == 0)
        writer.close()
    assert log.sessions[0].end_cause == "idle_timeout"


@pytest.mark.parametrize("relay", ENGINES)
async def test_stalls_and_dribbles_never_change_a_byte(relay: str) -> None:
    """Case 10 under faults: sessions through stalling, dribbling and delaying links, several at once,
    random chunk sizes; every echo hashes equal and every count is exact."""
    rng = random.Random(18)
    faults = [Fault(stall=0.05, direction="both"), Fault(dribble=True, direction="up"), Fault(delay=0.002),
              Fault(greeting=b"")]
    async with upstreams(1) as [server]:
        links = [await FaultLink(server.address, fault).start() for fault in faults]
        try:
            async with running(make_config([link.address for link in links], relay=relay)) as (proxy, log):

                async def session(size: int) -> bool:
                    payload = rng.randbytes(size)
                    reader, writer = await connect(proxy.port())
                    for i in range(0, size, step := rng.randint(1, 4096)):
                        writer.write(payload[i : i + step])
                    writer.write_eof()
                    echoed = await asyncio.wait_for(reader.read(), 20)
                    writer.close()
                    return hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()

                sizes = [rng.choice((1, 100, 2000, 60_000)) for _ in range(16)]
                assert all(await asyncio.gather(*(session(size) for size in sizes)))
                await log.wait_for(len(sizes))
        finally:
            for link in links:
                await link.stop()
    assert sorted(s.bytes_in for s in log.sessions) == sorted(sizes)
    assert sorted(s.bytes_out for s in log.sessions) == sorted(sizes)
    assert {s.end_cause for s in log.sessions} == {"eof"}


@pytest.mark.parametrize("host", HOSTS)
async def test_tls_probe_failures_are_told_apart_from_refused_and_timeout(
    host: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Case 20, the TLS kind: with TLS origination, a member whose certificate is not trusted and a
    member that does not speak TLS at all go DOWN with a ``tls:`` reason; the trusted one stays UP."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    def serving(authority: trustme.CA) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert(host).configure_cert(ctx)
        return ctx

    async def tls_echo(ctx: ssl.SSLContext) -> asyncio.Server:
        return await asyncio.start_server(echo, host, 0, ssl=ctx)

    good, untrusted = await tls_echo(serving(ca)), await tls_echo(serving(other))
    try:
        async with upstreams(1, host=host) as [plain]:
            members = [Address(host, s.sockets[0].getsockname()[1]) for s in (good, untrusted)] + [plain.address]
            probes = HealthConfig(enabled=True, interval=0.05, timeout=0.5, rise=1, fall=1)
            config = make_config(members, Address(host, 0), health=probes,
                                 upstream_tls=UpstreamTLSConfig(ca=str(tmp_path / "ca.pem")))
            async with running(config) as (proxy, _):
                pool = proxy.pools["default"]
                await eventually(lambda: [m.health.status.name for m in pool.members] == ["UP", "DOWN", "DOWN"])
    finally:
        for server in (good, untrusted):
            server.close()
            await server.wait_closed()
    reasons = {}
    for record in caplog.records:
        if record.name == "l4proxy.health" and " is DOWN: " in record.getMessage():
            assert isinstance(record.args, tuple)
            reasons[str(record.args[1])] = str(record.args[2])
    assert set(reasons) == {str(members[1]), str(members[2])}
    assert reasons[str(members[1])] == "check failed: tls: unable to get local issuer certificate"
    assert reasons[str(members[2])].startswith("check failed: tls: ")  # an echo of our ClientHello


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighup_under_live_tls_traffic_loses_no_connection_and_no_byte(tmp_path: Path, workers: str) -> None:
    """Case 35 for the reload that exists (SIGHUP re-reads certificates; there is no config file yet):
    TLS clients connecting in a loop through five SIGHUPs, with one and with two workers, are never
    refused and get every byte back."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    tls = ("--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"))
    async with (
        upstreams(1) as [server],
        Command("--upstream", str(server.address), *tls, "--workers", workers, "--access-log", "off",
                listeners=int(workers)) as proxy,
    ):
        done = 0
        for _ in range(5):
            proxy.signal(signal.SIGHUP)
            for _ in range(10):
                payload = os.urandom(random.randint(1, 50_000))
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=client_ctx,
                                                               server_hostname="localhost")
                writer.write(payload)
                assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
                writer.close()
                done += 1
        assert await proxy.stopped(15) == 0  # the loop runs on: the last session ends when the upstream answers
    assert done == 50
    assert "TLS certificates and keys reloaded" in proxy.stderr and "Traceback" not in proxy.stderr
