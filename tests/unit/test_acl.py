"""CIDR parsing, allow/deny membership and the per-source tables: tables first, then properties."""

from __future__ import annotations

import ipaddress
from fractions import Fraction
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4proxy.acl import Acl, Network, SourceLimits, SourceTable, parse_cidr, parse_rate, source_key
from l4proxy.errors import ConfigError

# --- parse_cidr ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "network"), [
    ("10.0.0.0/8", "10.0.0.0/8"),
    (" 10.0.0.0/8 ", "10.0.0.0/8"),
    ("10.1.2.3", "10.1.2.3/32"),
    ("0.0.0.0/0", "0.0.0.0/0"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("2001:DB8::/32", "2001:db8::/32"),
    ("::1", "::1/128"),
    ("::/0", "::/0"),
    ("::ffff:10.0.0.0/104", "::ffff:a00:0/104"),
])
def test_parse_cidr(text: str, network: str) -> None:
    assert parse_cidr(text, "--allow") == ipaddress.ip_network(network)


@pytest.mark.parametrize(("text", "message"), [
    ("10.0.0.0/33", "--allow '10.0.0.0/33': prefix length must be 0..32"),
    ("::/129", "--allow '::/129': prefix length must be 0..128"),
    ("10.0.0.0/x", "--allow '10.0.0.0/x': prefix length 'x' is not a number"),
    ("10.0.0.0/", "--allow '10.0.0.0/': prefix length '' is not a number"),
    ("10.0.0.0/-1", "--allow '10.0.0.0/-1': prefix length '-1' is not a number"),
    ("10.0.0.0/²", "--allow '10.0.0.0/²': prefix length '²' is not a number"),
    ("10.0.0.256/8", "--allow '10.0.0.256/8': '10.0.0.256' is not an IPv4 or IPv6 address"),
    ("010.0.0.0/8", "--allow '010.0.0.0/8': '010.0.0.0' is not an IPv4 or IPv6 address"),
    ("example.com/8", "--allow 'example.com/8': 'example.com' is not an IPv4 or IPv6 address"),
    ("10.1.2.3/8", "--allow '10.1.2.3/8': has host bits set: the range is 10.0.0.0/8"),
    ("2001:db8::1/32", "--allow '2001:db8::1/32': has host bits set: the range is 2001:db8::/32"),
    ("fe80::1%eth0/64", "--allow 'fe80::1%eth0/64': a range cannot carry a zone index (%...)"),
    ("", "--allow '': expected an address or CIDR range such as 10.0.0.0/8 or 2001:db8::/32"),
    ("/8", "--allow '/8': expected an address or CIDR range such as 10.0.0.0/8 or 2001:db8::/32"),
])
def test_parse_cidr_errors_name_the_flag_and_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_cidr(text, "--allow")
    assert str(caught.value) == message


networks = st.one_of(
    st.builds(lambda value, prefix: ipaddress.IPv4Network((value, prefix), strict=False),
              st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(lambda value, prefix: ipaddress.IPv6Network((value, prefix), strict=False),
              st.integers(0, 2**128 - 1), st.integers(0, 128)),
)


@given(networks)
def test_parse_cidr_reads_back_what_ipaddress_writes(network: Network) -> None:
    assert parse_cidr(str(network), "--deny") == network
    assert parse_cidr(network.compressed if network.version == 6 else str(network), "--deny") == network


@given(st.integers(0, 2**32 - 1), st.integers(33, 10**6))
def test_parse_cidr_rejects_every_long_ipv4_prefix(value: int, prefix: int) -> None:
    text = f"{ipaddress.IPv4Address(value)}/{prefix}"
    with pytest.raises(ConfigError) as caught:
        parse_cidr(text, "--allow")
    assert str(caught.value) == f"--allow {text!r}: prefix length must be 0..32"


@given(st.text(max_size=60))
def test_parse_cidr_raises_only_config_errors(text: str) -> None:
    try:
        network = parse_cidr(text, "--allow")
    except ConfigError as exc:
        assert str(exc).startswith(f"--allow {text!r}: ")
    else:
        assert isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network)


