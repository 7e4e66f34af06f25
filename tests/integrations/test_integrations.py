"""Behaviour of the integrations beyond the example apps: error statuses roll back, a lost
commit becomes a 503 (or the application's on_unavailable= response), and misuse is
explained."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from fastapi import FastAPI, HTTPException
from quart import Quart
from quart.typing import ResponseReturnValue
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import asyncgone
from asyncgone.integrations import fastapi as ag_fastapi
from asyncgone.integrations import quart as ag_quart
from asyncgone.integrations import starlette as ag_starlette
from tests._support import Server
from tests.integrations._apps import in_process, lifespan_of

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def db(disposable: Server, driver: str) -> asyncgone.Database:
    disposable.query("CREATE TABLE IF NOT EXISTS marks (id INT PRIMARY KEY)")
    disposable.query("DELETE FROM marks")
    return asyncgone.Database(disposable.url(driver), pool_size=2)


def marks(server: Server) -> list[int]:
    return [int(row[0]) for row in server.query("SELECT id FROM marks")]


def starlette_app(db: asyncgone.Database, endpoint: object, **options: Any) -> Starlette:
    return Starlette(
        routes=[Route("/", endpoint)],  # type: ignore[arg-type]
        middleware=[Middleware(ag_starlette.DatabaseMiddleware, db=db, **options)],
        lifespan=ag_starlette.lifespan(db),
    )


async def write_then_lose_the_connection(
    session: AsyncSession, server: Server, mark: int, *, then_query: bool = False
) -> None:
    """Insert ``mark``, then KILL the session's connection on the server, so the commit
    fails; with ``then_query``, run one more statement, so the handler itself fails."""
    await session.execute(text(f"INSERT INTO marks VALUES ({mark})"))
    thread = (await session.execute(text("SELECT CONNECTION_ID()"))).scalar_one()
    await anyio.to_thread.run_sync(server.kill, thread)
    if then_query:
        await session.execute(text("SELECT 1"))


#: When the database goes away: while the handler still uses it, or once it has returned
#: and its commit is due.
MOMENTS = ["in_the_handler", "at_commit"]


def custom_503_body(exc: BaseException) -> dict[str, object]:
    return {"detail": "down for maintenance", "unavailable": asyncgone.is_unavailable(exc)}


async def test_starlette_error_status_rolls_back(
    db: asyncgone.Database, disposable: Server
) -> None:
    """An HTTPException after a write becomes a 409 response, and the write is rolled back."""

    async def endpoint(request: Request) -> JSONResponse:
        await ag_starlette.get_session(request).execute(text("INSERT INTO marks VALUES (1)"))
        raise StarletteHTTPException(409, "conflict")

    async with in_process(starlette_app(db, endpoint)) as client:
        assert (await client.get("/")).status_code == 409
    assert marks(disposable) == []


async def test_starlette_lost_commit_becomes_503(
    db: asyncgone.Database, disposable: Server
) -> None:
    """The connection dies between the write and the response: the commit at response start
    fails, and the client gets a 503 instead of a success that did not happen."""

    async def endpoint(request: Request) -> JSONResponse:
        await write_then_lose_the_connection(ag_starlette.get_session(request), disposable, 2)
        return JSONResponse({"ok": True}, status_code=201)

    async with in_process(starlette_app(db, endpoint)) as client:
        response = await client.get("/")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
    assert marks(disposable) == []


@pytest.mark.parametrize("moment", MOMENTS)
async def test_starlette_on_unavailable_builds_the_response(
    db: asyncgone.Database, disposable: Server, moment: str
) -> None:
    """With on_unavailable=, a database lost in the handler or at commit is answered with
    the application's own response, and the write is not applied."""

    def maintenance(exc: BaseException) -> Response:
        return JSONResponse(custom_503_body(exc), status_code=503, headers={"Retry-After": "60"})

    async def endpoint(request: Request) -> JSONResponse:
        session = ag_starlette.get_session(request)
        await write_then_lose_the_connection(
            session, disposable, 5, then_query=moment == "in_the_handler"
        )
        return JSONResponse({"ok": True}, status_code=201)

    async with in_process(starlette_app(db, endpoint, on_unavailable=maintenance)) as client:
        response = await client.get("/")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "60"
        assert response.json() == {"detail": "down for maintenance", "unavailable": True}
    assert marks(disposable) == []


