"""Prometheus export of asyncgone's counters, the pool's figures and its timings.

::

    from prometheus_client import REGISTRY
    import asyncgone.prometheus

    asyncgone.prometheus.register(db)                 # or an engine; once per process
    asyncgone.prometheus.register(engine, name="reports", registry=my_registry)

Needs ``pip install 'asyncgone[prometheus]'``. Every sample carries an ``engine`` label
(``name=``, by default the database URL's host and database): several engines export through
one registry, each under its own label, in one metric family per name (the exposition
format allows a name once). Counters follow Prometheus'
conventions (``_total``; times in seconds); the pool's figures are gauges, read when scraped;
the timings are histograms (``_bucket``, ``_sum``, ``_count``), measured from registration
on (for a ``Database`` registered before ``start()``, from the first scrape after it):

==========================================  =========  ======================================
metric                                      type       meaning
==========================================  =========  ======================================
asyncgone_connections_opened_total          counter    connections opened
asyncgone_checkouts_total                   counter    connections handed out by the pool
asyncgone_checks_total                      counter    reused connections checked at checkout
asyncgone_pings_total                       counter    COM_PINGs sent (checkout and keepalive)
asyncgone_ping_failures_total               counter    pings that failed or timed out
asyncgone_connections_replaced_total        counter    connections replaced, label ``reason``
asyncgone_disconnect_errors_total           counter    disconnects met in use, label ``code``
asyncgone_pool_invalidations_total          counter    pool-wide invalidations
asyncgone_statements_killed_total           counter    KILL after a cancellation
asyncgone_resets_total                      counter    ROLLBACKs sent on return to the pool
asyncgone_resets_skipped_total              counter    returns that needed no ROLLBACK
asyncgone_keepalive_runs_total              counter    keepalive rounds
asyncgone_keepalive_visits_total            counter    idle connections the keepalive visited
asyncgone_keepalive_pings_total             counter    pings sent by the keepalive
asyncgone_keepalive_errors_total            counter    keepalive rounds that failed
asyncgone_replays_total                     counter    units of work run again by ``run()``
asyncgone_commit_outcome_unknown_total      counter    ``CommitOutcomeUnknown`` raised
asyncgone_unavailable_total                 counter    ``DatabaseUnavailable`` raised by ``run()``
asyncgone_connection_leaks_total            counter    checkouts held past ``leak_threshold``
asyncgone_pool_timeouts_total               counter    requests that hit ``pool_timeout``
asyncgone_pool_size                         gauge      configured pool size
asyncgone_pool_checked_out                  gauge      connections in use
asyncgone_pool_idle                         gauge      live connections idle in the pool
asyncgone_pool_idle_dead                    gauge      idle slots known dead (or empty)
asyncgone_pool_overflow                     gauge      connections open beyond the pool size
asyncgone_pool_pending_requests             gauge      requests waiting for a connection now
asyncgone_pool_max                          gauge      pool_size + max_overflow (if limited)
asyncgone_pool_idle_max                     gauge      most idle connections kept (pool_size)
asyncgone_pool_idle_min                     gauge      ``min_idle`` (kept by the keepalive)
asyncgone_connection_create_seconds         histogram  opening a connection, setup included
asyncgone_connection_wait_seconds           histogram  obtaining a connection from the pool
asyncgone_connection_use_seconds            histogram  checkout to return to the pool
==========================================  =========  ======================================

The OpenTelemetry exporter (``asyncgone.opentelemetry``) reports the same figures under the
semantic conventions' names.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

from ._database import Database
from ._metrics import COUNTERS, PoolMetrics, instrument, limits, pool_status
from ._state import state_of
from ._stats import Counters

__all__ = ["AsyncGoneCollector", "register"]

_TIMINGS = {
    "create_time": ("create", "Seconds to open a connection, asyncgone's setup included."),
    "wait_time": ("wait", "Seconds to obtain a connection from the pool."),
    "use_time": ("use", "Seconds from checkout to the return to the pool."),
}


#: The pool's gauges, ``asyncgone_pool_<name>``, and their help.
_POOL_GAUGES = {
    "size": "Configured pool size.",
    "checked_out": "Connections in use.",
    "idle": "Live connections idle in the pool.",
    "idle_dead": "Idle slots known dead (or empty).",
    "overflow": "Connections open beyond the pool size.",
    "pending_requests": "Requests waiting for a connection now.",
    "max": "Most connections open at once (pool_size + max_overflow).",
    "idle_max": "Most idle connections the pool keeps.",
    "idle_min": "Idle connections the keepalive keeps open (min_idle).",
}


def _le(bound: float) -> str:
    """A bucket's ``le`` label, written as Prometheus' own client writes it."""
    return "+Inf" if bound == math.inf else repr(bound)


class AsyncGoneCollector(Collector):
    """Reports one engine's counters, pool figures and timings at every scrape.

    Raises:
        ConfigurationError: ``target`` is an engine not made by
            ``asyncgone.create_engine()``.
    """

    def __init__(self, target: AsyncEngine | Database, *, name: str | None = None) -> None:
        self._target = target
        if name is None:
            url = target.url
            name = f"{url.host or 'localhost'}/{url.database or ''}"
        self.name = name
        self._metrics: PoolMetrics | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._exporter: _Exporter | None = None  # set by register()
        engine = self._engine()
        if engine is not None:
            # Timings exist only from now on: start them at registration, not first scrape.
            self._metrics = instrument(engine)

    def close(self) -> None:
        """Stop exporting: a collector from ``register()`` leaves its registry, and the
        engine's timing hooks this collector asked for come off (the last exporter using
        them removes them). A collector registered by hand is unregistered first
        (``registry.unregister(collector)``); it then reports no timings. Calling it again
        does nothing."""
        with self._lock:
            metrics, self._metrics = self._metrics, None
            exporter, self._exporter = self._exporter, None
            self._closed = True
        if exporter is not None:
            exporter.remove(self)
        if metrics is not None:
            metrics.release()

    def _engine(self) -> AsyncEngine | None:
        if not isinstance(self._target, Database):
            return self._target
        return self._target.engine if self._target.started else None

    def describe(self) -> Iterator[Metric]:
        """Every family this collector may report, without samples: a registry checks
        their names against its others' (also before a ``Database`` starts)."""
        return _describe()

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:
            return  # a Database before start() or after close(): nothing to report
        state = state_of(engine, "asyncgone.prometheus")
        assert state is not None  # state_of() raised otherwise
        metrics = self._metrics
        if metrics is None and not self._closed:  # a Database registered before start()
            with self._lock:  # scrapes may run in several threads at once
                if self._metrics is None and not self._closed:
                    self._metrics = instrument(engine)
                metrics = self._metrics
        yield from _counter_families(self.name, state.counters)
        yield from _pool_families(self.name, engine, metrics)
        if metrics is not None:  # None once close()d
            yield from _timing_families(self.name, metrics)


