"""``Proxy.reconfigure`` on a running proxy (RELIABILITY cases 32 and 35): listeners and members
change under live traffic, with sessions open, and nothing is refused or lost."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random

import pytest

from l4proxy import Address, Config, ListenerConfig, MemberConfig
from l4proxy.outlier import OutlierPolicy

from ..kit import connect, eventually, make_config, open_session, running, upstreams, with_members


def listeners(config: Config, *added: ListenerConfig, drop: int | None = None) -> Config:
    kept = tuple(c for i, c in enumerate(config.listeners) if i != drop)
    return dataclasses.replace(config, listeners=(*kept, *added))


async def client_loop(port: int, stop: asyncio.Event, results: list[int]) -> None:
    """Connect without pause until ``stop``; each session sends random bytes and must get all back."""
    while not stop.is_set():
        payload = os.urandom(random.randint(1, 20_000))
        reader, writer = await connect(port)  # a refused connect raises: the test fails
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
        writer.close()
        await writer.wait_closed()
        results.append(len(payload))


async def test_reloads_under_live_traffic_refuse_nothing_and_lose_no_byte() -> None:
    async with upstreams(2) as [u0, u1], running(make_config([u0.address])) as (proxy, access):
        stop = asyncio.Event()
        done: list[int] = []
        loops = [asyncio.create_task(client_loop(proxy.port(), stop, done)) for _ in range(3)]
        config = proxy.config
        edits = [
            with_members(config, [u0.address, u1.address]),  # a member joins
            listeners(with_members(config, [u1.address]), dataclasses.replace(config.listeners[0], idle_timeout=60.0),
                      drop=0),  # a new Frontend around the same socket, and the first member leaves
            listeners(with_members(config, [u0.address]), ListenerConfig(Address("127.0.0.1", 0), name="extra")),
            with_members(config, [u0.address, u1.address]),  # the extra listener closes again
        ]  # fmt: skip
        for edit in edits:
            before = len(done)
            port = proxy.port()
            steps, problems = await proxy.reconfigure(edit)
            assert problems == [] and proxy.port() == port  # the same socket all along
            await eventually(lambda b=before: len(done) >= b + 5)  # type: ignore[misc]
        stop.set()
        await asyncio.gather(*loops)
        assert proxy.reloads == 4
        assert steps.closed == (1,)
        await access.wait_for(len(done))
        assert {s.end_cause for s in access.sessions} == {"eof"}
        assert sum(s.client.nbytes for s in access.sessions) == sum(done)  # every byte in, and back:
        assert sum(s.upstream.nbytes for s in access.sessions) == sum(done)
        assert u0.accepted > 0 and u1.accepted > 0


async def test_a_removed_member_keeps_its_open_session_until_the_drain_timeout() -> None:
    async with upstreams(2) as [u0, u1], running(make_config([u0.address], drain_timeout=1.0)) as (proxy, access):
        reader, writer, member = await open_session(proxy)
        await proxy.reconfigure(with_members(proxy.config, [u1.address]))
        assert [m.address for m in proxy.pools["default"].members] == [u1.address]
        writer.write(b"still here")  # the session on the removed member keeps working
        assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
        assert await asyncio.wait_for(_echo_once(proxy.port()), 5) == b"new"
        assert u1.accepted == 1
        await access.wait_for(2, timeout=5)  # the new client's, then the old one closed at the deadline
        assert [s.end_cause for s in access.sessions] == ["eof", "shutdown"]
        assert access.sessions[1].member is member
        writer.close()


async def test_a_member_added_back_before_the_drain_timeout_keeps_its_sessions() -> None:
    """Removed with a session open, the member waits out the drain; added back before the drain timeout,
    it is a member again, and its session is not closed when the removal's drain timeout comes."""
    async with upstreams(2) as [u0, u1], running(make_config([u0.address], drain_timeout=0.3)) as (proxy, access):
        reader, writer, member = await open_session(proxy)
        await proxy.reconfigure(with_members(proxy.config, [u1.address]))
        await proxy.reconfigure(with_members(proxy.config, [u0.address, u1.address]))
        assert proxy.pools["default"].members[0] is member  # revived as it was
        await eventually(lambda: not proxy._drain_timers)  # the removal's drain timeout has passed
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await access.wait_for(1, timeout=5)
        assert [s.end_cause for s in access.sessions] == ["eof"]