def test_get_session_without_middleware_is_explained() -> None:
    """Asking for a session without the middleware says what to add."""
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    with pytest.raises(RuntimeError, match="add Middleware\\(DatabaseMiddleware, db=db\\)"):
        ag_starlette.get_session(request)


ROWS = 20_000


async def rows_of(result: Any) -> AsyncIterator[bytes]:
    async for (value,) in result:
        yield f"{value}\n".encode()


async def test_a_streamed_result_of_the_request_session_is_sent_whole(
    db: asyncgone.Database,
) -> None:
    """A streaming response over ``session.stream()`` of the request's session (Starlette's
    ``get_session``, FastAPI's ``Session`` with the middleware) sends every row: the
    session ends after the body, not when the response starts (which drained the result
    and sent one row)."""

    async def starlette_endpoint(request: Request) -> Response:
        result = await ag_starlette.get_session(request).stream(
            text(f"SELECT seq FROM seq_1_to_{ROWS}")
        )
        return StreamingResponse(rows_of(result))

    other = asyncgone.Database(db.url, pool_size=2)  # a Database starts once
    fastapi = FastAPI(lifespan=ag_fastapi.lifespan(other))
    fastapi.add_middleware(ag_fastapi.DatabaseMiddleware, db=other)

    @fastapi.get("/")
    async def fastapi_endpoint(session: ag_fastapi.Session) -> StreamingResponse:
        result = await session.stream(text(f"SELECT seq FROM seq_1_to_{ROWS}"))
        return StreamingResponse(rows_of(result))

    for app, database in ((starlette_app(db, starlette_endpoint), db), (fastapi, other)):
        async with in_process(app) as client:
            response = await client.get("/")
            assert response.status_code == 200
            lines = response.text.splitlines()
            assert (len(lines), lines[0], lines[-1]) == (ROWS, "1", str(ROWS))
            pool = database.engine.sync_engine.pool
            assert pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_fastapi_streaming_from_session_without_the_middleware_is_an_error(
    db: asyncgone.Database,
) -> None:
    """Without the middleware nothing can keep the dependency's session open for the body:
    a 500 saying what to do, never a 200 with a truncated body."""
    app = FastAPI(lifespan=ag_fastapi.lifespan(db))

    @app.get("/")
    async def endpoint(session: ag_fastapi.Session) -> StreamingResponse:
        result = await session.stream(text(f"SELECT seq FROM seq_1_to_{ROWS}"))
        return StreamingResponse(rows_of(result))

    async with in_process(app) as client:
        assert (await client.get("/")).status_code == 500


async def test_fastapi_dependency_rolls_back_on_http_exception(
    db: asyncgone.Database, disposable: Server
) -> None:
    """An HTTPException raised after a write reaches the dependency, which rolls back."""
    app = FastAPI(lifespan=ag_fastapi.lifespan(db))

    @app.post("/")
    async def endpoint(session: ag_fastapi.Session) -> dict[str, bool]:
        await session.execute(text("INSERT INTO marks VALUES (3)"))
        raise HTTPException(409, "conflict")

    async with in_process(app) as client:
        assert (await client.post("/")).status_code == 409
    assert marks(disposable) == []


async def test_fastapi_lost_commit_becomes_503(db: asyncgone.Database, disposable: Server) -> None:
    """The connection dies between the write and the return of the path operation: the
    dependency's commit fails, and the middleware answers 503 instead of the 201."""
    app = FastAPI(lifespan=ag_fastapi.lifespan(db))
    app.add_middleware(ag_fastapi.DatabaseMiddleware, db=db)

    @app.post("/", status_code=201)
    async def endpoint(session: ag_fastapi.Session) -> dict[str, bool]:
        await write_then_lose_the_connection(session, disposable, 6)
        return {"ok": True}

    async with in_process(app) as client:
        response = await client.post("/")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
    assert marks(disposable) == []


