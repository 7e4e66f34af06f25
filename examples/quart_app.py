"""A small notes service on Quart, kept alive by asyncgone.

    DATABASE_URL=mysql+asyncmy://root@127.0.0.1:3306/test hypercorn examples.quart_app:app

The same endpoints as examples/starlette_app.py.
"""

from __future__ import annotations

import os

from quart import Quart, request
from sqlalchemy import text

import asyncgone
from asyncgone.integrations.quart import AsyncGone, session

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS notes "
    "(id INT AUTO_INCREMENT PRIMARY KEY, text VARCHAR(100) NOT NULL)"
)
DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"


def create_app(db: asyncgone.Database | None = None) -> Quart:
    db = db or asyncgone.Database(os.environ.get("DATABASE_URL", DEFAULT_URL))
    app = Quart(__name__)
    extension = AsyncGone(app, db)  # starts and closes db with the app; sessions; 503s
    app.add_url_rule("/ready", view_func=extension.readiness)

    @app.before_serving
    async def create_schema() -> None:
        await db.run(lambda s: s.execute(text(SCHEMA)))

    @app.post("/notes")
    async def add_note() -> tuple[dict[str, int], int]:
        note = await request.get_json()
        result = await session().execute(
            text("INSERT INTO notes (text) VALUES (:text)"), {"text": note["text"]}
        )
        return {"id": result.lastrowid}, 201  # committed before the response is sent

    @app.post("/notes/batch")
    async def add_notes() -> tuple[dict[str, bool], int]:
        for note in await request.get_json():  # a note too long for its column fails the lot
            await session().execute(
                text("INSERT INTO notes (text) VALUES (:text)"), {"text": note["text"]}
            )
        return {"added": True}, 201

    @app.get("/notes/<int:note_id>")
    async def get_note(note_id: int) -> tuple[dict[str, object], int]:
        row = (
            await session().execute(
                text("SELECT id, text FROM notes WHERE id = :id"), {"id": note_id}
            )
        ).first()
        if row is None:
            return {"detail": "no such note"}, 404
        return {"id": row.id, "text": row.text}, 200

    @app.put("/notes/<int:note_id>")
    async def update_note(note_id: int) -> tuple[dict[str, object], int]:
        note = await request.get_json()
        result = await session().execute(
            text("UPDATE notes SET text = :text WHERE id = :id"),
            {"text": note["text"], "id": note_id},
        )
        if result.rowcount == 0:
            return {"detail": "no such note"}, 404
        return {"id": note_id, "text": note["text"]}, 200

    return app


app = create_app()
