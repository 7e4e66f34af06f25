"""Integrations route a request's session by method: with ``read_only_methods``, GET goes
to a replica of a ``Database(replicas=...)``, POST to the primary (real replication)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from quart import Quart
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import asyncgone
from asyncgone.integrations import fastapi as ag_fastapi
from asyncgone.integrations import quart as ag_quart
from asyncgone.integrations import starlette as ag_starlette
from asyncgone.testing import ReplicationTopology
from tests.integrations._apps import in_process

pytestmark = [pytest.mark.anyio, pytest.mark.topology]

PORT = text("SELECT @@port")


def starlette_app(db: asyncgone.Database) -> Any:
    async def where(request: Request) -> JSONResponse:
        session = ag_starlette.get_session(request)
        return JSONResponse({"port": (await session.execute(PORT)).scalar_one()})

    return Starlette(
        routes=[Route("/where", where, methods=["GET", "POST"])],
        middleware=[
            Middleware(
                ag_starlette.DatabaseMiddleware,
                db=db,
                read_only_methods=ag_starlette.SAFE_METHODS,
            )
        ],
        lifespan=ag_starlette.lifespan(db),
    )


def fastapi_app(db: asyncgone.Database) -> Any:
    app = FastAPI(lifespan=ag_fastapi.lifespan(db))

    @app.get("/where")
    async def read(session: ag_fastapi.ReadSession) -> dict[str, int]:
        return {"port": (await session.execute(PORT)).scalar_one()}

    @app.post("/where")
    async def write(session: ag_fastapi.Session) -> dict[str, int]:
        return {"port": (await session.execute(PORT)).scalar_one()}

    return app


def quart_app(db: asyncgone.Database) -> Any:
    app = Quart(__name__)
    ag_quart.AsyncGone(app, db, read_only_methods={"GET"})

    @app.route("/where", methods=["GET", "POST"])
    async def where() -> dict[str, int]:
        return {"port": (await ag_quart.session().execute(PORT)).scalar_one()}

    return app


@pytest.mark.parametrize("make", [starlette_app, fastapi_app, quart_app])
async def test_safe_methods_read_from_replicas(
    asyncgone_replication: ReplicationTopology, make: Any
) -> None:
    """GET requests' sessions go to a replica, POST requests' to the primary."""
    topology = asyncgone_replication
    db = asyncgone.Database(
        topology.url("asyncmy", role="primary"), replicas=topology.url("asyncmy", role="replicas")
    )
    async with in_process(make(db)) as client:
        got = await client.get("/where")
        posted = await client.post("/where")
    assert got.status_code == 200, got.text
    assert posted.status_code == 200, posted.text
    assert got.json()["port"] in {r.port for r in topology.replicas}
    assert posted.json()["port"] == topology.primary.port


async def test_a_request_reads_its_own_write_through_the_starlette_session(
    asyncgone_replication: ReplicationTopology,
) -> None:
    """A GET handler that writes (run()) and then reads through the request's read_only
    session, which the middleware opens with ``SessionScope.open()``: the session waits for
    the write's GTID (every replica lags, unnoticed by a monitor that checks once a
    minute), so it reads from the primary and sees the write."""
    topology = asyncgone_replication
    topology.primary.query("CREATE TABLE test.seen (id INT PRIMARY KEY)")
    db = asyncgone.Database(
        topology.url("asyncmy", role="primary"),
        replicas=topology.url("asyncmy", role="replicas"),
        replica_check_interval=60.0,
        causal_reads_timeout=0.3,
    )

    async def write_then_read(request: Request) -> JSONResponse:
        async def write(session: Any) -> None:
            await session.execute(text("INSERT INTO seen VALUES (1)"))

        await db.run(write)
        session = ag_starlette.get_session(request)
        found = await session.execute(text("SELECT COUNT(*) FROM seen"))
        port = (await session.execute(PORT)).scalar_one()
        return JSONResponse({"count": found.scalar_one(), "port": port})

    app = Starlette(
        routes=[Route("/ryw", write_then_read, methods=["GET"])],
        middleware=[
            Middleware(
                ag_starlette.DatabaseMiddleware, db=db, read_only_methods=ag_starlette.SAFE_METHODS
            )
        ],
        lifespan=ag_starlette.lifespan(db),
    )
    async with in_process(app) as client:
        lags = [topology.lag(replica) for replica in topology.replicas]
        for lag in lags:
            lag.__enter__()
        try:
            got = await client.get("/ryw")
        finally:
            for lag in lags:
                lag.__exit__(None, None, None)
    assert got.status_code == 200, got.text
    assert got.json() == {"count": 1, "port": topology.primary.port}
