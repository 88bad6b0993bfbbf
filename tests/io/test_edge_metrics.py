"""The edge's refusals in ``/metrics``: every reason the rules, the per-source limits and the PROXY header
reader count appears per listener, from its fixed table, with exact values after a known pattern of
refusals; listeners without the feature have no such series. Scraped from a real endpoint, parsed by
prometheus_client and checked by promtool."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from l4proxy import Address, Proxy
from l4proxy.counters import REFUSALS
from l4proxy.edge import HEADER_ERRORS
from l4proxy.proxyproto import encode_v1
from l4proxy.sharedstats import Publisher, SharedCounters, SupervisorSource
from l4proxy.snapshot import ListenerView, ProxySource

from ..kit import RecordingLog, dial_from, eventually, exchange, make_config, upstreams
from ..servers import free_port
from .test_admin import Samples, admin_of, promtool_accepts, scrape, value
from .test_edge import _DST4, _SRC4, MALFORMED, closed_without_reply


def table(samples: Samples, name: str, listener: str) -> dict[str, float]:
    """The ``reason`` series of one family and listener."""
    return {
        dict(labels)["reason"]: count
        for (sample, labels), count in samples.items()
        if sample == name and dict(labels)["listener"] == listener
    }


async def test_every_refusal_is_a_labelled_counter_per_listener() -> None:
    now = [100.0]  # the rate's clock, frozen: only the pattern below spends tokens
    async with upstreams(1) as [member]:
        base = make_config([member.address])
        ports = iter(free_port() for _ in range(3))  # own addresses: the workers' rows are found by them
        base = replace(base, listeners=tuple(replace(base.listeners[0], address=Address("127.0.0.1", next(ports)))
                                             for _ in range(3)))  # fmt: skip
        gate = replace(base.listeners[0], name="gate", allow=("127.0.0.0/29",), deny=("127.0.0.4",),
                       max_connections_per_ip=1, rate_per_ip=2)  # fmt: skip
        edge = replace(base.listeners[1], name="edge", accept_proxy=True, proxy_timeout=0.3)
        plain = replace(base.listeners[2], name="plain")
        proxy = Proxy(replace(base, listeners=(gate, edge, plain)), RecordingLog())
        proxy.frontends[0].edge.clock = lambda: now[0]
        await proxy.start()
        try:
            async with admin_of(proxy) as admin:
                await refuse_at_the_gate(proxy, proxy.port(0))
                await refuse_bad_headers(proxy.port(1))
                await eventually(lambda: sum(proxy.frontends[1].header_errors.values()) == 5)
                text, samples = await scrape(admin)
                assert workers_see(proxy) == ProxySource(proxy).snapshot().listeners
        finally:
            await proxy.drain()
    refused, headers = "l4proxy_listener_refused_total", "l4proxy_listener_proxy_header_errors_total"
    expected = {"deny": 1, "not_allowed": 2, "max_connections_per_ip": 1, "rate_per_ip": 1}
    assert table(samples, refused, "gate") == expected and list(expected) == list(REFUSALS)
    assert table(samples, headers, "edge") == {
        **dict.fromkeys(HEADER_ERRORS, 0), "v1_too_long": 2, "v2_bad_version": 1, "timeout": 1, "eof": 1
    }  # fmt: skip
    assert table(samples, refused, "edge") == table(samples, headers, "gate") == {}  # features that are off
    assert table(samples, refused, "plain") == table(samples, headers, "plain") == {}
    assert value(samples, "l4proxy_listener_accepted_total", listener="gate") == 8
    assert value(samples, "l4proxy_listener_sessions_total", listener="gate") == 3
    assert value(samples, "l4proxy_listener_accepted_total", listener="edge") == 6
    assert value(samples, "l4proxy_listener_sessions_total", listener="edge") == 1
    assert member.accepted == 4  # no refused client was dialed for
    tls_only = {"l4proxy_listener_tls_handshakes_total", "l4proxy_listener_tls_failures_total"}  # no TLS here
    assert {name for name, _labels in samples} | tls_only == documented_metrics()
    await promtool_accepts(text)


def documented_metrics() -> set[str]:
    """The sample names of README's table (a row may name several, comma-separated; a histogram's
    family has its ``_bucket``, ``_sum`` and ``_count``)."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("\n## Monitoring\n", 1)[1].split("\n## ", 1)[0]
    rows = [line[2:].split(" | ")[:2] for line in section.splitlines() if line.startswith("| `l4proxy_")]
    names = {(name.strip("` "), kind) for row, kind in rows for name in row.split(",")}
    suffixes = {"histogram": ("_bucket", "_sum", "_count")}
    return {name + suffix for name, kind in names for suffix in suffixes.get(kind, ("",))}


async def refuse_at_the_gate(proxy: Proxy, port: int) -> None:
    """deny once, not_allowed twice, max_connections_per_ip once, rate_per_ip once; three served."""
    held_reader, held = await dial_from("127.0.0.2", port)
    held.write(b"up")
    assert await asyncio.wait_for(held_reader.readexactly(2), 5) == b"up"
    assert await closed_without_reply(port, source="127.0.0.2")  # its one connection is open
    for _ in range(2):  # the burst of 2, spent one session at a time
        assert (await exchange(port, b"r", source="127.0.0.3"))[0] == b"r"
        await eventually(lambda: len(proxy.sessions) == 1)
    assert await closed_without_reply(port, source="127.0.0.3")  # no token left
    assert await closed_without_reply(port, source="127.0.0.4")  # denied
    for _ in range(2):
        assert await closed_without_reply(port, source="127.0.0.9")  # in no allowed range
    held.close()


async def refuse_bad_headers(port: int) -> None:
    """v1_too_long twice, v2_bad_version once, a silent client (timeout), one that leaves (eof); one served."""
    assert (await exchange(port, encode_v1(_SRC4, _DST4) + b"fine"))[0] == b"fine"
    for reason in ("v1_too_long", "v1_too_long", "v2_bad_version"):
        assert await closed_without_reply(port, MALFORMED[reason])
    silent_reader, silent = await dial_from("127.0.0.1", port)
    assert await asyncio.wait_for(silent_reader.read(), 5) == b""  # closed at proxy_timeout
    silent.close()
    _, leaving = await dial_from("127.0.0.1", port)
    leaving.write_eof()  # EOF before any header
    leaving.close()


def workers_see(proxy: Proxy) -> tuple[ListenerView, ...]:
    """The listeners as the supervisor of ``--workers N`` reads them: copied into a worker's row of
    shared memory and summed back, every reason of every table in a cell of its own."""
    shared = SharedCounters(proxy.config, workers=1, capacity=4)
    Publisher(shared, 0, proxy).publish()
    source = SupervisorSource(lambda: proxy.config, dict, list, None, shared, bool)  # type: ignore[arg-type]
    return tuple(source._listener(config) for config in proxy.config.listeners)


def test_listeners_without_the_features_cost_no_series() -> None:
    """A plain listener's view has empty tables: nothing is exported for it, whatever a scrape asks."""
    from l4proxy.snapshot import edge_tables

    config = make_config([Address("127.0.0.1", 1)]).listeners[0]
    assert edge_tables(config, {}, {}, {}) == {"tls": False, "tls_failures": {}, "refused": {}, "header_errors": {}}
