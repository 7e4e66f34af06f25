"""Testing an application's resilience to dying connections with asyncgone's fixtures.

Run it against the local MariaDB (or point it elsewhere with --asyncgone-url=URL):

    pytest examples/test_app_example.py

The "application" is the small service below; in a real project it is imported from your
package, and these tests sit in your test suite.
"""

from __future__ import annotations

import anyio
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import asyncgone

pytestmark = pytest.mark.asyncio


# -- the application under test -----------------------------------------------------------


async def add_user(session: AsyncSession, name: str) -> None:
    await session.execute(text("INSERT INTO example_users (name) VALUES (:name)"), {"name": name})


async def count_users(session: AsyncSession) -> int:
    return int((await session.execute(text("SELECT COUNT(*) FROM example_users"))).scalar_one())


class UserService:
    def __init__(self, db: asyncgone.Database) -> None:
        self.db = db

    async def register(self, name: str) -> None:
        await self.db.run(lambda session: add_user(session, name))

    async def total(self) -> int:
        return await self.db.run(count_users)


# -- the tests ----------------------------------------------------------------------------


SCHEMA = "CREATE TABLE IF NOT EXISTS example_users (id INT AUTO_INCREMENT PRIMARY KEY, name TEXT)"


@pytest_asyncio.fixture(autouse=True)
async def schema(asyncgone_engine):
    async with asyncgone_engine.begin() as conn:
        await conn.execute(text(SCHEMA))
        await conn.execute(text("DELETE FROM example_users"))


async def test_work_is_rolled_back_after_the_test(asyncgone_session):
    """Even committed work disappears after the test: the next test starts clean."""
    await add_user(asyncgone_session, "ada")
    await asyncgone_session.commit()
    assert await count_users(asyncgone_session) == 1


async def test_starts_clean(asyncgone_session):
    assert await count_users(asyncgone_session) == 0


async def test_survives_connections_cut_between_requests(asyncgone_proxy):
    """A firewall resets every connection between two requests: the second one works."""
    async with asyncgone.Database(asyncgone_proxy.url) as db:
        service = UserService(db)
        await service.register("grace")
        assert asyncgone_proxy.cut() >= 1
        await service.register("linus")
        assert await service.total() == 2


async def test_lost_commit_is_reported_not_replayed(asyncgone_proxy):
    """The answer to COMMIT is lost: the service reports an unknown outcome and does not
    register the user twice."""
    async with asyncgone.Database(asyncgone_proxy.url) as db:
        service = UserService(db)
        asyncgone_proxy.cut_on(b"COMMIT", deliver=True)
        with pytest.raises(asyncgone.CommitOutcomeUnknown):
            await service.register("barbara")
        assert await service.total() == 1  # it did commit, exactly once


async def test_survives_a_server_restart(asyncgone_mariadb):
    """The database server restarts under a warm pool: the next request just works."""
    async with asyncgone.Database(asyncgone_mariadb.url("asyncmy")) as db:
        await db.run(lambda s: s.execute(text(SCHEMA)))
        service = UserService(db)
        await service.register("edsger")
        await anyio.to_thread.run_sync(asyncgone_mariadb.restart)
        await service.register("donald")  # the next unit of work just works
        assert await service.total() == 2
