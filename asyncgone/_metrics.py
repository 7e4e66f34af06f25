"""What metrics exporters share: pool timings installed on demand, pool limits, counter names.

The Prometheus and OpenTelemetry exporters both call ``instrument(engine)``, which gives the
engine one ``PoolMetrics`` (kept in ``EngineState.metrics``) the first time and counts the
exporters using it; ``PoolMetrics.release()`` takes the hooks off again when the last one
stops. An engine nobody exports has no hook of this module and pays nothing for it.

How each figure is taken (times from ``time.perf_counter()``, in seconds):

- ``create_time``: from the engine's ``do_connect`` event (just before the driver connects;
  asyncgone's own ``do_connect`` listener runs first) to the pool's ``connect`` event after
  asyncgone's connect setup (socket options, server facts), so it covers everything a new
  connection costs. Only connections that opened count; a custom ``creator=`` bypasses
  ``do_connect``, so its connections are not timed.
- ``wait_time``, ``pending``, ``timeouts``: the pool's public ``connect()`` is wrapped on the
  pool instance (``Engine.raw_connection()`` calls ``self.pool.connect()``, and so does an
  engine made by ``execution_options()``, which shares the pool). ``wait_time`` runs from the
  request to the connection handed out, whatever that took: waiting for a free one, opening
  one, asyncgone's checkout check. ``pending`` counts the requests inside ``connect()`` now;
  ``timeouts`` the ones that ended in ``sqlalchemy.exc.TimeoutError`` (``pool_timeout``).
  ``Engine.dispose()`` replaces the pool with ``pool.recreate()``, so ``recreate()`` is
  wrapped as well and wraps the pool it makes. (An ``engine_disposed`` listener would do the
  same, but any engine-level listener makes SQLAlchemy dispatch statement events on every
  execution: a cost on every statement instead of none.)
- ``use_time``: from ``connect()`` handing the connection out to the pool's ``checkin``
  event, the start noted in the pool record's ``record_info``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

import anyio
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection, QueuePool

from . import _compat
from ._compat import max_overflow
from ._errors import describe
from ._state import EngineState, holder_of, state_of
from ._stats import Health, PoolStatus

__all__ = [
    "BUCKETS",
    "COUNTERS",
    "PoolLimits",
    "PoolMetrics",
    "Timing",
    "instrument",
    "limits",
    "pool_status",
]

log = logging.getLogger("asyncgone")

#: Histogram bucket upper bounds in seconds, for all three timings: a pooled checkout takes
#: tens of microseconds, a connect milliseconds, a use anything up to minutes.
BUCKETS = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)

#: ``Stats`` field -> (OpenTelemetry name, unit, description). The Prometheus name is the
#: same with dots as underscores (and ``_total``), which is also what OpenTelemetry's own
#: Prometheus exporter makes of it.
COUNTERS = {
    "connects": ("asyncgone.connections.opened", "{connection}", "Connections opened."),
    "connect_attempts": (
        "asyncgone.connections.attempts",
        "{attempt}",
        "Connection attempts started, refused ones included.",
    ),
    "connects_refused": (
        "asyncgone.connections.refused",
        "{attempt}",
        "Connection attempts refused for want of server capacity, retried after a backoff.",
    ),
    "overflow_given_back": (
        "asyncgone.connections.given_back",
        "{connection}",
        "Overflow connections closed for other clients after the server refused connections.",
    ),
    "checkouts": ("asyncgone.checkouts", "{checkout}", "Connections handed out by the pool."),
    "checks": ("asyncgone.checks", "{check}", "Reused connections checked at checkout."),
    "pings": ("asyncgone.pings", "{ping}", "COM_PING round trips asyncgone sent."),
    "ping_failures": ("asyncgone.ping_failures", "{ping}", "Pings that failed or timed out."),
    "pool_invalidations": (
        "asyncgone.pool_invalidations",
        "{invalidation}",
        "Pool-wide invalidations.",
    ),
    "kills": (
        "asyncgone.statements_killed",
        "{statement}",
        "Statements stopped with KILL after a cancellation.",
    ),
    "resets": (
        "asyncgone.resets",
        "{reset}",
        "ROLLBACKs sent when a connection went back to the pool.",
    ),
    "resets_skipped": (
        "asyncgone.resets_skipped",
        "{reset}",
        "Returns to the pool that needed no ROLLBACK.",
    ),
    "keepalive_runs": ("asyncgone.keepalive.runs", "{run}", "Keepalive rounds."),
    "keepalive_visits": (
        "asyncgone.keepalive.visits",
        "{connection}",
        "Idle connections the keepalive visited.",
    ),
    "keepalive_pings": ("asyncgone.keepalive.pings", "{ping}", "Pings sent by the keepalive."),
    "keepalive_errors": ("asyncgone.keepalive.errors", "{run}", "Keepalive rounds that failed."),
    "replays": ("asyncgone.replays", "{replay}", "Units of work Database.run() ran again."),
    "commit_outcome_unknown": (
        "asyncgone.commit_outcome_unknown",
        "{commit}",
        "CommitOutcomeUnknown raised.",
    ),
    "unavailable": (
        "asyncgone.unavailable",
        "{error}",
        "DatabaseUnavailable raised by Database.run().",
    ),
    "leaks": (
        "asyncgone.connection_leaks",
        "{connection}",
        "Checkouts held longer than leak_threshold.",
    ),
}

# Installing and releasing may happen in exporters' threads (a scrape, a periodic reader)
# as well as in the application's: one at a time.
_LOCK = threading.Lock()

# Keys in a pool record's info: when its connect began, when its current use began.
_CONNECT_STARTED = "asyncgone.connect_started"
_USE_STARTED = "asyncgone.use_started"


class Timing:
    """One timing's histogram: counts per bucket of ``BUCKETS`` (the last for larger
    values), the sum in seconds, and the sinks each value is also passed to (an exporter's
    ``record``)."""

    __slots__ = ("counts", "sinks", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.sinks: list[Callable[[float], object]] = []

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (Prometheus'
        # "le", OpenTelemetry's inclusive upper bounds).
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        for sink in self.sinks:
            try:
                sink(seconds)
            except Exception:  # an exporter's failure must never fail a checkout
                log.debug("a metrics exporter failed to record a timing", exc_info=True)

    def cumulative(self) -> tuple[list[tuple[float, int]], float]:
        """``([(upper bound, values at or below it), ..., (inf, count)], sum)``: what a
        Prometheus histogram reports, from one copy of the counts (read while the event loop
        may be adding to them)."""
        counts = self.counts.copy()
        return list(zip((*BUCKETS, math.inf), itertools.accumulate(counts), strict=True)), self.sum


class PoolMetrics:
    """One engine's timings and pool request figures; see the module docstring."""

    def __init__(self, engine: Engine, state: EngineState) -> None:
        self.create_time = Timing()
        self.wait_time = Timing()
        self.use_time = Timing()
        self.pending = 0  # requests inside the pool's connect() now
        self.timeouts = 0  # requests that ended in the pool's TimeoutError
        self.users = 0  # exporters using this object (see instrument() and release())
        self._engine = engine
        self._state = state
        self._wrappers: set[object] = set()  # those _wrap() made (two per pool)

    # -- the hooks -------------------------------------------------------------------------

    def install(self) -> None:
        engine = self._engine
        event.listen(engine, "do_connect", self._on_do_connect)
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "checkin", self._on_checkin)
        self._wrap(engine.pool)

    def release(self) -> None:
        """One exporter stopped; the last one takes every hook off the engine."""
        with _LOCK:
            self.users -= 1
            if self.users == 0:
                self._uninstall()

    def _uninstall(self) -> None:
        engine = self._engine
        event.remove(engine, "do_connect", self._on_do_connect)
        event.remove(engine, "connect", self._on_connect)
        event.remove(engine, "checkin", self._on_checkin)
        pool = engine.pool
        for name in ("connect", "recreate"):
            # Our wrappers are instance attributes over the class's methods: deleting them
            # brings the methods back. (Pools the engine discarded keep theirs, harmlessly.)
            if vars(pool).get(name) in self._wrappers:
                delattr(pool, name)
        if self._state.metrics is self:
            self._state.metrics = None

    def _wrap(self, pool: Pool) -> None:
        connect = pool.connect
        recreate = pool.recreate
        metrics = self

        def timed_connect() -> PoolProxiedConnection:
            metrics.pending += 1
            started = time.perf_counter()
            try:
                connection = connect()
            except sa_exc.TimeoutError:
                metrics.timeouts += 1
                raise
            finally:
                metrics.pending -= 1
            now = time.perf_counter()
            # The record's own dict (public, memoized on the record): ``info`` would cost a
            # dict per checkout (it is memoized on each new proxy).
            record_info = connection.record_info
            if record_info is not None:
                record_info[_USE_STARTED] = now
            metrics.wait_time.observe(now - started)
            return connection

        def recreate_timed() -> Pool:
            new = recreate()
            metrics._wrap(new)
            return new

        self._wrappers.update((timed_connect, recreate_timed))
        pool.connect = timed_connect  # type: ignore[method-assign]
        pool.recreate = recreate_timed  # type: ignore[method-assign]

    def _on_do_connect(
        self, dialect: Any, record: ConnectionPoolEntry, cargs: Any, cparams: Any
    ) -> None:
        record.info[_CONNECT_STARTED] = time.perf_counter()

    def _on_connect(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        started = record.info.pop(_CONNECT_STARTED, None)
        if started is not None:  # None: opened before the hooks were installed
            self.create_time.observe(time.perf_counter() - started)

    def _on_checkin(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record_info = record.record_info  # None only for a proxy without a record
        started = record_info.pop(_USE_STARTED, None) if record_info is not None else None
        if started is not None:  # None: checked out before the hooks were installed
            self.use_time.observe(time.perf_counter() - started)


def _sync(engine: AsyncEngine | Engine) -> Engine:
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


def instrument(engine: AsyncEngine | Engine) -> PoolMetrics:
    """Return the engine's ``PoolMetrics``, installing it on first use, and count one more
    exporter using it (each calls ``release()`` when it stops).

    Raises:
        ConfigurationError: the engine was not made by ``asyncgone.create_engine()``.
    """
    state = state_of(engine, "metrics export")
    assert state is not None  # state_of() raised otherwise
    with _LOCK:
        # EngineState types the slot Any (it does not import this module).
        metrics: PoolMetrics | None = state.metrics
        if metrics is None:
            metrics = PoolMetrics(_sync(engine), state)
            metrics.install()
            state.metrics = metrics
        metrics.users += 1
        return metrics


@dataclasses.dataclass(frozen=True, slots=True)
class PoolLimits:
    """A pool's configured limits (None where the pool has none, or keeps no connections)."""

    max_open: int | None  # pool_size + max_overflow
    max_idle: int | None  # pool_size: a QueuePool closes returned connections beyond it
    min_idle: int | None  # the engine's min_idle (kept while a keepalive runs), <= pool_size


def limits(engine: AsyncEngine | Engine) -> PoolLimits:
    """The engine's pool limits; all None for a pool that is not a ``QueuePool``, or has no
    size limit (``pool_size=0``)."""
    sync = _sync(engine)
    pool = sync.pool
    if not isinstance(pool, QueuePool) or pool.size() <= 0:
        return PoolLimits(None, None, None)
    size = pool.size()
    overflow = max_overflow(pool)  # None: unlimited, or unknown (then not reported)
    max_open = size + overflow if overflow is not None else None
    state = state_of(sync)
    min_idle = min(state.options.min_idle, size) if state is not None else 0
    return PoolLimits(max_open, size, min_idle)


def pool_status(engine: AsyncEngine) -> PoolStatus:
    """The engine's pool figures (zeros for a pool that keeps no connections).

    Idle connections whose socket shows that the server closed them, and empty pool slots
    waiting for a new connection, count as ``idle_dead``, not ``idle``: checking one out
    costs a new connection. (One ``poll(2)`` per idle connection; no round trip.)
    """
    pool = engine.sync_engine.pool
    if not isinstance(pool, QueuePool):
        return PoolStatus(size=0, checked_out=0, idle=0, overflow=0, idle_dead=0)
    idle = pool.checkedin()
    dead = 0
    for record in _compat.idle_records(pool):
        dbapi_connection = record.dbapi_connection
        holder = holder_of(record)  # its socket watch, made once per connection
        if dbapi_connection is None or (
            holder is not None and holder.closed(dbapi_connection.driver_connection, True)
        ):
            dead += 1
    return PoolStatus(
        size=pool.size(),
        checked_out=pool.checkedout(),
        idle=idle - dead,
        overflow=max(pool.overflow(), 0),
        idle_dead=dead,
    )


async def check_health(engine: AsyncEngine, timeout: float, target: str) -> Health:  # noqa: ASYNC109
    """``Database.health()``: a ``SELECT 1`` on a pooled connection within ``timeout``
    seconds, its failure reported, never raised; ``target`` is the masked URL."""
    started = time.monotonic()
    error: str | None = None
    before = pool_status(engine)  # what the others held: this check's connection is not
    try:
        with anyio.fail_after(timeout):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except TimeoutError:
        error = f"no answer within {timeout:g} s"
        most = limits(engine).max_open
        state = state_of(engine)
        holding = state is not None and state.admission is not None and state.admission.holding
        if most is not None and before.checked_out >= most and not holding:
            # Not the server's fault: every connection the pool may open was in use (a
            # limit lowered because the server is full is the server's, though).
            error = (
                f"no connection within {timeout:g} s: all {most} the pool may open "
                f"(pool_size + max_overflow) are in use"
            )
    except Exception as exc:
        error = describe(exc)
    latency = None if error else time.monotonic() - started
    return Health(
        ok=error is None, latency=latency, error=error, target=target, pool=pool_status(engine)
    )
