"""Sessions users never have to think about: commit, safe rollback, cancellation-safe cleanup.

``SessionScope`` is the one implementation behind ``managed_session()``,
``Database.session()`` and the framework integrations' request sessions:

- on success it flushes, checks that the connection is still alive, then commits; a
  disconnect while COMMIT is in flight raises ``CommitOutcomeUnknown`` (chained to the
  driver's error), because the server may or may not have applied it;
- on any exception it rolls back and re-raises that exception; a rollback or close that
  fails is logged and attached to it as a note, never raised in its place; the objects the
  work loaded stay readable (detached with their values, not expired) for error handlers;
- rollback and close run in ``finish()``: bounded, and completed even while the caller is
  being cancelled (asyncio or anyio), so a cancelled session never strands its connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from types import TracebackType
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.util import greenlet_spawn

from ._compat import statement_running
from ._config import seconds
from ._drivers import abandon_stream, thread_id
from ._errors import (
    CommitOutcomeUnknown,
    add_note,
    is_disconnect,
    is_node_not_ready,
    is_read_only_refusal,
)
from ._groups import register
from ._reaper import ENDED, busy_elsewhere, reap, streaming
from ._state import state_of
from ._url import mask
from ._waits import finish

__all__ = ["DEFAULT_CLEANUP_TIMEOUT", "DEFAULT_SESSION_OPTIONS", "SessionScope", "commits"]

log = logging.getLogger("asyncgone")

#: Bound on the rollback, close and engine disposal a session scope does on its way out.
DEFAULT_CLEANUP_TIMEOUT = 5.0

#: ``AsyncSession`` keywords asyncgone sets unless given: objects stay usable after commit
#: without a lazy load, which async code cannot do implicitly.
DEFAULT_SESSION_OPTIONS: Mapping[str, Any] = {"expire_on_commit": False}

_CONNECTIONS = "asyncgone.connections"  # the connections its transactions used
_COMMITS_BEGUN = "asyncgone.commits_begun"
_COMMITS_DONE = "asyncgone.commits_done"
_tracking_classes: dict[type[Session], type[Session]] = {}


def _tracking_class(base: type[Session]) -> type[Session]:
    """Return a subclass of ``base`` that records the connections its transactions use.

    A class-level ``after_begin`` listener costs nothing per session; a listener per
    instance would cost more than the rest of the session's setup.
    """
    cls = _tracking_classes.get(base)
    if cls is None:
        cls = type(base.__name__, (base,), {"__module__": base.__module__})
        event.listen(cls, "after_begin", _remember_connection)
        event.listen(cls, "before_commit", _commit_begins)
        event.listen(cls, "after_commit", _commit_ends)
        _tracking_classes[base] = cls
    return cls


def _remember_connection(
    session: Session, transaction: SessionTransaction, conn: Connection
) -> None:
    info = session.info
    info.setdefault(_CONNECTIONS, []).append(conn)
    bound = info.get(ENDED)
    if bound is not None:
        # Its scope ended already: a task still holding the session began a transaction.
        # Close the session once that task is done with it, not at garbage collection.
        reap(session, bound)


def _commit_begins(session: Session) -> None:
    session.info[_COMMITS_BEGUN] = session.info.get(_COMMITS_BEGUN, 0) + 1


def _commit_ends(session: Session) -> None:
    session.info[_COMMITS_DONE] = session.info.get(_COMMITS_DONE, 0) + 1


def commits(session: AsyncSession) -> tuple[int, int]:
    """How many commits the session has begun and completed so far."""
    info = session.info
    return info.get(_COMMITS_BEGUN, 0), info.get(_COMMITS_DONE, 0)


async def _lost_before_commit(session: AsyncSession) -> bool:
    """Tell whether a connection of the session died before COMMIT could be sent.

    The yield lets the event loop read a FIN or RST that already arrived, so a connection
    killed while the unit of work sat idle is known dead: the server rolled it back, and the
    failure that follows is an ordinary, replayable disconnect rather than an unknown outcome.
    """
    connections: list[Connection] = session.info.get(_CONNECTIONS, [])
    if not connections:
        return False
    await asyncio.sleep(0)
    for conn in connections:
        if conn.invalidated:
            return True
        if conn.closed:
            continue
        state = state_of(conn.engine)
        if state is not None and state.driver.is_closed(conn.connection.driver_connection):
            return True
    return False


class SessionScope:
    """A session with ``managed_session()`` semantics, for code that cannot use ``async with``.

    ``async with SessionScope(engine) as session`` commits on success and rolls back on
    error. Code whose session outlives one block, such as a framework integration that
    commits when the response starts, drives it in steps::

        scope = db.session()
        session = scope.open()          # no I/O: the session connects on first use
        ...
        await scope.commit()            # or: await scope.rollback(error)

    Exactly one of ``commit()`` and ``rollback()`` ends a scope; a second call does nothing.

    Args:
        engine (AsyncEngine): the engine the session binds to.
        session_options (Mapping[str, Any] | None): ``AsyncSession`` keywords
            (``expire_on_commit`` defaults to False, see ``DEFAULT_SESSION_OPTIONS``).
        cleanup_timeout (float): bound in seconds on the rollback and close on the way out
            (default ``DEFAULT_CLEANUP_TIMEOUT``, 5).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        session_options: Mapping[str, Any] | None = None,
        *,
        cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT,
    ) -> None:
        options = {**DEFAULT_SESSION_OPTIONS, **(session_options or {})}
        options["sync_session_class"] = _tracking_class(
            options.get("sync_session_class") or Session
        )
        self.engine = engine
        self._options = options
        self._cleanup_timeout = seconds("cleanup_timeout", cleanup_timeout)
        self._session: AsyncSession | None = None
        self._finished = False

    def open(self) -> AsyncSession:
        """Create the session (no I/O: it connects on first use); ``__aenter__`` does this.

        Raises:
            RuntimeError: the scope was opened before.
        """
        if self._session is not None:
            raise RuntimeError("a session scope can be entered once; open a new one")
        self._session = AsyncSession(self.engine, **self._options)
        register(self)  # with the request's ScopeGroup, if an integration opened one
        return self._session

    @property
    def session(self) -> AsyncSession | None:
        """The session, once opened."""
        return self._session

    @property
    def finished(self) -> bool:
        """True once ``commit()`` or ``rollback()`` ended the scope."""
        return self._finished

    async def commit(self) -> None:
        """Flush, commit and close; on failure roll back and close, then raise.

        Raises:
            CommitOutcomeUnknown: the connection was lost while COMMIT was in flight.
            Exception: whatever flushing or committing raised (a disconnect before COMMIT
                was sent is an ordinary ``OperationalError``).
        """
        if self._finished:
            return
        self._finished = True
        session = self._session
        if session is None:
            return
        try:
            await self._commit(session)
        except BaseException as commit_error:
            await self._cleanup(session, commit_error, rollback=True)
            raise
        await self._cleanup(session, None, rollback=False)

    async def rollback(self, error: BaseException | None = None) -> None:
        """Roll back and close: bounded, completed even under cancellation, never raising.

        A failed rollback or close is logged and, when ``error`` is given, attached to it as
        a note, so that the error being handled stays the one raised.
        """
        if self._finished:
            return
        self._finished = True
        if self._session is not None:
            await self._cleanup(self._session, error, rollback=True)

    def streaming(self) -> bool:
        """Whether a result of the session (``session.stream()``, a server-side cursor) is
        still being read: ending the session now would drain or discard its rows."""
        return self._session is not None and streaming(self._session.sync_session)

    def stop_statements(self) -> None:
        """Stop, with ``KILL QUERY``, what the session's connections run right now (a
        statement in flight, a result still being read); for a request whose client hung
        up. The connections stay with the task that uses them, which then sees the
        statement interrupted."""
        session = self._session
        if session is None:
            return
        for conn in session.info.get(_CONNECTIONS, []):
            if conn.closed or conn.invalidated:
                continue
            state = state_of(conn.engine)
            if state is None or state.killer is None:
                continue
            raw = conn.connection.driver_connection
            if statement_running(conn.connection.dbapi_connection) or state.driver.streaming(raw):
                state.killer.stop(thread_id(raw), raw)

    async def __aenter__(self) -> AsyncSession:
        return self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.commit()
        else:
            await self.rollback(exc)

    async def _commit(self, session: AsyncSession) -> None:
        await session.flush()  # statements fail here, before COMMIT: an ordinary error
        lost = await _lost_before_commit(session)
        try:
            await session.commit()
        except Exception as exc:
            refused = is_read_only_refusal(exc) or is_node_not_ready(exc)
            if lost or not is_disconnect(exc) or refused:
                # The server rolled it back, or answered with an error (a server turned
                # read-only, or a Galera node that may not serve, refuses the COMMIT:
                # nothing committed): the outcome is known.
                raise
            state = state_of(self.engine)
            if state is not None:
                state.counters.commit_outcome_unknown += 1
            raise CommitOutcomeUnknown(
                f"the connection to {mask(self.engine.url)} was lost while COMMIT was in "
                f"flight: the transaction may or may not have been committed, and asyncgone "
                f"will not replay it. Check the data before running this work again."
            ) from exc

    async def _cleanup(
        self, session: AsyncSession, error: BaseException | None, *, rollback: bool
    ) -> None:
        """Roll back (on error) and close: bounded, completed even under cancellation, and
        never raising in place of ``error``."""
        session.info[ENDED] = self._cleanup_timeout
        try:
            released = await finish(
                _release(session, error, rollback=rollback),
                self._cleanup_timeout,
                "session cleanup",
            )
            if not released:
                # Another task is inside the session: close it when that task is done.
                reap(session.sync_session, self._cleanup_timeout)
        except TimeoutError:
            log.warning(
                "session cleanup took longer than %s s and was abandoned; its connection is "
                "discarded",
                self._cleanup_timeout,
            )
            if error is not None:
                add_note(error, "asyncgone: the session cleanup after this error timed out")


