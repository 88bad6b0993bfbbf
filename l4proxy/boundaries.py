"""Safe moments to close a database session that is being drained, found from its bytes alone.

A drained session (its member drained or removed, the proxy shutting down) with ``--drain-at safe`` is
closed at the first moment the client loses nothing by it. The relay shows a watch every chunk it
forwards (``client``: client to server, ``server``: server to client) only from the drain's start on,
so the watch begins in the middle of both streams and must first find where messages begin. It never
keeps a message body: it counts and skips, so its memory is a few bytes whatever flows.

**PostgreSQL** (``PostgresWatch``). A safe moment is right after a ReadyForQuery with status ``I``
(idle: no transaction open) when every request the client sent has been answered.

* Server side: a server chunk that *ends* with a ReadyForQuery (``Z``, length 5, ``I``/``T``/``E``)
  is where the server stopped to wait for the client, so the next server byte starts a message; from
  there every message is framed by its type and length.
* Client side: the first client chunk after that is the client's next request, which starts a
  message when the client waits for ReadyForQuery before it sends more (libpq, pgbench, most drivers
  outside pipeline mode). From there each Query, Sync and FunctionCall is a request that the server
  answers with one ReadyForQuery; Parse, Bind, Describe, Execute, Close and Flush before their Sync
  leave an extended-protocol exchange open.
* Safe: both sides framed and at a message boundary, no request unanswered, no exchange open, and the
  last server message is ReadyForQuery ``I``.

A session idle when the drain starts shows nothing until it talks, so in either protocol it is closed
after the answer to its second request (the first answer marks the start), or at the drain timeout.

**Redis** (``RedisWatch``). A safe moment is when every command sent has been answered and no
``MULTI`` (or ``WATCH``) is open; a blocking command (BLPOP, WAIT, XREAD BLOCK...) is a command not
answered yet, so counting covers it.

* The rule for the start: the first client chunk that follows server bytes (the client's turn) and
  starts as a command does (a RESP array ``*``, or a letter: an inline command) starts a command,
  and the server's next chunk starts its reply: true of a client that waits for its replies before
  it sends more. From there, commands are counted against replies (RESP2 and RESP3; RESP3 pushes and
  attributes are not replies), and reply *n* answers command *n*, which is how MULTI, EXEC, DISCARD,
  WATCH and UNWATCH take effect.
* What began before the start shows in the replies: ``+QUEUED`` means a MULTI is open, and an array
  that starts as a RESP2 subscription message (``message``, ``subscribe``, ``pong``...) means the
  client is subscribed. A WATCH sent before the start does not show: a client closed between WATCH
  and MULTI gets a closed connection instead of an EXEC, and nothing it sent was executed half-way.
* Safe: both sides at a boundary, as many replies as commands, no ``MULTI``/``WATCH`` open.
* Never safe once a session subscribes (SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE), runs MONITOR or changes
  its replies (CLIENT REPLY): the server then talks unprompted or not at all, so counting says
  nothing. Such a session is closed at the drain timeout.

**When the rule is wrong.** Bytes that are not the protocol (the database's own TLS inside the
session, say), or more answers than requests, put the watch back to looking for a start; a session
that never shows a safe moment is closed at the drain timeout, as with ``--drain-at now``. The case
the rule cannot see is a client that keeps requests in flight *across* the start without ever
waiting (a multiplexing client under steady load): answers to requests sent before the start then
look like answers to later ones, and the session may be closed with answers still on their way. Use
``--drain-at now`` (the timeout alone) for pools whose clients do that.

Pure: no sockets, no event loop.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol

PROTOCOLS = ("redis", "postgres")


class Watch(Protocol):
    """Sees a drained session's bytes as they are forwarded; tells when closing loses nothing."""

    def client(self, data: bytes) -> None:
        """Bytes the client sent (forwarded to the server)."""
        ...

    def server(self, data: bytes) -> bool:
        """Bytes the server sent (forwarded to the client); True when the session may close now."""
        ...


def watch_for(protocol: str) -> Watch:
    """A fresh watch for ``protocol`` (one of ``PROTOCOLS``)."""
    return PostgresWatch() if protocol == "postgres" else RedisWatch()


class Desync(ValueError):
    """The bytes are not where the watch thought it was in the protocol."""


# --- PostgreSQL ------------------------------------------------------------------------------------

