"""Issue scenarios 1-4 and 6: sessions and run() against killed connections, lost COMMITs,
deadlocks and a server that goes away for a while."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import asyncgone
from asyncgone import CommitOutcomeUnknown, Database, DatabaseUnavailable
from asyncgone.testing import FaultProxy, MariaDBServer
from tests._support import Server, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
async def table(url: str) -> AsyncIterator[str]:
    """A fresh table for this test's rows, on the shared server."""
    name = "ag_uow"
    async with asyncgone.managed_session(url) as session:
        await session.execute(text(f"DROP TABLE IF EXISTS {name}"))
        await session.execute(text(f"CREATE TABLE {name} (id INT PRIMARY KEY, v INT)"))
    yield name
    async with asyncgone.managed_session(url) as session:
        await session.execute(text(f"DROP TABLE IF EXISTS {name}"))


def rows(shared: Server, table: str) -> list[tuple[int, int]]:
    return [(int(i), int(v)) for i, v in shared.query(f"SELECT id, v FROM {table} ORDER BY id")]


async def test_kill_mid_transaction_raises_the_original_error(
    url: str, shared: Server, table: str
) -> None:
    """Scenario 1: the caller sees the driver's OperationalError; nothing stays checked out."""
    engine = asyncgone.create_engine(url)
    try:
        with pytest.raises(sa_exc.OperationalError) as info:
            async with asyncgone.managed_session(engine) as session:
                await session.execute(text(f"INSERT INTO {table} VALUES (1, 1)"))
                thread = (await session.execute(text("SELECT CONNECTION_ID()"))).scalar_one()
                await anyio.to_thread.run_sync(shared.kill, thread)
                await session.execute(text(f"INSERT INTO {table} VALUES (2, 2)"))
        assert asyncgone.is_disconnect(info.value)
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        async with asyncgone.managed_session(engine) as session:
            await session.execute(text(f"INSERT INTO {table} VALUES (3, 3)"))
        assert rows(shared, table) == [(3, 3)]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("moment", ["idle before COMMIT", "during a statement"])
