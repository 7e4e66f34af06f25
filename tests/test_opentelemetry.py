"""OpenTelemetry export: the semantic conventions' pool metrics and asyncgone's counters,
read through the SDK's in-memory reader after scripted runs against MariaDB."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
    Sum,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncgone
import asyncgone.opentelemetry
from asyncgone._database import pool_status
from asyncgone._state import state_of
from tests._support import Server, connection_id, eventually, wait_until

pytestmark = pytest.mark.anyio

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

OTel = tuple[MeterProvider, InMemoryMetricReader]

# name -> (unit, kind): the semantic conventions v1.44.0 for connection pools.
SEMCONV = {
    "db.client.connection.count": ("{connection}", "updown"),
    "db.client.connection.max": ("{connection}", "updown"),
    "db.client.connection.idle.max": ("{connection}", "updown"),
    "db.client.connection.idle.min": ("{connection}", "updown"),
    "db.client.connection.pending_requests": ("{request}", "updown"),
    "db.client.connection.timeouts": ("{timeout}", "counter"),
    "db.client.connection.create_time": ("s", "histogram"),
    "db.client.connection.wait_time": ("s", "histogram"),
    "db.client.connection.use_time": ("s", "histogram"),
}


class Reading:
    """One collection: every data point by metric name, with each metric's unit and kind."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.points: dict[str, list[Any]] = {}
        self.kinds: dict[str, tuple[str, str]] = {}
        self.schema_urls: set[str] = set()
        data = reader.get_metrics_data()  # None when nothing at all was reported
        for resource in data.resource_metrics if data is not None else []:
            for scope in resource.scope_metrics:
                self.schema_urls.add(scope.schema_url)
                for metric in scope.metrics:
                    kind = (
                        "histogram"
                        if isinstance(metric.data, Histogram)
                        else "counter"
                        if isinstance(metric.data, Sum) and metric.data.is_monotonic
                        else "updown"
                    )
                    self.kinds[metric.name] = (metric.unit or "", kind)
                    self.points[metric.name] = list(metric.data.data_points)

    def find(self, name: str, pool: str = "main", state: str | None = None) -> Iterator[Any]:
        wanted = {POOL: pool} if state is None else {POOL: pool, STATE: state}
        for point in self.points.get(name, []):
            if dict(point.attributes) == wanted:
                yield point

    def value(self, name: str, pool: str = "main", state: str | None = None) -> float | None:
        """The number a counter or up-down counter reported (None if none)."""
        found = list(self.find(name, pool, state))
        assert len(found) <= 1, found
        if not found:
            return None
        point = found[0]
        assert isinstance(point, NumberDataPoint)
        return point.value

    def histogram(self, name: str, pool: str = "main") -> HistogramDataPoint:
        (point,) = self.find(name, pool)
        assert isinstance(point, HistogramDataPoint)
        return point


