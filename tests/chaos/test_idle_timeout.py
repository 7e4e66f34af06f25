"""Scenario 1: a pooled connection sits idle past its session ``wait_timeout``, then is used."""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import create_async_engine

import asyncgone
from asyncgone._server import auto_idle_limit
from asyncgone.testing import FaultProxy
from tests._support import (
    Server,
    connection_id,
    count_errors,
    plain_sqlalchemy_loop_errors_tolerated,
    plain_sqlalchemy_may_leak,
    wait_until,
    warm,
)

pytestmark = pytest.mark.anyio


INACTIVITY_4031 = FaultProxy.error_packet(
    4031, "The client was disconnected by the server because of inactivity.", seq=0
)


def short_wait_timeout(seconds: int) -> dict[str, object]:
    return {"connect_args": {"init_command": f"SET SESSION wait_timeout={seconds}"}}


async def test_server_closed_idle_connection_is_replaced_without_error(
    url: str, shared: Server
) -> None:
    """With the idle limit off, the socket check alone spots the server's close: 0 errors."""
    engine = asyncgone.create_engine(url, recycle=None, **short_wait_timeout(1))
    try:
        [first] = await warm(engine, 1)
        await wait_until(lambda: first not in shared.threads())
        with count_errors(engine) as errors:
            second = await connection_id(engine)
        assert second != first
        assert errors == []
        stats = asyncgone.stats(engine)
        assert stats.replaced == {"closed_by_server": 1}
        assert stats.pings == 0
    finally:
        await engine.dispose()


async def test_unsolicited_error_packet_is_spotted_while_the_socket_is_open(url: str) -> None:
    """MySQL 8's 4031 (sent to a connection idle past wait_timeout) waiting unread on still
    open sockets: those idle connections are replaced at checkout, 0 errors, no ping."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url, recycle=None, pool_size=2)
        try:
            ids = await warm(engine, 2)
            assert proxy.send_to_clients(INACTIVITY_4031) == 2
            await anyio.sleep(0.2)  # the packets are in; the proxy keeps the sockets open
            with count_errors(engine) as errors:
                again = await warm(engine, 2)
            assert errors == []
            assert not set(ids) & set(again)
            stats = asyncgone.stats(engine)
            assert stats.pings == 0
            assert sum(stats.replaced.values()) == 2
        finally:
            await engine.dispose()


async def test_idle_limit_follows_the_session_wait_timeout(url: str) -> None:
    """``recycle='auto'`` derives each connection's idle limit from @@session.wait_timeout."""
    engine = asyncgone.create_engine(url, **short_wait_timeout(7))
    try:
        async with engine.connect() as conn:
            assert (await conn.get_raw_connection()).info["asyncgone"].idle_limit == pytest.approx(
                auto_idle_limit(7)
            )
    finally:
        await engine.dispose()


async def test_idle_limit_retires_the_connection_before_the_server_does(
    url: str, shared: Server
) -> None:
    """A connection idle past ``recycle`` is retired at checkout while the server still has it."""
    engine = asyncgone.create_engine(url, recycle=0.5)
    try:
        [first] = await warm(engine, 1)
        await anyio.sleep(0.8)
        with count_errors(engine) as errors:
            second = await connection_id(engine)
        assert second != first
        assert errors == []
        assert asyncgone.stats(engine).replaced == {"idle_limit": 1}
    finally:
        await engine.dispose()


async def test_idle_past_a_short_wait_timeout_with_defaults(url: str, shared: Server) -> None:
    """With every default on, a connection idle past its 2 s wait_timeout is used: 0 errors."""
    engine = asyncgone.create_engine(url, **short_wait_timeout(2))
    try:
        [first] = await warm(engine, 1)
        await anyio.sleep(2.5)
        with count_errors(engine) as errors:
            second = await connection_id(engine)
        assert (second != first, errors) == (True, [])
        assert asyncgone.stats(engine).replaced_total == 1
    finally:
        await engine.dispose()


@plain_sqlalchemy_may_leak
async def test_plain_sqlalchemy_fails_on_the_same_fault(url: str, shared: Server) -> None:
    """Control: the fault is real; plain SQLAlchemy raises 2006/2013 on that connection."""
    engine = create_async_engine(url, **short_wait_timeout(1))  # type: ignore[arg-type]
    async with plain_sqlalchemy_loop_errors_tolerated():
        try:
            [first] = await warm(engine, 1)
            await wait_until(lambda: first not in shared.threads())
            with pytest.raises((sa_exc.OperationalError, RuntimeError)) as info:
                await connection_id(engine)
            assert asyncgone.is_disconnect(info.value)
        finally:
            await engine.dispose()
