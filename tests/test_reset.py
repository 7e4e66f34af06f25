"""Returning a connection: the ROLLBACK is skipped only when no transaction can be open.

Each test leaves a connection in some state, returns it to a pool of one, and checks on the
server (information_schema.INNODB_TRX) that no transaction survived into the pool, plus
whether asyncgone sent or skipped the ROLLBACK.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
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


async def driver_cursor_after_commit(conn: AsyncConnection) -> tuple[Any, Any]:
    """COMMIT through SQLAlchemy, then return the driver's connection and a cursor of its
    own, whose statements SQLAlchemy never sees."""
    await conn.execute(text("SELECT 1"))
    await conn.commit()
    raw = (await conn.get_raw_connection()).driver_connection
    cursor = raw.cursor()
    if asyncio.iscoroutine(cursor) or hasattr(cursor, "__await__"):
        cursor = await cursor
    return raw, cursor


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


# A statement, alone or with the parameters to send with it.
Step = str | tuple[str, tuple[Any, ...]]


async def through_the_pool(engine: AsyncEngine, *steps: Step) -> None:
    """Run ``steps`` on a pooled connection through the DBAPI alone, then return it.

    No SQLAlchemy ``Connection`` rolls back first, so asyncgone decides whether the return
    needs a ROLLBACK. ``"commit"`` is the driver's own commit(), as SQLAlchemy sends it; any
    other step is a statement. The first failing step's error propagates, after the return.
    """

    def use() -> None:
        raw = engine.sync_engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                for step in steps:
                    if step == "commit":
                        raw.commit()
                    elif isinstance(step, tuple):
                        cursor.execute(*step)
                    else:
                        cursor.execute(step)
            finally:
                cursor.close()
        finally:
            raw.close()

    await greenlet_spawn(use)


def integrity_error(engine: AsyncEngine) -> type[Exception]:
    """The DBAPI's IntegrityError, as a raw pooled connection raises it."""
    return engine.sync_engine.dialect.loaded_dbapi.IntegrityError  # type: ignore[no-any-return]


async def test_sqlalchemy_connection_commit_skips_the_rollback(
    engine: AsyncEngine, shared: Server
) -> None:
    """A Connection that commits and is closed with nothing run since: no ROLLBACK."""
    thread = await thread_of(engine)
    before = resets(engine)
    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO ag_reset VALUES (1)"))
        await conn.commit()
    assert resets(engine) == (before[0], before[1] + 1)
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == [1]


async def test_commit_by_hand_on_the_dbapi_connection_is_followed_by_a_rollback(
    engine: AsyncEngine, shared: Server
) -> None:
    """A COMMIT sent on the DBAPI connection, past SQLAlchemy: asyncgone did not see the
    transaction end, so the return rolls back (harmless, and never wrong)."""
    thread = await thread_of(engine)
    before = resets(engine)
    await through_the_pool(engine, "INSERT INTO ag_reset VALUES (1)", "commit")
    assert resets(engine) == (before[0] + 1, before[1])
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == [1]


async def test_sqlalchemy_connection_rolls_back_by_itself(
    engine: AsyncEngine, shared: Server
) -> None:
    """A Connection closed mid-transaction rolls back itself, and asyncgone adds no second
    ROLLBACK."""
    thread = await thread_of(engine)
    before = resets(engine)
    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO ag_reset VALUES (1)"))
    assert resets(engine) == before
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == []


async def test_statement_after_commit_is_rolled_back(engine: AsyncEngine, shared: Server) -> None:
    """A statement after COMMIT opens a new transaction, which is rolled back on return."""
    thread = await thread_of(engine)
    before = resets(engine)
    await through_the_pool(
        engine, "INSERT INTO ag_reset VALUES (1)", "commit", "INSERT INTO ag_reset VALUES (2)"
    )
    assert resets(engine) == (before[0] + 1, before[1])
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == [1]


