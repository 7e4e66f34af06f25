"""Leak detection: warn, with the acquiring stack, about a connection checked out too long.

Installed only when ``leak_threshold`` is set (HikariCP's ``leakDetectionThreshold``): it
costs a stack capture and a timer per checkout, which an engine that does not ask for it
should not pay. The warning fires once per checkout, from a timer on the event loop, so a
connection held forever is reported without anyone looking.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import traceback
from typing import Any

import greenlet
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from ._drivers import thread_id
from ._state import EngineState, holder_of

__all__ = ["LeakDetection", "acquiring_stack"]

log = logging.getLogger("asyncgone")


def acquiring_stack(limit: int = 40) -> list[str]:
    """The application's stack at this checkout, formatted.

    Pool events run in SQLAlchemy's greenlet; the application's frames are those of the
    parent greenlet, suspended where it handed the work over.
    """
    parent = greenlet.getcurrent().parent
    frame = parent.gr_frame if parent is not None else sys._getframe(1)
    return traceback.format_list(traceback.extract_stack(frame, limit=limit))


class LeakDetection:
    """The ``checkout``/``checkin`` listeners that time each checkout of one engine."""

    def __init__(self, state: EngineState, threshold: float) -> None:
        self._state = state
        self._threshold = threshold

    def install(self, engine: Engine) -> None:
        event.listen(engine, "checkout", self.on_checkout)
        event.listen(engine, "checkin", self.on_checkin)

    def on_checkout(
        self, dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        """Arrange a warning, with the acquiring stack, if this checkout lasts too long."""
        holder = holder_of(record)
        if holder is None:
            return
        threshold = self._threshold
        stack = acquiring_stack()
        thread = thread_id(dbapi_connection.driver_connection)
        counters = self._state.counters

        def report() -> None:
            holder.leak_timer = None
            counters.leaks += 1
            log.warning(
                "connection %s has been checked out for more than %g s (leak_threshold); it "
                "was acquired at:\n%s",
                thread,
                threshold,
                "".join(stack).rstrip(),
            )

        if holder.leak_timer is not None:
            holder.leak_timer.cancel()
        holder.leak_timer = asyncio.get_running_loop().call_later(threshold, report)

    def on_checkin(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        """The checkout ended in time: no warning."""
        holder = holder_of(record)
        if holder is not None and holder.leak_timer is not None:
            holder.leak_timer.cancel()
            holder.leak_timer = None
