"""Starlette (and any ASGI application): lifespan, request-scoped sessions, 503s, readiness.

::

    from asyncgone.integrations.starlette import (
        DatabaseMiddleware, get_session, lifespan, readiness,
    )

    db = asyncgone.Database("mysql+asyncmy://app:secret@db/app")

    async def create_order(request):
        session = get_session(request)              # this request's session
        session.add(Order(...))
        return JSONResponse({"ok": True}, status_code=201)  # committed before this is sent

    app = Starlette(
        routes=[Route("/orders", create_order, methods=["POST"]), Route("/ready", readiness(db))],
        middleware=[Middleware(DatabaseMiddleware, db=db)],
        lifespan=lifespan(db),
    )

``DatabaseMiddleware`` is pure ASGI (never ``BaseHTTPMiddleware``, which runs endpoints in a
task group of its own). Per HTTP request it:

- opens a session lazily, on the first ``get_session(request)``;
- commits it as the response starts, so a client that sees 201 can read its write at once;
  a failing commit turns into an error response instead, as nothing was sent yet;
- rolls it back when the endpoint raises, or when the response is an error (status 400 or
  more, e.g. from an ``HTTPException`` an exception handler turned into a response), like
  pyramid_tm's commit veto;
- answers 503 (``Retry-After``) when the database is unavailable (``DatabaseUnavailable``,
  a disconnect, a failure to connect: see ``asyncgone.is_unavailable``) and the error
  escaped the endpoint before its response started;
- cancels the endpoint when the client disconnects mid-request, so its statement is stopped
  (``KILL QUERY``) and its transaction rolled back, instead of running for nobody;
- with ``read_only_methods`` (e.g. ``SAFE_METHODS``), gives requests of those methods a
  ``read_only`` session: on a fit replica of a ``Database(replicas=...)`` (see
  ``Database.session()``). Read-your-writes holds within a request; across requests
  (a POST, then the client's GET) it is the application's to arrange (see the Topologies
  page).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from asyncgone import DEFAULT_HEALTH_TIMEOUT, Database, ScopeGroup, SessionScope, is_unavailable

__all__ = [
    "SAFE_METHODS",
    "DatabaseMiddleware",
    "RequestSession",
    "get_session",
    "is_unavailable",
    "lifespan",
    "readiness",
    "unavailable_response",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATE_KEY = "asyncgone_session"

#: HTTP methods that change nothing (RFC 9110): ``read_only_methods=SAFE_METHODS`` sends
#: their requests' sessions to the replicas.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: Seconds a client is told to wait before retrying after a 503.
RETRY_AFTER = 5


def lifespan(db: Database, *, state_key: str = "db") -> Callable[[Any], Any]:
    """Return a lifespan for ``Starlette(lifespan=...)``: ``db`` is started before the first
    request, available as ``app.state.<state_key>``, and always closed at shutdown."""

    @asynccontextmanager
    async def _lifespan(app: Any) -> AsyncIterator[None]:
        async with db:
            setattr(app.state, state_key, db)
            yield

    return _lifespan


def unavailable_response(exc: BaseException) -> Response:
    """The default answer to an unavailable database: 503 with Retry-After, no details."""
    return JSONResponse(
        {"detail": "The database is unavailable; try again shortly."},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER)},
    )


class RequestSession:
    """One request's session: opened on first use, committed or rolled back once."""

    def __init__(self, db: Database, *, read_only: bool = False) -> None:
        self._db = db
        self._read_only = read_only
        self._scope: SessionScope | None = None
        self._finished = False
        # Scopes of the request's own dependencies whose results the body streams
        # (``adopt``): they end with this one.
        self._adopted: list[SessionScope] = []

    def get(self) -> AsyncSession:
        if self._finished:
            raise RuntimeError(
                "this request's session was committed when the response started; use "
                "`async with db.session()` for database work after that (e.g. while streaming)"
            )
        if self._scope is None:
            self._scope = self._db.session(read_only=self._read_only)
            return self._scope.open()
        session = self._scope.session
        assert session is not None
        return session

    def streaming(self) -> bool:
        """Whether the response reads a result of this session as it goes (a streaming
        body over ``session.stream()``): the session must stay open until it is sent."""
        if self._finished:
            return False
        scopes = [*([self._scope] if self._scope is not None else []), *self._adopted]
        return any(scope.streaming() for scope in scopes)

    def adopt(self, scope: SessionScope) -> bool:
        """Take over ending ``scope`` (a dependency's session whose result the body
        streams): it is committed or rolled back with this one, after the body. False
        once this one has ended: the caller must end it itself."""
        if self._finished:
            return False
        self._adopted.append(scope)
        return True

    async def commit(self) -> None:
        """Commit and close, if the session was used; raises what committing raises."""
        if self._finished:
            return
        self._finished = True
        scopes = [*self._adopted, *([self._scope] if self._scope is not None else [])]
        for index, scope in enumerate(scopes):
            try:
                await scope.commit()
            except BaseException as exc:
                for rest in scopes[index + 1 :]:
                    await rest.rollback(exc)
                raise

    async def abort(self, exc: BaseException) -> None:
        """Roll back and close, if the session was used; never raises in place of ``exc``."""
        if self._finished:
            return
        self._finished = True
        for scope in [*self._adopted, *([self._scope] if self._scope is not None else [])]:
            await scope.rollback(exc)