BACKEND_TYPES = frozenset(b"123AcCdDEGHIKnNRsStTvVWZ")
FRONTEND_TYPES = frozenset(b"BcCdDEfFHpPQSX")
REQUESTS = frozenset(b"QSF")  # each answered by one ReadyForQuery
EXTENDED = frozenset(b"PBDECH")  # open an extended-protocol exchange until a Sync
MAX_PG_MESSAGE = 1 << 30  # PostgreSQL's own limit on a message
_RFQ_HEAD = b"Z\x00\x00\x00\x05"


class Frames:
    """Splits a PostgreSQL message stream into message types, skipping bodies; keeps the first body
    byte (ReadyForQuery's status)."""

    __slots__ = ("first", "head", "kinds", "skip")

    def __init__(self, kinds: frozenset[int]) -> None:
        self.kinds = kinds
        self.head = b""  # the part of a 5-byte header read so far
        self.skip = 0  # body bytes still to pass over
        self.first = -1  # the current message's first body byte, once seen

    @property
    def boundary(self) -> bool:
        return not self.head and not self.skip

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """The (type, first body byte or -1) of each message that ends in ``data``; Desync on a type
        the direction does not have or a length no message has."""
        done: list[tuple[int, int]] = []
        at, size = 0, len(data)
        while at < size:
            if self.skip:
                if self.first < 0:
                    self.first = data[at]
                step = min(self.skip, size - at)
                self.skip -= step
                at += step
                if not self.skip:
                    done.append((self.head[0], self.first))
                    self.head = b""
                continue
            need = 5 - len(self.head)
            self.head += data[at : at + need]
            at += need
            if len(self.head) < 5:
                break
            if self.head[0] not in self.kinds:
                raise Desync(f"message type {self.head[:1]!r}")
            (length,) = struct.unpack_from("!I", self.head, 1)
            if not 4 <= length <= MAX_PG_MESSAGE:
                raise Desync(f"message length {length}")
            self.skip, self.first = length - 4, -1
            if not self.skip:
                done.append((self.head[0], -1))
                self.head = b""
        return done


class PostgresWatch:
    """Finds the moments after ReadyForQuery ``I`` with nothing unanswered (see the module's rules)."""

    __slots__ = ("client_frames", "last", "open", "pending", "server_frames", "turn")

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.server_frames: Frames | None = None  # None: not framed yet
        self.client_frames: Frames | None = None
        self.turn = False  # the server just waited: the next client chunk starts a message
        self.pending = 0  # requests not answered yet
        self.open = False  # an extended-protocol exchange without its Sync yet
        self.last = 0  # ReadyForQuery's status when it was the last server message, else 0

    def client(self, data: bytes) -> None:
        try:
            if self.client_frames is None:
                if not self.turn:
                    return
                self.client_frames = Frames(FRONTEND_TYPES)
            for kind, _ in self.client_frames.feed(data):
                if kind in REQUESTS:
                    self.pending += 1
                    if kind == 0x53:  # Sync
                        self.open = False
                elif kind in EXTENDED:
                    self.open = True
        except Desync:
            self._reset()

    def server(self, data: bytes) -> bool:
        try:
            return self._server(data)
        except Desync:
            self._reset()
            return False

    def _server(self, data: bytes) -> bool:
        if self.server_frames is None:
            if len(data) < 6 or data[-6:-1] != _RFQ_HEAD or data[-1] not in b"ITE":
                return False
            self.server_frames, self.turn, self.last = Frames(BACKEND_TYPES), True, data[-1]
            return False
        for kind, first in self.server_frames.feed(data):
            if kind == 0x5A:  # ReadyForQuery
                if self.client_frames is not None:
                    self.pending -= 1
                    if self.pending < 0:
                        raise Desync("more ReadyForQuery than requests")
                self.last = first
            else:
                self.last = 0
        client = self.client_frames
        return (
            self.last == 0x49  # 'I'
            and client is not None
            and client.boundary
            and self.server_frames.boundary
            and not self.pending
            and not self.open
        )


# --- Redis -----------------------------------------------------------------------------------------

MAX_RESP_LINE = 65536
MAX_RESP_COUNT = 1 << 31
_LINE_TYPES = frozenset(b"+-:_#,(")
_BULK_TYPES = frozenset(b"$!=")
_AGGREGATE_TYPES = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2, ord("|"): 2}  # elements per count
_NAME_LIMIT = 32  # longer arguments are never a name this watch looks for
_STARTS = frozenset(b"*ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")  # an array or an inline command
_STUCK = frozenset({b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"MONITOR"})
_PUBSUB = frozenset({b"message", b"pmessage", b"smessage", b"subscribe", b"psubscribe", b"ssubscribe", b"pong"})
_TRANSACTION = frozenset({b"MULTI", b"EXEC", b"DISCARD", b"WATCH", b"UNWATCH"})


