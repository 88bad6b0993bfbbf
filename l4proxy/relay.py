"""The byte pump of one session: two ``asyncio.Protocol``s, one per side, wired to each other.

Each ``Pump`` reads from its own transport and writes straight to the peer's transport: no queue, no
task, one Python call per chunk. The rules it keeps:

* **Backpressure**: transports get a high-water mark of ``buffer_size``; when the peer's write buffer
  passes it, asyncio calls the peer's ``pause_writing`` and we stop reading this side until
  ``resume_writing``. Memory per direction is bounded by ``buffer_size`` plus one read (the loop
  reads up to 256 KiB at a time), whatever the peers do.
* **Early bytes**: a client may talk before the upstream is connected (and uvloop delivers the first
  read even after ``pause_reading`` in ``connection_made``), so the client pump holds those bytes, up
  to ``buffer_size`` before it pauses reading, and the upstream receives them first.
* **Half-close**: EOF from one side becomes ``write_eof()`` on the other once its buffer drains; the
  session ends when both directions have ended. A TLS side does the same with close_notify: its
  transport is ``tlsengine.TLSEngine``, whose ``write_eof`` sends close_notify and reads on, and
  whose peer's close_notify (or FIN) is an ``eof_received`` like any other.
* **Resets**: when one side is lost with an error, the other side gets what was already read, then is
  closed; the sweeper's half-closed timeout reaps it if that peer never reads.
* **Idle**: the proxy's sweeper (one timer for every session) compares each session's byte counters
  with what it saw last tick, and closes sessions that stay quiet for ``idle_timeout``, or
  ``half_closed_timeout`` once one direction ended. The hot path does no timer work at all.
* **Engines**: a plain-TCP session whose reads come in full (``BULKY_STREAK`` reads of ``BULKY_READ``
  bytes or more in a row) may move to another engine (``splice.py``). The relay does not know engines:
  it calls the hooks its listener gave it (``Wiring.bulky``, ``Wiring.attached``), keeps what they
  install in ``Session.engine`` (anything with ``stop()``), and stops it before closing the transports.
* **Seams**: what the relay calls out to is typed here as small Protocols (``Engine``, ``Dialing``) and
  one ``Wiring`` per listener, so the relay imports no module above it (``tests/unit/test_imports.py``).
* **End causes**: ``end``, ``abort`` and ``fail`` offer a cause; ``causes.settle`` decides which one
  the session keeps (the rule is written down in ``causes.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from .causes import EOF, closed, lost, settle
from .peer import format_peer
from .tls import describe

if TYPE_CHECKING:
    from .balancer import Member
    from .config import ListenerConfig

BULKY_READ = 65536  # a read this large means the sender keeps the socket full
BULKY_STREAK = 4  # that many in a row make a plain-TCP session move to the splice engine (--relay auto)


class Engine(Protocol):
    """What ``Session.engine`` holds once an engine took over (or declined): ``end``/``abort`` stop it."""

    def stop(self) -> None: ...


class Dialing(Protocol):
    """The dial in flight for a session (``dialer.Dial``): cancelled when the client leaves first."""

    def cancel(self) -> None: ...


class _Still:
    """The engine of a session that stays on the transports (TLS, ``--relay transport``, no splice)."""

    __slots__ = ()

    def stop(self) -> None:
        return None


NEVER: Engine = _Still()
SessionHook = Callable[["Session"], None]


def stay(session: Session) -> None:
    """A ``bulky``/``attached`` hook for sessions that never switch engine: asked once, never again."""
    session.engine = NEVER


class Wiring:
    """What every session of one listener calls out to, built once per listener (``frontend.py``), so a
    session stores one reference instead of a hook each and compares no setting per session.

    ``client_ready``: the client's transport is up (after its TLS handshake): start the dial.
    ``ended``: both sides are gone (called once). ``bulky``: a bulky streak was seen. ``attached``: the
    upstream was just attached (``None``: nothing to do). ``reset_early``: the upstream reset before
    sending a byte (its member is attached; the session ends right after)."""

    __slots__ = ("attached", "buffer_size", "bulky", "client_ready", "ended", "limits", "reset_early")

    def __init__(
        self,
        limits: ListenerConfig,
        client_ready: SessionHook,
        ended: SessionHook,
        bulky: SessionHook = stay,
        attached: SessionHook | None = None,
        reset_early: SessionHook = stay,
    ) -> None:
        self.reset_early = reset_early
        self.limits = limits
        self.buffer_size = limits.buffer_size
        self.client_ready = client_ready
        self.ended = ended
        self.bulky = bulky
        self.attached = attached


class Pump(asyncio.Protocol):
    """One side of a session. ``peer`` is the pump of the other side."""

    __slots__ = ("closed", "eof", "nbytes", "out", "peer", "pending", "session", "streak", "transport")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.peer: Pump | None = None
        self.out: asyncio.Transport | None = None  # the peer's transport while it can be written to
        self.nbytes = 0
        self.eof = False  # this side sent us EOF
        self.closed = False  # this side's connection is gone
        self.pending: list[bytes] | None = None
        self.streak = 0  # consecutive bulky reads

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        limit = self.session.buffer_size
        transport.set_write_buffer_limits(limit, limit // 4)  # type: ignore[attr-defined]  # positional: no keyword dict
        session = self.session
        if self is session.client:  # after its TLS handshake, if any: note the TLS facts, start the dial
            if session.limits.tls is not None:
                session.note_tls()
            session.wiring.client_ready(session)

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        out = self.out
        if out is not None:
            out.write(data)
            if len(data) < BULKY_READ:
                self.streak = 0
            else:
                self.streak += 1
                session = self.session
                if self.streak >= BULKY_STREAK and session.engine is None:
                    session.wiring.bulky(session)
        elif self.peer is None and not self.closed:  # early: hold until the peer exists
            pending = self.pending
            if pending is None:
                self.pending = [data]
            else:
                pending.append(data)
            # with no peer yet, every byte read so far is still held here: pause past one buffer
            if self.nbytes >= self.session.buffer_size and self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return self.session.side_eof(self)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None:
            self.peer.out = None
        self.session.side_lost(self, exc)

    # helpers

    def flush_pending_to(self, peer: Pump) -> None:
        """Send held bytes to the newly connected peer, then resume normal relaying."""
        assert peer.transport is not None
        if self.pending:
            peer.transport.write(b"".join(self.pending))
        self.pending = None
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Session:
    """A client connection, its upstream connection, and the facts the access log needs.

    Lifecycle: accepted -> ``Wiring.client_ready`` (the frontend starts the dial) -> ``attach_upstream``
    or ``fail`` -> relaying -> ``end``/``abort`` -> both transports lost -> ``Wiring.ended`` exactly once.
    """

    __slots__ = (
        "buffer_size",
        "client",
        "client_address",
        "connect_time",
        "dial",
        "end_cause",
        "ended",
        "engine",
        "last_active",
        "limits",
        "member",
        "opener",
        "seen",
        "sockname",
        "started",
        "tls_info",
        "tried",
        "unprobed",
        "upstream",
        "wiring",
    )
    # set only by dialer.TimedDial (a JSON access log), so nothing reads them unset
    tried: list[Member]  # the members tried, in order
    connect_time: float  # seconds from the dial's start to the connect that succeeded

    def __init__(self, wiring: Wiring) -> None:
        self.wiring = wiring
        self.limits = wiring.limits
        self.buffer_size = wiring.buffer_size
        self.client = Pump(self)
        self.upstream: Pump | None = None
        self.member: Member | None = None
        self.dial: Dialing | None = None  # the dial in flight, cancelled if the client leaves first
        self.opener: Coroutine[Any, Any, Any] | None = None  # see frontend.py: finished by _unlink
        self.client_address: object = None  # as accept() returned it; formatted only when logged
        self.sockname: object = None  # the local address of its upstream connection, once connected
        self.seen = -1  # bytes moved as of the sweeper's last look; -1: not looked at yet
        self.started = time.time()
        self.last_active = 0.0  # set by the sweeper's first look, which sees "activity" (seen is -1)
        self.end_cause = ""
        self.ended = False
        self.tls_info: dict[str, str] | None = None
        self.engine: Engine | None = None  # set once another engine takes over (or NEVER: none will)
        self.unprobed = True  # the upstream socket has no keepalive yet (the sweeper sets it: sessions.py)

    # wiring

    def note_tls(self) -> None:
        """The client's TLS handshake is done: keep the facts the access log records."""
        transport = self.client.transport
        assert transport is not None
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls_info = {f"tls_{k}": v for k, v in describe(ssl_object).items() if v}

    def attach_upstream(self, pump: Pump, member: Member) -> None:
        """The dial succeeded: wire both pumps and deliver what each side already sent."""
        self.upstream, self.member = pump, member
        client = self.client
        pump.peer, client.peer = client, pump
        if client.pending is not None:
            client.flush_pending_to(pump)
        if pump.pending is not None:  # a server that speaks first
            pump.flush_pending_to(client)
        if not pump.closed:
            client.out = pump.transport
        if not client.closed:
            pump.out = client.transport
        if client.closed:  # it left while we dialed: what it sent is on its way, close after it
            self.end(self.end_cause)
        elif pump.closed:
            self.end(closed(client=False))
        elif client.eof and pump.eof:
            self.end(EOF)
        elif client.eof:
            self.side_eof(client)
        elif pump.eof:
            self.side_eof(pump)
        else:
            attached = self.wiring.attached  # with --relay splice; with auto, a bulky streak decides
            if attached is not None:
                attached(self)

    # events from the pumps

    def side_eof(self, pump: Pump) -> bool:
        """Half-close: forward the EOF; end the session once both directions are done. A side that cannot
        half-close (every transport here can; the rule stays for any that cannot) ends the session, and
        the label names the side that sent the EOF."""
        peer = pump.peer
        transport = pump.transport
        if peer is None:  # EOF before the other side exists: attach_upstream forwards it
            # Kept open for writing (a TLS side too: its engine can): side_lost keeps what it sent for
            # the upstream if it goes away.
            return transport is not None and transport.can_write_eof()
        if peer.eof or peer.closed:
            # Both directions are done. Closing the peer sends its FIN once its buffer is flushed, as
            # shutdown() would: one system call instead of two, on every session that ends cleanly.
            self.end(EOF)
            return False
        out = peer.transport
        if transport is None or out is None or not (transport.can_write_eof() and out.can_write_eof()):
            self.end(closed(client=pump is self.client))  # flushes both sides, then closes them
            return False
        if not out.is_closing():
            out.write_eof()
        return True

    def side_lost(self, pump: Pump, exc: Exception | None) -> None:
        if self.ended:
            self._finish_if_closed()
            return
        client = pump is self.client
        peer = pump.peer
        if peer is None:
            if client:
                self.end_cause = lost(client, exc is not None)
                if self.client.pending and self.dial is not None:
                    # Gone while dialing, but it sent bytes: they are ours to deliver. The dial goes
                    # on, attach_upstream hands them over and then closes (or fail() logs no upstream).
                    return
                self.ended = True  # gone while dialing and nothing to relay: stop the dial
                if self.dial is not None:
                    self.dial.cancel()
                self._finish_if_closed()
            return
        if exc is not None:
            self.note_reset(pump)
        self.end(EOF if exc is None and pump.eof and peer.eof else lost(client, exc is not None))

    def note_reset(self, pump: Pump) -> None:
        """``pump``'s side is lost with an error: an upstream that did so before sending a byte accepts
        and resets (an overloaded server), which outlier ejection counts. Only the reset path calls it."""
        if pump is self.upstream and not pump.nbytes:
            self.wiring.reset_early(self)

    # ending

    def end(self, cause: str) -> None:
        """Close both sides, flushing what was already read; ``Wiring.ended`` runs once both are gone."""
        if not self.end_cause:  # causes.settle for "end" (the first cause stays), without the call
            self.end_cause = cause
        if self.ended:
            return
        self.ended = True
        if self.engine is not None:
            self.engine.stop()
        transport = self.client.transport  # close() is idempotent on every transport: no is_closing()
        if transport is not None:
            transport.close()
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.close()
        self._finish_if_closed()

    def abort(self, cause: str) -> None:
        """Tear both sides down now, discarding buffers (idle timeout, forced shutdown)."""
        self.end_cause = settle(self.end_cause, self.ended, "abort", cause)
        self.ended = True
        if self.engine is not None:
            self.engine.stop()
        if self.dial is not None:
            self.dial.cancel()
        self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()
        self._finish_if_closed()

    def fail(self, cause: str) -> None:
        """No upstream could be reached: close the client at once."""
        self.end_cause = settle(self.end_cause, self.ended, "fail", cause)
        self.ended = True
        self.client.abort()
        self._finish_if_closed()

    def _finish_if_closed(self) -> None:
        if (self.client.closed or self.client.transport is None) and (self.upstream is None or self.upstream.closed):
            wiring, self.wiring = self.wiring, _FINISHED
            wiring.ended(self)
            self._unlink()

    def discard(self) -> None:
        """The client never became a session (its TLS handshake failed): break the same cycles."""
        self._unlink()

    def _unlink(self) -> None:
        """Break the reference cycles (session <-> pumps <-> transports, session -> task) once both sides
        are gone, so the session is freed by reference counting instead of waiting for the cyclic GC,
        which under a connection storm otherwise costs several percent of the CPU. Only the counters and
        facts the access log reads stay."""
        self.dial = None
        opener, self.opener = self.opener, None
        if opener is not None:  # its transport is closed: let the coroutine return (or raise) now
            try:
                opener.send(None)
            except StopIteration:
                pass
            except Exception:  # its waiter failed: nothing is left to clean up
                pass
        for pump in (self.client, self.upstream):
            if pump is not None:
                pump.peer = pump.out = None
                pump.transport = None
                pump.session = None  # type: ignore[assignment]  # no callback comes after connection_lost

    @property
    def client_addr(self) -> str:
        return format_peer(self.client_address)

    def moved(self) -> int:
        """Bytes read from either side so far: the sweeper's measure of activity."""
        up = self.upstream
        return self.client.nbytes + (up.nbytes if up is not None else 0)

    @property
    def half_closed(self) -> bool:
        up = self.upstream
        return self.ended or self.client.eof or (up is not None and up.eof)

    @property
    def bytes_in(self) -> int:
        """Bytes read from the client (sent upstream)."""
        return self.client.nbytes

    @property
    def bytes_out(self) -> int:
        """Bytes read from the upstream (sent to the client)."""
        return self.upstream.nbytes if self.upstream is not None else 0


def _noop(session: Session) -> None:
    return None


_FINISHED = Wiring.__new__(Wiring)  # a finished session's: its hooks have all run, none runs again
_FINISHED.client_ready = _FINISHED.ended = _FINISHED.bulky = _noop
_FINISHED.attached = None
