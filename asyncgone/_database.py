"""``Database``: an engine with its sessions, a unit-of-work runner and a lifecycle."""

from __future__ import annotations

import enum
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Collection
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import anyio
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import QueuePool

from ._cancel import drain_and_dispose
from ._engine import create_engine, split_options
from ._errors import (
    DEFAULT_RETRY_CODES,
    AsyncGoneError,
    CommitOutcomeUnknown,
    ConfigurationError,
    DatabaseUnavailable,
    add_note,
    describe,
    error_code,
    is_disconnect,
    is_unavailable,
)
from ._keepalive import Keepalive
from ._session import DEFAULT_CLEANUP_TIMEOUT, SessionScope, commits
from ._stats import Counters, Health, PoolStatus, Stats, counters_for, stats
from ._url import mask, resolve_url
from ._waits import finish

__all__ = ["DEFAULT_ATTEMPTS", "DEFAULT_HEALTH_TIMEOUT", "DEFAULT_RUN_DEADLINE", "Database"]

log = logging.getLogger("asyncgone")

_T = TypeVar("_T")

#: Bound on ``Database.health()``: readiness probes want a quick answer.
DEFAULT_HEALTH_TIMEOUT = 2.0

#: How many times ``Database.run()`` tries a unit of work that keeps failing retryably.
DEFAULT_ATTEMPTS = 3

#: Seconds ``Database.run()`` keeps trying, waiting out a server that is down, before giving
#: up with ``DatabaseUnavailable`` (or the last error). A running attempt is not cut short.
DEFAULT_RUN_DEADLINE = 15.0

# Full-jitter exponential backoff between attempts: 50 ms, 100 ms, ... capped at 1 s.
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 1.0


class _State(enum.Enum):
    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


def _backoff(attempt: int) -> float:
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))