def get_session(request: Request) -> AsyncSession:
    """Return the request's ``AsyncSession`` (``DatabaseMiddleware`` must be installed)."""
    request_session = request.scope.get("state", {}).get(STATE_KEY)
    if not isinstance(request_session, RequestSession):
        raise RuntimeError(
            "no asyncgone session for this request: add "
            "Middleware(DatabaseMiddleware, db=db) to the application"
        )
    return request_session.get()


class _ClientDisconnected(OSError):
    """The client went away before the response was complete (an ``OSError``, as ASGI 2.4
    servers raise from ``send``)."""


class _ErrorResponse(Exception):
    """The application answered with an error status: its work is rolled back."""


class DatabaseMiddleware:
    """Pure ASGI middleware giving each HTTP request a session; see the module docstring.

    Parameters:
        app: the ASGI application to wrap.
        db: the ``Database`` (started by the lifespan).
        on_unavailable: builds the response for an unavailable database (default
            ``unavailable_response``: 503 with ``Retry-After``).
        cancel_on_disconnect: cancel the endpoint when the client disconnects mid-request.
        read_only_methods: HTTP methods whose requests get a ``read_only`` session (default
            none; ``SAFE_METHODS`` is GET, HEAD and OPTIONS).
    """

    def __init__(
        self,
        app: ASGIApp,
        db: Database,
        *,
        on_unavailable: Callable[[BaseException], Response] = unavailable_response,
        cancel_on_disconnect: bool = True,
        read_only_methods: Collection[str] = (),
    ) -> None:
        self.app = app
        self.db = db
        self.on_unavailable = on_unavailable
        self.cancel_on_disconnect = cancel_on_disconnect
        self.read_only_methods = frozenset(m.upper() for m in read_only_methods)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_session = RequestSession(
            self.db, read_only=scope.get("method") in self.read_only_methods
        )
        scope.setdefault("state", {})[STATE_KEY] = request_session
        progress = _Progress()

        async def send_wrapper(message: Message) -> None:
            if progress.hung_up:
                # What ASGI 2.4 servers do: a task still sending to a client that is gone
                # (a streaming response's body) learns it here and stops.
                raise _ClientDisconnected("the client disconnected")
            if message["type"] == "http.response.start":
                # Committed before the status line leaves: a client that sees success can
                # read its write at once, and a failed commit can still become an error.
                if message["status"] >= 400:
                    await request_session.abort(_ErrorResponse(message["status"]))
                elif not request_session.streaming():
                    await request_session.commit()
                # else the body streams a result of the session: committing now would
                # drain it, and the client would get a truncated body. It ends after the
                # body, below (the status line is sent by then: a failure there is logged).
                progress.started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                progress.done = True
            await send(message)

        group = ScopeGroup()
        try:
            with group.collecting():
                if self.cancel_on_disconnect:
                    await self._run_until_disconnect(scope, receive, send_wrapper, progress)
                else:
                    await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            await request_session.abort(exc)
            if progress.started or not is_unavailable(exc):
                raise
            await self.on_unavailable(exc)(scope, receive, send)
            return
        except BaseException as exc:  # cancelled from outside: clean up, keep cancelling
            await request_session.abort(exc)
            raise
        if progress.hung_up:
            await request_session.abort(_ClientDisconnected())
            # Sessions the request's other tasks still hold (a background task it started):
            # their statements stopped, their tasks cancelled.
            await group.abandon(self.db.cleanup_timeout)
        else:
            # A response never started, or its body streamed a result of the session.
            await request_session.commit()

    async def _run_until_disconnect(
        self, scope: Scope, receive: Receive, send: Send, progress: _Progress
    ) -> None:
        """Run the app in a task of its own, reading ``receive`` on its behalf; cancel that
        task if the client leaves before the response is complete.

        A pump owns the server's ``receive`` (two readers would race for its messages) and
        forwards every message to the app. The app runs in its own task so that a plain
        ``Task.cancel()`` reaches it: an anyio cancel scope cancels only a task found
        waiting, and one fed continuously by a socket (rows streaming in) never is.
        """
        to_app, for_app = anyio.create_memory_object_stream[Message](math.inf)
        loop = asyncio.get_running_loop()
        app_task: asyncio.Task[None] = loop.create_task(
            _call(self.app, scope, for_app.receive, send)
        )

        async def pump() -> None:
            while True:
                message = await receive()
                to_app.send_nowait(message)
                if message["type"] == "http.disconnect":
                    if not progress.done:
                        progress.hung_up = True
                        app_task.cancel("the client hung up")
                    return

        pumping = loop.create_task(pump())
        try:
            try:
                await asyncio.wait({app_task})
            except asyncio.CancelledError:
                # Cancelled from outside (a server shutting down): the app goes too, and its
                # cleanup finishes before the cancellation goes on.
                app_task.cancel()
                await asyncio.wait({app_task}, timeout=self.db.cleanup_timeout)
                raise
        finally:
            pumping.cancel()
            await asyncio.wait({pumping})
            to_app.close()
            for_app.close()
        if app_task.cancelled():
            if progress.hung_up:
                return
            raise asyncio.CancelledError("the request's task was cancelled")
        error = app_task.exception()
        if error is not None and not (progress.hung_up and _after_hang_up(error)):
            raise error


