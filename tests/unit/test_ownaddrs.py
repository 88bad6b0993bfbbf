"""Which addresses are the host's own, as tables: the /proc formats parsed, and the loop rule applied.

Pure: the /proc texts are samples; no sockets, no loop. The command's own refusal of such a member is in
test_cli.py.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from l4proxy.ownaddrs import LOOPBACK, is_own, local_networks, parse_fib_trie, parse_if_inet6

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
"""

IF_INET6 = """\
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


def test_parse_fib_trie_keeps_the_local_entries_only() -> None:
    assert parse_fib_trie(FIB_TRIE) == {
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("192.0.2.2/32"),
    }


def test_parse_if_inet6() -> None:
    assert parse_if_inet6(IF_INET6) == {ipaddress.ip_network("fe80::fc:ff:fe00:1"), ipaddress.ip_network("::1")}


def test_local_networks_reads_both_files_and_always_has_loopback(tmp_path: Path) -> None:
    assert local_networks(tmp_path) == set(LOOPBACK)  # no files: loopback only
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "if_inet6").write_text(IF_INET6)
    assert ipaddress.ip_network("192.0.2.2/32") in local_networks(tmp_path)
    assert ipaddress.ip_network("fe80::fc:ff:fe00:1/128") in local_networks(tmp_path)


LOCAL = parse_fib_trie(FIB_TRIE) | parse_if_inet6(IF_INET6) | set(LOOPBACK)


@pytest.mark.parametrize(
    ("member", "listen_host", "listen_ips", "own"),
    [
        ("127.0.0.1", "127.0.0.1", ["127.0.0.1"], True),
        ("127.0.0.2", "127.0.0.1", ["127.0.0.1"], False),  # another loopback address: not our socket
        ("::ffff:127.0.0.1", "127.0.0.1", ["127.0.0.1"], True),  # IPv4-mapped reaches the IPv4 listener
        ("::1", "::1", ["::1"], True),
        ("127.0.0.1", "localhost", ["127.0.0.1", "::1"], True),  # a listen name, resolved by the caller
        ("192.0.2.2", "", [], True),  # wildcard: every local address
        ("127.0.0.53", "", [], True),  # the whole loopback range is local
        ("fe80::fc:ff:fe00:1", "::", [], True),
        ("192.0.2.3", "", [], False),  # a neighbour on the same network
        ("10.0.0.1", "0.0.0.0", [], False),
    ],
)
def test_is_own(member: str, listen_host: str, listen_ips: list[str], own: bool) -> None:
    ips = [ipaddress.ip_address(ip) for ip in listen_ips]
    assert is_own(ipaddress.ip_address(member), listen_host, ips, LOCAL) is own
