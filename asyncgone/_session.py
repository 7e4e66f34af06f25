"""Sessions users never have to think about: commit, safe rollback, cancellation-safe cleanup.

``SessionScope`` is the one implementation behind ``managed_session()`` and
``Database.session()``:

- on success it flushes, checks that the connection is still alive, then commits; a
  disconnect while COMMIT is in flight raises ``CommitOutcomeUnknown`` (chained to the
  driver's error), because the server may or may not have applied it;
- on any exception it rolls back and re-raises that exception; a rollback or close that
  fails is logged and attached to it as a note, never raised in its place;
- rollback and close run in ``finish()``: bounded, and completed even while the caller is
  being cancelled (asyncio or anyio), so a cancelled session never strands its connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from . import _drivers
from ._cancel import drain_and_dispose
from ._engine import create_engine
from ._errors import CommitOutcomeUnknown, add_note, is_disconnect
from ._url import mask
from ._waits import finish

if TYPE_CHECKING:
    from ._database import Database

__all__ = [
    "DEFAULT_CLEANUP_TIMEOUT",
    "DEFAULT_SESSION_OPTIONS",
    "SessionScope",
    "commits",
    "managed_session",
]

log = logging.getLogger("asyncgone")

#: Bound on the rollback, close and engine disposal a session scope does on its way out.
DEFAULT_CLEANUP_TIMEOUT = 5.0

#: ``AsyncSession`` keywords asyncgone sets unless given: objects stay usable after commit
#: without a lazy load, which async code cannot do implicitly.
DEFAULT_SESSION_OPTIONS: Mapping[str, Any] = {"expire_on_commit": False}

_CONNECTIONS = "asyncgone.connections"
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
    session.info.setdefault(_CONNECTIONS, []).append(conn)


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
        if _drivers.is_closed(conn.connection.driver_connection):
            return True
    return False


class SessionScope:
    """``async with SessionScope(engine) as session``: the semantics of ``managed_session()``."""

    def __init__(
        self,
        engine: AsyncEngine,
        session_options: Mapping[str, Any] | None = None,
        *,
        cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT,
    ) -> None:
        options = {**DEFAULT_SESSION_OPTIONS, **(session_options or {})}
        options["sync_session_class"] = _tracking_class(options.get("sync_session_class", Session))
        self.engine = engine
        self._options = options
        self._cleanup_timeout = cleanup_timeout
        self._session: AsyncSession | None = None

    def open(self) -> AsyncSession:
        """Create the session (no I/O: it connects on first use); ``__aenter__`` does this."""
        if self._session is not None:
            raise RuntimeError("a session scope can be entered once; open a new one")
        self._session = AsyncSession(self.engine, **self._options)
        return self._session

    @property
    def session(self) -> AsyncSession | None:
        """The session, once opened."""
        return self._session

    async def __aenter__(self) -> AsyncSession:
        return self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session = self._session
        assert session is not None
        if exc is None:
            try:
                await self._commit(session)
            except BaseException as commit_error:
                await self._cleanup(session, commit_error, rollback=True)
                raise
            await self._cleanup(session, None, rollback=False)
        else:
            await self._cleanup(session, exc, rollback=True)

    async def _commit(self, session: AsyncSession) -> None:
        await session.flush()  # statements fail here, before COMMIT: an ordinary error
        lost = await _lost_before_commit(session)
        try:
            await session.commit()
        except Exception as exc:
            if lost or not is_disconnect(exc):
                raise  # the server rolled it back, or it answered with an error: known
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
        try:
            await finish(
                _release(session, error, rollback=rollback),
                self._cleanup_timeout,
                "session cleanup",
            )
        except TimeoutError:
            log.warning(
                "session cleanup took longer than %s s and was abandoned; its connection is "
                "discarded",
                self._cleanup_timeout,
            )
            if error is not None:
                add_note(error, "asyncgone: the session cleanup after this error timed out")


async def _release(session: AsyncSession, error: BaseException | None, *, rollback: bool) -> None:
    """Run the cleanup steps in order; a failed step is logged and noted, the next one runs."""
    steps = [("rollback", session.rollback), ("close", session.close)]
    for name, step in steps if rollback else steps[1:]:
        try:
            await step()
        except Exception as cleanup_error:
            # A dead connection makes these fail routinely; anything else deserves attention.
            level = logging.DEBUG if is_disconnect(cleanup_error) else logging.WARNING
            log.log(level, "session %s failed: %s", name, cleanup_error)
            if error is not None:
                add_note(
                    error,
                    f"asyncgone: the session {name} after this error also failed: "
                    f"{cleanup_error!r}",
                )


def _engine_for(bind: AsyncEngine | str | URL | None) -> tuple[AsyncEngine, bool]:
    """Return the engine for ``bind`` and whether this scope owns (and must dispose) it."""
    if isinstance(bind, AsyncEngine):
        return bind, False
    return create_engine(bind), True


@asynccontextmanager
async def managed_session(
    bind: AsyncEngine | Database | str | URL | None = None, **session_options: Any
) -> AsyncIterator[AsyncSession]:
    """Open an ``AsyncSession`` that commits on success and rolls back on any error.

    The original error is always the one re-raised. Cleanup is bounded and survives
    cancellation, so the connection always returns to the pool (or is discarded when dead).
    A connection lost while COMMIT was in flight raises ``CommitOutcomeUnknown``::

        async with asyncgone.managed_session(engine) as session:
            session.add(Order(id=1))
        async with asyncgone.managed_session() as session:    # engine from $DATABASE_URL,
            ...                                               # disposed on exit

    Parameters:
        bind: an ``AsyncEngine``, a ``Database``, a URL, or ``None`` for ``$DATABASE_URL``.
            An engine made here from a URL is disposed when the block exits.
        **session_options: ``AsyncSession`` keywords; ``expire_on_commit`` defaults to False.
    """
    from ._database import Database

    if isinstance(bind, Database):
        async with bind.session(**session_options) as session:
            yield session
        return
    engine, owned = _engine_for(bind)
    try:
        async with SessionScope(engine, session_options) as session:
            yield session
    finally:
        if owned:
            # Both steps within DEFAULT_CLEANUP_TIMEOUT in all.
            await drain_and_dispose(engine, DEFAULT_CLEANUP_TIMEOUT / 2)
