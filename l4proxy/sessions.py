"""The live sessions of one proxy: who is open, the sweeper, the drain and the abort.

``live`` holds every session whose client is connected (from ``Wiring.client_ready`` until
``Wiring.ended``, both in ``frontend.py``); ``opening`` the clients whose transport is not made yet
(a TLS handshake, or one loop iteration), which a drain closes instead of waiting for.

**The sweeper** is one timer for all sessions: each tick it compares every session's byte counters
with what it saw last tick, and aborts those quiet for their ``idle_timeout``, or
``half_closed_timeout`` once one direction ended; the hot path does no timer work at all. The same
tick runs the proxy's periodic chores (flushing the access log and the rate-limited warnings,
re-reading the open-files limit).

**The drain** waits for the live sessions up to its timeout; those left are closed over its last
second (``spread.py``), not in one instant, so their clients do not reconnect in one storm.

**Upstream keepalive**: the client side has ``--tcp-keepalive`` from the listening socket (accepted
sockets inherit it), but a connected socket inherits nothing, and four ``setsockopt`` calls per
connect cost about a seventh of a short session's work. Keepalive only matters on a connection that
stays quiet, so the sweeper sets it at a session's first quiet tick, once: a session over before that
never needed it, and one that goes quiet has it within a tick, its vanished peer found within
``tick + 3 * idle`` as on the client side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .causes import MAX_DURATION, MEMBER_DOWN
from .counters import ListenerCounters
from .drive import Drive
from .listener import keepalive_options
from .relay import Session
from .spread import WINDOW, close_schedule
from .tlsengine import TLSEngine

log = logging.getLogger("l4proxy")

_OPENING_ROUNDS = 4  # loop iterations a drain gives plain clients to become sessions (one is enough)


class SessionTable:
    """Live and opening sessions, their sweeper, drain and abort."""

    def __init__(self) -> None:
        self.live: set[Session] = set()
        self.opening: dict[Session, Drive | Coroutine[Any, Any, Any] | TLSEngine] = {}
        self.counted: list[ListenerCounters] = []  # every listener's counters, a reload's old ones too
        self.idle = asyncio.Event()  # set when the last live session ends
        self.closed_member_down = 0  # sessions closed because their member went DOWN (--on-member-down)
        self.durations = False  # some listener has a --max-session-duration: sweep for it
        self.closed_old = 0  # sessions closed for their age (--max-session-duration)
        self._closing: set[asyncio.TimerHandle] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.live)

    @property
    def served(self) -> int:
        """Sessions ended so far, on every listener (each counts its own: one addition per session)."""
        return sum(counters.ended for counters in self.counted)

    def start(self, tick: float, chores: Sequence[Callable[[], None]]) -> None:
        """Run the sweeper every ``tick`` seconds, with ``chores`` before each sweep."""
        self._sweeper = asyncio.create_task(self._sweep(tick, tuple(chores)), name="l4proxy sweeper")

    def close_member(self, pool: str, member: object, name: str, spread: float = 1.0, why: str = "is DOWN") -> None:
        """End the sessions on ``member`` (of pool ``pool``, named ``name``, which ``why``) one by one over
        ``spread`` seconds, so its clients reconnect to the other members without arriving all at once;
        a session that is over by its turn is passed."""
        sessions = [s for s in self.live if s.member is member]
        if not sessions:
            return
        log.warning(
            "pool %s member %s %s: closing its %d sessions over %gs (--on-member-down close)",
            pool, name, why, len(sessions), spread,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._closing = {h for h in self._closing if h.when() > now and not h.cancelled()}  # those to come
        for index, session in enumerate(sessions):
            self._closing.add(loop.call_later(spread * index / len(sessions), self._close_one, session))

    def _close_one(self, session: Session) -> None:
        if not session.ended:
            self.closed_member_down += 1
            session.end(MEMBER_DOWN)

    def _expire(self, wall: float) -> None:
        """``--max-session-duration``: end the sessions older than it that were quiet for the last tick
        (no byte moved since the sweeper's last look), and any older than it plus their jitter (0..10%,
        fixed per session, so sessions opened together do not all end in the same tick)."""
        for session in list(self.live):
            limit = session.limits.max_session_duration
            if not limit or session.ended:
                continue
            age = wall - session.started
            if age < limit:
                continue
            quiet = session.moved() == session.seen
            if quiet or age >= limit * (1.0 + jitter(session)):
                self.closed_old += 1
                session.end(MAX_DURATION)

    async def drain(self, timeout: float, spread: float = WINDOW) -> None:
        """Close the opening clients, let live sessions finish for up to ``timeout``, and close the rest
        over its last ``spread`` seconds (all of it when shorter), so their clients do not all reconnect
        in the same instant (``spread.py``)."""
        await self.cancel_opening()
        if self.live:
            count = len(self.live)
            log.info("draining %d session%s for up to %.1fs", count, "" if count == 1 else "s", timeout)
            window = max(0.0, min(spread, timeout))
            self.idle.clear()
            if not await self._idle_within(timeout - window):
                await self.close_spread("shutdown", window)

    async def close_spread(self, cause: str, window: float) -> None:
        """Close the live sessions in batches over ``window`` seconds, the last batch at its end; stops
        early once none is left (they ended, or ``abort_all`` closed them)."""
        sessions = list(self.live)
        count = len(sessions)
        over = f" over {window:.2f}s" if window > 0 else ""
        log.info("closing %d session%s%s: %s", count, "" if count == 1 else "s", over, cause)
        loop = asyncio.get_running_loop()
        began = loop.time()
        closed = 0
        for offset, upto in close_schedule(count, window):
            if await self._idle_within(began + offset - loop.time()):
                return
            for session in sessions[closed:upto]:
                if session in self.live:
                    session.abort(cause)
            closed = upto

    async def _idle_within(self, seconds: float) -> bool:
        """Whether the last live session ends within ``seconds`` (at once when none is left)."""
        if not self.live:
            return True
        if seconds <= 0:
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.idle.wait(), seconds)
        return not self.live

    async def cancel_opening(self) -> None:
        """Close the clients still in their TLS handshake: they are not sessions yet, and must not become
        sessions (dial, relay, log) after the drain has returned. A plain client whose transport is
        being made is connected and has sent its bytes (closing it would reset it): its
        ``connection_made`` is already on the loop's queue, so a few iterations make it a session,
        which the drain then waits for."""
        for _ in range(_OPENING_ROUNDS):
            if all(isinstance(opener, TLSEngine) for opener in self.opening.values()):
                break
            await asyncio.sleep(0)
        opening = list(self.opening.values())
        self.opening.clear()
        for drive in opening:
            if isinstance(drive, Drive):
                drive.cancel()
            else:  # a client's connect_accepted_socket on uvloop, or its TLS engine: closing closes the transport
                drive.close()
        if opening:
            await asyncio.sleep(0)  # the cancelled handshakes close their transports on this iteration

    def abort_all(self, cause: str) -> None:
        """Close every session now (a second signal)."""
        if self.live:
            count = len(self.live)
            log.info("closing %d session%s: %s", count, "" if count == 1 else "s", cause)
        for handle in self._closing:
            handle.cancel()
        self._closing.clear()
        for session in list(self.live):
            session.abort(cause)

    async def stop(self) -> None:
        """Stop the sweeper."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def _sweep(self, tick: float, chores: tuple[Callable[[], None], ...]) -> None:
        while True:
            await asyncio.sleep(tick)
            for chore in chores:
                chore()
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Abort the sessions that have been quiet past their timeout as of ``now``."""
        if self.durations:
            self._expire(time.time())
        for session in list(self.live):
            moved = session.moved()
            if moved != session.seen:
                session.seen = moved
                session.last_active = now
                continue
            limits = session.limits
            if session.unprobed and session.upstream is not None:
                session.unprobed = False
                keep_alive(session, limits.tcp_keepalive)
            half = session.half_closed
            if now - session.last_active >= (limits.half_closed_timeout if half else limits.idle_timeout):
                session.abort("half_closed_timeout" if half else "idle_timeout")


def keep_alive(session: Session, idle: float) -> None:
    """TCP keepalive after ``idle`` seconds (``keepalive_options``) on the session's upstream socket,
    through the transport's own socket object: a second socket object over the same descriptor kept the
    connection open after the transport closed it (no FIN: the peer hung), and this runs only once per
    session that goes quiet."""
    options = keepalive_options(idle)
    upstream = session.upstream
    transport = None if upstream is None else upstream.transport
    found = None if not options or transport is None else transport.get_extra_info("socket")
    if found is None:
        return
    try:
        for option in options:
            found.setsockopt(*option)
    except (OSError, ValueError):  # reset or closed meanwhile: nothing to keep alive
        pass


def jitter(session: object) -> float:
    """A session's share (0..0.1) of extra time past ``--max-session-duration``: fixed for the session
    (from its identity), spread evenly over sessions."""
    return (id(session) >> 4) % 1000 / 10000