async def test_quart_error_status_rolls_back(db: asyncgone.Database, disposable: Server) -> None:
    """A view that writes and answers 409 has its write rolled back."""
    app = Quart(__name__)
    ag_quart.AsyncGone(app, db)

    @app.post("/")
    async def endpoint() -> tuple[dict[str, bool], int]:
        await ag_quart.session().execute(text("INSERT INTO marks VALUES (4)"))
        return {"ok": False}, 409

    async with in_process(app) as client:
        assert (await client.post("/")).status_code == 409
    assert marks(disposable) == []


async def test_quart_streaming_from_the_request_session_is_an_error(
    db: asyncgone.Database,
) -> None:
    """Quart ends the request's session before the body: a body streaming one of its
    results gets a 500 saying what to do, never a 200 with a truncated body; a second
    AsyncGone on the same app is refused (it would take over the first's sessions)."""
    app = Quart(__name__)
    ag_quart.AsyncGone(app, db)
    with pytest.raises(RuntimeError, match="already has an AsyncGone extension"):
        ag_quart.AsyncGone(app, asyncgone.Database(db.url))

    @app.get("/")
    async def endpoint() -> ResponseReturnValue:
        result = await ag_quart.session().stream(text(f"SELECT seq FROM seq_1_to_{ROWS}"))
        return rows_of(result), 200

    async with in_process(app) as client:
        assert (await client.get("/")).status_code == 500
        assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_quart_lost_commit_becomes_503(db: asyncgone.Database, disposable: Server) -> None:
    """The connection dies between the write and the response: the commit in after_request
    fails, and the client gets a 503, not Quart's 500 nor a success that did not happen."""
    app = Quart(__name__)
    ag_quart.AsyncGone(app, db)

    @app.post("/")
    async def endpoint() -> tuple[dict[str, bool], int]:
        await write_then_lose_the_connection(ag_quart.session(), disposable, 7)
        return {"ok": True}, 201

    async with in_process(app) as client:
        response = await client.post("/")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
    assert marks(disposable) == []


@pytest.mark.parametrize("moment", MOMENTS)
async def test_quart_on_unavailable_builds_the_response(
    db: asyncgone.Database, disposable: Server, moment: str
) -> None:
    """With on_unavailable=, a database lost in the view or at commit is answered with the
    application's own response, and the write is not applied."""

    async def maintenance(exc: BaseException) -> ResponseReturnValue:
        return custom_503_body(exc), 503, {"Retry-After": "60"}

    app = Quart(__name__)
    ag_quart.AsyncGone(app, db, on_unavailable=maintenance)

    @app.post("/")
    async def endpoint() -> tuple[dict[str, bool], int]:
        await write_then_lose_the_connection(
            ag_quart.session(), disposable, 8, then_query=moment == "in_the_handler"
        )
        return {"ok": True}, 201

    async with in_process(app) as client:
        response = await client.post("/")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "60"
        assert response.json() == {"detail": "down for maintenance", "unavailable": True}
    assert marks(disposable) == []


async def test_quart_session_without_extension_is_explained() -> None:
    """session() outside an app with the extension says what to do."""
    app = Quart(__name__)

    @app.get("/")
    async def endpoint() -> dict[str, bool]:
        ag_quart.session()
        return {}

    async with app.test_request_context("/"):
        with pytest.raises(RuntimeError, match="AsyncGone\\(app, db\\)"):
            ag_quart.session()


def test_script_example_runs_without_warnings(shared: Server) -> None:
    """examples/script.py, run as documented, prints and exits cleanly."""
    script = Path(__file__).parents[2] / "examples" / "script.py"
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        env={**os.environ, "DATABASE_URL": shared.url("asyncmy")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "2 rows written and read back in one transaction" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("cancel_on_disconnect", [True, False])
async def test_starlette_client_leaving_before_the_response(
    db: asyncgone.Database, disposable: Server, cancel_on_disconnect: bool
) -> None:
    """A client that hangs up while the endpoint works: by default the endpoint is cancelled
    and its write rolled back; with cancel_on_disconnect=False it runs to the end and its
    write is committed."""
    finished = anyio.Event()

    async def slow_write(request: Request) -> Response:
        session = ag_starlette.get_session(request)
        await session.execute(text("INSERT INTO marks VALUES (7)"))
        await anyio.sleep(0.5)  # the client leaves meanwhile
        finished.set()
        return JSONResponse({"ok": True})

    app = starlette_app(db, slow_write, cancel_on_disconnect=cancel_on_disconnect)
    async with lifespan_of(app):
        with anyio.fail_after(10):
            await app(HTTP_GET, *client_leaving_after(0.1))
    assert finished.is_set() is not cancel_on_disconnect
    assert marks(disposable) == ([] if cancel_on_disconnect else [7])


#: The ASGI scope of ``GET /`` over HTTP/1.1.
HTTP_GET: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [],
    "client": ("127.0.0.1", 1),
    "server": ("app", 80),
}


