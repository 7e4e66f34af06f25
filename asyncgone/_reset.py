"""The reset decision: what returning a connection to the pool sends to the server.

SQLAlchemy's pool sends ``ROLLBACK`` on every return, also right after a ``COMMIT`` with
nothing executed since: a round trip per unit of work. asyncgone owns the reset instead
(the pool is created with ``pool_reset_on_return=None`` and this ``reset`` listener does the
work) and skips the ``ROLLBACK`` only when nothing can be open:

- SQLAlchemy itself ended the transaction (a ``Connection``'s or ``Session``'s commit or
  rollback, through the dialect's ``do_commit``/``do_rollback``, which asyncgone wraps to
  note the moment), and it succeeded;
- no statement ran since: every statement, through SQLAlchemy or straight through the
  driver, needs a cursor, and asyncgone's connections count the cursors they create
  (``DriverSupport.count_cursors``), so an unchanged count means nothing was sent after
  that COMMIT or ROLLBACK;
- the driver's last reply agrees: no pending result, no "in transaction" status flag.

Anything else (a failed statement, raw driver use, a COMMIT sent by hand on the DBAPI
connection, a driver asyncgone does not recognise) gets the ROLLBACK. A statement that fails
needs no special case: it created a cursor too.

``pool_reset_on_return`` keeps its meaning when given: ``"rollback"`` rolls back at every
return (no skipping: the caller asked for it), ``"commit"`` commits, ``None`` sends nothing.
asyncgone sends them itself, bounded, and discards a connection whose reset fails.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.pool import ConnectionPoolEntry

from ._drivers import DriverSupport
from ._errors import ConfigurationError, describe, is_disconnect
from ._state import EngineState, holder_of
from ._waits import absorb_cancellation, finish

__all__ = ["ResetOnReturn", "reset_mode", "track_transaction_ends"]

log = logging.getLogger("asyncgone")

# Bound on the ROLLBACK (or COMMIT) that returning a connection may need: generous, as
# undoing a large transaction takes time; past it the connection is discarded (the server
# finishes alone).
RESET_TIMEOUT = 10.0

#: "rollback when needed" (asyncgone's default), "rollback" (always), "commit", or None.
Mode = Literal["auto", "rollback", "commit"] | None

_MODES: dict[object, Mode] = {
    "rollback": "rollback",
    True: "rollback",
    "commit": "commit",
    None: None,
    False: None,
    "none": None,
}

_NOT_GIVEN = object()


def reset_mode(value: object = _NOT_GIVEN) -> Mode:
    """Translate a ``pool_reset_on_return`` value as SQLAlchemy documents them; ``"auto"``
    when none was given."""
    if value is _NOT_GIVEN:
        return "auto"
    try:
        return _MODES[value]
    except (KeyError, TypeError):
        raise ConfigurationError(
            f"pool_reset_on_return must be 'rollback', 'commit' or None, got {value!r}"
        ) from None


def _noting_the_end(end: Callable[[Any], None], driver: DriverSupport) -> Callable[[Any], None]:
    def ended(dbapi_connection: Any) -> None:
        end(dbapi_connection)  # a failure leaves the previous note, older than any cursor
        # SQLAlchemy passes the pooled connection, whose info holds the holder (except while
        # it initialises the dialect on a first connection, with a stand-in without info).
        try:
            holder = holder_of(dbapi_connection)
        except (AttributeError, NotImplementedError):
            return
        if holder is not None:
            holder.ended_at = driver.cursors_created(dbapi_connection.driver_connection)

    return ended


def track_transaction_ends(dialect: Dialect, driver: DriverSupport) -> None:
    """Wrap the dialect's ``do_commit``/``do_rollback`` to note when SQLAlchemy ended a
    connection's transaction (the dialect instance belongs to this engine alone)."""
    dialect.do_commit = _noting_the_end(dialect.do_commit, driver)  # type: ignore[method-assign,assignment]
    dialect.do_rollback = _noting_the_end(dialect.do_rollback, driver)  # type: ignore[method-assign,assignment]


class ResetOnReturn:
    """The pool ``reset`` listener of one engine."""

    def __init__(self, state: EngineState, mode: Mode) -> None:
        self._state = state
        self._mode = mode

    def install(self, engine: Engine) -> None:
        event.listen(engine, "reset", self.on_reset)
        if self._mode == "auto":
            track_transaction_ends(engine.dialect, self._state.driver)

    def on_reset(self, dbapi_connection: Any, record: ConnectionPoolEntry, reset: Any) -> None:
        """Return a connection to the pool; ``reset`` is SQLAlchemy's ``PoolResetState``."""
        holder = holder_of(record)
        if holder is None or reset.terminate_only or not reset.asyncio_safe:
            return
        if reset.transaction_was_reset:
            # SQLAlchemy's Connection rolled back just now: the server heard from it.
            holder.last_activity = time.monotonic()
            return
        state = self._state
        driver = state.driver
        conn = dbapi_connection.driver_connection
        mode = self._mode
        if mode is None or (mode == "auto" and driver.transaction_ended(conn, holder.ended_at)):
            if mode is not None:
                state.counters.resets_skipped += 1
            usage = driver.last_usage(conn)
            if usage is not None and usage > holder.last_activity:
                holder.last_activity = usage
            return
        if driver.is_closed(conn):  # nothing can reach a dead connection
            record.invalidate()
            return
        state.counters.resets += 1
        handling = sys.exc_info()[1]
        end = driver.commit if mode == "commit" else driver.rollback
        try:
            dbapi_connection.run_async(lambda c: finish(end(c), RESET_TIMEOUT, "reset on return"))
        except asyncio.CancelledError as cancelled:
            # The reset finished (finish() saw to it) while a cancellation arrived. Let the
            # pool take the clean connection back and deliver the cancellation later: raised
            # from here, SQLAlchemy would discard the connection half-way.
            absorb_cancellation(cancelled, handling)
        except Exception as exc:
            # A connection that cannot be reset cannot be reused: discard it here, quietly
            # for a dead one (the pool would log the error with a traceback).
            dead = is_disconnect(exc) or isinstance(exc, TimeoutError)
            log.log(
                logging.DEBUG if dead else logging.WARNING,
                "discarding a connection whose reset on return failed: %s",
                describe(exc),
            )
            driver.abort(conn)
            record.invalidate(exc)
            return
        holder.ended_at = driver.cursors_created(conn)
        holder.last_activity = time.monotonic()
