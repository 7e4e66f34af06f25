"""``Database``: an engine with its sessions, a unit-of-work runner and a lifecycle."""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import anyio
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ._admission import retry_until
from ._cancel import drain_and_dispose
from ._config import RunOptions, check_flag, seconds, split_options
from ._engine import create_engine, first_connect_bound
from ._errors import DEFAULT_RETRY_CODES, AsyncGoneError, DatabaseUnavailable, describe
from ._keepalive import Keepalive
from ._metrics import check_health, pool_status
from ._routing import (
    DEFAULT_CAUSAL_READS_TIMEOUT,
    DEFAULT_MAX_REPLICA_LAG,
    DEFAULT_REPLICA_CHECK_INTERVAL,
    Routing,
    RoutingOptions,
)
from ._run import run_unit
from ._session import DEFAULT_CLEANUP_TIMEOUT, SessionScope
from ._session_options import check_session_options
from ._state import EngineState, state_of, stats
from ._stats import Health, Stats
from ._url import mask, resolve_url
from ._waits import finish

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_HEALTH_TIMEOUT",
    "DEFAULT_RUN_DEADLINE",
    "Database",
    "managed_session",
    "pool_status",
]

log = logging.getLogger("asyncgone")

_T = TypeVar("_T")

#: Bound on ``Database.health()``: readiness probes want a quick answer.
DEFAULT_HEALTH_TIMEOUT = 2.0

#: How many times ``Database.run()`` tries a unit of work that keeps failing retryably.
DEFAULT_ATTEMPTS = 3

#: Seconds ``Database.run()`` keeps trying, waiting out a server that is down, before giving
#: up with ``DatabaseUnavailable`` (or the last error). A running attempt is not cut short.
DEFAULT_RUN_DEADLINE = 15.0

# Database's own keywords, besides the engine's: a misspelling of one is caught too.
_OWN_KEYWORDS = (
    "session_options",
    "attempts",
    "run_deadline",
    "retry_codes",
    "cleanup_timeout",
    "keepalive",
    "replicas",
    "max_replica_lag",
    "replica_check_interval",
    "replica_fallback",
    "causal_reads_timeout",
)


