"""A server turning read-only (a failover demoted it): a server-wide signal that invalidates
the whole pool at once, unlike a single dead connection.

Runs on the disposable server: ``SET GLOBAL read_only`` must not touch the shared one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
import pytest
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession

import asyncgone
from tests._support import Server, warm

pytestmark = pytest.mark.anyio

USER, PASSWORD = "ag_app", "ag-app-pw"


@pytest.fixture
def app_user(disposable: Server) -> Iterator[Server]:
    """An application account without the privilege to write to a read-only server."""
    for sql in (
        f"CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'",
        f"GRANT ALL ON test.* TO '{USER}'@'%'",
        "CREATE TABLE IF NOT EXISTS test.ag_failover (id INT AUTO_INCREMENT PRIMARY KEY)",
    ):
        disposable.query(sql)
    yield Server(host=disposable.host, port=disposable.port, user=USER, password=PASSWORD)
    disposable.query("SET GLOBAL read_only = 0")
    disposable.query("DROP TABLE IF EXISTS test.ag_failover")


async def test_read_only_failover_invalidates_the_pool_once(
    disposable: Server, app_user: Server, driver: str
) -> None:
    """1290 (read-only) fails the write that met it, invalidates the pool once, and every
    connection opened before it is replaced, not only the one that saw the error."""
    engine = asyncgone.create_engine(app_user.url(driver), pool_size=3)
    try:
        ids = await warm(engine, 3)
        disposable.query("SET GLOBAL read_only = 1")
        with pytest.raises(sa_exc.OperationalError, match="1290"):
            async with asyncgone.managed_session(engine) as session:
                await session.execute(text("INSERT INTO ag_failover VALUES ()"))
        stats = asyncgone.stats(engine)
        assert stats.pool_invalidations == 1
        disposable.query("SET GLOBAL read_only = 0")  # the new primary takes writes
        again = await warm(engine, 3)
        assert not set(ids) & set(again)
        async with asyncgone.managed_session(engine) as session:
            await session.execute(text("INSERT INTO ag_failover VALUES ()"))
        assert asyncgone.stats(engine).pool_invalidations == 1
    finally:
        await engine.dispose()


async def test_a_commit_refused_by_a_read_only_server_has_a_known_outcome(
    disposable: Server, app_user: Server, driver: str
) -> None:
    """A server that turns read-only while a transaction is open answers its COMMIT with
    1290: nothing was committed, so that error is raised as it is, not as
    CommitOutcomeUnknown, and run() replays the unit of work once the server is writable."""
    engine = asyncgone.create_engine(app_user.url(driver))
    try:
        with pytest.raises(sa_exc.OperationalError, match="1290"):
            async with asyncgone.managed_session(engine) as session:
                await session.execute(text("INSERT INTO ag_failover VALUES ()"))
                await anyio.to_thread.run_sync(disposable.query, "SET GLOBAL read_only = 1")
        disposable.query("SET GLOBAL read_only = 0")
        assert disposable.query("SELECT COUNT(*) FROM test.ag_failover") == [(0,)]
        assert asyncgone.stats(engine).commit_outcome_unknown == 0
    finally:
        disposable.query("SET GLOBAL read_only = 0")
        await engine.dispose()

    tries = 0

    async def insert(session: AsyncSession) -> None:
        nonlocal tries
        tries += 1
        await session.execute(text("INSERT INTO ag_failover VALUES ()"))
        if tries == 1:  # read-only while this transaction is open
            await anyio.to_thread.run_sync(disposable.query, "SET GLOBAL read_only = 1")

    writable = threading.Thread(target=disposable.query, args=["SET GLOBAL read_only = 0"])

    def once_refused(context: Any) -> None:
        # Writable again only once the COMMIT was refused (1290): no race with the COMMIT.
        if "1290" in str(context.original_exception) and writable.ident is None:
            writable.start()

    # target_role="primary": until the server is writable again, new connections are
    # refused by the host search and run() waits (bounded) instead of replaying in vain.
    async with asyncgone.Database(app_user.url(driver), target_role="primary") as db:
        event.listen(db.engine.sync_engine, "handle_error", once_refused)
        try:
            await db.run(insert)
        finally:
            if writable.ident is not None:
                await anyio.to_thread.run_sync(writable.join, 10.0)
        assert not writable.is_alive()
        assert tries == 2
        assert db.stats().commit_outcome_unknown == 0
        assert db.stats().replays == 1
    assert disposable.query("SELECT COUNT(*) FROM test.ag_failover") == [(1,)]
