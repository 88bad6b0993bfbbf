"""End causes: the rule for which cause a session keeps (a pure table), and the label every way of
ending gets on every side kind (plain, splice, TLS from the client, TLS to the upstream), on real
sockets: one row per side kind x cause, the expected ``end=`` label."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from l4proxy.causes import settle
from l4proxy.config import UpstreamTLSConfig
from l4proxy.splice import Splicer

from ..kit import PKI, TLSUpstream, Upstream, eventually, make_config, refused_address, running

# --- the rule, as a table -----------------------------------------------------------------------------

RULE = [
    # current, ended, how, offered -> kept
    ("", False, "end", "eof", "eof"),
    ("client_closed", False, "end", "upstream_closed", "client_closed"),  # the first cause stays
    ("eof", True, "end", "upstream_reset", "eof"),
    ("", False, "abort", "idle_timeout", "idle_timeout"),
    ("client_reset", False, "abort", "shutdown", "shutdown"),  # not ended yet: the abort says what happened
    ("eof", True, "abort", "half_closed_timeout", "half_closed_timeout"),  # cut a clean flush short
    ("client_closed", True, "abort", "shutdown", "client_closed"),  # already says who ended it
    ("", False, "fail", "no_upstream (refused)", "no_upstream (refused)"),
    ("client_closed", True, "fail", "loop", "loop"),  # what became of the client's bytes
]


@pytest.mark.parametrize(("current", "ended", "how", "offered", "kept"), RULE)
def test_which_cause_a_session_keeps(current: str, ended: bool, how: Any, offered: str, kept: str) -> None:
    assert settle(current, ended, how, offered) == kept


# --- every side kind x every way of ending, on real sockets ------------------------------------------------

KINDS = ("plain", "splice", "tls_in", "tls_out")
PING = b"ping"


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo the first message, then keep the connection open whatever the client does."""
    writer.write(await reader.readexactly(len(PING)))
    await writer.drain()
    with contextlib.suppress(OSError):
        while await reader.read(65536):
            pass
    await asyncio.Event().wait()


async def close_on_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readexactly(len(PING)))
    await writer.drain()
    while await reader.read(65536):
        pass
    writer.close()


async def reply_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readexactly(len(PING)))
    await writer.drain()
    writer.close()


async def reply_and_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readexactly(len(PING)))
    await writer.drain()
    await asyncio.sleep(0)
    reset(writer)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST: linger 0, then abort the transport."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


Client = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Any], Awaitable[None]]


async def client_closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: Any) -> None:
    writer.close()


async def client_half_closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: Any) -> None:
    writer.write_eof()


async def client_reads_to_the_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: Any) -> None:
    with contextlib.suppress(OSError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()


async def client_resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: Any) -> None:
    reset(writer)


async def client_waits(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: Any) -> None:
    """Stays open and quiet; the proxy's timeout or shutdown ends the session."""


async def proxy_shuts_down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: Any) -> None:
    await proxy.drain(0)


IDLE = 0.3
# scenario: the upstream's script, the client's action after its first echo, proxy settings
SCENARIOS: dict[str, tuple[Any, Client, dict[str, Any]]] = {
    "client closes": (close_on_eof, client_closes, {}),
    "client half-closes, upstream stays": (hold, client_half_closes, {"half_closed_timeout": IDLE}),
    "upstream closes": (reply_and_close, client_reads_to_the_end, {}),
    "client resets": (hold, client_resets, {}),
    "upstream resets": (reply_and_reset, client_reads_to_the_end, {}),
    "nobody talks": (hold, client_waits, {"idle_timeout": IDLE}),
    "drain deadline": (hold, proxy_shuts_down, {}),
}

# (scenario, kind) -> label. A TLS side half-closes as a plain one does (close_notify for FIN), so the
# labels are the same; the client's half-close is a plain client's (asyncio's TLS streams cannot send one),
# and the TLS upstream here, asyncio's, answers close_notify by closing.
EXPECTED = {
    "client closes": dict.fromkeys(KINDS, "eof"),
    "client half-closes, upstream stays": {
        "plain": "half_closed_timeout",
        "splice": "half_closed_timeout",
        "tls_out": "eof",
    },
    "upstream closes": dict.fromkeys(KINDS, "eof"),
    "client resets": dict.fromkeys(KINDS, "client_reset"),
    "upstream resets": dict.fromkeys(KINDS, "upstream_reset"),
    "nobody talks": dict.fromkeys(KINDS, "idle_timeout"),
    "drain deadline": dict.fromkeys(KINDS, "shutdown"),
}
ROWS = [(scenario, kind, label) for scenario, labels in EXPECTED.items() for kind, label in labels.items()]


@pytest.mark.parametrize(("scenario", "kind", "label"), ROWS)
async def test_the_end_label_says_who_ended_the_session(scenario: str, kind: str, label: str, pki: PKI) -> None:
    script, act, settings = SCENARIOS[scenario]
    server_ctx = pki.upstream_server_ctx() if kind == "tls_out" else None
    upstream = TLSUpstream(server_ctx, script) if server_ctx is not None else Upstream(script)
    if kind == "splice":
        settings = {**settings, "relay": "splice"}
    if kind == "tls_in":
        settings = {**settings, "tls": pki.server_tls()}
    if kind == "tls_out":
        settings = {**settings, "upstream_tls": UpstreamTLSConfig(ca=pki["ca.pem"])}
    async with upstream as server, running(make_config([server.address], **settings)) as (proxy, log):
        client_ctx: ssl.SSLContext | None = pki.client_ctx() if kind == "tls_in" else None
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port(), ssl=client_ctx)
        await eventually(lambda: any(s.upstream is not None for s in proxy.sessions))
        [session] = proxy.sessions
        if kind == "splice":
            await eventually(lambda: isinstance(session.engine, Splicer))
        writer.write(PING)
        assert await asyncio.wait_for(reader.readexactly(len(PING)), 5) == PING
        await act(reader, writer, proxy)
        await log.wait_for(1)
        writer.close()
    assert [s.end_cause for s in log.sessions] == [label]


@pytest.mark.parametrize("kind", ["plain", "tls_in", "tls_out"])
async def test_no_upstream_says_why_on_every_side_kind(kind: str, pki: PKI) -> None:
    settings: dict[str, Any] = {"retries": 0}
    if kind == "tls_in":
        settings["tls"] = pki.server_tls()
    if kind == "tls_out":
        settings["upstream_tls"] = UpstreamTLSConfig(ca=pki["ca.pem"])
    async with running(make_config([refused_address()], **settings)) as (proxy, log):
        client_ctx = pki.client_ctx() if kind == "tls_in" else None
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port(), ssl=client_ctx)
        with contextlib.suppress(OSError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await log.wait_for(1)
    assert [s.end_cause for s in log.sessions] == ["no_upstream (refused)"]
