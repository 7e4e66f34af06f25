"""Where asyncgone leans on another library's private state or on a behaviour that changed
between its releases: each case holds on both sides of the boundary (tox runs this module on
the oldest and newest releases, and on the releases at each boundary)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy import event, text
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.mysql.aiomysql import MySQLDialect_aiomysql

import asyncgone
from asyncgone.testing import FaultProxy
from tests._support import Server, connection_id, eventually

pytestmark = pytest.mark.anyio


class _WrappedConnection:
    """A third-party driver's connection: aiomysql's underneath, none of its attributes."""

    def __init__(self, inner: Any) -> None:
        self.__inner = inner

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.__inner, name)


class WrappedDialect(MySQLDialect_aiomysql):
    """A third-party async MySQL dialect around aiomysql (``mysql+wrapped://``)."""

    driver = "wrapped"
    supports_statement_cache = True

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        adapted = super().connect(*cargs, **cparams)
        adapted._connection = _WrappedConnection(adapted._connection)
        return adapted


registry.register("mysql.wrapped", __name__, "WrappedDialect")


async def test_a_driver_of_unknown_shape_warns_once_and_is_pinged_at_checkout(
    shared: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A dialect whose connections asyncgone cannot inspect is accepted; one WARNING names
    the driver and its version, and every checkout of a reused connection is pinged, so a
    KILLed idle connection is still replaced without a user-visible error."""
    url = shared.url("aiomysql").replace("mysql+aiomysql", "mysql+wrapped")
    engine = asyncgone.create_engine(url, pool_size=1)
    try:
        first = await connection_id(engine)
        await connection_id(engine)
        shared.kill(first)
        second = await connection_id(engine)
        stats = asyncgone.stats(engine)
        assert second != first
        assert stats.pings == 2
        assert stats.replaced == {"ping_failed": 1}
        warnings = [r for r in caplog.records if "does not recognise" in r.getMessage()]
        assert len(warnings) == 1
        assert warnings[0].levelno == logging.WARNING
        assert "wrapped driver" in warnings[0].getMessage()
        assert "tests " in warnings[0].getMessage()  # the module the connection came from
    finally:
        await engine.dispose()


async def test_deadlines_on_blackholed_connections_strand_nothing(url: str) -> None:
    """Ten anyio deadlines expiring around connect, SELECT and close on blackholed pooled
    connections leave nothing checked out (SQLAlchemy before 2.0.55, and 2.1.0 to 2.1.4,
    abort the invalidation half-way when a cancellation escapes terminate())."""
    with FaultProxy.for_url(url) as proxy:
        # No ping at checkout: the deadline lands in the statement, and then in the
        # terminate() that discards its connection.
        engine = asyncgone.create_engine(proxy.url, pool_size=2)
        try:
            for _ in range(10):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                proxy.blackhole()
                with anyio.move_on_after(0.3):
                    async with engine.connect() as conn:
                        await conn.execute(text("SELECT 1"))
                proxy.restore()
                assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            await anyio.lowlevel.checkpoint()  # no cancellation was left pending
        finally:
            await engine.dispose()


async def test_a_slow_error_listener_leaves_no_cancellation_behind(url: str) -> None:
    """A connection cut mid-statement while a slow synchronous handle_error listener runs
    inside an anyio deadline: the deadline's cancellation ends with its scope and does not
    hit the caller's next await (told apart from a native one by behaviour, whatever the
    message anyio gives it)."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url, pool_size=1)

        @event.listens_for(engine.sync_engine, "handle_error")
        def slow(ctx: Any) -> None:
            time.sleep(0.3)  # an application's synchronous logging, say

        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            with anyio.move_on_after(0.2) as scope:
                async with engine.connect() as conn:
                    asyncio.get_running_loop().call_later(0.05, proxy.cut)
                    await conn.execute(text("SELECT SLEEP(2)"))
            assert scope.cancelled_caught
            await anyio.sleep(0.01)  # a pending cancellation would land here
            assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            async with engine.connect() as conn:  # and the engine serves on
                assert (await conn.execute(text("SELECT 42"))).scalar_one() == 42
        finally:
            await engine.dispose()


async def test_the_keepalive_reaches_the_pool_it_was_built_for(url: str) -> None:
    """The keepalive's view of the pool's idle connections (SQLAlchemy's private QueuePool
    queue) works on this SQLAlchemy: a round visits every idle connection."""
    engine = asyncgone.create_engine(url, pool_size=3)
    try:
        async with engine.connect() as a, engine.connect() as b, engine.connect() as c:
            for conn in (a, b, c):
                await conn.execute(text("SELECT 1"))
        assert await asyncgone.keepalive(engine, interval=1000).run_once() == 3
        await eventually(lambda: asyncgone.stats(engine).keepalive_visits == 3)
    finally:
        await engine.dispose()


async def test_a_cancelled_scope_retiring_a_live_connection_strands_nothing(url: str) -> None:
    """A checkout that retires a live connection (past its idle limit) inside a cancel scope
    that was already cancelled: the scope cancels the polite close of the old connection,
    and the pool still gets its slot back. (SQLAlchemy 2.0.50 to 2.0.54 and 2.1.0 to 2.1.4
    would abort the invalidation half-way; asyncgone's closing guard absorbs the
    cancellation, which the scope delivers again at its next await.)"""
    engine = asyncgone.create_engine(url, pool_size=2, recycle=0.05)
    try:
        for _ in range(5):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            await anyio.sleep(0.1)  # past the idle limit: the next checkout retires it
            with anyio.CancelScope() as scope:
                scope.cancel()
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            assert scope.cancelled_caught
            assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert asyncgone.stats(engine).replaced["idle_limit"] >= 5
    finally:
        await engine.dispose()
