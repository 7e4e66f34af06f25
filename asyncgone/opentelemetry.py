"""OpenTelemetry metrics for asyncgone's engines: the connection pool semantic conventions.

::

    import asyncgone.opentelemetry

    handle = asyncgone.opentelemetry.instrument(db)          # or an engine
    handle = asyncgone.opentelemetry.instrument(engine, name="reports", meter_provider=provider)
    handle.uninstrument()                                     # stop reporting

Needs ``pip install 'asyncgone[opentelemetry]'`` (``opentelemetry-api``); the application
chooses the SDK, the reader and the exporter. Without ``meter_provider=``, the global meter
provider is used, as OpenTelemetry's instrumentations do.

The pool metrics follow the database client connection pool metrics of the OpenTelemetry
semantic conventions **v1.44.0** (status: development; the meter carries that schema URL).
Every measurement has ``db.client.connection.pool.name`` (``name=``; by default
``server.address:server.port/db.namespace``, from the URL, as the conventions suggest):

=====================================  =====================  ============  ==================
metric                                 instrument             unit          what
=====================================  =====================  ============  ==================
db.client.connection.count             async UpDownCounter    {connection}  by state (below)
db.client.connection.max               async UpDownCounter    {connection}  pool_size +
                                                                            max_overflow
db.client.connection.idle.max          async UpDownCounter    {connection}  pool_size
db.client.connection.idle.min          async UpDownCounter    {connection}  min_idle
db.client.connection.pending_requests  async UpDownCounter    {request}     waiting now
db.client.connection.timeouts          async Counter          {timeout}     pool_timeout hits
db.client.connection.create_time       Histogram              s             connect + setup
db.client.connection.wait_time         Histogram              s             obtaining one
db.client.connection.use_time          Histogram              s             checkout to return
=====================================  =====================  ============  ==================

``db.client.connection.count`` has ``db.client.connection.state``: ``used`` (checked out)
and ``idle`` (live idle connections only; those known dead are ``asyncgone.pool.idle_dead``).
A pool without a limit (``max_overflow=-1``, a ``NullPool``) reports no ``max`` or ``idle``
limits. Times are in seconds, measured from instrumentation on (for a ``Database`` instrumented
before ``start()``, from the first collection after it); ``_metrics`` says where each one
starts and ends.

asyncgone's own figures, under ``asyncgone.``, are asynchronous counters read at collection
(units in braces, e.g. ``{connection}``): ``asyncgone.connections.opened``,
``asyncgone.checkouts``, ``asyncgone.checks``, ``asyncgone.pings``,
``asyncgone.ping_failures``, ``asyncgone.connections.replaced`` (attribute
``asyncgone.reason``, a ``Reason`` value), ``asyncgone.disconnect_errors`` (attribute
``db.response.status_code``, the MySQL error number; ``"0"`` when there is none),
``asyncgone.pool_invalidations``, ``asyncgone.statements_killed`` (KILLs sent),
``asyncgone.resets``, ``asyncgone.resets_skipped``, ``asyncgone.keepalive.runs``,
``asyncgone.keepalive.visits``, ``asyncgone.keepalive.pings``, ``asyncgone.keepalive.errors``,
``asyncgone.replays``, ``asyncgone.commit_outcome_unknown``, ``asyncgone.unavailable``,
``asyncgone.connection_leaks`` (see ``Stats``); and ``asyncgone.pool.idle_dead``, an async
UpDownCounter of idle slots known dead (or empty). Through OpenTelemetry's Prometheus
exporter they get the names ``asyncgone.prometheus`` gives them.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator

from opentelemetry.metrics import (
    CallbackOptions,
    Histogram,
    Meter,
    MeterProvider,
    Observation,
    get_meter,
    get_meter_provider,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from . import __version__, _metrics
from ._database import Database
from ._errors import ConfigurationWarning
from ._metrics import BUCKETS, COUNTERS, PoolMetrics, limits, pool_status
from ._state import EngineState, state_of

__all__ = ["SCHEMA_URL", "Instrumentation", "instrument"]

#: The semantic conventions version the pool metrics follow, as the meter's schema URL.
SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"

_POOL = "db.client.connection.pool.name"
_STATE = "db.client.connection.state"

_TIMINGS = {
    "create_time": (
        "db.client.connection.create_time",
        "The time it took to create a new connection.",
    ),
    "wait_time": (
        "db.client.connection.wait_time",
        "The time it took to obtain an open connection from the pool.",
    ),
    "use_time": (
        "db.client.connection.use_time",
        "The time between borrowing a connection and returning it to the pool.",
    ),
}


class Instrumentation:
    """One engine's (or ``Database``'s) metrics being reported; made by ``instrument()``.

    ``target`` and ``name`` are what was instrumented and its pool name; ``active`` is
    False once ``uninstrument()`` has run.
    """

    def __init__(
        self, target: AsyncEngine | Database, name: str, instruments: _Instruments
    ) -> None:
        self.target = target
        self.name = name
        self.active = True
        self._attributes = {_POOL: name}
        self._instruments = instruments
        self._engine: AsyncEngine | None = None
        self._metrics: PoolMetrics | None = None
        self._sinks: list[tuple[list[Callable[[float], object]], Callable[[float], object]]] = []
        # Collections may run in an exporter's thread while the application instruments or
        # stops in its own: attaching and detaching happen under this lock.
        self._lock = threading.Lock()
        self._resolve()  # an engine, or a started Database: its timings start now
        instruments.handles.append(self)

    def __repr__(self) -> str:
        state = "active" if self.active else "stopped"
        return f"<asyncgone.opentelemetry.Instrumentation {self.name!r} {state}>"

    def uninstrument(self) -> None:
        """Stop reporting; the engine's timing hooks come off with the last exporter using
        them. Calling it again does nothing."""
        with self._lock:
            if not self.active:
                return
            self.active = False
            self._instruments.handles.remove(self)
            self._detach()

    def _resolve(self) -> AsyncEngine | None:
        """The engine to report now, its timings attached (None: stopped, or a ``Database``
        not started or closed)."""
        target = self.target
        with self._lock:
            if not self.active:
                return None
            if isinstance(target, Database):
                if not target.started:
                    return None
                engine = target.engine
            else:
                engine = target
            if engine is not self._engine:
                self._detach()
                self._attach(engine)
            return engine

    def _attach(self, engine: AsyncEngine) -> None:
        metrics = _metrics.instrument(engine)
        self._engine, self._metrics = engine, metrics
        for field, histogram in self._instruments.timings.items():
            sinks: list[Callable[[float], object]] = getattr(metrics, field).sinks
            sink = functools.partial(histogram.record, attributes=self._attributes)
            sinks.append(sink)
            self._sinks.append((sinks, sink))

    def _detach(self) -> None:
        for sinks, sink in self._sinks:
            sinks.remove(sink)
        self._sinks.clear()
        if self._metrics is not None:
            self._metrics.release()
        self._engine = self._metrics = None


class _Instruments:
    """The instruments of one meter, shared by every engine instrumented through it: a
    meter hands back the instrument first created under a name, without the callbacks a
    second creation brings, so the callbacks report every engine themselves."""

    def __init__(self, meter: Meter) -> None:
        self.handles: list[Instrumentation] = []
        self.timings: dict[str, Histogram] = {
            field: meter.create_histogram(
                name, unit="s", description=text, explicit_bucket_boundaries_advisory=BUCKETS
            )
            for field, (name, text) in _TIMINGS.items()
        }
        updown = meter.create_observable_up_down_counter
        updown(
            "db.client.connection.count",
            [self._count],
            "{connection}",
            "The number of connections that are currently in state described by the state "
            "attribute.",
        )
        for field, name, text in (
            (
                "max_open",
                "db.client.connection.max",
                "The maximum number of open connections allowed.",
            ),
            (
                "max_idle",
                "db.client.connection.idle.max",
                "The maximum number of idle open connections allowed.",
            ),
            (
                "min_idle",
                "db.client.connection.idle.min",
                "The minimum number of idle open connections allowed.",
            ),
        ):
            updown(name, [functools.partial(self._limit, field)], "{connection}", text)
        updown(
            "db.client.connection.pending_requests",
            [self._pending],
            "{request}",
            "The number of current pending requests for an open connection.",
        )
        updown(
            "asyncgone.pool.idle_dead",
            [self._idle_dead],
            "{connection}",
            "Idle pool slots whose connection is known dead, or empty.",
        )
        counter = meter.create_observable_counter
        counter(
            "db.client.connection.timeouts",
            [self._timeouts],
            "{timeout}",
            "The number of connection timeouts that have occurred trying to obtain a "
            "connection from the pool.",
        )
        for field, (name, unit, text) in COUNTERS.items():
            counter(name, [functools.partial(self._counter, field)], unit, text)
        counter(
            "asyncgone.connections.replaced",
            [self._replaced],
            "{connection}",
            "Connections replaced, by reason.",
        )
        counter(
            "asyncgone.disconnect_errors",
            [self._errors],
            "{error}",
            "Disconnect errors met while in use, by MySQL error number.",
        )

    def _reporting(self) -> Iterator[tuple[dict[str, str], AsyncEngine, EngineState, PoolMetrics]]:
        """Each active handle's attributes, engine, state and timings, for one callback."""
        for handle in list(self.handles):  # a copy: another thread may uninstrument
            engine = handle._resolve()
            state = state_of(engine) if engine is not None else None
            metrics = handle._metrics
            if engine is not None and state is not None and metrics is not None:
                yield handle._attributes, engine, state, metrics

    def _count(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, engine, _, _ in self._reporting():
            pool = pool_status(engine)
            yield Observation(pool.checked_out, {**attributes, _STATE: "used"})
            yield Observation(pool.idle, {**attributes, _STATE: "idle"})

    def _idle_dead(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, engine, _, _ in self._reporting():
            yield Observation(pool_status(engine).idle_dead, attributes)

    def _limit(self, field: str, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, engine, _, _ in self._reporting():
            value = getattr(limits(engine), field)
            if value is not None:  # no such limit: nothing to report
                yield Observation(value, attributes)

    def _pending(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, _, _, metrics in self._reporting():
            yield Observation(metrics.pending, attributes)

    def _timeouts(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, _, _, metrics in self._reporting():
            yield Observation(metrics.timeouts, attributes)

    def _counter(self, field: str, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, _, state, _ in self._reporting():
            yield Observation(getattr(state.counters, field), attributes)

    def _replaced(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, _, state, _ in self._reporting():
            # Copied in one step: the event loop may count in another thread meanwhile.
            for reason, count in list(state.counters.replaced.items()):
                yield Observation(count, {**attributes, "asyncgone.reason": reason.value})

    def _errors(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, _, state, _ in self._reporting():
            for code, count in list(state.counters.errors.items()):
                yield Observation(count, {**attributes, "db.response.status_code": str(code)})


# One _Instruments per meter provider: asyncgone's instruments are created once in its
# meter. (Keyed by provider, not meter: the API's provider for the time before an SDK is
# configured hands out a new meter at each call.) Weak: nothing in the value refers back.
_BY_PROVIDER: weakref.WeakKeyDictionary[MeterProvider, _Instruments] = weakref.WeakKeyDictionary()


def _instruments_of(provider: MeterProvider) -> _Instruments:
    instruments = _BY_PROVIDER.get(provider)
    if instruments is None:
        meter = get_meter("asyncgone", __version__, meter_provider=provider, schema_url=SCHEMA_URL)
        instruments = _BY_PROVIDER[provider] = _Instruments(meter)
    return instruments


def instrument(
    target: AsyncEngine | Database,
    *,
    name: str | None = None,
    meter_provider: MeterProvider | None = None,
) -> Instrumentation:
    """Report ``target``'s pool metrics and asyncgone's counters through OpenTelemetry.

    Observable instruments read the figures at each collection; the three timing histograms
    record each connect, wait and use as it ends. Call ``uninstrument()`` on the result to
    stop (the engine's timing hooks come off with the last exporter using them)::

        handle = asyncgone.opentelemetry.instrument(engine, name="main")
        handle.uninstrument()

    Args:
        target (AsyncEngine | Database): an engine made by ``asyncgone.create_engine()``, or
            a ``Database`` (reported while started).
        name (str | None): the ``db.client.connection.pool.name`` attribute; default
            ``host:port/database`` from the URL (port 3306 when the URL has none).
        meter_provider (MeterProvider | None): default the global meter provider, which
            must then be set (``metrics.set_meter_provider()``) before the first call:
            engines instrumented through OpenTelemetry's placeholder and through the real
            provider cannot share its instruments.

    Returns:
        Instrumentation: the handle; ``uninstrument()`` stops it.

    Raises:
        ConfigurationError: ``target`` is an engine not made by
            ``asyncgone.create_engine()``.
        TypeError: ``target`` is neither an ``AsyncEngine`` nor a ``Database``.

    Warns:
        ConfigurationWarning: another engine is instrumented through the same meter
            provider under this ``name`` (two engines on one host and database need names
            of their own): their figures are summed.
    """
    if not isinstance(target, (AsyncEngine, Database)):
        raise TypeError(
            f"instrument() takes an AsyncEngine made by asyncgone.create_engine() or an "
            f"asyncgone.Database, not {type(target).__name__}"
        )
    if isinstance(target, AsyncEngine):
        state_of(target, "asyncgone.opentelemetry")  # raises for a foreign engine
    if name is None:
        url = target.url
        name = f"{url.host or 'localhost'}:{url.port or 3306}/{url.database or ''}"
    provider = get_meter_provider() if meter_provider is None else meter_provider
    instruments = _instruments_of(provider)
    if any(handle.name == name for handle in list(instruments.handles)):
        # Their measurements carry the same attributes and are summed as one pool's. A
        # warning, not an error: an engine made again (and its predecessor never
        # uninstrumented) keeps its name.
        warnings.warn(
            f"an engine named {name!r} is already instrumented through this meter provider: "
            f"their figures are summed; give each engine its own name=, and uninstrument() "
            f"an engine that is gone",
            ConfigurationWarning,
            stacklevel=2,
        )
    return Instrumentation(target, name, instruments)