@pytest.mark.parametrize(("text", "result"), [("100/s", 100), ("1", 1), (" 20 / s ", 20)])
def test_parse_rate(text: str, result: int) -> None:
    assert parse_rate(text, "--rate-per-ip") == result


@pytest.mark.parametrize(("text", "message"), [
    ("0/s", "--rate-per-ip '0/s': must be at least 1/s"),
    ("fast", "--rate-per-ip 'fast': expected a rate such as 100/s"),
    ("10/m", "--rate-per-ip '10/m': expected a rate such as 100/s"),
    ("1.5/s", "--rate-per-ip '1.5/s': expected a rate such as 100/s"),
    ("٣/s", "--rate-per-ip '٣/s': expected a rate such as 100/s"),
])
def test_parse_rate_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rate(text, "--rate-per-ip")
    assert str(caught.value) == message


# --- allow / deny -------------------------------------------------------------------------------------


def acl(allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> Acl:
    return Acl([parse_cidr(t, "--allow") for t in allow], [parse_cidr(t, "--deny") for t in deny])


RULES = {
    "no rules: everyone": ((), ()),
    "allow v4 only": (("10.0.0.0/8", "127.0.0.1"), ()),
    "deny only": ((), ("10.66.0.0/16", "::1")),
    "deny wins over allow": (("10.0.0.0/8", "2001:db8::/32"), ("10.66.0.0/16", "2001:db8:66::/48")),
    "mapped rule": (("::ffff:127.0.0.0/104",), ()),
    "all of IPv6 denied": ((), ("::/0",)),
}

HOSTS = ("10.1.2.3", "10.66.1.1", "127.0.0.1", "127.0.0.2", "192.0.2.1", "::1", "2001:db8::1",
         "2001:db8:66::1", "::ffff:10.1.2.3", "::ffff:10.66.1.1", "::ffff:127.0.0.1", "fe80::1%lo", "nonsense", "")

EXPECTED = {  # rules: the hosts allowed, in HOSTS order
    "no rules: everyone": HOSTS[:-2],
    "allow v4 only": ("10.1.2.3", "10.66.1.1", "127.0.0.1", "::ffff:10.1.2.3", "::ffff:10.66.1.1", "::ffff:127.0.0.1"),
    "deny only": ("10.1.2.3", "127.0.0.1", "127.0.0.2", "192.0.2.1", "2001:db8::1", "2001:db8:66::1",
                  "::ffff:10.1.2.3", "::ffff:127.0.0.1", "fe80::1%lo"),
    "deny wins over allow": ("10.1.2.3", "2001:db8::1", "::ffff:10.1.2.3"),
    "mapped rule": ("127.0.0.1", "127.0.0.2", "::ffff:127.0.0.1"),
    "all of IPv6 denied": ("10.1.2.3", "10.66.1.1", "127.0.0.1", "127.0.0.2", "192.0.2.1", "::ffff:10.1.2.3",
                           "::ffff:10.66.1.1", "::ffff:127.0.0.1"),
}


@pytest.mark.parametrize("rules", RULES)
def test_membership(rules: str) -> None:
    compiled = acl(*RULES[rules])
    assert tuple(h for h in HOSTS if compiled.allows(h)) == EXPECTED[rules]
    assert tuple(h for h in HOSTS if compiled.allows(h)) == EXPECTED[rules]  # again, from the cache
    assert tuple(h for h in HOSTS if compiled.refusal(h) is None) == EXPECTED[rules]


@pytest.mark.parametrize(("host", "reason"), [
    ("10.66.1.1", "denied by 10.66.0.0/16"),
    ("::ffff:10.66.1.1", "denied by 10.66.0.0/16"),
    ("2001:db8:66::5", "denied by 2001:db8:66::/48"),
    ("192.0.2.1", "in no allowed range"),
    ("::1", "in no allowed range"),
    ("nonsense", "not an IP address"),
    ("10.1.2.3", None),
])
def test_refusal_reason(host: str, reason: str | None) -> None:
    assert acl(*RULES["deny wins over allow"]).refusal(host) == reason


def test_the_cache_stays_bounded_under_many_sources() -> None:
    compiled = acl(("10.0.0.0/8",))
    for i in range(3 * Acl.CACHE_SIZE):
        assert compiled.allows(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        assert len(compiled._cache) <= Acl.CACHE_SIZE


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v))),
    st.integers(0, 2**128 - 1).map(lambda v: str(ipaddress.IPv6Address(v))),
    st.integers(0, 2**32 - 1).map(lambda v: f"::ffff:{ipaddress.IPv4Address(v)}"),
)


