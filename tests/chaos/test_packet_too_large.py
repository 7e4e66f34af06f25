"""Scenario 5: a statement larger than ``max_allowed_packet``; the server answers 1153 and
closes the connection."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncgone
from asyncgone._errors import error_code
from tests._support import Server, warm

pytestmark = pytest.mark.anyio


async def send_oversized(engine: AsyncEngine, shared: Server) -> BaseException:
    [(limit,)] = shared.query("SELECT @@max_allowed_packet")
    with pytest.raises((sa_exc.OperationalError, sa_exc.InternalError)) as info:
        async with engine.begin() as conn:
            await conn.execute(text("SELECT :blob"), {"blob": "x" * (int(limit) + 1)})
    return info.value


async def test_caller_sees_1153_and_the_other_connections_stay(url: str, shared: Server) -> None:
    """The caller gets 1153 itself, not a 2013 from the rollback; only that connection goes."""
    engine = asyncgone.create_engine(url, pool_size=3)
    try:
        ids = await warm(engine, 3)
        error = await send_oversized(engine, shared)
        assert error_code(error) == 1153
        assert "max_allowed_packet" in str(error)
        again = await warm(engine, 3)
        assert len(set(ids) & set(again)) == 2
        stats = asyncgone.stats(engine)
        assert stats.connects == 4
        assert stats.pool_invalidations == 0
    finally:
        await engine.dispose()


async def test_plain_sqlalchemy_reports_2013_instead(url: str, shared: Server) -> None:
    """Control: plain SQLAlchemy hides the 1153 behind the rollback's 2013."""
    engine = create_async_engine(url, pool_size=3)
    try:
        error = await send_oversized(engine, shared)
        assert error_code(error) == 2013
    finally:
        await engine.dispose()
