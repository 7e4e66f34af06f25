"""Prometheus export of asyncgone's counters and the pool's figures.

::

    from prometheus_client import REGISTRY
    import asyncgone.prometheus

    asyncgone.prometheus.register(db)                 # or an engine; once per process
    asyncgone.prometheus.register(engine, name="reports", registry=my_registry)

Needs ``pip install 'asyncgone[prometheus]'``. Every sample carries an ``engine`` label
(``name=``, by default the database URL's host and database). Counters follow Prometheus'
conventions (``_total``; times in seconds); the pool's figures are gauges, read when scraped:

==========================================  =======  ========================================
metric                                      type     meaning
==========================================  =======  ========================================
asyncgone_connections_opened_total          counter  connections opened
asyncgone_checkouts_total                   counter  connections handed out by the pool
asyncgone_checks_total                      counter  reused connections checked at checkout
asyncgone_pings_total                       counter  COM_PINGs sent (checkout and keepalive)
asyncgone_ping_failures_total               counter  pings that failed or timed out
asyncgone_connections_replaced_total        counter  connections replaced, label ``reason``
asyncgone_disconnect_errors_total           counter  disconnects met in use, label ``code``
asyncgone_pool_invalidations_total          counter  pool-wide invalidations
asyncgone_statements_killed_total           counter  KILL QUERY after a cancellation
asyncgone_resets_total                      counter  ROLLBACKs sent on return to the pool
asyncgone_resets_skipped_total              counter  returns that needed no ROLLBACK
asyncgone_keepalive_runs_total              counter  keepalive rounds
asyncgone_keepalive_pings_total             counter  pings sent by the keepalive
asyncgone_keepalive_errors_total            counter  keepalive rounds that failed
asyncgone_replays_total                     counter  units of work run again by ``run()``
asyncgone_commit_outcome_unknown_total      counter  ``CommitOutcomeUnknown`` raised
asyncgone_unavailable_total                 counter  ``DatabaseUnavailable`` raised by ``run()``
asyncgone_connection_leaks_total            counter  checkouts held past ``leak_threshold``
asyncgone_pool_size                         gauge    configured pool size
asyncgone_pool_checked_out                  gauge    connections in use
asyncgone_pool_idle                         gauge    connections idle in the pool
asyncgone_pool_overflow                     gauge    connections open beyond the pool size
==========================================  =======  ========================================
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

from ._database import Database, pool_status
from ._state import stats

__all__ = ["AsyncGoneCollector", "register"]

# Stats field -> (metric name without "asyncgone_" and "_total", help text)
_COUNTERS = {
    "connects": ("connections_opened", "Connections opened."),
    "checkouts": ("checkouts", "Connections handed out by the pool."),
    "checks": ("checks", "Reused connections checked at checkout."),
    "pings": ("pings", "COM_PING round trips asyncgone sent."),
    "ping_failures": ("ping_failures", "Pings that failed or timed out."),
    "pool_invalidations": ("pool_invalidations", "Pool-wide invalidations."),
    "kills": ("statements_killed", "Statements stopped with KILL QUERY after a cancellation."),
    "resets": ("resets", "ROLLBACKs sent when a connection went back to the pool."),
    "resets_skipped": ("resets_skipped", "Returns to the pool that needed no ROLLBACK."),
    "keepalive_runs": ("keepalive_runs", "Keepalive rounds."),
    "keepalive_pings": ("keepalive_pings", "Pings sent by the keepalive."),
    "keepalive_errors": ("keepalive_errors", "Keepalive rounds that failed."),
    "replays": ("replays", "Units of work Database.run() ran again."),
    "commit_outcome_unknown": ("commit_outcome_unknown", "CommitOutcomeUnknown raised."),
    "unavailable": ("unavailable", "DatabaseUnavailable raised by Database.run()."),
    "leaks": ("connection_leaks", "Checkouts held longer than leak_threshold."),
}


class AsyncGoneCollector(Collector):
    """Reports one engine's counters and pool figures at every scrape."""

    def __init__(self, target: AsyncEngine | Database, *, name: str | None = None) -> None:
        self._target = target
        if name is None:
            url = target.url
            name = f"{url.host or 'localhost'}/{url.database or ''}"
        self.name = name

    def _engine(self) -> AsyncEngine:
        return self._target.engine if isinstance(self._target, Database) else self._target

    def collect(self) -> Iterator[Metric]:
        if isinstance(self._target, Database) and not self._target.started:
            return  # nothing to report before start() or after close()
        engine = self._engine()
        snapshot = stats(engine)
        labels = ["engine"]
        for field, (metric, help_text) in _COUNTERS.items():
            family = CounterMetricFamily(f"asyncgone_{metric}", help_text, labels=labels)
            family.add_metric([self.name], getattr(snapshot, field))
            yield family
        replaced = CounterMetricFamily(
            "asyncgone_connections_replaced",
            "Connections replaced, by reason.",
            labels=[*labels, "reason"],
        )
        for reason, count in sorted(snapshot.replaced.items()):
            replaced.add_metric([self.name, reason], count)
        yield replaced
        errors = CounterMetricFamily(
            "asyncgone_disconnect_errors",
            "Disconnect errors met while in use, by MySQL code.",
            labels=[*labels, "code"],
        )
        for code, count in sorted(snapshot.errors.items()):
            errors.add_metric([self.name, str(code)], count)
        yield errors
        pool = pool_status(engine)
        for field, help_text in (
            ("size", "Configured pool size."),
            ("checked_out", "Connections in use."),
            ("idle", "Connections idle in the pool."),
            ("overflow", "Connections open beyond the pool size."),
        ):
            gauge = GaugeMetricFamily(f"asyncgone_pool_{field}", help_text, labels=labels)
            gauge.add_metric([self.name], getattr(pool, field))
            yield gauge


def register(
    target: AsyncEngine | Database,
    *,
    name: str | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> AsyncGoneCollector:
    """Export ``target``'s metrics through ``registry``; return the collector (unregister it
    with ``registry.unregister(collector)``)."""
    collector = AsyncGoneCollector(target, name=name)
    registry.register(collector)
    return collector
