"""Parsing of the textual forms users type, and validation of the Config tree, as input → output tables.

Each bad input must raise a ``ConfigError`` whose whole message names the field, shows the value and
says what was expected (STYLE.md habits 2 and 3). IPv6 forms are covered beside IPv4 ones, as
RELIABILITY.md asks of every case that involves addresses. Pure: no sockets, no loop.
"""

from __future__ import annotations

from typing import Any

import pytest

from l4proxy.config import (
    Address,
    Config,
    HealthConfig,
    ListenerConfig,
    MemberConfig,
    PoolConfig,
    Resolved,
    ServerTLSConfig,
    Service,
    UpstreamTLSConfig,
    from_tree,
    parse_address,
    parse_duration,
    parse_escapes,
    parse_member,
    parse_members,
)
from l4proxy.errors import ConfigError

# --- durations -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("2.5", 2.5),
        (".5s", 0.5),
        ("1.5m", 90.0),
        ("0", 0.0),  # parses; the dataclass that uses it decides whether 0 is allowed
        (" 3 s ", 3.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "--connect-timeout") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "-1s", "1.5.2", "1e3", "5S", "ms", "5 sec", "inf", "nan"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(text, "--connect-timeout")
    assert str(caught.value) == f"--connect-timeout {text!r}: expected a duration such as 250ms, 5s, 1m, 1h or 2.5"


# --- addresses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "default_port", "expected"),
    [
        ("127.0.0.1:6379", None, Address("127.0.0.1", 6379)),
        (":6379", None, Address("", 6379)),
        ("[::1]:6379", None, Address("::1", 6379)),
        ("[::]:1", None, Address("::", 1)),
        ("localhost:80", None, Address("localhost", 80)),
        ("redis-a.example.com:65535", None, Address("redis-a.example.com", 65535)),
        ("redis_a:1", None, Address("redis_a", 1)),
        ("  10.0.0.5:6379  ", None, Address("10.0.0.5", 6379)),
        # a missing port takes the default (the listen port, for members)
        ("redis-a", 6379, Address("redis-a", 6379)),
        ("10.0.0.5", 6379, Address("10.0.0.5", 6379)),
        ("::1", 6379, Address("::1", 6379)),  # a bare IPv6 literal cannot carry a port
        ("fe80::1:2:3", 7, Address("fe80::1:2:3", 7)),
        ("[::1]", 6379, Address("::1", 6379)),
        ("::ffff:127.0.0.1", 7, Address("::ffff:7f00:1", 7)),  # IPs come back in canonical form
        ("[0:0:0:0:0:0:0:1]:5", None, Address("::1", 5)),
        ("redis-a:1", 6379, Address("redis-a", 1)),  # an explicit port wins
    ],
)
def test_parse_address(text: str, default_port: int | None, expected: Address) -> None:
    assert parse_address(text, "--upstream", default_port) == expected


