"""asyncgone's own statements on a raw driver connection: queries, pings, polite closes.

Through the drivers' public API only (``cursor()``, ``ping()``, ``ensure_closed()``), which
aiomysql and asyncmy share, so that asyncgone's server-facts query, its pings and its
``KILL QUERY`` work the same on both, and on another async driver of the same API. A
driver whose ``cursor()`` or ``fetchone()`` are plain functions rather than coroutines is
served as well.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from ._drivers import abort_connection
from ._waits import bounded

__all__ = ["close", "execute", "fetch_dict", "fetch_row", "fetch_rows", "ping"]


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def ping(conn: Any) -> None:
    """Send COM_PING and wait for the answer, never reconnecting."""
    await _maybe_await(conn.ping(False))


async def _cursor(conn: Any) -> Any:
    return await _maybe_await(conn.cursor())  # aiomysql: cursor() returns an awaitable


async def _run(conn: Any, sql: str, read: Callable[[Any], Any]) -> Any:
    """Run ``sql`` on a cursor of the raw driver connection; return what ``read(cursor)``
    gives (awaited if it is awaitable); the cursor is closed either way."""
    cursor = await _cursor(conn)
    try:
        await cursor.execute(sql)
        return await _maybe_await(read(cursor))
    finally:
        await _maybe_await(cursor.close())


async def fetch_row(conn: Any, sql: str) -> tuple[Any, ...] | None:
    """Run one query on the raw driver connection and return its first row."""
    row = await _run(conn, sql, lambda cursor: cursor.fetchone())
    return None if row is None else tuple(row)


async def fetch_rows(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    """Run one query on the raw driver connection and return all its rows."""
    rows = await _run(conn, sql, lambda cursor: cursor.fetchall())
    return [tuple(row) for row in rows]


async def fetch_dict(conn: Any, sql: str) -> dict[str, Any] | None:
    """Run one query on the raw driver connection; return its first row by column name."""

    async def named_row(cursor: Any) -> dict[str, Any] | None:
        row = await _maybe_await(cursor.fetchone())
        names = [column[0] for column in cursor.description or ()]
        return None if row is None else dict(zip(names, row, strict=False))

    result: dict[str, Any] | None = await _run(conn, sql, named_row)
    return result


async def execute(conn: Any, sql: str) -> None:
    """Run one statement that returns no rows on the raw driver connection."""
    await _run(conn, sql, lambda cursor: None)


async def close(conn: Any, timeout: float) -> None:
    """Close politely (COM_QUIT) within ``timeout``, else abort the socket; never fails."""
    try:
        await bounded(conn.ensure_closed(), timeout)
    except asyncio.CancelledError:
        abort_connection(conn)
        raise
    except Exception:
        abort_connection(conn)
