"""Shared fixtures: every async test runs on both the default asyncio loop and uvloop, and fails if
its loop logged an unhandled exception (a callback that raised, a task that died unobserved)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import uvloop

_loop_errors: list[dict[str, Any]] = []


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