@pytest.mark.parametrize(
    ("text", "default_port", "message"),
    [
        ("", None, "--upstream '': address is empty"),
        ("   ", 6379, "--upstream '': address is empty"),
        ("host:70000", None, "--upstream 'host:70000': port must be 1..65535"),
        ("host:0", None, "--upstream 'host:0': port must be 1..65535"),
        ("[::1]:0", None, "--upstream '[::1]:0': port must be 1..65535"),
        ("host:abc", None, "--upstream 'host:abc': port 'abc' is not a number"),
        ("host:", 6379, "--upstream 'host:': port '' is not a number"),
        ("host:-1", None, "--upstream 'host:-1': port must be 1..65535"),
        ("host:-", None, "--upstream 'host:-': port '-' is not a number"),
        ("http://a:1", None, "--upstream 'http://a:1': a URL scheme is not allowed here; give HOST:PORT"),
        ("a:1 b:2", None, "--upstream 'a:1 b:2': an address has no spaces in it"),
        ("host:+5", None, "--upstream 'host:+5': port '+5' is not a number"),
        ("host:\u00b2", None, "--upstream 'host:\u00b2': port '\u00b2' is not a number"),  # superscript two
        ("host:\u0663", None, "--upstream 'host:\u0663': port '\u0663' is not a number"),  # Arabic-Indic three
        ("[::1", None, "--upstream '[::1': missing ']' after the IPv6 address"),
        ("[::1:6379", None, "--upstream '[::1:6379': missing ']' after the IPv6 address"),
        ("[::1]6379", None, "--upstream '[::1]6379': expected ':PORT' after ']'"),
        ("[redis-a]:1", None, "--upstream '[redis-a]:1': 'redis-a' is not an IPv6 address"),
        ("[127.0.0.1]:1", None, "--upstream '[127.0.0.1]:1': '127.0.0.1' is not an IPv6 address"),
        ("::1:6379:x", 1, "--upstream '::1:6379:x': IPv6 addresses with a port need brackets: [::1]:6379"),
        ("1::2::3", 1, "--upstream '1::2::3': IPv6 addresses with a port need brackets: [::1]:6379"),
        ("bad_host!:1", None, "--upstream 'bad_host!:1': 'bad_host!' is not a valid host name or IP address"),
        ("a..b:1", None, "--upstream 'a..b:1': 'a..b' is not a valid host name or IP address"),
        ("-a:1", None, "--upstream '-a:1': '-a' is not a valid host name or IP address"),
        ("redis-a", None, "--upstream 'redis-a': a port is required, as HOST:PORT or :PORT"),
        ("::1", None, "--upstream '::1': a port is required, as HOST:PORT or :PORT"),
        ("[::1]", None, "--upstream '[::1]': a port is required, as HOST:PORT or :PORT"),
    ],
)
def test_parse_address_rejects(text: str, default_port: int | None, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_address(text, "--upstream", default_port)
    assert str(caught.value) == message
    assert caught.value.path == "--upstream"


def test_config_error_is_a_value_error_with_its_parts() -> None:
    """Callers that only know ValueError still catch it; the CLI reads the parts to rename fields."""
    with pytest.raises(ValueError) as caught:
        parse_address("h:0", "listen")
    error = caught.value
    assert isinstance(error, ConfigError)
    assert (error.path, error.value, error.problem) == ("listen", "h:0", "port must be 1..65535")


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (Address("127.0.0.1", 6379), "127.0.0.1:6379"),
        (Address("::1", 6379), "[::1]:6379"),
        (Address("", 80), ":80"),
        (Address("redis-a", 1), "redis-a:1"),
    ],
)
def test_address_prints_in_the_form_it_is_parsed_from(address: Address, text: str) -> None:
    assert str(address) == text
    assert parse_address(text, "--listen") == address


# --- members ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["redis-a"], [("redis-a", 6379)]),
        (["redis-a,redis-b:7000"], [("redis-a", 6379), ("redis-b", 7000)]),
        (["a", "b:2", "c"], [("a", 6379), ("b", 2), ("c", 6379)]),
        (["a,b", "c"], [("a", 6379), ("b", 6379), ("c", 6379)]),
        ([" a , b "], [("a", 6379), ("b", 6379)]),
        (["::1,[::2]:5"], [("::1", 6379), ("::2", 5)]),
        (["a", "a"], [("a", 6379), ("a", 6379)]),  # kept here; the command warns and uses it once
    ],
)
def test_parse_members(texts: list[str], expected: list[tuple[str, int]]) -> None:
    members = tuple(MemberConfig(Address(h, p)) for h, p in expected)
    assert parse_members(texts, "--upstream", default_port=6379) == members


def test_parse_members_takes_srv_names() -> None:
    members = parse_members(["10.0.0.1,srv:_redis._tcp.cache.svc.cluster.local", "SRV:_db._tcp.x."], "m", 6379)
    srv = (Service("_redis._tcp.cache.svc.cluster.local"), Service("_db._tcp.x."))
    assert members == tuple(map(MemberConfig, (Address("10.0.0.1", 6379), *srv)))
    assert [str(m) for m in members[1:]] == ["srv:_redis._tcp.cache.svc.cluster.local", "srv:_db._tcp.x."]


