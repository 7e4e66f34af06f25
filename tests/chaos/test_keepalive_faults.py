"""Issue scenarios for the keepalive: long idleness, ping budget, killed idle connections,
and an exhausted pool."""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncgone
from tests._support import Server, count_errors, eventually, wait_until, warm

pytestmark = pytest.mark.anyio

POOL = 3
WAIT_TIMEOUT = 1  # seconds: the server closes connections idle longer than this


def short_timeout_engine(url: str, **options: object) -> AsyncEngine:
    init = {"init_command": f"SET SESSION wait_timeout={WAIT_TIMEOUT}"}
    # No overflow: the burst queues for the pool's connections instead of opening new ones.
    return asyncgone.create_engine(
        url, pool_size=POOL, max_overflow=0, connect_args=init, **options
    )


async def burst(engine: AsyncEngine) -> None:
    async def unit() -> None:
        async with asyncgone.managed_session(engine) as session:
            await session.execute(text("SELECT 1"))

    async with anyio.create_task_group() as tg:
        for _ in range(3 * POOL):
            tg.start_soon(unit)


@pytest.mark.parametrize("keepalive", [True, False], ids=["keepalive", "control"])
async def test_long_idle_then_burst_costs_no_reconnect(url: str, keepalive: bool) -> None:
    """Scenario 1: idle for three times wait_timeout, then a burst: 0 errors, and with the
    keepalive 0 reconnects during the burst (the control, without it, reconnects)."""
    engine = short_timeout_engine(url)
    try:
        await warm(engine, POOL)
        if keepalive:
            async with asyncgone.keepalive(engine):
                await anyio.sleep(3 * WAIT_TIMEOUT)
                before = asyncgone.stats(engine).connects
                with count_errors(engine) as errors:
                    await burst(engine)
        else:
            await anyio.sleep(3 * WAIT_TIMEOUT)
            before = asyncgone.stats(engine).connects
            with count_errors(engine) as errors:
                await burst(engine)
        assert errors == []
        reconnects = asyncgone.stats(engine).connects - before
        assert (reconnects == 0) if keepalive else (reconnects >= POOL)
    finally:
        await engine.dispose()


async def test_ping_budget_and_busy_connections(url: str, shared: Server) -> None:
    """Scenario 2: at most one ping per idle connection per interval; a connection in use
    is never pinged (its own session counters say so)."""
    interval = 0.3
    engine = asyncgone.create_engine(url, pool_size=POOL)
    try:
        await warm(engine, POOL)
        async with engine.connect() as busy:  # one connection in use for the whole period
            await busy.execute(text("SELECT 1"))
            async with asyncgone.keepalive(engine, interval=interval):
                started = anyio.current_time()
                await busy.execute(text("SELECT SLEEP(2)"))
                elapsed = anyio.current_time() - started
            status = await busy.execute(text("SHOW SESSION STATUS LIKE 'Com_admin_commands'"))
            assert int(status.one()[1]) == 0
        stats = asyncgone.stats(engine)
        idle_connections = POOL - 1
        assert 0 < stats.keepalive_pings <= idle_connections * (elapsed / interval + 1)
    finally:
        await engine.dispose()


async def test_killed_idle_connections_are_replaced_in_the_background(
    url: str, shared: Server
) -> None:
    """Scenario 3: idle connections killed by an administrator are replaced by the keepalive
    before the next request, which then opens no connection."""
    engine = asyncgone.create_engine(url, pool_size=POOL)
    try:
        ids = await warm(engine, POOL)
        async with asyncgone.keepalive(engine, interval=0.2):
            shared.kill(ids[0], ids[1])
            await wait_until(lambda: not {ids[0], ids[1]} & shared.threads())
            await eventually(lambda: asyncgone.stats(engine).connects >= POOL + 2)
        stats = asyncgone.stats(engine)
        # Found dead on the socket, or, if a keepalive round held it at the moment of the
        # kill, by its ping: replaced either way, in the background.
        assert set(stats.replaced) <= {"closed_by_server", "ping_failed"}, stats
        assert stats.connects == POOL + 2, stats
        with count_errors(engine) as errors:
            await warm(engine, POOL)  # the next requests
        assert errors == []
        assert asyncgone.stats(engine).connects == POOL + 2
    finally:
        await engine.dispose()


async def test_exhausted_pool_is_left_to_its_users(url: str) -> None:
    """Scenario 4: with every connection in use and a user waiting, the keepalive borrows
    nothing; the waiting user gets the first connection released."""
    engine = asyncgone.create_engine(url, pool_size=2, max_overflow=0, pool_timeout=30)
    try:
        await warm(engine, 2)
        got: list[float] = []

        async def waiting_user() -> None:
            async with engine.connect() as conn:
                got.append(anyio.current_time())
                await conn.execute(text("SELECT 1"))

        async with asyncgone.keepalive(engine, interval=0.05):
            async with engine.connect() as a, engine.connect() as b:
                await a.execute(text("SELECT 1"))
                await b.execute(text("SELECT 1"))
                visits = asyncgone.stats(engine).keepalive_visits
                runs = asyncgone.stats(engine).keepalive_runs
                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiting_user)
                    await anyio.sleep(0.5)  # ~10 keepalive rounds while exhausted
                    assert asyncgone.stats(engine).keepalive_runs >= runs + 5
                    assert asyncgone.stats(engine).keepalive_visits == visits
                    assert got == []
                    released = anyio.current_time()
                    await a.close()
            assert got
            assert got[0] - released < 1.0
    finally:
        await engine.dispose()