class _Lifecycle(enum.Enum):
    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


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

    Args:
        url (str | URL | None): as for ``create_engine()``; ``None`` reads
            ``$DATABASE_URL``.
        session_options (dict[str, Any] | None): ``AsyncSession`` keywords for every
            session (``expire_on_commit`` defaults to False).
        attempts (int): default for ``run()``: tries in all (``DEFAULT_ATTEMPTS``, 3).
        run_deadline (float): default for ``run()``: seconds to keep trying
            (``DEFAULT_RUN_DEADLINE``, 15).
        retry_codes (Collection[int]): default for ``run()``: MySQL error numbers safe to
            replay (``DEFAULT_RETRY_CODES``: 1205, 1213).
        cleanup_timeout (float): seconds each session's rollback and close, and the
            disposal, may take (``DEFAULT_CLEANUP_TIMEOUT``, 5).
        keepalive (bool): run the keepalive task (see ``keepalive()``) while started
            (default True).
        replicas (str | URL | None): the replicas for ``read_only`` work, one URL (several
            servers as repeated ``host=`` parameters); their connections go to read-only
            servers only. ``None`` (the default): everything goes to ``url``.
        max_replica_lag (float): seconds a replica may lag (``Seconds_Behind_Master``) and
            still take ``read_only`` work (``DEFAULT_MAX_REPLICA_LAG``, 5).
        replica_check_interval (float): seconds between two background checks of every
            replica's health and lag (``DEFAULT_REPLICA_CHECK_INTERVAL``, 1).
        replica_fallback (str): with no fit replica, ``"primary"`` (the default) serves
            ``read_only`` work from ``url``; ``"raise"`` raises ``DatabaseUnavailable``.
        causal_reads_timeout (float): seconds a ``read_only`` session after a commit in the
            same context waits for its replica to apply it before the primary serves it
            (``DEFAULT_CAUSAL_READS_TIMEOUT``, 1).
        **engine_options: asyncgone's options and every ``create_async_engine`` keyword.

    Raises:
        ConfigurationError: the URL or an option is unusable (raised here, before anything
            connects).
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
        replicas: str | URL | None = None,
        max_replica_lag: float = DEFAULT_MAX_REPLICA_LAG,
        replica_check_interval: float = DEFAULT_REPLICA_CHECK_INTERVAL,
        replica_fallback: str = "primary",
        causal_reads_timeout: float = DEFAULT_CAUSAL_READS_TIMEOUT,
        **engine_options: Any,
    ) -> None:
        self.url = resolve_url(url)  # validated now, like every option below
        routing = RoutingOptions(
            max_lag=max_replica_lag,
            interval=replica_check_interval,
            fallback=replica_fallback,  # type: ignore[arg-type]
            causal_timeout=causal_reads_timeout,
        )  # checked also without replicas: a mistake shows before replicas are added
        self._routing = None if replicas is None else Routing(replicas, routing)
        self._options, _ = split_options(engine_options, also=_OWN_KEYWORDS)
        self._run_options = RunOptions(
            attempts=attempts,
            deadline=run_deadline,
            retry_codes=retry_codes,  # type: ignore[arg-type]
        )
        self._cleanup_timeout = seconds("cleanup_timeout", cleanup_timeout)
        self._keepalive_on = check_flag("keepalive", keepalive)
        self._engine_options = engine_options
        self._session_options = dict(session_options or {})
        check_session_options(self._session_options)
        self._keepalive: Keepalive | None = None
        self._engine: AsyncEngine | None = None
        self._lifecycle = _Lifecycle.NEW

    def __repr__(self) -> str:
        return f"<Database {mask(self.url)} {self._lifecycle.value}>"

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True between ``start()`` and ``close()``."""
        return self._lifecycle is _Lifecycle.STARTED

    @property
    def cleanup_timeout(self) -> float:
        """Seconds a session's rollback and close, or the disposal, may take."""
        return self._cleanup_timeout

    @property
    def engine(self) -> AsyncEngine:
        """The ``AsyncEngine``, available between ``start()`` and ``close()``."""
        if self._lifecycle is not _Lifecycle.STARTED or self._engine is None:
            raise AsyncGoneError(
                f"{self!r} is not started: use `async with db:` (or `await db.start()`) first"
            )
        return self._engine

    async def start(self) -> Database:
        """Create the engine and check that the server answers; return self.

        Bounded by ``connect_timeout + ping_timeout`` seconds (more for a multi-host URL:
        its host search's deadline). A refusal (1040, 1203, 1129) is tried again with a
        backoff for ``connect_retry`` seconds, and on one server for at least
        ``connect_timeout`` seconds, with a last try at the end; never past the bound, and
        not at all with ``connect_retry=None`` or ``0``. Nothing listening (2002/2003) is
        raised at once: the engine never reached that server, and a wrong host or port is
        likelier than a restart. A host search tries the next host instead, after
        ``connect_retry``. Raises ``DatabaseUnavailable`` naming the last error, and
        ``AsyncGoneError`` for a closed Database."""
        if self._lifecycle is _Lifecycle.CLOSED:
            raise AsyncGoneError(f"{self!r} was closed and cannot be reused; create a new one")
        if self._lifecycle is _Lifecycle.STARTED:
            return self
        self._engine = create_engine(self.url, **self._engine_options)
        self._lifecycle = _Lifecycle.STARTED
        try:
            bound = first_connect_bound(self._engine, self._options)
            # One server refusing is waited for up to the bound less one statement's time:
            # the pools of a fleet's other processes give their overflow back meanwhile.
            # A host search tries the next host instead, after connect_retry as before.
            state = state_of(self._engine)
            one_server = state is None or state.search is None
            wait_until = time.monotonic() + bound - self._options.ping_timeout
            with anyio.fail_after(bound), retry_until(wait_until if one_server else -math.inf):
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
        if self._routing is not None:
            try:
                await self._routing.start(
                    self._engine_options, self._engine, keepalive=self._keepalive_on
                )
            except BaseException:
                await self.close()
                raise
        return self

    async def close(self) -> None:
        """Dispose the engine (bounded, surviving cancellation); the Database stays closed."""
        engine, self._engine = self._engine, None
        keepalive, self._keepalive = self._keepalive, None
        self._lifecycle = _Lifecycle.CLOSED
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
        if self._routing is not None:
            await self._routing.close(self._cleanup_timeout)
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

    def session(self, *, read_only: bool = False, **session_options: Any) -> SessionScope:
        """Open a session with ``managed_session()`` semantics: commit on success, rollback
        and re-raise on error, cleanup bounded and cancellation-safe.

        With ``read_only=True`` and ``replicas`` given, the session goes to a replica the
        background check found fit (reachable, replicating, lagging at most
        ``max_replica_lag``), else to the primary (or raises ``DatabaseUnavailable`` with
        ``replica_fallback="raise"``); the choice costs no round trip. After a commit in
        the same context (task, request), it reads its own writes: its replica first waits
        (``MASTER_GTID_WAIT``, at most ``causal_reads_timeout``) for that commit, else the
        primary serves it.
        """
        if session_options:  # the Database's own were checked when it was made
            check_session_options({**self._session_options, **session_options})
        options = {**self._session_options, **session_options}
        if read_only and self._routing is not None:
            return self._routing.scope(self.engine, options, self._cleanup_timeout)
        return SessionScope(self.engine, options, cleanup_timeout=self._cleanup_timeout)

    async def run(
        self,
        work: Callable[[AsyncSession], Awaitable[_T]],
        *,
        attempts: int | None = None,
        deadline: float | None = None,
        retry_codes: Collection[int] | None = None,
        read_only: bool = False,
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

        Args:
            work (Callable[[AsyncSession], Awaitable[T]]): the unit of work.
            attempts (int | None): tries in all; default the Database's (3).
            deadline (float | None): seconds to keep trying; default the Database's (15);
                a caller's cancel scope ending sooner ends it a little before that.
            retry_codes (Collection[int] | None): MySQL error numbers safe to replay;
                default the Database's (``DEFAULT_RETRY_CODES``).
            read_only (bool): ``work`` only reads: run it on a fit replica (see
                ``session()``); each attempt chooses again, so a replay after a replica
                died goes to another one. A COMMIT lost in flight is replayed only when
                the attempt ran on a replica, whose sessions are read-only (``SET SESSION
                TRANSACTION READ ONLY`` at connect); on the primary it raises
                ``CommitOutcomeUnknown`` as for any work.

        Returns:
            T: what ``work`` returned, once committed.

        Raises:
            CommitOutcomeUnknown: the connection was lost while COMMIT was in flight.
            DatabaseUnavailable: no working connection could be had within ``deadline``.
            ConfigurationError: an argument is unusable.
        """
        options = self._run_options.override(attempts, deadline, retry_codes)
        counters = self._engine_state().counters
        scope, routing = partial(self.session, read_only=read_only), self._routing
        replayable = routing.on_replica if read_only and routing is not None else None
        return await run_unit(scope, work, options, counters, mask(self.url), replayable)

    # -- observability -----------------------------------------------------------------------

    # The timeout is the point of this API (readiness probes), not a stand-in for a scope.
    async def health(self, timeout: float = DEFAULT_HEALTH_TIMEOUT) -> Health:  # noqa: ASYNC109
        """Check, within ``timeout`` seconds, that a pooled connection answers ``SELECT 1``.

        Never raises for a database problem: a failure (unreachable server, exhausted pool,
        timeout) is reported in the returned ``Health``. Meant for readiness endpoints::

            report = await db.health(timeout=1.0)
            return JSONResponse(report.as_dict(), status_code=200 if report.ok else 503)
        """
        seconds("timeout", timeout)
        return await check_health(self.engine, timeout, mask(self.url))

    def stats(self) -> Stats:
        """What asyncgone did on this Database's engine (see ``Stats``)."""
        return stats(self.engine)

    def _engine_state(self) -> EngineState:
        state = state_of(self.engine)
        assert state is not None  # the engine is asyncgone's own
        return state


def _engine_for(bind: AsyncEngine | str | URL | None) -> tuple[AsyncEngine, bool]:
    """Return the engine for ``bind`` and whether the caller owns (and must dispose) it."""
    if isinstance(bind, AsyncEngine):
        return bind, False
    return create_engine(bind), True


@asynccontextmanager
async def managed_session(
    bind: AsyncEngine | Database | str | URL | None = None, **session_options: Any
) -> AsyncIterator[AsyncSession]:
    """Open an ``AsyncSession`` that commits on success and rolls back on any error.

    The original error is always the one re-raised. Cleanup is bounded and survives
    cancellation, so the connection always returns to the pool (or is discarded when dead).
    A connection lost while COMMIT was in flight raises ``CommitOutcomeUnknown``::

        async with asyncgone.managed_session(engine) as session:
            session.add(Order(id=1))
        async with asyncgone.managed_session() as session:  # engine from $DATABASE_URL,
            ...  # disposed on exit

    Args:
        bind (AsyncEngine | Database | str | URL | None): an engine, a started
            ``Database``, a URL, or ``None`` for ``$DATABASE_URL``. An engine made here from
            a URL is disposed when the block exits.
        **session_options: ``AsyncSession`` keywords; ``expire_on_commit`` defaults to False.

    Raises:
        CommitOutcomeUnknown: the connection was lost while COMMIT was in flight.
        ConfigurationError: ``bind`` is an unusable URL.
    """
    if isinstance(bind, Database):
        async with bind.session(**session_options) as session:
            yield session
        return
    if session_options:
        check_session_options(session_options)
    engine, owned = _engine_for(bind)
    try:
        async with SessionScope(engine, session_options) as session:
            yield session
    finally:
        if owned:
            # Both steps within DEFAULT_CLEANUP_TIMEOUT in all.
            await drain_and_dispose(engine, DEFAULT_CLEANUP_TIMEOUT / 2)