def _counter_families(name: str, counters: Counters | None) -> Iterator[Metric]:
    """The counter families; without samples for None."""
    labels = ["engine"]
    for field, (otel_name, _, help_text) in COUNTERS.items():
        family = CounterMetricFamily(otel_name.replace(".", "_"), help_text, labels=labels)
        if counters is not None:
            family.add_metric([name], getattr(counters, field))
        yield family
    replaced = CounterMetricFamily(
        "asyncgone_connections_replaced",
        "Connections replaced, by reason.",
        labels=[*labels, "reason"],
    )
    # Copied in one step (list(), sorted()): a scrape may run in another thread while
    # the event loop counts.
    by_reason = {} if counters is None else counters.replaced
    for reason, count in sorted((r.value, n) for r, n in list(by_reason.items())):
        replaced.add_metric([name, reason], count)
    yield replaced
    errors = CounterMetricFamily(
        "asyncgone_disconnect_errors",
        "Disconnect errors met while in use, by MySQL code.",
        labels=[*labels, "code"],
    )
    for code, count in sorted(({} if counters is None else counters.errors).items()):
        errors.add_metric([name, str(code)], count)
    yield errors


def _pool_families(
    name: str, engine: AsyncEngine | None, metrics: PoolMetrics | None
) -> Iterator[Metric]:
    """The pool's gauges; without samples for no engine."""
    figures: dict[str, float | None] = dict.fromkeys(_POOL_GAUGES)
    if engine is not None:
        pool, limit = pool_status(engine), limits(engine)
        figures.update(
            size=pool.size,
            checked_out=pool.checked_out,
            idle=pool.idle,
            idle_dead=pool.idle_dead,
            overflow=pool.overflow,
            max=limit.max_open,
            idle_max=limit.max_idle,
            idle_min=limit.min_idle,
        )
    figures["pending_requests"] = None if metrics is None else metrics.pending
    for field, help_text in _POOL_GAUGES.items():
        gauge = GaugeMetricFamily(f"asyncgone_pool_{field}", help_text, labels=["engine"])
        value = figures[field]
        if value is not None:  # no such limit (or figure): the family stays empty
            gauge.add_metric([name], value)
        yield gauge


