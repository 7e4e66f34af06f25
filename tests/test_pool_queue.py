"""The idle queue of an asyncgone pool behaves as SQLAlchemy's own.

asyncgone's pool takes an idle connection from, and puts it back into, the asyncio queue
under SQLAlchemy's ``AsyncAdaptedQueue`` itself (``_compat._takes_directly``), which saves
a dozen calls per unit of work. Each test runs the same steps on a plain SQLAlchemy engine
and on an asyncgone engine and compares what they do: the order connections come back in
(FIFO, LIFO with ``pool_use_lifo``), checkouts waiting on a full pool, overflow
connections closed on return, and the pool's counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool
from sqlalchemy.util.queue import AsyncAdaptedQueue

import asyncgone
from asyncgone._compat import _takes_directly, take_idle
from tests._support import Server, wait_until

pytestmark = pytest.mark.anyio

Scenario = Callable[[AsyncEngine], Awaitable[Any]]


async def both(url: str, scenario: Scenario, **options: Any) -> tuple[Any, Any]:
    """Run ``scenario`` on a plain SQLAlchemy engine and on an asyncgone engine."""
    results = []
    for make in (create_async_engine, asyncgone.create_engine):
        engine = make(url, **options)
        try:
            results.append(await scenario(engine))
        finally:
            await engine.dispose()
    return results[0], results[1]


class Names:
    """Names pooled connections by the order they were first seen (0, 1, ...)."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    async def of(self, conn: AsyncConnection) -> int:
        fairy: Any = await conn.get_raw_connection()
        return self._seen.setdefault(id(fairy._connection_record), len(self._seen))


def test_the_asyncio_pool_takes_its_idle_queue_directly() -> None:
    """The fast path is on for SQLAlchemy's asyncio pool; off for a thread-safe queue and
    for an application's pool class with its own steps."""

    class Instrumented(AsyncAdaptedQueuePool):
        def _do_get(self) -> Any:
            return super()._do_get()

    assert _takes_directly(AsyncAdaptedQueuePool)
    assert not _takes_directly(QueuePool)
    assert not _takes_directly(Instrumented)


async def test_an_idle_checkout_and_its_return_skip_the_queue_methods(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit of work on an idle connection calls none of the queue's methods (it does on
    plain SQLAlchemy), and an application's ``_do_get`` override still runs."""
    calls: list[str] = []
    for name in ("get", "get_nowait", "put", "put_nowait"):
        method = getattr(AsyncAdaptedQueue, name)

        def counting(self: Any, *args: Any, _name: str = name, _m: Any = method) -> Any:
            calls.append(_name)
            return _m(self, *args)

        monkeypatch.setattr(AsyncAdaptedQueue, name, counting)

    async def scenario(engine: AsyncEngine) -> list[str]:
        async with engine.connect() as conn:  # opens the connection
            await conn.execute(text("SELECT 1"))
        calls.clear()
        async with engine.connect() as conn:  # takes it idle, returns it
            await conn.execute(text("SELECT 1"))
        return list(calls)

    plain, ours = await both(url, scenario, pool_size=1)
    assert plain == ["get", "get_nowait", "put", "put_nowait"]
    assert ours == []

    taken: list[int] = []

    class Instrumented(AsyncAdaptedQueuePool):
        def _do_get(self) -> Any:
            taken.append(1)
            return super()._do_get()

    engine = asyncgone.create_engine(url, poolclass=Instrumented, pool_size=1)
    try:
        for _ in range(2):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        assert taken == [1, 1]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("lifo", [False, True])
async def test_connections_come_back_in_the_order_sqlalchemy_gives_them(
    url: str, lifo: bool
) -> None:
    """Returned a, b, c: the next checkouts get a, b, c (FIFO) or c, b, a (LIFO), as with
    plain SQLAlchemy."""

    async def scenario(engine: AsyncEngine) -> list[int]:
        names = Names()
        held = [await engine.connect() for _ in range(3)]
        first = [await names.of(conn) for conn in held]
        for conn in held:
            await conn.close()
        again = [await engine.connect() for _ in range(3)]
        order = [await names.of(conn) for conn in again]
        for conn in again:
            await conn.close()
        return first + order

    plain, ours = await both(url, scenario, pool_size=3, pool_use_lifo=lifo)
    assert plain == ours == ([0, 1, 2, 2, 1, 0] if lifo else [0, 1, 2, 0, 1, 2])


