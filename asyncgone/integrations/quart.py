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
  view_func=ext.readiness)``);
- when the client hangs up before the response is complete, Quart cancels the request's
  task; the extension then ends every session the request opened that is still open, in
  any task the request started too (their statements stopped with ``KILL QUERY``, their
  tasks cancelled, their connections returned or discarded). It wraps ``app.asgi_app`` for
  that: Quart runs ``after_request`` and ``teardown_request`` before it sends the body, so
  no hook of its own runs after a hang-up during a streaming response.
  Quart's own background tasks (``app.add_background_task``) are left running, and
  ``cancel_on_disconnect=False`` leaves every task the request started running.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any

from quart import Quart, current_app, g, jsonify, request
from quart.typing import ResponseReturnValue
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from asyncgone import (
    DEFAULT_HEALTH_TIMEOUT,
    Database,
    DatabaseUnavailable,
    ScopeGroup,
    SessionScope,
    is_unavailable,
)

if TYPE_CHECKING:  # Quart's own ASGI types, from the server it is built on
    from hypercorn.typing import (
        ASGIReceiveCallable,
        ASGIReceiveEvent,
        ASGISendCallable,
        ASGISendEvent,
        Scope,
    )

    _ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

__all__ = ["AsyncGone", "session", "unavailable_response"]

_EXTENSION = "asyncgone"
_SCOPE = "_asyncgone_session_scope"
RETRY_AFTER = 5


async def unavailable_response(exc: BaseException) -> ResponseReturnValue:
    """The default answer to an unavailable database: 503 with Retry-After, no details."""
    body = jsonify({"detail": "The database is unavailable; try again shortly."})
    return body, 503, {"Retry-After": str(RETRY_AFTER)}


class AsyncGone:
    """The Quart extension; see the module docstring.

    Parameters:
        app: the application, or None to attach later with ``init_app()``.
        db: the ``Database`` (started and closed with the app).
        on_unavailable: builds the response for an unavailable database (default
            ``unavailable_response``: 503 with ``Retry-After``).
        health_timeout: bound in seconds on the readiness check.
        cancel_on_disconnect: when the client hangs up before the response is complete,
            end the sessions still open in the tasks the request started (Quart itself
            cancels the request's own task either way).
        read_only_methods: HTTP methods whose requests get a ``read_only`` session (on a
            fit replica of a ``Database(replicas=...)``; default none, e.g.
            ``{"GET", "HEAD", "OPTIONS"}``).
    """

    def __init__(
        self,
        app: Quart | None = None,
        db: Database | None = None,
        *,
        on_unavailable: Callable[[BaseException], Awaitable[ResponseReturnValue]] = (
            unavailable_response
        ),
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
        cancel_on_disconnect: bool = True,
        read_only_methods: Collection[str] = (),
    ) -> None:
        self.db = db
        self.read_only_methods = frozenset(m.upper() for m in read_only_methods)
        self.on_unavailable = on_unavailable
        self.health_timeout = health_timeout
        self.cancel_on_disconnect = cancel_on_disconnect
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
        if app.extensions.get(_EXTENSION, self) is not self:
            # One request session per request, and one set of error handlers, per app: a
            # second extension would take over the first's (its queries to the other
            # database) without a word.
            raise RuntimeError(
                "this app already has an AsyncGone extension: one per app; for a second "
                "database, use `async with db2.session()` in the views that need it"
            )
        app.extensions[_EXTENSION] = self
        app.before_serving(self._start)
        app.after_serving(self._stop)
        app.after_request(self._commit)
        app.teardown_request(self._teardown)
        app.register_error_handler(DatabaseUnavailable, self._unavailable)
        app.register_error_handler(DBAPIError, self._database_error)
        if self.cancel_on_disconnect and not isinstance(app.asgi_app, _EndOnHangUp):
            # Quart's documented way to add ASGI middleware (the app stays a Quart app).
            app.asgi_app = _EndOnHangUp(app, self)  # type: ignore[method-assign]

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
            scope = self.database.session(read_only=request.method in self.read_only_methods)
            setattr(g, _SCOPE, scope)
            return scope.open()
        opened = scope.session
        assert opened is not None
        return opened

    async def _commit(self, response: Any) -> Any:
        scope: SessionScope | None = g.pop(_SCOPE, None)
        if scope is not None and scope.streaming():
            # The body streams a result of the request's session, which ends here, before
            # the body: committing would drain the result and send a truncated body.
            error = RuntimeError(
                "the response streams a result of the request's session, which ends before "
                "the body is sent: stream from `async with db.session()` inside the generator"
            )
            await scope.rollback(error)
            raise error
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


class _EndOnHangUp:
    """Wraps ``app.asgi_app``: the session scopes each HTTP request opens (in its own task,
    in a streaming body, in tasks it starts) form a ``ScopeGroup``, ended once the request
    is over if its client hung up before the response was complete.

    Quart cancels the request's task when the client disconnects, and closes a streaming
    body it leaves unfinished; tasks the request started run on until ended here, except
    Quart's own background tasks (``app.add_background_task``), made to outlive requests.
    """

    def __init__(self, quart: Quart, extension: AsyncGone) -> None:
        self.app: _ASGIApp = quart.asgi_app
        self.quart = quart
        self.extension = extension

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        done = hung_up = False

        async def watch_receive() -> ASGIReceiveEvent:
            nonlocal hung_up
            message = await receive()
            if message["type"] == "http.disconnect" and not done:
                hung_up = True
            return message

        async def watch_send(message: ASGISendEvent) -> None:
            nonlocal done
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done = True
            await send(message)

        group = ScopeGroup()
        try:
            with group.collecting():  # Quart's tasks for the request copy this context
                await self.app(scope, watch_receive, watch_send)
        finally:
            if hung_up:
                await group.abandon(
                    self.extension.database.cleanup_timeout,
                    spare=set(getattr(self.quart, "background_tasks", ())),
                )


def session() -> AsyncSession:
    """This request's session, from the app's ``AsyncGone`` extension."""
    extension = current_app.extensions.get(_EXTENSION)
    if not isinstance(extension, AsyncGone):
        raise RuntimeError("no AsyncGone extension on this app: call AsyncGone(app, db)")
    return extension.session()
