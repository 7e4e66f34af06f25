"""Replicas for ``read_only`` work: their engine, and a background watch of health and lag.

``Database(url, replicas=...)`` owns a ``ReplicaSet``: an engine with ``target_role=
"replica"`` over the replica URL's hosts, and a task that checks every host each
``replica_check_interval`` seconds, on a connection of its own per host (outside the
pool), with ``SHOW SLAVE STATUS`` and one ``SELECT`` of ``@@read_only`` and the GTID
positions. A host is *fit* while it answers, is read-only, both replication threads run,
and ``Seconds_Behind_Master`` is known and at most ``max_replica_lag``. The others are
*avoided*: the replica engine's host search skips them, and when a host turns unfit the
replica pool is invalidated, so its connections to it are retired at their next checkout.
Checkouts themselves do nothing more: the decision costs no round trip per session. A
verdict older than ``STALE_AFTER`` (3) intervals (a check that hangs, a monitor that
stopped) makes no host fit: ``read_only`` work then goes to the primary.

``read_only`` sessions go to the replica engine while a host is fit, to the primary
otherwise (or raise ``DatabaseUnavailable`` with ``replica_fallback="raise"``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from . import _statements
from ._causal import applied
from ._errors import describe
from ._hosts import HostAddress
from ._search import HostConnections, HostSearch
from ._server import is_on
from ._state import EngineState
from ._waits import bounded

__all__ = ["STALE_AFTER", "ReplicaHealth", "ReplicaMonitor"]

#: Check intervals after which the monitor's last verdict no longer counts.
STALE_AFTER = 3

log = logging.getLogger("asyncgone")

_STATE_SQL = "SELECT @@read_only, @@gtid_slave_pos, @@gtid_current_pos"
_MYSQL_SQL = "SELECT @@read_only, @@global.gtid_executed, ''"


@dataclasses.dataclass(frozen=True)
class ReplicaHealth:
    """What the last check found on one replica host (``lag`` in seconds, None if unknown)."""

    host: str
    reachable: bool
    read_only: bool = False
    replicating: bool = False
    applying: bool = False
    lag: float | None = None
    gtid_position: str = ""
    error: str | None = None

    def fit(self, max_lag: float) -> bool:
        """Whether ``read_only`` work may go to this host."""
        return (
            self.reachable
            and self.read_only
            and self.applying
            and self.lag is not None
            and self.lag <= max_lag
        )

    def why_not(self, max_lag: float) -> str:
        """Why this host is not fit (empty when it is)."""
        if not self.reachable:
            return f"unreachable ({self.error})"
        if not self.read_only:
            return "writable (not a replica)"
        if not self.applying or (not self.replicating and self.lag is None):
            return f"not replicating ({self.error})"
        if self.lag is None or self.lag > max_lag:
            return f"lagging ({'unknown' if self.lag is None else f'{self.lag:g} s'})"
        return ""


def _field(status: dict[str, Any], mariadb: str, mysql: str) -> Any:
    """A ``SHOW SLAVE STATUS`` field by MariaDB's name, or by MySQL 8's newer one."""
    return status.get(mariadb, status.get(mysql))


async def check_host(conn: Any, host: HostAddress, timeout: float) -> ReplicaHealth:
    """Read one replica's replication state on ``conn``, within ``timeout`` seconds.

    MariaDB: ``SHOW SLAVE STATUS`` and ``@@gtid_slave_pos``; MySQL (no "MariaDB" in the
    server version): ``SHOW REPLICA STATUS`` (8.0.22 and later) and ``@@gtid_executed``,
    its ``Replica_*``/``*_Source`` field names read as well. (MySQL is not tested here.)
    """
    mariadb = "mariadb" in str(conn.get_server_info()).lower()

    async def read() -> ReplicaHealth:
        show, state = (
            ("SHOW SLAVE STATUS", _STATE_SQL) if mariadb else ("SHOW REPLICA STATUS", _MYSQL_SQL)
        )
        status = await _statements.fetch_dict(conn, show)
        row = await _statements.fetch_row(conn, state)
        assert row is not None
        if status is None:
            io = sql = None
            behind = None
        else:
            io = _field(status, "Slave_IO_Running", "Replica_IO_Running")
            sql = _field(status, "Slave_SQL_Running", "Replica_SQL_Running")
            behind = _field(status, "Seconds_Behind_Master", "Seconds_Behind_Source")
        running = io == "Yes" and sql == "Yes"
        stopped = (
            "no replication configured"
            if status is None
            else f"Slave_IO_Running={io}, Slave_SQL_Running={sql}"
        )
        return ReplicaHealth(
            host=str(host),
            reachable=True,
            read_only=is_on(row[0]),
            replicating=running,
            applying=sql == "Yes",
            lag=None if behind is None or not running else float(behind),
            gtid_position=str(row[1] or row[2] or ""),
            error=None if running else stopped,
        )

    result: ReplicaHealth = await bounded(read(), timeout)
    return result


class ReplicaMonitor:
    """The background watch over one replica engine's hosts; see the module docstring."""

    def __init__(
        self, engine: AsyncEngine, state: EngineState, *, max_lag: float, interval: float
    ) -> None:
        assert state.search is not None
        self.engine = engine
        self.max_lag = max_lag
        self.interval = interval
        self._state = state
        self._search: HostSearch = state.search
        self._conns = HostConnections(state, self._search)
        self._task: asyncio.Task[None] | None = None
        # When each host was last seen fit, and its lag then: the bound on its lag while
        # its source is unreachable (a primary that died) and it applies what it has.
        self._fit_at: dict[HostAddress, tuple[float, float]] = {}
        #: The last check of each host, and when it ended (monotonic seconds).
        self.health: dict[HostAddress, ReplicaHealth] = {}
        self.checked_at = -math.inf

    def current(self, now: float | None = None) -> bool:
        """Whether the last check is recent: at most ``STALE_AFTER`` intervals old. An older
        verdict (a check that hangs, a monitor that stopped) makes no replica fit."""
        now = time.monotonic() if now is None else now
        return now - self.checked_at <= STALE_AFTER * self.interval

    def fit(self) -> bool:
        """Whether some replica may take ``read_only`` work now (no I/O)."""
        return self.current() and bool(self._search.usable())

    def applied_everywhere(self, gtid: str) -> bool:
        """Whether the last check found ``gtid`` applied on every usable replica."""
        usable = self._search.usable()
        return (
            self.current()
            and bool(usable)
            and all(
                h in self.health and applied(self.health[h].gtid_position, gtid) for h in usable
            )
        )

    async def start(self) -> ReplicaMonitor:
        """Check every host once, then keep checking in the background; return self."""
        await self.check()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="asyncgone-replica-monitor"
        )
        self._task.add_done_callback(_report_end)
        return self

    async def stop(self) -> None:
        """Stop the task and close the monitor's connections (bounded; safe twice)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=self._state.options.ping_timeout + 1)
        await self._conns.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception as exc:  # one round failed; the next one may not
                self._state.counters.keepalive_errors += 1
                log.warning("replica check failed: %s", describe(exc))

    async def check(self) -> None:
        """Check every host now (concurrently, each bounded) and update what is avoided."""
        hosts = self._search.hosts
        results = await asyncio.gather(*(self._check(h) for h in hosts))
        now = time.monotonic()
        self.health = {h: self._bounded(h, r, now) for h, r in zip(hosts, results, strict=True)}
        self.checked_at = now
        unfit = frozenset(h for h, r in self.health.items() if not r.fit(self.max_lag))
        newly = unfit - self._search.avoided
        self._search.avoided = unfit
        for host, result in self.health.items():
            if result.reachable:
                self._search.down.pop(host, None)
        if newly:
            reasons = ", ".join(f"{h} {self.health[h].why_not(self.max_lag)}" for h in newly)
            log.warning("avoiding replicas: %s", reasons)
            # Its pooled connections are retired at their next checkout.
            self._state.invalidate_pool(now, f"replicas turned unfit: {reasons}")

    def _bounded(self, host: HostAddress, result: ReplicaHealth, now: float) -> ReplicaHealth:
        """``result``, with a lag bound while the replica applies everything it received
        but receives nothing (its source is down or unreachable): the lag it had when last
        seen fit, plus the time since. Its data is no staler than that."""
        if result.lag is not None:
            if result.fit(self.max_lag):
                self._fit_at[host] = (now, result.lag)
            return result
        seen = self._fit_at.get(host)
        if seen is None or not (result.reachable and result.read_only and result.applying):
            return result
        at, lag = seen
        return dataclasses.replace(result, lag=lag + (now - at))

    async def _check(self, host: HostAddress) -> ReplicaHealth:
        try:
            conn = await self._conns.get(host)
            return await check_host(conn, host, self._state.options.ping_timeout)
        except Exception as exc:
            await self._conns.drop(host)
            return ReplicaHealth(host=str(host), reachable=False, error=describe(exc))


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the replica monitor stopped: %r", task.exception())
