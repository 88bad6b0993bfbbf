"""``--access-log syslog:HOST:PORT`` (UDP, RFC 5426) or ``syslog:/dev/log`` (any AF_UNIX datagram
socket): each access-log line in its own RFC 5424 message (``accesslog.syslog_header``), sent as the
session ends.

The socket is non-blocking and connected once, so a send never holds the loop: a datagram the
receiver has no room for (a full ``/dev/log`` queue) or a receiver that is not there (UDP's ICMP
"port unreachable", a syslog daemon restarting) loses that line, counted, and the flush tick (about
once a second) logs how many were lost and connects a UNIX socket again, as a restarted daemon makes a
new one at the same path. Lines are not buffered, so none wait in the process to be lost on SIGKILL.
"""

from __future__ import annotations

import logging
import os
import socket

from .accesslog import AccessLog, Finished, syslog_header, syslog_hostname
from .config import SYSLOG, syslog_target

log = logging.getLogger("l4proxy")


def open_log(target: str, fmt: str = "logfmt") -> AccessLog:
    """The access log for an ``--access-log`` value: ``syslog:...`` here, the others as
    ``AccessLog.from_target`` opens them. Raises OSError (no such socket, a host that does not
    resolve)."""
    if target.startswith(SYSLOG):
        return SyslogAccessLog.open(target, fmt)
    return AccessLog.from_target(target, fmt)


class SyslogAccessLog(AccessLog):
    """Access-log lines as RFC 5424 datagrams on one connected, non-blocking socket."""

    def __init__(self, sock: socket.socket, target: str, fmt: str = "logfmt", worker: int | None = None) -> None:
        super().__init__(None, fmt=fmt, worker=worker)
        self.sock: socket.socket | None = sock
        self.target = target
        self.hostname = syslog_hostname(socket.gethostname())
        self.pid = os.getpid()
        self.tail = f" worker={worker}" if worker is not None and fmt == "logfmt" else ""
        self.lost = 0  # lines not sent since the last flush
        self.why = ""
        self.broken = False  # a UNIX socket whose receiver went away: connected again at the next flush

    @classmethod
    def open(cls, target: str, fmt: str = "logfmt") -> SyslogAccessLog:
        return cls(_connect(syslog_target(target)), target, fmt)

    def for_worker(self, worker: int) -> SyslogAccessLog:
        """The log of worker ``worker`` (in its process): the same socket, its own PROCID and ``worker``."""
        assert self.sock is not None
        return SyslogAccessLog(self.sock, self.target, self.fmt, worker)

    def record(self, session: Finished, now: float) -> None:
        self.records += 1
        sock = self.sock
        if sock is None:
            return
        message = syslog_header(now, self.hostname, self.pid) + self.line(session, now) + self.tail
        try:
            sock.send(message.encode("utf-8", "replace"))
        except OSError as exc:  # full, refused or gone: this line is lost, never the loop's time
            self.lost += 1
            self.why = exc.strerror or type(exc).__name__
            self.broken = sock.family == socket.AF_UNIX and not isinstance(exc, BlockingIOError)

    def flush(self) -> None:
        if self.lost:
            log.warning("access log: %d line%s not sent to %s: %s", self.lost, "" if self.lost == 1 else "s",
                        self.target, self.why)  # fmt: skip
            self.lost = 0
        if self.broken and self.sock is not None:
            try:
                self.sock.connect(syslog_target(self.target))
                self.broken = False
            except OSError:
                pass  # still gone: the next tick tries again

    def close(self) -> None:
        self.flush()
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _connect(target: tuple[str, int] | str) -> socket.socket:
    """A non-blocking datagram socket connected to ``target`` (a UNIX path, or a host and UDP port)."""
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        where: object = target
    else:
        family, kind, proto, _, where = socket.getaddrinfo(target[0], target[1], type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, kind, proto)
    try:
        sock.connect(where)  # type: ignore[arg-type]
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
