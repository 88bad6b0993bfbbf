"""A client whose first bytes a listener stage waits for before it has a session (its PROXY header,
its TLS ClientHello): the socket as accepted, the reader watching it and its deadline.

The stages (``edge.py``, ``sni.py``) make the first try at once, since those bytes have usually arrived
with the connection; only a client still silent is ``watch``ed, in its stage's set of waiting clients
and under one loop timer for all of them (``deadlines.Deadlines``). Whatever ends the wait, ``stop``
undoes exactly what ``watch`` did; ``hand_on`` gives the next stage the socket as it was accepted,
and ``fail`` closes a client whose first bytes are wrong, late or never came, counted and logged
where its stage says (``Rejects``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from .deadlines import Deadlines
from .listener import AcceptedFD
from .peer import format_peer
from .ratelog import Warnings

log = logging.getLogger("l4proxy")


@dataclass(frozen=True, slots=True)
class Rejects:
    """Where a stage counts and logs the clients it closes: ``counts`` by reason, and a warning of the
    rate-limited ``kind`` naming the listener address ``where``; ``late`` is the warning's text for a
    client whose time ran out."""

    counts: Counter[str]
    warnings: Warnings
    kind: str
    where: object
    late: str


class Awaited:
    """One accepted client a stage is reading (or peeking) at; subclasses add what they parse."""

    __slots__ = ("address", "bucket", "loop", "raw", "rejects", "sock", "waiting")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket | AcceptedFD,
        address: object,
        waiting: set[Awaited],
        rejects: Rejects,
    ) -> None:
        self.loop = loop
        self.sock = sock  # as accepted: what the next stage gets
        # recv with flags needs a socket object; one made from the bare number costs no system call
        self.raw = sock if isinstance(sock, socket.socket) else socket.socket(sock.family, socket.SOCK_STREAM, 0, sock)
        self.address = address
        self.waiting = waiting  # the stage's clients still awaited
        self.bucket: set[Hashable] | None = None  # its deadline, once it is waited for
        self.rejects = rejects

    def watch(self, deadlines: Deadlines | None, timeout: float, readable: Callable[[], object]) -> None:
        """Call ``readable`` whenever the socket is readable, until ``stop`` or ``timeout`` from now."""
        assert deadlines is not None
        self.waiting.add(self)
        self.loop.add_reader(self.raw.fileno(), readable)
        self.bucket = deadlines.add(self, timeout)

    def stop(self) -> None:
        """No more reader, no deadline (safe when never watched, and twice)."""
        if self in self.waiting:
            self.waiting.discard(self)
            self.loop.remove_reader(self.raw.fileno())
        if self.bucket is not None:
            self.bucket.discard(self)
            self.bucket = None

    def close(self) -> None:
        """Close the client: no session will have it."""
        self.stop()
        self.raw.close()

    def expired(self) -> None:
        """Its deadline passed (``expire``, from the stage's ``Deadlines``)."""
        self.bucket = None
        self.fail("timeout", self.rejects.late)

    def fail(self, reason: str, message: str | None = None) -> None:
        """Close the client: what it sent first is wrong, late or never came; counted by ``reason``, and
        logged (rate-limited) when there is a ``message``."""
        rejects = self.rejects
        rejects.counts[reason] += 1
        if message is not None:
            where = format_peer(self.address)
            rejects.warnings.warn(log, rejects.kind, "closed %s on %s: %s", where, rejects.where, message)
        self.close()

    def hand_on(self, serve: Callable[[socket.socket | AcceptedFD, object], None], address: object) -> None:
        """Give the client to the next stage as it was accepted, as ``address``."""
        self.stop()
        if self.raw is not self.sock:
            self.raw.detach()  # the number goes on as accepted
        serve(self.sock, address)


def expire(awaited: Hashable) -> None:
    """The ``Deadlines`` callback of a stage's waiting clients."""
    assert isinstance(awaited, Awaited)
    awaited.expired()
