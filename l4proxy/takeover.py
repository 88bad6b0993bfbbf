"""Hitless upgrade: a new l4proxy process takes the listening sockets over from the running one.

Both processes are started the same way, ``l4proxy --config f.toml --takeover /run/l4proxy.sock``.
The running one serves a UNIX socket at that path (only when started with ``--takeover``). The new one
connects to it before it binds anything (``request``); nobody there means a first start, and it binds
as usual. The conversation:

1. new -> old: ``HELLO``;
2. old -> new: every listener's listen address (as configured) and how many sockets it has, as JSON,
   with the listening sockets themselves attached (SCM_RIGHTS, ``socket.send_fds``);
3. the new process starts accepting on them (a listener of its config at the same address takes that
   listener's sockets; sockets no listener takes are closed, new addresses are bound), then says
   ``READY`` and serves the path itself (``Server``), so it can be upgraded in turn;
4. the old process stops accepting, drains its sessions up to ``drain_timeout`` and exits 0.

Both processes accept from the same kernel sockets between 3 and 4, and clients that connect meanwhile
wait in the one accept queue they share, so no client is refused. A new process that fails before
``READY`` (a bad file, an address it cannot bind) closes the connection and the old one keeps serving.
The path is created readable and writable by its owner only: whoever can connect gets the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("l4proxy.takeover")

HELLO = b"l4proxy takeover 1\n"
READY = b"ready\n"
MAX_SOCKETS = 253  # SCM_RIGHTS' limit per message on Linux
TIMEOUT = 10.0  # seconds each step of the conversation may take
READY_TIMEOUT = 60.0  # the new process binds and starts before it answers

Listening = list[tuple[str, list[socket.socket]]]  # listen address as configured, its sockets


class Handoff:
    """What a new process received: listening sockets by listen address, and its line to the old one."""

    def __init__(self, conn: socket.socket, sockets: dict[str, list[socket.socket]], pid: int) -> None:
        self.conn = conn
        self.sockets = sockets
        self.pid = pid  # the old process

    @property
    def count(self) -> int:
        return sum(len(socks) for socks in self.sockets.values())

    def ready(self) -> None:
        """We accept on the sockets: the old process may stop."""
        with contextlib.suppress(OSError):
            self.conn.sendall(READY)
        self.conn.close()

    def abandon(self) -> None:
        """We could not start: the old process keeps serving."""
        self.conn.close()


def request(path: str) -> Handoff | None:
    """Ask the process serving ``path`` for its listening sockets (blocking); None when nothing serves
    there (a first start, or a stale path)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(TIMEOUT)
    try:
        conn.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    try:
        conn.sendall(HELLO)
        message, fds, _flags, _address = socket.recv_fds(conn, 65536, MAX_SOCKETS)
        received = [socket.socket(fileno=fd) for fd in fds]
        layout = json.loads(message) if message else []
        sockets: dict[str, list[socket.socket]] = {}
        for address, count in layout:
            sockets[address], received = received[:count], received[count:]
    except (OSError, ValueError):
        conn.close()
        raise
    return Handoff(conn, sockets, _peer_pid(conn))


class Server:
    """Serves ``path`` in the running process: hands ``listening()`` to the first process that asks
    and says READY, then calls ``handed(pid)`` and stops serving."""

    def __init__(self, path: str, listening: Callable[[], Listening], handed: Callable[[int], None]) -> None:
        self.path = path
        self.listening = listening
        self.handed = handed
        self.sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Bind ``path`` (replacing what is there: the previous process's, or a stale one) and serve it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mask = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(mask)
        sock.listen(4)
        sock.setblocking(False)
        self.sock = sock
        self._task = asyncio.create_task(self._serve(sock), name="l4proxy takeover")

    async def stop(self) -> None:
        """Stop serving. The path stays: after a takeover it is the new process's."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close()

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            with conn:
                conn.setblocking(False)
                try:
                    pid = await self._hand_over(loop, conn)
                except (TimeoutError, OSError) as exc:
                    log.warning("takeover: a new process asked, and gave up: %s", exc or type(exc).__name__)
                    continue
            if pid is not None:
                self._close()
                self.handed(pid)
                return

    async def _hand_over(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> int | None:
        """The old side of the conversation; the new process's pid once it said READY."""
        if await _read(loop, conn, len(HELLO), TIMEOUT) != HELLO:
            log.warning("takeover: a connection to %s that is not an l4proxy asking; ignored", self.path)
            return None
        listening = self.listening()
        layout = json.dumps([[address, len(socks)] for address, socks in listening]).encode()
        socket.send_fds(conn, [layout], [sock.fileno() for _, socks in listening for sock in socks])
        if await _read(loop, conn, len(READY), READY_TIMEOUT) != READY:
            log.warning("takeover: the new process did not start; still serving")
            return None
        return _peer_pid(conn)


async def _read(loop: asyncio.AbstractEventLoop, conn: socket.socket, size: int, timeout: float) -> bytes:
    """``size`` bytes, or fewer when the peer closed first."""
    data = b""
    async with asyncio.timeout(timeout):
        while len(data) < size:
            chunk = await loop.sock_recv(conn, size - len(data))
            if not chunk:
                break
            data += chunk
    return data


def _peer_pid(conn: socket.socket) -> int:
    with contextlib.suppress(OSError, AttributeError):
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", raw)[0])
    return 0
