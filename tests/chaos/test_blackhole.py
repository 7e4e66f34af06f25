"""Scenario 4: a connection's network path silently drops every byte (blackhole).

Through the FaultProxy the blackhole is in user space (the load-balancer case behind a
proxy): only asyncgone's bounded ping can notice it. ``test_tcp_keepalive.py`` blackholes a
path in the kernel, where TCP keepalive and TCP_USER_TIMEOUT notice it mid-query.
"""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

import asyncgone
from asyncgone.testing import FaultProxy
from tests._support import (
    connection_id,
    count_errors,
    plain_sqlalchemy_loop_errors_tolerated,
    plain_sqlalchemy_may_leak,
    warm,
)

pytestmark = pytest.mark.anyio

PING_TIMEOUT = 1.0


async def test_blackholed_idle_connection_is_replaced_within_the_ping_timeout(url: str) -> None:
    """The next unit of work completes on a fresh connection in about ``ping_timeout``."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(
            proxy.url, pool_size=2, ping_after=0.2, ping_timeout=PING_TIMEOUT
        )
        try:
            ids = await warm(engine, 2)
            await anyio.sleep(0.3)
            assert proxy.blackhole() == 2
            started = time.monotonic()
            with anyio.fail_after(15), count_errors(engine) as errors:  # never hangs
                fresh = await connection_id(engine)
            elapsed = time.monotonic() - started
            assert fresh not in ids
            assert errors == []
            assert elapsed < PING_TIMEOUT + 5  # one ping timeout plus a reconnect
            stats = asyncgone.stats(engine)
            assert stats.replaced == {"ping_timeout": 1}
            assert stats.ping_failures == 1
        finally:
            await engine.dispose()


async def test_connection_used_recently_is_not_pinged(url: str) -> None:
    """A connection idle for less than ``ping_after`` goes out without any round trip."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url, pool_size=1, ping_after=30)
        try:
            await warm(engine, 1)
            for _ in range(5):
                await connection_id(engine)
            assert asyncgone.stats(engine).pings == 0
        finally:
            await engine.dispose()


@plain_sqlalchemy_may_leak
async def test_plain_pre_ping_hangs_on_a_blackholed_connection(url: str) -> None:
    """Control: SQLAlchemy's unbounded pre-ping hangs on the same fault (we give up at 3 s)."""
    async with plain_sqlalchemy_loop_errors_tolerated():
        with FaultProxy.for_url(url) as proxy:
            engine = create_async_engine(proxy.url, pool_size=1, pool_pre_ping=True)
            try:
                await warm(engine, 1)
                proxy.blackhole()
                with anyio.move_on_after(3) as scope:
                    await connection_id(engine)
                assert scope.cancelled_caught
            finally:
                await engine.dispose()


async def test_connect_to_a_blackholed_server_fails_within_connect_timeout(url: str) -> None:
    """A server that accepts TCP but never greets fails the connect in ``connect_timeout``."""
    with FaultProxy.for_url(url) as proxy:
        proxy.blackhole(include_new=True)
        engine = asyncgone.create_engine(proxy.url, connect_timeout=1)
        try:
            started = time.monotonic()
            with anyio.fail_after(15), pytest.raises(Exception, match="2003") as info:
                await connection_id(engine)
            assert time.monotonic() - started < 1 + 5
            assert "connect_timeout" in str(info.value)
        finally:
            await engine.dispose()


@pytest.mark.parametrize("where", ["statement", "checkout ping"])
async def test_cancel_scope_expiring_on_a_blackholed_connection_strands_nothing(
    url: str, where: str
) -> None:
    """An anyio deadline that expires on a blackholed connection (mid-statement, or in the
    checkout ping) leaves nothing checked out: the pool discards the connection even though
    the scope cancels the discard's graceful close too (SQLAlchemy < 2.0.55 did not)."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(
            proxy.url, pool_size=1, ping_after=0 if where == "checkout ping" else 3600
        )
        try:
            await warm(engine, 1)
            proxy.blackhole(include_new=True)
            with anyio.move_on_after(0.3) as scope:
                await connection_id(engine)
            assert scope.cancelled_caught
            assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            await anyio.lowlevel.checkpoint()  # no cancellation is left pending past the scope
            proxy.restore()
            with anyio.fail_after(15):
                await connection_id(engine)  # the pool works on
        finally:
            await engine.dispose()
