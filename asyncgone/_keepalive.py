"""The keepalive: a background task that keeps an idle pool's connections alive and warm.

Every ``interval / 2`` seconds it takes the pool's idle connections one at a time, as a
housekeeper does (HikariCP's), and runs the checkout check's verdict on each with its own
thresholds: a connection idle for ``interval`` gets a bounded ping (which also resets the
server's and any load balancer's idle timer); a dead one, or one whose lifetime ends before
the next round, is replaced on the spot, so a request that arrives after hours of idleness
finds live connections and pays no reconnect. It never checks a connection out: nothing it
does counts as a checkout or goes through the pool's events.

User demand wins. The keepalive holds one connection at a time, only while another idle
one stays available for users (the last idle one only while nothing at all is checked
out), and never waits for the pool: with the pool exhausted it does nothing. ``min_idle``
connections are opened straight into the pool while the engine is idle, one at a time and
within the pool's size, without holding any other connection meanwhile.

For a multi-host URL whose hosts are Galera nodes, each round also checks which nodes may
serve (``_galera.GaleraWatch``): a node that is not Synced stops getting new connections,
and the pool's connections to it are retired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool
from sqlalchemy.util import greenlet_spawn

from . import _compat
from ._checkout import DEAD, PING_DUE, announce, bounded_ping, verdict
from ._config import check_keepalive
from ._errors import describe
from ._galera import GaleraWatch
from ._state import EngineState, holder_of, state_of
from ._stats import Reason
from ._waits import finish

__all__ = ["Keepalive", "keepalive"]

log = logging.getLogger("asyncgone")

_STOP_TIMEOUT = 10.0  # bound on stopping: the visit or opening in progress finishes first

# A visit (a ping, perhaps a replacement) or an opening for min_idle runs to its end even
# when the keepalive is stopped meanwhile: cut short, it would cost the pool that connection
# (an interrupted ping leaves its stream unusable) or strand a half-configured one. Each is
# bounded by the timeouts of what it may do, plus this for SQLAlchemy's own work (the
# first-connect initialisation, closing a replaced connection).
_SLACK = 5.0


class Keepalive:
    """A running keepalive task for one engine; see ``keepalive()``."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        interval: float | str | None = None,
        min_idle: int | None = None,
    ) -> None:
        self.engine = engine
        state = state_of(engine, "asyncgone.keepalive()")
        assert state is not None
        self._state = state
        options = state.options
        self._interval = options.keepalive_interval if interval is None else interval
        self._min_idle = options.min_idle if min_idle is None else min_idle
        check_keepalive(self._interval, self._min_idle)
        self._task: asyncio.Task[None] | None = None
        search = state.search
        self._galera = None if search is None else GaleraWatch(state, search)

    @property
    def interval(self) -> float:
        """Idle seconds after which a pooled connection is pinged.

        ``"auto"``: half of the shorter of the smallest idle limit of the pool's connections
        (derived from their ``wait_timeout``) and ``network_idle_limit``.
        """
        return self._state.keepalive_interval(self._interval)

    async def start(self) -> Keepalive:
        """Start the background task; return self."""
        if self._task is not None:
            raise RuntimeError("this keepalive is already running")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="asyncgone-keepalive")
        self._task.add_done_callback(_report_end)
        return self

    async def stop(self) -> None:
        """Stop the task and wait for it (bounded); safe to call twice and under cancellation."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        task.cancel()
        # finish() re-raises a cancellation of the caller once the task has stopped: that
        # one must propagate. Only an overrun is tolerated (the task is cancelled anyway).
        with contextlib.suppress(TimeoutError):
            await finish(asyncio.wait({task}), _STOP_TIMEOUT, "stopping the keepalive")
        if self._galera is not None:
            with contextlib.suppress(TimeoutError):
                await finish(self._galera.close(), _STOP_TIMEOUT, "closing the Galera watch")

    async def __aenter__(self) -> Keepalive:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _run(self) -> None:
        # A connection with a shorter idle limit than any before (its server's wait_timeout
        # was lowered, or another server took over) wakes the task: its automatic interval
        # shrinks, and the idle connections must not wait out the old one.
        loop = asyncio.get_running_loop()
        lowered = asyncio.Event()

        def wake() -> None:
            if _compat.running_loop() is loop:
                lowered.set()
            else:  # a connect on another loop (or thread): tell this one
                with contextlib.suppress(RuntimeError):  # this loop is closed
                    loop.call_soon_threadsafe(lowered.set)

        watchers = self._state.idle_limit_watchers
        watchers.append(wake)
        try:
            while True:
                lowered.clear()
                # asyncio.wait, not wait_for: on Python 3.10 and 3.11 wait_for may swallow
                # a cancellation that comes as the event is set (stop() would then wait).
                waiting = loop.create_task(lowered.wait())
                try:
                    await asyncio.wait({waiting}, timeout=min(self.interval / 2, 3600.0))
                finally:
                    waiting.cancel()
                try:
                    await self.run_once()
                except Exception as exc:  # a round failed; the next one may not
                    self._state.counters.keepalive_errors += 1
                    log.warning("keepalive round failed: %s", describe(exc))
        finally:
            watchers.remove(wake)

    async def run_once(self) -> int:
        """Do one round now; return how many connections were visited."""
        if self._galera is not None:
            await self._galera.check()
        pool = self.engine.sync_engine.pool
        if not isinstance(pool, QueuePool) or not _compat.can_keep(pool):
            return 0  # NullPool keeps nothing; other pools are left alone
        self._state.counters.keepalive_runs += 1
        await self._warm_up(pool)
        return await self._visit(pool)

    async def _visit(self, pool: QueuePool) -> int:
        """Take idle connections one at a time and check each."""
        state = self._state
        # A ping, or a replacement: closing the old connection, opening and configuring a
        # new one.
        bound = 2 * state.options.ping_timeout + _connect_bound(state) + _SLACK
        interval = self.interval
        seen: set[int] = set()
        for _ in range(pool.checkedin()):
            # No await between this test and taking the connection: no user can take it in
            # between, and the keepalive never queues for one.
            if not _may_borrow(pool):
                break  # users need what is left
            record = _compat.take_idle(pool)
            if record is None:
                break
            if id(record) in seen:  # a LIFO pool hands the same one back: leave the rest
                _compat.give_back(pool, record)
                break
            seen.add(id(record))
            state.counters.keepalive_visits += 1
            try:
                await finish(self._check(record, interval), bound, "a keepalive visit")
            finally:
                self._give_back(pool, record)
        return len(seen)

    def _open_idle(self, pool: QueuePool) -> bool:
        """Open one connection into the pool's idle queue (in SQLAlchemy's greenlet, so
        that nothing can come between opening and handing over); False if it is full."""
        record = _compat.open_idle(pool)
        if record is None:
            return False
        self._give_back(pool, record)
        return True

    def _give_back(self, pool: QueuePool, record: ConnectionPoolEntry) -> None:
        """Return a record to its pool, or close it if the engine was disposed meanwhile
        (its pool replaced): nothing would ever close it in a pool nobody uses."""
        if self.engine.sync_engine.pool is pool:
            _compat.give_back(pool, record)
        else:
            record.invalidate()  # the socket only, through asyncgone's closing guard

    async def _check(self, record: ConnectionPoolEntry, interval: float) -> None:
        """Ping an idle connection if due; replace it if dead or about to retire."""
        state = self._state
        holder = holder_of(record)
        dbapi_connection = record.dbapi_connection
        if holder is None or dbapi_connection is None:
            # Left empty by a failed connect or an invalidation: open it now, not when a
            # user needs it.
            await greenlet_spawn(_reconnect, record)
            return
        conn = dbapi_connection.driver_connection
        now = time.monotonic()
        reason = verdict(state, holder, conn, now, ping_after=interval, horizon=interval)
        if reason is PING_DUE:
            state.counters.keepalive_pings += 1
            reason = await bounded_ping(state, holder, conn)
        if reason is None:
            return
        assert isinstance(reason, Reason)
        # Replaced in the background: no user paid for it. The log line names the cause.
        state.counters.replaced[Reason.KEEPALIVE] += 1
        if reason in DEAD:
            state.driver.abort(conn)
        announce(state, conn, reason, now, who="the keepalive is ")
        await greenlet_spawn(_replace, record)

    async def _warm_up(self, pool: QueuePool) -> None:
        """While the engine is idle, open connections up to ``min_idle`` (at most the pool's
        size), one at a time, straight into the pool.

        No idle connection is held meanwhile, and nothing waits for the pool. A user
        arriving during a connect takes an idle connection as usual (or, with none left,
        gets this one when it is ready, or opens their own), and stops the warm-up: it
        resumes once the engine is idle again.
        """
        state = self._state
        target = min(self._min_idle, pool.size())
        # Connecting, then the server-facts query.
        bound = _connect_bound(state) + state.options.ping_timeout + _SLACK
        while pool.checkedin() < target and pool.checkedout() == 0:
            opening = greenlet_spawn(self._open_idle, pool)
            if not await finish(opening, bound, "opening a connection for min_idle"):
                break


def _connect_bound(state: EngineState) -> float:
    """Seconds opening one connection may take: the host search's deadline when the engine
    has one (it may try several hosts), else ``connect_timeout``."""
    search = state.search
    return state.connect_timeout if search is None else max(state.connect_timeout, search.deadline)


def _replace(record: ConnectionPoolEntry) -> None:
    """Close a pool record's connection and open a new one (in SQLAlchemy's greenlet)."""
    record.invalidate()  # closes through asyncgone's closing guard
    _reconnect(record)


def _reconnect(record: ConnectionPoolEntry) -> None:
    """Open a new connection in an empty pool record (in SQLAlchemy's greenlet)."""
    # Opened before any checkout that takes it begins: that checkout checks it like any other.
    _compat.reconnect(record)


def _may_borrow(pool: QueuePool) -> bool:
    """Whether the keepalive may hold one idle connection without a user waiting for it.

    While users are active, one idle connection always stays theirs. While the engine is
    entirely idle, the keepalive may hold the last one for the length of one ping; a request
    arriving in that moment opens an overflow connection or waits for that ping.
    """
    idle = pool.checkedin()
    return idle > 1 or (idle == 1 and pool.checkedout() == 0)


def _report_end(task: asyncio.Task[None]) -> None:
    """A keepalive never ends by itself: say so loudly if it does."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the keepalive task stopped: %r", task.exception())


def keepalive(
    engine: AsyncEngine, *, interval: float | str | None = None, min_idle: int | None = None
) -> Keepalive:
    """Keep an engine's idle pooled connections alive in the background while the block runs.

    ::

        async with asyncgone.keepalive(engine):               # interval from the options
            ...
        async with asyncgone.keepalive(engine, interval=60, min_idle=2):
            ...

    Parameters:
        engine: an engine made by ``asyncgone.create_engine()``.
        interval: idle seconds after which a connection is pinged; defaults to the engine's
            ``keepalive_interval`` ("auto": half the shorter of the server's idle limit and
            ``network_idle_limit``).
        min_idle: idle connections to keep open while the engine is idle, at most
            ``pool_size`` (default: the engine's ``min_idle``, 0).

    The task stops when the block exits, also on error or cancellation; it never keeps the
    event loop alive, and a failed round is logged and counted, not fatal.
    """
    return Keepalive(engine, interval=interval, min_idle=min_idle)
