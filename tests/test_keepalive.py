"""The keepalive task's lifecycle: it starts, stops cleanly, survives failures, and refuses
nonsense."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from typing import Any

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

import asyncgone
from asyncgone import ConfigurationError
from asyncgone._server import auto_idle_limit
from asyncgone.testing import FaultProxy, MariaDBServer
from tests._support import Server, delta, eventually, warm

pytestmark = pytest.mark.anyio


def keepalive_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "asyncgone-keepalive"]


async def test_runs_while_the_block_runs_and_stops_with_it(url: str) -> None:
    """Rounds happen during the block; afterwards no keepalive task is left."""
    engine = asyncgone.create_engine(url, pool_size=2)
    try:
        await warm(engine, 2)
        async with asyncgone.keepalive(engine, interval=0.1) as keepalive:
            assert keepalive.interval == 0.1
            assert len(keepalive_tasks()) == 1
            await anyio.sleep(0.5)
        runs = asyncgone.stats(engine).keepalive_runs
        assert runs >= 3
        assert keepalive_tasks() == []
        await anyio.sleep(0.2)
        assert asyncgone.stats(engine).keepalive_runs == runs
    finally:
        await engine.dispose()


async def test_stops_when_the_block_is_cancelled(url: str) -> None:
    """Cancelling the code inside the block stops the task too."""
    engine = asyncgone.create_engine(url)
    try:
        with anyio.move_on_after(0.2):
            async with asyncgone.keepalive(engine, interval=0.05):
                await anyio.sleep(10)
        assert keepalive_tasks() == []
    finally:
        await engine.dispose()


async def test_stopping_during_a_ping_costs_no_connection(url: str) -> None:
    """A keepalive stopped while its ping is on a slow network lets that ping finish: the
    connection goes back to the pool alive, and the next requests open nothing."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url, pool_size=2)
        try:
            await warm(engine, 2)
            keepalive = await asyncgone.keepalive(engine, interval=0.2).start()
            try:
                proxy.set_latency(0.3)  # each way: a ping takes 0.6 s
                await eventually(lambda: asyncgone.stats(engine).keepalive_pings > 0)
            finally:
                await keepalive.stop()
            proxy.set_latency(0)
            pool = engine.sync_engine.pool
            assert (pool.checkedin(), pool.checkedout()) == (2, 0)  # type: ignore[attr-defined]
            await warm(engine, 2)
            stats = asyncgone.stats(engine)
            assert (stats.connects, stats.ping_failures, stats.replaced) == (2, 0, {})
        finally:
            await engine.dispose()


async def test_auto_interval_follows_the_server_and_network_limits(url: str) -> None:
    """ "auto" is half the shorter of the smallest idle limit and network_idle_limit."""
    short = asyncgone.create_engine(
        url, connect_args={"init_command": "SET SESSION wait_timeout=4"}
    )
    long = asyncgone.create_engine(url, network_idle_limit=100)
    try:
        await warm(short, 1)
        await warm(long, 1)
        assert asyncgone.keepalive(short).interval == pytest.approx(3.5 / 2)
        assert asyncgone.keepalive(long).interval == 50
    finally:
        await short.dispose()
        await long.dispose()


async def test_auto_interval_follows_wait_timeout_with_the_idle_limit_off(url: str) -> None:
    """With recycle=None, "auto" still follows the server's wait_timeout, though the
    connections get no idle limit."""
    init = {"init_command": "SET SESSION wait_timeout=4"}
    engine = asyncgone.create_engine(url, recycle=None, connect_args=init)
    try:
        async with engine.connect() as conn:
            assert (await conn.get_raw_connection()).info["asyncgone"].idle_limit == math.inf
        assert asyncgone.keepalive(engine).interval == pytest.approx(auto_idle_limit(4) / 2)
    finally:
        await engine.dispose()


