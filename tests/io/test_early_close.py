"""Clients that send and leave before their upstream connect finishes: every byte still reaches the
upstream (the dial goes on, the held bytes are delivered, then the upstream side is closed).

The upstream is slow to accept (``kit.SlowAccept``: SYNs dropped until the test opens it), so each
client's whole life, handshake, message and close, falls inside its upstream connect: the window is as
wide as the test wants, not a millisecond of luck. Clients are blocking sockets in threads, which is
what lets them end a TLS session exactly as asked: close_notify then close, or a bare FIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from l4proxy.relay import Session

from ..kit import PKI, SlowAccept, eventually, make_config, running

CLIENTS = 50
TIMEOUT = 10.0


def message(i: int) -> bytes:
    return b"MSG-%04d\n" % i


def tls_close_notify(port: int, ctx: ssl.SSLContext, i: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(message(i))
        tls.setblocking(False)  # send close_notify and leave: the proxy answers only once its upstream has
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()


def tls_bare_fin(port: int, ctx: ssl.SSLContext, i: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(message(i))
        tls.shutdown(socket.SHUT_WR)  # drops the TLS layer first: a FIN with no close_notify, then leave


def plain_close(port: int, _ctx: ssl.SSLContext | None, i: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(message(i))


Client = Callable[[int, ssl.SSLContext, int], None]


async def run_clients(port: int, client: Client, ctx: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(8) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, client, port, ctx, i) for i in range(CLIENTS)))


async def every_byte_arrives(client: Client, ctx: ssl.SSLContext | None, ends: set[str], **settings: object) -> None:
    """``CLIENTS`` clients send a message and leave during their upstream connect; then the upstream
    accepts, and must receive every message. ``ends`` are the access log's acceptable end causes."""
    upstream = SlowAccept()
    try:
        config = make_config([upstream.address], connect_timeout=30.0, retries=0, **settings)
        async with running(config) as (proxy, log):
            await run_clients(proxy.port(), client, ctx)

            def every_client_left_while_dialing() -> bool:
                live: set[Session] = proxy.sessions
                return proxy.served + len(live) == CLIENTS and all(s.client.eof or s.client.closed for s in live)

            # every client is gone and no upstream connect has finished: the bytes are all held here
            await eventually(every_client_left_while_dialing, timeout=TIMEOUT)
            assert proxy.served == 0, "a session ended before its upstream existed: its bytes are lost"
            await upstream.open()
            await log.wait_for(CLIENTS, timeout=30)
            await eventually(lambda: len([r for r in upstream.received if r]) == CLIENTS)
            assert sorted(r for r in upstream.received if r) == [message(i) for i in range(CLIENTS)]
            for line in log.lines:
                assert f" upstream={upstream.address} in=9 " in line, line
                assert line.split(" end=")[1].split()[0] in ends, line
    finally:
        await upstream.close()


@pytest.mark.parametrize("client", [tls_close_notify, tls_bare_fin], ids=["close_notify", "bare_fin"])
async def test_tls_clients_that_leave_during_the_connect_lose_nothing(
    pki: PKI,
    client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a TLS client's EOF (close_notify, or a FIN without one) is passed on as a plain client's; one that
    # leaves without reading its session tickets resets the connection
    ends = {"eof", "client_closed", "client_reset"}
    await every_byte_arrives(client, pki.client_ctx(), ends, tls=pki.server_tls())
    assert "has no effect when using ssl" not in caplog.text  # eof_received asks a TLS side for nothing


@pytest.mark.parametrize("relay", ["transport", "splice"])
async def test_plain_clients_that_leave_during_the_connect_lose_nothing(relay: str) -> None:
    # the client's FIN is passed on; the upstream's close ends the session cleanly
    await every_byte_arrives(plain_close, None, {"eof"}, relay=relay)