async def test_run_replays_work_killed_before_commit(
    url: str, shared: Server, table: str, moment: str
) -> None:
    """Scenario 2: a unit killed before COMMIT was sent runs again and lands exactly once."""
    calls = 0

    async def work(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.execute(text(f"INSERT INTO {table} VALUES (1, :n)"), {"n": calls})
        if calls == 1:
            thread = (await session.execute(text("SELECT CONNECTION_ID()"))).scalar_one()
            await anyio.to_thread.run_sync(shared.kill, thread)
            if moment == "during a statement":
                await session.execute(text("SELECT 1"))

    async with Database(url) as db:
        await db.run(work)
        assert calls == 2
        assert db.stats().replays == 1
    assert rows(shared, table) == [(1, 2)]


@pytest.mark.parametrize("deliver", [False, True], ids=["cut-before-server", "cut-after-server"])
async def test_connection_lost_during_commit_is_never_replayed(
    url: str, shared: Server, table: str, deliver: bool
) -> None:
    """Scenario 3: COMMIT in flight when the connection is cut: CommitOutcomeUnknown, one call,
    and the database shows what really happened (committed only if the server got it)."""
    calls = 0

    async def work(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.execute(text(f"INSERT INTO {table} VALUES (7, 7)"))

    with FaultProxy.for_url(url) as proxy:
        async with Database(proxy.url) as db:
            proxy.cut_on(b"COMMIT", deliver=deliver)
            with pytest.raises(
                CommitOutcomeUnknown, match="may or may not have been committed"
            ) as info:
                await db.run(work)
            assert calls == 1
            assert proxy.tripped == 1
            assert asyncgone.is_disconnect(info.value.__cause__)  # type: ignore[arg-type]
            assert db.stats().commit_outcome_unknown == 1
            assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert rows(shared, table) == ([(7, 7)] if deliver else [])


async def test_a_session_whose_commit_is_lost_counts_it(url: str, table: str) -> None:
    """``Database.session()`` and ``managed_session()`` raise CommitOutcomeUnknown for a
    COMMIT lost in flight, and count it in ``stats().commit_outcome_unknown`` as ``run()``
    does."""
    with FaultProxy.for_url(url) as proxy:
        async with Database(proxy.url) as db:
            for opened in (db.session, lambda: asyncgone.managed_session(db.engine)):
                proxy.cut_on(b"COMMIT", deliver=True)
                with pytest.raises(CommitOutcomeUnknown):
                    async with opened() as session:
                        await session.execute(text(f"INSERT INTO {table} VALUES (8, 8)"))
                async with db.session() as cleanup:  # the COMMIT went through: undo it
                    await cleanup.execute(text(f"DELETE FROM {table} WHERE id = 8"))
            assert proxy.tripped == 2
            assert db.stats().commit_outcome_unknown == 2


async def test_read_only_work_on_the_primary_whose_commit_is_lost_is_not_replayed(
    url: str, table: str
) -> None:
    """run(read_only=True) without replicas runs on the primary, where nothing makes the
    session read-only: the caller's word is no guarantee, so a COMMIT lost in flight raises
    CommitOutcomeUnknown as for any work (run(read_only=True) on a replica replays it:
    tests/chaos/test_replication_causal.py)."""
    calls = 0

    async def read(session: AsyncSession) -> int:
        nonlocal calls
        calls += 1
        return int((await session.execute(text(f"SELECT COUNT(*) FROM {table}"))).scalar_one())

    with FaultProxy.for_url(url) as proxy:
        async with Database(proxy.url) as db:
            proxy.cut_on(b"COMMIT", deliver=True)
            with pytest.raises(CommitOutcomeUnknown):
                await db.run(read, read_only=True)
            assert calls == 1
            assert proxy.tripped == 1
            assert db.stats().commit_outcome_unknown == 1
            assert db.stats().replays == 0


@pytest.mark.parametrize("deliver", [False, True], ids=["cut-before-server", "cut-after-server"])
async def test_connection_lost_during_a_commit_the_work_issued_is_never_replayed(
    url: str, shared: Server, table: str, deliver: bool
) -> None:
    """Work that calls session.commit() itself and loses that COMMIT: CommitOutcomeUnknown,
    one call, never replayed (a replay would insert the row a second time)."""
    calls = 0

    async def work(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.execute(text(f"INSERT INTO {table} VALUES (7, 7)"))
        await session.commit()

    with FaultProxy.for_url(url) as proxy:
        async with Database(proxy.url) as db:
            proxy.cut_on(b"COMMIT", deliver=deliver)
            with pytest.raises(CommitOutcomeUnknown, match="issued by the unit of work itself"):
                await db.run(work)
            assert calls == 1
            assert db.stats().commit_outcome_unknown == 1
            assert db.stats().replays == 0
    assert rows(shared, table) == ([(7, 7)] if deliver else [])


async def test_failure_after_the_work_committed_part_of_itself_is_not_replayed(
    url: str, shared: Server, table: str
) -> None:
    """A disconnect after work committed part of itself is raised with a note, not replayed:
    the committed row stays single."""
    calls = 0

    async def work(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.execute(text(f"INSERT INTO {table} VALUES (8, 8)"))
        await session.commit()
        thread = (await session.execute(text("SELECT CONNECTION_ID()"))).scalar_one()
        await anyio.to_thread.run_sync(shared.query, f"KILL {int(thread)}")
        await session.execute(text(f"INSERT INTO {table} VALUES (9, 9)"))

    async with Database(url) as db:
        with pytest.raises(sa_exc.DBAPIError) as info:
            await db.run(work)
        assert asyncgone.is_disconnect(info.value)
        assert any("not replayed" in note for note in getattr(info.value, "__notes__", []))
        assert calls == 1
        assert db.stats().replays == 0
    assert rows(shared, table) == [(8, 8)]


async def test_deadlocked_units_both_complete(url: str, shared: Server, table: str) -> None:
    """Scenario 4: two units locking rows in opposite order; the deadlock victim is replayed."""
    await anyio.to_thread.run_sync(shared.query, f"INSERT INTO {table} VALUES (1, 0), (2, 0)")
    locked = {1: anyio.Event(), 2: anyio.Event()}

    def unit(first: int, second: int):  # type: ignore[no-untyped-def]
        async def work(session: AsyncSession) -> None:
            await session.execute(text(f"UPDATE {table} SET v = v + 1 WHERE id = :i"), {"i": first})
            locked[first].set()
            await locked[second].wait()  # both hold one row: the next update deadlocks
            await session.execute(
                text(f"UPDATE {table} SET v = v + 1 WHERE id = :i"), {"i": second}
            )

        return work

    async with Database(url, pool_size=2) as db:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(db.run, unit(1, 2))
                tg.start_soon(db.run, unit(2, 1))
        assert db.stats().replays >= 1
    assert rows(shared, table) == [(1, 2), (2, 2)]


async def test_run_waits_for_a_server_that_comes_back(
    disposable_server: MariaDBServer, disposable: Server, driver: str
) -> None:
    """Scenario 6: the server is down for two seconds during run(); run() succeeds after."""
    async with Database(disposable.url(driver), pool_size=2) as db:
        await db.run(lambda s: s.execute(text("SELECT 1")))
        await anyio.to_thread.run_sync(disposable_server.kill)

        async def restart_later() -> None:
            await anyio.sleep(2)
            await anyio.to_thread.run_sync(disposable_server.start)

        async with anyio.create_task_group() as tg:
            tg.start_soon(restart_later)
            result = await db.run(lambda s: s.scalar(text("SELECT 5")), deadline=60)
        assert result == 5


async def test_run_gives_up_with_a_clear_message(
    disposable_server: MariaDBServer, disposable: Server, driver: str
) -> None:
    """Scenario 6, short deadline: DatabaseUnavailable names the masked target and the error."""
    disposable.query("CREATE USER IF NOT EXISTS 'runner'@'%' IDENTIFIED BY 'pw-secret'")
    disposable.query("GRANT ALL ON test.* TO 'runner'@'%'")
    url = f"mysql+{driver}://runner:pw-secret@{disposable.host}:{disposable.port}/test"
    async with Database(url, pool_size=1) as db:
        await anyio.to_thread.run_sync(disposable_server.kill)
        try:
            with anyio.fail_after(20), pytest.raises(DatabaseUnavailable) as info:
                await db.run(lambda s: s.execute(text("SELECT 1")), deadline=1)
        finally:
            await anyio.to_thread.run_sync(disposable_server.start)
    message = str(info.value)
    assert f"runner:***@{disposable.host}:{disposable.port}/test" in message
    assert "within 1 s" in message
    assert "2003" in message
    assert "pw-secret" not in message


async def test_run_under_a_shorter_cancel_scope_gives_up_before_it(
    disposable_server: MariaDBServer, disposable: Server, driver: str
) -> None:
    """With the server down, run() under a caller's 2 s cancel scope (shorter than its own
    15 s deadline) raises DatabaseUnavailable naming the last error before the scope
    expires, not the scope's bare TimeoutError."""
    async with Database(disposable.url(driver), pool_size=1) as db:
        await anyio.to_thread.run_sync(disposable_server.kill)
        try:
            with pytest.raises(DatabaseUnavailable) as info, anyio.fail_after(2.0):
                await db.run(lambda s: s.execute(text("SELECT 1")))
        finally:
            await anyio.to_thread.run_sync(disposable_server.start)
        assert db.stats().unavailable == 1
    message = str(info.value)
    assert re.search(r"within 1\.\d s \(the caller's cancel scope\)", message), message
    assert "2003" in message


@pytest.mark.parametrize(
    ("retry_codes", "calls_expected"), [(None, 2), ((), 1)], ids=["default", "none"]
)
async def test_lock_wait_timeout_is_replayed_unless_told_otherwise(
    url: str,
    shared: Server,
    table: str,
    retry_codes: tuple[int, ...] | None,
    calls_expected: int,
) -> None:
    """1205 (lock wait timeout) is replayed by default; with retry_codes=() it is raised at
    once, after one call."""
    await anyio.to_thread.run_sync(shared.query, f"INSERT INTO {table} VALUES (1, 0)")
    calls = 0
    with shared.admin() as blocker:
        blocker.execute("BEGIN")
        blocker.execute(f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE")

        async def work(session: AsyncSession) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:  # the other transaction is over by the replay
                await anyio.to_thread.run_sync(blocker.execute, "ROLLBACK")
            await session.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
            await session.execute(text(f"UPDATE {table} SET v = v + 1 WHERE id = 1"))

        async with Database(url) as db:
            if retry_codes is None:
                await db.run(work)
                assert db.stats().replays == 1
            else:
                with pytest.raises(sa_exc.OperationalError, match="1205"):
                    await db.run(work, retry_codes=retry_codes)
                assert db.stats().replays == 0
        blocker.execute("ROLLBACK")
    assert calls == calls_expected
    assert rows(shared, table) == [(1, 1 if retry_codes is None else 0)]


async def test_without_kill_on_cancel_an_abandoned_statement_runs_on(
    url: str, shared: Server, table: str
) -> None:
    """kill_on_cancel=False: a lock wait abandoned by a cancellation keeps running on the
    server (what asyncgone's KILL QUERY prevents by default)."""
    await anyio.to_thread.run_sync(shared.query, f"INSERT INTO {table} VALUES (1, 0)")
    statement = f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE /* ag-left-running */"

    def still_running() -> int:
        [(n,)] = shared.query(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            "WHERE INFO LIKE '%ag-left-running%' AND ID <> CONNECTION_ID()"
        )
        return int(n)

    engine = asyncgone.create_engine(url, kill_on_cancel=False)
    try:
        with shared.admin() as blocker:
            blocker.execute("BEGIN")
            blocker.execute(f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE")

            async def blocked() -> None:
                async with asyncgone.managed_session(engine) as session:
                    await session.execute(text(statement))

            async with anyio.create_task_group() as tg:
                tg.start_soon(blocked)
                # Cancelled once the statement waits on the server, however long the connect
                # took (a deadline could cancel it before it was even sent).
                await wait_until(lambda: still_running() == 1)
                tg.cancel_scope.cancel()
            await anyio.sleep(1)
            assert await anyio.to_thread.run_sync(still_running) == 1
            assert asyncgone.stats(engine).kills == 0
            blocker.execute("ROLLBACK")
    finally:
        await engine.dispose()