async def test_a_shorter_idle_limit_wakes_the_running_keepalive(url: str) -> None:
    """A connection whose server closes idle sessions sooner than any before (wait_timeout
    lowered at runtime, another server after a failover) wakes a keepalive that was
    sleeping on the old interval (a minute): it pings within that connection's limit, and
    the connection is not lost."""
    engine = asyncgone.create_engine(url, pool_size=2)
    lowered = False

    @event.listens_for(engine.sync_engine, "connect", insert=True)
    def session_timeout(dbapi_connection: Any, record: Any) -> None:
        if lowered:  # connections from now on: closed by the server after 3 idle seconds
            cursor = dbapi_connection.cursor()
            cursor.execute("SET SESSION wait_timeout=3")
            cursor.close()

    try:
        await warm(engine, 1)
        async with asyncgone.keepalive(engine) as running:
            assert running.interval == 120  # half network_idle_limit: a 60 s sleep
            lowered = True
            await warm(engine, 2)  # a second connection, with the shorter limit
            assert running.interval == pytest.approx(auto_idle_limit(3) / 2)
            await anyio.sleep(6)  # twice the new connection's limit
            stats = asyncgone.stats(engine)
            assert stats.keepalive_runs >= 2
            assert stats.keepalive_pings >= 2
        await warm(engine, 2)
        assert asyncgone.stats(engine).replaced == {}  # nothing closed by the server
    finally:
        await engine.dispose()


async def test_wait_timeout_is_read_in_one_query_and_only_when_needed(
    disposable: Server, driver: str
) -> None:
    """A new connection asks the server for its wait_timeout in one query, shared by the idle
    limit and the automatic keepalive interval, and not at all when neither needs it."""

    async def connect_cost(**options: object) -> int:
        engine = asyncgone.create_engine(disposable.url(driver), pool_size=2, **options)
        try:
            # The dialect's first-connect queries go with the first connection: not counted.
            async with engine.connect():
                before = disposable.status()
                async with engine.connect():
                    pass
                counts = delta(before, disposable.status())
            assert counts["Connections"] == 1
            return counts["Questions"]
        finally:
            await engine.dispose()

    neither = await connect_cost(recycle=None, keepalive_interval=60)
    assert await connect_cost() == neither + 1  # recycle and interval "auto": one query
    assert await connect_cost(recycle=None) == neither + 1  # for the interval alone


async def test_failed_rounds_are_counted_and_the_task_carries_on(
    disposable_server: MariaDBServer,
    disposable: Server,
    driver: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the server down a round fails: logged, counted; after it returns, rounds succeed."""
    engine = asyncgone.create_engine(disposable.url(driver), pool_size=2, connect_timeout=1)
    try:
        await warm(engine, 2)
        async with asyncgone.keepalive(engine, interval=0.2, min_idle=2):
            await anyio.to_thread.run_sync(disposable_server.kill)
            try:
                await eventually(lambda: asyncgone.stats(engine).keepalive_errors > 0, 20)
            finally:
                await anyio.to_thread.run_sync(disposable_server.start)
            before = asyncgone.stats(engine).keepalive_visits
            await eventually(lambda: asyncgone.stats(engine).keepalive_visits > before, 20)
        assert "keepalive round failed" in caplog.text
    finally:
        await engine.dispose()


async def test_database_runs_a_keepalive_unless_told_not_to(url: str) -> None:
    """Database(keepalive=True) (the default) runs one while started, and stops it on exit."""
    async with asyncgone.Database(url, keepalive_interval=0.05):
        assert len(keepalive_tasks()) == 1
    assert keepalive_tasks() == []
    async with asyncgone.Database(url, keepalive=False):
        assert keepalive_tasks() == []


async def test_bad_arguments_are_refused(url: str) -> None:
    """Nonsense intervals and engines asyncgone did not make are refused at once."""
    engine = asyncgone.create_engine(url)
    plain = create_async_engine(url)
    try:
        with pytest.raises(ConfigurationError, match="interval"):
            asyncgone.keepalive(engine, interval=-1)
        with pytest.raises(ConfigurationError, match="min_idle"):
            asyncgone.keepalive(engine, min_idle=-2)
        with pytest.raises(ConfigurationError, match="create_engine"):
            asyncgone.keepalive(plain)
        with pytest.raises(ConfigurationError, match="keepalive_interval"):
            asyncgone.create_engine(url, keepalive_interval="often")
        with pytest.raises(ConfigurationError, match="network_idle_limit"):
            asyncgone.create_engine(url, network_idle_limit=0)
    finally:
        await engine.dispose()
        await plain.dispose()


SCRIPT = """
import asyncio
import asyncgone

async def main():
    engine = asyncgone.create_engine()
    await asyncgone.keepalive(engine, interval=0.05).start()   # never stopped
    async with engine.connect():
        pass
    await asyncio.sleep(0.2)
    await engine.dispose()
    print("done")

asyncio.run(main())
"""


def test_a_forgotten_keepalive_does_not_keep_the_loop_alive(url: str) -> None:
    """A script that never stops its keepalive still ends at once, warning-free."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", SCRIPT],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "done\n", "")
