"""TLS on a plain transport: ``ssl.SSLObject`` over two ``MemoryBIO``s, with half-close.

Why not the loops' own TLS transports (``create_connection(ssl=...)``): they cannot half-close. Their
``write_eof`` does not exist, and once the peer's close_notify arrives, or once we close, they discard
what the peer still sends. TLS itself allows both halves (RFC 8446 6.1: close_notify ends only the
sender's direction, and OpenSSL keeps reading after sending it and keeps writing after receiving it,
on TLS 1.2 as on 1.3), so this engine sits between the loop's plain TCP transport and the relay's
``Pump``: it is the TCP transport's protocol and the pump's transport.

Rules:

* **Handshake**: driven by the bytes that arrive; its outcome goes to ``done`` (``None`` or the error)
  before the pump's ``connection_made``. The caller bounds it (``timeout``, or the dial's deadline).
  A TLS 1.3 server's last flight, its session tickets, is written after the pump's
  ``connection_made`` (which starts the dial): the client does not wait for them, the upstream connect
  need not wait behind them. Every other flight is written before (the peer waits for it).
* **Reading**: every TCP read is fed to the SSLObject and the plaintext of all complete records is
  handed to the pump in one call. After a record, the loop stops when neither the BIO nor OpenSSL holds
  more, so the common read raises no ``SSLWantReadError``. What OpenSSL writes while reading (TLS 1.3
  session tickets, a KeyUpdate reply) is flushed at once.
* **Writing**: plaintext is encrypted and the records written to the TCP transport in the same call;
  the TCP transport's buffer limits and its ``pause_writing``/``resume_writing`` are the pump's, so
  backpressure is unchanged (counted in ciphertext, a few bytes per record more).
* **Half-close**: ``write_eof`` sends close_notify and keeps reading; the peer's close_notify (or a TCP
  FIN without one: a truncated close, as the loops' transports also accept) is the pump's
  ``eof_received`` and writing goes on. When both directions are done the TCP connection is closed.
  ``close`` flushes, sends close_notify if not sent and closes the TCP transport after its buffer.
* **Renegotiation** is refused by the contexts (``tls.py``); TLS 1.3 KeyUpdate is OpenSSL's business.
* **Late verdicts** (``confirm``): a TLS 1.3 client's handshake is done before the server has checked
  our certificate (or seen that we sent none), and a server that rejects it says so in an alert after
  the handshake. With ``confirm``, a TLS 1.3 client handshake is reported done only at the first
  record the server sends after it (session tickets, which servers send once our certificate passes,
  or data from a server that speaks first), or ``confirm_wait(elapsed)`` seconds after it, whichever is
  first (and within half the time left to ``by``, the attempt's deadline, so that a member that sends
  no tickets never fails a probe by our wait alone); an alert then fails the handshake, so the dialer
  counts a failed attempt and tries another member. Nothing of the client's has been sent by then, so
  the retry is safe. A server that closes or resets the connection in that window, without an alert,
  fails it with ``EndedBeforeVerdict`` (a reset); when we sent a certificate, ``judged`` makes that a
  ``LateRejection`` (a TLS failure), since a server that rejects a certificate without saying why ends
  the connection just so.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Dropped", "EndedBeforeVerdict", "LateRejection", "TLSEngine", "confirm_wait", "judged"]

_RECORD = 16384  # the most plaintext one TLS record carries
_HANDSHAKE, _CONFIRM, _OPEN, _CLOSED = range(4)

Done = Callable[[BaseException | None], None]


class Dropped(ConnectionAbortedError):
    """The handshake's outcome when we closed the connection first (a drain, a cancelled dial)."""


class EndedBeforeVerdict(ConnectionResetError):
    """A TLS 1.3 server closed (``reset`` False) or reset the connection after our side of the handshake,
    before its first record: no alert, so no reason; a reset to whoever cannot tell more (``judged``)."""

    def __init__(self, reset: bool) -> None:
        super().__init__(f"the peer {'reset' if reset else 'closed'} the connection after the TLS handshake")
        self.reset = reset


