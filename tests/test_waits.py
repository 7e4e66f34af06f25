"""Absorbing a cancellation where SQLAlchemy's pool must not see one, without losing it."""

from __future__ import annotations

import asyncio
import sys

import anyio
import pytest

from asyncgone._waits import absorb_cancellation

pytestmark = pytest.mark.anyio


def cancellations_pending() -> int:
    """The current task's count of requested cancellations (0 before Python 3.11)."""
    task = asyncio.current_task()
    assert task is not None
    return task.cancelling() if sys.version_info >= (3, 11) else 0


async def test_native_cancellation_is_delivered_at_the_next_await() -> None:
    """A task.cancel() absorbed by pool code still cancels the task at its next await."""
    steps: list[str] = []

    async def victim() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError as cancelled:
            absorb_cancellation(cancelled, None)
        steps.append("absorbed")
        if sys.version_info >= (3, 11):
            assert cancellations_pending() == 1  # the count is as task.cancel() left it
        await asyncio.sleep(0)
        steps.append("ran on")

    task = asyncio.ensure_future(victim())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task})
    assert task.cancelled()
    assert steps == ["absorbed"]


async def test_cancel_scope_cancellation_is_left_to_its_scope() -> None:
    """An anyio scope's cancellation is not re-armed: none escapes the scope when no await
    follows inside it (the scope itself delivers again while it matters)."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep(10)
        except asyncio.CancelledError as cancelled:
            absorb_cancellation(cancelled, None)
    assert scope.cancel_called
    await asyncio.sleep(0)  # re-armed, the scope's cancellation would land here
    assert cancellations_pending() == 0


async def test_cancellation_during_another_is_dropped() -> None:
    """A second cancellation that arrives while the first propagates is not re-armed: the
    first carries the task's cancellation already."""
    absorb_cancellation(asyncio.CancelledError(), asyncio.CancelledError())
    await asyncio.sleep(0)  # nothing pending


async def test_a_scope_cancellation_is_recognised_whatever_its_message() -> None:
    """A cancel scope's cancellation is recognised by anyio's documented deadline of -inf
    inside the cancelled scope, not by its message (which anyio changed in 4.11); outside the
    scope, and for a native cancellation, nothing is owed to a scope."""
    from asyncgone._compat import scope_will_redeliver

    seen: list[bool] = [scope_will_redeliver()]
    with anyio.move_on_after(0.01):
        try:
            await anyio.sleep(10)
        except asyncio.CancelledError:
            seen.append(scope_will_redeliver())
            raise
    seen.append(scope_will_redeliver())
    natively = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    natively.cancel()
    with pytest.raises(asyncio.CancelledError):
        await natively
    seen.append(scope_will_redeliver())
    assert seen == [False, True, False, False]
