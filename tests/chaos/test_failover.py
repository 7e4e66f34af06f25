"""A server turning read-only (a failover demoted it): a server-wide signal that invalidates
the whole pool at once, unlike a single dead connection.

Runs on the disposable server: ``SET GLOBAL read_only`` must not touch the shared one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

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
