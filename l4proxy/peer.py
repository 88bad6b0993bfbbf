"""How a socket address is written in logs: ``host:port``, ``[v6]:port``, ``-`` when unknown.

A leaf beside ``config.Address`` (whose ``str`` is the same form for configured addresses): the relay,
the access log and the proxy's start-up lines all format the addresses the loop hands them with these,
so the form is defined once. Pure: it imports nothing.
"""

from __future__ import annotations


def format_peer(address: object) -> str:
    """A socket address tuple as ``host:port`` (``[v6]:port``), ``-`` when it is not one."""
    if not isinstance(address, tuple) or len(address) < 2:
        return "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_peers(addresses: list[tuple[str, int]]) -> str:
    """Several socket addresses, comma-separated (a listener bound on IPv4 and IPv6)."""
    return ", ".join(map(format_peer, addresses))


class Carried(tuple[str, int, tuple[str, int] | None]):
    """A client address that a PROXY header carried: ``(host, port)`` as a socket address reads (so it
    is logged, matched and keyed like one), plus ``destination``, the address the client connected to
    (None: the socket's own), which the header sent on to a member repeats. A 3-tuple underneath, so
    it never equals a 2-tuple address of one of our own connections."""

    __slots__ = ()

    def __new__(cls, host: str, port: int, destination: tuple[str, int] | None) -> Carried:
        return tuple.__new__(cls, (host, port, destination))

    @property
    def destination(self) -> tuple[str, int] | None:
        return self[2]
