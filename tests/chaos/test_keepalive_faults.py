"""Issue scenarios for the keepalive: long idleness, ping budget, killed idle connections,
connections near their limits, min_idle, and users who must never wait for it."""

from __future__ import annotations

import logging
import math
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

import asyncgone
import asyncgone.prometheus
from tests._support import (
    Server,
    connection_id,
    count_errors,
    delta,
    eventually,
    wait_until,
    warm,
)

pytestmark = pytest.mark.anyio

POOL = 3
WAIT_TIMEOUT = 2  # seconds: the server closes connections idle longer than this
# (2, not 1: the keepalive then pings a connection 0.4 s before its idle limit, not 0.1 s,
# a margin a loaded machine's stalls cannot eat)


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


async def test_fully_idle_pool_gets_one_ping_per_connection_per_interval(
    disposable: Server, driver: str
) -> None:
    """Scenario 2, every connection idle: each round visits them all, but only those idle
    for the interval are pinged, so each is pinged at most every other round (the server's
    own count agrees); a keepalive pinging at every visit would send twice that."""
    interval = 0.3  # a round every 0.15 s
    rounds = 8
    engine = asyncgone.create_engine(disposable.url(driver), pool_size=POOL, max_overflow=0)
    try:
        await warm(engine, POOL)
        before = disposable.status()
        async with asyncgone.keepalive(engine, interval=interval):
            await eventually(lambda: asyncgone.stats(engine).keepalive_runs >= rounds, 30)
        counts = delta(before, disposable.status())
        stats = asyncgone.stats(engine)
        # A ping resets a connection's idle time; the next round comes half an interval
        # later, so a connection pinged in one round cannot be pinged in the next. One
        # round more: a slow start or a stalled round can shift the pattern by one round.
        budget = POOL * (math.ceil(stats.keepalive_runs / 2) + 1)
        assert stats.keepalive_visits >= POOL * (rounds - 1)  # all of them, round after round
        assert POOL <= counts["Com_admin_commands"] <= stats.keepalive_pings <= budget, stats
        assert stats.keepalive_pings == stats.pings
        assert counts["Connections"] == 0
        assert stats.replaced == {}
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
        # kill, by its ping: replaced either way, in the background, and counted as such.
        assert stats.replaced == {"keepalive": 2}, stats
        assert stats.connects == POOL + 2, stats
        with count_errors(engine) as errors:
            await warm(engine, POOL)  # the next requests
        assert errors == []
        assert asyncgone.stats(engine).connects == POOL + 2
    finally:
        await engine.dispose()


async def test_connection_near_its_lifetime_is_replaced_in_the_background(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection whose max_lifetime would end before the next round is replaced by the
    keepalive, counted under "keepalive" (its log line names the cause, also in Prometheus);
    the requests that follow use the replacements and open nothing."""
    caplog.set_level(logging.INFO, logger="asyncgone")
    # Lifetimes of 45 to 60 s, all within the next round of a 100 s interval: due now.
    engine = asyncgone.create_engine(url, pool_size=2, max_lifetime=60)
    try:
        old = set(await warm(engine, 2))
        keepalive = asyncgone.keepalive(engine, interval=100)
        assert await keepalive.run_once() == 2
        stats = asyncgone.stats(engine)
        assert (stats.replaced, stats.connects) == ({"keepalive": 2}, 4)
        retired = [
            r.getMessage() for r in caplog.records if "keepalive is retiring" in r.getMessage()
        ]
        assert len(retired) == 2
        assert all(m.endswith("max_lifetime") for m in retired)
        with count_errors(engine) as errors:
            new = set(await warm(engine, 2))  # the next requests
        assert errors == []
        assert not old & new
        stats = asyncgone.stats(engine)
        assert (stats.replaced, stats.connects) == ({"keepalive": 2}, 4)
        registry = CollectorRegistry()
        asyncgone.prometheus.register(engine, name="ka", registry=registry)
        exposition = generate_latest(registry).decode()
        assert 'asyncgone_connections_replaced_total{engine="ka",reason="keepalive"} 2.0' in (
            exposition
        )
    finally:
        await engine.dispose()


async def test_connection_past_its_idle_limit_is_replaced_in_the_background(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection idle past its idle limit (here recycle=2) and not yet due for a ping is
    replaced by the keepalive, and the next request uses the replacement."""
    caplog.set_level(logging.INFO, logger="asyncgone")
    engine = asyncgone.create_engine(url, pool_size=1, recycle=2)
    try:
        [old] = await warm(engine, 1)
        await anyio.sleep(2.2)
        assert await asyncgone.keepalive(engine, interval=100).run_once() == 1
        stats = asyncgone.stats(engine)
        assert (stats.replaced, stats.connects, stats.pings) == ({"keepalive": 1}, 2, 0)
        assert "the keepalive is retiring connection" in caplog.text
        assert "idle_limit" in caplog.text
        assert await connection_id(engine) != old  # well within its own idle limit
        assert asyncgone.stats(engine).replaced == {"keepalive": 1}
        assert asyncgone.stats(engine).connects == 2
    finally:
        await engine.dispose()


def queue_pool(engine: AsyncEngine) -> QueuePool:
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool


async def test_min_idle_opens_connections_within_the_pool_size(url: str) -> None:
    """On an idle engine a round opens connections up to min_idle, never beyond pool_size
    (overflow is for users), and never while a user holds a connection."""
    engine = asyncgone.create_engine(url, pool_size=3, max_overflow=5)
    try:
        pool = queue_pool(engine)
        await asyncgone.keepalive(engine, min_idle=2).run_once()
        assert (pool.checkedin(), pool.checkedout(), asyncgone.stats(engine).connects) == (2, 0, 2)
        keepalive = asyncgone.keepalive(engine, min_idle=10)
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            await keepalive.run_once()
            assert asyncgone.stats(engine).connects == 2  # a user is active: nothing opened
        await keepalive.run_once()
        assert (pool.checkedin(), pool.overflow(), asyncgone.stats(engine).connects) == (3, 0, 3)
        await keepalive.run_once()
        assert asyncgone.stats(engine).connects == 3
        with count_errors(engine) as errors:
            await warm(engine, 3)  # the warmed connections serve requests as usual
        assert errors == []
        assert asyncgone.stats(engine).connects == 3
    finally:
        await engine.dispose()


async def test_user_takes_an_idle_connection_while_min_idle_opens_one(url: str) -> None:
    """A request arriving while the keepalive opens a connection for min_idle gets the idle
    one at once: the keepalive holds none and the pool (max_overflow=0) does not make the
    user wait for that connect."""
    engine = asyncgone.create_engine(url, pool_size=2, max_overflow=0, pool_timeout=30)
    slow = False

    def slow_connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        # The server sleeps in the handshake of connects made meanwhile: a long connect.
        if slow:
            cparams["init_command"] = "DO SLEEP(3)"
        else:
            cparams.pop("init_command", None)

    event.listen(engine.sync_engine, "do_connect", slow_connect)
    try:
        pool = queue_pool(engine)
        [idle] = await warm(engine, 1)
        slow = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(asyncgone.keepalive(engine, min_idle=2).run_once)
            await eventually(lambda: pool.checkedout() > 0)  # the keepalive is at work
            async with engine.connect() as conn:
                got = (await conn.execute(text("SELECT CONNECTION_ID()"))).scalar_one()
                # Served while that connect still runs: it did not wait for it.
                assert asyncgone.stats(engine).connects == 1
            assert got == idle
        assert (pool.checkedin(), asyncgone.stats(engine).connects) == (2, 2)
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