class _Lines:
    """The line-and-bulk layer both RESP directions share: complete lines out, bulk bodies skipped
    (kept only when short and wanted)."""

    __slots__ = ("keep", "partial", "skip")

    def __init__(self) -> None:
        self.partial = b""  # a line not ended yet
        self.skip = 0  # bulk bytes (and their CRLF) still to pass over
        self.keep: bytearray | None = None  # a short bulk being kept, or None

    @property
    def boundary(self) -> bool:
        return not self.partial and not self.skip

    def feed(self, data: bytes, line: Callable[[bytes], None], bulk: Callable[[bytes | None], None]) -> None:
        """Hand each complete line (without its CRLF) to ``line``, and each bulk body, once passed, to
        ``bulk`` (its bytes when kept, else None). ``line`` sets ``skip`` (and ``keep``) for a bulk."""
        at, size = 0, len(data)
        while at < size:
            if self.skip:
                step = min(self.skip, size - at)
                if self.keep is not None:
                    self.keep += data[at : at + step]
                self.skip -= step
                at += step
                if not self.skip:
                    if data[at - 1 : at] != b"\n":
                        raise Desync("bulk string not ended by CRLF")
                    kept, self.keep = self.keep, None
                    bulk(bytes(kept[:-2]) if kept is not None else None)
                continue
            end = data.find(b"\n", at)
            if end < 0:
                self.partial += data[at:]
                if len(self.partial) > MAX_RESP_LINE:
                    raise Desync("line too long")
                return
            whole, self.partial = self.partial + data[at:end], b""
            at = end + 1
            line(whole[:-1] if whole.endswith(b"\r") else whole)


class Replies:
    """Counts complete RESP replies (RESP2 and RESP3) in a server stream, without keeping them.
    Pushes (``>``) and attributes (``|``) are not replies. Each reply gets a tag: ``queued`` for
    ``+QUEUED`` (a MULTI is open), ``pubsub`` for an array that starts as a RESP2 subscription
    message does, else empty."""

    __slots__ = ("count", "lines", "peek", "stack", "tag", "tags")

    def __init__(self) -> None:
        self.lines = _Lines()
        self.stack: list[list[int]] = []  # open aggregates: [elements left, type]
        self.count = 0
        self.tag = ""  # of the reply being read
        self.peek = False  # the next value is the first element of a reply that is an array
        self.tags: list[str] = []  # of the replies the last feed completed

    @property
    def boundary(self) -> bool:
        return self.lines.boundary and not self.stack

    def feed(self, data: bytes) -> list[str]:
        """The tags of the replies ``data`` completes."""
        self.tags = []
        self.lines.feed(data, self._line, self._bulk)
        return self.tags

    def _bulk(self, kept: bytes | None) -> None:
        if kept is not None and kept in _PUBSUB:
            self.tag = "pubsub"
        self._value_done()

    def _line(self, line: bytes) -> None:
        if not line:
            raise Desync("empty line")
        kind = line[0]
        peek, self.peek = self.peek, False
        if kind in _LINE_TYPES:
            if line == b"+QUEUED" and not self.stack:
                self.tag = "queued"
            self._value_done()
        elif kind in _BULK_TYPES:
            size = _count(line)
            if size < 0:
                self._value_done()
            else:
                self.lines.skip = size + 2
                self.lines.keep = bytearray() if peek and size <= _NAME_LIMIT else None
        elif kind in _AGGREGATE_TYPES:
            size = _count(line)
            if size <= 0:
                if kind == ord("|"):
                    raise Desync("empty attribute")
                self._value_done(reply=kind != ord(">"))
            else:
                self.peek = kind == ord("*") and not self.stack
                self.stack.append([size * _AGGREGATE_TYPES[kind], kind])
        else:
            raise Desync(f"reply type {line[:1]!r}")

    def _value_done(self, reply: bool = True) -> None:
        """One value is complete: it fills a slot of the aggregate it is in, or is a reply."""
        while self.stack:
            top = self.stack[-1]
            top[0] -= 1
            if top[0]:
                return
            kind = self.stack.pop()[1]
            if kind == ord("|"):  # an attribute: the value after it is the one that counts
                return
            reply = kind != ord(">")
        if reply:
            self.count += 1
            self.tags.append(self.tag)
        self.tag = ""


