"""The zero-copy engine: plain-TCP sessions that prove bulky move their bytes with ``os.splice``.

Every session starts on the transport engine (``relay.Pump``). A plain-TCP session (neither side TLS)
is moved here when a pump sees several full reads in a row (``relay --relay auto``), or as soon as it is
attached (``--relay splice``). From then on the bytes go socket -> pipe -> socket inside the kernel: no
copy to user space, about two system calls per pipe-full, one Python callback per wake-up.

* **The switch** is synchronous and happens only at a quiet moment: both transports' write buffers are
  empty (every byte read so far is in the kernel), nothing is held for a peer, no side has sent EOF.
  Then both transports pause reading and stay paused, idle and open; the engine works on ``dup()``s of
  their sockets (a loop refuses ``add_reader`` on a descriptor a transport owns, and a dup has another
  number). If the moment is not quiet, the switch is retried shortly (bounded), never waited for while
  paused: pausing both directions while waiting for one to drain could deadlock an echoing peer.
  A switch costs six descriptors (``DESCRIPTORS``: two dups, two pipes); when that would leave fewer
  than ``SPARE`` below the open-files limit, the session stays on the transport engine, so new clients'
  upstream connects are not starved (the listener counts them for ``--relay splice``).
* **Backpressure**: a direction never reads more than its pipe holds. When the pipe is full, or a
  read finds no room while bytes are still in it, the direction stops reading until the write side has
  drained the pipe. Memory per direction is the pipe (1 MiB, or less if the system allows less), in
  the kernel; nothing is buffered in Python.
* **Half-close**: EOF read from one side becomes ``shutdown(SHUT_WR)`` on the other once that
  direction's pipe is drained; the session ends when both directions are done.
* **Resets**: a read or write error (ECONNRESET, EPIPE) tears both sides down, after one attempt to
  pass on what the pipe toward the surviving side already holds.
* **Counters and timeouts**: bytes read are added to the pumps' ``nbytes`` and EOFs set the pumps'
  ``eof``, so the access log, ``Session.moved()`` and the sweeper's idle and half-closed timeouts work
  unchanged. Ending the session (``Session.end``/``abort``) stops the engine first, then closes the
  transports, which deliver ``connection_lost`` as on the transport engine.

Pipes come from a small pool (creating and sizing a pipe costs three system calls): a drained pipe is
reused, one that still holds bytes is closed. The pool belongs to a ``Splicing``, one per proxy, whose
``start`` is the relay's ``bulky``/``attached`` hook for the listeners whose sessions may switch
(``usable``); ``Splicing.close`` closes the idle pipes when the proxy stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import resource
import socket
import sys
from typing import TYPE_CHECKING

from .causes import EOF, lost
from .relay import NEVER

if TYPE_CHECKING:
    from .config import ListenerConfig
    from .relay import Pump, Session

__all__ = ["AVAILABLE", "DESCRIPTORS", "NEVER", "PipePool", "Splicer", "Splicing", "pipe_size", "switched", "usable"]

AVAILABLE = sys.platform.startswith("linux") and hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
PIPE_SIZE = 1 << 20  # per direction; capped by /proc/sys/fs/pipe-max-size
POOL_MAX = 16  # idle pipes kept for reuse (1 MiB pipes count against the user's pipe-user-pages-soft)
RETRIES = 50  # attempts to find a quiet moment before giving up (until the next bulky streak)
RETRY_DELAY = 0.005
DESCRIPTORS = 6  # a switched session holds a dup of each socket and two pipes, beyond its two sockets
SPARE = 16  # a switch is declined when it would leave fewer free descriptors than this below the limit

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOTCONN, errno.EHOSTUNREACH, errno.ENETUNREACH)


def pipe_size() -> int:
    """The size a new pipe is given: ``PIPE_SIZE``, capped by the system's maximum."""
    try:
        with open("/proc/sys/fs/pipe-max-size", encoding="ascii") as f:
            return min(PIPE_SIZE, int(f.read()))
    except (OSError, ValueError):
        return 65536


class PipePool:
    """Idle pipes ``(read_fd, write_fd, capacity)``, all empty."""

    def __init__(self) -> None:
        self.idle: list[tuple[int, int, int]] = []
        self.size = pipe_size() if AVAILABLE else 0

    def take(self) -> tuple[int, int, int]:
        if self.idle:
            return self.idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            capacity = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
        except OSError:  # over the user's pipe-user-pages limit: keep the default size
            capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        return r, w, capacity

    def give(self, pipe: tuple[int, int, int], empty: bool) -> None:
        if empty and len(self.idle) < POOL_MAX:
            self.idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for r, w, _ in idle:
            os.close(r)
            os.close(w)


