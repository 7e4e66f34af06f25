"""Helpers for tests that talk to a real server: administration, counters, warm pools."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import anyio
import anyio.to_thread
import pymysql
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

# Server status counters that count round trips; see FIELD_NOTES section 6.
ROUND_TRIP_COUNTERS = (
    "Questions",
    "Com_admin_commands",
    "Com_commit",
    "Com_rollback",
    "Connections",
)


@dataclasses.dataclass(frozen=True)
class Server:
    """Where a MariaDB server listens, and administration over a separate sync connection."""

    host: str
    port: int
    user: str = "root"
    password: str = ""
    database: str = "test"

    def url(self, driver: str, **query: str) -> str:
        auth = self.user if not self.password else f"{self.user}:{self.password}"
        tail = "&".join(f"{k}={v}" for k, v in query.items())
        return f"mysql+{driver}://{auth}@{self.host}:{self.port}/{self.database}" + (
            f"?{tail}" if tail else ""
        )

    @contextlib.contextmanager
    def admin(self) -> Iterator[Any]:
        conn = pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=self.database,
            autocommit=True,
            connect_timeout=5,
        )
        try:
            yield conn.cursor()
        finally:
            conn.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with self.admin() as cur:
            cur.execute(sql)
            return list(cur.fetchall())

    def kill(self, *thread_ids: int) -> None:
        """KILL CONNECTION each id, as an administrator or pt-kill would."""
        with self.admin() as cur:
            for thread_id in thread_ids:
                cur.execute(f"KILL CONNECTION {int(thread_id)}")

    def threads(self) -> set[int]:
        """Ids of every client connection the server has now."""
        return {int(row[0]) for row in self.query("SELECT ID FROM information_schema.PROCESSLIST")}

    def status(self, names: Sequence[str] = ROUND_TRIP_COUNTERS) -> dict[str, int]:
        """Global status counters; compare two readings with ``delta()``."""
        rows = self.query("SHOW GLOBAL STATUS")
        values = {name: int(value) for name, value in rows if name in names}
        return {name: values[name] for name in names}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counter differences between two ``Server.status()`` readings, net of the reading."""
    return {name: after[name] - before[name] - _READ_COST.get(name, 0) for name in before}


# What one status reading adds to the counters (its own connection and statements), measured
# once from two back-to-back readings of a quiet server rather than assumed.
_READ_COST: dict[str, int] = {}


def calibrate(server: Server) -> None:
    if not _READ_COST:
        first, second = server.status(), server.status()
        _READ_COST.update({name: second[name] - first[name] for name in first})


async def connection_id(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT CONNECTION_ID()"))).scalar_one())


async def warm(engine: AsyncEngine, n: int) -> list[int]:
    """Open ``n`` pooled connections at once and return them to the pool; return their ids."""
    async with contextlib.AsyncExitStack() as stack:
        ids = []
        for _ in range(n):
            conn = await stack.enter_async_context(engine.connect())
            ids.append(int((await conn.execute(text("SELECT CONNECTION_ID()"))).scalar_one()))
            await conn.commit()
    return ids


async def wait_until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll ``predicate`` (run in a thread: it may block) until true; fail after ``limit`` s."""
    with anyio.fail_after(limit):
        # Polling is the point: the condition lives in another process (the server).
        while not await anyio.to_thread.run_sync(predicate):  # noqa: ASYNC110
            await anyio.sleep(0.05)


@contextlib.contextmanager
def count_errors(engine: AsyncEngine) -> Iterator[list[BaseException]]:
    """Collect every exception SQLAlchemy reports through ``handle_error`` while active."""
    seen: list[BaseException] = []

    def on_error(ctx: Any) -> None:
        seen.append(ctx.original_exception)

    event.listen(engine.sync_engine, "handle_error", on_error)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "handle_error", on_error)


#: For control tests running plain SQLAlchemy into a fault. With uvloop, SQLAlchemy does not
#: recognise the closed-transport RuntimeError and leaves that connection to the garbage
#: collector; SQLAlchemy 2.0 does the same with a checkout cancelled during pre-ping. The
#: collector then warns. That leak is part of what the control demonstrates; such tests do
#: not fail on it (conftest collects garbage after every test, so the warning is theirs).
plain_sqlalchemy_may_leak = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning",
    "ignore::ResourceWarning",
    "ignore::sqlalchemy.exc.SAWarning",
)


@contextlib.asynccontextmanager
async def plain_sqlalchemy_loop_errors_tolerated() -> AsyncIterator[list[BaseException]]:
    """Collect, instead of failing on, what plain SQLAlchemy's shielded close reports to the loop.

    A control engine whose graceful close was cancelled leaves a shielded close (asyncmy's
    ``ensure_closed`` waiting on its transport) failing later with the peer's reset; the loop's
    exception handler reports it and anyio's test runner would fail the control on it. Use it
    outermost, around the proxy too. Only connection errors and cancellations are tolerated;
    anything else still reaches the previous handler.
    """
    import asyncio
    import gc

    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    seen: list[BaseException] = []

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, (ConnectionError, OSError, asyncio.CancelledError)):
            seen.append(error)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    try:
        yield seen
    finally:
        # Let the loop see the resets that closing the engine and the proxy caused, and the
        # collector report what they abandoned, while the handler is still ours.
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.1)
        gc.collect()
        loop.set_exception_handler(previous)


async def eventually(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll a cheap in-process ``predicate`` until true; fail after ``limit`` seconds."""
    with anyio.fail_after(limit):
        # Polling is the point: the condition is a counter another task updates.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.02)
