"""Scenario 6: steady state costs no extra round trip; a dead connection costs no failed query.

Counted from the disposable server's own status counters: nothing else talks to it.
"""

from __future__ import annotations

import contextlib

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import asyncgone
from tests._support import Server, count_errors, delta, wait_until, warm

pytestmark = pytest.mark.anyio

UNITS = 60
POOL = 4


async def run_units(engine: AsyncEngine) -> None:
    async def unit() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    for _ in range(UNITS // POOL):
        async with anyio.create_task_group() as tg:
            for _ in range(POOL):
                tg.start_soon(unit)


async def test_warm_pool_sends_no_ping(disposable: Server, driver: str) -> None:
    """A busy warm pool: no COM_PING, no reconnect, only the statements the units run."""
    engine = asyncgone.create_engine(disposable.url(driver), pool_size=POOL)
    try:
        await warm(engine, POOL)
        before = disposable.status()
        await run_units(engine)
        counts = delta(before, disposable.status())
        assert counts["Com_admin_commands"] == 0
        assert counts["Connections"] == 0
        # SELECT, then the ROLLBACK that ends its snapshot when the connection is closed.
        assert counts["Questions"] == 2 * UNITS
    finally:
        await engine.dispose()


async def test_pre_ping_sends_one_ping_per_checkout(disposable: Server, driver: str) -> None:
    """Control: SQLAlchemy's pre-ping pays a COM_PING on every checkout."""
    engine = create_async_engine(disposable.url(driver), pool_size=POOL, pool_pre_ping=True)
    try:
        await warm(engine, POOL)
        before = disposable.status()
        await run_units(engine)
        assert delta(before, disposable.status())["Com_admin_commands"] == UNITS
    finally:
        await engine.dispose()


async def test_checkout_after_an_idle_kill_costs_no_failed_query(
    disposable: Server, driver: str
) -> None:
    """The killed connection is recognised from its socket: no statement is tried on it."""
    engine = asyncgone.create_engine(disposable.url(driver), pool_size=1)
    try:
        [thread] = await warm(engine, 1)
        disposable.kill(thread)
        await wait_until(lambda: thread not in disposable.threads())
        before = disposable.status()
        with count_errors(engine) as errors:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        counts = delta(before, disposable.status())
        assert errors == []
        assert counts["Com_admin_commands"] == 0
        assert counts["Connections"] == 1
        assert asyncgone.stats(engine).replaced == {"closed_by_server": 1}
    finally:
        await engine.dispose()


async def session_write(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await session.execute(text("INSERT INTO ag_trips (v) VALUES (1)"))


async def session_read(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session:
        await session.execute(text("SELECT v FROM ag_trips WHERE id = 1"))


async def connection_read(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT v FROM ag_trips WHERE id = 1"))


UNITS_OF_WORK = {
    "session write": session_write,
    "session read": session_read,
    "connection read": connection_read,
}

# Server commands per unit (Questions + COM_PING), by engine kind. A write needs INSERT and
# COMMIT; a read needs its SELECT and the ROLLBACK that ends its snapshot. SQLAlchemy's pool
# adds a ROLLBACK whenever the transaction was ended before the connection was returned
# (after a session's COMMIT, or its own ROLLBACK); pre-ping adds a COM_PING per checkout.
EXPECTED = {
    "asyncgone": {"session write": 2, "session read": 2, "connection read": 2},
    "asyncgone+keepalive": {"session write": 2, "session read": 2, "connection read": 2},
    "sqlalchemy": {"session write": 3, "session read": 3, "connection read": 2},
    "sqlalchemy pre-ping": {"session write": 4, "session read": 4, "connection read": 3},
}


@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("unit", list(UNITS_OF_WORK))
async def test_commands_per_unit_of_work(
    disposable: Server, driver: str, kind: str, unit: str
) -> None:
    """Scenario 5: asyncgone sends exactly the statements a unit needs (a session write is
    INSERT + COMMIT = 2), where SQLAlchemy adds a ROLLBACK and pre-ping adds a COM_PING."""
    url = disposable.url(driver)
    if kind.startswith("asyncgone"):
        engine = asyncgone.create_engine(url, pool_size=POOL)
    else:
        engine = create_async_engine(url, pool_size=POOL, pool_pre_ping=kind.endswith("pre-ping"))
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS ag_trips (id INT AUTO_INCREMENT PRIMARY KEY, v INT)"
                )
            )
            await conn.execute(text("INSERT INTO ag_trips (v) VALUES (0)"))
        await warm(engine, POOL)
        work = UNITS_OF_WORK[unit]
        async with contextlib.AsyncExitStack() as stack:
            if kind.endswith("keepalive"):
                await stack.enter_async_context(asyncgone.keepalive(engine))
            before = disposable.status()
            for _ in range(UNITS):
                await work(engine)
            counts = delta(before, disposable.status())
        per_unit = (counts["Questions"] + counts["Com_admin_commands"]) / UNITS
        assert per_unit == EXPECTED[kind][unit]
        assert counts["Connections"] == 0
    finally:
        await engine.dispose()
