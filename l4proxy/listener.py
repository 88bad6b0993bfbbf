"""Accepting clients: our own accept loop on non-blocking listening sockets.

Why not ``loop.create_server``: we want to decide what happens when descriptors run out. On EMFILE or
ENFILE the loop stops watching the socket, logs one line, and tries again after a back-off that grows
to a second; the pending clients wait in the kernel's backlog instead of being accepted and dropped.
Accepting resumes by itself once descriptors free up, with one more line to say so. Sockets are
accepted in batches per readiness event to cut wake-ups under connection storms.

Each client needs more descriptors once it is a session: one for its upstream socket on the transport
engine, seven with ``--relay splice`` (the upstream socket, a dup of each socket and two pipes).
Accepting a client that then cannot be connected anywhere would drop it, while waiting clients are
better off in the kernel's backlog. So the listener keeps a budget: the descriptors free below the
open-files limit, less a reserve (``_RESERVE``: probes, log files, a splice switch), as counted the
last time it looked (the entries of ``/proc/self/fd``), less what each client accepted since will hold.
When the budget runs out it counts again, which also sees the descriptors ended sessions gave back,
and pauses only if it is really short. A count sees only the descriptors open now, so it also takes
off what the clients already accepted still owe (``owed``, set by the proxy: those still opening or
dialing hold only their own socket so far); without that, a count taken while a burst of clients
dials found their upstream sockets and pipes still unopened, let as many clients in again, and the
dials then failed with EMFILE, closing clients that had been accepted. The limit itself is re-read
then, on every pause, and by the proxy's sweeper once a tick (``check_limit``), so a limit lowered at
run time (``prlimit --pid``) pauses accepting instead of letting clients in that cannot be served.
Counting costs a directory listing, so it happens only when the budget is spent, at most once per
back-off interval.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable

from .config import ListenerConfig
from .errors import EXHAUSTION_ERRNOS as _EXHAUSTED

log = logging.getLogger("l4proxy.listener")

_BATCH = 64
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 1.0
_RESERVE = 16  # descriptors kept for upstream connects, health probes and log files


class _Accepted4(socket.socket):
    """An accepted socket whose family and type are plain class constants. ``socket.accept()`` and the
    loop's ``connect_accepted_socket`` read them several times per client, and the stock properties
    convert ints to enums on every read: a few microseconds per connection for nothing."""

    __slots__ = ()
    family = socket.AF_INET
    type = socket.SOCK_STREAM

    def __init__(self, fileno: int) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM, 0, fileno)


class _Accepted6(_Accepted4):
    __slots__ = ()
    family = socket.AF_INET6

    def __init__(self, fileno: int) -> None:
        socket.socket.__init__(self, socket.AF_INET6, socket.SOCK_STREAM, 0, fileno)


class AcceptedFD(int):
    """A client descriptor as uvloop's ``connect_accepted_socket`` takes it: the family, the type and the
    number are all it reads. A ``socket.socket`` would cost a ``getsockname`` system call (CPython checks
    the number it is given) and an object to detach; uvloop closes the descriptor itself, then calls
    ``close`` here, which has nothing left to do. The number is the int itself, and ``fileno`` and
    ``close`` are C functions, so no Python frame runs for them. Used on uvloop only: asyncio's own loop
    needs a real socket."""

    __slots__ = ()
    family = socket.AF_INET
    type = socket.SOCK_STREAM
    fileno = int.__int__
    close = int.__int__  # a no-op here: the transport closed the descriptor already


class _AcceptedFD6(AcceptedFD):
    __slots__ = ()
    family = socket.AF_INET6


_ACCEPTED: dict[int, type[_Accepted4]] = {socket.AF_INET: _Accepted4, socket.AF_INET6: _Accepted6}
_ACCEPTED_FD: dict[int, type[AcceptedFD]] = {socket.AF_INET: AcceptedFD, socket.AF_INET6: _AcceptedFD6}


def bind_sockets(config: ListenerConfig) -> list[socket.socket]:
    """Listening sockets for ``config.address``: every address family when the host is empty."""
    host = config.address.host or None
    infos = socket.getaddrinfo(host, config.address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _name, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if config.reuse_port:  # one socket per worker; the kernel spreads clients among them
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            client_options(sock, config.tcp_keepalive)
            sock.bind(sockaddr)
            sock.listen(config.backlog)
            sock.setblocking(False)
            if config.address.port == 0:  # an OS-chosen port must match across families
                break
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """Accepts on its sockets and hands each client socket and its address to ``serve``."""

    def __init__(
        self,
        config: ListenerConfig,
        serve: Callable[[socket.socket | AcceptedFD, object], None],
        per_session: int = 2,
    ) -> None:
        self.config = config
        self.serve = serve
        self.per_session = per_session  # descriptors a client holds once it is a session
        self.owed: Callable[[], int] = _nothing  # descriptors accepted clients will still open (see above)
        self.sockets: list[socket.socket] = []
        self.accepted = 0
        self.exhausted = 0  # times accepting paused for lack of descriptors
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kinds: dict[socket.socket, type[_Accepted4] | type[AcceptedFD]] = {}  # each socket's accepted type
        self._paused: set[socket.socket] = set()
        self._backoff = _BACKOFF_MIN
        self._retry: asyncio.TimerHandle | None = None
        self._fd_limit = 0
        # The budget (``_budget``): the descriptors free for new sessions as the last count found them,
        # less what each client accepted since holds. Kept as the count of ``accepted`` at which it is
        # spent, so an accept compares two ints instead of storing a new one (past 256 an int is a new
        # object each time).
        self._free = 0  # descriptors free for new sessions at the last count
        self._since = 0  # ``accepted`` at the last count
        self._until = 0  # ``accepted`` once the budget is spent: _since + _free // per_session
        self._counted = -1.0  # loop time of the last count
        self._short = False  # a pause was logged and accepting has not caught up since
        self.sessions = 0  # clients accepted and not yet done (``done``)
        self.limit = config.max_connections or 0  # set at start when derived
        self.full = False  # at the limit: not accepting until a session ends
        self.full_episodes = 0  # times the limit stopped accepting

    def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Accept on ``sockets`` (already listening: kept across a reload, or handed over by another
        process) or, without them, on sockets bound now."""
        self._loop = asyncio.get_running_loop()
        bare = type(self._loop).__module__.startswith("uvloop")  # descriptors need no socket object
        self._fd_limit = _soft_limit()
        if not self.config.max_connections:
            self.limit = default_max_connections(self._fd_limit, self.per_session)
        if sockets is None:
            sockets = bind_sockets(self.config)
        else:
            for sock in sockets:
                sock.setblocking(False)
                sock.listen(self.config.backlog)  # a changed backlog applies to a kept socket too
                client_options(sock, self.config.tcp_keepalive)  # and a changed --tcp-keepalive
        self.sockets = sockets
        # looked up once: ``sock.family`` is a Python property making an enum, three calls per wake-up
        kinds = _ACCEPTED_FD if bare else _ACCEPTED
        self._kinds = {sock: kinds[sock.family] for sock in sockets}
        self._count()
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self.sockets]

    def close(self) -> None:
        """Stop accepting; established sessions are not touched. The clients already queued in a
        socket's backlog are accepted first: they connected while we listened, and closing a listening
        socket resets every connection still in its queue."""
        assert self._loop is not None
        for sock in self.sockets:
            self._take_queued(sock)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self.sockets:
            if sock not in self._paused and not self.full:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._paused.clear()
        self.sockets = []

    def _take_queued(self, sock: socket.socket) -> None:
        """Accept every client waiting on ``sock``, as long as there is room for them (paused or full,
        they stay queued)."""
        while sock not in self._paused and not self.full:
            before = self.accepted
            self._accept(sock)
            if self.accepted - before < _BATCH:  # the backlog is empty (or an error ended the batch)
                return

    def release(self) -> list[socket.socket]:
        """Stop accepting and hand the sockets over, still listening: clients that connect meanwhile
        wait in the kernel's queue for the sockets' next owner."""
        assert self._loop is not None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self.sockets:
            if sock not in self._paused:
                self._loop.remove_reader(sock.fileno())
        self._paused.clear()
        sockets, self.sockets = self.sockets, []
        return sockets

    def _accept(self, sock: socket.socket) -> None:
        accepted_type = self._kinds[sock]
        serve = self.serve
        for _ in range(_BATCH):
            try:
                fd, addr = sock._accept()  # type: ignore[attr-defined]  # the fd alone: see _Accepted4
                conn = accepted_type(fd)
            except (BlockingIOError, InterruptedError):
                if self._short:  # caught up with the backlog: say so once
                    log.warning("accepting on %s again", self.config.address)
                    self._short = False
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._pause(sock, exc.strerror or str(exc))
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up before we accepted it
                log.error("accept on %s failed: %s", self.config.address, exc)
                return
            self.accepted += 1
            self.sessions += 1
            if self.accepted < self._until and self.sessions < self.limit:  # room for more: the common case
                self._backoff = _BACKOFF_MIN
                serve(conn, addr)
            elif not self._admit(sock, conn, addr):
                return

    def _admit(self, sock: socket.socket, conn: socket.socket | AcceptedFD, addr: object) -> bool:
        """Serve a client that spent the budget or reached the limit: count the descriptors again, pause
        or hold when really short or full; whether to go on accepting."""
        crowded = self._budget < self.per_session and not self._recount()
        if not crowded:
            self._backoff = _BACKOFF_MIN
        self.serve(conn, addr)
        if crowded:
            self._pause(sock, f"fewer than {_RESERVE} of {self._fd_limit} open files left")
        if self.sessions >= self.limit:
            self._hold()
        return not (crowded or self.full)

    def done(self) -> None:
        """A client accepted here is gone (its session ended, or it never became one): below the limit
        again, accepting resumes. (A session's end inlines this: ``sessions -= 1``, then ``resume`` when
        ``full``.)"""
        self.sessions -= 1
        if self.full:
            self.resume()

    def resume(self) -> None:
        """Accept again if a session's end brought the listener below its limit."""
        if self.full and self.sessions < self.limit:
            self.full = False
            log.debug("listener %s accepting again: %d sessions", self.config.address, self.sessions)
            for sock in self.sockets:
                if sock in self._paused:  # short of descriptors as well: its retry timer resumes it
                    continue
                if self._budget >= self.per_session or self._recount(force=True):
                    assert self._loop is not None
                    self._loop.add_reader(sock.fileno(), self._accept, sock)
                else:
                    self._pause(sock, f"fewer than {_RESERVE} of {self._fd_limit} open files left")

    def _hold(self) -> None:
        """At ``max_connections``: stop watching every socket, so clients wait in the kernel's backlog."""
        assert self._loop is not None
        if self.full:
            return
        self.full = True
        self.full_episodes += 1
        log.warning(
            "listener %s is full: %d sessions (--max-connections %d); new clients wait in the backlog",
            self.config.address,
            self.sessions,
            self.limit,
        )
        for sock in self.sockets:
            if sock not in self._paused:
                self._loop.remove_reader(sock.fileno())

    def check_limit(self) -> None:
        """Re-read the open-files limit (the proxy's sweeper calls this once a tick: one system call).
        A change is logged once; a lower limit shrinks the budget at once, so accepting pauses before
        it takes clients that could not be served."""
        limit = _soft_limit()
        if limit != self._fd_limit:
            log.warning("open-files limit is now %d (was %d)", limit, self._fd_limit)
            self._fd_limit = limit
            if not self.config.max_connections:  # a derived --max-connections follows it
                self.limit = default_max_connections(limit, self.per_session)
            self._count()

    def _recount(self, force: bool = False) -> bool:
        """The budget is spent: count again (at most once per back-off interval unless ``force``); True
        if there is room for a session."""
        assert self._loop is not None
        if not force and self._loop.time() - self._counted < _BACKOFF_MIN:
            return False
        self._fd_limit = _soft_limit()
        self._count()
        return self._budget >= self.per_session

    def _count(self) -> None:
        """Set the budget from the descriptors open right now."""
        if self._loop is not None:
            self._counted = self._loop.time()
        self._free = self._fd_limit - _open_descriptors() - _RESERVE - self.owed()
        self._since = self.accepted
        self._until = self.accepted + self._free // self.per_session

    @property
    def _budget(self) -> int:
        """The descriptors left for new sessions: those free at the last count, less what each client
        accepted since holds."""
        return self._free - (self.accepted - self._since) * self.per_session

    def _pause(self, sock: socket.socket, reason: str) -> None:
        """Out of descriptors: stop watching this socket for a while instead of spinning."""
        assert self._loop is not None
        if not self._short:
            self._short = True
            self.exhausted += 1
            log.error(
                "accept on %s paused: %s (raise the open-files limit or lower the load);"
                " retrying until descriptors free up",
                self.config.address,
                reason,
            )
        self._loop.remove_reader(sock.fileno())
        self._paused.add(sock)
        self._retry = self._loop.call_later(self._backoff, self._resume, sock)
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _resume(self, sock: socket.socket) -> None:
        assert self._loop is not None
        self._retry = None
        if sock.fileno() >= 0 and not self._recount(force=True):
            self._pause(sock, "")  # still short of descriptors: wait longer, without a new line
            return
        self._paused.discard(sock)
        if sock.fileno() >= 0 and not self.full:  # when full, ``done`` resumes it
            self._loop.add_reader(sock.fileno(), self._accept, sock)
            self._accept(sock)


