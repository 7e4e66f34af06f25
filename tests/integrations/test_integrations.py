"""Behaviour of the integrations beyond the example apps: error statuses roll back, a lost
commit becomes an error response, and misuse is explained."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio.to_thread
import pytest
from fastapi import FastAPI, HTTPException
from quart import Quart
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import asyncgone
from asyncgone.integrations import fastapi as ag_fastapi
from asyncgone.integrations import quart as ag_quart
from asyncgone.integrations import starlette as ag_starlette
from tests._support import Server
from tests.integrations._apps import in_process

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


def starlette_app(db: asyncgone.Database, endpoint: object) -> Starlette:
    return Starlette(
        routes=[Route("/", endpoint)],  # type: ignore[arg-type]
        middleware=[Middleware(ag_starlette.DatabaseMiddleware, db=db)],
        lifespan=ag_starlette.lifespan(db),
    )


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
        session = ag_starlette.get_session(request)
        await session.execute(text("INSERT INTO marks VALUES (2)"))
        thread = (await session.execute(text("SELECT CONNECTION_ID()"))).scalar_one()
        await anyio.to_thread.run_sync(disposable.kill, thread)
        return JSONResponse({"ok": True}, status_code=201)

    async with in_process(starlette_app(db, endpoint)) as client:
        response = await client.get("/")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
    assert marks(disposable) == []


def test_get_session_without_middleware_is_explained() -> None:
    """Asking for a session without the middleware says what to add."""
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    with pytest.raises(RuntimeError, match="add Middleware\\(DatabaseMiddleware, db=db\\)"):
        ag_starlette.get_session(request)


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
