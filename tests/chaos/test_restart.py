"""Scenario 3: the server restarts (or crashes and comes back) under a warm pool."""

from __future__ import annotations

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import text

import asyncgone
from asyncgone.testing import MariaDBServer
from tests._support import Server, count_errors, warm

pytestmark = pytest.mark.anyio

POOL = 4


def crash_and_start(server: MariaDBServer) -> None:
    server.kill()
    server.start()


@pytest.mark.parametrize(
    "fault", [MariaDBServer.restart, crash_and_start], ids=["restart", "crash"]
)
async def test_warm_pool_survives_a_server_restart(
    disposable_server: MariaDBServer, disposable: Server, driver: str, fault: object
) -> None:
    """After a restart the next units of work see 0 errors and cost at most N reconnects."""
    engine = asyncgone.create_engine(disposable.url(driver), pool_size=POOL, max_overflow=0)

    async def unit() -> int:
        async with engine.begin() as conn:
            return int((await conn.execute(text("SELECT 1"))).scalar_one())

    try:
        await warm(engine, POOL)
        await anyio.to_thread.run_sync(fault, disposable_server)  # type: ignore[arg-type]
        with count_errors(engine) as errors:
            async with anyio.create_task_group() as tg:
                for _ in range(3 * POOL):
                    tg.start_soon(unit)
        assert errors == []
        stats = asyncgone.stats(engine)
        assert stats.replaced_total >= 1  # the fault did reach the pooled connections
        assert stats.connects - POOL <= POOL
    finally:
        await engine.dispose()
