"""The session-duration and connect histograms and the bytes of open sessions on ``/metrics``, against
a running Proxy with real loopback members; parsed with prometheus_client's parser and checked by
promtool."""

from __future__ import annotations

import asyncio
import json
import time

from l4proxy.histogram import CONNECT_BOUNDS, DURATION_BOUNDS

from ..kit import blackhole, connect, eventually, make_config, open_session, running, upstreams
from .test_admin import Samples, admin_of, get_json, promtool_accepts, scrape, value

DURATIONS = "l4proxy_listener_session_duration_seconds"
CONNECTS = "l4proxy_member_connect_duration_seconds"


def buckets(samples: Samples, name: str, **labels: str) -> dict[float, float]:
    """The histogram's cumulative buckets, ``le`` (a float, inf for +Inf) to count."""
    found = {}
    for (sample, pairs), count in samples.items():
        tags = dict(pairs)
        le = tags.pop("le", None)
        if sample == f"{name}_bucket" and tags == labels and le is not None:
            found[float(le)] = count
    return found


async def echo_timed(port: int, payload: bytes) -> tuple[asyncio.StreamWriter, float]:
    """A client that has its payload echoed; the seconds from its connect to the echo."""
    began = time.monotonic()
    reader, writer = await connect(port)
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    return writer, time.monotonic() - began


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def test_three_sessions_held_a_measured_time_are_counted_in_the_buckets_of_their_durations() -> None:
    hold = 0.15
    async with (
        upstreams(1) as (u0,),
        running(make_config([u0.address]), fmt="json") as (proxy, access),
        admin_of(proxy) as admin,
    ):
        began = time.monotonic()
        clients = [(await echo_timed(proxy.port(), b"x"))[0] for _ in range(3)]
        await asyncio.sleep(hold)  # the pattern itself: every session stays open at least this long
        for writer in clients:
            await close(writer)
        await access.wait_for(3)
        longest = time.monotonic() - began  # no session lasted longer than the whole exchange
        text, samples = await scrape(admin)
    listener = {"listener": "default"}
    found = buckets(samples, DURATIONS, **listener)
    assert set(found) == {*DURATION_BOUNDS, float("inf")}
    for bound, count in found.items():
        if bound < hold:
            assert count == 0, bound
        elif bound >= longest:
            assert count == 3, bound
    assert value(samples, f"{DURATIONS}_count", **listener) == 3
    assert 3 * hold <= value(samples, f"{DURATIONS}_sum", **listener) <= 3 * longest
    assert all(hold <= json.loads(line)["duration"] <= longest for line in access.lines)  # the same numbers
    await promtool_accepts(text)


async def test_connects_are_timed_per_attempt_on_the_member_that_took_them() -> None:
    """Sessions whose first attempt went to a blackhole wait its connect timeout, then connect to the
    good member: the access log's connect time (from the dial's start) shows the wait, the member's
    histogram only its own connect."""
    timeout = 0.2
    with blackhole() as hole:
        async with upstreams(1) as (u0,):
            config = make_config([hole, u0.address], retries=1, connect_timeout=timeout)
            async with running(config, fmt="json") as (proxy, access), admin_of(proxy) as admin:
                times = []
                for _ in range(4):
                    writer, took = await echo_timed(proxy.port(), b"ping")
                    times.append(took)
                    await close(writer)
                await access.wait_for(4)
                text, samples = await scrape(admin)
    records = [json.loads(line) for line in access.lines]  # in the clients' order: one after another
    retried = [r for r in records if r["retries"] == 1]
    assert retried and all(r["connect_time"] >= timeout for r in retried)
    good, bad = {"pool": "default", "member": str(u0.address)}, {"pool": "default", "member": str(hole)}
    assert value(samples, "l4proxy_pool_retries_total", pool="default") == len(retried)
    assert value(samples, f"{CONNECTS}_count", **good) == value(samples, "l4proxy_member_sessions_total", **good) == 4
    assert value(samples, f"{CONNECTS}_count", **bad) == 0 and value(samples, f"{CONNECTS}_sum", **bad) == 0
    # each connect to the good member is inside its client's round trip, less the blackhole's timeout
    # when the first attempt went there
    own = [took - timeout * record["retries"] for took, record in zip(times, records, strict=True)]
    found = buckets(samples, CONNECTS, **good)
    assert set(found) == {*CONNECT_BOUNDS, float("inf")}
    assert all(found[bound] == 4 for bound in found if bound >= max(own)), (found, own)
    assert 0 < value(samples, f"{CONNECTS}_sum", **good) <= sum(own)
    await promtool_accepts(text)


async def test_bytes_of_open_sessions_are_counted_and_stay_when_they_end() -> None:
    async with upstreams(1) as (u0,), running(make_config([u0.address])) as (proxy, access), admin_of(proxy) as admin:
        reader, writer, _member = await open_session(proxy, b"x" * 1000)
        listener, member = {"listener": "default"}, {"pool": "default", "member": str(u0.address)}
        _, samples = await scrape(admin)
        for direction in ("in", "out"):
            assert value(samples, f"l4proxy_listener_bytes_{direction}_total", **listener) == 1000
            assert value(samples, f"l4proxy_member_bytes_{direction}_total", **member) == 1000
        assert value(samples, f"{DURATIONS}_count", **listener) == 0  # not ended yet
        writer.write(b"y" * 500)
        assert await asyncio.wait_for(reader.readexactly(500), 5) == b"y" * 500
        code, status = await get_json(admin, "GET", "/status")
        assert code == 200 and (status["totals"]["bytes_in"], status["totals"]["bytes_out"]) == (1500, 1500)
        await close(writer)
        await access.wait_for(1)
        await eventually(lambda: not proxy.sessions)
        _, samples = await scrape(admin)
    for direction in ("in", "out"):  # moved from the open sessions' sum to the totals: counted once
        assert value(samples, f"l4proxy_listener_bytes_{direction}_total", **listener) == 1500
        assert value(samples, f"l4proxy_member_bytes_{direction}_total", **member) == 1500
    assert value(samples, f"{DURATIONS}_count", **listener) == 1


async def test_without_a_reader_sessions_are_not_timed_and_with_one_they_are() -> None:
    """No ``/metrics`` (no ``ProxySource``): sessions skip the clock read and the buckets; the first
    reader switches the histograms on for the sessions after it."""
    async with upstreams(1) as (u0,), running(make_config([u0.address])) as (proxy, access):
        writer, _took = await echo_timed(proxy.port(), b"before")
        await close(writer)
        await access.wait_for(1)
        [frontend], [member] = proxy.frontends, proxy.pools["default"].members
        assert not proxy.timed and not frontend.counters.timed and not proxy.pools["default"].timed
        assert sum(frontend.counters.durations.counts) == sum(member.stats.connects.counts) == 0
        async with admin_of(proxy) as admin:
            writer, _took = await echo_timed(proxy.port(), b"after")
            await close(writer)
            await access.wait_for(2)
            _, samples = await scrape(admin)
    assert value(samples, f"{DURATIONS}_count", listener="default") == 1
    assert value(samples, f"{CONNECTS}_count", pool="default", member=str(u0.address)) == 1
    assert value(samples, "l4proxy_member_sessions_total", pool="default", member=str(u0.address)) == 2