def usable(config: ListenerConfig, upstream_tls: bool) -> bool:
    """Whether sessions of this listener may switch: plain TCP both ways, splice on this system, and
    ``--relay`` not ``transport``. Decided once per listener; the relay's hooks follow from it."""
    return AVAILABLE and config.relay != "transport" and config.tls is None and not upstream_tls


class Splicing:
    """The splice engine of one proxy: its pipe pool, and ``start``, the hook that switches a session."""

    def __init__(self) -> None:
        self.pipes = PipePool()

    def start(self, session: Session) -> None:
        """Switch ``session`` now if it is quiet, else retry shortly (``session.engine`` is None until
        then). Only sessions of ``usable`` listeners get here."""
        if session.engine is not None or session.ended:
            return
        up = session.upstream
        if up is None or session.client.eof or up.eof:  # a half-closed session stays where it is
            session.engine = NEVER
            return
        if not _quiet(session):
            session.engine = _Retry(self, session)
            return
        assert session.client.transport is not None and up.transport is not None
        client_t, up_t = session.client.transport, up.transport
        taken: list[int] = []
        pipes: list[tuple[int, int, int]] = []
        try:
            taken.append(os.dup(client_t.get_extra_info("socket").fileno()))
            if taken[0] + DESCRIPTORS + SPARE > _fd_limit():  # short of descriptors: leave them to new clients
                raise OSError(errno.EMFILE, "descriptors are short")
            taken.append(os.dup(up_t.get_extra_info("socket").fileno()))
            pipes.append(self.pipes.take())
            pipes.append(self.pipes.take())
        except OSError:  # out of descriptors, or nearly: stay on the transport engine
            for fd in taken:
                os.close(fd)
            for pipe in pipes:
                self.pipes.give(pipe, empty=True)
            session.engine = NEVER
            return
        client_t.pause_reading()
        up_t.pause_reading()
        session.engine = Splicer(self.pipes, session, taken[0], taken[1], pipes[0], pipes[1])

    def close(self) -> None:
        """Close the idle pipes (the proxy stops; sessions still switched return theirs as they end)."""
        self.pipes.close()


def switched(session: Session) -> bool:
    """Whether ``session`` moved to the splice engine (its bytes no longer pass through its pumps)."""
    return isinstance(session.engine, Splicer)


