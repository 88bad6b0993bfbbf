"""``l4proxy top --admin HOST:PORT``: a live view of a running proxy's ``/status``, once a second.

It reads ``GET /status`` (plain HTTP/1.1 with ``http.client``: one short request needs no more), keeps
the previous answer for the rates (``topview``), and draws with rich: a table cut to the terminal's
width and height, redrawn in place on the alternate screen, so the shell's screen comes back on exit.
Keys are read in cbreak mode (one key at a time, no echo; Ctrl-C still interrupts) by waiting on stdin
with ``select``, and the terminal's settings are restored on every way out (``q``, Ctrl-C, SIGTERM,
SIGHUP, an error). When stdout is not a
terminal it reads twice, a second apart (so the rates are real), prints one table and exits 0.

A proxy that cannot be read at start is a user mistake (exit 2, one line naming ``--admin``); one that
stops answering later is shown on the title line while ``top`` keeps asking.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import IO, Any

from rich.console import Console, Group, JustifyMethod
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import topview
from .config import Address
from .errors import ConfigError

INTERVAL = 1.0  # seconds between reads
TIMEOUT = 2.0  # one read may take this long before the proxy counts as not answering
QUIT_KEYS = frozenset(b"qQ")
STYLES = {"listener": "bold cyan", "pool": "bold", "more": "dim"}
STATE_STYLES = {"UP": "green", "OPEN": "green", "DOWN": "bold red", "DRAIN": "yellow", "MAINT": "magenta"}
HINT = "q quits"


class Unreadable(Exception):
    """``/status`` could not be read; the message says what failed."""


def fetch(address: Address) -> dict[str, Any]:
    """``GET /status`` from the admin endpoint, decoded."""
    conn = http.client.HTTPConnection(address.host, address.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/status", headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise Unreadable(_why(exc)) from None
    finally:
        conn.close()
    if response.status != 200:
        raise Unreadable(f"GET /status answered {response.status} {response.reason}")
    try:
        data = json.loads(body)
    except ValueError:
        raise Unreadable("GET /status did not answer JSON (is this an l4proxy admin endpoint?)") from None
    if not isinstance(data, dict) or "pools" not in data:
        raise Unreadable("GET /status answered JSON without pools (is this an l4proxy admin endpoint?)")
    return data


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT:g}s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def render(previous: dict[str, Any] | None, current: dict[str, Any], admin: str, width: int, height: int,
           foot: str = "", alarm: bool = False) -> Group:  # fmt: skip
    """The whole screen: the title line, the table and ``foot`` (the hint, or what went wrong when
    ``alarm``), no wider than ``width`` or taller than ``height``."""
    name_width, columns = topview.layout(width)
    table = Table(box=None, padding=(0, topview.GAP, 0, 0), show_edge=False, pad_edge=False, expand=False)
    table.add_column(topview.NAME_TITLE, width=name_width, no_wrap=True, overflow="crop")
    for column in columns:
        justify: JustifyMethod = "left" if column.title == "STATE" else "right"
        table.add_column(column.title, width=column.width, no_wrap=True, overflow="crop", justify=justify)
    for row in topview.visible(topview.rows(previous, current), max(height - 3, 1)):
        texts = topview.cells(row, name_width, columns)
        state = Text(texts[1], style=STATE_STYLES.get(row.state.split()[-1] if row.state else "", ""))
        table.add_row(Text(texts[0]), state, *texts[2:], style=STYLES.get(row.kind, ""))
    head = Text(topview.title(current, admin, width), style="bold")
    if not foot:
        return Group(head, table)
    return Group(head, table, Text(topview.truncate(foot, width), style="bold red" if alarm else "dim"))


@contextlib.contextmanager
def ended_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (the ssh session went away) end ``top`` through the ``finally`` blocks, so
    the terminal is restored then too; their default action would leave it in cbreak mode."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    saved = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def cbreak(stream: IO[str]) -> Iterator[int | None]:
    """Keys one at a time, unechoed, while the block runs; the terminal as it was afterwards, however
    the block ends. Yields the descriptor to read keys from, or None when stdin is not a terminal."""
    if not stream.isatty():
        yield None
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def wait_for_key(fd: int | None, seconds: float) -> bytes:
    """What was typed within ``seconds`` (b"" if nothing): a non-blocking read once select says so."""
    if fd is None:
        time.sleep(seconds)  # no keyboard: the refresh clock alone
        return b""
    ready, _, _ = select.select([fd], [], [], seconds)
    if not ready:
        return b""
    try:
        return os.read(fd, 64) or b"q"  # end of input (the terminal went away) quits too
    except BlockingIOError:
        return b""


def live(address: Address, admin: str, console: Console, first: dict[str, Any]) -> int:
    """Refresh once a second until ``q``; 0."""
    previous: dict[str, Any] | None = None
    current, problem = first, ""
    with ended_by_signals(), cbreak(sys.stdin) as fd, Live(console=console, screen=True, auto_refresh=False) as view:
        while True:
            width, height = console.size
            view.update(render(previous, current, admin, width, height, problem or HINT, bool(problem)), refresh=True)
            deadline = time.monotonic() + INTERVAL
            while (left := deadline - time.monotonic()) > 0:
                if QUIT_KEYS & set(wait_for_key(fd, left)):
                    return 0
            try:
                previous, current, problem = current, fetch(address), ""
            except Unreadable as exc:
                problem = f"--admin {admin}: {exc}; showing the last answer, asking again"


def once(address: Address, admin: str, console: Console, first: dict[str, Any]) -> int:
    """Not a terminal: one table, with rates over one interval; 0."""
    time.sleep(INTERVAL)
    try:
        second = fetch(address)
    except Unreadable:
        second, first = first, {}  # it went away meanwhile: the counts, without rates
    width = console.size.width
    console.print(render(first or None, second, admin, width, 10_000))
    return 0


def run(address: Address, admin: str) -> int:
    """``l4proxy top``: the exit status; raises ConfigError naming ``--admin`` when it cannot be read."""
    try:
        first = fetch(address)
    except Unreadable as exc:
        raise ConfigError("--admin", admin, f"cannot read http://{admin}/status: {exc}") from None
    console = Console(highlight=False)
    if not console.is_terminal:
        return once(address, admin, console, first)
    try:
        return live(address, admin, console, first)
    except KeyboardInterrupt:
        return 130