@pytest.fixture
def otel() -> Iterator[OTel]:
    """An SDK meter provider of the test's own, and its in-memory reader."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield provider, reader
    provider.shutdown()


async def test_pool_metrics_follow_the_semantic_conventions(url: str, otel: OTel) -> None:
    """Every connection pool metric appears under its semantic conventions name, unit,
    instrument kind and attributes, with the values a scripted run implies."""
    provider, reader = otel
    engine = asyncgone.create_engine(url, pool_size=3, max_overflow=2, min_idle=1)
    handle = asyncgone.opentelemetry.instrument(engine, name="main", meter_provider=provider)
    try:
        for _ in range(4):
            await connection_id(engine)
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            reading = Reading(reader)
        reading_after = Reading(reader)
    finally:
        handle.uninstrument()
        await engine.dispose()
    assert reading.schema_urls == {asyncgone.opentelemetry.SCHEMA_URL}
    assert {name: reading.kinds[name] for name in SEMCONV} == SEMCONV
    assert reading.value("db.client.connection.count", state="used") == 1
    assert reading.value("db.client.connection.count", state="idle") == 0
    assert reading.value("db.client.connection.max") == 5
    assert reading.value("db.client.connection.idle.max") == 3
    assert reading.value("db.client.connection.idle.min") == 1
    assert reading.value("db.client.connection.pending_requests") == 0
    assert reading.value("db.client.connection.timeouts") == 0
    assert reading_after.value("db.client.connection.count", state="idle") == 1
    assert reading_after.value("db.client.connection.count", state="used") == 0
    # Five checkouts, one connection opened for the first; the fifth was in use at the
    # first reading and returned by the second.
    assert reading.histogram("db.client.connection.wait_time").count == 5
    assert reading.histogram("db.client.connection.use_time").count == 4
    assert reading_after.histogram("db.client.connection.use_time").count == 5
    create = reading_after.histogram("db.client.connection.create_time")
    assert create.count == 1
    assert 0 < create.sum < 5
    assert reading_after.value("asyncgone.connections.opened") == 1
    assert reading_after.value("asyncgone.checkouts") == 5
    assert reading_after.value("asyncgone.checks") == 4


async def test_a_waiting_request_is_pending_and_its_wait_is_timed(url: str, otel: OTel) -> None:
    """With the pool's one connection held, a second request shows as pending, and its
    wait_time covers the hold."""
    provider, reader = otel
    engine = asyncgone.create_engine(url, pool_size=1, max_overflow=0)
    handle = asyncgone.opentelemetry.instrument(engine, name="main", meter_provider=provider)
    state = state_of(engine)
    assert state is not None
    metrics = state.metrics
    try:
        held = await engine.connect()
        async with anyio.create_task_group() as tg:
            tg.start_soon(connection_id, engine)
            await eventually(lambda: metrics.pending == 1)
            waiting = Reading(reader)
            await anyio.sleep(0.3)
            await held.close()
        done = Reading(reader)
    finally:
        handle.uninstrument()
        await engine.dispose()
    assert waiting.value("db.client.connection.pending_requests") == 1
    assert waiting.value("db.client.connection.count", state="used") == 1
    assert done.value("db.client.connection.pending_requests") == 0
    wait = done.histogram("db.client.connection.wait_time")
    assert wait.count == 2
    assert wait.max >= 0.3


async def test_a_pool_timeout_is_counted(url: str, otel: OTel) -> None:
    """A request that gives up after pool_timeout counts in timeouts, not in wait_time."""
    provider, reader = otel
    engine = asyncgone.create_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    handle = asyncgone.opentelemetry.instrument(engine, name="main", meter_provider=provider)
    try:
        async with engine.connect():
            with pytest.raises(sa_exc.TimeoutError):
                await connection_id(engine)
        reading = Reading(reader)
    finally:
        handle.uninstrument()
        await engine.dispose()
    assert reading.value("db.client.connection.timeouts") == 1
    assert reading.value("db.client.connection.pending_requests") == 0
    assert reading.histogram("db.client.connection.wait_time").count == 1


async def test_timings_continue_after_dispose(url: str, otel: OTel) -> None:
    """engine.dispose() replaces the pool; checkouts from the new pool are still timed, and
    uninstrument() then takes the wrapper off the new pool."""
    provider, reader = otel
    engine = asyncgone.create_engine(url, pool_size=2)
    handle = asyncgone.opentelemetry.instrument(engine, name="main", meter_provider=provider)
    try:
        await connection_id(engine)
        first_pool = engine.sync_engine.pool
        await engine.dispose()
        assert engine.sync_engine.pool is not first_pool
        await connection_id(engine)
        await engine.dispose()
        await connection_id(engine)
        reading = Reading(reader)
        handle.uninstrument()
        assert "connect" not in vars(engine.sync_engine.pool)
        assert "recreate" not in vars(engine.sync_engine.pool)
    finally:
        handle.uninstrument()
        await engine.dispose()
    assert reading.histogram("db.client.connection.wait_time").count == 3
    assert reading.histogram("db.client.connection.use_time").count == 3
    assert reading.histogram("db.client.connection.create_time").count == 3


async def test_an_engine_nobody_exports_has_no_hooks(url: str, otel: OTel) -> None:
    """Without an exporter, and again after the last one stops, the engine has no metrics
    state, no pool wrapper and no listener of the metrics module."""
    engine = asyncgone.create_engine(url)
    sync = engine.sync_engine
    state = state_of(engine)
    assert state is not None

    def hooks() -> tuple[int, bool, bool]:
        """The metrics module's listeners, whether the pool is wrapped, whether the state
        holds metrics."""
        listeners = [
            *sync.pool.dispatch.checkin,
            *sync.pool.dispatch.connect,
            *sync.dialect.dispatch.do_connect,
        ]
        ours = [fn for fn in listeners if getattr(fn, "__module__", "") == "asyncgone._metrics"]
        return len(ours), "connect" in vars(sync.pool), state.metrics is not None

    try:
        await connection_id(engine)
        assert hooks() == (0, False, False)
        provider, reader = otel
        first = asyncgone.opentelemetry.instrument(engine, meter_provider=provider)
        second = asyncgone.opentelemetry.instrument(engine, name="again", meter_provider=provider)
        assert hooks() == (3, True, True)
        first.uninstrument()
        assert hooks() == (3, True, True)  # the second still reports
        await connection_id(engine)
        reading = Reading(reader)
        second.uninstrument()
        second.uninstrument()  # a second call does nothing
        assert hooks() == (0, False, False)
        assert Reading(reader).points.get("asyncgone.checkouts", []) == []
    finally:
        await engine.dispose()
    assert reading.value("asyncgone.checkouts", pool="again") == 2
    assert reading.value("asyncgone.checkouts", pool=first.name) is None
    assert repr(second) == "<asyncgone.opentelemetry.Instrumentation 'again' stopped>"


async def test_one_provider_reports_several_engines(url: str, shared: Server, otel: OTel) -> None:
    """Two engines instrumented through one meter provider are both reported, each under
    its pool name (the default one is host:port/database); a third under a name taken
    there is warned about: its figures would be summed with the other's."""
    provider, reader = otel
    first = asyncgone.create_engine(url, pool_size=2)
    second = asyncgone.create_engine(url, pool_size=4)
    handles = [
        asyncgone.opentelemetry.instrument(first, meter_provider=provider),
        asyncgone.opentelemetry.instrument(second, name="second", meter_provider=provider),
    ]
    try:
        with pytest.warns(asyncgone.ConfigurationWarning, match="'second' is already instr"):
            twin = asyncgone.opentelemetry.instrument(first, name="second", meter_provider=provider)
        twin.uninstrument()
        again = asyncgone.opentelemetry.instrument(second, name="third", meter_provider=provider)
        again.uninstrument()
        await connection_id(second)
        reading = Reading(reader)
    finally:
        for handle in handles:
            handle.uninstrument()
        await first.dispose()
        await second.dispose()
    default = f"{shared.host}:{shared.port}/{shared.database}"
    assert handles[0].name == default
    assert reading.value("db.client.connection.idle.max", pool=default) == 2
    assert reading.value("db.client.connection.idle.max", pool="second") == 4
    assert reading.histogram("db.client.connection.use_time", pool="second").count == 1
    assert list(reading.find("db.client.connection.use_time", pool=default)) == []  # none yet