class LateRejection(ssl.SSLError):
    """``EndedBeforeVerdict`` after we sent a certificate: most likely the server refused it and hung
    up without an alert. A TLS failure whose ``reason`` says what happened and what it may mean."""

    def __init__(self, reset: bool) -> None:
        how = "reset" if reset else "closed"
        self.reason = f"{how} after the handshake, before any data: the member may have rejected our certificate"
        super().__init__(self.reason)


def judged(exc: BaseException, certificate: bool) -> BaseException:
    """What a failed client handshake is reported as, given whether we sent a certificate (``certificate``)."""
    if certificate and isinstance(exc, EndedBeforeVerdict):
        return LateRejection(exc.reset)
    return exc


def confirm_wait(elapsed: float) -> float:
    """How long a TLS 1.3 client waits for the server's first record after a handshake that took
    ``elapsed`` seconds from the TCP connection: the server's verdict leaves when our Finished arrives,
    one trip after the handshake's end, and the handshake took a round trip and the server's work, so
    twice that covers it. At least 20 ms for a busy host's scheduling, at most 1 s."""
    return min(max(2 * elapsed, 0.02), 1.0)


class TLSEngine(asyncio.Protocol):
    """One TLS connection: the protocol of a TCP transport and the transport of ``app``."""

    __slots__ = (
        "_closing",
        "_eof_in",
        "_eof_out",
        "_extra",
        "_reading",
        "_timer",
        "app",
        "by",
        "confirm",
        "done",
        "incoming",
        "outgoing",
        "records",
        "server_side",
        "sslobj",
        "started",
        "state",
        "tcp",
        "timeout",
    )

    def __init__(
        self,
        context: ssl.SSLContext,
        app: asyncio.Protocol,
        done: Done,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float | None = None,
        confirm: bool = False,
        by: float | None = None,
    ) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )
        # The records go through the C object under ssl.SSLObject: same calls, minus a Python frame
        # each (three per request/response through a TLS side). SSLObject itself stays the public face.
        self.records: Any = getattr(self.sslobj, "_sslobj", self.sslobj)
        self.app = app
        self.done: Done | None = done
        self.tcp: asyncio.Transport | None = None
        self.state = _HANDSHAKE
        self.timeout = timeout
        self.server_side = server_side
        self.confirm = confirm and not server_side
        self.by = by  # the attempt's deadline (time.monotonic()), if any: a late verdict's wait ends by then
        self._timer: asyncio.TimerHandle | None = None
        self.started = 0.0
        self._eof_in = False  # the peer's direction ended (close_notify or FIN)
        self._eof_out = False  # ours ended: close_notify sent
        self._closing = False  # close() called: no more writes, close once flushed
        self._reading = True
        self._extra: dict[str, Any] = {}

    # --- the TCP transport's protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = transport  # type: ignore[assignment]
        if self.confirm:
            self.started = time.monotonic()
        if self.timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout, self._timed_out)
        self._handshake()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        state = self.state
        if state == _OPEN:
            self._read()
        elif state == _HANDSHAKE:
            self._handshake()
        elif state == _CONFIRM:
            self._confirm_read()

    def eof_received(self) -> bool | None:
        if self.state != _OPEN:
            if self.state == _CONFIRM:
                self._fail(EndedBeforeVerdict(reset=False))
            else:
                self._fail(ConnectionResetError("the peer closed the connection during the TLS handshake"))
            return False
        if self._eof_in:  # after its close_notify: nothing more is coming
            return self._eof_out is False
        self._eof_in = True  # a FIN without close_notify: the end of its direction all the same
        keep = self.app.eof_received()
        return bool(keep) and not self._eof_out

    def connection_lost(self, exc: Exception | None) -> None:
        state, self.state = self.state, _CLOSED
        self._cancel_timer()
        if state == _OPEN:
            self.app.connection_lost(exc)
        elif state == _CONFIRM and (exc is None or isinstance(exc, ConnectionResetError)):
            self._report(EndedBeforeVerdict(reset=exc is not None))
        elif state != _CLOSED:
            self._report(exc or ConnectionResetError("the connection closed during the TLS handshake"))
        self.app = None  # type: ignore[assignment]  # no callback after connection_lost: break the cycle

    def pause_writing(self) -> None:
        if self.state == _OPEN:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.state == _OPEN:
            self.app.resume_writing()

    # --- handshake ---------------------------------------------------------------------------------

    @property
    def handshaking(self) -> bool:
        """The handshake (or the wait for a late verdict) is still under way."""
        return self.state in (_HANDSHAKE, _CONFIRM)

    def _handshake(self) -> None:
        try:
            self.records.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self._flush()  # the alert that says why
            self._fail(exc)
            return
        if self.server_side and self.records.version() == "TLSv1.3":
            # A TLS 1.3 server's last flight is its session tickets, which the client does not wait for:
            # the app's connection (the dial) starts first, and the tickets follow, with the first records
            # read if any (as the loops' transports order it).
            self._open(())
            if self.state == _OPEN:
                if self.incoming.pending:
                    self._read()  # writes the tickets before it hands the plaintext over
                else:
                    self._flush()
            return
        self._flush()
        if self.confirm and self.sslobj.version() == "TLSv1.3":
            self.state = _CONFIRM
            self._cancel_timer()
            now = time.monotonic()
            wait = confirm_wait(now - self.started)
            if self.by is not None:  # half of what is left, so the attempt's own exchange has the rest
                wait = min(wait, max(self.by - now, 0.0) / 2)
            self._timer = asyncio.get_running_loop().call_later(wait, self._open, ())
            if self.incoming.pending:
                self._confirm_read()
            return
        self._open(())
        if self.state == _OPEN and self.incoming.pending:
            self._read()

    def _confirm_read(self) -> None:
        """The first record after a TLS 1.3 client handshake: an alert fails it, anything else opens."""
        chunks = []
        try:
            while self.incoming.pending or self.sslobj.pending():
                chunk = self.sslobj.read(_RECORD)
                if not chunk:
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            pass
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()
        self._open(chunks)
        if self.state == _OPEN and self.incoming.pending:
            self._read()

    def _open(self, early: tuple[bytes, ...] | list[bytes]) -> None:
        """The handshake is done: tell ``done``, make the app's connection, hand over what came first."""
        if self.state not in (_HANDSHAKE, _CONFIRM):
            return
        self._cancel_timer()
        self.state = _OPEN
        self._report(None)
        if self.state != _OPEN:  # done() closed us
            return
        self.app.connection_made(self)  # type: ignore[arg-type]  # the transport interface, duck-typed
        if early and self.state == _OPEN:
            self.app.data_received(b"".join(early))

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(TimeoutError("TLS handshake timeout"))

    def _fail(self, exc: BaseException) -> None:
        """The handshake failed: drop the connection, then report it (once)."""
        self.state = _CLOSED
        self._cancel_timer()
        if self.tcp is not None:
            self.tcp.abort()
        self._report(exc)

    def _report(self, exc: BaseException | None) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(exc)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    # --- records -----------------------------------------------------------------------------------

    def _read(self) -> None:
        """Decrypt every complete record held, hand the plaintext over in one call, note the peer's end.
        The peer's close_notify comes as ``b""``, or as SSLZeroReturnError once ours is sent."""
        sslobj, incoming = self.records, self.incoming
        chunks = []
        ended = False
        error = None
        try:
            while True:
                chunk = sslobj.read(_RECORD)
                if not chunk:
                    ended = True
                    break
                chunks.append(chunk)
                if not (incoming.pending or sslobj.pending()):
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            ended = True
        except ssl.SSLError as exc:
            error = exc
        if self.outgoing.pending:  # tickets, a KeyUpdate reply, an alert
            self.tcp.write(self.outgoing.read())  # type: ignore[union-attr]
        if chunks:
            self.app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if self.state != _OPEN:
            return
        if error is not None:
            self._broken(error)
        elif ended:
            self._peer_ended()

    def _peer_ended(self) -> None:
        """The peer's close_notify: its direction is over, ours may go on."""
        if self._eof_in:
            return
        self._eof_in = True
        keep = self.app.eof_received()
        if self.state != _OPEN:
            return
        if self._eof_out or not keep:
            self.close()

    def _late_eof(self) -> None:
        if self.state == _OPEN:
            self._peer_ended()

    def _broken(self, exc: BaseException) -> None:
        """A record failed (bad MAC, a fatal alert): the connection is lost with that error."""
        self._flush()
        if self.tcp is not None:
            self.tcp.abort()  # connection_lost follows, with no error: give the app this one first
        self.state = _CLOSED
        app, self.app = self.app, None  # type: ignore[assignment]
        if app is not None:
            app.connection_lost(exc if isinstance(exc, Exception) else None)

    def _flush(self) -> None:
        if self.outgoing.pending and self.tcp is not None:
            self.tcp.write(self.outgoing.read())

    # --- the app's transport -----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_out or self.state != _OPEN or not data:
            return
        try:
            self.records.write(data)
        except ssl.SSLError as exc:  # none is expected once open (no renegotiation): lose the connection
            self._broken(exc)
            return
        self.tcp.write(self.outgoing.read())  # type: ignore[union-attr]

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Send close_notify and keep reading; with the peer's direction over too, close."""
        if self._eof_out or self.state != _OPEN:
            return
        self._eof_out = True
        try:
            self.sslobj.unwrap()  # OpenSSL then looks for the peer's close_notify among what it holds
        except ssl.SSLWantReadError:  # sent; the peer's close_notify has not come yet
            pass
        except ssl.SSLError:
            pass
        else:  # it held the peer's close_notify too (the reads leave none behind, but if): its EOF
            if not self._eof_in:
                asyncio.get_running_loop().call_soon(self._late_eof)
        self._flush()
        if self._eof_in and self.tcp is not None:
            self.tcp.close()

    def close(self) -> None:
        """Flush, send close_notify (unless sent), and close the TCP connection after its buffer. During
        the handshake (a drain, a cancelled dial) the connection is dropped and ``done`` not called."""
        if self._closing:
            return
        self._closing = True
        if self.state == _OPEN:
            self.write_eof()
        elif self.state != _CLOSED:
            self._fail(Dropped("closed during the TLS handshake"))
            return
        if self.tcp is not None:
            self.tcp.close()

    def abort(self) -> None:
        self._closing = True
        if self.state not in (_OPEN, _CLOSED):
            self._fail(Dropped("closed during the TLS handshake"))
        elif self.tcp is not None:
            self.tcp.abort()

    def is_closing(self) -> bool:
        return self._closing or self.state == _CLOSED or self.tcp is None or self.tcp.is_closing()

    def pause_reading(self) -> None:
        if self._reading and self.tcp is not None:
            self._reading = False
            self.tcp.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading and self.tcp is not None and not self.tcp.is_closing():
            self._reading = True
            self.tcp.resume_reading()

    def is_reading(self) -> bool:
        return self._reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.tcp is not None:
            self.tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.tcp.get_write_buffer_size() if self.tcp is not None else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.sslobj
        if name == "sslcontext":
            return self.sslobj.context
        if name in ("peercert", "cipher", "compression"):
            value = getattr(self.sslobj, "getpeercert" if name == "peercert" else name)()
            return default if value is None else value
        return self.tcp.get_extra_info(name, default) if self.tcp is not None else default
