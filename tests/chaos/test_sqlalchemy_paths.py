"""Connections that die on SQLAlchemy's own paths (pre-ping, statements, reset, close,
connect): callers meet SQLAlchemy's ``OperationalError`` for a lost connection or nothing
at all, never a raw transport error, and the pool keeps serving."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.util import greenlet_spawn

import asyncgone
from asyncgone.testing import FaultProxy
from tests._support import count_errors

pytestmark = pytest.mark.anyio


def assert_lost_connection(error: BaseException) -> None:
    """``error`` is what a lost connection raises through SQLAlchemy: its OperationalError
    around the driver's 2006/2013, recognised by ``is_disconnect``."""
    assert isinstance(error, sa_exc.OperationalError), repr(error)
    assert error.orig is not None
    assert error.orig.args[0] in (2006, 2013), repr(error.orig)
    assert asyncgone.is_disconnect(error)


def pool_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR records SQLAlchemy's pool logged (a failed reset, close or terminate)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("sqlalchemy")
    ]


async def test_old_pre_ping_keyword_survives_a_reset_idle_connection(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The field report: pool_pre_ping=True kept from plain SQLAlchemy, one query, the idle
    connection reset by the network, and 0.2 s later the next query simply works (uvloop
    used to raise its closed-transport RuntimeError from SQLAlchemy's own pre-ping)."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url, pool_pre_ping=True)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            proxy.cut()
            await anyio.sleep(0.2)
            with count_errors(engine) as errors:
                async with engine.connect() as conn:
                    assert (await conn.execute(text("SELECT 42"))).scalar_one() == 42
            assert errors == []
            assert asyncgone.stats(engine).replaced_total == 1
        finally:
            await engine.dispose()
    assert pool_errors(caplog) == []


async def test_pre_ping_pings_every_checkout_after_the_socket_check(url: str) -> None:
    """With pool_pre_ping=True a reused connection is pinged at each checkout (bounded),
    and one the socket check already found dead is replaced without a ping."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url, pool_pre_ping=True, pool_size=1)
        try:
            for _ in range(3):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            assert asyncgone.stats(engine).pings == 2  # the first checkout opened it
            proxy.cut()
            await anyio.sleep(0.1)
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            stats = asyncgone.stats(engine)
            assert (stats.pings, stats.replaced) == (2, {"closed_by_server": 1})
        finally:
            await engine.dispose()


async def test_a_statement_cut_mid_flight_raises_operational_error(url: str) -> None:
    """A connection cut while a statement runs raises SQLAlchemy's OperationalError (2006
    or 2013), on every loop; the connection is discarded and the next statement works."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url, pool_size=1)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            with pytest.raises(sa_exc.OperationalError) as raised:
                async with engine.connect() as conn:
                    asyncio.get_running_loop().call_later(0.1, proxy.cut)
                    await conn.execute(text("SELECT SLEEP(2)"))
            assert_lost_connection(raised.value)
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 42"))).scalar_one() == 42
        finally:
            await engine.dispose()


async def test_a_statement_on_a_connection_reset_while_held(url: str) -> None:
    """A connection reset while the application holds it between statements: the next
    statement raises OperationalError, never the transport's own error."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url, pool_size=1)
        try:
            with pytest.raises(sa_exc.OperationalError) as raised:
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                    proxy.cut()
                    await anyio.sleep(0.2)
                    await conn.execute(text("SELECT 2"))
            assert_lost_connection(raised.value)
        finally:
            await engine.dispose()


async def test_reset_and_close_of_a_dead_connection_log_no_error(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection that needs a ROLLBACK on return, reset by the network first, is
    discarded quietly; disposing of the engine after more resets logs nothing either."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url, pool_size=2)
        try:

            def raw_insert_then_cut() -> None:
                raw = engine.sync_engine.raw_connection()
                try:
                    cursor = raw.cursor()
                    cursor.execute("SELECT 1")  # a result left behind: the return rolls back
                    cursor.close()
                    proxy.cut()
                finally:
                    raw.close()

            await greenlet_spawn(raw_insert_then_cut)
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 42"))).scalar_one() == 42
            async with engine.connect() as a, engine.connect() as b:
                await a.execute(text("SELECT 1"))
                await b.execute(text("SELECT 1"))
            proxy.cut()
            await anyio.sleep(0.1)
        finally:
            await engine.dispose()
    assert pool_errors(caplog) == []


async def test_a_new_connection_cut_during_asyncgone_query_raises_operational_error(
    url: str,
) -> None:
    """asyncgone's own query on a new connection (its wait_timeout) cut by the network: the
    connect raises OperationalError (2013), not a timeout or a transport error, and the
    next connect works."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url)
        try:
            proxy.cut_on(b"@@session.wait_timeout")
            with pytest.raises(sa_exc.OperationalError) as raised:
                async with engine.connect():
                    pass
            assert_lost_connection(raised.value)
            assert asyncgone.is_unavailable(raised.value)
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 42"))).scalar_one() == 42
        finally:
            await engine.dispose()


async def test_run_replays_across_every_path(url: str) -> None:
    """Database.run() replays a unit of work whose connection was reset on any of these
    paths: each failure is one it recognises as a disconnect."""
    with FaultProxy.for_url(url) as proxy:
        async with asyncgone.Database(proxy.url, pool_pre_ping=True, keepalive=False) as db:

            async def unit(session: Any) -> int:
                if attempts.append(1) or len(attempts) == 1:
                    proxy.cut()
                    await anyio.sleep(0.1)
                return int((await session.execute(text("SELECT 7"))).scalar_one())

            attempts: list[int] = []
            assert await db.run(unit) == 7
            assert len(attempts) == 2
