"""Session end causes: the labels the access log prints, and the rule for which one a session keeps.

A label says who ended the session and how:

* ``eof``: both directions ended cleanly (each side sent its FIN, or close_notify on a TLS side);
* ``client_closed`` / ``upstream_closed``: that side closed (or half-closed towards a side that
  cannot half-close: the EOF ends the session) and the proxy closed the other;
* ``client_reset`` / ``upstream_reset``: that side's connection was lost with an error;
* ``idle_timeout`` / ``half_closed_timeout``: the proxy's sweeper closed a quiet session;
* ``shutdown`` / ``forced_shutdown``: the drain deadline passed, or a second signal;
* ``drained``: closed cleanly at a protocol-safe moment of a drain (``--drain-at safe``, ``safeclose.py``);
* ``no_upstream (<last connect error>)``: no member could be reached;
* ``loop``: the client is one of the proxy's own outgoing connections (a member that is the proxy);
* ``member_down``: its member was marked DOWN and ``--on-member-down close`` ended it;
* ``max_session_duration``: it was older than ``--max-session-duration`` (at a quiet moment, or at the
  latest at that plus its jitter).

Several of these can happen to one session (a client resets while its session is being torn down for
a timeout), so a session goes through ``settle`` each time one is offered. The rule, by how the cause
arrives:

* ``end`` (a side closed or reset, or both directions are done): the first cause stays;
* ``abort`` (the proxy tears the session down, discarding buffers): it replaces the cause of a session
  that has not ended yet, and a clean ``eof`` whose flush it cuts short; a session that ended otherwise
  keeps its cause, which already says who ended it;
* ``fail`` (the client never got an upstream): it always wins; it is what became of the client's bytes.
"""

from __future__ import annotations

from typing import Literal

EOF = "eof"
CLIENT_CLOSED = "client_closed"
UPSTREAM_CLOSED = "upstream_closed"
CLIENT_RESET = "client_reset"
UPSTREAM_RESET = "upstream_reset"
LOOP = "loop"
MEMBER_DOWN = "member_down"  # --on-member-down close ended it
MAX_DURATION = "max_session_duration"  # older than --max-session-duration

How = Literal["end", "abort", "fail"]


def settle(current: str, ended: bool, how: How, cause: str) -> str:
    """The cause a session keeps when ``cause`` is offered ``how``, given the one it has (``current``,
    ``""`` for none) and whether it has ended already (see the module's rule)."""
    if how == "fail" or not current:
        return cause
    if how == "abort" and (not ended or current == EOF):
        return cause
    return current


def closed(client: bool) -> str:
    """``client_closed`` or ``upstream_closed``."""
    return CLIENT_CLOSED if client else UPSTREAM_CLOSED


def lost(client: bool, error: bool) -> str:
    """The cause when a side's connection is lost: reset with an error, else closed."""
    if error:
        return CLIENT_RESET if client else UPSTREAM_RESET
    return CLIENT_CLOSED if client else UPSTREAM_CLOSED