async def _stop_streams(session: AsyncSession) -> None:
    """Stop results the session is still reading (``session.stream()``, server-side
    cursors): ``KILL CONNECTION``, then discard the connection.

    A ROLLBACK on such a connection would first read every remaining row of the result (the
    drivers drain it before sending anything), and the statement would run on meanwhile. The
    KILL goes first, over another connection: the server stops the statement even where it
    would not notice the closed socket (a query still computing). The connection is
    discarded; the server rolls its transaction back when it goes.
    """
    for conn in session.info.get(_CONNECTIONS, []):
        if conn.closed or conn.invalidated:
            continue
        state = state_of(conn.engine)
        raw = conn.connection.driver_connection
        if state is None or not state.driver.streaming(raw):
            continue
        if state.killer is not None:
            state.killer.stop(thread_id(raw), raw, connection=True)
        await greenlet_spawn(conn.invalidate)
        abandon_stream(raw)  # nothing left for the driver to read when it is collected
        log.debug("discarded a connection whose result was still being read")


async def _rollback_keeping_values(session: AsyncSession) -> None:
    """Roll back, leaving the objects the work loaded readable.

    ``rollback()`` expires every object in the session, so reading an attribute afterwards
    needs a lazy load, which async code cannot do implicitly (``MissingGreenlet``), or, once
    the session is closed, fails (``DetachedInstanceError``): exactly what an error handler
    that logs the object meets. Detached first, the objects keep the values they had when
    the block failed (changes included, though the server rolled them back).
    """
    session.expunge_all()
    await session.rollback()


