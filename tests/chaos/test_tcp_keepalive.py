"""Kernel-level dead-peer detection: TCP keepalive and TCP_USER_TIMEOUT on a real blackhole.

The server runs in a network namespace; taking its link down drops packets in the kernel.
Short settings keep the tests quick; ``test_sockets.py`` checks the defaults are applied.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

import asyncgone
from asyncgone import TCPKeepalive
from asyncgone.testing import MariaDBServer
from tests._netns import NetNamespace

pytestmark = pytest.mark.anyio

FAST = TCPKeepalive(idle=1, interval=1, count=2, user_timeout=3)


@pytest.fixture
def anyio_backend() -> str:
    """The kernel does the work here; the event loop only applies the options, which
    ``test_sockets.py`` checks under uvloop too. One loop keeps these slow tests short."""
    return "asyncio"


@pytest.fixture(scope="module")
def namespace() -> Iterator[NetNamespace]:
    with NetNamespace() as ns:
        yield ns


@pytest.fixture(scope="module")
def remote(namespace: NetNamespace) -> Iterator[MariaDBServer]:
    """A MariaDB reachable only across the namespace's veth link."""
    with MariaDBServer(host=namespace.address, wrapper=namespace.wrapper) as server:
        yield server


@pytest.fixture
def path(namespace: NetNamespace, remote: MariaDBServer) -> Iterator[NetNamespace]:
    """The namespace's link, brought back up after each test."""
    yield namespace
    namespace.restore(remote.port)


async def test_blackhole_mid_query_is_detected_by_the_kernel(
    remote: MariaDBServer, path: NetNamespace, driver: str
) -> None:
    """A query in flight when the path goes dark fails as a disconnect within seconds."""
    engine = asyncgone.create_engine(remote.url(driver), tcp_keepalive=FAST)
    try:
        async with engine.connect() as conn:

            async def cut_soon() -> None:
                await anyio.sleep(1)
                await anyio.to_thread.run_sync(path.blackhole)

            started = time.monotonic()
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(cut_soon)
                    with pytest.raises(sa_exc.OperationalError) as info:
                        await conn.execute(text("SELECT SLEEP(60)"))
            assert asyncgone.is_disconnect(info.value)
            assert time.monotonic() - started < 15
    finally:
        await engine.dispose()


async def test_long_query_on_a_live_server_is_never_cut(
    remote: MariaDBServer, path: NetNamespace, driver: str
) -> None:
    """The peer's kernel answers keepalive probes, so a query longer than every timeout runs."""
    engine = asyncgone.create_engine(remote.url(driver), tcp_keepalive=FAST)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text("SELECT SLEEP(5)"))
            assert result.scalar_one() == 0
    finally:
        await engine.dispose()


async def test_without_tcp_settings_the_same_blackhole_hangs(
    remote: MariaDBServer, path: NetNamespace
) -> None:
    """Control: with the kernel's defaults the query is still waiting after 6 seconds."""
    engine = asyncgone.create_engine(remote.url("asyncmy"), tcp_keepalive=None)
    try:
        conn = await engine.connect()
        await conn.execute(text("SELECT 1"))
        await anyio.to_thread.run_sync(path.blackhole)
        with anyio.move_on_after(6) as scope:
            await conn.execute(text("SELECT SLEEP(60)"))
        assert scope.cancelled_caught
        # The abandoned connection's cleanup is not under test here (SQLAlchemy 2.0 raises
        # from it after a cancel scope interrupted the invalidation).
        with contextlib.suppress(sa_exc.DBAPIError):
            await conn.close()
    finally:
        await engine.dispose()
