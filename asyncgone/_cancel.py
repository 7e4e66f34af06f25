"""Stop statements abandoned by cancellation, so they do not keep running and holding locks.

When a task is cancelled while a statement runs (``asyncio.wait_for``, ``task.cancel()``,
an anyio cancel scope, a client hanging up on an ASGI server), the driver closes its socket
and SQLAlchemy discards the connection; the server, though, keeps executing the statement,
with its locks, until it finishes and only then notices the client is gone. asyncgone sends
``KILL CONNECTION <id>`` for that connection over a short-lived connection of its own, from
a background task, bounded by ``connect_timeout`` plus ``ping_timeout``.

``KILL CONNECTION``, not ``KILL QUERY``, where the connection is discarded anyway: a
``KILL QUERY`` that reaches the server before the abandoned statement has begun (its bytes
still on their way, or its server thread not yet back to reading commands) does not stop
it, and CI runs under CPU load saw such a statement wait out its lock after its KILL
QUERY. A killed connection runs nothing more, whenever the KILL lands. A statement stopped
on a connection its task goes on using (``stop(..., connection=False)``: a client that hung
up) gets ``KILL QUERY``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _drivers, _statements
from ._connector import open_connection
from ._errors import error_code
from ._state import EngineState, state_of
from ._waits import bounded, finish

if TYPE_CHECKING:
    from ._connect import ConnectSetup

__all__ = ["StatementKiller", "drain", "drain_and_dispose"]

log = logging.getLogger("asyncgone")

_UNKNOWN_THREAD = 1094  # ER_NO_SUCH_THREAD


class StatementKiller:
    """One engine's listener that stops, on the server, statements a cancellation abandoned."""

    def __init__(self, state: EngineState, connect: ConnectSetup) -> None:
        self._state = state
        self._connect = connect  # knows how the engine's connections are opened
        self._tasks: set[asyncio.Task[None]] = set()

    def install(self, engine: Engine) -> None:
        event.listen(engine, "handle_error", self.on_error)

    def on_error(self, ctx: ExceptionContext) -> None:
        """On a cancellation during a statement, COMMIT or ROLLBACK, stop it on the server."""
        if not isinstance(ctx.original_exception, asyncio.CancelledError):
            return
        if ctx.connection is None or ctx.connection.invalidated or self._connect.params is None:
            return
        try:
            raw = ctx.connection.connection.driver_connection
            thread = _drivers.thread_id(raw)
        except Exception:  # the connection is already gone: nothing is running on it
            return
        # SQLAlchemy discards a connection whose statement a cancellation interrupted (it
        # counts as a disconnect): the whole server connection can go.
        self.stop(thread, raw, connection=ctx.is_disconnect)

    def stop(self, thread: int | None, raw: Any, *, connection: bool = False) -> None:
        """Send ``KILL QUERY`` for the server connection ``thread`` (of the driver connection
        ``raw``), in the background, to the server that connection goes to; with
        ``connection``, for a connection that is being discarded, ``KILL CONNECTION``
        (see the module docstring).

        ``raw`` is required: with several hosts, a thread id means something only on the
        server ``raw`` is connected to, and without it no KILL would be sent."""
        params = self._connect.params
        if thread is None or params is None:
            return
        search = self._state.search
        if search is not None:
            # A thread id means nothing on another server: KILL only where it runs.
            host = search.host_of(raw)
            if host is None:
                return
            params = {**params, "host": host.host, "port": host.port}
        statement = f"KILL {'CONNECTION' if connection else 'QUERY'} {int(thread)}"
        task = asyncio.get_running_loop().create_task(self._kill(thread, params, statement))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _kill(self, thread: int, params: dict[str, Any], statement: str) -> None:
        state = self._state
        timeout = state.options.ping_timeout
        try:
            conn = await open_connection(state.driver, params, state.connect_timeout)
            try:
                await bounded(_statements.execute(conn, statement), timeout)
            finally:
                await _statements.close(conn, timeout)
        except Exception as exc:
            if error_code(exc) == _UNKNOWN_THREAD:
                # The connection ended before the KILL arrived: nothing runs on it any more.
                log.debug("connection %s was gone before %s", thread, statement)
                return
            # The statement runs on until it ends by itself; worth knowing, not fatal.
            log.warning("could not stop the statement abandoned on connection %s: %s", thread, exc)
            return
        state.counters.kills += 1
        log.debug("stopped the statement abandoned on connection %s: %s", thread, statement)

    async def drain(self, timeout: float) -> None:
        """Wait for pending KILL tasks (bounded), e.g. before the engine is disposed."""
        pending = set(self._tasks)
        if pending:
            await finish(asyncio.wait(pending), timeout, "waiting for KILL")


async def drain(engine: AsyncEngine | Engine, timeout: float) -> None:
    """Wait for the KILL tasks an engine has pending, at most ``timeout`` seconds."""
    state = state_of(engine)
    if state is not None and state.killer is not None:
        await state.killer.drain(timeout)


async def drain_and_dispose(engine: AsyncEngine, timeout: float) -> None:
    """Dispose ``engine`` once its pending KILLs went out: each step at most
    ``timeout`` seconds and completed even under cancellation (re-raised afterwards).

    Disposing first would cancel them, leaving the statements running on the server (a
    script that ends right after a cancellation, an application shutting down).
    """
    try:
        await drain(engine, timeout)
    except TimeoutError:
        log.warning("KILL still pending after %s s; disposing the engine anyway", timeout)
    finally:
        await finish(engine.dispose(), timeout, "engine dispose")
