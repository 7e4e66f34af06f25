"""A session used by several tasks at once is a bug in the application, but it must not cost
a pool slot: whatever the other tasks do, every connection the scope's session acquired is
returned or discarded soon after the scope ends, without the garbage collector."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncgone
from tests._support import eventually

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


@pytest.fixture(autouse=True)
def _no_garbage_collector() -> Iterator[None]:
    """The collector would return a stranded connection too, hiding the bug: keep it off."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def single(url: str) -> AsyncEngine:
    return asyncgone.create_engine(url, pool_size=1, max_overflow=0, pool_timeout=2)


def checked_out(engine: AsyncEngine) -> int:
    return int(engine.sync_engine.pool.checkedout())  # type: ignore[attr-defined]


async def serve_five(engine: AsyncEngine) -> None:
    """Five requests after the misuse, on the pool of one: each gets the connection."""
    for n in range(5):
        async with engine.connect() as conn:
            assert (await conn.execute(text(f"SELECT {n}"))).scalar_one() == n


async def test_concurrent_first_use_leaks_no_pool_slot(url: str) -> None:
    """The field report: two executes gathered as the session's first use. The right error
    is raised, and the connection the other execute then acquires goes back to the pool."""
    engine = single(url)
    try:
        with pytest.raises(InvalidRequestError, match="concurrent operations"):
            async with asyncgone.managed_session(engine) as session:
                await asyncio.gather(
                    session.execute(text("SELECT SLEEP(0.2)")), session.execute(text("SELECT 1"))
                )
        await eventually(lambda: checked_out(engine) == 0, 3)
        await serve_five(engine)
    finally:
        await engine.dispose()


async def test_concurrent_use_of_a_connected_session_leaks_no_pool_slot(url: str) -> None:
    """The same misuse once the session holds its connection: SQLAlchemy's adapter runs the
    two statements one after the other, and the connection goes back when the block ends."""
    engine = single(url)
    try:
        async with asyncgone.managed_session(engine) as session:
            await session.execute(text("SELECT 1"))
            await asyncio.gather(
                session.execute(text("SELECT SLEEP(0.3)")), session.execute(text("SELECT 2"))
            )
        assert checked_out(engine) == 0
        await serve_five(engine)
    finally:
        await engine.dispose()


async def test_an_error_while_another_task_checks_out_leaks_no_pool_slot(url: str) -> None:
    """The block raises while a task it started is getting the session's connection: the
    error propagates, and that task's connection is returned once it is done."""
    engine = single(url)
    leftover: list[asyncio.Task[Any]] = []
    try:
        with pytest.raises(Boom):
            async with asyncgone.managed_session(engine) as session:
                leftover.append(asyncio.ensure_future(session.execute(text("SELECT SLEEP(0.2)"))))
                await asyncio.sleep(0)  # it starts checking out
                raise Boom
        await eventually(lambda: checked_out(engine) == 0, 3)
        await asyncio.wait(leftover)
        await serve_five(engine)
    finally:
        await engine.dispose()


async def test_a_task_that_uses_the_session_after_its_scope_ended(url: str) -> None:
    """A task scheduled inside the block but running after it: the transaction it begins on
    the ended session is closed when it is done, not by the garbage collector."""
    engine = single(url)
    late: list[asyncio.Task[Any]] = []
    try:
        async with asyncgone.managed_session(engine) as session:
            await session.execute(text("SELECT 1"))

            async def later() -> None:
                await asyncio.sleep(0.05)
                await session.execute(text("SELECT 2"))

            late.append(asyncio.ensure_future(later()))
        await asyncio.wait(late)
        await eventually(lambda: checked_out(engine) == 0, 3)
        await serve_five(engine)
    finally:
        await engine.dispose()


async def test_a_result_streamed_after_the_scope_ended_is_read_whole(url: str) -> None:
    """A session used after its scope ended to stream a result: the reaper waits for the
    result to be read to its end before it closes the session (a ROLLBACK in between
    corrupted the stream), then the connection comes back."""
    engine = single(url)
    try:
        async with asyncgone.managed_session(engine) as session:
            await session.execute(text("SELECT 1"))
        result = await session.stream(text("SELECT seq FROM seq_1_to_50000"))
        values = []
        async for (value,) in result:
            values.append(value)
            if len(values) % 5000 == 0:
                await asyncio.sleep(0.01)  # the reaper gets its turns meanwhile
        assert values == list(range(1, 50001))
        await eventually(lambda: checked_out(engine) == 0, 3)
        await serve_five(engine)
    finally:
        await engine.dispose()


async def test_a_sibling_cancelled_mid_checkout_leaks_no_pool_slot(url: str) -> None:
    """One of two tasks sharing the session is cancelled while it checks out; the other
    fails with the concurrency error. Nothing stays checked out."""
    engine = single(url)
    try:
        with pytest.raises(InvalidRequestError):
            async with asyncgone.managed_session(engine) as session:
                first = asyncio.ensure_future(session.execute(text("SELECT SLEEP(0.2)")))
                await asyncio.sleep(0)
                first.cancel()
                await session.execute(text("SELECT 1"))
        await eventually(lambda: checked_out(engine) == 0, 3)
        await serve_five(engine)
    finally:
        await engine.dispose()


async def test_run_with_a_unit_that_leaves_a_task_on_its_session(url: str) -> None:
    """Database.run() with a unit of work that fails while a task it started still runs a
    statement on its session: the error is raised (not replayed), and the pool of one
    serves on once that statement is done."""
    leftover: list[asyncio.Task[Any]] = []
    async with asyncgone.Database(url, pool_size=1, max_overflow=0, pool_timeout=2) as db:

        async def unit(session: Any) -> None:
            leftover.append(asyncio.ensure_future(session.execute(text("SELECT SLEEP(0.2)"))))
            await asyncio.sleep(0.05)
            raise Boom

        with pytest.raises(Boom):
            await db.run(unit)
        await eventually(lambda: checked_out(db.engine) == 0, 3)
        await asyncio.wait(leftover)
        await serve_five(db.engine)


async def test_a_session_kept_busy_past_the_bound_has_its_connection_taken(url: str) -> None:
    """A task that keeps the ended session busy longer than the cleanup bound loses its
    connection (it sees a lost connection), rather than holding the slot."""
    engine = single(url)
    try:
        with pytest.raises(Boom):
            async with asyncgone.SessionScope(engine, cleanup_timeout=0.5) as session:
                slow = asyncio.ensure_future(session.execute(text("SELECT SLEEP(5)")))
                await asyncio.sleep(0)  # it starts checking out
                raise Boom
        with anyio.fail_after(3):
            await asyncio.wait({slow})
        assert asyncgone.is_disconnect(slow.exception())  # type: ignore[arg-type]
        assert checked_out(engine) == 0
        await serve_five(engine)
    finally:
        await engine.dispose()
