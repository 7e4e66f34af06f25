"""Bounded waits that never swallow a cancellation, and cleanup that survives one.

``bounded()`` replaces ``asyncio.wait_for``: before Python 3.12, ``wait_for`` returns the
result instead of raising when the caller is cancelled just as the awaited work completes,
so the cancellation is lost and the caller runs on (observed: a unit of work cancelled by
its own ``wait_for`` ran into a 50-second lock wait). anyio's ``fail_after`` has no such gap.

``finish()`` runs cleanup to the end. ``asyncio.shield`` does not stop an anyio cancel scope
from cancelling the waiter, and an anyio ``CancelScope(shield=True)`` does not stop a native
``task.cancel()`` (observed with anyio 4: a second ``task.cancel()`` interrupts a shielded
await). Cleanup therefore runs in a task of its own, bounded, and the caller waits for it
inside a shielded scope, absorbing native cancellations until it is done and re-raising
the first one afterwards.

``Slots`` is the queue of connection attempts waiting for their turn (``_admission``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable
from typing import TypeVar

import anyio

from ._compat import scope_will_redeliver

__all__ = ["LOOP_CLOCK_TICK", "Slots", "absorb_cancellation", "bounded", "finish"]

#: The step of uvloop's ``loop.time()``, in seconds (asyncio's is finer). Timeouts fire by
#: the loop's clock, and uvloop's may fire one up to a step before ``time.monotonic()``
#: reaches its deadline: a deadline that several bounded waits share is kept on the loop's
#: clock, and less than a step left is none.
LOOP_CLOCK_TICK = 0.001

log = logging.getLogger("asyncgone")

_T = TypeVar("_T")


async def bounded(work: Awaitable[_T], seconds: float) -> _T:
    """Await ``work`` for at most ``seconds``; raise ``TimeoutError`` (the builtin) after."""
    with anyio.fail_after(seconds):
        return await work


async def finish(work: Awaitable[_T], bound: float, what: str) -> _T:
    """Run ``work`` to completion, for at most ``bound`` seconds, even if the caller is being
    cancelled.

    Returns its result or raises its exception (``TimeoutError`` when it overran). A
    cancellation that arrived meanwhile is re-raised once ``work`` is over, so the caller's
    cancellation is delayed by at most ``bound`` seconds, never lost.
    """
    task = asyncio.ensure_future(bounded(work, bound))
    interrupted: BaseException | None = None
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError as exc:
                interrupted = interrupted or exc
    if interrupted is not None:
        if not task.cancelled() and task.exception() is not None:
            # The cancellation propagates; the failure is logged rather than lost.
            log.debug("%s failed during cancellation: %r", what, task.exception())
        raise interrupted
    return task.result()


def absorb_cancellation(cancelled: BaseException, handling: BaseException | None) -> None:
    """Return normally from a cancellation that was caught, without losing it.

    For code that must not raise although a cancellation reached it (SQLAlchemy's pool
    aborts its bookkeeping half-way when one escapes an event or a terminate).
    ``handling`` is the exception being handled when that code was called
    (``sys.exc_info()[1]``), if any.

    - a cancelled anyio cancel scope around the task delivers its cancellation again at the
      next await inside it, and none is owed once the scope is left: nothing to do;
    - a cancellation already propagating (``handling``) carries this one with it;
    - otherwise (a native ``task.cancel()``) it is re-armed for the task's next await,
      leaving the count of pending cancellations as it was, so ``asyncio.timeout``, task
      groups and anyio's scopes still recognise their own.

    Re-arming an anyio cancellation instead would leave it pending past the end of its scope
    when no await follows inside it: it would then cancel whatever the caller awaited next.
    """
    if isinstance(handling, asyncio.CancelledError) or scope_will_redeliver():
        return
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - always called from within a task
        raise cancelled
    uncancel = getattr(task, "uncancel", None)  # Python 3.11+
    if uncancel is not None:
        uncancel()
    task.cancel(*cancelled.args[:1])


class Slots:
    """A first-come, first-served counting semaphore that works on any event loop.

    A slot handed to a waiter that is cancelled at that moment is passed on, never lost.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[anyio.Event] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():  # handed over just as the wait ended: pass it on
                self.release()
            else:
                self._waiters.remove(event)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # the slot goes straight to the next waiter
        else:
            self._free += 1
