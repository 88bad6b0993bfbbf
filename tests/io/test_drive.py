"""``Drive``: the loop's connect coroutines stepped from future callbacks, on real loopback sockets."""

from __future__ import annotations

import asyncio

from l4proxy.drive import Drive

from ..kit import blackhole, refused_address, upstreams


class Outcome:
    """The ``done`` callback of a Drive, awaitable."""

    def __init__(self) -> None:
        self.future: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.calls = 0

    def __call__(self, exc: BaseException | None) -> None:
        self.calls += 1
        self.future.set_result(exc)


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def test_a_connect_completes_and_the_transport_carries_bytes() -> None:
    loop = asyncio.get_running_loop()
    async with upstreams(1) as [up]:
        protocol = Collect()
        outcome = Outcome()
        drive = Drive(loop.create_connection(lambda: protocol, up.address.host, up.address.port), outcome)
        assert drive.running  # waiting for the connect, not finished at once
        assert await asyncio.wait_for(outcome.future, 5) is None
        assert not drive.running
        assert protocol.transport is not None
        protocol.transport.write(b"through")
        await asyncio.wait_for(_until(lambda: protocol.data == b"through"), 5)
        protocol.transport.close()


async def test_a_refused_connect_reports_its_error() -> None:
    loop = asyncio.get_running_loop()
    dead = refused_address()
    outcome = Outcome()
    Drive(loop.create_connection(asyncio.Protocol, dead.host, dead.port), outcome)
    assert isinstance(await asyncio.wait_for(outcome.future, 5), ConnectionRefusedError)
    assert outcome.calls == 1


async def test_cancel_closes_the_connect_and_a_reused_descriptor_still_works() -> None:
    """Cancelling a connect in flight must not unregister the next socket that gets the same number
    (asyncio's sock_connect removes its writer in a future callback that has to run first)."""
    loop = asyncio.get_running_loop()
    with blackhole() as silent:
        cancelled = Outcome()
        drive = Drive(loop.create_connection(asyncio.Protocol, silent.host, silent.port), cancelled)
        await asyncio.sleep(0.05)
        drive.cancel()
        async with upstreams(1) as [up]:
            for _ in range(3):  # each new socket is likely to take the number just freed
                protocol = Collect()
                outcome = Outcome()

                def factory(p: Collect = protocol) -> Collect:
                    return p

                Drive(loop.create_connection(factory, up.address.host, up.address.port), outcome)
                assert await asyncio.wait_for(outcome.future, 2) is None
                assert protocol.transport is not None
                protocol.transport.close()
                await asyncio.wait_for(protocol.lost, 2)
    assert cancelled.calls == 0  # done is never called for a cancelled drive
    assert not drive.running


async def test_cancel_after_the_connect_won_the_race_closes_the_connection() -> None:
    """Cancelled from connection_made itself: the connect has completed, the coroutine not yet. The far
    end must see the connection closed, and ``done`` must not be called."""
    loop = asyncio.get_running_loop()
    drives: list[Drive] = []
    far_end: asyncio.Future[bytes] = loop.create_future()

    async def far(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        far_end.set_result(await reader.read())
        writer.close()

    class CancelOnMade(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            drives[0].cancel()

    server = await asyncio.start_server(far, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        outcome = Outcome()
        drives.append(Drive(loop.create_connection(CancelOnMade, "127.0.0.1", port), outcome))
        assert await asyncio.wait_for(far_end, 5) == b""
        assert outcome.calls == 0
        assert not drives[0].running
    finally:
        server.close()
        await server.wait_closed()


async def _until(predicate: object) -> None:
    assert callable(predicate)
    while not predicate():
        await asyncio.sleep(0.001)
