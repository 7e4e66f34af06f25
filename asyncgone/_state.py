"""Per-engine and per-connection state: what asyncgone knows about an engine and its connections.

One ``EngineState`` per engine made by ``create_engine()``, the only object through which
the keepalive, sessions, ``Database``, stats and the pool listeners share anything; one
``ConnectionHolder`` per pooled connection, kept in its pool record's ``info``.

Pool-wide invalidation works by generation, as asyncpg's pool does: the state remembers the
moment the first sign of a server-wide failure was seen, and every connection opened before
it is retired at its next checkout. Nothing keeps a list of victims.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from ._compat import FAIRY_RECORD
from ._config import EngineOptions
from ._errors import ConfigurationError
from ._stats import Counters, Stats
from ._watch import Closed, unknown

if TYPE_CHECKING:
    from ._admission import Admission
    from ._cancel import StatementKiller
    from ._drivers import CursorCount, DriverSupport
    from ._giveback import GiveBack
    from ._search import HostSearch

__all__ = [
    "HOLDER_KEY",
    "ConnectionHolder",
    "EngineState",
    "attach",
    "holder_of",
    "holder_of_checkout",
    "lifetime_deadline",
    "state_of",
    "stats",
]

log = logging.getLogger("asyncgone")

HOLDER_KEY = "asyncgone"

# Up to this fraction of max_lifetime is taken off each connection's lifetime at random, so
# that connections opened together (a pool warming up, a restart) do not retire together.
_LIFETIME_JITTER = 0.25

# This many connections found dead within this many seconds means the server or the network
# path failed, not one connection: invalidate the pool instead of discovering the rest one
# checkout (or one ping timeout) at a time.
_DEAD_TOGETHER = 3
_DEAD_WINDOW = 2.0


def lifetime_deadline(now: float, max_lifetime: float | None) -> float:
    """Return when a connection opened at ``now`` retires: its lifetime minus random jitter."""
    if max_lifetime is None:
        return math.inf
    return now + max_lifetime * (1.0 - _LIFETIME_JITTER * random.random())


class ConnectionHolder:
    """asyncgone's facts about one pooled connection (times on ``time.monotonic()``)."""

    __slots__ = (
        "closed",
        "conn",
        "created",
        "cursors",
        "ended_at",
        "expires",
        "idle_limit",
        "last_activity",
        "leak_timer",
        "loop",
        "quiet_for",
        "trusted_until",
    )

    def __init__(
        self,
        created: float,
        expires: float,
        idle_limit: float,
        loop: asyncio.AbstractEventLoop,
        ping_after: float | None = None,
    ) -> None:
        self.created = created
        self.expires = expires
        self.idle_limit = idle_limit
        # How long the connection may stay idle and still be handed out without anything
        # but the socket check: less than its idle limit, and than the ping threshold.
        self.quiet_for = min(idle_limit, math.inf if ping_after is None else ping_after)
        # When the server last heard from this connection, never later than the truth: the
        # server's wait_timeout counts from there. Idle time is measured from it.
        self.last_activity = created
        # Until when a checkout needs nothing but the socket check: before the connection's
        # end of life and within ``quiet_for`` of its last activity (see ``active``).
        self.trusted_until = min(expires, created + self.quiet_for)
        # The event loop the connection's transport belongs to: it cannot be used, nor even
        # closed politely, from any other. Weakly: a closed loop must not stay in memory
        # until the record reconnects.
        self.loop = weakref.ref(loop)
        # How many cursors the connection had created when SQLAlchemy last ended its
        # transaction (see _reset); None until it has. ``cursors`` counts them.
        self.ended_at: int | None = None
        self.cursors: CursorCount | None = None
        # Whether the connection can no longer be used (no round trip; see _drivers).
        self.closed: Closed = unknown
        # The driver's connection, weakly (it must not outlive its close in here): reached
        # at every unit of work, more cheaply than through SQLAlchemy's objects.
        self.conn: Callable[[], Any] = _gone
        self.leak_timer: asyncio.TimerHandle | None = None

    def active(self, when: float) -> None:
        """Note that the server heard from the connection at ``when``."""
        self.last_activity = when
        until = when + self.quiet_for
        self.trusted_until = until if until < self.expires else self.expires  # min(), inlined

    def remember(self, record: ConnectionPoolEntry) -> None:
        """Attach to a pool record."""
        record.info[HOLDER_KEY] = self


def _gone() -> None:
    return None


def holder_of_checkout(pooled: Any) -> ConnectionHolder | None:
    """The holder of a checked-out connection (SQLAlchemy's pooled connection object), read
    through its pool record; None when there is none, e.g. the stand-in SQLAlchemy uses while
    it initialises the dialect."""
    record = getattr(pooled, FAIRY_RECORD, None)
    holder: ConnectionHolder | None = None if record is None else record.info.get(HOLDER_KEY)
    return holder


def holder_of(
    pooled: ConnectionPoolEntry | PoolProxiedConnection | None,
) -> ConnectionHolder | None:
    """Return the holder of a pool record or of a checked-out connection (both share the
    record's ``info``); None for a connection asyncgone did not set up."""
    if pooled is None:
        return None
    holder: ConnectionHolder | None = pooled.info.get(HOLDER_KEY)
    return holder


