"""Where a ``Database``'s sessions go: the primary, or a fit replica for ``read_only`` work.

``Routing`` holds what ``Database(replicas=...)`` adds: the replica URL and options
(validated when the ``Database`` is made), the replica engine and its monitor
(``_replicas``) while started, and the choice for each session. The choice is made from
memory: the monitor's last verdict on each host; a session costs no round trip for it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ._cancel import drain_and_dispose
from ._config import seconds
from ._engine import create_engine
from ._errors import ConfigurationError, DatabaseUnavailable
from ._hosts import hosts_of
from ._replicas import ReplicaHealth, ReplicaMonitor
from ._state import state_of
from ._url import mask, resolve_url

__all__ = [
    "DEFAULT_MAX_REPLICA_LAG",
    "DEFAULT_REPLICA_CHECK_INTERVAL",
    "Routing",
]

log = logging.getLogger("asyncgone")

#: Seconds a replica may lag behind its primary (``Seconds_Behind_Master``) and still take
#: ``read_only`` work.
DEFAULT_MAX_REPLICA_LAG = 5.0

#: Seconds between two checks of every replica's health and lag.
DEFAULT_REPLICA_CHECK_INTERVAL = 1.0

Fallback = Literal["primary", "raise"]


class Routing:
    """The replicas of one ``Database``; see the module docstring."""

    def __init__(
        self,
        replicas: str | URL,
        *,
        max_lag: float,
        interval: float,
        fallback: str,
    ) -> None:
        self.url = resolve_url(replicas)
        if not hosts_of(self.url) and not self.url.host:
            raise ConfigurationError(f"replicas={mask(self.url)} names no host")
        self.max_lag = seconds("max_replica_lag", max_lag, allow_zero=True)
        self.interval = seconds("replica_check_interval", interval)
        if fallback not in ("primary", "raise"):
            raise ConfigurationError(
                f"replica_fallback must be 'primary' or 'raise', got {fallback!r}"
            )
        self.fallback: Fallback = fallback  # type: ignore[assignment]
        self.engine: AsyncEngine | None = None
        self.monitor: ReplicaMonitor | None = None

    async def start(self, engine_options: dict[str, Any]) -> None:
        """Create the replica engine and check every replica once (a replica that is down
        is avoided, not fatal: the primary serves meanwhile)."""
        options = {**engine_options, "target_role": "replica"}
        self.engine = create_engine(self.url, **options)
        state = state_of(self.engine)
        assert state is not None
        assert state.search is not None
        state.search.recheck_after = self.interval
        self.monitor = ReplicaMonitor(
            self.engine, state, max_lag=self.max_lag, interval=self.interval
        )
        await self.monitor.start()

    async def close(self, timeout: float) -> None:
        """Stop the monitor and dispose the replica engine (bounded)."""
        monitor, self.monitor = self.monitor, None
        engine, self.engine = self.engine, None
        if monitor is not None:
            await monitor.stop()
        if engine is not None:
            await drain_and_dispose(engine, timeout)

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

    def health(self) -> list[ReplicaHealth]:
        """The monitor's last check of every replica host."""
        return [] if self.monitor is None else list(self.monitor.health.values())

    def report(self) -> str:
        """Each replica host and why it is not fit, in one line."""
        if self.monitor is None:
            return "not started"
        parts = [
            f"{h.host} {h.why_not(self.max_lag) or 'fit'}" for h in self.monitor.health.values()
        ]
        return ", ".join(parts) or "no hosts"