def reference(allow: list[Network], deny: list[Network], host: str) -> bool:
    """The rules as stated, straight from ipaddress, with no compilation."""
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    as_v4 = [ipaddress.ip_network(f"{n.network_address.ipv4_mapped}/{n.prefixlen - 96}")
             if n.version == 6 and n.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")) else n  # type: ignore[arg-type]
             for n in allow + deny]
    allow, deny = as_v4[: len(allow)], as_v4[len(allow):]
    if any(address in n for n in deny):
        return False
    return not allow or any(address in n for n in allow)


@settings(max_examples=300)
@given(st.lists(networks, max_size=6), st.lists(networks, max_size=6), st.lists(addresses, min_size=1, max_size=20))
def test_compiled_ranges_agree_with_the_rules(allow: list[Network], deny: list[Network], hosts: list[str]) -> None:
    compiled = Acl(allow, deny)
    for network in allow + deny:  # the edges of every range, where an off-by-one would show
        for edge in (int(network.network_address), int(network.broadcast_address)):
            for value in (edge - 1, edge, edge + 1):
                if 0 <= value < (1 << network.max_prefixlen):
                    hosts.append(str(ipaddress.ip_address(value) if network.version == 4
                                     else ipaddress.IPv6Address(value)))
    for host in hosts:
        assert compiled.allows(host) is reference(allow, deny, host), host


# --- per-source tables --------------------------------------------------------------------------------


class Step(NamedTuple):
    """``admit`` or ``release`` of a source at ``now``, the answer, and the whole table after it."""

    op: str
    source: str
    now: float
    answer: str | None
    live: dict[str, int]  # source: live connections
    idle: tuple[str, ...]  # oldest first
    tokens: dict[str, float] | None = None  # checked when given


def run_script(table: SourceTable, steps: list[Step]) -> None:
    for number, step in enumerate(steps, 1):
        answer = table.admit(step.source, step.now) if step.op == "admit" else table.release(step.source)
        where = f"step {number}: {step.op} {step.source} at {step.now}"
        live = {source: entry.count for source, entry in table.live.items()}
        assert (answer, live, tuple(table.idle)) == (step.answer, step.live, step.idle), where
        if step.tokens is not None:
            every = {**table.live, **table.idle}
            assert {s: every[s].tokens for s in step.tokens} == step.tokens, where


CONN_LIMIT = "max_connections_per_ip 2 reached"
RATE_LIMIT = "rate_per_ip 2/s exceeded"

