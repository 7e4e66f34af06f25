"""The connection policy: a zero-round-trip checkout check, bounded pings, idle and age limits.

It hangs on documented SQLAlchemy hooks:

- pool ``connect``: configure the socket, ask the server for this connection's
  ``wait_timeout`` (for its idle limit and the keepalive's interval), and give the
  connection its own (jittered) expiry;
- pool ``checkout``: a cheap predicate decides whether the connection is still usable;
  raising ``DisconnectionError`` makes the pool replace that connection alone;
- pool ``checkin``: start the idle clock;
- pool ``close``: drop a dead connection's socket so closing it neither waits nor logs;
- engine ``do_connect``: bound the whole connect handshake by ``connect_timeout``;
- engine ``handle_error``: classify errors during use, and keep SQLAlchemy from invalidating
  the whole pool when only one connection died.

Pool-wide invalidation (after a server-wide error code, or several connections dying
together) is asyncgone's own: connections opened before the first sign of the failure are
replaced at their next checkout, the healthy replacements opened since are kept.

The checkout predicate costs no round trip in steady state: the event loop reads the idle
socket in the background, so a connection the server closed shows EOF (or an unsolicited
error packet) before anyone asks. Only a connection idle for ``ping_after`` seconds gets a
COM_PING, which is bounded by ``ping_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import math
import random
import sys
import time
import traceback
import warnings
import weakref
from typing import Any

import greenlet
from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, PoolProxiedConnection

from . import _drivers
from ._config import EngineOptions
from ._errors import (
    ConfigurationWarning,
    Scope,
    describe,
    disconnect_scope,
    error_code,
    is_aftermath,
)
from ._server import auto_idle_limit, read_facts, recycle_warning
from ._sockets import apply_tcp_keepalive
from ._stats import Counters, Reason
from ._waits import absorb_cancellation, bounded, finish

try:  # SQLAlchemy 2.1 renamed await_only() to await_()
    from sqlalchemy.util import await_ as _await
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util import await_only as _await

__all__ = ["KEEPALIVE", "ConnectionPolicy", "policy_for"]

log = logging.getLogger("asyncgone")

_STATE_KEY = "asyncgone"

#: Set (to the keepalive interval) while the keepalive borrows connections: checkout then
#: pings a connection idle that long, replaces one that would expire before the next
#: keepalive round, and counts its replacements as the keepalive's.
KEEPALIVE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "asyncgone_keepalive", default=None
)

_POLICIES: weakref.WeakKeyDictionary[Engine, ConnectionPolicy] = weakref.WeakKeyDictionary()


def policy_for(engine: Engine) -> ConnectionPolicy | None:
    """Return the policy ``create_engine()`` installed on a (sync) engine."""
    return _POLICIES.get(engine)


# Up to this fraction of max_lifetime is taken off each connection's lifetime at random.
_LIFETIME_JITTER = 0.25

# This many connections found dead within this many seconds means the server or the network
# path failed, not one connection: invalidate the pool instead of discovering the rest one
# checkout (or one ping timeout) at a time.
_DEAD_TOGETHER = 3
_DEAD_WINDOW = 2.0

# Bound on the ROLLBACK that returning a connection may need: generous, as undoing a large
# transaction takes time; past it the connection is discarded (the server finishes alone).
_RESET_TIMEOUT = 10.0

# Marker for "the user did not pass pool_reset_on_return".
_OURS = object()

# Reasons that mean the connection was dead, as opposed to retired while healthy.
_DEAD = frozenset({Reason.CLOSED_BY_SERVER, Reason.PING_FAILED, Reason.PING_TIMEOUT})


class _ConnState:
    """asyncgone's facts about one pooled connection, kept in its record's ``info``."""

    __slots__ = ("created", "expires", "fresh", "idle_limit", "last_activity", "leak_timer")

    def __init__(self, created: float, expires: float, idle_limit: float) -> None:
        self.leak_timer: asyncio.TimerHandle | None = None
        self.created = created
        self.expires = expires
        self.idle_limit = idle_limit
        # When the server last heard from this connection, never later than the truth: the
        # server's wait_timeout counts from there. Idle time is measured from it.
        self.last_activity = created
        self.fresh = True  # opened for the checkout in progress: nothing to check yet


def acquiring_stack(limit: int = 40) -> list[str]:
    """The application's stack at this checkout, formatted.

    Pool events run in SQLAlchemy's greenlet; the application's frames are those of the
    parent greenlet, suspended where it handed the work over.
    """
    parent = greenlet.getcurrent().parent
    frame = parent.gr_frame if parent is not None else sys._getframe(1)
    return traceback.format_list(traceback.extract_stack(frame, limit=limit))


def lifetime_deadline(now: float, max_lifetime: float | None) -> float:
    """Return when a connection opened at ``now`` retires: its lifetime minus random jitter."""
    if max_lifetime is None:
        return math.inf
    return now + max_lifetime * (1.0 - _LIFETIME_JITTER * random.random())


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


class ConnectionPolicy:
    """One engine's checkout policy and error classification, installed as pool listeners."""

    def __init__(
        self,
        options: EngineOptions,
        counters: Counters,
        *,
        pool_recycle: float | None,
        connect_timeout: float,
        reset_on_return: object = _OURS,
    ) -> None:
        self.options = options
        self.counters = counters
        self.connect_timeout = connect_timeout
        # Unless the user chose a pool_reset_on_return, the pool sends no reset of its own
        # and on_reset decides whether the ROLLBACK is needed.
        self._owns_reset = reset_on_return is _OURS
        self._pool_resets = not self._owns_reset and reset_on_return not in (None, False, "none")
        self._pool_recycle = pool_recycle
        self._read_facts = True
        self._warned = False
        self._dead = _DeadTracker()
        # Connections opened before this moment belong to an invalidated pool. SQLAlchemy's
        # own pool invalidation uses "now", which also discards the healthy replacements
        # opened while the failure was being discovered; asyncgone cuts at the first sign.
        self._invalid_before = -math.inf
        # The shortest idle time, over every connection opened so far, that the keepalive's
        # automatic interval must stay under: its idle limit, and its server's wait_timeout
        # (less a margin) even when the idle limit is off.
        self.smallest_idle_limit = math.inf

    def install(self, engine: Engine) -> None:
        """Attach the listeners to a (sync) engine and its pool."""
        # A NullPool never reuses a connection, so idle limits and checks have nothing to do.
        self._read_facts = not isinstance(engine.pool, NullPool)
        self._connector = _drivers.bounded_connector(engine.dialect.driver, self.connect_timeout)
        event.listen(engine, "do_connect", self.on_do_connect)
        event.listen(engine, "connect", self.on_connect)
        event.listen(engine, "checkout", self.on_checkout)
        event.listen(engine, "reset", self.on_reset)
        event.listen(engine, "checkin", self.on_checkin)
        event.listen(engine, "close", self.on_close)
        event.listen(engine, "close_detached", self.on_close)
        event.listen(engine, "handle_error", self.on_error)
        _POLICIES[engine] = self

    # -- pool events -------------------------------------------------------------------------

    def on_do_connect(
        self, dialect: Any, record: ConnectionPoolEntry, cargs: Any, cparams: dict[str, Any]
    ) -> None:
        """Route the driver's connect through a connector bounded by ``connect_timeout``."""
        # SQLAlchemy's async adapters take the coroutine function that opens the driver
        # connection as this keyword (it is how create_async_engine(async_creator=) works).
        cparams.setdefault("async_creator_fn", self._connector)

    def on_connect(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        """Configure a new connection and give it its limits."""
        self.counters.connects += 1
        conn = dbapi_connection.driver_connection
        options = self.options
        if options.tcp_keepalive is not None:
            apply_tcp_keepalive(_drivers.transport_socket(conn), options.tcp_keepalive)
        recycle = options.recycle
        idle_limit = math.inf if recycle is None or recycle == "auto" else float(recycle)
        server_limit = math.inf
        # One query serves the idle limit, the recycle warning and the automatic keepalive
        # interval; with none of them wanted, the connect costs no extra round trip.
        if self._read_facts and (
            recycle is not None
            or self._pool_recycle is not None
            or options.keepalive_interval == "auto"
        ):
            facts = _await(read_facts(conn, options.ping_timeout))
            server_limit = auto_idle_limit(facts.wait_timeout)
            if recycle == "auto":
                idle_limit = server_limit
            self._warn_about_recycle(facts.wait_timeout)
        self.smallest_idle_limit = min(self.smallest_idle_limit, idle_limit, server_limit)
        now = time.monotonic()
        record.info[_STATE_KEY] = _ConnState(
            now, lifetime_deadline(now, options.max_lifetime), idle_limit
        )

    def on_checkout(
        self, dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        """Let a usable connection through; make the pool replace an unusable one."""
        keepalive = KEEPALIVE.get()
        state: _ConnState | None = record.info.get(_STATE_KEY)
        if keepalive is None:
            self.counters.checkouts += 1
            if state is not None and self.options.leak_threshold is not None:
                self._watch_for_leak(state, dbapi_connection.driver_connection)
        if state is None or state.fresh:
            return  # opened for this very checkout
        if keepalive is None:
            self.counters.checks += 1
        now = time.monotonic()
        conn = dbapi_connection.driver_connection
        reason = self._verdict(conn, state, now, now - state.last_activity, keepalive)
        if reason is not None:
            self._replace(conn, reason, now, keepalive is not None)

    def on_reset(self, dbapi_connection: Any, record: ConnectionPoolEntry, reset: Any) -> None:
        """Return a connection to the pool: ROLLBACK only if a transaction may be open.

        SQLAlchemy's pool sends ROLLBACK on every return, including after a COMMIT with
        nothing executed since, which costs a round trip per unit of work. The driver's last
        reply tells whether a transaction is open (see ``_drivers.transaction_ended``); only
        then is the ROLLBACK sent. ``reset`` is SQLAlchemy's ``PoolResetState``.
        """
        state: _ConnState | None = record.info.get(_STATE_KEY)
        if state is None or reset.terminate_only or not reset.asyncio_safe:
            return
        now = time.monotonic()
        conn = dbapi_connection.driver_connection
        if reset.transaction_was_reset or self._pool_resets:
            state.last_activity = now  # SQLAlchemy rolled back just now, or will
            return
        if not self._owns_reset or _drivers.transaction_ended(conn):
            if self._owns_reset:
                self.counters.resets_skipped += 1
            usage = _drivers.last_usage(conn)
            if usage is not None and usage > state.last_activity:
                state.last_activity = usage
            return
        if _drivers.is_closed(conn):  # no ROLLBACK can reach a dead connection
            record.invalidate()
            return
        self.counters.resets += 1
        handling = sys.exc_info()[1]
        try:
            _await(finish(conn.rollback(), _RESET_TIMEOUT, "reset rollback"))
        except asyncio.CancelledError as cancelled:
            # The ROLLBACK finished (finish() saw to it) while a cancellation arrived. Let the
            # pool take the clean connection back and deliver the cancellation later: raised
            # from here, SQLAlchemy before 2.0.56 would strand the connection.
            absorb_cancellation(cancelled, handling)
        state.last_activity = time.monotonic()

    def on_checkin(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        """Mark a connection used once, so its next checkout checks it."""
        state: _ConnState | None = record.info.get(_STATE_KEY)
        if state is not None:
            state.fresh = False
            if state.leak_timer is not None:
                state.leak_timer.cancel()
                state.leak_timer = None

    def on_close(self, dbapi_connection: Any, record: ConnectionPoolEntry | None = None) -> None:
        """Drop a dead connection's socket, so closing it sends nothing and logs no error."""
        if dbapi_connection is None:
            return
        conn = dbapi_connection.driver_connection
        if _drivers.is_closed(conn):
            _drivers.abort(conn)

    # -- engine events -----------------------------------------------------------------------

    def on_error(self, ctx: ExceptionContext) -> None:
        """Classify an error; keep a one-connection failure from invalidating the whole pool."""
        if ctx.connection is None and not ctx.is_pre_ping:
            return  # failed to connect: there is no pooled connection to replace
        scope = disconnect_scope(ctx.original_exception)
        if scope is None:
            if ctx.is_disconnect:  # cancellation: SQLAlchemy discards this one connection
                self.counters.replaced[Reason.CANCELLED] += 1
            return
        now = time.monotonic()
        ctx.is_disconnect = True
        # asyncgone invalidates the pool itself (see _invalid_before), never SQLAlchemy.
        ctx.invalidate_pool_on_disconnect = False
        if is_aftermath(ctx.original_exception):
            # The driver closed this connection itself, after a loss or a cancellation that
            # was already counted: discard it quietly, and do not count it as news.
            log.debug(
                "discarding a connection already closed: %s", describe(ctx.original_exception)
            )
            return
        self.counters.replaced[Reason.ERROR] += 1
        self.counters.errors[error_code(ctx.original_exception) or 0] += 1
        cutoff = now if scope is Scope.SERVER else self._dead.note(now)
        if cutoff is not None:
            self._invalidate_pool(
                cutoff,
                f"{'a server-wide error' if scope is Scope.SERVER else 'several connections died'}"
                f": {describe(ctx.original_exception)}",
            )
        else:
            log.warning("replacing a connection after %s", describe(ctx.original_exception))

    # -- helpers -----------------------------------------------------------------------------

    def _verdict(
        self, conn: Any, state: _ConnState, now: float, idle: float, keepalive: float | None
    ) -> Reason | None:
        """Return why a pooled connection must not be handed out, or None to hand it out.

        Cheapest and most certain first; only the last step, for a connection idle longer
        than ``ping_after`` (the keepalive's interval for the keepalive), costs a round trip.
        The keepalive also retires a connection that would expire before its next round.
        """
        if state.created < self._invalid_before:
            return Reason.POOL_INVALIDATED
        if _drivers.is_closed(conn):
            return Reason.CLOSED_BY_SERVER
        if now + (keepalive or 0.0) >= state.expires:
            return Reason.MAX_LIFETIME
        if idle > state.idle_limit:
            return Reason.IDLE_LIMIT
        ping_after = self.options.ping_after if keepalive is None else keepalive
        if ping_after is not None and idle >= ping_after:
            return self._ping(conn, state, keepalive is not None)
        return None

    def _ping(self, conn: Any, state: _ConnState, keepalive: bool) -> Reason | None:
        self.counters.pings += 1
        if keepalive:
            self.counters.keepalive_pings += 1
        log.debug("pinging connection %s after idleness", _drivers.thread_id(conn))
        try:
            _await(bounded(_drivers.ping(conn), self.options.ping_timeout))
        except TimeoutError:
            self.counters.ping_failures += 1
            return Reason.PING_TIMEOUT
        except Exception as exc:
            self.counters.ping_failures += 1
            log.debug("ping failed: %s", describe(exc))
            return Reason.PING_FAILED
        state.last_activity = time.monotonic()
        return None

    def _replace(self, conn: Any, reason: Reason, now: float, keepalive: bool) -> None:
        # A replacement in the background counts as the keepalive's (no user waited for
        # it); its cause stays in the log line, and in the handling below.
        self.counters.replaced[Reason.KEEPALIVE if keepalive else reason] += 1
        thread = _drivers.thread_id(conn)
        who = "the keepalive is " if keepalive else ""
        if reason not in _DEAD:
            if _drivers.is_closed(conn):
                _drivers.abort(conn)
            # Routine: INFO, not a warning. Replacements in the wake of a pool invalidation
            # were announced by that invalidation's own line.
            level = logging.DEBUG if reason is Reason.POOL_INVALIDATED else logging.INFO
            log.log(level, "%sretiring connection %s: %s", who, thread, reason.value)
            raise DisconnectionError(f"asyncgone retired the connection: {reason.value}")
        # Close the socket now: SQLAlchemy's close afterwards then has nothing to wait for on
        # a network path that may not answer.
        _drivers.abort(conn)
        cutoff = self._dead.note(now)
        if cutoff is not None:
            self._invalidate_pool(cutoff, "several connections found dead together")
        else:
            log.warning("%sreplacing connection %s: %s", who, thread, reason.value)
        raise DisconnectionError(f"asyncgone found the connection dead: {reason.value}")

    def _invalidate_pool(self, cutoff: float, why: str) -> None:
        """Mark every connection opened before ``cutoff`` for replacement at its checkout."""
        self._invalid_before = max(self._invalid_before, cutoff)
        self.counters.pool_invalidations += 1
        log.info("invalidating all pooled connections: %s", why)

    def _watch_for_leak(self, state: _ConnState, conn: Any) -> None:
        """Arrange a warning, with the acquiring stack, if this checkout lasts too long."""
        threshold = self.options.leak_threshold
        assert threshold is not None
        stack = acquiring_stack()
        thread = _drivers.thread_id(conn)

        def report() -> None:
            state.leak_timer = None
            self.counters.leaks += 1
            log.warning(
                "connection %s has been checked out for more than %g s (leak_threshold); it "
                "was acquired at:\n%s",
                thread,
                threshold,
                "".join(stack).rstrip(),
            )

        if state.leak_timer is not None:
            state.leak_timer.cancel()
        state.leak_timer = asyncio.get_running_loop().call_later(threshold, report)

    def _warn_about_recycle(self, wait_timeout: float) -> None:
        if self._warned:
            return
        pool_recycle = self._pool_recycle
        message = recycle_warning(
            recycle=self.options.recycle,
            pool_recycle=None if pool_recycle is None or pool_recycle < 0 else pool_recycle,
            wait_timeout=wait_timeout,
        )
        if message is not None:
            self._warned = True
            warnings.warn(message, ConfigurationWarning, stacklevel=2)
