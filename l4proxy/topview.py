"""What ``l4proxy top`` shows, from two reads of ``GET /status``: rows, rates and a layout that fits.

The view is a function of plain data: the previous and the current ``/status`` JSON (the previous may
be missing: the first read), and the terminal's width and height. Rates are counter deltas over the
proxy's own clock (``uptime_seconds``), so a slow read or a late refresh does not skew them; a counter
that went down (the proxy restarted between reads) or a row that was not there before shows ``-``
rather than a made-up number. Fields that ``/status`` does not carry (ejections, queues: features
not every build has) show ``-`` too, and appear once the endpoint reports them.

Pure: no sockets, no terminal, no clock. ``top.py`` fetches, reads keys and draws with rich.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NONE = "-"  # a value that is unknown, or that this proxy does not report
ELLIPSIS = "~"  # plain ASCII: it survives every terminal and ssh session
INDENT = "  "  # a member row sits under its pool

Status = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Column:
    title: str
    width: int
    optional: bool = False  # dropped first when the terminal is too narrow


# The name column takes what the others leave, and never less than MIN_NAME while a column can go.
NAME_TITLE = "NAME"
MIN_NAME = 12
GAP = 1  # spaces between columns
COLUMNS = (
    Column("STATE", 7),
    Column("ACTIVE", 6),
    Column("SESS/s", 7),
    Column("BYTES/s", 7),
    Column("FAIL", 6, optional=True),
    Column("EJECT", 5, optional=True),
    Column("QUEUE", 5, optional=True),
)


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table; ``kind`` (listener, pool or member) chooses its style."""

    kind: str
    name: str
    state: str
    active: str
    sessions_rate: str
    bytes_rate: str
    failures: str
    ejections: str
    queue: str

    def cells(self) -> tuple[str, ...]:
        """The values in ``COLUMNS`` order, after the name."""
        return (
            self.state,
            self.active,
            self.sessions_rate,
            self.bytes_rate,
            self.failures,
            self.ejections,
            self.queue,
        )


def layout(width: int) -> tuple[int, tuple[Column, ...]]:
    """The name column's width and the other columns that fit in ``width`` characters: the optional
    ones go first, right-most first, then the others from the right, until the name has ``MIN_NAME``."""
    columns = list(COLUMNS)
    while columns and width - sum(c.width + GAP for c in columns) < MIN_NAME:
        optional = [i for i, c in enumerate(columns) if c.optional]
        del columns[optional[-1] if optional else -1]
    return max(width - sum(c.width + GAP for c in columns), 1), tuple(columns)


