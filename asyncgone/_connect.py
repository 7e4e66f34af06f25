"""Opening a connection: bounded as a whole, then configured and measured once.

- engine ``do_connect``: route the driver's connect through a connector bounded by
  ``connect_timeout`` (handshake included), and remember the connect parameters for the
  ``KILL`` connection (``_cancel``);
- pool ``connect``: set TCP keepalive on the socket, ask the server for this connection's
  limits (``_server.read_facts``: one query, which also serves the idle limit, the recycle
  warning and the keepalive's automatic interval), and give the connection its holder: its
  idle limit, its (jittered) end of life, and the event loop it belongs to.

A failure of asyncgone's own query on a new connection is reported as the driver's
"lost connection" error (2013), so callers see the ``OperationalError`` any connect failure
raises, never a bare ``TimeoutError`` or transport error.
"""

from __future__ import annotations

import asyncio
import math
import time
import warnings
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool

from ._connector import connector_for
from ._errors import ConfigurationWarning, describe
from ._invalidation import LOST_CONNECTION
from ._loops import LoopWatch
from ._server import ServerFacts, auto_idle_limit, read_facts, recycle_warning
from ._sockets import apply_tcp_keepalive
from ._state import ConnectionHolder, EngineState, lifetime_deadline

__all__ = ["ConnectSetup"]


class ConnectSetup:
    """The ``do_connect`` and ``connect`` listeners of one engine."""

    def __init__(self, state: EngineState, dbapi: Any) -> None:
        self._state = state
        self._dbapi = dbapi
        self._read_facts = True
        self._connector = connector_for(state.driver, state.connect_timeout, state.admission)
        if state.search is not None and self._connector is not None:
            # Several hosts, or a role to check: each connection searches for its server.
            self._connector = state.search.wrap(self._connector)
        self._loops: LoopWatch | None = None
        self.params: dict[str, Any] | None = None

    def install(self, engine: Engine) -> None:
        # A NullPool never reuses a connection: no idle limits, nothing idle at loop end.
        self._read_facts = not isinstance(engine.pool, NullPool)
        self._loops = LoopWatch(engine) if self._read_facts else None
        event.listen(engine, "do_connect", self.on_do_connect)
        event.listen(engine, "connect", self.on_connect)

    def on_do_connect(
        self, dialect: Any, record: ConnectionPoolEntry, cargs: Any, cparams: dict[str, Any]
    ) -> None:
        """Bound the driver's connect; remember how to connect."""
        self.params = {k: v for k, v in cparams.items() if k != "async_creator_fn"}
        if self._connector is not None:
            # SQLAlchemy's async adapters take the coroutine function that opens the driver
            # connection as this keyword (it is how create_async_engine(async_creator=)
            # works); an application's own async_creator stays in charge.
            cparams.setdefault("async_creator_fn", self._connector)

    def on_connect(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        """Configure a new connection and give it its limits."""
        state = self._state
        state.counters.connects += 1
        conn = dbapi_connection.driver_connection
        driver = state.driver
        driver.learn(conn)
        options = state.options
        if options.tcp_keepalive is not None:
            apply_tcp_keepalive(driver.transport_socket(conn), options.tcp_keepalive)
        recycle = options.recycle
        idle_limit = math.inf if recycle is None or recycle == "auto" else float(recycle)
        server_limit = math.inf
        # The host search read them already; with none of their uses wanted, the connect
        # costs no extra round trip.
        facts = None if state.search is None else state.search.facts_of(conn)
        if facts is None and (
            self._read_facts
            and (
                recycle is not None
                or state.pool_recycle is not None
                or options.keepalive_interval == "auto"
            )
        ):
            facts = self._facts(dbapi_connection)
        if facts is not None and self._read_facts:
            server_limit = auto_idle_limit(facts.wait_timeout)
            if recycle == "auto":
                idle_limit = server_limit
            self._warn_about_recycle(facts.wait_timeout)
        state.lower_idle_limit(min(idle_limit, server_limit))
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        holder = ConnectionHolder(
            now,
            lifetime_deadline(now, options.max_lifetime),
            idle_limit,
            loop,
            # A driver asyncgone cannot inspect is pinged at every checkout.
            options.ping_after if driver.passive_check else 0.0,
        )
        holder.cursors = driver.count_cursors(conn)
        holder.closed = driver.watch(conn)
        holder.conn = weakref.ref(conn)
        holder.remember(record)
        if state.search is not None:  # so that a Galera node's connections can be retired
            state.search.adopt(conn, holder)
        if self._loops is not None:
            self._loops.adopt(loop, dbapi_connection)

    def _facts(self, dbapi_connection: Any) -> ServerFacts:
        timeout = self._state.options.ping_timeout
        try:
            facts: ServerFacts = dbapi_connection.run_async(lambda c: read_facts(c, timeout))
        except self._dbapi.Error:
            raise
        except Exception as exc:  # a timeout, a transport error: the connection is lost
            raise self._dbapi.OperationalError(
                LOST_CONNECTION,
                f"Lost connection to MySQL server while reading its limits: {describe(exc)}",
            ) from exc
        return facts

    def _warn_about_recycle(self, wait_timeout: float) -> None:
        state = self._state
        if state.recycle_warned:
            return
        pool_recycle = state.pool_recycle
        message = recycle_warning(
            recycle=state.options.recycle,
            pool_recycle=None if pool_recycle is None or pool_recycle < 0 else pool_recycle,
            wait_timeout=wait_timeout,
        )
        if message is not None:
            state.recycle_warned = True
            warnings.warn(message, ConfigurationWarning, stacklevel=2)
