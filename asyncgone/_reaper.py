"""Sessions that other tasks keep busy after their scope ended: closed once free, never
left to the garbage collector.

A session used by two tasks at once (``asyncio.gather(s.execute(a), s.execute(b))``, a
background task given the request's session) fails with SQLAlchemy's "concurrent
operations are not permitted", and the scope's rollback and close fail the same way while
the other task is still inside the session. That task then finishes its checkout or its
statement after the scope gave up, and the connection it holds would stay checked out until
the garbage collector found it: with a small pool, every later request times out.

So a scope that cannot close its session, because another task is inside it, hands the
session to a reaper task, which closes it as soon as that task is done (retrying every few
milliseconds), and past the scope's cleanup bound invalidates its connections instead. A
session whose scope ended and which then begins a transaction again (a task scheduled
before the scope ended, running after it) is handed to a reaper too, from SQLAlchemy's
``after_begin`` event.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy.engine import Connection
from sqlalchemy.exc import IllegalStateChangeError, InvalidRequestError
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from ._compat import statement_done
from ._errors import describe
from ._state import state_of
from ._waits import bounded

__all__ = ["ENDED", "busy_elsewhere", "reap", "streaming"]

log = logging.getLogger("asyncgone")

#: ``Session.info`` key: the cleanup bound (seconds) of the scope that ended this session.
ENDED = "asyncgone.ended"
_REAPING = "asyncgone.reaping"
_CONNECTIONS = "asyncgone.connections"
_RETRY_EVERY = 0.005

_reapers: set[asyncio.Task[None]] = set()


def busy_elsewhere(exc: BaseException) -> bool:
    """Whether ``exc`` says the session is in use by another task right now."""
    return isinstance(exc, IllegalStateChangeError) or (
        isinstance(exc, InvalidRequestError) and "concurrent operations" in str(exc)
    )


def reap(session: Session, bound: float) -> None:
    """Close ``session`` in the background once no other task is inside it (at most
    ``bound`` seconds, then its connections are invalidated). Idempotent."""
    if session.info.get(_REAPING):
        return
    session.info[_REAPING] = True
    task = asyncio.get_running_loop().create_task(_reap(session, bound), name="asyncgone-reaper")
    _reapers.add(task)
    task.add_done_callback(_reaped)


async def _reap(session: Session, bound: float) -> None:
    deadline = time.monotonic() + bound
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                # A statement the other task runs holds its connection's lock (SQLAlchemy's
                # async adapters serialise statements with it): closing the session under
                # it would interleave a ROLLBACK with the statement's reply.
                await bounded(_statements_done(session), remaining)
                await greenlet_spawn(session.close)
            except TimeoutError:
                break
            except Exception as exc:
                if not busy_elsewhere(exc):
                    log.debug("closing a session left busy failed: %s", describe(exc))
                    break
                await asyncio.sleep(_RETRY_EVERY)
            else:
                log.debug("closed a session that another task kept busy after its scope ended")
                return
        # Still in use after the bound: take its connections away; the task inside fails
        # with a lost connection instead of keeping a pool slot.
        for conn in session.info.get(_CONNECTIONS, []):
            if not conn.closed and not conn.invalidated:
                await greenlet_spawn(conn.invalidate)
        log.warning(
            "a session was still used by another task %g s after its scope ended; its "
            "connections were discarded (a session must not be shared between tasks)",
            bound,
        )
    finally:
        session.info[_REAPING] = False


async def _statements_done(session: Session) -> None:
    """Wait until no statement runs on the session's connections, and no result of theirs
    is still being read (``session.stream()``: the driver would drain it before the
    ROLLBACK, while the other task reads the same rows)."""
    for conn in session.info.get(_CONNECTIONS, []):
        if not conn.closed and not conn.invalidated:
            await statement_done(conn.connection.dbapi_connection)
    # Polled: the drivers signal nothing when a result has been read to its end.
    while streaming(session):  # noqa: ASYNC110
        await asyncio.sleep(_RETRY_EVERY)


def streaming(session: Session) -> bool:
    """Whether a result of one of the session's connections (``session.stream()``, a
    server-side cursor) is still being read."""
    return any(_streaming(conn) for conn in session.info.get(_CONNECTIONS, []))


def _streaming(conn: Connection) -> bool:
    if conn.closed or conn.invalidated:
        return False
    state = state_of(conn.engine)
    return state is not None and state.driver.streaming(conn.connection.driver_connection)


def _reaped(task: asyncio.Task[None]) -> None:
    _reapers.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("closing a session left busy failed: %s", describe(task.exception()))  # type: ignore[arg-type]