_SRV_EXPECTED = "--upstream '{}': expected srv:NAME with a DNS name, such as srv:_redis._tcp.example.com"


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "--upstream: at least one upstream is required"),
        (["a,,b"], "--upstream 'a,,b': empty member in the list"),
        (["a,"], "--upstream 'a,': empty member in the list"),
        ([","], "--upstream ',': empty member in the list"),
        (["a", ""], "--upstream '': empty member in the list"),
        (["a", "b:99999"], "--upstream 'b:99999': port must be 1..65535"),
        (["a,[::1"], "--upstream '[::1': missing ']' after the IPv6 address"),
        (["a:1 b:2"], "--upstream 'a:1 b:2': separate members with commas, not spaces"),
        (["a:1, b:2 c"], "--upstream 'a:1, b:2 c': separate members with commas, not spaces"),
        (["http://a:1"], "--upstream 'http://a:1': a URL scheme is not allowed here; give HOST:PORT"),
        (["srv:"], _SRV_EXPECTED.format("srv:")),
        (["srv:_r._tcp.x:6379"], _SRV_EXPECTED.format("srv:_r._tcp.x:6379")),  # the records give the port
        (["srv:10.0.0.1"], _SRV_EXPECTED.format("srv:10.0.0.1")),
    ],
)
def test_parse_members_rejects(texts: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_members(texts, "--upstream", default_port=6379)
    assert str(caught.value) == message


# --- escapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", b""),
        ("PING", b"PING"),
        (r"PING\r\n", b"PING\r\n"),
        (r"\x0d\x0A", b"\r\n"),
        (r"\xff\x00", b"\xff\x00"),
        (r"a\tb\0c", b"a\tb\x00c"),
        (r"a\\b", b"a\\b"),
        (r"\\x41", b"\\x41"),  # an escaped backslash, then a literal 'x41'
        (r"\\xZZ", b"\\xZZ"),
        (r"\\\x41", b"\\A"),
        (r"\q", b"\\q"),  # unknown escapes stay as typed
        ("\u00e9", b"\xc3\xa9"),  # text is UTF-8
    ],
)
def test_parse_escapes(text: str, expected: bytes) -> None:
    assert parse_escapes(text, "--health-send") == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (r"\x", r"\x needs two hex digits, as in \x0d"),
        (r"\x0", r"\x needs two hex digits, as in \x0d"),
        (r"\xZZ", r"\x needs two hex digits, as in \x0d"),
        (r"PING\x4", r"\x needs two hex digits, as in \x0d"),
        (r"\\\xZ1", r"\x needs two hex digits, as in \x0d"),
        ("\udcff", "is not valid text"),  # an undecodable byte from argv (surrogateescape)
    ],
)
def test_parse_escapes_rejects(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_escapes(text, "--health-send")
    assert str(caught.value) == f"--health-send {text!r}: {problem}"


# --- dataclass validation --------------------------------------------------------------------------

_MEMBERS = (Address("redis-a", 6379),)
_POOL = PoolConfig(members=_MEMBERS)
_LISTENER = ListenerConfig(Address("127.0.0.1", 6379))
_HALF_A_CLIENT_CERT = "a client certificate needs both a cert and a key"


@pytest.mark.parametrize(
    ("kind", "settings", "message"),
    [  # each object names its own field; from_tree places it (the table below)
        (Address, {"host": "bad host", "port": 1}, "host 'bad host': is not a valid host name or IP address"),
        (Address, {"host": "a", "port": 65536}, "port 65536: must be a number 0..65535"),
        (Address, {"host": "a", "port": -1}, "port -1: must be a number 0..65535"),
        (Address, {"host": "a", "port": "80"}, "port '80': must be a number 0..65535"),
        (HealthConfig, {"rise": 0}, "rise 0: must be at least 1"),
        (HealthConfig, {"fall": 0}, "fall 0: must be at least 1"),
        (HealthConfig, {"fall": -3}, "fall -3: must be at least 1"),
        (HealthConfig, {"interval": 0.0}, "interval 0.0: must be greater than 0"),
        (HealthConfig, {"interval": float("nan")}, "interval nan: must be greater than 0"),
        (HealthConfig, {"timeout": -1.0}, "timeout -1.0: must be greater than 0"),
        (PoolConfig, {"members": ()}, "members: at least one upstream is required"),
        (PoolConfig, {"members": (Address("", 6379),)}, "members[0] ':6379': an upstream needs a host"),
        (PoolConfig, {"members": (*_MEMBERS, Address("b", 0))}, "members[1] 'b:0': an upstream needs a port"),
        (PoolConfig, {"members": _MEMBERS, "retries": -1}, "retries -1: must be 0 or more"),
        (PoolConfig, {"members": _MEMBERS, "connect_timeout": 0.0}, "connect_timeout 0.0: must be greater than 0"),
        (PoolConfig, {"members": _MEMBERS, "resolve_interval": 0.0}, "resolve_interval 0.0: must be greater than 0"),
        (PoolConfig, {"members": _MEMBERS, "eject_after": 0}, "eject_after 0: must be at least 1"),
        (PoolConfig, {"members": _MEMBERS, "eject_after": 2.5}, "eject_after 2.5: must be a whole number, at least 1"),
        (PoolConfig, {"members": _MEMBERS, "eject_time": 0.0}, "eject_time 0.0: must be greater than 0"),
        (
            PoolConfig,
            {"members": _MEMBERS, "eject_time": 30.0, "max_eject_time": 10.0},
            "max_eject_time 10.0: must be at least the eject time (30s)",
        ),
        (
            PoolConfig,
            {"members": _MEMBERS, "max_ejected_percent": 101},
            "max_ejected_percent 101: must be a percent, 0..100",
        ),
        (
            PoolConfig,
            {"members": _MEMBERS, "max_ejected_percent": "5"},
            "max_ejected_percent '5': must be a percent, 0..100",
        ),
        (
            PoolConfig,
            {"members": _MEMBERS, "resolve_empty_after": -1.0},
            "resolve_empty_after -1.0: must be greater than 0",
        ),
        (Service, {"name": "bad name"}, "name 'bad name': is not a valid DNS name"),
        (ListenerConfig, {"address": Address("", 1), "idle_timeout": 0.0}, "idle_timeout 0.0: must be greater than 0"),
        (
            ListenerConfig,
            {"address": Address("", 1), "half_closed_timeout": -1.0},
            "half_closed_timeout -1.0: must be greater than 0",
        ),
        (
            ListenerConfig,
            {"address": Address("", 1), "buffer_size": 1023},
            "buffer_size 1023: must be at least 1024 bytes",
        ),
        (
            ServerTLSConfig,
            {"cert": "c.pem", "key": "k.pem", "handshake_timeout": 0.0},
            "handshake_timeout 0.0: must be greater than 0",
        ),
        (
            ServerTLSConfig,
            {"cert": "c.pem", "key": "k.pem", "min_version": "1.1"},
            "min_version '1.1': expected 1.2 or 1.3",
        ),
        (UpstreamTLSConfig, {"cert": "c.pem"}, f"key: {_HALF_A_CLIENT_CERT}"),
        (UpstreamTLSConfig, {"key": "k.pem"}, f"cert: {_HALF_A_CLIENT_CERT}"),
        (Config, {"listeners": (), "pools": (_POOL,)}, "listeners: at least one listener is required"),
        (
            Config,
            {"listeners": (ListenerConfig(Address("", 1), pool="cache"),), "pools": (_POOL,)},
            "listeners[0].pool 'cache': no such pool; known: default",
        ),
        (
            Config,
            {"listeners": (_LISTENER,), "pools": (_POOL, _POOL)},
            "pools ['default', 'default']: pool names must be unique",
        ),
        (
            Config,
            {"listeners": (_LISTENER,), "pools": (_POOL,), "drain_timeout": 0.0},
            "drain_timeout 0.0: must be greater than 0",
        ),
        (
            Config,
            {"listeners": (_LISTENER,), "pools": (_POOL,), "log_level": "trace"},
            "log_level 'trace': expected one of debug, info, warning, error",
        ),
        (Config, {"listeners": (_LISTENER,), "pools": (_POOL,), "workers": 0}, "workers 0: must be at least 1"),
    ],
)
def test_invalid_config_cannot_be_built(kind: type, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        kind(**settings)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        (HealthConfig, {"rise": 1, "fall": 1}),
        (PoolConfig, {"members": _MEMBERS, "retries": 0}),
        (ListenerConfig, {"address": Address("", 1), "buffer_size": 1024}),
        (UpstreamTLSConfig, {"cert": "c.pem", "key": "k.pem"}),
        (Config, {"listeners": (_LISTENER,), "pools": (_POOL,)}),
        (Address, {"host": "", "port": 0}),  # every interface, any free port: a listener in a test or program
        (Address, {"host": "::ffff:127.0.0.1", "port": 65535}),
    ],
)
def test_boundary_values_are_accepted(kind: type, settings: dict[str, Any]) -> None:
    kind(**settings)


