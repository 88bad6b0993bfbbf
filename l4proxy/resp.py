"""RESP (the Redis protocol, version 2) for health checks: commands out, replies in, and the
``redis``/``redis-primary`` check as a conversation (``checks.Conversation``).

``parse`` reads one reply from a buffer: the value and where it ended, or None while it is incomplete;
input that is not RESP raises ``ProtocolError``. Sizes are bounded (a line, a bulk string, nesting), so
a member that sends garbage or a huge reply fails its check instead of growing the buffer.

The check sends ``AUTH`` first when credentials are given, then ``PING`` (``redis``: ``+PONG`` passes)
or ``ROLE`` (``redis-primary``: passes only while the first element says ``master``), pipelined in
one write.

Pure: no sockets, no event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import PASSED, Credentials, Failure, Step, Verdict

MAX_LINE = 4096
MAX_BULK = 1 << 20
MAX_DEPTH = 4


class ProtocolError(ValueError):
    """The bytes are not a RESP reply (or exceed the limits a health check allows)."""


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A ``-`` reply: the server's error text, such as ``WRONGPASS invalid username-password pair``."""

    text: str

    @property
    def code(self) -> str:
        return self.text.split(" ", 1)[0]


Value = str | int | bytes | None | list["Value"] | ErrorReply


def command(*args: str) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse(buf: bytes, start: int = 0, depth: int = 0) -> tuple[Value, int] | None:
    """One reply from ``buf`` at ``start``: (value, end), or None when more bytes are needed."""
    if depth > MAX_DEPTH:
        raise ProtocolError("replies nested too deep")
    end = buf.find(b"\r\n", start, start + MAX_LINE)
    if end < 0:
        if len(buf) - start >= MAX_LINE:
            raise ProtocolError(f"no line end within {MAX_LINE} bytes")
        return None
    kind, line, after = buf[start : start + 1], buf[start + 1 : end], end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), after
    if kind == b"-":
        return ErrorReply(line.decode("utf-8", "replace")), after
    if kind == b":":
        return _number(line), after
    if kind == b"$":
        size = _number(line)
        if size == -1:
            return None, after
        if not 0 <= size <= MAX_BULK:
            raise ProtocolError(f"bulk string of {size} bytes")
        if len(buf) < after + size + 2:
            return None
        if buf[after + size : after + size + 2] != b"\r\n":
            raise ProtocolError("bulk string not followed by CRLF")
        return buf[after : after + size], after + size + 2
    if kind == b"*":
        count = _number(line)
        if count == -1:
            return None, after
        if not 0 <= count <= 1024:
            raise ProtocolError(f"array of {count} elements")
        items: list[Value] = []
        for _ in range(count):
            parsed = parse(buf, after, depth + 1)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    raise ProtocolError(f"unknown reply type {kind!r}")


def _number(line: bytes) -> int:
    digits = line[1:] if line.startswith(b"-") else line
    if not (digits.isdigit() and len(digits) <= 19):
        raise ProtocolError(f"expected a number, got {line[:20]!r}")
    return int(line)


class RedisCheck:
    """``redis`` (PING) or ``redis-primary`` (ROLE), after AUTH when ``credentials`` are given."""

    def __init__(self, primary: bool, credentials: Credentials | None = None) -> None:
        self.primary = primary
        self.auth = credentials
        self.buf = b""
        self.replies: list[Value] = []

    def start(self) -> Step:
        out = b""
        if self.auth is not None:
            args = (self.auth.user, self.auth.password) if self.auth.user else (self.auth.password,)
            out = command("AUTH", *args)
        return out + command("ROLE" if self.primary else "PING"), None

    def feed(self, data: bytes) -> Step:
        self.buf += data
        try:
            while (parsed := parse(self.buf)) is not None:
                value, end = parsed
                self.buf = self.buf[end:]
                verdict = self._judge(value)
                if verdict is not None:
                    return b"", verdict
        except ProtocolError as exc:
            return b"", Verdict(Failure.BAD_REPLY, str(exc))
        return b"", None

    def _judge(self, value: Value) -> Verdict | None:
        """The verdict on one reply, or None when it was the AUTH reply and it passed."""
        if self.auth is not None and not self.replies:
            self.replies.append(value)
            if isinstance(value, ErrorReply):
                return Verdict(Failure.AUTH_FAILED, value.text)
            return None if value == "OK" else Verdict(Failure.BAD_REPLY, f"to AUTH: {_shown(value)}")
        self.replies.append(value)
        if isinstance(value, ErrorReply):
            auth = value.code in ("NOAUTH", "WRONGPASS", "NOPERM")
            return Verdict(Failure.AUTH_FAILED if auth else Failure.SERVER_ERROR, value.text)
        if not self.primary:
            return PASSED if value == "PONG" else Verdict(Failure.BAD_REPLY, f"to PING: {_shown(value)}")
        if not (isinstance(value, list) and value and isinstance(value[0], bytes)):
            return Verdict(Failure.BAD_REPLY, f"to ROLE: {_shown(value)}")
        role = value[0].decode("utf-8", "replace")
        return PASSED if role == "master" else Verdict(Failure.WRONG_ROLE, role)

    def closed(self) -> Verdict:
        return Verdict(Failure.BAD_REPLY, "closed before replying" + (f" ({self.buf[:40]!r})" if self.buf else ""))

    def stalled(self) -> Verdict | None:
        return Verdict(Failure.BAD_REPLY, f"incomplete reply {self.buf[:40]!r}") if self.buf else None


def _shown(value: Value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