def truncate(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters; a long one loses its middle, so both the start of a
    host name and its port stay visible (``redis-primary-~.internal:6379``)."""
    if len(text) <= width:
        return text
    if width <= len(ELLIPSIS):
        return text[:width]
    keep = width - len(ELLIPSIS)
    tail = keep // 2
    return text[: keep - tail] + ELLIPSIS + (text[-tail:] if tail else "")


def number(value: float | None) -> str:
    """A count or rate in at most 6 characters: 7, 12.5, 1.2k, 34.0M (powers of 1000)."""
    if value is None:
        return NONE
    if value < 100 and value != int(value):
        return f"{value:.1f}"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            shown = value / scale
            return f"{shown:.1f}{unit}" if shown < 100 else f"{shown:.0f}{unit}"
    return f"{value:.0f}"


def size(value: float | None) -> str:
    """Bytes (a second) in at most 6 characters: 512, 1.5K, 20M (powers of 1024, as top and free do)."""
    if value is None:
        return NONE
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= scale:
            shown = value / scale
            return f"{shown:.1f}{unit}" if shown < 100 else f"{shown:.0f}{unit}"
    return f"{value:.0f}"


def rate(now: float | None, before: float | None, seconds: float | None) -> float | None:
    """Per second from two readings of a counter; None when either is unknown or it went down."""
    if now is None or before is None or not seconds or seconds <= 0 or now < before:
        return None
    return (now - before) / seconds


def elapsed(previous: Status | None, current: Status) -> float | None:
    """Seconds between two reads, on the proxy's clock; None for the first read or after a restart."""
    if previous is None:
        return None
    before, now = previous.get("uptime_seconds"), current.get("uptime_seconds")
    if not isinstance(before, int | float) or not isinstance(now, int | float) or now <= before:
        return None
    return float(now - before)


def _count(value: Any) -> float | None:
    """A counter from the JSON: a number, or the sum of a by-kind table; None when absent."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, Mapping):
        return float(sum(v for v in value.values() if isinstance(v, int | float)))
    return None


def _by_name(items: Any) -> dict[str, Mapping[str, Any]]:
    if not isinstance(items, list):
        return {}
    return {str(item.get("name")): item for item in items if isinstance(item, Mapping)}


def _whole(value: Any) -> str:
    counted = _count(value)
    return NONE if counted is None else number(counted)


class _Rates:
    """Rates of one object's counters between its previous and current JSON."""

    def __init__(self, before: Mapping[str, Any] | None, now: Mapping[str, Any], seconds: float | None) -> None:
        self.before = before or {}
        self.now = now
        self.seconds = seconds if before is not None else None

    def of(self, *keys: str) -> float | None:
        now = [_count(self.now.get(key)) for key in keys]
        before = [_count(self.before.get(key)) for key in keys]
        if any(v is None for v in now) or any(v is None for v in before):
            return None
        return rate(sum(v for v in now if v is not None), sum(v for v in before if v is not None), self.seconds)


def rows(previous: Status | None, current: Status) -> list[Row]:
    """Listeners, then each pool followed by its members."""
    seconds = elapsed(previous, current)
    earlier = previous or {}
    found: list[Row] = []
    old_listeners = _by_name(earlier.get("listeners"))
    draining = bool(current.get("draining"))
    for listener in _by_name(current.get("listeners")).values():
        name = str(listener.get("name"))
        counts = _Rates(old_listeners.get(name), listener, seconds)
        found.append(
            Row(
                kind="listener",
                name=f"{name} {listener.get('address', '')}".strip(),
                state="DRAIN" if draining else "OPEN",
                active=_whole(listener.get("active_sessions")),
                sessions_rate=number(counts.of("sessions")),
                bytes_rate=size(counts.of("bytes_in", "bytes_out")),
                failures=_whole(listener.get("tls_failures")),
                ejections=NONE,
                queue=_whole(listener.get("queued")),
            )
        )
    old_pools = _by_name(earlier.get("pools"))
    for pool in _by_name(current.get("pools")).values():
        name = str(pool.get("name"))
        found.extend(_pool_rows(pool, old_pools.get(name), seconds))
    return found


def _pool_rows(pool: Mapping[str, Any], before: Mapping[str, Any] | None, seconds: float | None) -> list[Row]:
    members = _by_name(pool.get("members"))
    old_members = _by_name((before or {}).get("members"))
    counts = [_Rates(old_members.get(key), m, seconds) for key, m in members.items()]
    up = sum(1 for m in members.values() if m.get("state") == "UP")
    head = Row(
        kind="pool",
        name=f"pool {pool.get('name')}",
        state=f"{up}/{len(members)} UP",
        active=_whole(sum(_count(m.get("active_sessions")) or 0 for m in members.values())),
        sessions_rate=number(_total([c.of("sessions") for c in counts]) if before is not None else None),
        bytes_rate=size(_total([c.of("bytes_in", "bytes_out") for c in counts]) if before is not None else None),
        failures=_whole(pool.get("no_upstream")),
        ejections=_whole(pool.get("ejections")),
        queue=_whole(pool.get("queued")),
    )
    return [head, *(_member_row(m, old_members.get(key), seconds) for key, m in members.items())]


def _total(rates: Sequence[float | None]) -> float | None:
    """A pool's rate: its members' summed, unknown if any member's is (one just added, a restart)."""
    known = [r for r in rates if r is not None]
    return sum(known) if len(known) == len(rates) else None


def _member_row(member: Mapping[str, Any], before: Mapping[str, Any] | None, seconds: float | None) -> Row:
    counts = _Rates(before, member, seconds)
    return Row(
        kind="member",
        name=INDENT + str(member.get("name")),
        state=str(member.get("state", NONE)),
        active=_whole(member.get("active_sessions")),
        sessions_rate=number(counts.of("sessions")),
        bytes_rate=size(counts.of("bytes_in", "bytes_out")),
        failures=_whole(member.get("connect_failures")),
        ejections=_whole(member.get("ejections")),
        queue=_whole(member.get("queued")),
    )


def visible(found: Sequence[Row], height: int) -> list[Row]:
    """The rows that fit in ``height`` lines; when some do not, the last line says how many."""
    if height <= 0:
        return []
    if len(found) <= height:
        return list(found)
    shown = list(found[: height - 1])
    hidden = len(found) - len(shown)
    return [*shown, Row("more", f"... {hidden} more (a taller terminal shows them)", *([""] * 7))]


def cells(row: Row, name_width: int, columns: Sequence[Column]) -> list[str]:
    """The row's text for each shown column, each cut to its column's width."""
    shown = dict(zip((c.title for c in COLUMNS), row.cells(), strict=True))
    return [truncate(row.name, name_width), *(truncate(shown[c.title], c.width) for c in columns)]


def _uptime(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return NONE
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def title(current: Status, admin: str, width: int) -> str:
    """The first line: where, readiness, uptime, members UP, active sessions, workers, version; the
    parts that do not fit in ``width`` are left off from the end."""
    found = current.get("totals")
    totals: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    ready = "draining" if current.get("draining") else ("ready" if current.get("ready") else "NOT READY")
    parts = [
        admin,
        ready,
        f"up {_uptime(current.get('uptime_seconds'))}",
        f"members {totals.get('members_up', '?')}/{totals.get('members', '?')} UP",
        f"active {totals.get('active_sessions', '?')}",
        f"workers {current.get('workers', '?')}",
        f"l4proxy {current.get('version', '?')}",
    ]
    line = truncate(parts[0], width)
    for part in parts[1:]:
        if len(line) + 2 + len(part) > width:
            break
        line += "  " + part
    return line
