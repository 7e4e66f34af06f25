"""A small notes service on FastAPI, kept alive by asyncgone.

    DATABASE_URL=mysql+asyncmy://root@127.0.0.1:3306/test uvicorn examples.fastapi_app:app

The same endpoints as examples/starlette_app.py. Sessions come from the ``Session``
dependency, committed when the path operation returns and before the response is sent.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import text

import asyncgone
from asyncgone.integrations.fastapi import DatabaseMiddleware, Session, lifespan, readiness

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS notes "
    "(id INT AUTO_INCREMENT PRIMARY KEY, text VARCHAR(100) NOT NULL)"
)
DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"


class Note(BaseModel):
    text: str


def create_app(db: asyncgone.Database | None = None) -> FastAPI:
    db = db or asyncgone.Database(os.environ.get("DATABASE_URL", DEFAULT_URL))

    @asynccontextmanager
    async def startup(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(db)(app):  # starts db, app.state.db = db, closes it at shutdown
            await db.run(lambda session: session.execute(text(SCHEMA)))
            yield

    app = FastAPI(lifespan=startup)
    # 503 for an unavailable database; the endpoint is cancelled if its client hangs up.
    app.add_middleware(DatabaseMiddleware, db=db)
    app.add_api_route("/ready", readiness(db))

    @app.post("/notes", status_code=201)
    async def add_note(note: Note, session: Session) -> dict[str, int]:
        result = await session.execute(
            text("INSERT INTO notes (text) VALUES (:text)"), {"text": note.text}
        )
        return {"id": result.lastrowid}

    @app.post("/notes/batch", status_code=201)
    async def add_notes(notes: list[Note], session: Session) -> dict[str, bool]:
        for note in notes:  # a note too long for its column fails the lot
            await session.execute(
                text("INSERT INTO notes (text) VALUES (:text)"), {"text": note.text}
            )
        return {"added": True}

    @app.get("/notes/{note_id}")
    async def get_note(note_id: int, session: Session) -> dict[str, object]:
        row = (
            await session.execute(
                text("SELECT id, text FROM notes WHERE id = :id"), {"id": note_id}
            )
        ).first()
        if row is None:
            raise HTTPException(404, "no such note")
        return {"id": row.id, "text": row.text}

    @app.put("/notes/{note_id}")
    async def update_note(note_id: int, note: Note, session: Session) -> dict[str, object]:
        result = await session.execute(
            text("UPDATE notes SET text = :text WHERE id = :id"), {"text": note.text, "id": note_id}
        )
        if result.rowcount == 0:
            raise HTTPException(404, "no such note")
        return {"id": note_id, "text": note.text}

    return app


app = create_app()