async def test_a_member_that_stays_keeps_its_object_and_health() -> None:
    async with upstreams(2) as [u0, u1], running(make_config([u0.address])) as (proxy, _access):
        [before] = proxy.pools["default"].members
        before.health.streak = 1  # a failure streak under way
        await proxy.reconfigure(with_members(proxy.config, [u0.address, u1.address]))
        kept, added = proxy.pools["default"].members
        assert kept is before and kept.health.streak == 1 and added.address == u1.address


async def test_listeners_added_and_removed_while_their_sessions_run() -> None:
    async with upstreams(1) as [u0], running(make_config([u0.address], drain_timeout=5.0)) as (proxy, _access):
        first = proxy.port()
        reader, writer, _member = await open_session(proxy)
        await proxy.reconfigure(listeners(proxy.config, ListenerConfig(Address("127.0.0.1", 0), name="extra")))
        second = proxy.port(1)
        assert await _echo_once(second) == b"new"
        await proxy.reconfigure(listeners(proxy.config, drop=0))
        assert proxy.port() == second
        with pytest.raises(ConnectionRefusedError):
            await connect(first)
        writer.write(b"after")  # its listener is gone, the session is not
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"after"
        writer.close()


async def test_a_new_listener_whose_address_is_taken_changes_nothing() -> None:
    async with upstreams(2) as [u0, u1], running(make_config([u0.address])) as (proxy, _access):
        taken = proxy.port()
        edit = listeners(with_members(proxy.config, [u1.address]), ListenerConfig(Address("", taken), name="clash"))
        with pytest.raises(OSError):
            await proxy.reconfigure(edit)
        assert [m.address for m in proxy.pools["default"].members] == [u0.address]
        assert len(proxy.frontends) == 1 and proxy.reloads == 0
        assert await _echo_once(taken) == b"new"


async def _echo_once(port: int) -> bytes:
    reader, writer = await connect(port)
    writer.write(b"new")
    data = await asyncio.wait_for(reader.readexactly(3), 5)
    writer.close()
    await writer.wait_closed()
    return data


async def test_changed_member_options_and_pool_settings_apply_in_place() -> None:
    """A reload that changes a member's weight, cap and backup flag, and the pool's traffic settings,
    keeps the member (and its open session) and applies the new values to it and the pool at once."""
    async with upstreams(2) as [u0, u1], running(make_config([u0.address, u1.address])) as (proxy, _access):
        pool = proxy.pools["default"]
        reader, writer, member = await open_session(proxy)
        other = next(m for m in pool.members if m is not member)
        config = proxy.config
        options = {member.address: MemberConfig(member.address, weight=3, max_conns=7)}
        options[other.address] = MemberConfig(other.address, backup=True)
        changed = dataclasses.replace(
            config.pools[0],
            members=tuple(options[m.address] for m in pool.members),
            slow_start=5.0,
            retry_budget=40,
            panic_threshold=30,
            on_member_down="close",
            eject_after=2,
            eject_time=1.0,
            max_eject_time=4.0,
            max_ejected_percent=100,
        )
        steps, problems = await proxy.reconfigure(dataclasses.replace(config, pools=(changed,)))
        assert problems == [] and steps.pools_updated == ("default",)
        assert pool.members == [member, other] or pool.members == [other, member]
        assert (member.weight, member.limit, member.backup, member.active) == (3, 7, False, 1)
        assert (other.weight, other.backup) == (1, True)
        assert (pool.balancer.slow_start, pool.balancer.panic_threshold, pool.budget.percent) == (5.0, 30, 40)
        assert pool.config.on_member_down == "close"
        assert pool.outliers.policy == OutlierPolicy(2, 1.0, 4.0, 100)
        writer.write(b"kept")  # the member's session was not touched
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"kept"
        assert pool.balancer.pick() is member  # the backup waits while the primary has room
        writer.close()
