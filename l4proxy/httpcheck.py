"""The ``http`` check as a conversation (``checks.Conversation``): ``GET`` a path, pass on a status.

The request is built and the response parsed by h11 (a well-kept HTTP/1.1 parser without I/O), so
nothing here parses HTTP by hand. The verdict comes with the response head: the body is not read.
A status outside the wanted ranges is a ``bad reply`` naming the status and its reason phrase.

Pure: no sockets, no event loop (h11 has none either).
"""

from __future__ import annotations

import h11

from .checks import PASSED, Failure, Step, Verdict, parse_status


class HttpCheck:
    """``GET path`` with ``Host: host``; passes when the status is in ``status`` (``2xx``, ``200,204``...)."""

    def __init__(self, host: str, path: str = "/", status: str = "2xx") -> None:
        self.host = host
        self.path = path
        self.status = status
        self.ranges = parse_status(status)
        self.connection = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=16384)

    def start(self) -> Step:
        headers = [("Host", self.host), ("User-Agent", "l4proxy-health"), ("Connection", "close")]
        request = h11.Request(method="GET", target=self.path, headers=headers)
        return self.connection.send(request) + self.connection.send(h11.EndOfMessage()), None

    def feed(self, data: bytes) -> Step:
        self.connection.receive_data(data)
        return b"", self._next()

    def _next(self) -> Verdict | None:
        try:
            while True:
                event = self.connection.next_event()
                if event is h11.NEED_DATA:
                    return None
                if isinstance(event, h11.Response):
                    code = event.status_code
                    if any(low <= code <= high for low, high in self.ranges):
                        return PASSED
                    phrase = event.reason.decode("latin-1")
                    return Verdict(Failure.BAD_REPLY, f"status {code} {phrase}".rstrip() + f", expected {self.status}")
                if isinstance(event, h11.ConnectionClosed):
                    return Verdict(Failure.BAD_REPLY, "closed before a response")
        except h11.RemoteProtocolError as exc:
            return Verdict(Failure.BAD_REPLY, f"not HTTP: {exc}")

    def closed(self) -> Verdict:
        self.connection.receive_data(b"")
        return self._next() or Verdict(Failure.BAD_REPLY, "closed before a response")

    def stalled(self) -> Verdict | None:
        return None
