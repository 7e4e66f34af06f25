"""What asyncgone reports: counters, log lines, health, leaks and Prometheus metrics."""

from __future__ import annotations

import gc
import logging
import time
import weakref

import anyio
import anyio.to_thread
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

import asyncgone
import asyncgone.prometheus
from asyncgone._state import state_of
from asyncgone.testing import FaultProxy, MariaDBServer
from tests._support import Server, connection_id, eventually, wait_until, warm

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


async def test_health_says_when_the_pool_is_exhausted(url: str) -> None:
    """With every connection the pool may open in use, health() answers not ok within its
    timeout and says that the pool, not the server, is the reason."""
    async with asyncgone.Database(url, pool_size=1, max_overflow=0, keepalive=False) as db:
        async with db.engine.connect():
            report = await db.health(timeout=0.5)
        assert not report.ok
        assert report.error == (
            "no connection within 0.5 s: all 1 the pool may open (pool_size + max_overflow) "
            "are in use"
        )
        assert (await db.health(timeout=2)).ok


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


async def test_prometheus_timings_and_pool_figures(url: str) -> None:
    """The timing histograms, pending requests, timeouts and pool limits are exported:
    a request waiting behind a held connection is pending, and one that gives up after
    pool_timeout counts as a timeout."""
    registry = CollectorRegistry()
    engine = asyncgone.create_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.5)
    asyncgone.prometheus.register(engine, name="main", registry=registry)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"engine": "main", **labels})

    try:
        for _ in range(3):
            await connection_id(engine)
        held = await engine.connect()
        async with anyio.create_task_group() as tg:
            tg.start_soon(connection_id, engine)
            await eventually(lambda: sample("asyncgone_pool_pending_requests") == 1)
            await anyio.sleep(0.2)
            await held.close()
        async with engine.connect():
            with pytest.raises(sa_exc.TimeoutError):
                await connection_id(engine)
        exposition = generate_latest(registry).decode()
    finally:
        await engine.dispose()
    assert sample("asyncgone_pool_pending_requests") == 0
    assert sample("asyncgone_pool_timeouts_total") == 1
    assert sample("asyncgone_connection_use_seconds_count") == 6
    # Six checkouts; the request that timed out obtained nothing and is not among them.
    assert sample("asyncgone_connection_wait_seconds_count") == 6
    assert sample("asyncgone_connection_wait_seconds_bucket", le="+Inf") == 6
    # One waited 0.2 s; any other may take longer than 0.1 s on a loaded machine (the
    # first one opens the connection).
    assert (sample("asyncgone_connection_wait_seconds_bucket", le="0.1") or 0) <= 5
    assert (sample("asyncgone_connection_wait_seconds_sum") or 0) >= 0.19
    assert sample("asyncgone_connection_create_seconds_count") == 1
    assert 0 < (sample("asyncgone_connection_create_seconds_sum") or 0) < 5
    assert (sample("asyncgone_pool_max"), sample("asyncgone_pool_idle_max")) == (1, 1)
    assert (sample("asyncgone_pool_idle_min"), sample("asyncgone_pool_idle_dead")) == (0, 0)
    assert sample("asyncgone_keepalive_visits_total") == 0
    assert "# TYPE asyncgone_connection_wait_seconds histogram" in exposition
    assert 'asyncgone_connection_use_seconds_bucket{engine="main",le="0.0001"}' in exposition


async def test_prometheus_database_registered_before_start(url: str) -> None:
    """A Database registered before start() exports nothing until it starts; its timings
    start at the first scrape after that."""
    registry = CollectorRegistry()
    db = asyncgone.Database(url, keepalive=False)
    asyncgone.prometheus.register(db, name="main", registry=registry)
    assert "asyncgone_" not in generate_latest(registry).decode()
    async with db:
        generate_latest(registry)  # the first scrape after start() attaches the timings
        await db.run(lambda s: s.execute(text("SELECT 1")))
        use = registry.get_sample_value(
            "asyncgone_connection_use_seconds_count", {"engine": "main"}
        )
        checkouts = registry.get_sample_value("asyncgone_checkouts_total", {"engine": "main"})
    assert (use, checkouts) == (1, 2)  # the probe in start() came before the timings


