"""managed_session(): commit on success, rollback and the original error on failure."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Integer, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import asyncgone
from asyncgone.testing import FaultProxy
from tests._support import Server

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "ag_session_objects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    v: Mapped[int] = mapped_column(Integer)


@pytest.fixture
async def engine(url: str) -> AsyncIterator[AsyncEngine]:
    engine = asyncgone.create_engine(url, pool_size=2)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS ag_session (id INT PRIMARY KEY)"))
        await conn.execute(text("DELETE FROM ag_session"))
    yield engine
    await engine.dispose()


async def count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT COUNT(*) FROM ag_session"))).scalar_one())


async def test_commits_on_success(engine: AsyncEngine) -> None:
    """Work done in the block is committed when it exits normally."""
    async with asyncgone.managed_session(engine) as session:
        assert isinstance(session, AsyncSession)
        await session.execute(text("INSERT INTO ag_session VALUES (1)"))
    assert await count(engine) == 1
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_rolls_back_and_reraises_the_original_error(engine: AsyncEngine) -> None:
    """An error in the block rolls back and the very same exception reaches the caller."""
    boom = Boom("from the block")
    with pytest.raises(Boom) as info:
        async with asyncgone.managed_session(engine) as session:
            await session.execute(text("INSERT INTO ag_session VALUES (2)"))
            raise boom
    assert info.value is boom
    assert await count(engine) == 0
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_statement_error_leaves_no_pending_rollback(engine: AsyncEngine) -> None:
    """After an integrity error the next session on the same pool works normally."""
    async with asyncgone.managed_session(engine) as session:
        await session.execute(text("INSERT INTO ag_session VALUES (3)"))
    for _ in range(3):  # every pooled connection gets the failure at least once
        with pytest.raises(Exception, match="Duplicate entry"):
            async with asyncgone.managed_session(engine) as session:
                await session.execute(text("INSERT INTO ag_session VALUES (3)"))
    async with asyncgone.managed_session(engine) as session:
        await session.execute(text("INSERT INTO ag_session VALUES (4)"))
    assert await count(engine) == 2


async def test_expire_on_commit_defaults_off_and_can_be_overridden(engine: AsyncEngine) -> None:
    """Objects stay loaded after commit (async cannot lazy-load); options still pass through."""
    async with asyncgone.managed_session(engine) as session:
        assert session.sync_session.expire_on_commit is False
    async with asyncgone.managed_session(engine, expire_on_commit=True) as session:
        assert session.sync_session.expire_on_commit is True


async def test_cleanup_failure_is_noted_never_raised_instead(
    engine: AsyncEngine, shared: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A rollback that fails (its connection was killed) is logged and noted on the original
    error, which is the one raised."""
    caplog.set_level(logging.DEBUG, logger="asyncgone")
    with pytest.raises(Boom) as info:
        async with asyncgone.managed_session(engine) as session:
            thread = (await session.execute(text("SELECT CONNECTION_ID()"))).scalar_one()
            await session.execute(text("INSERT INTO ag_session VALUES (5)"))
            shared.kill(thread)
            raise Boom
    notes = getattr(info.value, "__notes__", [])
    assert any("session rollback after this error also failed" in note for note in notes)
    assert "session rollback failed" in caplog.text
    assert await count(engine) == 0
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_url_bind_creates_and_disposes_its_own_engine(url: str) -> None:
    """A URL (or nothing, for $DATABASE_URL) gets an engine that lives for the block only."""
    async with asyncgone.managed_session(url) as session:
        assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        engine = session.bind
    assert engine.pool.checkedout() == 0  # type: ignore[union-attr]


async def test_database_url_environment(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no bind, managed_session() connects to $DATABASE_URL."""
    monkeypatch.setenv("DATABASE_URL", url)
    async with asyncgone.managed_session() as session:
        assert (await session.execute(text("SELECT 2"))).scalar_one() == 2


async def test_database_bind_uses_its_sessions(url: str) -> None:
    """A Database bind gives that Database's sessions and defaults."""
    db = asyncgone.Database(url, session_options={"autoflush": False})
    async with db, asyncgone.managed_session(db) as session:
        assert session.sync_session.autoflush is False
        assert session.bind is db.engine


async def test_bad_bind_is_explained() -> None:
    """A bind of the wrong kind is refused with what is accepted."""
    with pytest.raises(asyncgone.ConfigurationError, match="must be a string"):
        async with asyncgone.managed_session(42):  # type: ignore[arg-type]
            pass


async def test_cleanup_on_a_blackholed_connection_is_bounded(url: str) -> None:
    """A rollback that can never be answered is abandoned after cleanup_timeout: the original
    error comes out with a note, and the connection is not left checked out."""
    with FaultProxy.for_url(url) as proxy:
        async with asyncgone.Database(proxy.url, keepalive=False, cleanup_timeout=0.5) as db:
            started = time.monotonic()
            with pytest.raises(Boom) as info:
                async with db.session() as session:
                    await session.execute(text("SELECT 1"))
                    proxy.blackhole()
                    raise Boom
            assert time.monotonic() - started < 0.5 + 5
            assert any("timed out" in note for note in info.value.__notes__)
            assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            proxy.restore()
            async with db.session() as session:  # the pool works on
                assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


async def test_loaded_objects_stay_readable_after_a_failed_block(engine: AsyncEngine) -> None:
    """An error handler may read the objects a failed block loaded: asyncgone's cleanup
    detaches them before rolling back, so no lazy load (MissingGreenlet) or detached expired
    state (DetachedInstanceError) meets it; the server rolled the change back."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    async with asyncgone.managed_session(engine) as session:
        session.add(Row(id=3, v=30))
    with pytest.raises(Boom):
        async with asyncgone.managed_session(engine) as session:
            row = (await session.execute(select(Row))).scalar_one()
            row.v = 40
            await session.flush()
            raise Boom
    assert (row.id, row.v) == (3, 40)  # readable, as the block left it
    async with asyncgone.managed_session(engine) as session:
        assert (await session.execute(select(Row.v))).scalars().all() == [30]
