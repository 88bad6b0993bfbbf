"""Run one of the loop's own coroutines (``connect_accepted_socket``, ``create_connection``) from
future callbacks, without an ``asyncio.Task``.

Why: a Task per client and per dial is the largest fixed cost of a short session after the system
calls. Creating one registers it in a weak set (Python code), every step enters and leaves it, and its
done callbacks run one loop iteration later. The loop's connect coroutines await one future each, so
stepping them by hand from that future's callback is all a Task would do for them.

``Drive(coro, done)`` runs ``coro`` up to its first ``await`` at once, and calls ``done(None)`` when it
returns or ``done(exc)`` when it raises. ``cancel()`` stops it as ``Task.cancel`` would: the loop's
coroutines close the transport they opened when cancelled at their ``await``, and ``done`` is not
called.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class Drive:
    """Steps ``coro`` to completion from the callbacks of the futures it awaits."""

    __slots__ = ("cancelled", "coro", "done", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, Any], done: Callable[[BaseException | None], None]) -> None:
        self.coro: Coroutine[Any, Any, Any] | None = coro
        self.done = done
        self.waiting: asyncio.Future[Any] | None = None
        self.cancelled = False
        self.step(None)

    def step(self, _future: object) -> None:
        coro = self.coro
        if coro is None:
            return
        self.waiting = None
        try:
            future = coro.send(None)  # the awaited future raises its exception here, as under a Task
        except StopIteration as stop:
            self.coro = None
            if not self.cancelled:
                self.done(None)
            elif isinstance(stop.value, tuple) and stop.value:  # (transport, protocol): it won the race
                abort = getattr(stop.value[0], "abort", None)  # uvloop's transports are not asyncio's classes
                if abort is not None:
                    abort()
            return
        except (Exception, asyncio.CancelledError) as exc:
            self.coro = None
            if not self.cancelled:
                self.done(exc)
            _forget_frames(exc)
            return
        if future is None:  # a bare yield: run again on the next iteration, as a Task would
            asyncio.get_running_loop().call_soon(self.step, None)
            return
        self.waiting = future
        if self.cancelled:
            future.cancel()
        future.add_done_callback(self.step)

    def cancel(self) -> None:
        """Stop: the coroutine gets a CancelledError at its ``await`` and closes what it opened; ``done``
        is not called.

        As with ``Task.cancel``, the awaited future is cancelled now and the coroutine resumed from its
        callback, after the future's other callbacks. The order matters: asyncio's ``sock_connect``
        unregisters its descriptor in such a callback, and closing the socket first would let a new
        socket reuse the number and lose its registration."""
        if self.coro is None or self.cancelled:
            return
        self.cancelled = True
        if self.waiting is not None:
            self.waiting.cancel()  # if it is done already, the step scheduled for it does the rest

    @property
    def running(self) -> bool:
        return self.coro is not None


def _forget_frames(exc: BaseException | None) -> None:
    """Drop the tracebacks of a failed connect (and of the errors it was raised from). Each holds the
    coroutine's frame, whose waiter holds the exception again: a reference cycle that kept the failed
    connection's transports, protocol and SSL objects alive until the cyclic GC ran, which the GC tuning
    delays. The callbacks read only the exception's type and message."""
    seen = 0
    while exc is not None and seen < 8:
        exc.__traceback__ = None
        exc = exc.__context__ or exc.__cause__
        seen += 1