def test_defaults_follow_the_documented_table() -> None:
    """RELIABILITY.md 'Defaults worth copying': no timeout is infinite by default."""
    config = Config(listeners=(_LISTENER,), pools=(_POOL,))
    pool, listener = config.pool("default"), config.listeners[0]
    assert (pool.connect_timeout, pool.retries) == (5.0, 2)  # 3 attempts in all
    assert (pool.health.interval, pool.health.rise, pool.health.fall) == (2.0, 2, 3)
    assert (listener.idle_timeout, listener.half_closed_timeout, listener.buffer_size) == (3600.0, 30.0, 65536)
    assert config.drain_timeout == 30.0
    assert (pool.resolve_interval, pool.resolve_empty_after) == (10.0, 30.0)


@pytest.mark.parametrize(
    ("check", "given", "effective"),
    [
        ("redis-primary", None, "close"),  # a demoted primary's clients must move to the new one
        ("postgres-primary", None, "close"),
        ("redis", None, "keep"),
        ("tcp", None, "keep"),
        ("redis-primary", "keep", "keep"),  # an explicit setting wins
        ("tcp", "close", "close"),
    ],
)
def test_on_member_down_closes_by_default_only_with_a_primary_check(check: str, given: str | None,
                                                                   effective: str) -> None:
    auth = "probe.auth" if check.startswith("postgres") else None
    health = HealthConfig(check=check, auth=auth)
    assert PoolConfig(members=_MEMBERS, health=health, on_member_down=given).on_member_down == effective