def _timing_families(name: str, metrics: PoolMetrics | None) -> Iterator[Metric]:
    """The timing families; without samples for None."""
    labels = ["engine"]
    timeouts = CounterMetricFamily(
        "asyncgone_pool_timeouts", "Requests that hit pool_timeout.", labels=labels
    )
    if metrics is not None:
        timeouts.add_metric([name], metrics.timeouts)
    yield timeouts
    for field, (metric, help_text) in _TIMINGS.items():
        histogram = HistogramMetricFamily(
            f"asyncgone_connection_{metric}_seconds", help_text, labels=labels
        )
        if metrics is None:
            yield histogram
            continue
        buckets, total = getattr(metrics, field).cumulative()
        histogram.add_metric(
            [name],
            buckets=[(_le(bound), count) for bound, count in buckets],
            sum_value=total,
        )
        yield histogram


class _Exporter:
    """The collector ``register()`` puts in a registry once: it reports every engine
    registered there, merging their samples into one family per metric name."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Weakly: the map of exporters holds its registry weakly, and its value must not
        # keep it alive.
        self._registry = weakref.ref(registry)
        self.collectors: list[AsyncGoneCollector] = []
        self.registered = False

    def add(self, collector: AsyncGoneCollector) -> None:
        """Report ``collector`` too; ``ValueError`` if its ``engine`` label is taken."""
        if any(c.name == collector.name for c in self.collectors):
            raise ValueError(
                f"an engine named {collector.name!r} is already exported through this "
                f"registry; give each engine its own name= label"
            )
        self.collectors = [*self.collectors, collector]  # a new list: scrapes copy nothing

    def remove(self, collector: AsyncGoneCollector) -> None:
        """Stop reporting ``collector``; leave the registry after the last one."""
        with _EXPORTERS_LOCK:  # under it: a register() meanwhile makes a new exporter
            self.collectors = [c for c in self.collectors if c is not collector]
            if self.collectors or not self.registered:
                return
            self.registered = False
            registry = self._registry()
            if registry is None:
                return  # dropped by its owner, and this exporter with it
            if _EXPORTERS.get(registry) is self:
                del _EXPORTERS[registry]
            registry.unregister(self)

    def describe(self) -> Iterator[Metric]:
        return _describe()

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for collector in self.collectors:
            for family in collector.collect():
                merged = families.setdefault(family.name, family)
                if merged is not family:
                    merged.samples.extend(family.samples)
        yield from families.values()


def _describe() -> Iterator[Metric]:
    """Every family asyncgone reports, without samples."""
    yield from _counter_families("", None)
    yield from _pool_families("", None, None)
    yield from _timing_families("", None)


# One exporter per registry (weakly: a registry dropped by its owner goes with it).
_EXPORTERS: weakref.WeakKeyDictionary[CollectorRegistry, _Exporter] = weakref.WeakKeyDictionary()
_EXPORTERS_LOCK = threading.Lock()


def register(
    target: AsyncEngine | Database,
    *,
    name: str | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> AsyncGoneCollector:
    """Export ``target``'s metrics through ``registry``; return the collector (to stop:
    ``collector.close()``). Several engines may be registered in one registry, each with
    its own ``name``.

    Args:
        target (AsyncEngine | Database): an engine made by ``asyncgone.create_engine()``, or
            a ``Database`` (reported while started).
        name (str | None): the ``engine`` label; default ``host/database`` from the URL.
        registry (CollectorRegistry): where to register; default the global ``REGISTRY``.

    Returns:
        AsyncGoneCollector: the engine's collector; the registry holds the exporter that
        reports it with the others (so ``collector.close()`` stops it, not
        ``registry.unregister()``).

    Raises:
        ConfigurationError: ``target`` is an engine not made by
            ``asyncgone.create_engine()``.
        ValueError: another engine is exported through ``registry`` with the same ``name``
            (two engines on one host and database need names of their own), or
            ``registry`` checks for duplicates (the global ``REGISTRY`` does) and something
            else already reports these metric names.
    """
    collector = AsyncGoneCollector(target, name=name)
    try:
        with _EXPORTERS_LOCK:
            exporter = _EXPORTERS.get(registry)
            if exporter is None:
                exporter = _Exporter(registry)
                exporter.add(collector)
                # Registered with its first engine, so that a registry checking duplicates
                # compares the names it reports with those it has.
                registry.register(exporter)
                exporter.registered = True
                _EXPORTERS[registry] = exporter
            else:
                exporter.add(collector)
            collector._exporter = exporter
    except BaseException:
        collector.close()
        raise
    return collector
