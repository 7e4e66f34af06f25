"""Returning a connection: the ROLLBACK is skipped only when no transaction can be open.

Each test leaves a connection in some state, returns it to a pool of one, and checks on the
server (information_schema.INNODB_TRX) that no transaction survived into the pool, plus
whether asyncgone sent or skipped the ROLLBACK.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

import asyncgone
from tests._support import Server

pytestmark = pytest.mark.anyio


@pytest.fixture
async def engine(url: str) -> AsyncIterator[AsyncEngine]:
    engine = asyncgone.create_engine(url, pool_size=1, max_overflow=0)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS ag_reset (id INT PRIMARY KEY)"))
        await conn.execute(text("DELETE FROM ag_reset"))
    yield engine
    await engine.dispose()


async def thread_of(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT CONNECTION_ID()"))).scalar_one())


def open_transactions(server: Server, thread: int) -> int:
    [(n,)] = server.query(
        f"SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = {thread}"
    )
    return int(n)


def rows(server: Server) -> list[int]:
    return [int(r[0]) for r in server.query("SELECT id FROM ag_reset ORDER BY id")]


def resets(engine: AsyncEngine) -> tuple[int, int]:
    stats = asyncgone.stats(engine)
    return stats.resets, stats.resets_skipped


async def test_commit_then_return_skips_the_rollback(engine: AsyncEngine, shared: Server) -> None:
    """INSERT + COMMIT: nothing is open afterwards, so no ROLLBACK is sent."""
    thread = await thread_of(engine)
    before = resets(engine)
    async with asyncgone.managed_session(engine) as session:
        await session.execute(text("INSERT INTO ag_reset VALUES (1)"))
    assert resets(engine) == (before[0], before[1] + 1)
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == [1]


async def test_statement_after_commit_is_rolled_back(engine: AsyncEngine, shared: Server) -> None:
    """A statement after COMMIT opens a new transaction, which is rolled back on return."""
    thread = await thread_of(engine)
    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO ag_reset VALUES (1)"))
        await conn.commit()
        await conn.execute(text("INSERT INTO ag_reset VALUES (2)"))
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == [1]


async def test_released_savepoint_is_rolled_back_with_its_transaction(
    engine: AsyncEngine, shared: Server
) -> None:
    """Work inside a released savepoint belongs to the outer transaction: rolled back."""
    thread = await thread_of(engine)
    async with engine.connect() as conn:
        await conn.begin()
        async with conn.begin_nested():
            await conn.execute(text("INSERT INTO ag_reset VALUES (3)"))
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == []


async def test_error_mid_transaction_is_rolled_back(engine: AsyncEngine, shared: Server) -> None:
    """After a failing statement the transaction's earlier work is rolled back on return."""
    thread = await thread_of(engine)
    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO ag_reset VALUES (4)"))
        with pytest.raises(sa_exc.IntegrityError):
            await conn.execute(text("INSERT INTO ag_reset VALUES (4)"))
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == []


async def test_ddl_then_statement_is_rolled_back(engine: AsyncEngine, shared: Server) -> None:
    """DDL commits implicitly; the statement after it is still rolled back on return."""
    thread = await thread_of(engine)
    async with engine.connect() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS ag_reset_ddl (id INT)"))
        await conn.execute(text("INSERT INTO ag_reset VALUES (5)"))
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == []
    shared.query("DROP TABLE IF EXISTS ag_reset_ddl")


@pytest.mark.parametrize(
    "statement", ["INSERT INTO ag_reset VALUES (6)", "SELECT id FROM ag_reset FOR UPDATE"]
)
async def test_raw_driver_use_after_commit_is_rolled_back(
    engine: AsyncEngine, shared: Server, statement: str
) -> None:
    """Statements sent straight through the driver, unseen by SQLAlchemy, are rolled back
    (a write, and a locking read whose result packet aiomysql does not track)."""
    shared.query("INSERT IGNORE INTO ag_reset VALUES (9)")
    thread = await thread_of(engine)
    before = resets(engine)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        await conn.commit()
        raw = (await conn.get_raw_connection()).driver_connection
        cursor = raw.cursor()
        if asyncio.iscoroutine(cursor) or hasattr(cursor, "__await__"):
            cursor = await cursor
        await cursor.execute(statement)
        await cursor.fetchall()
        await cursor.close()
    assert resets(engine)[0] == before[0] + 1
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == [9]
    # The row lock of FOR UPDATE is gone: another session takes it without waiting.
    shared.query("SELECT id FROM ag_reset WHERE id = 9 FOR UPDATE NOWAIT")


async def test_raw_pool_connection_is_rolled_back(engine: AsyncEngine, shared: Server) -> None:
    """A pooled connection used without SQLAlchemy's Connection at all is rolled back."""
    thread = await thread_of(engine)

    def use_the_pool_directly() -> None:
        raw = engine.sync_engine.raw_connection()
        cursor = raw.cursor()
        cursor.execute("INSERT INTO ag_reset VALUES (7)")
        cursor.close()
        raw.close()

    await greenlet_spawn(use_the_pool_directly)
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == []


async def test_cancelled_statement_discards_the_connection(
    engine: AsyncEngine, shared: Server
) -> None:
    """A cancellation mid-transaction discards the connection; its transaction ends with it."""
    thread = await thread_of(engine)
    with pytest.raises(asyncio.TimeoutError):
        async with asyncgone.managed_session(engine) as session:
            await session.execute(text("INSERT INTO ag_reset VALUES (8)"))
            await asyncio.wait_for(session.execute(text("SELECT SLEEP(5)")), 0.2)
    assert await thread_of(engine) != thread
    assert rows(shared) == []


async def test_user_chosen_reset_is_respected(url: str) -> None:
    """With pool_reset_on_return given, SQLAlchemy's own reset runs and asyncgone skips none."""
    engine = asyncgone.create_engine(url, pool_size=1, pool_reset_on_return="rollback")
    try:
        for _ in range(3):
            async with asyncgone.managed_session(engine) as session:
                await session.execute(text("SELECT 1"))
        assert resets(engine) == (0, 0)
    finally:
        await engine.dispose()


async def test_idle_time_counts_from_the_last_statement(url: str) -> None:
    """A connection held after its last statement counts that time as idle: with the ROLLBACK
    skipped, nothing told the server it was alive, so its idle limit still applies."""
    engine = asyncgone.create_engine(url, pool_size=1, recycle=0.5)
    try:
        async with engine.connect() as conn:
            first = (await conn.execute(text("SELECT CONNECTION_ID()"))).scalar_one()
            await conn.commit()
            await asyncio.sleep(0.7)  # held, silent
        assert await thread_of(engine) != first
        assert asyncgone.stats(engine).replaced == {"idle_limit": 1}
    finally:
        await engine.dispose()
