"""Connection-level retries: pick a member, connect with a timeout, move on when that fails.

Retries happen only here, before the session has relayed a single byte to any upstream, which is what
makes them safe for every protocol. Each attempt goes to a member not yet tried for this client while
one remains; when every member has been tried, remaining attempts may reuse them (a single-member pool
then retries its one member, as HAProxy's ``retries`` does). Every failure is a passive health result,
except running out of our own descriptors or memory (EMFILE and kin): that is not the member's fault and
no other member would fare better, so the client is closed without blaming any member or retrying. (The
listener keeps a reserve of descriptors for upstream connects, so this is rare.)
Host names are resolved by the loop's ``getaddrinfo`` (a thread), never blocking the loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl

from .balancer import Member
from .health import Event
from .pool import Pool
from .relay import Pump, Session

log = logging.getLogger("l4proxy.dialer")

_LOCAL_EXHAUSTION = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def out_of_descriptors(exc: BaseException) -> bool:
    """The proxy itself ran out of descriptors or memory: says nothing about the member."""
    return isinstance(exc, OSError) and exc.errno in _LOCAL_EXHAUSTION


def failure_kind(exc: BaseException) -> str:
    """A short cause for logs and metrics: refused, timeout, dns, tls: ..., or the OS error."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, socket.gaierror):
        return f"dns: {exc.strerror}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"tls: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"tls: {exc.reason or exc}"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


class _Deadline:
    """A connect timeout that costs one timer: on expiry it cancels the dial's task and remembers why.

    ``asyncio.timeout`` does the same with more bookkeeping per attempt (several running-loop lookups,
    each a ``getpid`` system call on 3.11), which shows on the connection-rate benchmark."""

    __slots__ = ("expired", "task")

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task
        self.expired = False

    def __call__(self) -> None:
        self.expired = True
        self.task.cancel()


async def dial(session: Session, pool: Pool, loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
    """Connect ``session`` to a member of ``pool``, retrying elsewhere; fail the client if none works.

    ``task`` is the task running this coroutine: the connect timeout cancels it."""
    balancer = pool.balancer
    config = pool.config
    tried: list[Member] = []
    cause = "no healthy upstream"
    for _ in range(config.retries + 1):
        member = balancer.pick(tried) or (balancer.pick() if tried else None)
        if member is None:
            break
        tried.append(member)
        balancer.acquire(member)
        pump = session.new_upstream_pump()
        deadline = _Deadline(task)
        timer = loop.call_later(config.connect_timeout, deadline)
        try:
            await _connect(loop, pool, member, pump)
        except asyncio.CancelledError:
            balancer.release(member)
            pump.abort()  # the connect may have won the race with the cancellation
            if not deadline.expired or session.ended:
                raise
            task.uncancel()
            exc: BaseException | None = TimeoutError()
        except (OSError, ssl.SSLError) as error:
            balancer.release(member)
            pump.abort()
            exc = error
        else:
            exc = None
        finally:
            timer.cancel()
        if exc is not None:
            cause = failure_kind(exc)
            if out_of_descriptors(exc):
                break  # not this member's fault, and no other member would fare better
            log.warning("connect to %s for %s failed: %s", member.name, session.client_addr, cause)
            pool.report(member, Event.TRAFFIC_FAIL, f"connect failed: {cause}")
            continue
        pool.report(member, Event.TRAFFIC_OK)
        if session.ended:  # the client left as the connect completed
            balancer.release(member)
            pump.abort()
            return
        session.attach_upstream(pump, member)
        return
    pool.no_upstream += 1
    log.warning("no upstream for %s in pool %s: %s", session.client_addr, pool.name, cause)
    session.fail(f"no_upstream ({cause})")


async def _connect(loop: asyncio.AbstractEventLoop, pool: Pool, member: Member, pump: Pump) -> None:
    address = member.address
    tls = pool.ssl_context
    if tls is None:
        await loop.create_connection(lambda: pump, address.host, address.port)
        return
    from .tls import server_hostname

    assert pool.config.tls is not None
    await loop.create_connection(
        lambda: pump,
        address.host,
        address.port,
        ssl=tls,
        server_hostname=server_hostname(pool.config.tls, address.host),
        ssl_handshake_timeout=pool.config.connect_timeout,
    )
