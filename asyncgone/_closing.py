"""Closing connections: never raising for a dead one, never touching another event loop's,
never stranding one when a cancellation interrupts the close.

SQLAlchemy closes a pooled connection through two dialect methods: ``do_close`` (polite,
``COM_QUIT``) when the pool disposes of a healthy one, ``do_terminate`` (the socket only)
when one is invalidated. Both call into the driver, which may meet a socket the server
already closed (an error SQLAlchemy logs with a traceback), a transport whose event loop is
closed (``RuntimeError: Event loop is closed``, e.g. a module-level engine used by tests
with function-scoped loops), or a cancellation. asyncgone wraps both methods on the
engine's own dialect instance (``create_async_engine`` makes one per engine):

- a connection opened on another event loop is released without calling into that loop;
- a connection known dead has its socket aborted: nothing is sent, nothing can fail;
- a TLS connection closed politely has its transport aborted once COM_QUIT is sent;
- a disconnect error while closing is the expected end of a dead connection, logged at DEBUG;
- a cancellation raised by the close, after the driver closed the socket, is absorbed (see
  ``absorb_cancellation``) so that SQLAlchemy completes the pool's bookkeeping: otherwise
  it may abort the invalidation half-way, and the connection is never checked back in
  (observed on SQLAlchemy 2.0.50 to 2.0.54 and 2.1.0 to 2.1.4). Absorbing it on every release,
  not only on those, leaves nothing to decide by version number: releases that complete the
  bookkeeping themselves behave the same either way.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Dialect

from ._drivers import DriverSupport
from ._errors import describe, is_disconnect
from ._waits import absorb_cancellation

__all__ = ["guard_closing"]

log = logging.getLogger("asyncgone")


def _guarded(close: Callable[[Any], None], driver: DriverSupport) -> Callable[[Any], None]:
    def guarded(dbapi_connection: Any) -> None:
        conn = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if driver.foreign(conn):
            driver.release_foreign(conn)
            return
        if driver.is_closed(conn):
            driver.abort(conn)
            return
        handling = sys.exc_info()[1]  # usually the error that got the connection invalidated
        tls = driver.tls_transport(conn)  # before the close: the driver forgets it then
        try:
            close(dbapi_connection)
            if tls is not None:
                # COM_QUIT told the server; asyncio's TLS layer would still wait for the
                # server's close_notify, with nothing waiting for it, and a loop that ends
                # meanwhile leaves the socket open (ResourceWarning at collection).
                tls.abort()
        except asyncio.CancelledError as cancelled:
            driver.abort(conn)
            absorb_cancellation(cancelled, handling)
        except Exception as exc:
            if not is_disconnect(exc):
                raise
            driver.abort(conn)
            log.debug("closing a connection that was already gone: %s", describe(exc))

    return guarded


def guard_closing(dialect: Dialect, driver: DriverSupport) -> None:
    """Wrap ``dialect.do_close`` and ``dialect.do_terminate`` as the module docstring says."""
    # The dialect instance belongs to this engine alone: create_async_engine makes one each.
    dialect.do_close = _guarded(dialect.do_close, driver)  # type: ignore[method-assign,assignment]
    dialect.do_terminate = _guarded(dialect.do_terminate, driver)  # type: ignore[method-assign,assignment]