async def test_released_savepoint_is_rolled_back_with_its_transaction(
    engine: AsyncEngine, shared: Server
) -> None:
    """Work inside a released savepoint belongs to the outer transaction: rolled back."""
    thread = await thread_of(engine)
    before = resets(engine)
    await through_the_pool(
        engine,
        "commit",
        "SAVEPOINT s",
        "INSERT INTO ag_reset VALUES (3)",
        "RELEASE SAVEPOINT s",
    )
    assert resets(engine) == (before[0] + 1, before[1])
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == []


async def test_error_mid_transaction_is_rolled_back(engine: AsyncEngine, shared: Server) -> None:
    """After a failing statement the transaction's earlier work is rolled back on return."""
    thread = await thread_of(engine)
    before = resets(engine)
    with pytest.raises(integrity_error(engine)):
        await through_the_pool(
            engine, "commit", "INSERT INTO ag_reset VALUES (4)", "INSERT INTO ag_reset VALUES (4)"
        )
    assert resets(engine) == (before[0] + 1, before[1])
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == []


async def test_ddl_then_statement_is_rolled_back(engine: AsyncEngine, shared: Server) -> None:
    """DDL commits implicitly; the statement after it is still rolled back on return."""
    thread = await thread_of(engine)
    before = resets(engine)
    await through_the_pool(
        engine,
        "CREATE TABLE IF NOT EXISTS ag_reset_ddl (id INT)",
        "INSERT INTO ag_reset VALUES (5)",
    )
    assert resets(engine) == (before[0] + 1, before[1])
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == []
    shared.query("DROP TABLE IF EXISTS ag_reset_ddl")


# Statements that fail after opening a transaction, with rows 8 and 9 present: the INSERT
# takes a shared lock on the duplicate row 9; the UPDATE locks row 8 before its new key
# collides with row 9. InnoDB keeps both locks until the transaction ends.
FAILING = {
    "duplicate insert": "INSERT INTO ag_reset VALUES (9)",
    "update that locked a row": "UPDATE ag_reset SET id = 9 WHERE id = 8",
}


def assert_rows_unlocked(server: Server) -> None:
    """Another session takes rows 8 and 9 at once: no transaction holds them any more."""
    server.query("SELECT id FROM ag_reset WHERE id IN (8, 9) FOR UPDATE NOWAIT")


@pytest.mark.parametrize("statement", list(FAILING.values()), ids=list(FAILING))
async def test_failed_statement_after_commit_is_rolled_back(
    engine: AsyncEngine, shared: Server, statement: str
) -> None:
    """A statement failing after COMMIT opened a transaction that the error reply does not
    show (the driver keeps COMMIT's status flags): it is rolled back on return."""
    shared.query("INSERT INTO ag_reset VALUES (8), (9)")
    thread = await thread_of(engine)
    before = resets(engine)
    with pytest.raises(integrity_error(engine)):
        await through_the_pool(engine, "commit", statement)
    assert resets(engine) == (before[0] + 1, before[1])
    assert open_transactions(shared, thread) == 0
    assert_rows_unlocked(shared)
    assert rows(shared) == [8, 9]


@pytest.mark.parametrize("statement", list(FAILING.values()), ids=list(FAILING))
async def test_failed_first_statement_on_a_raw_connection_is_rolled_back(
    engine: AsyncEngine, shared: Server, statement: str
) -> None:
    """raw_connection() whose only statement fails, on a connection last ended by a ROLLBACK:
    the transaction that statement opened is rolled back on return."""
    shared.query("INSERT INTO ag_reset VALUES (8), (9)")
    thread = await thread_of(engine)  # ends with SQLAlchemy's ROLLBACK: flags say "ended"
    before = resets(engine)
    with pytest.raises(integrity_error(engine)):
        await through_the_pool(engine, statement)
    assert resets(engine) == (before[0] + 1, before[1])
    assert open_transactions(shared, thread) == 0
    assert_rows_unlocked(shared)


