"""Connections belong to the event loop that opened them: closed with it, never used from
another one.

An engine created at import time (a module-level engine in a test module, a script that
calls ``asyncio.run()`` twice, ``anyio.run()``) outlives the event loops that use it. A pooled
connection opened on one loop cannot be used, nor even closed politely, from another: its
transport calls into its own loop, which may be closed (``RuntimeError: Event loop is
closed``), and uvloop warns about every transport still open when its loop closes.

So, per engine and per loop, asyncgone keeps a small asynchronous generator started on that
loop. The loop finalises it when it shuts down (``asyncio.run()``, ``asyncio.Runner``,
``anyio.run()``, pytest-asyncio and anyio's pytest plugin all call the loop's documented
``shutdown_asyncgens()`` before closing it), and its ``finally`` closes that loop's idle
connections while the loop still runs; their pool slots stay, and reconnect on the next
loop at their next checkout. A connection that escapes this (a loop closed by hand) is
caught by the checkout check (``Reason.FOREIGN_LOOP``) and released by the closing guard
without touching its loop.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncGenerator
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool
from sqlalchemy.util import greenlet_spawn

from . import _compat
from ._state import holder_of
from ._waits import bounded

__all__ = ["LoopWatch"]

log = logging.getLogger("asyncgone")

# Bound on closing one loop's idle connections at its shutdown: a socket close each.
_CLOSE_TIMEOUT = 5.0


class LoopWatch:
    """One engine's record of the event loops its connections belong to."""

    def __init__(self, engine: Engine) -> None:
        self._engine = weakref.ref(engine)
        self._watchers: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, AsyncGenerator[None, None]
        ] = weakref.WeakKeyDictionary()

    def adopt(self, loop: asyncio.AbstractEventLoop, dbapi_connection: Any) -> None:
        """Make sure ``loop`` closes this engine's idle connections when it shuts down.

        Called from the connect event, in SQLAlchemy's greenlet, on the loop that opened
        the connection; costs nothing after the first connection of each loop.
        """
        if loop in self._watchers:
            return
        watcher = _close_with_the_loop(weakref.ref(self))
        self._watchers[loop] = watcher
        # The first step registers the generator with the running loop (its first-iteration
        # hook) and runs it to its yield.
        dbapi_connection.run_async(lambda c: watcher.__anext__())

    def forget(self, loop: asyncio.AbstractEventLoop) -> Engine | None:
        """Drop the watcher of ``loop`` (it ran); return the engine, if it still exists.

        An asynchronous generator keeps its loop's finalizer, and so its loop, alive: kept
        here after the loop's end, it would keep every finished loop in memory.
        """
        self._watchers.pop(loop, None)
        return self._engine()


async def _close_with_the_loop(watch_ref: weakref.ref[LoopWatch]) -> AsyncGenerator[None, None]:
    # No reference to the loop in this frame: suspended, it would keep the loop alive.
    try:
        yield
    finally:
        watch = watch_ref()
        loop = _compat.running_loop()  # aclose() runs on the loop that is shutting down
        engine = watch.forget(loop) if watch is not None and loop is not None else None
        if engine is not None and loop is not None:
            try:
                await bounded(greenlet_spawn(_close_idle_of, engine, loop), _CLOSE_TIMEOUT)
            except Exception as exc:  # the loop is going away: say so, do not fail it
                log.debug("closing connections at the end of their event loop: %r", exc)


def _close_idle_of(engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
    """Close the connections of ``loop`` idle in the engine's pool, leaving their slots."""
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return
    records: list[ConnectionPoolEntry] = [
        record
        for record in _compat.idle_records(pool)
        if record.dbapi_connection is not None
        and (holder := holder_of(record)) is not None
        and holder.loop() is loop
    ]
    for record in records:
        record.invalidate()  # through asyncgone's closing guard; reconnects when next used
    if records:
        log.debug("closed %d idle connection(s) as their event loop shut down", len(records))
