"""Quart: an extension that starts the Database with the app and gives each request a session.

::

    from asyncgone.integrations.quart import AsyncGone, session

    db = asyncgone.Database("mysql+asyncmy://app:secret@db/app")
    app = Quart(__name__)
    AsyncGone(app, db)                         # or ext = AsyncGone(db=db); ext.init_app(app)

    @app.post("/orders")
    async def create_order():
        session().add(Order(...))              # this request's session
        return {"ok": True}, 201               # committed before the response is sent

- ``before_serving`` starts the Database, ``after_serving`` always closes it;
- the request's session opens on first use, is committed in ``after_request`` (so before
  the response leaves; if committing fails, the response is replaced: by the 503 below
  when the database is unavailable, else by Quart's 500), and rolled back instead
  when the response is an error (status 400 or more: Quart runs ``after_request`` for the
  500 of an unhandled exception too) or in ``teardown_request`` if the request failed
  before that;
- an unavailable database (``asyncgone.is_unavailable``) becomes a 503 with ``Retry-After``
  (``on_unavailable=`` changes the response);
- ``ext.readiness`` is a view for a readiness route (``app.add_url_rule("/ready",
  view_func=ext.readiness)``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from quart import Quart, current_app, g, jsonify
from quart.typing import ResponseReturnValue
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from asyncgone import (
    DEFAULT_HEALTH_TIMEOUT,
    Database,
    DatabaseUnavailable,
    SessionScope,
    is_unavailable,
)

__all__ = ["AsyncGone", "session", "unavailable_response"]

_EXTENSION = "asyncgone"
_SCOPE = "_asyncgone_session_scope"
RETRY_AFTER = 5


async def unavailable_response(exc: BaseException) -> ResponseReturnValue:
    """The default answer to an unavailable database: 503 with Retry-After, no details."""
    body = jsonify({"detail": "The database is unavailable; try again shortly."})
    return body, 503, {"Retry-After": str(RETRY_AFTER)}


class AsyncGone:
    """The Quart extension; see the module docstring."""

    def __init__(
        self,
        app: Quart | None = None,
        db: Database | None = None,
        *,
        on_unavailable: Callable[[BaseException], Awaitable[ResponseReturnValue]] = (
            unavailable_response
        ),
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
    ) -> None:
        self.db = db
        self.on_unavailable = on_unavailable
        self.health_timeout = health_timeout
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Quart, db: Database | None = None) -> None:
        """Attach to ``app`` (``db`` here overrides the one given to the constructor)."""
        if db is not None:
            self.db = db
        if self.db is None:
            raise RuntimeError(
                "AsyncGone needs a Database: AsyncGone(app, db) or init_app(app, db)"
            )
        app.extensions[_EXTENSION] = self
        app.before_serving(self._start)
        app.after_serving(self._stop)
        app.after_request(self._commit)
        app.teardown_request(self._teardown)
        app.register_error_handler(DatabaseUnavailable, self._unavailable)
        app.register_error_handler(DBAPIError, self._database_error)

    @property
    def database(self) -> Database:
        assert self.db is not None
        return self.db

    async def _start(self) -> None:
        await self.database.start()

    async def _stop(self) -> None:
        await self.database.close()

    def session(self) -> AsyncSession:
        """This request's session, opened on first use."""
        scope: SessionScope | None = g.get(_SCOPE)
        if scope is None:
            scope = self.database.session()
            setattr(g, _SCOPE, scope)
            return scope.open()
        opened = scope.session
        assert opened is not None
        return opened

    async def _commit(self, response: Any) -> Any:
        scope: SessionScope | None = g.pop(_SCOPE, None)
        if scope is not None:
            if response.status_code >= 400:
                await scope.rollback(RuntimeError(f"error response {response.status_code}"))
            else:
                try:
                    await scope.commit()  # rolls back if committing fails
                except Exception as exc:
                    # Quart sends an exception raised here to its generic 500, never to the
                    # handlers registered for it, so answer an unavailable database here.
                    # Nothing was sent yet: the client never sees a success that did not happen.
                    if not is_unavailable(exc):
                        raise
                    return await current_app.make_response(await self.on_unavailable(exc))
        return response

    async def _teardown(self, exc: BaseException | None) -> None:
        scope: SessionScope | None = g.pop(_SCOPE, None)
        if scope is not None:  # the request failed before after_request could commit
            await scope.rollback(exc or RuntimeError("request ended without a response"))

    async def _unavailable(self, exc: BaseException) -> ResponseReturnValue:
        await self._rollback(exc)
        return await self.on_unavailable(exc)

    async def _database_error(self, exc: BaseException) -> ResponseReturnValue:
        if not is_unavailable(exc):
            raise exc  # an ordinary database error: Quart's 500, logged as usual
        return await self._unavailable(exc)

    async def _rollback(self, exc: BaseException) -> None:
        scope: SessionScope | None = g.pop(_SCOPE, None)
        if scope is not None:
            await scope.rollback(exc)

    async def readiness(self) -> ResponseReturnValue:
        """A view answering 200 when the database serves a query in time, else 503."""
        report = await self.database.health(timeout=self.health_timeout)
        return jsonify(report.as_dict()), 200 if report.ok else 503


def session() -> AsyncSession:
    """This request's session, from the app's ``AsyncGone`` extension."""
    extension = current_app.extensions.get(_EXTENSION)
    if not isinstance(extension, AsyncGone):
        raise RuntimeError("no AsyncGone extension on this app: call AsyncGone(app, db)")
    return extension.session()
