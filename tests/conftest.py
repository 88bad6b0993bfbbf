"""Shared fixtures: every async test runs on both the default asyncio loop and uvloop, and fails if
its loop logged an unhandled exception (a callback that raised, a task that died unobserved); a test
that ran a Proxy in this process also fails if it left a session, task or descriptor behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import uvloop

from l4proxy.proxy import Proxy

_loop_errors: list[dict[str, Any]] = []

# libuv opens a process-wide pipe (its signal lock) when its first loop starts: open it now, so the
# leak check does not count it against whichever test first runs uvloop (in a helper thread, say).
uvloop.new_event_loop().close()


def _recording(factory: Callable[[], asyncio.AbstractEventLoop]) -> Callable[[], asyncio.AbstractEventLoop]:
    def make() -> asyncio.AbstractEventLoop:
        loop = factory()
        loop.set_exception_handler(lambda _loop, context: _loop_errors.append(context))
        return loop

    return make


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], Any]]:
    return {"asyncio": _recording(asyncio.new_event_loop), "uvloop": _recording(uvloop.new_event_loop)}


@pytest.fixture(autouse=True)
def no_loop_errors() -> Iterator[None]:
    """Fail the test if any event loop it used reported an unhandled exception."""
    _loop_errors.clear()
    yield
    gc.collect()  # surface "Task exception was never retrieved" now, not in a later test
    errors = [f"{c.get('message')}: {c.get('exception')!r}" for c in _loop_errors]
    _loop_errors.clear()
    assert not errors, f"the event loop logged unhandled exceptions: {errors}"


# --- leak check: every Proxy made in this process is remembered until the end of the test that made it ---

_proxies: list[Proxy] = []
_proxy_init = Proxy.__init__


def _registering_init(self: Proxy, *args: Any, **kwargs: Any) -> None:
    _proxy_init(self, *args, **kwargs)
    _proxies.append(self)


Proxy.__init__ = _registering_init  # type: ignore[method-assign]


def _open_fds() -> dict[str, str]:
    """The process's open descriptors and what each points to."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return fds


def _counted(fds: dict[str, str]) -> int:
    """libuv opens /dev/null once per loop as a spare for accepting under EMFILE: the loop's, not a leak."""
    return sum(target != "/dev/null" for target in fds.values())


def _extra(before: dict[str, str], idle: int = 0) -> int:
    """Descriptors opened since ``before`` and still open, ``idle`` splice pipes excepted."""
    return _counted(_open_fds()) - _counted(before) - 2 * idle


def _settle(before: dict[str, str], runner: asyncio.Runner | None, idle: int, timeout: float = 2.0) -> None:
    """Give closing transports their loop iterations until the count is back (or ``timeout`` passed).
    Counted between runs of the loop: uvloop holds a socket pair for signals while it runs."""
    deadline = time.monotonic() + timeout
    while _extra(before, idle) > 0 and time.monotonic() < deadline:
        gc.collect()  # a loop a helper thread ran and dropped closes its descriptors when it is freed
        if runner is not None:
            runner.run(asyncio.sleep(0.01))
        else:
            time.sleep(0.01)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that ran a Proxy: no live or opening session, no sweeper, connect-deadline timer
    or prober left, no client awaited for a PROXY header, no task left on its loop, and no descriptor
    left open."""
    runner: asyncio.Runner | None = None
    if "_function_scoped_runner" in request.fixturenames:
        runner = request.getfixturevalue("_function_scoped_runner")
    _proxies.clear()
    before = _open_fds()
    yield
    proxies = list(_proxies)
    _proxies.clear()
    if not proxies:
        return
    problems = [f"{len(p.sessions)} sessions still live" for p in proxies if p.sessions]
    problems += [f"{len(p.table.opening)} clients still opening" for p in proxies if p.table.opening]
    problems += ["the sweeper timer still runs" for p in proxies if p.table._sweeper is not None]
    problems += [f"{len(f.edge.reading)} clients still awaited for a PROXY header" for p in proxies
                 for f in p.frontends if f.edge.reading]
    problems += [f"{len(p.deadlines)} connect deadlines still armed" for p in proxies
                 if hasattr(p, "deadlines") and (len(p.deadlines) or p.deadlines._timer is not None)]
    problems += ["a health prober still runs" for p in proxies for prober in p.probers if prober.tasks]
    if runner is not None:
        tasks = [t for t in asyncio.all_tasks(runner.get_loop()) if not t.done()]
        problems += [f"task left running: {t!r}" for t in tasks]
    idle = sum(len(p.splicing.pipes.idle) for p in proxies)
    _settle(before, runner, idle)
    extra = _extra(before, idle)
    if extra > 0:
        after = _open_fds()
        new = sorted(f"{fd} -> {target}" for fd, target in after.items() if before.get(fd) != target)
        problems.append(f"{extra} more descriptors open than before the test ({idle} idle "
                        f"splice pipes not counted); new or changed: {new}")
    assert not problems, "the test left things behind: " + "; ".join(problems)
