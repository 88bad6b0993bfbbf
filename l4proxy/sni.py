"""SNI routing without termination: the listener stage that picks each TLS client's pool by the server
name in its ClientHello, and hands the client on untouched.

**Peeking, not reading.** The ClientHello is looked at with ``MSG_PEEK`` and never taken from the
kernel, so the session's transport (or the splice engine) reads it as the client's first bytes and
relays it to the member like any other: nothing is replayed by hand, and the member's TLS handshake
with the client is theirs alone. The parser (``clienthello``) is fed only what arrived since the last
peek. While the ClientHello is incomplete, ``SO_RCVLOWAT`` is set one byte past what is there, so the
socket turns readable again only when more has come (or the client closed, or reset); it is set back
to 1 before the client is handed on. The first try is made at once, since a ClientHello has usually
arrived with the connection; only a client still silent is watched (``add_reader``) and given
``sni_timeout``, one loop timer for all of them (``deadlines.Deadlines``).

**Routing** (``sniroutes.Routes``): an exact name, else the longest ``*.suffix``, else the listener's
``pool``; with ``sni_strict`` a name no route matches and a client without SNI are refused. A reload
replaces the routes in place (``reroute``): sessions already routed are not touched.

Every client closed here is counted by reason (``errors``: each ``clienthello.REASONS`` entry, timeout,
eof, reset; ``refused``: no_route, no_sni) and logged, rate-limited (``ratelog``), since any client can
cause one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Callable, Mapping

from .awaiting import Awaited, Rejects, expire
from .clienthello import ClientHelloError, Parser
from .config import ListenerConfig
from .deadlines import Deadlines
from .listener import AcceptedFD
from .peer import format_peer
from .pool import Pool
from .ratelog import Warnings
from .sniroutes import Routes

log = logging.getLogger("l4proxy")

BAD_HELLOS = "clients closed for their TLS ClientHello"  # rate-limited kinds of warnings (ratelog.py)
UNROUTED = "TLS clients no SNI route serves"

Serve = Callable[[socket.socket | AcceptedFD, object], None]  # as frontend.Serve
ServePool = Callable[[Pool], Serve]  # the opener of sessions of one pool

_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


class SniRouter:
    """The SNI stage of one listener: its routes, the clients it is still peeking at, and its counts."""

    def __init__(self, config: ListenerConfig, warnings: Warnings, pools: Mapping[str, Pool]) -> None:
        self.config = config
        self.warnings = warnings
        self.pools = pools  # the proxy's pools by name, as they are now (a reload changes them in place)
        self.routes = _routes(config)
        self.errors: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.routed: Counter[str] = Counter()  # clients handed on, by pool
        self.peeking: set[Awaited] = set()
        late = f"no whole TLS ClientHello within {config.sni_timeout:g}s"
        self.rejects = Rejects(self.errors, warnings, BAD_HELLOS, config.address, late)
        self.deadlines: Deadlines | None = None
        self.leave: Callable[[object], None] | None = None  # told of each client closed here (per-source limits)

    def reroute(self, config: ListenerConfig) -> None:
        """Route new clients by ``config``'s routes from now on (a reload that changed only them)."""
        self.routes = _routes(config)

    def stage(self, serve_pool: ServePool) -> Serve:
        """The accept callback: peek each client's ClientHello, then serve it in the pool it asks for."""
        loop = asyncio.get_running_loop()
        self.deadlines = Deadlines(loop, expire, granularity=0.05)

        def peeking(sock: socket.socket | AcceptedFD, address: object) -> None:
            _Peeking(self, loop, sock, address, serve_pool).start()

        return peeking

    def close(self) -> None:
        """Close the clients whose ClientHello is still awaited (the listener is closing)."""
        for peeking in list(self.peeking):
            peeking.close()
        if self.deadlines is not None:
            self.deadlines.close()

    def choose(self, server_name: str | None, address: object) -> Pool | None:
        """The pool for a client asking for ``server_name``; None (counted, logged) when it is refused."""
        name = self.routes.pool(server_name)
        pool = None if name is None else self.pools.get(name)
        if pool is not None:
            self.routed[pool.name] += 1
            return pool
        reason = "no_sni" if server_name is None else "no_route"
        self.refused[reason] += 1
        asked = "no server name" if server_name is None else f"server name {server_name!r}"
        self.warnings.warn(log, UNROUTED, "refused %s on %s: %s, and no route or default pool serves it",
                           format_peer(address), self.config.address, asked)  # fmt: skip
        return None


def _routes(config: ListenerConfig) -> Routes:
    return Routes(config.sni, None if config.sni_strict else config.pool)


class _Peeking(Awaited):
    """One client whose ClientHello is being peeked at (see the module's docstring)."""

    __slots__ = ("lowered", "parser", "router", "seen", "serve_pool")

    def __init__(
        self,
        router: SniRouter,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket | AcceptedFD,
        address: object,
        serve_pool: ServePool,
    ) -> None:
        super().__init__(loop, sock, address, router.peeking, router.rejects)
        self.router = router
        self.serve_pool = serve_pool
        self.parser = Parser()
        self.seen = 0  # bytes peeked so far: the parser has had them
        self.lowered = False  # SO_RCVLOWAT was raised and must be set back

    def start(self) -> None:
        if not self.read():
            self.watch(self.router.deadlines, self.router.config.sni_timeout, self.read)

    def read(self) -> bool:
        """Peek at what has arrived; True once the client is handed on or closed."""
        raw = self.raw
        try:
            data = raw.recv(self.parser.max_raw, _PEEK_FLAGS)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self.fail("reset")
            return True
        if len(data) <= self.seen:  # readable with nothing new: the client closed its side
            self.fail("eof")
            return True
        try:
            hello = self.parser.feed(data[self.seen :])
        except ClientHelloError as exc:
            self.fail(exc.reason, exc.message)
            return True
        self.seen = len(data)
        try:
            if hello is None:  # readable again only once more has come
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self.seen + 1)
                self.lowered = True
                return False
            if self.lowered:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:  # reset in between
            self.fail("reset")
            return True
        pool = self.router.choose(hello.server_name, self.address)
        if pool is None:
            self.close()
        else:
            self.hand_on(self.serve_pool(pool), self.address)
        return True

    def close(self) -> None:
        super().close()
        if self.router.leave is not None:
            self.router.leave(self.address)