def test_a_resolved_address_is_keyed_and_verified_by_its_name() -> None:
    resolved = Resolved("fd00::5", 6379, name="redis.svc", weight=3)
    assert (str(resolved), resolved.hostname) == ("redis.svc@[fd00::5]:6379", "redis.svc")
    assert (str(Address("redis.svc", 6379)), Address("redis.svc", 6379).hostname) == ("redis.svc:6379", "redis.svc")
    assert resolved != Address("fd00::5", 6379)  # the same IP under a name is another member


def test_a_pool_takes_srv_members_from_the_tree() -> None:
    pools = {"default": {"members": [Service("_r._tcp.x")]}}
    tree = {"listeners": [{"address": {"host": "", "port": 1}}], "pools": pools}
    assert from_tree(tree).pools[0].members == (MemberConfig(Service("_r._tcp.x")),)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        _POOL.retries = 5  # type: ignore[misc]


# --- the tree and its paths ------------------------------------------------------------------------


def _tree(**overrides: Any) -> dict[str, Any]:
    """A small valid tree, as flags or a config file give it, with ``overrides`` by dotted key."""
    tree: dict[str, Any] = {
        "listeners": [{"address": {"host": "127.0.0.1", "port": 6379}}],
        "pools": {"default": {"members": [{"address": {"host": "redis-a", "port": 6379}}], "health": {}}},
    }
    for dotted, value in overrides.items():
        node = tree
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[last] = value
    return tree


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pools.default.health.interval": 0.0}, "pools.default.health.interval 0.0: must be greater than 0"),
        ({"pools.default.health.rise": 0}, "pools.default.health.rise 0: must be at least 1"),
        ({"pools.default.retries": -1}, "pools.default.retries -1: must be 0 or more"),
        ({"pools.default.members": []}, "pools.default.members: at least one upstream is required"),
        (
            {"pools.default.members": [{"address": {"host": "a", "port": 1}},
                                       {"address": {"host": "b", "port": 70000}}]},
            "pools.default.members[1].address.port 70000: must be a number 0..65535",
        ),
        (
            {"pools.default.members": [{"address": {"host": "a b", "port": 1}}]},
            "pools.default.members[0].address.host 'a b': is not a valid host name or IP address",
        ),
        (
            {"pools.default.members": [{"address": {"host": "a", "port": 1}, "weight": 0}]},
            "pools.default.members[0].weight 0: must be a whole number 1..256",
        ),
        (
            {"pools.default.members": [{"address": {"host": "a", "port": 1}, "max_conns": 0}]},
            "pools.default.members[0].max_conns 0: must be a whole number 1 or more",
        ),
        (
            {"pools.default.members": [{"address": {"host": "a", "port": 1}, "colour": "red"}]},
            "pools.default.members[0].colour: no such setting",
        ),
        ({"pools.default.members": [{"weight": 2}]}, "pools.default.members[0].address: is required"),
        ({"pools.default.slow_start": -1.0}, "pools.default.slow_start -1.0: must be 0 (off) or more"),
        ({"pools.default.tls": {"cert": "c.pem"}}, f"pools.default.tls.key: {_HALF_A_CLIENT_CERT}"),
        ({"pools.default.tls": {"verify": False}}, "pools.default.tls.verify: no such setting"),
        ({"pools.default.colour": "red"}, "pools.default.colour: no such setting"),
        (
            {"listeners.0.address": {"host": "", "port": 99999}},
            "listeners[0].address.port 99999: must be a number 0..65535",
        ),
        ({"listeners.0.address": {"host": ""}}, "listeners[0].address.port: is required"),
        ({"listeners.0.address": "a:1"}, "listeners[0].address 'a:1': expected a table of Address settings"),
        ({"listeners.0.tls": {"key": "k.pem"}}, "listeners[0].tls.cert: is required"),
        (
            {"listeners.0.tls": {"cert": "c.pem", "key": "k.pem", "handshake_timeout": 0}},
            "listeners[0].tls.handshake_timeout 0: must be greater than 0",
        ),
        (
            {"listeners.0.tls": {"cert": "c", "key": "k", "min_version": "1.1"}},
            "listeners[0].tls.min_version '1.1': expected 1.2 or 1.3",
        ),
        ({"listeners.0.idle_timeout": -1.0}, "listeners[0].idle_timeout -1.0: must be greater than 0"),
        ({"listeners.0.pool": "cache"}, "listeners[0].pool 'cache': no such pool; known: default"),
        ({"listeners": []}, "listeners: at least one listener is required"),
        ({"drain_timeout": 0.0}, "drain_timeout 0.0: must be greater than 0"),
        ({"shutdown_delay": -1.0}, "shutdown_delay -1.0: must be 0 or more"),
        ({"workers": 0}, "workers 0: must be at least 1"),
        ({"log_level": "loud"}, "log_level 'loud': expected one of debug, info, warning, error"),
    ],
)  # fmt: skip
def test_errors_from_the_tree_name_the_full_path(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_tree(_tree(**overrides))
    assert str(caught.value) == message


def test_a_pool_is_named_by_its_key_and_lists_become_tuples() -> None:
    config = from_tree(
        _tree(**{"pools.default.tls": {"alpn": ["h2"]}, "listeners.0.tls": {"cert": "c", "key": "k", "alpn": ["x"]}})
    )
    pool = config.pool("default")
    assert pool.members == (MemberConfig(Address("redis-a", 6379)),)
    assert pool.tls == UpstreamTLSConfig(alpn=("h2",))
    assert config.listeners[0].tls == ServerTLSConfig("c", "k", alpn=("x",))
    assert config.listeners[0].address == Address("127.0.0.1", 6379)


# --- members and their options ---------------------------------------------------------------------


def test_a_member_from_the_tree_takes_its_options() -> None:
    member = {"address": {"host": "redis-a", "port": 6379}, "weight": 3, "max_conns": 200, "backup": True}
    pool = from_tree(_tree(**{"pools.default.members": [member]})).pool("default")
    assert pool.members == (MemberConfig(Address("redis-a", 6379), weight=3, max_conns=200, backup=True),)


def test_a_bare_address_is_a_member_with_the_defaults() -> None:
    assert PoolConfig(members=(Address("a", 1),)).members == (MemberConfig(Address("a", 1), 1, None, False),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis-a", MemberConfig(Address("redis-a", 6379))),
        ("redis-a:7000;weight=3", MemberConfig(Address("redis-a", 7000), weight=3)),
        ("redis-a;weight=3;max_conns=200", MemberConfig(Address("redis-a", 6379), 3, 200)),
        ("redis-b;backup", MemberConfig(Address("redis-b", 6379), backup=True)),
        ("[::1]:5;max_conns=1;backup;weight=256", MemberConfig(Address("::1", 5), 256, 1, True)),
        ("::1;weight=2", MemberConfig(Address("::1", 6379), weight=2)),
        ("a; weight = 2 ", MemberConfig(Address("a", 6379), weight=2)),
    ],
)
def test_parse_member(text: str, expected: MemberConfig) -> None:
    assert parse_member(text, "--upstream", default_port=6379) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("redis-a:6379;weight=0", "weight=0: must be a whole number 1..256"),
        ("redis-a;weight=257", "weight=257: must be a whole number 1..256"),
        ("redis-a;weight=-1", "weight=-1: must be a whole number 1..256"),
        ("redis-a;weight=1.5", "weight=1.5: must be a whole number 1..256"),
        ("redis-a;weight", "weight: must be a whole number 1..256"),
        ("redis-a;max_conns=x", "max_conns=x: must be a whole number 1 or more"),
        ("redis-a;max_conns=0", "max_conns=0: must be a whole number 1 or more"),
        ("redis-a;colour=red", "colour=red: unknown member option; known: weight=N, max_conns=N, backup"),
        ("redis-a;backup=yes", "backup=yes: backup takes no value"),
        ("redis-a;weight=2;weight=3", "weight=3: weight is given twice"),
        ("redis-a;;weight=2", "empty member option between semicolons"),
        ("redis-a;", "empty member option between semicolons"),
    ],
)
def test_parse_member_rejects(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_member(text, "--upstream", default_port=6379)
    assert str(caught.value) == f"--upstream {text!r}: {problem}"


def test_a_bad_address_before_the_options_echoes_the_whole_spec() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_members(["redis-a:70000;weight=2"], "--upstream", default_port=6379)
    assert str(caught.value) == "--upstream 'redis-a:70000;weight=2': port must be 1..65535"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"weight": 0}, "weight 0: must be a whole number 1..256"),
        ({"weight": True}, "weight True: must be a whole number 1..256"),
        ({"max_conns": -5}, "max_conns -5: must be a whole number 1 or more"),
        ({"backup": "yes"}, "backup 'yes': must be true or false"),
    ],
)
def test_member_config_validates(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        MemberConfig(Address("a", 1), **settings)
    assert str(caught.value) == message
