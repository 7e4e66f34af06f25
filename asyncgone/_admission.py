"""Admission of new connections: few attempts in flight, and a backoff when the server refuses.

A fleet of processes whose pools all reconnect at the same instant (a restart, a failover)
can ask a server for more connections than it takes: it answers 1040 (too many
connections), 1203 (``max_user_connections``), or does not listen yet (2002/2003, a refused
TCP connect). Every refusal handed to the caller is a user-visible error, and every attempt
repeated at once makes the storm worse. HikariCP opens connections one at a time from one
thread and backs off; asyncgone does the same per engine:

- at most ``max_connecting`` connection attempts are in flight at once (the others wait for
  a slot, in order, as long as a checkout may wait for a connection: ``pool_timeout``, or
  the retry window when longer; a wait for a turn is no retry, and a burst of connects
  slower than ``connect_retry`` must not fail for it);
- a refused attempt is tried again after a jittered exponential backoff, which every attempt
  of the engine observes (the engine backs off, not one caller), up to ``connect_backoff_max``
  seconds; refusals more than ``2 * connect_backoff_max`` apart start from the smallest
  pause again; until an attempt succeeds, one attempt at a time probes the server;
- a refusal for want of capacity (1040, 1203), this engine's or another client's
  (``_giveback``), also holds the engine's pool at the connections it has: QueuePool's
  overflow limit is lowered to them, so checkouts wait for a
  connection to come back (up to ``pool_timeout``) instead of asking the full server for
  more; after ``5 * connect_backoff_max`` seconds without such a refusal the limit rises by
  one, and so on up to ``max_overflow`` (additive increase, as TCP's congestion control);
  a refusal after a raise doubles that wait, up to a minute;
- ``Database.run()`` tries again by itself, through the pool: for it a refusal for want of
  capacity, while the engine holds other connections, is raised at once, and its next try
  waits for one of them to come back (the overflow being held) instead of asking again;
- otherwise a refused caller waits, instead of failing, until the earliest of:
  ``connect_retry`` seconds after it began (5 by default, or the pool's ``pool_timeout``;
  ``Database.start()``, which has nothing to fall back on, waits its whole
  ``connect_timeout`` instead when that is longer, ``retry_until``), a little before the
  deadline of its anyio cancel scope (``anyio.fail_after``, ``Database.start()``,
  ``health()``: half a second before, or a fifth of the time the scope has left when the
  connect begins when that is less, so that it gets the server's refusal, not a bare
  timeout), and the deadline ``Database.run()`` sets (``connect_deadline``). When the
  next try would come after it, one last try comes at the end of the retry window (not
  when a deadline comes less than ``_LAST_TRY_ROOM`` after it: that would cut the try
  short); then the caller gets the server's last refusal, as it would have without
  asyncgone.

Errors that retrying cannot cure (access denied, unknown database, TLS failures) are raised
at once, and so is a refused socket connect before the engine ever reached its server (a
wrong host or port, more likely than a restart) or on a multi-host engine (whose host
search tries the next host instead). Nothing here runs for a connection that is already
open: checkouts pay nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from . import _compat
from ._config import EngineOptions
from ._connect_deadlines import connect_deadline, retry_until, under_connect_deadline
from ._connect_deadlines import ends as connect_ends
from ._drivers import DriverSupport, connect_error
from ._errors import CAPACITY_CODES, SERVER_REFUSALS, error_code, is_refusal
from ._stats import Counters
from ._waits import Slots

__all__ = [
    "Admission",
    "admission_for",
    "connect_deadline",
    "retry_until",
]

log = logging.getLogger("asyncgone")

_T = TypeVar("_T")

# A held pool's overflow limit rises by one after this many backoff_max of no refusal, and
# after a minute at most.
_HOLD_STEPS = 5
_HOLD_MAX = 60.0

# The first backoff after a refusal, in seconds; it doubles with every refusal in a row,
# up to connect_backoff_max, and each delay is drawn between half of it and all of it.
_BACKOFF_BASE = 0.1

# Less time than this left in the retry window: no last try at its end, in seconds.
_LAST_TRY = 0.05

# SQLAlchemy's QueuePool waits this long for a connection when no pool_timeout is given.
_POOL_TIMEOUT = 30.0


class Admission:
    """The connect admission of one engine; see the module docstring.

    ``max_connecting`` None means no cap; ``retry_for`` is seconds (0: no retry);
    ``turn_wait`` is the seconds a caller may wait for a slot while the server takes
    connections (the pool's ``pool_timeout``);
    ``backoff_max`` caps one backoff delay, in seconds; ``error`` is the driver's
    ``OperationalError`` class, for a caller that never got a slot in time.
    """

    def __init__(
        self,
        *,
        max_connecting: int | None,
        retry_for: float,
        backoff_max: float,
        counters: Counters,
        error: type[Exception],
        retry_refused_sockets: bool = True,
        turn_wait: float = _POOL_TIMEOUT,
    ) -> None:
        self.max_connecting = max_connecting
        self.retry_for = retry_for
        self.turn_wait = turn_wait
        self.backoff_max = backoff_max
        self._counters = counters
        self._error = error
        self._slots = None if max_connecting is None else Slots(max_connecting)
        self._not_before = -math.inf  # time.monotonic(): no attempt starts earlier
        # Refusals in a row: each within 2 * backoff_max seconds of the one before.
        self._streak = 0
        self._last_refusal = -math.inf
        # Since the last refusal no attempt succeeded: attempts go one at a time (_probe).
        self._refusing = False
        self._probe = Slots(1)
        self.in_flight = 0  # attempts running now
        # Connects under way (waiting, attempting or backing off): the pool counts each as
        # a connection already.
        self.opening = 0
        self.capacity_refused = 0  # refusals for want of capacity (1040, 1203) so far
        # A refused socket connect is retried only once the engine has reached its server
        # (a restart, not a wrong port), and only when no host search tries other hosts.
        self._reached = False
        self._retry_refused_sockets = retry_refused_sockets
        self._engine: Callable[[], Engine | None] = lambda: None
        # While the pool is held (see the module docstring): its max_overflow as configured,
        # the lowered limit, the last refusal for want of capacity, the timer that raises it.
        self._configured_overflow = 0
        self._overflow_limit: int | None = None
        self._last_full = -math.inf
        self._timer: asyncio.TimerHandle | None = None
        # The loop the timer runs on, weakly: a closed loop must not stay in memory.
        self._timer_loop: Callable[[], asyncio.AbstractEventLoop | None] = lambda: None
        # Seconds without a refusal before the limit rises by one: doubled when a refusal
        # follows a raise (the server is still full), back to the first once restored.
        self._hold_for = _HOLD_STEPS * backoff_max
        self._probing = False

    @property
    def holding(self) -> bool:
        """Whether the pool's overflow is held below its configured limit (the server
        refused connections for want of capacity)."""
        return self._overflow_limit is not None

    def watch(self, engine: Engine) -> None:
        """Hold this (sync) engine's pool when the server is full (weakly referenced)."""
        self._engine = weakref.ref(engine)

    def __repr__(self) -> str:
        cap = "no cap" if self._slots is None else f"max_connecting={self.max_connecting}"
        waiting = 0 if self._slots is None else self._slots.waiting
        return f"<Admission {cap}, {waiting} waiting, backoff streak {self._streak}>"

    def backoff(self) -> float:
        """The delay after one more refusal: exponential in the streak, jittered."""
        ceiling = min(self.backoff_max, _BACKOFF_BASE * 2 ** min(self._streak, 30))
        return random.uniform(ceiling / 2, ceiling)

    async def connect(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``attempt()`` (one driver connect) when admitted; retry refusals (see the
        module docstring) and return the connection, or raise the last error."""
        self.opening += 1
        try:
            return await self._connect(attempt)
        finally:
            self.opening -= 1

    async def _connect(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        counters = self._counters
        ends = connect_ends(time.monotonic(), self.retry_for, self.turn_wait)
        refusal: Exception | None = None  # the server's last refusal of this caller
        while True:
            # A turn is waited for as a checkout waits for a connection; once refused, the
            # caller waits no later than the end of retries (its refusal must reach it
            # before its cancel scope expires), and behind the engine's refusals no later
            # than the end of the retry window.
            if not await self._acquire(self._slots, ends.turn if refusal is None else ends.retries):
                raise refusal or self._no_slot(self._slots)
            until = ends.window if refusal is None else ends.retries
            probe: Slots | None = None  # the probe's slot, once this caller holds it
            try:
                # While the server refuses, one attempt at a time probes it (as HikariCP's
                # one thread does); the first success lets the others go, max_connecting wide.
                if self._refusing and await self._take_probe(until, refusal):
                    probe = self._probe
                # The engine may have backed off while this caller waited for its slot.
                pause = min(self._not_before, until) - time.monotonic()
                if pause > 0:
                    await anyio.sleep(pause)
                counters.connect_attempts += 1
                self.in_flight += 1
                try:
                    connection = await attempt()
                except Exception as exc:
                    if not is_refusal(exc):
                        raise
                    if error_code(exc) not in SERVER_REFUSALS and not (
                        self._reached and self._retry_refused_sockets
                    ):
                        # Nothing listens: before this engine ever reached its server, more
                        # likely a wrong host or port than a restart; with several hosts,
                        # the host search tries the next one instead.
                        raise
                    counters.connects_refused += 1
                    refusal = exc
                    delay = self._refused()
                    if error_code(exc) in CAPACITY_CODES:
                        self.capacity_refused += 1
                        self.hold_overflow()
                        if under_connect_deadline() and self._others_held():
                            raise  # Database.run() tries again, through the held pool
                    elif self._overflow_limit is not None:
                        self._last_full = time.monotonic()  # still refusing: keep holding
                    now = time.monotonic()
                    # The backoff is cut short to make a last try at the window's end; an
                    # attempt at a deadline's moment would be cut short itself.
                    if now + delay >= ends.retries and (
                        not ends.last_try or now >= ends.retries - _LAST_TRY
                    ):
                        raise
                    continue  # the slot is released first, then the backoff is awaited
                finally:
                    self.in_flight -= 1
                self._reached = True
                self._refusing = False
                return connection
            finally:
                if probe is not None:
                    probe.release()
                if self._slots is not None:
                    self._slots.release()

    def _refused(self) -> float:
        """Note a refusal; push the engine's next attempt back; return the delay."""
        now = time.monotonic()
        if now - self._last_refusal > 2 * self.backoff_max:
            self._streak = 0  # the last refusals are long past: start small again
        self._last_refusal = now
        self._refusing = True
        delay = self.backoff()
        self._streak += 1
        self._not_before = max(self._not_before, time.monotonic() + delay)
        return delay

    def _pool(self) -> QueuePool | None:
        engine = self._engine()
        pool = None if engine is None else engine.pool
        return pool if isinstance(pool, QueuePool) else None

    def _others_held(self) -> bool:
        """Whether the pool has connections besides the one being opened (idle, in use,
        or being opened by other callers)."""
        pool = self._pool()
        return pool is not None and pool.checkedin() + pool.checkedout() > 1

    def hold_overflow(self, opening: int = 1) -> None:
        """Keep the pool at the connections it has, less ``opening`` being opened (the one
        refused), for a while: the server is full (a refusal, or ``_giveback``)."""
        self._last_full = time.monotonic()
        pool = self._pool()
        configured = None if pool is None else _compat.max_overflow(pool)
        if pool is None or configured is None:
            return
        if self._overflow_limit is None:
            self._configured_overflow = configured
        limit = min(configured, max(0, pool.overflow() - opening))
        if self._overflow_limit is not None:
            if self._probing:  # the limit was raised, and the server is still full
                self._hold_for = min(self._hold_for * 2, _HOLD_MAX)
                self._probing = False
            if limit >= self._overflow_limit:
                return
        if not _compat.set_max_overflow(pool, limit):
            return
        if self._overflow_limit is None:
            log.info(
                "the server refused a connection for want of capacity: this engine opens no "
                "connection beyond the %d overflow it has until the server takes more",
                limit,
            )
        self._overflow_limit = limit
        if self._timer is None or self._timer_loop() is not asyncio.get_running_loop():
            self._schedule()  # none yet, or one on a loop that is gone

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._hold_for, self._raise_overflow)
        self._timer_loop = weakref.ref(loop)

    def _raise_overflow(self) -> None:
        """One more overflow connection once the server went a while without refusing."""
        self._timer = None
        limit = self._overflow_limit
        pool = self._pool()
        if limit is None or pool is None:
            self._overflow_limit = None
            return
        if time.monotonic() - self._last_full >= self._hold_for:
            limit += 1
            self._probing = True
        if limit >= self._configured_overflow:
            _compat.set_max_overflow(pool, self._configured_overflow)
            self._overflow_limit = None
            self._hold_for = _HOLD_STEPS * self.backoff_max
            log.info("the server takes connections again: max_overflow is back to its value")
            return
        _compat.set_max_overflow(pool, limit)
        self._overflow_limit = limit
        self._schedule()

    async def _acquire(self, slots: Slots | None, until: float) -> bool:
        """Take one of ``slots`` (None: no limit), waiting until ``until`` at most; return
        whether it was taken."""
        if slots is None:
            return True
        with anyio.move_on_after(max(0.0, until - time.monotonic())):
            await slots.acquire()
            return True
        return False

    async def _take_probe(self, until: float, refusal: Exception | None) -> bool:
        """Wait for the probe's turn while the server refuses; False when a probe succeeded
        meanwhile (the turn is passed on at once). Raises as ``_connect`` would at ``until``."""
        if not await self._acquire(self._probe, until):
            raise refusal or self._no_slot(self._probe)
        if self._refusing:
            return True
        self._probe.release()
        return False

    def _no_slot(self, slots: Slots | None) -> Exception:
        """The driver's 2003 error for a caller that never got its turn before its
        deadline (and was never refused itself)."""
        busy = (
            "the server refused the last attempt and one attempt at a time probes it"
            if slots is self._probe
            else f"max_connecting={self.max_connecting} attempts were in flight"
        )
        return self._error(
            2003,
            "Can't connect to MySQL server: no connection attempt could start before the "
            f"deadline; {busy}",
        )


def admission_for(
    options: EngineOptions,
    pool_timeout: float | None,
    counters: Counters,
    driver: DriverSupport,
    *,
    host_search: bool = False,
) -> Admission | None:
    """The admission for an engine with these options (also without a cap or retries: it
    counts the attempts), or None for a driver asyncgone does not open itself. With a
    ``host_search`` a refused socket connect is not retried: the search tries the next
    host."""
    retry = options.connect_retry
    turn_wait = _POOL_TIMEOUT if pool_timeout is None else float(pool_timeout)
    retry_for = turn_wait if retry == "pool_timeout" else 0.0 if retry is None else float(retry)
    if not driver.known:
        return None
    return Admission(
        max_connecting=options.max_connecting,
        retry_for=retry_for,
        turn_wait=turn_wait,
        backoff_max=options.connect_backoff_max,
        counters=counters,
        error=connect_error(driver.name),
        retry_refused_sockets=not host_search,
    )
