"""Applications for the hang-up tests, served by a real ASGI server in a subprocess.

``uvicorn tests.integrations._hang_up_apps:starlette_app`` (or ``fastapi_app``,
``quart_app``; hypercorn alike), with ``$HANG_UP_URL`` naming the database and its driver.
Each app has a pool of 2 and the same routes; every statement carries the request's
``marker`` as a comment, so that a test can find it in ``information_schema.PROCESSLIST``:

- ``/export``: a streaming response whose body opens ``db.session()`` and streams rows;
- ``/count``: reads rows through ``db.session()`` and ``session.stream()``, sending
  nothing until it has read them all;
- ``/cursor``: reads rows through a server-side cursor on the request's own session;
- ``/background``: starts a task that runs ``SELECT SLEEP(30)`` in its own session, and
  waits for it without passing its own cancellation on (``asyncio.wait``);
- ``/status``: the pool's checked-out count, the rows read for a marker so far and the
  background tasks still running (no database work: it answers while the pool is busy).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from quart import Quart, Response, request
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncResult, AsyncSession
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import asyncgone
from asyncgone.integrations import fastapi as ag_fastapi
from asyncgone.integrations import quart as ag_quart
from asyncgone.integrations import starlette as ag_starlette

URL_ENV = "HANG_UP_URL"
DEFAULT_URL = "mysql+asyncmy://root@127.0.0.1:3306/test"
POOL_SIZE = 2
#: Seconds a request waits for a pool slot: a slot a hang-up failed to return shows soon.
POOL_TIMEOUT = 3
ROWS = 3_000_000
PARTITION = 200  # rows per chunk of the response (about 22 KB)
_MARKER = re.compile(r"hu_[0-9a-z]+")

#: Rows read so far, per marker.
rows_read: Counter[str] = Counter()
#: Background tasks started by /background that have not ended yet.
background: set[asyncio.Task[None]] = set()


def make_db() -> asyncgone.Database:
    return asyncgone.Database(
        os.environ.get(URL_ENV, DEFAULT_URL),
        pool_size=POOL_SIZE,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT,
    )


def marker_of(value: str | None) -> str:
    if value is None or not _MARKER.fullmatch(value):
        raise ValueError(f"not a marker: {value!r}")
    return value


def rows_statement(marker: str) -> TextClause:
    return text(f"SELECT /* {marker} */ seq, REPEAT('x', 100) AS pad FROM seq_1_to_{ROWS}")


async def chunks(result: AsyncResult[Any], marker: str) -> AsyncIterator[bytes]:
    """The result's rows as lines, counted in ``rows_read`` as they are read."""
    async for rows in result.partitions(PARTITION):
        rows_read[marker] += len(rows)
        yield b"".join(b"%d %s\n" % (row.seq, row.pad.encode()) for row in rows)


async def count_all(result: AsyncResult[Any], marker: str) -> int:
    """Read the whole result, counting its rows in ``rows_read``; return the count."""
    async for rows in result.partitions(PARTITION):
        rows_read[marker] += len(rows)
    return rows_read[marker]


async def export_body(db: asyncgone.Database, marker: str) -> AsyncIterator[bytes]:
    """(a) A streaming body with a session of its own."""
    async with db.session() as session:
        result = await session.stream(rows_statement(marker))
        async for chunk in chunks(result, marker):
            yield chunk


async def count(db: asyncgone.Database, marker: str) -> int:
    """(b) Rows read through ``session.stream()``, nothing sent until the end."""
    async with db.session() as session:
        return await count_all(await session.stream(rows_statement(marker)), marker)


async def cursor(session: AsyncSession, marker: str) -> int:
    """(c) Rows read through a server-side cursor on the request's own session."""
    conn = await session.connection()
    return await count_all(await conn.stream(rows_statement(marker)), marker)


async def sleep_in_session(db: asyncgone.Database, marker: str) -> None:
    async with db.session() as session:
        await session.execute(text(f"SELECT /* {marker} */ SLEEP(30)"))


