"""Errors while a connection is in use: classify them, and replace what they killed.

SQLAlchemy's ``handle_error`` event sees every error raised on a connection's paths
(statements, COMMIT, ROLLBACK, and the pre-ping when one runs). Here asyncgone:

- classifies the error with ``disconnect_scope`` (``is_disconnect``), which knows the codes
  and messages SQLAlchemy's MySQL dialects miss, and tells SQLAlchemy, so the connection is
  discarded rather than returned;
- keeps SQLAlchemy from invalidating the whole pool when one connection died; the pool is
  invalidated (by generation, see ``EngineState``) on a server-wide code, or when several
  connections die together;
- notes a Galera node that refused a statement with 1047 as not serving (``_search``),
  so the next connections go to the other nodes;
- turns a raw transport error (uvloop's ``RuntimeError`` for a closed transport, a
  ``ConnectionResetError``) into the driver's own "lost connection" error (2013), so callers
  meet the ``OperationalError`` every other disconnect raises, with the original chained.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.exc import DBAPIError

from ._errors import (
    Scope,
    describe,
    disconnect_scope,
    error_code,
    is_aftermath,
    is_node_not_ready,
    is_read_only_refusal,
    mark_write_on_replica,
)
from ._state import EngineState
from ._stats import Reason

__all__ = ["LOST_CONNECTION", "ErrorHandling"]

log = logging.getLogger("asyncgone")

#: CR_SERVER_LOST: the code raw transport errors are reported under.
LOST_CONNECTION = 2013


class ErrorHandling:
    """The engine ``handle_error`` listener of one engine."""

    def __init__(self, state: EngineState, dbapi: Any) -> None:
        self._state = state
        self._dbapi = dbapi  # the dialect's DBAPI module: its OperationalError is the driver's

    def install(self, engine: Engine) -> None:
        event.listen(engine, "handle_error", self.on_error)

    def on_error(self, ctx: ExceptionContext) -> BaseException | None:
        """Classify an error; keep a one-connection failure from invalidating the pool."""
        error = ctx.original_exception
        if ctx.connection is None and not ctx.is_pre_ping:
            return None  # failed to connect: there is no pooled connection to replace
        if self._state.options.target_role == "replica" and is_read_only_refusal(error):
            # A write in a read_only session, which went to a replica: the application's
            # mistake, not a server turned read-only by a failover (no outage, no retry).
            mark_write_on_replica(error)
            return None
        scope = disconnect_scope(error)
        if scope is None:
            if ctx.is_disconnect:  # a cancellation: SQLAlchemy discards this one connection
                self._state.counters.replaced[Reason.CANCELLED] += 1
            return None
        ctx.is_disconnect = True
        # asyncgone invalidates the pool itself (see EngineState), never SQLAlchemy.
        ctx.invalidate_pool_on_disconnect = False
        if not is_aftermath(error):
            self._count(error, scope)
            if is_node_not_ready(error):
                self._node_not_ready(ctx, error)
        else:
            # The driver closed this connection itself, after a loss or a cancellation that
            # was already counted: discard it quietly, and do not count it as news.
            log.debug("discarding a connection already closed: %s", describe(error))
        if isinstance(error, (DBAPIError, self._dbapi.Error)):
            return None
        return self._as_driver_error(ctx, error)

    def _node_not_ready(self, ctx: ExceptionContext, error: BaseException) -> None:
        """A Galera node refused (1047): new connections go to the other nodes first."""
        search = self._state.search
        if search is None or ctx.connection is None:
            return
        try:
            conn = ctx.connection.connection.driver_connection
        except Exception:  # already invalidated: the keepalive's watch will tell
            return
        host = search.host_of(conn)
        if host is not None:
            search.node_unsynced(host, describe(error))

    def _count(self, error: BaseException, scope: Scope) -> None:
        state = self._state
        now = time.monotonic()
        state.counters.replaced[Reason.ERROR] += 1
        state.counters.errors[error_code(error) or 0] += 1
        if scope is Scope.SERVER:
            state.invalidate_pool(now, f"a server-wide error: {describe(error)}")
        elif not state.note_dead(now):
            log.warning("replacing a connection after %s", describe(error))

    def _as_driver_error(self, ctx: ExceptionContext, error: BaseException) -> BaseException:
        """SQLAlchemy's ``OperationalError`` around the driver's "lost connection" error, for
        a raw transport error (chained to it)."""
        lost = self._dbapi.OperationalError(
            LOST_CONNECTION, f"Lost connection to MySQL server ({type(error).__name__}: {error})"
        )
        lost.__cause__ = error
        wrapped: BaseException = DBAPIError.instance(
            ctx.statement,
            ctx.parameters,
            lost,
            self._dbapi.Error,
            hide_parameters=bool(getattr(ctx.engine, "hide_parameters", False)),
            connection_invalidated=True,
            dialect=ctx.dialect,
        )
        return wrapped
