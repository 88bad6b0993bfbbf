"""The TLS engine's order of writes at the end of a server handshake, over real sockets.

A TLS 1.3 server's last flight is its session tickets, which the client does not wait for: the app's
``connection_made`` (where a terminating listener starts the dial) comes before they are written, and
they are written all the same. A TLS 1.2 server's last flight (its Finished) is what the client waits
for before it sends data: it is written before the app's connection is made.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest

from l4proxy.tls import server_context
from l4proxy.tlsengine import TLSEngine

from ..kit import PKI

TIMEOUT = 10.0
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class Echo(asyncio.Protocol):
    """The engine's app: notes what the engine still held unwritten when the connection was made, and
    echoes what it reads."""

    def __init__(self) -> None:
        self.engine: TLSEngine | None = None
        self.unwritten_at_open = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSEngine)
        self.engine = transport
        self.unwritten_at_open = transport.outgoing.pending

    def data_received(self, data: bytes) -> None:
        assert self.engine is not None
        self.engine.write(data)

    def eof_received(self) -> bool:
        assert self.engine is not None
        self.engine.write_eof()
        return True


@pytest.mark.parametrize(("version", "held"), [("1.3", True), ("1.2", False)])
async def test_a_tls13_server_makes_the_apps_connection_before_it_writes_the_tickets(
    pki: PKI, version: str, held: bool
) -> None:
    """TLS 1.3: tickets still unwritten when the app's connection is made, and the client gets them
    before the echo; TLS 1.2: nothing left unwritten (the client waits for the server's Finished)."""
    loop = asyncio.get_running_loop()
    ctx = server_context(pki.server_tls())
    ctx.maximum_version = VERSIONS[version]
    app = Echo()
    outcome: asyncio.Future[BaseException | None] = loop.create_future()
    server = await loop.create_server(
        lambda: TLSEngine(ctx, app, outcome.set_result, server_side=True, timeout=TIMEOUT), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=pki.client_ctx(), server_hostname="localhost"), TIMEOUT
        )
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"ping"
        tls = writer.get_extra_info("ssl_object")
        assert tls.version() == f"TLSv{version}"
        assert tls.session.has_ticket
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), TIMEOUT)  # the engine answers our close_notify with its own
    finally:
        server.close()
        await server.wait_closed()
    assert await outcome is None
    assert (app.unwritten_at_open > 0) is held
