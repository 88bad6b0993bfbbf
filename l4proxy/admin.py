"""``--admin HOST:PORT``: a small HTTP endpoint on the proxy's own event loop.

HTTP/1.1 is parsed by h11 (no hand-written parsing) inside an ``asyncio.Protocol``, like the data path:
no Task per request, no framework. Every answer is computed synchronously from a ``snapshot.Source``
(a few hundred microseconds for a scrape), so the loop is never held for long, and the data path pays
nothing when no one asks.

Routes (README, "Monitoring"):

* ``GET /metrics``: Prometheus text (``metrics.py``).
* ``GET /healthz``: 200 while the process answers at all.
* ``GET /readyz``: 200 only while every pool has an eligible member and no drain has started; else 503
  and the reason.
* ``GET /status``: JSON of listeners, pools, members and totals.
* ``POST /members/{pool}/{member}/drain|enable|disable``: the operator's state of a member (drain: no
  new sessions, checks go on; disable: no checks either; enable: back to what health says). ``member``
  is its ``host:port`` as configured (URL-encode ``[`` ``]`` of IPv6 if your client needs it).

Errors are JSON ``{"error": "..."}``; an unknown pool or member is a 404 naming it. Requests with a body
over ``MAX_BODY`` bytes, connections idle past ``IDLE_TIMEOUT`` and those beyond ``MAX_CONNECTIONS`` at
once are closed.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import h11

from . import metrics
from .config import is_ip
from .counters import ADMIN_STATES
from .snapshot import NotFound, Source, member_json, status

log = logging.getLogger("l4proxy.admin")

MAX_BODY = 4096
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 64  # admin clients at once; more are closed at once, so they cannot eat descriptors
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
_ROUTES = {"/metrics": "GET", "/healthz": "GET", "/readyz": "GET", "/status": "GET"}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


def _json(status_code: int, data: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status_code, json.dumps(data, indent=1).encode() + b"\n", JSON, headers)


def _error(status_code: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return _json(status_code, {"error": message}, headers)


class AdminApp:
    """The routes, as a function of method and target to a Reply: no sockets, testable as a table."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.registry = metrics.registry(source)

    def handle(self, method: str, target: str) -> Reply:
        path = urlsplit(target).path
        if path.startswith("/members/"):
            return self._member(method, path)
        wanted = _ROUTES.get(path)
        if wanted is None:
            return _error(404, f"no such path {path!r}; try /metrics, /healthz, /readyz, /status or /members/...")
        if method != wanted:
            return _error(405, f"{path} takes {wanted}, not {method}", (("Allow", wanted),))
        if path == "/metrics":
            return Reply(200, metrics.render(self.registry), metrics.CONTENT_TYPE)
        if path == "/healthz":
            return Reply(200, b"ok\n")
        snap = self.source.snapshot()
        if path == "/status":
            return _json(200, status(snap))
        return self._ready(snap)

    def _ready(self, snap: Any) -> Reply:
        if snap.draining:
            return Reply(503, b"not ready: draining\n")
        empty = [pool.name for pool in snap.pools if not pool.eligible]
        if empty:
            return Reply(503, f"not ready: no eligible member in pool {', '.join(empty)}\n".encode())
        return Reply(200, b"ready\n")

    def _member(self, method: str, path: str) -> Reply:
        parts = path.split("/")  # "", "members", pool, member, action
        if len(parts) != 5 or not all(parts[2:]):
            return _error(404, f"no such path {path!r}; expected /members/POOL/MEMBER/drain|enable|disable")
        pool, member, action = unquote(parts[2]), unquote(parts[3]), parts[4]
        if action not in ADMIN_STATES:
            return _error(404, f"no action {action!r}; expected drain, enable or disable")
        if method != "POST":
            return _error(405, f"{path} takes POST, not {method}", (("Allow", "POST"),))
        try:
            view = self.source.set_admin(pool, member, action)
        except NotFound as exc:
            return _error(404, str(exc))
        return _json(200, {"pool": pool, "member": member_json(view)})


class _Connection(asyncio.Protocol):
    """One admin client: h11 turns bytes into requests; each is answered at once, in order."""

    def __init__(self, app: AdminApp, connections: set[_Connection]) -> None:
        self.app = app
        self.connections = connections
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        self.transport: asyncio.Transport | None = None
        self.request: h11.Request | None = None
        self.body = 0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.connections) >= MAX_CONNECTIONS:
            transport.close()
            return
        self.connections.add(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self._arm()
        self._serve()

    def eof_received(self) -> bool:
        self.h11.receive_data(b"")
        self._serve()
        return False

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.close)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _serve(self) -> None:
        conn = self.h11
        while self.transport is not None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc.error_status_hint, f"bad request: {exc}")
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    continue
                return
            if isinstance(event, h11.Request):
                self.request, self.body = event, 0
            elif isinstance(event, h11.Data):
                self.body += len(event.data)
                if self.body > MAX_BODY:
                    self._refuse(413, f"request body over {MAX_BODY} bytes")
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._answer()
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _answer(self) -> None:
        request = self.request
        assert request is not None
        try:
            reply = self.app.handle(request.method.decode("ascii", "replace"), request.target.decode("latin-1"))
        except Exception as exc:  # a bug in a renderer must not take the proxy down
            log.exception("admin request %s %s failed", request.method, request.target)
            reply = _error(500, f"internal error: {type(exc).__name__}")
        self._send(reply)
        if self.h11.our_state is h11.MUST_CLOSE:
            self.close()

    def _refuse(self, status_code: int, message: str) -> None:
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._send(_error(status_code, message, (("Connection", "close"),)))
        self.close()

    def _send(self, reply: Reply) -> None:
        assert self.transport is not None
        headers = [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            ("Cache-Control", "no-store"),
            *reply.headers,
        ]
        conn = self.h11
        try:
            phrase = http.HTTPStatus(reply.status).phrase.encode()
            out = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=phrase))
            out += conn.send(h11.Data(data=reply.body))
            out += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.close()
            return
        self.transport.write(out)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for the admin endpoint, made before the event loop that serves it exists."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=64)


class AdminServer:
    """The admin endpoint: listens on ``host:port`` (port 0: any free one) until ``close``."""

    def __init__(self, source: Source, host: str, port: int, sock: socket.socket | None = None) -> None:
        self.app = AdminApp(source)
        self.host = host
        self.port = port
        self.sock = sock  # bound and listening already (the supervisor binds before it forks)
        self.server: asyncio.Server | None = None
        self.connections: set[_Connection] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        factory = lambda: _Connection(self.app, self.connections)  # noqa: E731
        if self.sock is None and is_ip(self.host):
            # Bound here, not by create_server: uvloop resolves even an IP literal in libuv's thread pool,
            # and once a process has started a thread, glibc routes every later system call through its
            # thread-cancellation wrappers (about 3% more instructions per relayed request).
            self.sock = bind(self.host, self.port)
        if self.sock is not None:
            self.server = await loop.create_server(factory, sock=self.sock)
        else:  # every address of a name, or every interface: the loop resolves it
            self.server = await loop.create_server(factory, self.host or None, self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("admin endpoint on http://%s/", _fmt(self.host, self.port))

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for connection in list(self.connections):
            connection.close()
        await self.server.wait_closed()
        self.server = None

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