def default_max_connections(fd_limit: int, per_session: int) -> int:
    """``--max-connections`` when not given: the sessions the open-files limit has descriptors for, after
    the reserve kept for probes and log files (``(limit - 16) // per_session``), at least 1."""
    return max(1, (fd_limit - _RESERVE) // per_session)


def _nothing() -> int:
    return 0


def _soft_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 62


def _open_descriptors() -> int:
    """How many descriptors this process has open: the entries of ``/proc/self/fd`` (less the one the
    listing itself uses); without ``/proc``, the lowest free number, which is at most that. When not even
    the listing's own descriptor can be had, every descriptor is taken."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1
    except FileNotFoundError:
        pass
    except OSError:
        return 1 << 62
    try:
        probe = os.dup(2)
    except OSError:
        return 1 << 62
    os.close(probe)
    return probe


def client_options(sock: socket.socket, keepalive: float) -> None:
    """TCP_NODELAY and keepalive (``keepalive_options``) on a listening socket: the clients accepted
    there inherit them (Linux), so they cost no system call per client."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    options = keepalive_options(keepalive) or [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)]
    for option in options:
        sock.setsockopt(*option)


KEEPALIVE_PROBES = 6  # unanswered probes, a third of the idle time apart, before the kernel gives up


def keepalive_options(idle: float) -> list[tuple[int, int, int]]:
    """``setsockopt`` arguments for TCP keepalive after ``idle`` seconds without traffic: probes every
    ``idle / 3`` (at least 1 s), the connection reset after ``KEEPALIVE_PROBES`` unanswered ones, so a
    peer that vanished is found within ``3 * idle``. Empty when ``idle`` is 0 (off)."""
    if not idle:
        return []
    seconds = max(1, round(idle))
    return [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, seconds // 3)),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES),
    ]