def _fd_limit() -> int:
    """The open-files limit now (it may be changed at run time): one system call per switch."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 62


def _quiet(session: Session) -> bool:
    """Every byte read so far is in the kernel, and no side has ended: nothing to lose by switching."""
    client, up = session.client, session.upstream
    if session.ended or up is None or client.closed or up.closed or client.eof or up.eof or client.pending:
        return False
    ct, ut = client.transport, up.transport
    return (
        ct is not None
        and ut is not None
        and not ct.is_closing()
        and not ut.is_closing()
        and ct.get_write_buffer_size() == 0
        and ut.get_write_buffer_size() == 0
    )


class _Retry:
    """A pending retry of the switch; ``stop()`` (the session ending) cancels it."""

    __slots__ = ("handle", "left", "session", "splicing")

    def __init__(self, splicing: Splicing, session: Session) -> None:
        self.splicing = splicing
        self.session = session
        self.left = RETRIES
        self.handle: asyncio.Handle | asyncio.TimerHandle = asyncio.get_running_loop().call_soon(self.again)

    def again(self) -> None:
        session = self.session
        if session.engine is not self:
            return
        session.engine = None
        up = session.upstream
        if session.ended or session.client.eof or (up is not None and up.eof):
            self.splicing.start(session)  # nothing, or NEVER for a half-closed session
            return
        if _quiet(session):
            self.splicing.start(session)
            return
        self.left -= 1
        if self.left > 0:
            session.engine = self
            self.handle = asyncio.get_running_loop().call_later(RETRY_DELAY, self.again)
        else:  # still busy: wait for the next bulky streak
            session.client.streak = 0
            if session.upstream is not None:
                session.upstream.streak = 0

    def stop(self) -> None:
        self.handle.cancel()
        if self.session.engine is self:
            self.session.engine = None


class _Flow:
    """One direction: ``src`` socket -> pipe -> ``dst`` socket. ``pump`` is the source side's pump."""

    __slots__ = ("done", "dst", "eof", "held", "pipe", "pump", "reading", "room", "splicer", "src", "writing")

    def __init__(self, splicer: Splicer, pump: Pump, src: int, dst: int, pipe: tuple[int, int, int]) -> None:
        self.splicer = splicer
        self.pump = pump
        self.src = src
        self.dst = dst
        self.pipe = pipe
        self.room = self.pipe[2]
        self.held = 0  # bytes in the pipe
        self.reading = False
        self.writing = False
        self.eof = False
        self.done = False

    def readable(self) -> None:
        room = self.room - self.held
        if room <= 0:
            self._pause()
            return
        try:
            n = os.splice(self.src, self.pipe[1], room, flags=_FLAGS)
        except BlockingIOError:  # no data, or (bytes still held) the pipe has no free slot
            if self.held:
                self._pause()
            return
        except OSError as exc:
            self.splicer.failed(self.pump, exc)
            return
        if n == 0:
            self.eof = self.pump.eof = True
            self._pause()
            if not self.held:
                self._finish()
            return
        self.pump.nbytes += n
        self.held += n
        self.flush()

    def flush(self) -> None:
        """Move what the pipe holds to ``dst``; wait for writability when ``dst`` is full."""
        try:
            while self.held:
                self.held -= os.splice(self.pipe[0], self.dst, self.held, flags=_FLAGS)
        except BlockingIOError:
            pass
        except OSError as exc:
            peer = self.pump.peer
            assert peer is not None
            self.splicer.failed(peer, exc)
            return
        loop = self.splicer.loop
        if self.held:
            if not self.writing:
                self.writing = True
                loop.add_writer(self.dst, self.flush)
            if self.held >= self.room:
                self._pause()
            return
        if self.writing:
            self.writing = False
            loop.remove_writer(self.dst)
        if self.eof:
            self._finish()
        elif not self.reading:
            self.reading = True
            loop.add_reader(self.src, self.readable)

    def _pause(self) -> None:
        if self.reading:
            self.reading = False
            self.splicer.loop.remove_reader(self.src)

    def _finish(self) -> None:
        """EOF read and the pipe drained: pass the FIN on."""
        self.done = True
        with contextlib.suppress(OSError):
            socket_shutdown(self.dst)
        self.splicer.flow_done()

    def last_flush(self) -> None:
        """One attempt to deliver what is held before the session is torn down."""
        with contextlib.suppress(OSError):
            while self.held:
                self.held -= os.splice(self.pipe[0], self.dst, self.held, flags=_FLAGS)

    def stop(self) -> None:
        loop = self.splicer.loop
        if self.reading:
            self.reading = False
            loop.remove_reader(self.src)
        if self.writing:
            self.writing = False
            loop.remove_writer(self.dst)
        self.splicer.pipes.give(self.pipe, self.held == 0)


def socket_shutdown(fd: int) -> None:
    """``shutdown(fd, SHUT_WR)`` on a raw descriptor, without taking ownership of it."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    finally:
        sock.detach()


class Splicer:
    """Both directions of a switched session, on dups of its two sockets."""

    __slots__ = ("fds", "flows", "loop", "pipes", "session", "stopped", "switched_at")

    def __init__(
        self,
        pipes: PipePool,
        session: Session,
        client_fd: int,
        up_fd: int,
        pipe_in: tuple[int, int, int],
        pipe_out: tuple[int, int, int],
    ) -> None:
        assert session.upstream is not None
        self.pipes = pipes  # where the pipes go back when the engine stops
        self.session = session
        self.loop = asyncio.get_running_loop()
        self.fds = (client_fd, up_fd)
        self.stopped = False
        self.switched_at = (session.client.nbytes, session.upstream.nbytes)  # bytes moved by the transports
        self.flows = (
            _Flow(self, session.client, client_fd, up_fd, pipe_in),  # client -> upstream
            _Flow(self, session.upstream, up_fd, client_fd, pipe_out),  # upstream -> client
        )
        for flow in self.flows:
            flow.reading = True
            self.loop.add_reader(flow.src, flow.readable)

    def held(self) -> int:
        """Bytes in the pipes right now (what the proxy holds for this session)."""
        return sum(flow.held for flow in self.flows)

    def flow_done(self) -> None:
        if all(flow.done for flow in self.flows):
            self.session.end(EOF)

    def failed(self, pump: Pump, exc: OSError) -> None:
        """``pump``'s side failed: give the other side what its pipe holds, then end both."""
        if self.stopped:
            return
        for flow in self.flows:
            if flow.pump is not pump:
                flow.last_flush()
        error = exc.errno in _GONE
        if error:
            self.session.note_reset(pump)
        self.session.end(lost(client=pump is self.session.client, error=error))

    def stop(self) -> None:
        """Unregister, release the pipes and close the dups; the transports are closed by the session."""
        if self.stopped:
            return
        self.stopped = True
        for flow in self.flows:
            flow.stop()
        for fd in self.fds:
            os.close(fd)