@pytest.mark.parametrize("statement", list(FAILING.values()), ids=list(FAILING))
async def test_failed_raw_driver_statement_after_commit_is_rolled_back(
    engine: AsyncEngine, shared: Server, statement: str
) -> None:
    """A statement sent through the driver's own cursor after COMMIT fails: its transaction
    is rolled back on return."""
    shared.query("INSERT INTO ag_reset VALUES (8), (9)")
    thread = await thread_of(engine)
    before = resets(engine)
    async with engine.connect() as conn:
        raw, cursor = await driver_cursor_after_commit(conn)
        with pytest.raises(raw.IntegrityError):
            await cursor.execute(statement)
        await cursor.close()
    assert resets(engine) == (before[0] + 1, before[1])
    assert open_transactions(shared, thread) == 0
    assert_rows_unlocked(shared)


def asyncmy_caches_statements() -> bool:
    """Tell whether the installed asyncmy has its prepared-statement cache (newer releases)."""
    from asyncmy.connection import Connection

    return "stmt_cache_size" in inspect.signature(Connection.__init__).parameters


@pytest.mark.skipif(
    not asyncmy_caches_statements(), reason="this asyncmy release has no statement cache"
)
async def test_failed_prepared_statement_after_commit_is_rolled_back(shared: Server) -> None:
    """asyncmy's prepared-statement cache, which can bypass the driver's command path: a
    prepared statement failing after COMMIT is rolled back on return."""
    engine = asyncgone.create_engine(
        shared.url("asyncmy", stmt_cache_size="8"), pool_size=1, max_overflow=0
    )
    update = "UPDATE ag_reset SET id = %s WHERE id = %s"

    def cached() -> bool:
        raw = engine.sync_engine.raw_connection()
        try:
            return update in raw.driver_connection._stmt_cache
        finally:
            raw.close()

    try:
        shared.query("CREATE TABLE IF NOT EXISTS ag_reset (id INT PRIMARY KEY)")
        shared.query("DELETE FROM ag_reset")
        shared.query("INSERT INTO ag_reset VALUES (8), (9)")
        thread = await thread_of(engine)
        # Twice: the first run prepares the statement, the second executes the cached one.
        for _ in range(2):
            before = resets(engine)
            with pytest.raises(integrity_error(engine)):
                await through_the_pool(engine, "commit", (update, (9, 8)))
            assert resets(engine) == (before[0] + 1, before[1])
            assert open_transactions(shared, thread) == 0
            assert_rows_unlocked(shared)
        assert await greenlet_spawn(cached)
    finally:
        await engine.dispose()


async def test_connection_from_the_application_creator_skips_the_rollback_too(
    shared: Server, url: str, driver: str
) -> None:
    """A connection from the application's own async_creator is counted like asyncgone's
    own: after a session's COMMIT or ROLLBACK its return sends nothing."""
    if driver == "aiomysql":
        from aiomysql import connect
    else:
        from asyncmy import connect

    async def creator() -> Any:
        return await connect(
            host=shared.host,
            port=shared.port,
            user=shared.user,
            password=shared.password,
            db=shared.database,
        )

    engine = asyncgone.create_engine(url, async_creator=creator, pool_size=1)
    try:
        for _ in range(3):
            async with asyncgone.managed_session(engine) as session:
                await session.execute(text("SELECT 1"))
        assert resets(engine) == (0, 3)
    finally:
        await engine.dispose()


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
        _, cursor = await driver_cursor_after_commit(conn)
        await cursor.execute(statement)
        await cursor.fetchall()
        await cursor.close()
    assert resets(engine) == (before[0] + 1, before[1])
    assert open_transactions(shared, thread) == 0
    assert rows(shared) == [9]
    # The row lock of FOR UPDATE is gone: another session takes it without waiting.
    shared.query("SELECT id FROM ag_reset WHERE id = 9 FOR UPDATE NOWAIT")


async def test_raw_pool_connection_is_rolled_back(engine: AsyncEngine, shared: Server) -> None:
    """A pooled connection used without SQLAlchemy's Connection at all is rolled back."""
    thread = await thread_of(engine)
    before = resets(engine)
    await through_the_pool(engine, "INSERT INTO ag_reset VALUES (7)")
    assert resets(engine) == (before[0] + 1, before[1])
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


