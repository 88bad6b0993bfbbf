"""systemd's readiness protocol: ``READY=1`` once clients can connect, ``STOPPING=1`` when the drain begins.

Under ``Type=notify`` systemd sets ``$NOTIFY_SOCKET`` to an AF_UNIX datagram socket (a path, or an
abstract name written with a leading ``@``) and counts the service as started only when a datagram
``READY=1`` arrives there, so units ordered after l4proxy start once it accepts, not once its process
exists. One datagram per state is the whole protocol (sd_notify(3)); no library is needed.

Without the variable (not under systemd, or another ``Type=``) ``notify`` does nothing. A datagram that
cannot be sent is logged and otherwise ignored: readiness reporting must never stop the proxy, and the
socket is non-blocking, so a full queue on systemd's side never stalls the loop.

With ``--workers N`` each worker says ``READY=1`` once it listens (with SO_REUSEPORT the first one makes
the address accept; the unit sets ``NotifyAccess=all`` so systemd takes it from a child), and the
supervisor says ``STOPPING=1`` when a signal starts the drain.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("l4proxy")


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (``"READY=1"``, ``"STOPPING=1"``) to ``$NOTIFY_SOCKET``; whether it was sent."""
    where = environ.get("NOTIFY_SOCKET", "")
    if not where:
        return False
    if not where.startswith(("/", "@")):
        log.warning("NOTIFY_SOCKET %r: expected an absolute path or @name; not sending %s", where, state)
        return False
    address = "\0" + where[1:] if where.startswith("@") else where
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("NOTIFY_SOCKET %s: cannot send %s: %s", where, state, exc.strerror or exc)
        return False
    return True