async def run_in_background(db: asyncgone.Database, marker: str) -> int:
    """(d) Work the request started in a task of its own, and waits for."""
    task = asyncio.get_running_loop().create_task(sleep_in_session(db, marker))
    background.add(task)
    task.add_done_callback(background.discard)
    # Not `await task`: that would pass the request's cancellation on to the task itself.
    await asyncio.wait({task}, timeout=60)
    return 0


def status(db: asyncgone.Database, marker: str | None) -> dict[str, int]:
    return {
        "checked_out": db.engine.sync_engine.pool.checkedout(),  # type: ignore[attr-defined]
        "rows": rows_read[marker] if marker else 0,
        "tasks": len(background),
    }


# -- Starlette ---------------------------------------------------------------------------------


def create_starlette_app() -> Starlette:
    db = make_db()

    async def export(request: Request) -> StreamingResponse:
        marker = marker_of(request.query_params.get("marker"))
        return StreamingResponse(export_body(db, marker), media_type="text/plain")

    async def plain_count(request: Request) -> JSONResponse:
        marker = marker_of(request.query_params.get("marker"))
        return JSONResponse({"rows": await count(db, marker)})

    async def request_cursor(request: Request) -> JSONResponse:
        marker = marker_of(request.query_params.get("marker"))
        return JSONResponse({"rows": await cursor(ag_starlette.get_session(request), marker)})

    async def started_task(request: Request) -> JSONResponse:
        marker = marker_of(request.query_params.get("marker"))
        return JSONResponse({"rows": await run_in_background(db, marker)})

    async def pool(request: Request) -> JSONResponse:
        return JSONResponse(status(db, request.query_params.get("marker")))

    return Starlette(
        routes=[
            Route("/export", export),
            Route("/count", plain_count),
            Route("/cursor", request_cursor),
            Route("/background", started_task),
            Route("/status", pool),
        ],
        middleware=[Middleware(ag_starlette.DatabaseMiddleware, db=db)],
        lifespan=ag_starlette.lifespan(db),
    )


# -- FastAPI -----------------------------------------------------------------------------------


def create_fastapi_app() -> FastAPI:
    db = make_db()
    app = FastAPI(lifespan=ag_fastapi.lifespan(db))
    app.add_middleware(ag_fastapi.DatabaseMiddleware, db=db)

    @app.get("/export")
    async def export(marker: str) -> StreamingResponse:
        return StreamingResponse(export_body(db, marker_of(marker)), media_type="text/plain")

    @app.get("/count")
    async def plain_count(marker: str) -> dict[str, int]:
        return {"rows": await count(db, marker_of(marker))}

    @app.get("/cursor")
    async def request_cursor(marker: str, session: ag_fastapi.Session) -> dict[str, int]:
        return {"rows": await cursor(session, marker_of(marker))}

    @app.get("/background")
    async def started_task(marker: str) -> dict[str, int]:
        return {"rows": await run_in_background(db, marker_of(marker))}

    @app.get("/status")
    async def pool(marker: str | None = None) -> dict[str, int]:
        return status(db, marker)

    return app


# -- Quart -------------------------------------------------------------------------------------


def create_quart_app() -> Quart:
    db = make_db()
    app = Quart(__name__)
    ag_quart.AsyncGone(app, db)

    @app.get("/export")
    async def export() -> Response:
        marker = marker_of(request.args.get("marker"))
        return Response(export_body(db, marker), mimetype="text/plain")

    @app.get("/count")
    async def plain_count() -> dict[str, int]:
        return {"rows": await count(db, marker_of(request.args.get("marker")))}

    @app.get("/cursor")
    async def request_cursor() -> dict[str, int]:
        return {"rows": await cursor(ag_quart.session(), marker_of(request.args.get("marker")))}

    @app.get("/background")
    async def started_task() -> dict[str, int]:
        return {"rows": await run_in_background(db, marker_of(request.args.get("marker")))}

    @app.get("/status")
    async def pool() -> dict[str, int]:
        return status(db, request.args.get("marker"))

    return app


starlette_app = create_starlette_app()
fastapi_app = create_fastapi_app()
quart_app = create_quart_app()
