"""A small notes service on Starlette, kept alive by asyncgone.

DATABASE_URL=mysql+asyncmy://root@127.0.0.1:3306/test uvicorn examples.starlette_app:app

POST /notes        {"text": "..."}              -> 201 {"id": n}
POST /notes/batch  [{"text": "..."}, ...]       -> 201, all or nothing
GET  /notes/{id}                                -> 200 {"id": n, "text": "..."} or 404
PUT  /notes/{id}   {"text": "..."}              -> 200 or 404
GET  /ready                                     -> 200, or 503 while the database is down
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import asyncgone
from asyncgone.integrations.starlette import DatabaseMiddleware, get_session, lifespan, readiness

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS notes "
    "(id INT AUTO_INCREMENT PRIMARY KEY, text VARCHAR(100) NOT NULL)"
)
DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"


async def add_note(request: Request) -> JSONResponse:
    note = await request.json()
    result = await get_session(request).execute(
        text("INSERT INTO notes (text) VALUES (:text)"), {"text": note["text"]}
    )
    return JSONResponse({"id": result.lastrowid}, status_code=201)  # committed before this


async def add_notes(request: Request) -> JSONResponse:
    session = get_session(request)
    for note in await request.json():  # a note too long for its column fails the lot
        await session.execute(
            text("INSERT INTO notes (text) VALUES (:text)"), {"text": note["text"]}
        )
    return JSONResponse({"added": True}, status_code=201)


async def get_note(request: Request) -> JSONResponse:
    row = (
        await get_session(request).execute(
            text("SELECT id, text FROM notes WHERE id = :id"), {"id": request.path_params["id"]}
        )
    ).first()
    if row is None:
        return JSONResponse({"detail": "no such note"}, status_code=404)
    return JSONResponse({"id": row.id, "text": row.text})


async def update_note(request: Request) -> JSONResponse:
    note = await request.json()
    result = await get_session(request).execute(
        text("UPDATE notes SET text = :text WHERE id = :id"),
        {"text": note["text"], "id": request.path_params["id"]},
    )
    if result.rowcount == 0:
        return JSONResponse({"detail": "no such note"}, status_code=404)
    return JSONResponse({"id": request.path_params["id"], "text": note["text"]})


def create_app(db: asyncgone.Database | None = None) -> Starlette:
    db = db or asyncgone.Database(os.environ.get("DATABASE_URL", DEFAULT_URL))

    @asynccontextmanager
    async def startup(app: Starlette) -> AsyncIterator[None]:
        async with lifespan(db)(app):  # starts db, app.state.db = db, closes it at shutdown
            await db.run(lambda session: session.execute(text(SCHEMA)))
            yield

    routes = [
        Route("/notes", add_note, methods=["POST"]),
        Route("/notes/batch", add_notes, methods=["POST"]),
        Route("/notes/{id:int}", get_note, methods=["GET"]),
        Route("/notes/{id:int}", update_note, methods=["PUT"]),
        Route("/ready", readiness(db)),
    ]
    return Starlette(
        routes=routes, middleware=[Middleware(DatabaseMiddleware, db=db)], lifespan=startup
    )


app = create_app()
