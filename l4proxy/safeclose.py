"""``--drain-at safe``: put a drained session's bytes in front of a ``boundaries`` watch, and close
the session at the first moment the watch calls safe.

The relay's pumps write each chunk to ``Pump.out`` (the peer's transport). Watching a session swaps
both ``out``s for taps that hand the chunk to the watch and write it on: the relay's code is the same
for every session, and a session that is not drained never meets a tap (normal traffic pays nothing).
Once the server's chunk is written and the watch says safe, the session ends as a clean close
(``end``: what was written is flushed first) with the cause ``drained``.

A session that already moved to the splice engine (its bytes no longer pass through the pumps) or has
no upstream yet cannot be watched; it is closed at the drain timeout as before. One whose switch was
still to come (waiting for a quiet moment) stays on the pumps instead. With ``--drain-at safe`` and
``--relay auto`` the sessions of a pool whose protocol is read never switch (``Proxy._frontend``), so
only ``--relay splice`` leaves sessions that cannot be watched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .boundaries import Watch, watch_for
from .relay import NEVER, Session
from .splice import switched

Leaving = Callable[[Session], bool]  # whether the session is still to end (its member not taken back)


def _always(session: Session) -> bool:
    return True

DRAINED = "drained"  # the end cause of a session closed at a safe moment


class _ClientTap:
    """The client pump's ``out``: client bytes, seen by the watch, then on to the upstream."""

    __slots__ = ("transport", "watch")

    def __init__(self, transport: asyncio.Transport, watch: Watch) -> None:
        self.transport = transport
        self.watch = watch

    def write(self, data: bytes) -> None:
        self.transport.write(data)
        self.watch.client(data)


class _ServerTap:
    """The upstream pump's ``out``: server bytes, on to the client, then the watch may end the session."""

    __slots__ = ("leaving", "session", "transport", "watch")

    def __init__(self, transport: asyncio.Transport, watch: Watch, session: Session, leaving: Leaving) -> None:
        self.transport = transport
        self.watch = watch
        self.session = session
        self.leaving = leaving

    def write(self, data: bytes) -> None:
        self.transport.write(data)
        session = self.session
        if self.watch.server(data) and not session.ended and self.leaving(session):
            session.end(DRAINED)


def watch(session: Session, protocol: str, leaving: Leaving = _always) -> bool:
    """Start watching ``session`` in ``protocol`` (``config.DRAIN_PROTOCOLS``), to end it at a safe moment
    while ``leaving`` says it is still to end; False when it cannot be watched (no upstream yet, ended,
    on the splice engine) or is watched already."""
    upstream = session.upstream
    client = session.client
    if session.ended or upstream is None or client.out is None or upstream.out is None:
        return False
    if isinstance(client.out, _ClientTap):
        return False
    engine = session.engine
    if engine is not None and engine is not NEVER:
        if switched(session):
            return False
        engine.stop()  # a switch to the splice engine still to come: it never will
    session.engine = NEVER  # stays on the pumps, where the taps are
    seen = watch_for(protocol)
    client.out = _ClientTap(client.out, seen)  # type: ignore[assignment]
    upstream.out = _ServerTap(upstream.out, seen, session, leaving)  # type: ignore[assignment]
    return True