class Database:
    """An engine plus its sessions, a unit-of-work runner and a lifecycle.

    ``async with db`` creates the engine and probes the server once (failing fast with
    ``DatabaseUnavailable`` if it cannot be reached); leaving the block always disposes the
    engine, also on error or cancellation. A closed ``Database`` cannot be reopened::

        db = asyncgone.Database("mysql+asyncmy://app:secret@db/app", pool_size=20)
        async with db:
            async with db.session() as session:          # like managed_session()
                session.add(Order(id=1))
            total = await db.run(count_orders)           # replayed only when safe

    Parameters:
        url: as for ``create_engine()``; ``None`` reads ``$DATABASE_URL``.
        session_options: ``AsyncSession`` keywords for every session (``expire_on_commit``
            defaults to False).
        attempts, run_deadline, retry_codes: defaults for ``run()``.
        cleanup_timeout: bound on each session's rollback/close and on disposal.
        keepalive: run the keepalive task (see ``keepalive()``) while started.
        **engine_options: asyncgone's options and every ``create_async_engine`` keyword.
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        session_options: dict[str, Any] | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
        run_deadline: float = DEFAULT_RUN_DEADLINE,
        retry_codes: Collection[int] = DEFAULT_RETRY_CODES,
        cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT,
        keepalive: bool = True,
        **engine_options: Any,
    ) -> None:
        self.url = resolve_url(url)  # validated now, like every option below
        self._options, _ = split_options(engine_options)
        _check_run_options(attempts, run_deadline, retry_codes)
        if not (isinstance(cleanup_timeout, (int, float)) and 0 < cleanup_timeout < math.inf):
            raise ConfigurationError(
                f"cleanup_timeout must be a positive number of seconds, got {cleanup_timeout!r}"
            )
        self._engine_options = engine_options
        self._session_options = dict(session_options or {})
        self._attempts = attempts
        self._run_deadline = float(run_deadline)
        self._retry_codes = frozenset(retry_codes)
        self._cleanup_timeout = float(cleanup_timeout)
        if not isinstance(keepalive, bool):
            raise ConfigurationError(f"keepalive must be True or False, got {keepalive!r}")
        self._keepalive_on = keepalive
        self._keepalive: Keepalive | None = None
        self._engine: AsyncEngine | None = None
        self._state = _State.NEW

    def __repr__(self) -> str:
        return f"<Database {mask(self.url)} {self._state.value}>"

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True between ``start()`` and ``close()``."""
        return self._state is _State.STARTED

    @property
    def engine(self) -> AsyncEngine:
        """The ``AsyncEngine``, available between ``start()`` and ``close()``."""
        if self._state is not _State.STARTED or self._engine is None:
            raise AsyncGoneError(
                f"{self!r} is not started: use `async with db:` (or `await db.start()`) first"
            )
        return self._engine

    async def start(self) -> Database:
        """Create the engine and check that the server answers; return self."""
        if self._state is _State.CLOSED:
            raise AsyncGoneError(f"{self!r} was closed and cannot be reused; create a new one")
        if self._state is _State.STARTED:
            return self
        self._engine = create_engine(self.url, **self._engine_options)
        self._state = _State.STARTED
        try:
            with anyio.fail_after(self._options.connect_timeout + self._options.ping_timeout):
                async with self._engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except BaseException as exc:
            await self.close()
            if isinstance(exc, Exception):
                raise DatabaseUnavailable(
                    f"could not reach {mask(self.url)}: {describe(exc)}"
                ) from exc
            raise
        if self._keepalive_on:
            self._keepalive = await Keepalive(self._engine).start()
        return self

    async def close(self) -> None:
        """Dispose the engine (bounded, surviving cancellation); the Database stays closed."""
        engine, self._engine = self._engine, None
        keepalive, self._keepalive = self._keepalive, None
        self._state = _State.CLOSED
        # All steps run to the end in one task of their own: a cancellation of the caller
        # (re-raised once they are done) must not leave the engine's connections open.
        try:
            await finish(self._shut_down(keepalive, engine), 3 * self._cleanup_timeout, "closing")
        except TimeoutError:
            log.warning(
                "closing the database took longer than %s s and was abandoned",
                3 * self._cleanup_timeout,
            )

    async def _shut_down(self, keepalive: Keepalive | None, engine: AsyncEngine | None) -> None:
        if keepalive is not None:
            await keepalive.stop()
        if engine is not None:
            await drain_and_dispose(engine, self._cleanup_timeout)

    async def __aenter__(self) -> Database:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- sessions and units of work ----------------------------------------------------------

    def session(self, **session_options: Any) -> SessionScope:
        """Open a session with ``managed_session()`` semantics: commit on success, rollback
        and re-raise on error, cleanup bounded and cancellation-safe."""
        return SessionScope(
            self.engine,
            {**self._session_options, **session_options},
            cleanup_timeout=self._cleanup_timeout,
        )

    async def run(
        self,
        work: Callable[[AsyncSession], Awaitable[_T]],
        *,
        attempts: int | None = None,
        deadline: float | None = None,
        retry_codes: Collection[int] | None = None,
    ) -> _T:
        """Run ``work(session)`` in a fresh session and commit; replay it only when safe.

        A failure before COMMIT was sent that is a disconnect, or whose code is in
        ``retry_codes`` (deadlock 1213, lock wait timeout 1205 by default), rolls back and
        runs ``work`` again in a new session, after a jittered backoff, up to ``attempts``
        times. While no connection can be had (server restarting, failover), ``run()``
        waits, up to ``deadline`` seconds in all, then raises ``DatabaseUnavailable``.
        A connection lost while COMMIT was in flight raises ``CommitOutcomeUnknown`` and is
        never replayed. Any other error is raised at once::

            async def transfer(session: AsyncSession) -> None:
                ...
            await db.run(transfer, attempts=5)

        ``work`` must do nothing outside the database that it cannot do twice, and should
        leave the COMMIT to ``run()``: once ``work`` commits by itself, a later failure is
        not replayed (that part would be applied twice), and a connection lost during its
        own COMMIT raises ``CommitOutcomeUnknown``.
        """
        attempts = self._attempts if attempts is None else attempts
        deadline = self._run_deadline if deadline is None else deadline
        codes = self._retry_codes if retry_codes is None else frozenset(retry_codes)
        _check_run_options(attempts, deadline, codes)
        give_up_at = time.monotonic() + deadline
        failures = waits = 0
        while True:
            connected = False
            work_commits = (0, 0)
            try:
                async with self.session() as session:
                    await session.connection()  # a working connection, or an error here
                    connected = True
                    try:
                        return await work(session)
                    finally:
                        work_commits = commits(session)  # before the scope's own COMMIT
            except CommitOutcomeUnknown:
                self._counters().commit_outcome_unknown += 1
                raise
            except Exception as exc:
                if work_commits != (0, 0):
                    # work committed (part of) itself: replaying would apply that part twice.
                    self._unreplayable(exc, work_commits)
                now = time.monotonic()
                if not connected:
                    if not is_unavailable(exc):
                        raise
                    if now >= give_up_at:
                        self._counters().unavailable += 1
                        raise DatabaseUnavailable(
                            f"no working connection to {mask(self.url)} within {deadline:g} s; "
                            f"last error: {describe(exc)}"
                        ) from exc
                    waits += 1
                    delay = _backoff(min(waits, 5))
                else:
                    failures += 1
                    retryable = is_disconnect(exc) or error_code(exc) in codes
                    if not retryable or failures >= attempts or now >= give_up_at:
                        raise
                    self._counters().replays += 1
                    delay = _backoff(failures)
                    log.info(
                        "replaying a unit of work after %s (attempt %d of %d)",
                        describe(exc),
                        failures + 1,
                        attempts,
                    )
                await anyio.sleep(min(delay, max(0.0, give_up_at - now)))

    def _unreplayable(self, exc: Exception, work_commits: tuple[int, int]) -> NoReturn:
        """Raise for a unit of work that failed after committing inside ``work``."""
        begun, done = work_commits
        if begun > done and is_disconnect(exc):
            self._counters().commit_outcome_unknown += 1
            raise CommitOutcomeUnknown(
                f"the connection to {mask(self.url)} was lost while a COMMIT issued by the "
                f"unit of work itself was in flight: it may or may not have been committed, "
                f"and asyncgone will not replay it. Check the data before running this work "
                f"again, and leave the COMMIT to run()."
            ) from exc
        add_note(
            exc,
            "asyncgone: not replayed, because the unit of work had already committed part of "
            "itself (leave the COMMIT to run() to make it replayable)",
        )
        raise exc

    # -- observability -----------------------------------------------------------------------

    # The timeout is the point of this API (readiness probes), not a stand-in for a scope.
    async def health(self, timeout: float = DEFAULT_HEALTH_TIMEOUT) -> Health:  # noqa: ASYNC109
        """Check, within ``timeout`` seconds, that a pooled connection answers ``SELECT 1``.

        Never raises for a database problem: a failure (unreachable server, exhausted pool,
        timeout) is reported in the returned ``Health``. Meant for readiness endpoints::

            report = await db.health(timeout=1.0)
            return JSONResponse(report.as_dict(), status_code=200 if report.ok else 503)
        """
        if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
            raise ConfigurationError(
                f"timeout must be a positive number of seconds, got {timeout!r}"
            )
        engine = self.engine
        started = time.monotonic()
        error: str | None = None
        try:
            with anyio.fail_after(timeout):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except TimeoutError:
            error = f"no answer within {timeout:g} s"
        except Exception as exc:
            error = describe(exc)
        latency = None if error else time.monotonic() - started
        return Health(
            ok=error is None,
            latency=latency,
            error=error,
            target=mask(self.url),
            pool=pool_status(engine),
        )

    def stats(self) -> Stats:
        """What asyncgone did on this Database's engine (see ``Stats``)."""
        return stats(self.engine)

    def _counters(self) -> Counters:
        counters = counters_for(self.engine)
        assert counters is not None  # the engine is asyncgone's own
        return counters


def _check_run_options(attempts: object, deadline: object, codes: object) -> None:
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ConfigurationError(f"attempts must be a whole number of at least 1, got {attempts!r}")
    if (
        isinstance(deadline, bool)
        or not isinstance(deadline, (int, float))
        or not (0 <= deadline < math.inf)
    ):
        raise ConfigurationError(f"deadline must be zero or more seconds, got {deadline!r}")
    if isinstance(codes, (str, bytes)) or not all(
        isinstance(code, int)
        for code in codes  # type: ignore[attr-defined]
    ):
        raise ConfigurationError(f"retry_codes must be MySQL error numbers, got {codes!r}")


def pool_status(engine: AsyncEngine) -> PoolStatus:
    """The engine's pool figures (zeros for a pool that keeps no connections)."""
    pool = engine.sync_engine.pool
    if not isinstance(pool, QueuePool):
        return PoolStatus(size=0, checked_out=0, idle=0, overflow=0)
    return PoolStatus(
        size=pool.size(),
        checked_out=pool.checkedout(),
        idle=pool.checkedin(),
        overflow=max(pool.overflow(), 0),
    )
