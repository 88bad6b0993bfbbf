"""One access-log record per session, written when the session ends, as logfmt or JSON.

Records are buffered and flushed about once a second, and at once when a drain starts, on every reload
and on SIGTERM (so a process killed with SIGKILL loses at most the last second's lines); logging costs
no system call per session. Records are written as sessions end, so they are not in time-stamp order.

**logfmt** (the default; one line, easy to grep and to parse). Its time stamp is the session's start::

    2026-11-26T20:01:09.123Z client=127.0.0.1:51234 upstream=10.0.0.5:6379 in=120 out=4096 duration=0.532s end=eof

``in`` counts bytes read from the client (sent upstream), ``out`` bytes read from the upstream (sent to
the client). ``end`` says how the session ended: eof (both directions closed cleanly), client_closed,
upstream_closed, client_reset, upstream_reset, idle_timeout, half_closed_timeout, shutdown,
forced_shutdown, drained, loop, or no_upstream (with the last connect error); ``causes.py`` says what each
means. TLS facts follow when a side speaks TLS.

**json** (``--access-log-format json``): one JSON object a line with every key always present, as
``docs/access-log.schema.json`` states (``SCHEMA_VERSION`` is its ``schema`` key): start and end time,
client, listener, pool, member, bytes each way, duration, connect time, retries, end cause and its
detail, TLS facts and worker. The connect time and the attempts are noted by ``dialer.TimedDial``,
which only listeners that log JSON use, so logfmt pays nothing for them.

**syslog** (``syslog:HOST:PORT``, UDP, or ``syslog:/dev/log``, any AF_UNIX datagram socket): each line
in an RFC 5424 message (``syslog_header``), one datagram each (``syslogsink.py`` sends them).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sized
from typing import Protocol, TextIO

from .peer import format_peer

SCHEMA_VERSION = 1  # the JSON lines' "schema": bumped only when a key changes meaning or goes away


class _Side(Protocol):
    @property
    def nbytes(self) -> int: ...


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _Listener(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def pool(self) -> str: ...


class Finished(Protocol):
    """What a record reads from a session (``relay.Session``); typed here so this module stays a leaf.
    A JSON record also reads ``tried`` and ``connect_time`` when the session has them (``TimedDial``)."""

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
    @property
    def limits(self) -> _Listener: ...


_MILLIS = [f".{ms:03d}Z" for ms in range(1000)]  # formatting an int costs more than indexing a list
TLS_KEYS = ("sni", "version", "alpn", "cipher", "peer_cn")


def _quote(value: str) -> str:
    return f'"{value}"' if (" " in value or not value) else value


def stamp(seconds: float) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``: the access log's time stamps (and the diagnostics')."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + _MILLIS[int((seconds - whole) * 1000)]


def split_cause(cause: str) -> tuple[str, str | None]:
    """``no_upstream (connect failed: refused)`` -> ``("no_upstream", "connect failed: refused")``."""
    word, _, detail = cause.partition(" (")
    return word, (detail[:-1] if detail.endswith(")") else detail) or None


def json_record(session: Finished, now: float, worker: int | None) -> dict[str, object]:
    """The JSON record of ``session`` (``docs/access-log.schema.json``): every key, always."""
    started = session.started
    member = session.member
    upstream = session.upstream
    cause, detail = split_cause(session.end_cause or "eof")
    tried: Sized = getattr(session, "tried", ())
    connect_time: float | None = getattr(session, "connect_time", None)
    tls = session.tls_info
    limits = session.limits
    return {
        "schema": SCHEMA_VERSION,
        "start": stamp(started),
        "end": stamp(now),
        "duration": round(now - started, 6),
        "client": format_peer(session.client_address),
        "listener": limits.name,
        "pool": limits.pool,
        "member": member.name if member is not None else None,
        "bytes_in": session.client.nbytes,
        "bytes_out": upstream.nbytes if upstream is not None else 0,
        "connect_time": None if connect_time is None else round(connect_time, 6),
        "attempts": len(tried),
        "retries": max(0, len(tried) - 1),
        "end_cause": cause,
        "end_detail": detail,
        "tls": None if not tls else {key: tls.get(f"tls_{key}") for key in TLS_KEYS},
        "worker": worker,
    }


def syslog_header(now: float, hostname: str, pid: int) -> str:
    """The RFC 5424 header and empty structured data before a line: facility local0, severity info
    (``<134>``), version 1, the time sent, the host, ``l4proxy``, the process id, MSGID ``access``."""
    return f"<134>1 {stamp(now)} {hostname} l4proxy {pid} access - "


def syslog_hostname(name: str) -> str:
    """A host name as RFC 5424's HOSTNAME allows: printable US-ASCII, no spaces, at most 255; ``-`` if none."""
    kept = "".join(c for c in name if "!" <= c <= "~")[:255]
    return kept or "-"


class AccessLog:
    """Writes records to a stream or file; ``off`` writes nothing. ``fmt`` is ``logfmt`` or ``json``;
    ``worker`` is the worker's slot under ``--workers N`` (a JSON key; logfmt lines get it appended)."""

    def __init__(
        self, stream: TextIO | None, owned: bool = False, fmt: str = "logfmt", worker: int | None = None
    ) -> None:
        if fmt not in ("logfmt", "json"):  # config.ACCESS_LOG_FORMATS
            raise ValueError(f"access log format must be logfmt or json, got {fmt!r}")
        self.stream = stream
        self.owned = owned
        self.fmt = fmt
        self.worker = worker
        self.records = 0  # lines sent, kept by the syslog and workers' logs; a file log's keeps none
        # The time stamp is ISO 8601 UTC with milliseconds: the seconds part is formatted once per
        # second, not per record. The last whole second formatted, and its text:
        self._second: list[object] = [None, ""]
        # chosen once: the logfmt path is the one it always was, with no test per record
        self.line: Callable[[Finished, float], str] = self.format if fmt == "logfmt" else self.format_json

    @property
    def json(self) -> bool:
        """Whether records are JSON (sessions then note their connect time and attempts)."""
        return self.fmt == "json"

    @classmethod
    def from_target(cls, target: str, fmt: str = "logfmt") -> AccessLog:
        """``-`` is stdout, ``off`` disables, anything else is a file path opened for appending
        (``syslogsink.open_log`` takes ``syslog:`` targets too)."""
        if target == "off":
            return cls(None, fmt=fmt)
        if target == "-":
            return cls(sys.stdout, fmt=fmt)
        return cls(open(target, "a", encoding="utf-8"), owned=True, fmt=fmt)

    def format(self, session: Finished, now: float) -> str:
        """The logfmt line for ``session`` (``now`` is wall-clock seconds). One f-string: this runs
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

    def format_json(self, session: Finished, now: float) -> str:
        """The JSON line for ``session``: compact, keys in the schema's order, non-ASCII escaped."""
        return json.dumps(json_record(session, now, self.worker), separators=(",", ":"))

    def record(self, session: Finished, now: float) -> None:
        """Log ``session``, ended at wall-clock ``now`` (read once by the frontend for this and the
        session-duration histogram)."""
        if self.stream is not None:
            self.stream.write(self.line(session, now) + "\n")

    def flush(self) -> None:
        """Write out buffered records: about once a second, and when a drain, a reload or SIGTERM begins."""
        if self.stream is not None:
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.flush()
            if self.owned:
                self.stream.close()
            self.stream = None