def _statement_elsewhere(session: AsyncSession) -> bool:
    """Whether a statement runs on one of the session's connections (from another task: the
    scope's own task is not inside one when the scope ends)."""
    return any(
        not conn.closed
        and not conn.invalidated
        and statement_running(conn.connection.dbapi_connection)
        for conn in session.info.get(_CONNECTIONS, [])
    )


async def _release(session: AsyncSession, error: BaseException | None, *, rollback: bool) -> bool:
    """Run the cleanup steps in order; a failed step is logged and noted, the next one runs.

    Returns False when another task was inside the session (the close could not happen).
    """
    if _statement_elsewhere(session):
        # Another task runs a statement on this session's connection: a ROLLBACK sent now
        # would interleave with that statement's reply. The reaper closes the session once
        # the statement is done.
        if error is not None:
            add_note(
                error,
                "asyncgone: another task was running a statement on this session; it is "
                "closed once that statement ends",
            )
        return False
    await _stop_streams(session)
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("rollback", partial(_rollback_keeping_values, session)),
        ("close", session.close),
    ]
    closed = True
    for name, step in steps if rollback else steps[1:]:
        try:
            await step()
        except Exception as cleanup_error:
            if name == "close" and busy_elsewhere(cleanup_error):
                closed = False
            # A dead connection makes these fail routinely; anything else deserves attention.
            level = logging.DEBUG if is_disconnect(cleanup_error) else logging.WARNING
            log.log(level, "session %s failed: %s", name, cleanup_error)
            if error is not None:
                add_note(
                    error,
                    f"asyncgone: the session {name} after this error also failed: "
                    f"{cleanup_error!r}",
                )
    return closed