class Commands:
    """Counts complete commands in a client stream (RESP arrays of bulk strings, or inline lines) and
    keeps the first two arguments of each, upper-cased, when they are short."""

    __slots__ = ("args", "commands", "left", "lines")

    def __init__(self) -> None:
        self.lines = _Lines()
        self.left = 0  # bulk arguments still to come in the current command
        self.args: list[bytes] = []
        self.commands: list[tuple[bytes, ...]] = []

    @property
    def boundary(self) -> bool:
        return self.lines.boundary and not self.left

    def feed(self, data: bytes) -> list[tuple[bytes, ...]]:
        """The commands completed by ``data`` (their first two arguments)."""
        self.commands = []
        self.lines.feed(data, self._line, self._argument)
        return self.commands

    def _line(self, line: bytes) -> None:
        if self.left:
            if line[:1] != b"$":
                raise Desync(f"expected a bulk argument, got {line[:10]!r}")
            size = _count(line)
            if size < 0:
                raise Desync("null argument")
            self.lines.skip = size + 2
            self.lines.keep = bytearray() if size <= _NAME_LIMIT and len(self.args) < 2 else None
            return
        if line[:1] == b"*":
            size = _count(line)
            if size > 0:
                self.left, self.args = size, []
            return
        words = line.split()
        if words:  # an inline command
            self.commands.append(tuple(w.upper() for w in words[:2]))

    def _argument(self, value: bytes | None) -> None:
        if len(self.args) < 2:
            self.args.append(value.upper() if value is not None else b"")
        self.left -= 1
        if not self.left:
            self.commands.append(tuple(self.args))


def _count(line: bytes) -> int:
    digits = line[2:] if line[1:2] == b"-" else line[1:]
    if not digits.isdigit() or len(digits) > 10:
        raise Desync(f"expected a length, got {line[:12]!r}")
    value = int(line[1:])
    if not -1 <= value < MAX_RESP_COUNT:
        raise Desync(f"length {value}")
    return value


class RedisWatch:
    """Finds the moments when every command has its reply and no transaction is open (see the rules)."""

    __slots__ = ("commands", "effects", "heard", "multi", "replies", "sent", "stuck", "watching")

    def __init__(self) -> None:
        self.stuck = False  # subscribed, monitoring or replies off: never safe
        self._reset()

    def _reset(self) -> None:
        self.commands: Commands | None = None  # None: not at a known start yet
        self.replies: Replies | None = None
        self.heard = False  # server bytes came since the client's last chunk: its turn now
        self.sent = 0
        self.effects: deque[tuple[int, bytes]] = deque()  # transaction commands by number, until answered
        self.multi = False
        self.watching = False

    def client(self, data: bytes) -> None:
        if self.stuck:
            return
        try:
            if self.commands is None:
                if not (self.heard and data and data[0] in _STARTS):
                    self.heard = False
                    return
                self.commands = Commands()
            for command in self.commands.feed(data):
                self._note(command)
        except Desync:
            self._reset()

    def _note(self, command: tuple[bytes, ...]) -> None:
        self.sent += 1
        name = command[0] if command else b""
        if name in _STUCK or (name == b"CLIENT" and command[1:] == (b"REPLY",)):
            self.stuck = True  # CLIENT REPLY ON|OFF|SKIP: the third word is not kept; any is unsafe
        elif name in _TRANSACTION:
            self.effects.append((self.sent, name))

    def server(self, data: bytes) -> bool:
        if self.stuck:
            return False
        self.heard = True
        if self.commands is None:
            return False
        try:
            if self.replies is None:
                self.replies = Replies()
            first = self.replies.count + 1
            for number, tag in enumerate(self.replies.feed(data), first):
                self._answered(number, tag)
            if self.replies.count > self.sent:
                raise Desync("more replies than commands")
        except Desync:
            self._reset()
            self.heard = True
            return False
        return (
            not self.stuck
            and self.replies.count == self.sent
            and self.replies.boundary
            and self.commands.boundary
            and not self.multi
            and not self.watching
        )

    def _answered(self, number: int, tag: str) -> None:
        """Reply ``number`` came: what its command, or the reply itself, says of a transaction."""
        while self.effects and self.effects[0][0] <= number:
            _, name = self.effects.popleft()
            if name == b"MULTI":
                self.multi = True
            elif name in (b"EXEC", b"DISCARD"):
                self.multi = self.watching = False
            elif name == b"WATCH":
                self.watching = True
            elif not self.multi:  # UNWATCH
                self.watching = False
        if tag == "queued":  # a MULTI opened before the watch started
            self.multi = True
        elif tag == "pubsub":  # subscribed before the watch started
            self.stuck = True
