"""The reset decision: what returning a connection to the pool sends to the server.

SQLAlchemy's pool sends ``ROLLBACK`` on every return, also right after a ``COMMIT`` with
nothing executed since: a round trip per unit of work. asyncgone skips it when nothing can
be open:

- SQLAlchemy itself ended the transaction (a ``Connection``'s or ``Session``'s commit or
  rollback, through the dialect's ``do_commit``/``do_rollback``), and it succeeded;
- no statement ran since: every statement, through SQLAlchemy or straight through the
  driver, needs a cursor, and asyncgone's connections count the cursors they create
  (``DriverSupport.count_cursors``), so an unchanged count means nothing was sent after
  that COMMIT or ROLLBACK;
- the driver's last reply agrees: no pending result, no "in transaction" status flag.

Anything else (a failed statement, raw driver use, a COMMIT sent by hand on the DBAPI
connection, a driver asyncgone does not recognise) gets the ROLLBACK. A statement that
fails needs no special case: it created a cursor too.

It all happens in the dialect's ``do_rollback`` and ``do_commit``, which asyncgone wraps on
the engine's own dialect instance: the pool's reset calls ``do_rollback`` (the engine keeps
SQLAlchemy's ``pool_reset_on_return="rollback"``), and so does a ``Connection``'s rollback,
which the same rule makes free when nothing is open. No pool event is involved, which keeps
the per-checkout cost down (SQLAlchemy builds a ``PoolResetState`` for every return once a
``reset`` listener exists). The ROLLBACK of a return is bounded (``RESET_TIMEOUT``); a
connection that cannot take it is closed quietly and replaced at its next checkout.

``pool_reset_on_return`` keeps its meaning when given: ``"rollback"`` rolls back at every
return (no skipping: the caller asked for it), ``"commit"`` commits, ``None`` sends nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy.engine import Dialect
from sqlalchemy.engine.default import DefaultDialect

from ._compat import FAIRY_CHECKOUTS, FAIRY_RECORD, returning_to_pool
from ._errors import ConfigurationError, describe
from ._state import HOLDER_KEY, ConnectionHolder, EngineState, holder_of_checkout
from ._waits import absorb_cancellation, finish

__all__ = ["Mode", "install_reset", "reset_mode"]

log = logging.getLogger("asyncgone")

# Bound on the ROLLBACK that returning a connection may need: generous, as undoing a large
# transaction takes time; past it the connection is closed (the server finishes alone).
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

# ``do_rollback`` reads these two of SQLAlchemy's private attributes (``_compat``) by name,
# as plain attributes, which CPython specialises; this keeps the names in step.
assert (FAIRY_RECORD, FAIRY_CHECKOUTS) == ("_connection_record", "_counter")


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


def pool_reset(mode: Mode) -> str | None:
    """The ``pool_reset_on_return`` SQLAlchemy's pool gets for asyncgone's ``mode``."""
    return "rollback" if mode == "auto" else mode


def _ended(holder: ConnectionHolder) -> None:
    """Note that SQLAlchemy just ended the connection's transaction."""
    cursors = holder.cursors
    holder.ended_at = None if cursors is None else cursors.count
    holder.active(time.monotonic())


def _noting_commit(commit: Callable[[Any], None], state: EngineState) -> Callable[[Any], None]:
    def do_commit(dbapi_connection: Any) -> None:
        holder = holder_of_checkout(dbapi_connection)
        returning = holder is not None and returning_to_pool(dbapi_connection)
        if returning:
            state.counters.resets += 1  # pool_reset_on_return="commit"
        commit(dbapi_connection)  # a failure leaves the previous note, older than any cursor
        hook = state.after_commit
        if hook is not None and not returning:
            hook(dbapi_connection)  # before the note: its query is part of this transaction's
        if holder is not None:
            _ended(holder)

    return do_commit


