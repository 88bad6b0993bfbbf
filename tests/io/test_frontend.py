"""The frontend: the uvloop behaviour its plain-client opener relies on, the start-up line of each
listener, and a member that leads back to the proxy itself (a loop) caught at run time."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from l4proxy import Address, HealthConfig, Proxy
from l4proxy.listener import AcceptedFD

from ..kit import RecordingLog, eventually, make_config, running, upstreams
from ..servers import free_port


async def test_uvloop_opens_a_plain_client_the_way_the_frontend_relies_on() -> None:
    """frontend.py starts uvloop's connect_accepted_socket by hand and finishes it at session end: the
    first step calls the factory once, makes the transport from a bare descriptor and waits only for
    connection_made, which comes from the loop; once that is done, the next step returns."""
    loop = asyncio.get_running_loop()
    if not type(loop).__module__.startswith("uvloop"):
        pytest.skip("the fast path exists on uvloop only")
    made: list[asyncio.BaseTransport] = []

    class Recorder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    protocol, calls = Recorder(), []
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        fd, _ = server._accept()  # type: ignore[attr-defined]
        coro = loop.connect_accepted_socket(lambda: calls.append(1) or protocol, AcceptedFD(fd))  # type: ignore[arg-type]
        waiting = coro.send(None)
        assert (calls, made, asyncio.isfuture(waiting), waiting.done()) == ([1], [], True, False)
        await eventually(lambda: made != [])
        [transport] = made
        assert transport.get_extra_info("peername") == client.getsockname()
        transport.close()
        with pytest.raises(StopIteration) as finished:
            coro.send(None)
        assert finished.value.value == (transport, protocol)
        client.close()


async def test_start_up_names_each_listener_and_each_pool_with_its_members(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "l4proxy")
    async with upstreams(2) as [a, b], running(make_config([a.address, b.address])) as (proxy, _):
        port = proxy.port()
    lines = [r.getMessage() for r in caplog.records]
    assert f"listening on 127.0.0.1:{port} (listener default) -> pool default" in lines
    assert f"pool default: 2 members: {a.address}, {b.address}; no health checks; retries 2" in lines


@pytest.mark.parametrize("probes", [False, True])
async def test_a_member_that_is_the_proxy_itself_is_closed_not_multiplied(
    probes: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Built directly (the start-up refusal is the command's): every connect to the member comes back
    as a client, which is closed as a loop instead of dialing on; a client of the proxy and every probe
    cost a couple of sessions, and the proxy keeps serving its other listener."""
    caplog.set_level(logging.WARNING, "l4proxy")
    port = free_port()
    health = HealthConfig(interval=0.05, timeout=0.5) if probes else HealthConfig(enabled=False)
    looped = make_config([Address("127.0.0.1", port)], Address("127.0.0.1", port), health=health)
    log = RecordingLog()
    proxy = Proxy(looped, log)
    await proxy.start()
    try:
        if probes:
            await eventually(lambda: sum(s.end_cause == "loop" for s in log.sessions) >= 5)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not relayed in circles
            writer.close()
            await eventually(lambda: any(s.end_cause == "loop" for s in log.sessions) and not proxy.sessions)
        assert len(log.sessions) <= (40 if probes else 4), [s.end_cause for s in log.sessions]
        # A probe or a session in flight holds its address for a moment; one left behind stays for good
        await eventually(lambda: not proxy.outgoing.addresses - {a for p in proxy.probers for a in p._held.values()})
    finally:
        await proxy.drain()
    warned = [r.getMessage() for r in caplog.records if "leads back to this proxy" in r.getMessage()]
    assert warned and len(warned) <= 5  # rate-limited, never one per connection
    assert f"pool default has a member that leads back to this proxy (127.0.0.1:{port})" in warned[0]




async def test_probes_of_a_member_on_another_port_leave_no_address_that_could_be_taken_for_a_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The kernel may later give a client the local port a finished probe used; a member on another
    port than ours cannot be us, so its probes' addresses are not kept (kept, that client would be
    closed as a loop: a soak saw it happen)."""
    caplog.set_level(logging.DEBUG, "l4proxy")

    async def member(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(member, "127.0.0.1", 0)
    try:
        member_port = server.sockets[0].getsockname()[1]
        health = HealthConfig(interval=3.0, timeout=1.0)  # the first probe within 3 s, the next 2.7 s later
        async with running(make_config([Address("127.0.0.1", member_port)], health=health)) as (proxy, _):
            await eventually(lambda: any("probe of" in r.getMessage() for r in caplog.records), timeout=6)
            assert (proxy.outgoing.addresses, proxy.probers[0]._held) == (set(), {})
    finally:
        server.close()
        await server.wait_closed()
