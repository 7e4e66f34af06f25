"""The checkout check: hand out a pooled connection only if it can still be used.

Every checkout runs the verdict below on the reused connection it is about to hand out,
inside the pool's own step that takes a record (``_compat.checking_pool_class``): before
SQLAlchemy's pre-ping and ``checkout`` event, and without the cost of a ``checkout``
listener (about 10 000 instructions per checkout, most of a steady-state check's cost). An
unusable connection is invalidated there, and SQLAlchemy opens a new one in its record for
the same checkout. The keepalive runs the same verdict on idle connections with its own
thresholds.

The verdict costs no round trip in steady state: the event loop reads an idle socket in the
background, so a connection the server closed shows EOF (or an unsolicited error packet)
before anyone asks, and the kernel is asked once more (``poll(2)``) for what a busy loop has
not read yet (not for a connection the server answered less than ``FRESH`` seconds ago).
Only a connection idle for ``ping_after`` seconds gets a COM_PING, bounded by
``ping_timeout``; a driver whose connections asyncgone cannot inspect gets that ping at
every checkout instead.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection

from ._compat import CHECK_ATTRIBUTE, GIVE_BACK_ATTRIBUTE, checking_pool_class
from ._drivers import thread_id
from ._errors import describe, error_code, is_disconnect
from ._giveback import STATUS_SQL, GiveBack
from ._state import HOLDER_KEY, ConnectionHolder, EngineState
from ._statements import ping
from ._stats import Reason
from ._waits import bounded

__all__ = ["DEAD", "FRESH", "PING_DUE", "CheckoutCheck", "verdict"]

log = logging.getLogger("asyncgone")

# Errors of an account the server does not show its status to: access denied (1044, 1142,
# 1227). The give-back's question is then turned off.
_NOT_ALLOWED = frozenset({1044, 1142, 1227})

#: Seconds since the server last answered a connection within which a checkout does not
#: ask the kernel (``poll(2)``) whether the server closed it since; what the loop read and
#: what the driver knows still count, so what is skipped is only a close whose bytes the
#: loop has not dispatched yet: they came while it was blocked, not running, or busy with
#: callbacks queued before its last look at the sockets. Such a close is met by the first
#: statement, as one just after the check would be. A connection checked out right after
#: its return, as under load, costs no system call. Not HikariCP's 500 ms
#: (``aliveBypassWindowMs``): a blocking call shorter than that (a synchronous restart of a
#: test server, a ``KILL``) would hand out the connection it killed.
FRESH = 0.001

# Reasons that mean the connection was dead, as opposed to retired while healthy.
DEAD = frozenset({Reason.CLOSED_BY_SERVER, Reason.PING_FAILED, Reason.PING_TIMEOUT})


class _Due(enum.Enum):
    PING = "ping"


#: ``verdict()`` says: nothing is known to be wrong, but a ping must tell.
PING_DUE = _Due.PING


def verdict(
    state: EngineState,
    holder: ConnectionHolder,
    conn: Any,
    now: float,
    *,
    ping_after: float | None,
    horizon: float = 0.0,
) -> Reason | _Due | None:
    """Return why a pooled connection must not be handed out, ``PING_DUE``, or None.

    Cheapest and most certain first; nothing here does I/O. ``ping_after`` is the idle time
    after which a ping is due (None: never); ``horizon`` retires a connection whose lifetime
    ends within that many seconds (the keepalive's next round).
    """
    if holder.loop() is not asyncio.get_running_loop():
        return Reason.FOREIGN_LOOP
    if holder.created < state.invalid_before:
        return Reason.POOL_INVALIDATED
    if holder.closed(conn, True):
        return Reason.CLOSED_BY_SERVER
    if now + horizon >= holder.expires:
        return Reason.MAX_LIFETIME
    idle = now - holder.last_activity
    if idle > holder.idle_limit:
        return Reason.IDLE_LIMIT
    if not state.driver.passive_check or (ping_after is not None and idle >= ping_after):
        return PING_DUE
    return None


async def bounded_ping(state: EngineState, holder: ConnectionHolder, conn: Any) -> Reason | None:
    """Ping ``conn`` within ``ping_timeout``; return why it failed, or None."""
    state.counters.pings += 1
    log.debug("pinging connection %s", thread_id(conn))
    try:
        await bounded(ping(conn), state.options.ping_timeout)
    except TimeoutError:
        state.counters.ping_failures += 1
        return Reason.PING_TIMEOUT
    except Exception as exc:
        state.counters.ping_failures += 1
        log.debug("ping failed: %s", describe(exc))
        return Reason.PING_FAILED
    holder.active(time.monotonic())
    return None


def announce(state: EngineState, conn: Any, reason: Reason, now: float, who: str = "") -> None:
    """Log (and for a dead connection, weigh) the replacement of ``conn`` for ``reason``."""
    thread = thread_id(conn)
    if reason in DEAD:
        if not state.note_dead(now):  # a pool invalidation's own line speaks for the burst
            log.warning("%sreplacing connection %s: %s", who, thread, reason.value)
        return
    # Routine: INFO, not a warning. Replacements in the wake of a pool invalidation were
    # announced by that invalidation's own line.
    level = logging.DEBUG if reason is Reason.POOL_INVALIDATED else logging.INFO
    log.log(level, "%sretiring connection %s: %s", who, thread, reason.value)


class CheckoutCheck:
    """The checkout check of one engine's pool.

    Made before the engine (``pool_class`` is what the engine is created with), given its
    ``EngineState`` once the engine exists (``install``).
    """

    _state: EngineState  # from ``install``, before anything calls the check

    def __init__(self) -> None:
        self._class: type[Pool] | None = None

    def pool_class(self, base: type[Pool]) -> type[Pool] | None:
        """The subclass of ``base`` that runs the check inside its own checkout step (one
        per pool class, for every engine), or None when ``base`` lacks the private steps
        that needs (see ``_compat``)."""
        self._class = checking_pool_class(base)
        return self._class

    def install(self, engine: Engine, state: EngineState) -> None:
        """Check the checkouts of ``engine`` with ``state``; through the pool's ``checkout``
        event if its pool is not of a class from ``pool_class``."""
        self._state = state
        if self._class is not None and isinstance(engine.pool, self._class):
            # The pool finds its check through its dialect, also after dispose().
            setattr(engine.dialect, CHECK_ATTRIBUTE, self.check_record)
            setattr(engine.dialect, GIVE_BACK_ATTRIBUTE, None)  # returns find it unset
        else:
            event.listen(engine, "checkout", self.on_checkout)

    def check_record(self, pool: Pool, record: ConnectionPoolEntry, began: float) -> None:
        """Hand out the connection of ``record`` if usable; else invalidate the record, so
        that SQLAlchemy opens a new connection in it for this checkout.

        ``began`` is when the checkout began: a connection opened since needs no check.
        While ``pool`` holds overflow, a usable connection may also carry the give-back's
        question to the server (``_giveback``).
        """
        state = self._state  # set before the dialect holds this method (``install``)
        counters = state.counters
        counters.checkouts += 1
        holder: ConnectionHolder | None = record.info.get(HOLDER_KEY)
        if holder is None or holder.created >= began or record.dbapi_connection is None:
            # Opened for this very checkout; not set up by asyncgone (its connect failed
            # half-way); or closed already, and SQLAlchemy opens a new one next.
            return
        # Each counter only ever grows: exporters read them from other threads.
        counters.checks += 1
        # The pool holds the driver's connection while it is in the pool: alive.
        conn = holder.conn() or record.dbapi_connection.driver_connection
        now = time.monotonic()
        # The common case in one test: recently active, lifetime not over, the pool not
        # invalidated since it opened, on this loop, and the socket shows nothing; a
        # connection the server answered less than FRESH seconds ago is not asked.
        if not (
            now < holder.trusted_until
            and holder.created >= state.invalid_before
            and holder.loop() is asyncio.get_running_loop()
            and not holder.closed(conn, now - holder.last_activity >= FRESH)
        ):
            reason = self._reason(state, record, holder, conn, now)
            if reason is not None:
                # The pool closes the connection: through asyncgone's dialect guard, which
                # drops a dead or foreign-loop socket without waiting on it.
                record.invalidate(DisconnectionError(f"asyncgone replaced it: {reason.value}"))
                return
        give_back = state.give_back
        if give_back is not None and now >= give_back.due and give_back.wanted(pool):
            _ask(state, give_back, record, holder, conn)

    def on_checkout(
        self, dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        """The ``checkout`` event's form of ``check_record``. It cannot tell a connection
        opened for this checkout: such a connection is checked too (with ``ping_after=0``,
        pinged)."""
        state = self._state
        holder: ConnectionHolder | None = record.info.get(HOLDER_KEY)
        if holder is None:
            return
        state.counters.checkouts += 1
        state.counters.checks += 1
        conn = dbapi_connection.driver_connection
        reason = self._reason(state, record, holder, conn, time.monotonic())
        if reason is not None:
            raise DisconnectionError(f"asyncgone replaced the connection: {reason.value}")

    @staticmethod
    def _reason(
        state: EngineState,
        record: ConnectionPoolEntry,
        holder: ConnectionHolder,
        conn: Any,
        now: float,
    ) -> Reason | None:
        """The verdict on a reused connection, pinging it when due; a replaced connection
        is counted, announced, and if dead, its socket closed at once."""
        reason = verdict(state, holder, conn, now, ping_after=state.options.ping_after)
        if reason is PING_DUE:
            dbapi_connection: Any = record.dbapi_connection
            reason = dbapi_connection.run_async(lambda c: bounded_ping(state, holder, c))
        if reason is None:
            return None
        assert isinstance(reason, Reason)
        _retire(state, conn, reason, now)
        return reason


def _retire(state: EngineState, conn: Any, reason: Reason, now: float) -> None:
    """Count and announce the replacement of ``conn``; if dead, close its socket at once."""
    state.counters.replaced[reason] += 1
    if reason in DEAD:
        # Close the socket now: closing it politely could wait on a silent network path.
        state.driver.abort(conn)
    announce(state, conn, reason, now)


def _ask(
    state: EngineState,
    give_back: GiveBack,
    record: ConnectionPoolEntry,
    holder: ConnectionHolder,
    conn: Any,
) -> None:
    """Ask the server, on this connection, what it refused (``GiveBack.ask``). A connection
    that fails the question is replaced, as after a failed ping; an account the server does
    not answer turns the question off; any other error waits for the next interval."""
    cursors = holder.cursors
    before = None if cursors is None else cursors.count
    dbapi_connection: Any = record.dbapi_connection
    try:
        dbapi_connection.run_async(give_back.ask)
    except Exception as exc:
        code = error_code(exc)
        if code in _NOT_ALLOWED:
            state.give_back = None
            log.warning(
                "overflow_give_back is off for this engine: the server answered %s to %s",
                describe(exc),
                STATUS_SQL,
            )
        elif isinstance(exc, TimeoutError) or is_disconnect(exc) or code is None:
            timed_out = isinstance(exc, TimeoutError)
            reason = Reason.PING_TIMEOUT if timed_out else Reason.PING_FAILED
            _retire(state, conn, reason, time.monotonic())
            record.invalidate(DisconnectionError(f"asyncgone replaced it: {reason.value}"))
        else:
            log.debug("the give-back's question failed: %s", describe(exc))
        return
    holder.active(time.monotonic())
    if cursors is not None and holder.ended_at == before:
        holder.ended_at = cursors.count  # SHOW STATUS opens no transaction