class _DeadTracker:
    """Spot several connections dying together, the sign of a server-wide failure."""

    __slots__ = ("_times",)

    def __init__(self) -> None:
        self._times: collections.deque[float] = collections.deque(maxlen=_DEAD_TOGETHER)

    def note(self, now: float) -> float | None:
        """Record one dead connection; when that completes a burst, return when it began."""
        self._times.append(now)
        first = self._times[0]
        if len(self._times) == _DEAD_TOGETHER and now - first <= _DEAD_WINDOW:
            self._times.clear()  # one invalidation per burst; start counting again
            return first
        return None


class EngineState:
    """Everything asyncgone keeps for one engine; see the module docstring.

    Listeners, the keepalive, sessions and ``Database`` use the attributes and methods
    below and nothing else of each other.
    """

    def __init__(
        self,
        options: EngineOptions,
        *,
        connect_timeout: float,
        driver: DriverSupport,
        pool_recycle: float | None,
    ) -> None:
        self.options = options
        self.counters = Counters()
        self.connect_timeout = connect_timeout
        self.driver = driver
        self.pool_recycle = pool_recycle
        self.killer: StatementKiller | None = None
        # Where new connections go, for a multi-host URL or a target_role (_search).
        self.search: HostSearch | None = None
        # Called with the DBAPI connection right after each COMMIT (in SQLAlchemy's
        # greenlet): read-your-writes reads the commit's GTID there (_causal).
        self.after_commit: Callable[[Any], None] | None = None
        # Who may open a connection when (_admission); None: every connect at once.
        self.admission: Admission | None = None
        # When to ask the server whether it refused anyone (_giveback); None: never.
        self.give_back: GiveBack | None = None
        # Timings for metrics exporters (_metrics.PoolMetrics), installed on first request:
        # an engine nobody exports pays nothing for them.
        self.metrics: Any = None  # a _metrics.PoolMetrics once installed
        # The shortest idle time, over every connection opened so far, that the keepalive's
        # automatic interval must stay under: its idle limit, and its server's wait_timeout
        # (less a margin) even when the idle limit is off.
        self.smallest_idle_limit = math.inf
        # Called when smallest_idle_limit falls (a running keepalive: it reschedules).
        self.idle_limit_watchers: list[Callable[[], None]] = []
        # Connections opened before this moment belong to an invalidated pool. SQLAlchemy's
        # own pool invalidation uses "now", which also discards the healthy replacements
        # opened while the failure was being discovered; asyncgone cuts at the first sign.
        self.invalid_before = -math.inf
        self._dead = _DeadTracker()
        self.recycle_warned = False

    def lower_idle_limit(self, limit: float) -> None:
        """Note a connection's idle limit; tell the watchers when it is the smallest yet
        (a server whose ``wait_timeout`` was lowered, a failover to another server)."""
        if limit >= self.smallest_idle_limit:
            return
        self.smallest_idle_limit = limit
        for watcher in list(self.idle_limit_watchers):
            watcher()

    def note_dead(self, now: float) -> bool:
        """Record a connection found dead; invalidate the pool when several die together.

        Returns whether the pool was invalidated (its INFO line then speaks for this one).
        """
        cutoff = self._dead.note(now)
        if cutoff is None:
            return False
        self.invalidate_pool(cutoff, "several connections found dead together")
        return True

    def invalidate_pool(self, cutoff: float, why: str) -> None:
        """Mark every connection opened before ``cutoff`` for replacement at its checkout."""
        self.invalid_before = max(self.invalid_before, cutoff)
        self.counters.pool_invalidations += 1
        log.info("invalidating all pooled connections: %s", why)

    def keepalive_interval(self, interval: float | str) -> float:
        """Resolve a keepalive interval: ``"auto"`` is half the shorter of the smallest idle
        limit seen and ``network_idle_limit``."""
        if interval != "auto":
            return float(interval)
        return min(self.smallest_idle_limit, self.options.network_idle_limit) / 2


_REGISTRY: weakref.WeakKeyDictionary[Engine, EngineState] = weakref.WeakKeyDictionary()


def attach(engine: Engine, state: EngineState) -> None:
    """Record ``state`` as the state of a (sync) engine."""
    _REGISTRY[engine] = state


def state_of(engine: AsyncEngine | Engine | Any, what: str | None = None) -> EngineState | None:
    """Return the state of an engine made by ``create_engine()``.

    With ``what`` (the feature asking), an engine asyncgone did not make raises
    ``ConfigurationError`` naming that feature; without it, the answer is None.
    """
    sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    state = _REGISTRY.get(sync) if isinstance(sync, Engine) else None
    if state is None and what is not None:
        raise ConfigurationError(
            f"{what} needs an engine made by asyncgone.create_engine(): it works through the "
            f"checks that create_engine() installs"
        )
    return state


def stats(engine: AsyncEngine | Engine) -> Stats:
    """Return a snapshot of asyncgone's counters for an engine made by ``create_engine()``.

    Raises:
        TypeError: the engine was not made by ``asyncgone.create_engine()``.
    """
    state = state_of(engine)
    if state is None:
        raise TypeError(
            "this engine was not created by asyncgone.create_engine(), so asyncgone keeps no "
            "counters for it"
        )
    return state.counters.snapshot()