SOURCE_SCRIPTS: dict[str, tuple[SourceLimits, list[Step]]] = {
    "max_connections_per_ip counts live connections per source": (SourceLimits(max_connections_per_ip=2), [
        Step("admit", "10.0.0.1", 0, None, {"10.0.0.1": 1}, ()),
        Step("admit", "10.0.0.1", 0, None, {"10.0.0.1": 2}, ()),
        Step("admit", "10.0.0.1", 0, CONN_LIMIT, {"10.0.0.1": 2}, ()),
        Step("admit", "10.0.0.2", 0, None, {"10.0.0.1": 2, "10.0.0.2": 1}, ()),
        Step("release", "10.0.0.1", 0, None, {"10.0.0.1": 1, "10.0.0.2": 1}, ()),
        Step("admit", "10.0.0.1", 0, None, {"10.0.0.1": 2, "10.0.0.2": 1}, ()),
        Step("release", "10.0.0.2", 0, None, {"10.0.0.1": 2}, ()),  # no rate: the entry goes at 0
    ]),
    "a mapped address counts as its IPv4 address": (SourceLimits(max_connections_per_ip=2), [
        Step("admit", "::ffff:10.0.0.1", 0, None, {"10.0.0.1": 1}, ()),
        Step("admit", "10.0.0.1", 0, None, {"10.0.0.1": 2}, ()),
        Step("admit", "::ffff:10.0.0.1", 0, CONN_LIMIT, {"10.0.0.1": 2}, ()),
        Step("release", "::ffff:10.0.0.1", 0, None, {"10.0.0.1": 1}, ()),
    ]),
    "rate_per_ip: a burst of N, then N a second": (SourceLimits(rate_per_ip=2), [
        Step("admit", "a", 10, None, {"a": 1}, (), {"a": 1.0}),
        Step("admit", "a", 10, None, {"a": 2}, (), {"a": 0.0}),
        Step("admit", "a", 10.25, RATE_LIMIT, {"a": 2}, (), {"a": 0.5}),
        Step("admit", "a", 10.5, None, {"a": 3}, (), {"a": 0.0}),
        Step("release", "a", 11, None, {"a": 2}, ()),
        Step("release", "a", 11, None, {"a": 1}, ()),
        Step("release", "a", 11, None, {}, ("a",), {"a": 0.0}),  # kept idle: its bucket is not full
        Step("admit", "a", 11, None, {"a": 1}, (), {"a": 0.0}),  # 0.5 s since 10.5: one token
        Step("release", "a", 11, None, {}, ("a",)),
        Step("admit", "a", 20, None, {"a": 1}, (), {"a": 1.0}),  # refilled to the burst, no further
    ]),
    "a rate refusal of an idle source keeps its drained bucket": (SourceLimits(rate_per_ip=2), [
        Step("admit", "a", 0, None, {"a": 1}, ()),
        Step("release", "a", 0, None, {}, ("a",)),
        Step("admit", "a", 0, None, {"a": 1}, ()),
        Step("release", "a", 0, None, {}, ("a",)),
        Step("admit", "a", 0, RATE_LIMIT, {}, ("a",), {"a": 0.0}),
        Step("admit", "a", 0.5, None, {"a": 1}, (), {"a": 0.0}),
    ]),
    "both limits: the connection limit answers first": (SourceLimits(max_connections_per_ip=2, rate_per_ip=2), [
        Step("admit", "a", 0, None, {"a": 1}, ()),
        Step("admit", "a", 0, None, {"a": 2}, ()),
        Step("admit", "a", 0, CONN_LIMIT, {"a": 2}, (), {"a": 0.0}),
        Step("release", "a", 0, None, {"a": 1}, ()),
        Step("admit", "a", 0, RATE_LIMIT, {"a": 1}, (), {"a": 0.0}),
    ]),
    "past capacity the least recently used idle source goes, never a live one": (
        SourceLimits(rate_per_ip=2, capacity=2), [
            Step("admit", "live", 0, None, {"live": 1}, ()),
            Step("admit", "a", 0, None, {"live": 1, "a": 1}, ()),
            Step("release", "a", 1, None, {"live": 1}, ("a",)),
            Step("admit", "b", 2, None, {"live": 1, "b": 1}, ("a",)),
            Step("release", "b", 2, None, {"live": 1}, ("a", "b")),
            Step("admit", "a", 3, None, {"live": 1, "a": 1}, ("b",)),  # a used again: b is now the oldest
            Step("release", "a", 3, None, {"live": 1}, ("b", "a")),
            Step("admit", "c", 4, None, {"live": 1, "c": 1}, ("b", "a")),
            Step("release", "c", 4, None, {"live": 1}, ("a", "c")),  # b evicted
        ]),
}


