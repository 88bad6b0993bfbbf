"""Which addresses are this host's own, so a member that is the proxy itself is refused at start-up.

A member that points back at one of our listen addresses makes every health probe and every client
loop through the proxy until descriptors run out. It is one of ours when its port is the listen port and
its address is the listen address, or, for a wildcard listen address, any address of this host: the
kernel's local routing table (``/proc/net/fib_trie``, IPv4; whole ranges such as 127.0.0.0/8) and the
interface addresses (``/proc/net/if_inet6``, IPv6). Reading files is all this module does: names are
resolved by the caller.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Always ours, whatever the files say (and all there is where /proc is not).
LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
WILDCARDS = ("", "0.0.0.0", "::")


def parse_fib_trie(text: str) -> set[IPNetwork]:
    """The networks the kernel routes to this host: each ``|-- ADDR`` followed by ``/LEN host LOCAL``."""
    networks: set[IPNetwork] = set()
    address = ""
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["|--"] and len(words) == 2:
            address = words[1]
        elif len(words) >= 3 and words[0].startswith("/") and words[1:3] == ["host", "LOCAL"] and address:
            networks.add(ipaddress.ip_network(f"{address}{words[0]}", strict=False))
    return networks


def parse_if_inet6(text: str) -> set[IPNetwork]:
    """The IPv6 addresses of the interfaces: the first column, 32 hex digits."""
    networks: set[IPNetwork] = set()
    for line in text.splitlines():
        words = line.split()
        if words and len(words[0]) == 32:
            networks.add(ipaddress.ip_network(int(words[0], 16).to_bytes(16, "big")))
    return networks


def local_networks(proc: Path = Path("/proc/net")) -> set[IPNetwork]:
    """This host's addresses as networks, loopback included; only loopback where ``proc`` is unreadable."""
    networks = set(LOOPBACK)
    for name, parse in (("fib_trie", parse_fib_trie), ("if_inet6", parse_if_inet6)):
        try:
            networks |= parse((proc / name).read_text())
        except (OSError, ValueError):
            continue
    return networks


def unmapped(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as the IPv4 address it reaches."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_own(
    member_ip: IPAddress, listen_host: str, listen_ips: Iterable[IPAddress], local: Iterable[IPNetwork]
) -> bool:
    """Whether connecting to ``member_ip`` (on the listen port) reaches a listener bound to ``listen_host``,
    whose addresses are ``listen_ips`` (a wildcard host listens on every address in ``local``)."""
    ip = unmapped(member_ip)
    if listen_host in WILDCARDS:
        return any(ip.version == net.version and ip in net for net in local)
    return ip in {unmapped(listen) for listen in listen_ips}