async def _call(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    await app(scope, receive, send)


def _after_hang_up(error: BaseException) -> bool:
    """Whether ``error`` is what stopping the app for a client that hung up raises: a
    cancellation, the send that refused to go out, or a group of those (anyio's task
    groups, as a streaming response uses)."""
    grouped = getattr(error, "exceptions", None)  # an (exceptiongroup's, on 3.10) group
    if isinstance(grouped, tuple):
        return all(_after_hang_up(inner) for inner in grouped)
    return isinstance(error, (asyncio.CancelledError, _ClientDisconnected, OSError))


class _Progress:
    """How far the response got, and whether the client hung up before it was complete."""

    __slots__ = ("done", "hung_up", "started")

    def __init__(self) -> None:
        self.started = False
        self.done = False
        self.hung_up = False


def readiness(
    db: Database | None = None, *, timeout: float = DEFAULT_HEALTH_TIMEOUT
) -> Callable[[Request], Awaitable[Response]]:
    """Return an endpoint answering 200 when ``db`` serves a query within ``timeout``, else
    503; the body is ``Health.as_dict()``. Without ``db``, it uses ``request.app.state.db``."""

    async def ready(request: Request) -> Response:
        database = db or request.app.state.db
        report = await database.health(timeout=timeout)
        return JSONResponse(report.as_dict(), status_code=200 if report.ok else 503)

    return ready