async def test_a_database_is_reported_while_started(url: str, otel: OTel) -> None:
    """A Database instrumented before start() reports nothing until it starts, then its
    engine's figures, and nothing once closed."""
    provider, reader = otel
    db = asyncgone.Database(url, keepalive=False)
    handle = asyncgone.opentelemetry.instrument(db, name="main", meter_provider=provider)
    try:
        assert Reading(reader).value("asyncgone.checkouts") is None
        async with db:
            Reading(reader)  # the first collection after start() attaches the timings
            await db.run(lambda s: s.execute(text("SELECT 1")))
            started = Reading(reader)
        closed = Reading(reader)
    finally:
        handle.uninstrument()
    assert started.value("asyncgone.checkouts") == 2  # start()'s probe and run()
    assert started.histogram("db.client.connection.use_time").count == 1
    assert closed.value("asyncgone.checkouts") is None


async def test_dead_idle_connections_and_replacements(url: str, shared: Server, otel: OTel) -> None:
    """An idle connection the server killed counts as idle_dead, not idle; the checkout
    that replaces it counts under its reason."""
    provider, reader = otel
    engine = asyncgone.create_engine(url, pool_size=1)
    handle = asyncgone.opentelemetry.instrument(engine, name="main", meter_provider=provider)
    try:
        thread = await connection_id(engine)
        await anyio.to_thread.run_sync(shared.kill, thread)
        await wait_until(lambda: thread not in shared.threads())
        await eventually(lambda: pool_status(engine).idle_dead == 1)
        dead = Reading(reader)
        await connection_id(engine)
        replaced = Reading(reader)
    finally:
        handle.uninstrument()
        await engine.dispose()
    assert dead.value("db.client.connection.count", state="idle") == 0
    assert dead.value("asyncgone.pool.idle_dead") == 1
    assert dead.kinds["asyncgone.pool.idle_dead"] == ("{connection}", "updown")
    reason = {"asyncgone.reason": "closed_by_server"}
    point = next(p for p in replaced.points["asyncgone.connections.replaced"] if p.attributes)
    assert dict(point.attributes) == {POOL: "main", **reason}
    assert point.value == 1
    assert replaced.value("db.client.connection.count", state="idle") == 1
    assert replaced.histogram("db.client.connection.create_time").count == 2


async def test_only_asyncgone_engines_and_databases(url: str) -> None:
    """A plain SQLAlchemy engine is refused with ConfigurationError, anything else with
    TypeError."""
    plain: AsyncEngine = create_async_engine(url)
    try:
        with pytest.raises(asyncgone.ConfigurationError, match=r"asyncgone\.create_engine"):
            asyncgone.opentelemetry.instrument(plain)
        with pytest.raises(TypeError, match="AsyncEngine"):
            asyncgone.opentelemetry.instrument(url)  # type: ignore[arg-type]
    finally:
        await plain.dispose()


def test_public_names() -> None:
    """The module's ``__all__`` lists its public names, sorted."""
    assert asyncgone.opentelemetry.__all__ == ["SCHEMA_URL", "Instrumentation", "instrument"]