def _deciding_rollback(
    rollback: Callable[[Any], None], state: EngineState, skip: bool
) -> Callable[[Any], None]:
    driver = state.driver
    counters = state.counters
    # SQLAlchemy's own do_rollback() calls the connection's rollback() unless told to skip
    # it under AUTOCOMMIT: without that option, called here directly, the end of every
    # connection read runs one Python frame fewer.
    direct = getattr(rollback, "__func__", None) is DefaultDialect.do_rollback and not getattr(
        getattr(rollback, "__self__", None), "skip_autocommit_rollback", False
    )

    def do_rollback(dbapi_connection: Any) -> None:
        # Inlined holder_of_checkout(), this runs at the end of every unit of work: the
        # pooled connection's FAIRY_RECORD and FAIRY_CHECKOUTS read as plain attributes,
        # which CPython specialises (getattr() would look them up on the class each time).
        try:
            holder: ConnectionHolder | None = dbapi_connection._connection_record.info.get(
                HOLDER_KEY
            )
            checkouts = dbapi_connection._counter
        except AttributeError:  # not a pooled connection (the dialect's first connect)
            holder = None
        if holder is None:
            rollback(dbapi_connection)
            return
        cursors = holder.cursors
        if skip and cursors is not None and cursors.count == holder.ended_at:
            # No cursor since SQLAlchemy ended the transaction: ask the driver too.
            conn = holder.conn()
            if conn is not None and driver.transaction_ended(conn, cursors, holder.ended_at):
                if checkouts == 0:  # returning_to_pool()
                    counters.resets_skipped += 1
                usage = driver.last_usage(conn)
                if usage is not None and usage > holder.last_activity:
                    holder.active(usage)
                return
        if checkouts:
            # A Connection's or Session's own rollback: SQLAlchemy's way. _ended(holder),
            # spelt out: this is the end of every connection read.
            if direct:
                dbapi_connection.rollback()
            else:
                rollback(dbapi_connection)
            holder.ended_at = None if cursors is None else cursors.count
            now = time.monotonic()
            holder.last_activity = now
            until = now + holder.quiet_for
            holder.trusted_until = until if until < holder.expires else holder.expires
            return
        conn = holder.conn()
        if conn is None:
            rollback(dbapi_connection)
            return
        if holder.closed(conn, True):
            # Nothing reaches a dead connection; its next checkout replaces it, also within
            # FRESH of its last answer (no longer trusted: the full verdict runs).
            holder.trusted_until = -math.inf
            return
        counters.resets += 1
        if _bounded_rollback(dbapi_connection, state):
            _ended(holder)

    return do_rollback


def _bounded_rollback(dbapi_connection: Any, state: EngineState) -> bool:
    """The ROLLBACK of a connection going back to the pool: bounded, surviving a
    cancellation; on failure the socket is closed, so the next checkout replaces it.
    Return whether the server answered it."""
    driver = state.driver
    handling = sys.exc_info()[1]
    try:
        dbapi_connection.run_async(
            lambda c: finish(driver.rollback(c), RESET_TIMEOUT, "rollback on return")
        )
    except asyncio.CancelledError as cancelled:
        # The ROLLBACK finished (finish() saw to it) while a cancellation arrived. Let the
        # pool take the clean connection back and deliver the cancellation later: raised
        # from here, SQLAlchemy would discard the connection half-way.
        absorb_cancellation(cancelled, handling)
        return False  # its outcome is not known here: the next checkout asks the socket
    except Exception as exc:
        # Raised to the pool, it would log the error with a traceback. Closed here, the
        # connection is found dead and replaced at its next checkout, quietly.
        log.debug("closing a connection whose rollback on return failed: %s", describe(exc))
        driver.abort(dbapi_connection.driver_connection)
        return False
    return True


def install_reset(dialect: Dialect, state: EngineState, mode: Mode) -> None:
    """Wrap the engine's own dialect's ``do_rollback`` and ``do_commit`` as the module
    docstring says (``create_async_engine`` makes a dialect instance per engine)."""
    dialect.do_commit = _noting_commit(dialect.do_commit, state)  # type: ignore[method-assign,assignment]
    dialect.do_rollback = _deciding_rollback(  # type: ignore[method-assign,assignment]
        dialect.do_rollback, state, skip=mode == "auto"
    )
