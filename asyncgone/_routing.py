"""Where a ``Database``'s sessions go: the primary, or a fit replica for ``read_only`` work.

``Routing`` holds what ``Database(replicas=...)`` adds: the replica URL and options
(validated when the ``Database`` is made), the replica engine and its monitor
(``_replicas``) while started, and the choice for each session. The choice is made from
memory: the monitor's last verdict on each host; a session costs no round trip for it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ._cancel import drain_and_dispose
from ._causal import PRIMARY, CausalScope, GtidTracker
from ._config import seconds
from ._engine import create_engine
from ._errors import ConfigurationError, DatabaseUnavailable
from ._hosts import hosts_of
from ._invalidation import LOST_CONNECTION
from ._keepalive import Keepalive
from ._replicas import STALE_AFTER, ReplicaHealth, ReplicaMonitor
from ._session import SessionScope
from ._state import state_of
from ._statements import execute
from ._url import mask, resolve_url
from ._waits import bounded

__all__ = [
    "DEFAULT_CAUSAL_READS_TIMEOUT",
    "DEFAULT_MAX_REPLICA_LAG",
    "DEFAULT_REPLICA_CHECK_INTERVAL",
    "Routing",
    "RoutingOptions",
]

log = logging.getLogger("asyncgone")

#: Seconds a replica may lag behind its primary (``Seconds_Behind_Master``) and still take
#: ``read_only`` work.
DEFAULT_MAX_REPLICA_LAG = 5.0

#: Seconds between two checks of every replica's health and lag.
DEFAULT_REPLICA_CHECK_INTERVAL = 1.0

#: Seconds a ``read_only`` session after a commit waits for its replica to apply that
#: commit before it goes to the primary instead.
DEFAULT_CAUSAL_READS_TIMEOUT = 1.0

Fallback = Literal["primary", "raise"]


_READ_ONLY_SQL = "SET SESSION TRANSACTION READ ONLY"


def _read_only_sessions(dbapi: Any, timeout: float) -> Callable[[Any, Any], None]:
    """A ``connect`` listener that makes a new connection's transactions read-only (one
    statement, at connect, bounded by ``timeout`` seconds)."""

    def listener(dbapi_connection: Any, record: Any) -> None:
        try:
            dbapi_connection.run_async(lambda c: bounded(execute(c, _READ_ONLY_SQL), timeout))
        except dbapi.Error:
            raise
        except Exception as exc:  # a timeout, a transport error: the connection is lost
            raise dbapi.OperationalError(
                LOST_CONNECTION, f"Lost connection while making the session read-only: {exc!r}"
            ) from exc

    return listener


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutingOptions:
    """``Database``'s replica options, validated when made (also without ``replicas``).

    Raises:
        ConfigurationError: a negative or non-numeric number of seconds, or a
            ``fallback`` other than ``"primary"`` and ``"raise"``.
    """

    max_lag: float = DEFAULT_MAX_REPLICA_LAG
    interval: float = DEFAULT_REPLICA_CHECK_INTERVAL
    fallback: Fallback = "primary"
    causal_timeout: float = DEFAULT_CAUSAL_READS_TIMEOUT

    def __post_init__(self) -> None:
        seconds("max_replica_lag", self.max_lag, allow_zero=True)
        seconds("replica_check_interval", self.interval)
        if self.fallback not in ("primary", "raise"):
            raise ConfigurationError(
                f"replica_fallback must be 'primary' or 'raise', got {self.fallback!r}"
            )
        seconds("causal_reads_timeout", self.causal_timeout, allow_zero=True)


class Routing:
    """The replicas of one ``Database``; see the module docstring."""

    def __init__(self, replicas: str | URL, options: RoutingOptions) -> None:
        self.url = resolve_url(replicas)
        if not hosts_of(self.url) and not self.url.host:
            raise ConfigurationError(f"replicas={mask(self.url)} names no host")
        self.max_lag = options.max_lag
        self.interval = options.interval
        self.fallback: Fallback = options.fallback
        self.causal_timeout = options.causal_timeout
        self.tracker = GtidTracker(timeout=self.causal_timeout + 5.0)
        self.engine: AsyncEngine | None = None
        self.monitor: ReplicaMonitor | None = None
        self.keepalive: Keepalive | None = None

    async def start(
        self, engine_options: dict[str, Any], primary: AsyncEngine, *, keepalive: bool
    ) -> None:
        """Create the replica engine and check every replica once (a replica that is down
        is avoided, not fatal: the primary serves meanwhile)."""
        options = {**engine_options, "target_role": "replica"}
        self.engine = create_engine(self.url, **options)
        # Every replica session is read-only, even for a user whom the server's read_only
        # does not stop (SUPER, READ ONLY ADMIN): a COMMIT lost in flight committed nothing.
        sync_engine = self.engine.sync_engine
        state = state_of(self.engine)
        assert state is not None
        listener = _read_only_sessions(sync_engine.dialect.dbapi, state.options.ping_timeout)
        event.listen(sync_engine, "connect", listener)
        assert state.search is not None
        state.search.recheck_after = self.interval
        self.monitor = ReplicaMonitor(
            self.engine, state, max_lag=self.max_lag, interval=self.interval
        )
        await self.monitor.start()
        if keepalive:  # the replica pool's idle connections, as the primary's
            self.keepalive = await Keepalive(self.engine).start()
        primary_state = state_of(primary)
        assert primary_state is not None
        dialect = primary.sync_engine.dialect
        tracker = self.tracker
        primary_state.after_commit = lambda c: tracker.after_commit(
            c, getattr(dialect, "is_mariadb", True)
        )

    async def close(self, timeout: float) -> None:
        """Stop the monitor and dispose the replica engine (bounded)."""
        monitor, self.monitor = self.monitor, None
        engine, self.engine = self.engine, None
        keepalive, self.keepalive = self.keepalive, None
        if keepalive is not None:
            await keepalive.stop()
        if monitor is not None:
            await monitor.stop()
        if engine is not None:
            await drain_and_dispose(engine, timeout)

    def on_replica(self, scope: SessionScope) -> bool:
        """Whether ``scope``'s session ran on the replica engine (read-only sessions)."""
        return self.engine is not None and scope.engine is self.engine

    def engine_for(self, primary: AsyncEngine) -> AsyncEngine:
        """The engine for a ``read_only`` session: the replicas' while one is fit."""
        monitor, engine = self.monitor, self.engine
        if monitor is not None and engine is not None and monitor.fit():
            return engine
        if self.fallback == "raise":
            raise DatabaseUnavailable(
                f"no replica of {mask(self.url)} fits (max_replica_lag={self.max_lag:g} s): "
                f"{self.report()}"
            )
        return primary

    def scope(
        self, primary: AsyncEngine, options: dict[str, Any], cleanup_timeout: float
    ) -> SessionScope:
        """The scope of a ``read_only`` session: on a fit replica that has applied this
        context's last commit (waiting for it, bounded, if needed), else on the primary."""
        engine = self.engine_for(primary)
        gtid = self.tracker.get()
        if gtid is None or engine is primary:
            return SessionScope(engine, options, cleanup_timeout=cleanup_timeout)
        if gtid == PRIMARY:
            return SessionScope(primary, options, cleanup_timeout=cleanup_timeout)
        monitor = self.monitor
        if monitor is not None and monitor.applied_everywhere(gtid):
            # Every usable replica had it at the last check: no wait for this session. The
            # context keeps its GTID: a replica the monitor had not seen yet may not have it.
            return SessionScope(engine, options, cleanup_timeout=cleanup_timeout)
        return CausalScope(
            engine,
            options,
            cleanup_timeout=cleanup_timeout,
            primary=primary,
            gtid=gtid,
            timeout=self.causal_timeout,
            bound=self.causal_timeout + self._ping_timeout(engine),
        )

    @staticmethod
    def _ping_timeout(engine: AsyncEngine) -> float:
        state = state_of(engine)
        return 5.0 if state is None else state.options.ping_timeout

    def health(self) -> list[ReplicaHealth]:
        """The monitor's last check of every replica host."""
        return [] if self.monitor is None else list(self.monitor.health.values())

    def report(self) -> str:
        """Each replica host and why it is not fit, in one line."""
        if self.monitor is None:
            return "not started"
        if not self.monitor.current():
            return f"no replica check in the last {STALE_AFTER} intervals ({self.interval:g} s)"
        parts = [
            f"{h.host} {h.why_not(self.max_lag) or 'fit'}" for h in self.monitor.health.values()
        ]
        return ", ".join(parts) or "no hosts"
