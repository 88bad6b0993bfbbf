"""The edge's settings as values: the config fields check and canonicalise themselves, and a config
file sets them with the line of each problem. Pure: no sockets."""

from __future__ import annotations

import pytest

from l4proxy import configfile
from l4proxy.cli import FILE_FORMS
from l4proxy.config import Address, ListenerConfig, PoolConfig
from l4proxy.configfile import ConfigFileError, dump
from l4proxy.errors import ConfigError

LISTEN = Address("127.0.0.1", 7000)

REFUSED = [
    ({"allow": ("10.0.0.1/8",)}, "allow[0] '10.0.0.1/8': has host bits set: the range is 10.0.0.0/8"),
    ({"deny": ("::1", "fe80::1%eth0")}, "deny[1] 'fe80::1%eth0': a range cannot carry a zone index (%...)"),
    ({"allow": "10.0.0.0/8"}, "allow '10.0.0.0/8': expected a list of CIDR ranges"),
    ({"accept_proxy_from": ("10.0.0.0/8",)}, "accept_proxy_from ['10.0.0.0/8']: needs accept_proxy"),
    ({"accept_proxy": True, "proxy_timeout": 0.0}, "proxy_timeout 0.0: must be greater than 0"),
    ({"max_connections_per_ip": 0}, "max_connections_per_ip 0: must be at least 1"),
    ({"rate_per_ip": True}, "rate_per_ip True: must be at least 1"),
]


@pytest.mark.parametrize(("settings", "message"), REFUSED)
def test_listener_settings_that_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ListenerConfig(LISTEN, **settings)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_ranges_are_kept_canonical() -> None:
    listener = ListenerConfig(LISTEN, allow=("10.0.0.0/8", "2001:DB8:0::/32", "192.0.2.7"), deny=("::ffff:0:0/96",))
    assert (listener.allow, listener.deny) == (("10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"), ("::ffff:0:0/96",))


def test_send_proxy_is_v1_or_v2() -> None:
    assert PoolConfig((LISTEN,), send_proxy="v2").send_proxy == "v2"
    with pytest.raises(ConfigError, match=r"send_proxy 'v3': expected v1 or v2"):
        PoolConfig((LISTEN,), send_proxy="v3")


FILE = """
[listeners.cache]
address = "127.0.0.1:7000"
pool = "cache"
accept_proxy = true
accept_proxy_from = ["10.0.0.2", "10.1.0.0/16"]
proxy_timeout = "2s"
allow = ["10.0.0.0/8"]
deny = ["10.6.0.0/16"]
max_connections_per_ip = 20
rate_per_ip = "50/s"

[pools.cache]
members = ["127.0.0.1:7001"]
send_proxy = "v2"
"""


def load(text: str) -> object:
    return configfile.load(text.encode(), FILE_FORMS, "/cfg", lambda _path: True)


def test_a_file_sets_every_edge_setting_and_dumps_what_reads_back() -> None:
    config = load(FILE)
    [listener] = config.listeners  # type: ignore[attr-defined]
    assert (listener.accept_proxy, listener.accept_proxy_from, listener.proxy_timeout) == (
        True, ("10.0.0.2/32", "10.1.0.0/16"), 2.0,
    )  # fmt: skip
    assert (listener.allow, listener.deny, listener.max_connections_per_ip, listener.rate_per_ip) == (
        ("10.0.0.0/8",), ("10.6.0.0/16",), 20, 50,
    )  # fmt: skip
    assert config.pools[0].send_proxy == "v2"  # type: ignore[attr-defined]
    assert load(dump(config)) == config  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('allow = ["10.0.0.0/33"]',
         "f.toml:5: listeners.cache.allow[0]: prefix length must be 0..32 (got '10.0.0.0/33')"),
        ('rate_per_ip = "lots"', "f.toml:5: listeners.cache.rate_per_ip: expected a rate such as 100/s (got 'lots')"),
        ('accept_proxy_from = ["10.0.0.2"]',
         "f.toml:5: listeners.cache.accept_proxy_from: needs accept_proxy (got ['10.0.0.2/32'])"),
    ],
)
def test_a_files_problem_names_its_line(line: str, problem: str) -> None:
    text = f'\n[listeners.cache]\naddress = "127.0.0.1:7000"\npool = "default"\n{line}\n'
    text += '[pools.default]\nmembers = ["127.0.0.1:7001"]\n'
    with pytest.raises(ConfigFileError) as caught:
        load(text)
    caught.value.filename = "f.toml"
    assert caught.value.lines() == [problem]
