"""The keepalive: a background task that keeps an idle pool's connections alive and warm.

Every ``interval / 2`` seconds it borrows the pool's idle connections one at a time through
the pool itself, so no connection is ever used twice at once, and the engine's checkout
listener does the work with the keepalive's thresholds: a connection idle for ``interval``
gets a bounded ping (which also resets the server's and any load balancer's idle timer), a
dead one is replaced, one whose lifetime ends before the next round is replaced early. A
request that arrives after hours of idleness finds live connections and pays no reconnect.

User demand wins. The keepalive holds one connection at a time, only while another idle
one stays available for users (the last idle one only while nothing at all is checked
out), and never waits for the pool: with the pool exhausted it does nothing. ``min_idle``
connections are opened straight into the pool while the engine is idle, one at a time and
within the pool's size, without holding any other connection meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import greenlet_spawn

from ._checkout import KEEPALIVE, ConnectionPolicy, policy_for
from ._errors import ConfigurationError, describe
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


def _policy(engine: AsyncEngine) -> ConnectionPolicy:
    policy = policy_for(engine.sync_engine) if isinstance(engine, AsyncEngine) else None
    if policy is None:
        raise ConfigurationError(
            "asyncgone.keepalive() needs an engine made by asyncgone.create_engine(): it works "
            "through the checks that create_engine() installs"
        )
    return policy


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
        self._policy = _policy(engine)
        self._counters = self._policy.counters
        options = self._policy.options
        self._interval = options.keepalive_interval if interval is None else interval
        self._min_idle = options.min_idle if min_idle is None else min_idle
        _check(self._interval, self._min_idle)
        self._task: asyncio.Task[None] | None = None

    @property
    def interval(self) -> float:
        """Idle seconds after which a pooled connection is pinged.

        ``"auto"``: half of the shorter of the smallest idle limit of the pool's connections
        (derived from their ``wait_timeout``) and ``network_idle_limit``.
        """
        if self._interval != "auto":
            return float(self._interval)
        limit = min(self._policy.smallest_idle_limit, self._policy.options.network_idle_limit)
        return limit / 2

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
        while True:
            await asyncio.sleep(min(self.interval / 2, 3600.0))
            try:
                await self.run_once()
            except Exception as exc:  # a round failed; the next one may not
                self._counters.keepalive_errors += 1
                log.warning("keepalive round failed: %s", describe(exc))

    async def run_once(self) -> int:
        """Do one round now; return how many connections were visited."""
        pool = self.engine.sync_engine.pool
        if not isinstance(pool, QueuePool):
            return 0  # NullPool keeps nothing; other pools are left alone
        self._counters.keepalive_runs += 1
        token = KEEPALIVE.set(self.interval)
        try:
            await self._warm_up(pool)
            return await self._visit(pool)
        finally:
            KEEPALIVE.reset(token)

    async def _visit(self, pool: QueuePool) -> int:
        """Borrow idle connections one at a time: the checkout listener checks each."""
        policy = self._policy
        # A ping, or a replacement: closing the old connection, opening and configuring a
        # new one.
        bound = 2 * policy.options.ping_timeout + policy.connect_timeout + _SLACK
        seen: set[int] = set()
        for _ in range(pool.checkedin()):
            record = await finish(self._borrow(pool), bound, "a keepalive visit")
            if record is None:
                break  # users need what is left
            if record in seen:
                break  # a LIFO pool hands the same connection back: the rest stay untouched
            seen.add(record)
            self._counters.keepalive_visits += 1
        return len(seen)

    async def _borrow(self, pool: QueuePool) -> int | None:
        """Check out one idle connection and return it (which checks it), if users can spare
        one; return its record's identity."""
        # No await between this test and the checkout: no user can take the idle
        # connection in between, so the pool hands one over at once and the keepalive never
        # queues for it. (SQLAlchemy before 2.0.55 on Python before 3.12 lets the loop run
        # once inside a checkout from a pool at its size limit; users whose checkouts
        # started in that same iteration may still come first.)
        if not _may_borrow(pool):
            return None
        async with self.engine.connect() as conn:
            return id((await conn.get_raw_connection()).info)

    async def _warm_up(self, pool: QueuePool) -> None:
        """While the engine is idle, open connections up to ``min_idle`` (at most the pool's
        size), one at a time, straight into the pool.

        A checkout would return an idle connection rather than open one, so the pool is
        filled directly: no idle connection is held meanwhile, and nothing waits for the
        pool. A user arriving during a connect takes an idle connection as usual (or, with
        none left, gets this one when it is ready, or opens their own), and stops the
        warm-up: it resumes once the engine is idle again.
        """
        target = min(self._min_idle, pool.size())
        # Connecting, then the server-facts query.
        bound = self._policy.connect_timeout + self._policy.options.ping_timeout + _SLACK
        while pool.checkedin() < target and pool.checkedout() == 0:
            opening = greenlet_spawn(_open_idle, pool, self._policy)
            if not await finish(opening, bound, "opening a connection for min_idle"):
                break


def _open_idle(pool: QueuePool, policy: ConnectionPolicy) -> bool:
    """Open one connection and put it in the pool's idle queue; False if the pool is full.

    Runs in SQLAlchemy's greenlet. QueuePool has no public call for this, so it does what a
    checkout that opens a connection does, then what returning it does: take a slot (its
    ``_inc_overflow()`` refuses beyond pool_size + max_overflow), open the connection
    (which fires the connect events), and hand it to the idle queue, which gives it at once
    to a user waiting for a connection, or closes it and frees the slot if the queue is full.
    """
    if not pool._inc_overflow():
        return False
    try:
        record = pool._create_connection()
    except BaseException:
        pool._dec_overflow()
        raise
    policy.on_checkin(record.dbapi_connection, record)  # the pool's checkin event does not fire
    pool._do_return_conn(record)
    return True


def _may_borrow(pool: QueuePool) -> bool:
    """Whether the keepalive may hold one idle connection without a user waiting for it.

    While users are active, one idle connection always stays theirs. While the engine is
    entirely idle, the keepalive may hold the last one for the length of one ping; a request
    arriving in that moment opens an overflow connection or waits for that ping.
    """
    idle = pool.checkedin()
    return idle > 1 or (idle == 1 and pool.checkedout() == 0)


def _check(interval: object, min_idle: object) -> None:
    if interval != "auto" and (
        isinstance(interval, bool)
        or not isinstance(interval, (int, float))
        or not 0 < interval < math.inf
    ):
        raise ConfigurationError(
            f"keepalive interval must be 'auto' or a positive number of seconds, got {interval!r}"
        )
    if isinstance(min_idle, bool) or not isinstance(min_idle, int) or min_idle < 0:
        raise ConfigurationError(f"min_idle must be a whole number of 0 or more, got {min_idle!r}")


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