async def test_a_checkout_waiting_on_a_full_pool_gets_the_returned_connection(url: str) -> None:
    """With the pool exhausted, a waiting checkout is woken by a return and gets that very
    connection; the pool's counts agree with plain SQLAlchemy's throughout."""

    async def scenario(engine: AsyncEngine) -> list[Any]:
        names = Names()
        pool = engine.sync_engine.pool
        held = await engine.connect()
        holder = await names.of(held)
        got: list[int] = []

        async def waiter() -> None:
            async with engine.connect() as conn:
                got.append(await names.of(conn))
                await conn.execute(text("SELECT 1"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.2)
            waiting = got == []
            await held.close()
        return [holder, got, waiting, pool.checkedin(), pool.checkedout(), pool.status()]

    plain, ours = await both(url, scenario, pool_size=1, max_overflow=0, pool_timeout=10)
    assert plain == ours
    assert ours[:5] == [0, [0], True, 1, 0]


async def test_a_woken_waiter_cancelled_passes_the_connection_to_the_next(url: str) -> None:
    """Two checkouts wait on a full pool; the first is cancelled right after the return
    woke it: the second still gets the connection, none is lost, as with plain
    SQLAlchemy."""

    async def scenario(engine: AsyncEngine) -> list[Any]:
        pool: Any = engine.sync_engine.pool
        held = await engine.connect()

        async def checkout() -> int:
            async with engine.connect() as conn:
                return int((await conn.execute(text("SELECT 1"))).scalar_one())

        first = asyncio.ensure_future(checkout())
        await asyncio.sleep(0.2)
        second = asyncio.ensure_future(checkout())
        await asyncio.sleep(0.2)
        await held.close()
        first.cancel()
        with anyio.fail_after(10):
            got = await second
        results = await asyncio.gather(first, return_exceptions=True)
        return [got, type(results[0]).__name__, pool.checkedin(), pool.checkedout()]

    plain, ours = await both(url, scenario, pool_size=1, max_overflow=0, pool_timeout=20)
    assert plain == ours
    assert [ours[0], *ours[2:]] == [1, 1, 0]
    # SQLAlchemy 2.0 waits through asyncio.wait_for(), whose task on Python 3.10 may finish
    # the first checkout anyway (it had the connection already); then it is returned too.
    assert ours[1] in ("CancelledError", "int")


@pytest.mark.parametrize("pool_size", [0, 2])
async def test_dispose_closes_connections_put_back_directly(
    url: str, shared: Server, pool_size: int
) -> None:
    """Connections returned to the pool (also an unbounded one, ``pool_size=0``) are the
    ones ``dispose()`` closes: the server no longer lists them."""

    async def scenario(engine: AsyncEngine) -> int:
        held = [await engine.connect() for _ in range(3)]
        ids = {(await conn.execute(text("SELECT CONNECTION_ID()"))).scalar_one() for conn in held}
        for conn in held:
            await conn.close()
        idle: int = engine.sync_engine.pool.checkedin()  # type: ignore[attr-defined]
        await engine.dispose()
        # The server ends a thread a moment after its COM_QUIT, later on a loaded machine:
        # waited for, where a connection dispose() left open would stay listed for hours.
        await wait_until(lambda: not ids & shared.threads())
        return idle

    plain, ours = await both(url, scenario, pool_size=pool_size, max_overflow=5)
    assert plain == ours == (3 if pool_size == 0 else 2)


async def test_a_checkout_on_a_full_pool_times_out_as_configured(url: str) -> None:
    """Nothing returned: the waiting checkout fails after ``pool_timeout`` on both."""

    async def scenario(engine: AsyncEngine) -> str:
        held = await engine.connect()
        try:
            with pytest.raises(PoolTimeout) as raised:
                with anyio.fail_after(10):
                    await engine.connect()
            return type(raised.value).__name__
        finally:
            await held.close()

    plain, ours = await both(url, scenario, pool_size=1, max_overflow=0, pool_timeout=0.3)
    assert plain == ours == "TimeoutError"


async def test_an_overflow_connection_returned_to_a_full_queue_is_closed(url: str) -> None:
    """Two held with ``pool_size=1, max_overflow=1``: returning both keeps one idle, closes
    the other and gives its overflow slot back, as plain SQLAlchemy does."""

    async def scenario(engine: AsyncEngine) -> list[Any]:
        pool: Any = engine.sync_engine.pool
        first, second = await engine.connect(), await engine.connect()
        during = (pool.checkedout(), pool.overflow())
        await first.close()
        await second.close()
        after = (pool.checkedin(), pool.checkedout(), pool.overflow())
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return [during, after, pool.status()]

    plain, ours = await both(url, scenario, pool_size=1, max_overflow=1)
    assert plain == ours
    assert ours[:2] == [(2, 1), (1, 0, 0)]


async def test_many_tasks_share_a_small_pool_without_a_lost_wakeup(url: str) -> None:
    """Twenty tasks doing five units each through a pool of two (no overflow) all finish,
    well within ``pool_timeout``: every return wakes a waiting checkout."""

    async def scenario(engine: AsyncEngine) -> tuple[int, int]:
        done = 0

        async def worker() -> None:
            nonlocal done
            for _ in range(5):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                    await asyncio.sleep(0)
                done += 1

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(worker)
        return done, engine.sync_engine.pool.checkedin()  # type: ignore[attr-defined]

    plain, ours = await both(url, scenario, pool_size=2, max_overflow=0, pool_timeout=30)
    assert plain == ours == (100, 2)


async def test_the_keepalive_still_reaches_connections_put_back_directly(url: str) -> None:
    """A record put back by the fast path is in the asyncio queue SQLAlchemy's own
    ``get_nowait`` reads (the keepalive takes idle connections that way)."""
    engine = asyncgone.create_engine(url, pool_size=2)
    try:
        pool: Any = engine.sync_engine.pool
        a, b = await engine.connect(), await engine.connect()
        await a.close()
        await b.close()
        assert pool.checkedin() == 2
        taken = [take_idle(pool), take_idle(pool)]
        assert None not in taken
        assert take_idle(pool) is None
        for record in taken:
            pool._do_return_conn(record)
        assert pool.checkedin() == 2
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()
