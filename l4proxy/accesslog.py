"""One access-log record per session, written when the session ends.

Records are buffered and flushed about once a second (and at shutdown), so logging costs no system call
per session. A record's time stamp is the session's start, and records are written as sessions end, so
they are not in time-stamp order.

Format (logfmt, one line, easy to grep and to parse)::

    2026-11-26T20:01:09.123Z client=127.0.0.1:51234 upstream=10.0.0.5:6379 in=120 out=4096 duration=0.532s end=eof

``in`` counts bytes read from the client (sent upstream), ``out`` bytes read from the upstream (sent to
the client). ``end`` says how the session ended: eof (both directions closed cleanly), client_closed,
upstream_closed, client_reset, upstream_reset, idle_timeout, half_closed_timeout, shutdown,
forced_shutdown, drained, loop, or no_upstream (with the last connect error); ``causes.py`` says what each
means. TLS facts follow when a side speaks TLS.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

from .peer import format_peer


class _Side(Protocol):
    @property
    def nbytes(self) -> int: ...


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class Finished(Protocol):
    """What a record reads from a session (``relay.Session``); typed here so this module stays a leaf."""

    @property
    def started(self) -> float: ...
    @property
    def member(self) -> _Named | None: ...
    @property
    def client(self) -> _Side: ...
    @property
    def upstream(self) -> _Side | None: ...
    @property
    def end_cause(self) -> str: ...
    @property
    def client_address(self) -> object: ...
    @property
    def tls_info(self) -> dict[str, str] | None: ...


_MILLIS = [f".{ms:03d}Z" for ms in range(1000)]  # formatting an int costs more than indexing a list


def _quote(value: str) -> str:
    return f'"{value}"' if (" " in value or not value) else value


class AccessLog:
    """Writes records to a stream or file; ``off`` writes nothing."""

    def __init__(self, stream: TextIO | None, owned: bool = False) -> None:
        self.stream = stream
        self.owned = owned
        self.records = 0
        # The time stamp is ISO 8601 UTC with milliseconds: the seconds part is formatted once per
        # second, not per record. The last whole second formatted, and its text:
        self._second: list[object] = [None, ""]

    @classmethod
    def from_target(cls, target: str) -> AccessLog:
        """``-`` is stdout, ``off`` disables, anything else is a file path opened for appending."""
        if target == "off":
            return cls(None)
        if target == "-":
            return cls(sys.stdout)
        return cls(open(target, "a", encoding="utf-8"), owned=True)

    def format(self, session: Finished, now: float) -> str:
        """The access-log line for ``session`` (``now`` is wall-clock seconds). One f-string: this runs
        once per session, on the connection-rate path."""
        started = session.started
        member = session.member
        upstream = session.upstream
        cause = session.end_cause or "eof"
        address = session.client_address
        ipv4 = type(address) is tuple and ":" not in address[0]  # the common case, formatted without a call
        client = f"{address[0]}:{address[1]}" if ipv4 else format_peer(address)  # type: ignore[index]
        whole = int(started)
        second = self._second
        if second[0] != whole:
            second[0], second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        line = (
            f"{second[1]}{_MILLIS[int((started - whole) * 1000)]} client={client}"
            f" upstream={member.name if member is not None else '-'}"
            f" in={session.client.nbytes} out={upstream.nbytes if upstream is not None else 0}"
            f" duration={now - started:.3f}s end={_quote(cause) if ' ' in cause else cause}"
        )
        if session.tls_info:
            line += "".join(f" {key}={_quote(value)}" for key, value in session.tls_info.items())
        return line

    def record(self, session: Finished) -> None:
        self.records += 1
        if self.stream is not None:
            self.stream.write(self.format(session, time.time()) + "\n")

    def flush(self) -> None:
        """Write out buffered records; the proxy calls this about once a second, not once per record."""
        if self.stream is not None:
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.flush()
            if self.owned:
                self.stream.close()
            self.stream = None
