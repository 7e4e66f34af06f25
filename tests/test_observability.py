"""What asyncgone reports: counters, log lines, health, leaks and Prometheus metrics."""

from __future__ import annotations

import logging
import time

import anyio
import anyio.to_thread
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

import asyncgone
import asyncgone.prometheus
from asyncgone.testing import FaultProxy, MariaDBServer
from tests._support import Server, connection_id, wait_until, warm

pytestmark = pytest.mark.anyio


async def test_counts_checks_and_errors_by_code(url: str, shared: Server) -> None:
    """Reused connections are counted as checked; a disconnect in use is counted by code."""
    engine = asyncgone.create_engine(url, pool_size=1)
    try:
        for _ in range(3):
            await connection_id(engine)
        stats = asyncgone.stats(engine)
        assert (stats.checkouts, stats.checks) == (3, 2)
        async with engine.connect() as conn:
            thread = (await conn.execute(text("SELECT CONNECTION_ID()"))).scalar_one()
            await anyio.to_thread.run_sync(shared.kill, thread)
            with pytest.raises((sa_exc.OperationalError, RuntimeError)):
                await conn.execute(text("SELECT 1"))
        errors = asyncgone.stats(engine).errors
        assert sum(errors.values()) == 1
        assert set(errors) <= {2006, 2013, 0}
    finally:
        await engine.dispose()


async def test_log_levels(url: str, shared: Server, caplog: pytest.LogCaptureFixture) -> None:
    """WARNING for a dead connection replaced, INFO for a routine retirement and for a
    pool-wide invalidation, DEBUG for pings."""
    caplog.set_level(logging.DEBUG, logger="asyncgone")
    engine = asyncgone.create_engine(url, pool_size=3, max_lifetime=0.3, ping_after=0)
    try:
        ids = await warm(engine, 3)
        await connection_id(engine)  # reused at once: pinged (ping_after=0)
        shared.kill(*ids)
        await wait_until(lambda: not set(ids) & shared.threads())
        await warm(engine, 3)  # three found dead together: invalidation
        await anyio.sleep(0.4)
        await connection_id(engine)  # lifetime over: retired
        records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "asyncgone"]
        assert any(lvl == logging.DEBUG and "pinging connection" in m for lvl, m in records)
        assert any(lvl == logging.WARNING and "closed_by_server" in m for lvl, m in records)
        assert any(lvl == logging.INFO and "invalidating all pooled" in m for lvl, m in records)
        assert any(lvl == logging.INFO and "max_lifetime" in m for lvl, m in records)
    finally:
        await engine.dispose()


async def leaky_handler(engine: object) -> None:
    async with engine.connect() as conn:  # type: ignore[attr-defined]
        await conn.execute(text("SELECT 1"))
        await anyio.sleep(0.5)


async def test_leak_warning_names_the_acquiring_code(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection held past leak_threshold is reported once, with the stack that took it;
    one returned in time is not."""
    caplog.set_level(logging.WARNING, logger="asyncgone")
    engine = asyncgone.create_engine(url.replace("root@", "root:pw-not-shown@"), leak_threshold=0.2)
    try:
        with pytest.raises(sa_exc.OperationalError):  # the password is wrong: connect fails
            await connection_id(engine)
    finally:
        await engine.dispose()
    engine = asyncgone.create_engine(url, leak_threshold=0.2)
    try:
        await connection_id(engine)  # quick: no report
        await leaky_handler(engine)
        stats = asyncgone.stats(engine)
        assert stats.leaks == 1
        report = next(r.getMessage() for r in caplog.records if "leak_threshold" in r.getMessage())
        assert "leaky_handler" in report
        assert "pw-not-shown" not in caplog.text
    finally:
        await engine.dispose()


async def test_health_reports_ok_and_failure_in_time(
    disposable_server: MariaDBServer, disposable: Server, driver: str
) -> None:
    """health() answers ok with latency; with the server down, not ok with the error."""
    async with asyncgone.Database(disposable.url(driver), pool_size=2) as db:
        report = await db.health()
        assert report.ok
        assert report.latency is not None
        assert report.pool.size == 2
        assert (
            report.as_dict()["target"]
            == f"mysql+{driver}://root@{disposable.host}:{disposable.port}/test"
        )
        await anyio.to_thread.run_sync(disposable_server.kill)
        try:
            report = await db.health(timeout=3)
        finally:
            await anyio.to_thread.run_sync(disposable_server.start)
        assert not report.ok
        assert "2003" in (report.error or "")


async def test_health_is_bounded_on_a_blackholed_path(url: str) -> None:
    """A server that never answers makes health() return not ok within its timeout, and the
    connection it was checking goes back to the pool."""
    with FaultProxy.for_url(url) as proxy:
        async with asyncgone.Database(proxy.url, keepalive=False, ping_after=0) as db:
            proxy.blackhole(include_new=True)
            started = time.monotonic()
            report = await db.health(timeout=1.0)
            assert time.monotonic() - started < 1.0 + 2
            assert not report.ok
            assert report.error == "no answer within 1 s"
            assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_prometheus_metrics(url: str) -> None:
    """Counters and pool gauges appear under their conventional names, labelled by engine."""
    registry = CollectorRegistry()
    async with asyncgone.Database(url, pool_size=3, keepalive=False) as db:
        asyncgone.prometheus.register(db, name="main", registry=registry)
        for _ in range(4):
            await db.run(lambda s: s.execute(text("SELECT 1")))
        exposition = generate_latest(registry).decode()
    assert 'asyncgone_checkouts_total{engine="main"} 5.0' in exposition  # 4 + start()'s probe
    assert 'asyncgone_pool_size{engine="main"} 3.0' in exposition
    assert 'asyncgone_pool_checked_out{engine="main"} 0.0' in exposition
    assert "# TYPE asyncgone_connections_replaced_total counter" in exposition
    assert 'asyncgone_resets_skipped_total{engine="main"}' in exposition
