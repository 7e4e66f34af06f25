"""Scenario 2: an idle pooled connection is killed (KILL CONNECTION) from another session."""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import create_async_engine

import asyncgone
from tests._support import (
    Server,
    count_errors,
    plain_sqlalchemy_loop_errors_tolerated,
    plain_sqlalchemy_may_leak,
    wait_until,
    warm,
)

pytestmark = pytest.mark.anyio


async def test_killed_idle_connection_is_replaced_alone(url: str, shared: Server) -> None:
    """0 errors; only the killed connection is reconnected, the others are reused."""
    engine = asyncgone.create_engine(url, pool_size=3)
    try:
        ids = await warm(engine, 3)
        shared.kill(ids[1])
        await wait_until(lambda: ids[1] not in shared.threads())
        with count_errors(engine) as errors:
            again = await warm(engine, 3)
        assert errors == []
        assert set(again) >= {ids[0], ids[2]}
        assert ids[1] not in again
        stats = asyncgone.stats(engine)
        assert stats.connects == 4
        assert stats.replaced == {"closed_by_server": 1}
        assert (stats.pings, stats.pool_invalidations) == (0, 0)
    finally:
        await engine.dispose()


async def test_many_killed_connections_invalidate_the_pool_once(url: str, shared: Server) -> None:
    """Several connections found dead together invalidate the pool instead of one by one."""
    engine = asyncgone.create_engine(url, pool_size=5)
    try:
        ids = await warm(engine, 5)
        shared.kill(*ids)
        await wait_until(lambda: not set(ids) & shared.threads())
        with count_errors(engine) as errors:
            for _ in range(2):
                again = await warm(engine, 5)
        assert errors == []
        assert not set(ids) & set(again)
        stats = asyncgone.stats(engine)
        assert stats.pool_invalidations == 1
        assert stats.connects == 10  # each dead connection replaced once, nothing more
    finally:
        await engine.dispose()


@plain_sqlalchemy_may_leak
async def test_plain_sqlalchemy_fails_after_a_kill(url: str, shared: Server) -> None:
    """Control: plain SQLAlchemy hands out the killed connection and the unit fails."""
    engine = create_async_engine(url, pool_size=1)
    async with plain_sqlalchemy_loop_errors_tolerated():
        try:
            [thread] = await warm(engine, 1)
            shared.kill(thread)
            await anyio.sleep(0.1)
            with pytest.raises((sa_exc.OperationalError, RuntimeError)) as info:
                await warm(engine, 1)
            assert asyncgone.is_disconnect(info.value)
        finally:
            await engine.dispose()