async def test_prometheus_exports_several_engines_through_one_registry(url: str) -> None:
    """Two engines registered in one registry (one that checks duplicates, as REGISTRY
    does) are both reported, each under its own label, in one family per metric name; a
    third engine with a label already taken is refused, its timing hooks taken off."""
    registry = CollectorRegistry(auto_describe=True)
    first = asyncgone.create_engine(url)
    second = asyncgone.create_engine(url, pool_size=2)
    third = asyncgone.create_engine(url)
    try:
        asyncgone.prometheus.register(first, name="first", registry=registry)
        asyncgone.prometheus.register(second, name="second", registry=registry)
        with pytest.raises(ValueError, match="'second' is already exported"):
            asyncgone.prometheus.register(third, name="second", registry=registry)
        assert state_of(third).metrics is None  # type: ignore[union-attr]
        await connection_id(first)
        for _ in range(2):
            await connection_id(second)
        exposition = generate_latest(registry).decode()
    finally:
        for engine in (first, second, third):
            await engine.dispose()
    assert exposition.count("# TYPE asyncgone_checkouts_total counter") == 1
    assert exposition.count("# TYPE asyncgone_connection_use_seconds histogram") == 1
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    checkouts = {s.labels["engine"]: s.value for s in families["asyncgone_checkouts"].samples}
    assert checkouts == {"first": 1, "second": 2}
    sizes = {s.labels["engine"]: s.value for s in families["asyncgone_pool_size"].samples}
    assert sizes == {"first": 5, "second": 2}


async def test_prometheus_close_takes_the_engine_out_and_its_timing_hooks_off(url: str) -> None:
    """close() takes the engine out of its registry and removes its timing hooks; the
    other engine stays reported, and after the last one the registry reports nothing of
    asyncgone's and takes a new registration."""
    registry = CollectorRegistry(auto_describe=True)
    first = asyncgone.create_engine(url)
    second = asyncgone.create_engine(url)
    try:
        collector = asyncgone.prometheus.register(first, name="first", registry=registry)
        other = asyncgone.prometheus.register(second, name="second", registry=registry)
        await connection_id(first)
        assert state_of(first).metrics is not None  # type: ignore[union-attr]
        collector.close()
        collector.close()  # a second call does nothing
        assert state_of(first).metrics is None  # type: ignore[union-attr]
        assert "connect" not in vars(first.sync_engine.pool)
        names = {family.name for family in collector.collect()}
        assert "asyncgone_checkouts" in names
        assert "asyncgone_connection_wait_seconds" not in names
        exposition = generate_latest(registry).decode()
        assert 'engine="second"' in exposition
        assert 'engine="first"' not in exposition
        other.close()
        assert "asyncgone_" not in generate_latest(registry).decode()
        again = asyncgone.prometheus.register(first, name="first", registry=registry)
        assert 'asyncgone_checkouts_total{engine="first"}' in generate_latest(registry).decode()
        again.close()
    finally:
        await first.dispose()
        await second.dispose()


async def test_prometheus_registration_refused_by_the_registry_takes_nothing(url: str) -> None:
    """A registry that already has these metric names (from a collector registered by
    hand) refuses register(): ValueError, and no timing hooks are left on the engine."""
    registry = CollectorRegistry(auto_describe=True)
    first = asyncgone.create_engine(url)
    second = asyncgone.create_engine(url)
    try:
        by_hand = asyncgone.prometheus.AsyncGoneCollector(first, name="first")
        registry.register(by_hand)
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            asyncgone.prometheus.register(second, name="second", registry=registry)
        assert state_of(second).metrics is None  # type: ignore[union-attr]
        registry.unregister(by_hand)
        by_hand.close()
        assert state_of(first).metrics is None  # type: ignore[union-attr]
    finally:
        await first.dispose()
        await second.dispose()


async def test_prometheus_names_are_known_before_start_and_a_dropped_registry_is_freed(
    url: str,
) -> None:
    """The metric names are described before a registered Database starts (a registry
    refuses a second collector of the same names, and a restricted registry filters them);
    a registry dropped without close() is freed with what it reported."""
    registry = CollectorRegistry(auto_describe=True)
    db = asyncgone.Database(url, keepalive=False)
    collector = asyncgone.prometheus.register(db, name="main", registry=registry)
    engine = asyncgone.create_engine(url)
    try:
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(asyncgone.prometheus.AsyncGoneCollector(engine, name="other"))
        async with db:
            restricted = registry.restricted_registry(["asyncgone_checkouts_total"])
            assert (
                'asyncgone_checkouts_total{engine="main"} 1.0'
                in generate_latest(restricted).decode()
            )
    finally:
        collector.close()
        await engine.dispose()
    dropped = CollectorRegistry()
    asyncgone.prometheus.register(db, name="main", registry=dropped)
    gone = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert gone() is None
