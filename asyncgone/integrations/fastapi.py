"""FastAPI: a lifespan, a session dependency that commits before the response, 503s, readiness.

::

    from asyncgone.integrations.fastapi import DatabaseMiddleware, Session, lifespan, readiness

    db = asyncgone.Database("mysql+asyncmy://app:secret@db/app")
    app = FastAPI(lifespan=lifespan(db))
    app.add_middleware(DatabaseMiddleware, db=db)      # 503s, cancel on client disconnect
    app.add_api_route("/ready", readiness(db))

    @app.post("/orders", status_code=201)
    async def create_order(session: Session) -> dict[str, bool]:
        session.add(Order(...))
        return {"ok": True}                           # committed before the 201 is sent

Since FastAPI 0.118, code after a dependency's ``yield`` runs after the response has been
sent, so a commit there happens after the client already saw success. ``Session`` uses
``Depends(..., scope="function")`` (FastAPI 0.121 and later), whose exit runs when the path
operation returns, before the response. On older FastAPI, use the middleware's request
session instead: ``asyncgone.integrations.starlette.get_session(request)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from asyncgone import Database

from .starlette import (
    SAFE_METHODS,
    STATE_KEY,
    DatabaseMiddleware,
    RequestSession,
    get_session,
    is_unavailable,
    lifespan,
    readiness,
    unavailable_response,
)

__all__ = [
    "SAFE_METHODS",
    "DatabaseMiddleware",
    "ReadSession",
    "Session",
    "get_session",
    "is_unavailable",
    "lifespan",
    "readiness",
    "session_dependency",
    "unavailable_response",
]


def session_dependency(
    db: Database | None = None, **session_options: Any
) -> Callable[[Request], AsyncIterator[AsyncSession]]:
    """Return a dependency yielding a session with ``managed_session()`` semantics.

    Use it with ``Depends(..., scope="function")`` so the commit happens before the response
    is sent. Without ``db``, it uses ``request.app.state.db`` (set by ``lifespan``).
    """

    async def dependency(request: Request) -> AsyncIterator[AsyncSession]:
        database: Database = db or request.app.state.db
        scope = database.session(**session_options)
        try:
            yield scope.open()
        except BaseException as exc:
            await scope.rollback(exc)
            raise
        if not scope.streaming():
            await scope.commit()
            return
        # The response streams a result of this session (a StreamingResponse over
        # session.stream()): committing now would drain it, and the client would get a
        # truncated body. The middleware's request session ends it after the body.
        request_session = request.scope.get("state", {}).get(STATE_KEY)
        if isinstance(request_session, RequestSession) and request_session.adopt(scope):
            return
        error = RuntimeError(
            "the response streams a result of the request's Session, which is committed "
            "before the response: add DatabaseMiddleware (it keeps such a session open until "
            "the body is sent), or stream from `async with db.session()` inside the body"
        )
        await scope.rollback(error)
        raise error

    return dependency


#: ``session: Session`` in a path operation: a session of ``app.state.db``, committed when
#: the operation returns (before the response), rolled back if it raises.
Session = Annotated[AsyncSession, Depends(session_dependency(), scope="function")]

#: ``session: ReadSession``: a ``read_only`` session of ``app.state.db``: on a fit replica
#: of a ``Database(replicas=...)``, else the primary (see ``Database.session()``).
ReadSession = Annotated[AsyncSession, Depends(session_dependency(read_only=True), scope="function")]