def client_leaving_after(seconds: float) -> tuple[Any, Any]:
    """ASGI ``receive`` and ``send`` of a client that sends its request, then hangs up
    after ``seconds``."""
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await anyio.sleep(seconds)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    return receive, send


@pytest.mark.parametrize("cancel_on_disconnect", [True, False])
async def test_quart_client_leaving_ends_the_tasks_the_request_started(
    db: asyncgone.Database, cancel_on_disconnect: bool
) -> None:
    """A client that hangs up while the view waits for a task it started, whose session
    runs a statement: by default that task is cancelled once Quart has cancelled the view;
    with cancel_on_disconnect=False it runs to the end."""
    app = Quart(__name__)
    ag_quart.AsyncGone(app, db, cancel_on_disconnect=cancel_on_disconnect)
    started: list[asyncio.Task[None]] = []

    async def sleep_in_a_session() -> None:
        async with db.session() as session:
            await session.execute(text("SELECT SLEEP(1)"))

    @app.get("/")
    async def endpoint() -> dict[str, bool]:
        started.append(asyncio.get_running_loop().create_task(sleep_in_a_session()))
        await asyncio.wait(started)  # the view's cancellation does not reach the task
        return {"ok": True}

    async with lifespan_of(app):
        with anyio.fail_after(10):
            await app(HTTP_GET, *client_leaving_after(0.2))
            [task] = started
            assert task.done() is cancel_on_disconnect
            await asyncio.wait(started)
        assert task.cancelled() is cancel_on_disconnect
        assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_quart_background_task_outlives_a_hang_up(db: asyncgone.Database) -> None:
    """A Quart background task (app.add_background_task) whose session runs a statement
    when the client hangs up is left to finish: Quart made it to outlive the request."""
    app = Quart(__name__)
    ag_quart.AsyncGone(app, db)
    outcome: list[int] = []

    async def sleep_in_a_session() -> None:
        async with db.session() as session:
            outcome.append((await session.execute(text("SELECT SLEEP(1)"))).scalar_one())

    @app.get("/")
    async def endpoint() -> dict[str, bool]:
        app.add_background_task(sleep_in_a_session)
        await asyncio.sleep(10)  # the client leaves meanwhile
        return {"ok": True}

    async with lifespan_of(app):
        with anyio.fail_after(10):
            await app(HTTP_GET, *client_leaving_after(0.2))
            [task] = app.background_tasks
            await asyncio.wait({task})
        assert outcome == [0]  # SLEEP() returns 1 when a KILL QUERY interrupts it
        assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_starlette_lifespan_state_and_readiness_from_the_app(
    db: asyncgone.Database,
) -> None:
    """lifespan() puts the Database on app.state (under state_key), readiness() without a
    Database finds it there, and the Database is closed when the app shuts down."""

    async def ok(request: Request) -> Response:
        return JSONResponse({"same": request.app.state.database is db})

    app = Starlette(
        routes=[Route("/", ok), Route("/ready", ag_starlette.readiness())],
        lifespan=ag_starlette.lifespan(db, state_key="database"),
    )
    async with in_process(app) as client:
        assert (await client.get("/")).json() == {"same": True}
        app.state.db = db  # readiness() without an argument reads app.state.db
        ready = await client.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["ok"] is True
    with pytest.raises(asyncgone.AsyncGoneError):
        db.engine  # noqa: B018  (closed with the app)