@pytest.mark.parametrize("name", SOURCE_SCRIPTS)
def test_source_script(name: str) -> None:
    limits, steps = SOURCE_SCRIPTS[name]
    run_script(SourceTable(limits), steps)


def test_eviction_is_counted() -> None:
    table = SourceTable(SourceLimits(rate_per_ip=5, capacity=3))
    for i in range(10):
        table.admit(f"s{i}", i)
        table.release(f"s{i}")
    assert (len(table), list(table.idle), table.evicted) == (3, ["s7", "s8", "s9"], 7)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_connections_per_ip": 0}, "max_connections_per_ip 0: must be at least 1"),
    ({"rate_per_ip": 0}, "rate_per_ip 0: must be at least 1/s"),
    ({"capacity": 0}, "source_table_capacity 0: must be at least 1"),
])
def test_bad_limits(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SourceLimits(**kwargs)
    assert str(caught.value) == message


@pytest.mark.parametrize(("host", "key"), [
    ("::ffff:10.1.2.3", "10.1.2.3"), ("10.1.2.3", "10.1.2.3"), ("::1", "::1"), ("::ffff:a01:203", "::ffff:a01:203"),
])
def test_source_key(host: str, key: str) -> None:
    assert source_key(host) == key


# --- the bucket and the bound, as properties ---------------------------------------------------------

# Times in 1/1024 s steps and integer rates keep every float the bucket computes exact, so the
# properties below can be exact too.
ticks = st.lists(st.integers(0, 4096), min_size=1, max_size=80)  # gaps between requests, in 1/1024 s


@settings(max_examples=300)
@given(st.integers(1, 50), ticks)
def test_bucket_admits_at_most_burst_plus_rate_times_the_window(rate: int, gaps: list[int]) -> None:
    table = SourceTable(SourceLimits(rate_per_ip=rate))
    now, times = 0, []
    for gap in gaps:
        now += gap
        if table.admit("a", now / 1024) is None:
            times.append(Fraction(now, 1024))
            table.release("a")
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= rate + rate * (times[j] - start)


@settings(max_examples=300)
@given(st.integers(1, 50), ticks)
def test_bucket_agrees_with_an_exact_token_count(rate: int, gaps: list[int]) -> None:
    """Refused exactly when, in exact arithmetic, fewer than one token has built up."""
    table = SourceTable(SourceLimits(rate_per_ip=rate))
    tokens, last, now = Fraction(rate), Fraction(0), 0
    for gap in gaps:
        now += gap
        at = Fraction(now, 1024)
        tokens, last = min(Fraction(rate), tokens + (at - last) * rate), at
        expected = tokens >= 1
        if expected:
            tokens -= 1
        assert (table.admit("a", now / 1024) is None) is expected
        if expected:
            table.release("a")


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 40), st.booleans()), min_size=1, max_size=300), st.integers(1, 8))
def test_table_stays_bounded_and_never_loses_a_live_count(ops: list[tuple[int, bool]], capacity: int) -> None:
    """Many sources opening and closing: idle entries stay within capacity, live counts stay exact."""
    table = SourceTable(SourceLimits(max_connections_per_ip=3, rate_per_ip=4, capacity=capacity))
    open_: dict[str, int] = {}
    for step, (number, close) in enumerate(ops):
        source = f"10.0.0.{number}"
        if close and open_.get(source):
            table.release(source)
            open_[source] -= 1
        elif table.admit(source, step / 8) is None:
            open_[source] = open_.get(source, 0) + 1
        assert len(table.idle) <= capacity
        assert {s: e.count for s, e in table.live.items()} == {s: n for s, n in open_.items() if n}
        assert not set(table.live) & set(table.idle)
