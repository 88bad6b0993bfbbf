"""The edge of a listener: who the client is (a PROXY header) and whether it may connect (rules, limits).

``Edge`` builds a listener's ``Frontend.stages`` from its config, only for what is set, so a listener
without these features runs no stage at all:

* **The PROXY header** (``accept_proxy``): before the session exists, the header is read from the
  accepted socket and parsed (``proxyproto``, strict: required, never guessed). The address it carries
  is the client's from then on (``peer.Carried``): the rules below, the per-source limits, the access
  log and the header sent on to a member all see it. ``LOCAL`` and ``UNKNOWN`` headers mean the
  socket's own addresses. With ``accept_proxy_from`` only peers in those ranges must send one; others
  are direct clients, whose bytes are not looked at.
* **The gate**: ``allow``/``deny`` CIDR rules (``acl.Acl``), then ``max_connections_per_ip`` and
  ``rate_per_ip`` (``acl.SourceTable``, per process). A refused client is closed at once; nothing is
  dialed.

Every refusal is counted by reason (``refused``: ``counters.REFUSALS``, deny, not_allowed,
max_connections_per_ip, rate_per_ip; ``header_errors``: ``HEADER_ERRORS``, each ``proxyproto.REASONS``
entry, timeout, eof, reset) and logged, rate-limited (``ratelog``), since any client can cause one;
``/metrics`` shows both tables per listener.

**Reading exactly the header.** Each time the socket is readable, what has arrived is peeked
(``MSG_PEEK``, 256 bytes at a time) and fed to the connection's parser. A complete header is then consumed exactly (a
``recv`` of its length), an incomplete one whole (every byte of it is header). So nothing after the
header is ever taken from the kernel: the client's first bytes are read by whatever comes next, the
session's transport, its TLS handshake or the splice engine, with nothing to replay. The first try is
made at once, since a load balancer's header has usually arrived by the time its connection is
accepted; only a client still silent is watched (``add_reader``) and given a deadline, one loop timer
for all of them (``deadlines.Deadlines``). A client that never sends its header holds one descriptor
until ``proxy_timeout``; a malformed one is closed as soon as its first wrong byte arrives.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable

from .acl import Acl, SourceLimits, SourceTable
from .awaiting import Awaited, Rejects, expire
from .config import ListenerConfig
from .deadlines import Deadlines
from .listener import AcceptedFD
from .peer import Carried, format_peer
from .proxyproto import REASONS, Command, Parser, ProxyProtocolError
from .ratelog import Warnings

log = logging.getLogger("l4proxy")

REFUSED = "refused clients"  # rate-limited kinds of warnings (ratelog.py)
BAD_HEADERS = "clients closed for their PROXY header"

Serve = Callable[[socket.socket | AcceptedFD, object], None]  # as frontend.Serve
Stage = Callable[[Serve], Serve]

HEADER_ERRORS = (*REASONS, "timeout", "eof", "reset")  # why clients were closed for their PROXY header
_PEEK = 256  # a v1 line, or a v2 header with its addresses and some TLVs; a longer one takes more peeks
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


class Edge:
    """The stages of one listener, the tables they keep and what they counted."""

    def __init__(self, config: ListenerConfig, warnings: Warnings, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.warnings = warnings
        self.clock = clock
        self.refused: Counter[str] = Counter()
        self.header_errors: Counter[str] = Counter()
        rules = config.allow or config.deny
        self.acl = Acl(_networks(config.allow), _networks(config.deny)) if rules else None
        limited = config.max_connections_per_ip is not None or config.rate_per_ip is not None
        limits = SourceLimits(config.max_connections_per_ip, config.rate_per_ip)
        self.sources = SourceTable(limits) if limited else None
        self.senders = Acl(_networks(config.accept_proxy_from)) if config.accept_proxy_from else None
        self.reading: set[Awaited] = set()  # clients whose header has not arrived yet
        late = f"no PROXY header within {config.proxy_timeout:g}s"
        self.rejects = Rejects(self.header_errors, warnings, BAD_HEADERS, config.address, late)
        self.deadlines: Deadlines | None = None

    def stages(self) -> list[Stage]:
        """The stages this listener needs, in order: the header first, so the gate sees its address."""
        stages: list[Stage] = []
        if self.config.accept_proxy:
            stages.append(self.read_header)
        if self.acl is not None or self.sources is not None:
            stages.append(self.gate)
        return stages

    def leave(self, address: object) -> None:
        """A client the gate admitted is gone (``Frontend.leave``, set only with per-source limits)."""
        assert self.sources is not None
        self.sources.release(address[0])  # type: ignore[index]

    def close(self) -> None:
        """Close the clients whose header is still awaited (the listener is closing)."""
        for reading in list(self.reading):
            reading.close()
        if self.deadlines is not None:
            self.deadlines.close()

    # the stages

    def gate(self, serve: Serve) -> Serve:
        """Rules first (a cached verdict per source), then the per-source limits."""
        acl, sources, clock = self.acl, self.sources, self.clock

        def gated(sock: socket.socket | AcceptedFD, address: object) -> None:
            host: str = address[0]  # type: ignore[index]
            if acl is not None and not acl.allows(host):
                why = acl.refusal(host) or "refused"
                self._refuse(sock, address, "deny" if why.startswith("denied") else "not_allowed", why)
                return
            if sources is not None:
                over = sources.admit(host, clock())
                if over is not None:
                    self._refuse(sock, address, over.partition(" ")[0], over)
                    return
            serve(sock, address)

        return gated

    def read_header(self, serve: Serve) -> Serve:
        """Read each client's PROXY header before anything else happens to it (peers outside
        ``accept_proxy_from``, when set, are served as they are)."""
        loop = asyncio.get_running_loop()
        self.deadlines = Deadlines(loop, expire, granularity=0.05)
        senders = self.senders

        def reading(sock: socket.socket | AcceptedFD, address: object) -> None:
            if senders is not None and not senders.allows(address[0]):  # type: ignore[index]
                serve(sock, address)
                return
            _Reading(self, loop, sock, address, serve).start()

        return reading

    def _refuse(self, sock: socket.socket | AcceptedFD, address: object, reason: str, why: str) -> None:
        _close(sock)
        self.refused[reason] += 1
        self.warnings.warn(log, REFUSED, "refused %s on %s: %s", format_peer(address), self.config.address, why)


class _Reading(Awaited):
    """One client whose PROXY header is being read (see the module's docstring)."""

    __slots__ = ("edge", "parser", "serve")

    def __init__(
        self,
        edge: Edge,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket | AcceptedFD,
        address: object,
        serve: Serve,
    ) -> None:
        super().__init__(loop, sock, address, edge.reading, edge.rejects)
        self.edge = edge
        self.serve = serve
        self.parser = Parser()

    def start(self) -> None:
        if not self.read():
            self.watch(self.edge.deadlines, self.edge.config.proxy_timeout, self.read)

    def read(self) -> bool:
        """Take what has arrived; True once the client is handed on or closed."""
        raw = self.raw
        while True:
            try:
                data = raw.recv(_PEEK, _PEEK_FLAGS)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self.fail("reset")
                return True
            if not data:
                self.fail("eof")
                return True
            try:
                parsed = self.parser.feed(data)
            except ProxyProtocolError as exc:
                self.fail(exc.reason, exc.message)
                return True
            try:
                raw.recv(len(data) if parsed is None else parsed.consumed, socket.MSG_DONTWAIT)  # peeked: there
            except OSError:  # reset in between
                self.fail("reset")
                return True
            if parsed is not None:
                break
            if len(data) < _PEEK:  # all there is: wait for the rest
                return False
        header = parsed.header
        address = self.address
        if header.command is Command.PROXY and header.source is not None:
            address = Carried(header.source[0], header.source[1], header.destination)
        self.hand_on(self.serve, address)
        return True


def _networks(texts: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(text) for text in texts]  # canonical: checked by ListenerConfig


def _close(sock: socket.socket | AcceptedFD) -> None:
    """Close a client no transport has taken (an ``AcceptedFD``'s own ``close`` does nothing)."""
    if isinstance(sock, AcceptedFD):
        os.close(sock)
    else:
        sock.close()