@pytest.mark.parametrize(
    ("given", "expected"), [("rollback", (3, 0)), ("commit", (3, 0)), (None, (0, 0))]
)
async def test_user_chosen_reset_is_respected(
    url: str, given: str | None, expected: tuple[int, int]
) -> None:
    """pool_reset_on_return keeps SQLAlchemy's meaning: "rollback" rolls back every return
    (nothing skipped), "commit" commits, None sends nothing; asyncgone sends them, bounded."""
    engine = asyncgone.create_engine(url, pool_size=1, pool_reset_on_return=given)
    try:
        for _ in range(3):
            async with asyncgone.managed_session(engine) as session:
                await session.execute(text("SELECT 1"))
        assert resets(engine) == expected
    finally:
        await engine.dispose()


async def test_commit_on_return_commits_what_was_left_open(url: str, shared: Server) -> None:
    """With pool_reset_on_return="commit", work left open on a returned connection is
    committed, as SQLAlchemy documents."""
    engine = asyncgone.create_engine(url, pool_size=1, pool_reset_on_return="commit")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE IF NOT EXISTS ag_reset (id INT PRIMARY KEY)"))
            await conn.execute(text("DELETE FROM ag_reset"))
        await through_the_pool(engine, "INSERT INTO ag_reset VALUES (5)")
        assert rows(shared) == [5]
    finally:
        await engine.dispose()


async def test_a_misspelt_reset_is_refused(url: str) -> None:
    """An unknown pool_reset_on_return value is refused before anything connects."""
    with pytest.raises(asyncgone.ConfigurationError, match="pool_reset_on_return"):
        asyncgone.create_engine(url, pool_reset_on_return="rollbak")


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


async def test_the_drivers_cursor_answers_as_before_however_it_is_called(
    engine: AsyncEngine, driver: str
) -> None:
    """The counting ``cursor()`` gives what the driver's own gives, with no argument, a
    cursor class, or (asyncmy's form) a keyword, raises its errors, and counts each call."""
    dict_cursor: Any = (
        __import__("aiomysql").DictCursor
        if driver == "aiomysql"
        else __import__("asyncmy.cursors", fromlist=["DictCursor"]).DictCursor
    )
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        counts = raw.cursor.counts
        before = counts.count
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [((), {}), ((dict_cursor,), {})]
        if driver == "asyncmy":  # cursor(self, cursor=None)
            calls += [((), {"cursor": dict_cursor}), ((None,), {})]
        else:  # cursor(self, *cursors): a mixin list
            calls.append(((dict_cursor, __import__("aiomysql").Cursor), {}))
        for args, kwargs in calls:
            cursor = raw.cursor(*args, **kwargs)
            if inspect.isawaitable(cursor):
                cursor = await cursor
            await cursor.execute("SELECT 7 AS seven")
            row = await cursor.fetchone()
            as_dict = kwargs or (args and args[0] is not None)
            assert row == ({"seven": 7} if as_dict else (7,))
            await cursor.close()
        with pytest.raises(TypeError):
            raw.cursor(no_such_argument=1)
        assert counts.count == before + len(calls) + 1


@pytest.mark.parametrize("skip", [False, True])
async def test_skip_autocommit_rollback_is_kept(url: str, skip: bool) -> None:
    """Under AUTOCOMMIT, ``skip_autocommit_rollback=True`` keeps a Connection's rollbacks
    from reaching the server, as on plain SQLAlchemy; without it each one does."""
    sent = []
    for make in (create_async_engine, asyncgone.create_engine):
        engine = make(url, isolation_level="AUTOCOMMIT", skip_autocommit_rollback=skip)
        try:
            async with engine.connect() as conn:
                status = text("SHOW SESSION STATUS LIKE 'Com_rollback'")
                before = int((await conn.execute(status)).one()[1])
                for _ in range(3):
                    await conn.execute(text("SELECT 1"))
                    await conn.rollback()
                sent.append(int((await conn.execute(status)).one()[1]) - before)
        finally:
            await engine.dispose()
    assert sent == ([0, 0] if skip else [3, 3])
