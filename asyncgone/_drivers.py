"""What asyncgone needs from a driver connection, for aiomysql and asyncmy alike.

The drivers expose their stream state only through private attributes, so every such access
lives here, behind small functions, and degrades to "unknown" when a driver version is
shaped differently: asyncgone then falls back to a bounded ping instead of guessing.

Two connection shapes exist:

- asyncio streams (aiomysql, asyncmy < 0.2.11): ``_reader`` (a ``StreamReader``) and
  ``_writer`` (a ``StreamWriter``);
- a buffered protocol (asyncmy >= 0.2.11): ``_proto`` with ``eof``/``exc``/``length``/``pos``
  and ``_transport``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import select
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ._waits import bounded

__all__ = [
    "abort",
    "bounded_connector",
    "close",
    "execute",
    "fetch_row",
    "is_closed",
    "is_tcp",
    "last_usage",
    "ping",
    "thread_id",
    "transaction_ended",
    "transport_socket",
]

_SERVER_STATUS_IN_TRANS = 1
_MISSING = object()

# poll(2) rather than select(2), which fails on descriptors above 1023. Readable, hung up or
# in error all mean the same for an idle connection: it cannot be handed out.
_poll = getattr(select, "poll", None)
_POLL_EVENTS = getattr(select, "POLLIN", 1) | getattr(select, "POLLPRI", 2)


def _transport(conn: Any) -> asyncio.BaseTransport | None:
    transport = getattr(conn, "_transport", None)
    if transport is not None:
        return transport  # type: ignore[no-any-return]
    writer = getattr(conn, "_writer", None)
    return getattr(writer, "transport", None)


def is_closed(conn: Any) -> bool:
    """Tell, without a round trip, whether an idle connection can no longer be used.

    True when the server closed it (FIN or RST), when unsolicited bytes arrived (e.g.
    MySQL's 4031 idle-timeout error packet), or when the driver closed it itself. Both what
    the event loop already read and what still waits in the kernel count: a loop kept busy
    (or blocked) since the server hung up has not read the FIN yet. False when the
    connection looks healthy or the driver's shape is unknown.
    """
    proto = getattr(conn, "_proto", None)
    if proto is not None:
        transport = getattr(conn, "_transport", None)
        return bool(
            transport is None
            or transport.is_closing()
            or proto.eof
            or proto.exc is not None
            or proto.length > proto.pos
            or _readable(transport)
        )
    if hasattr(conn, "_proto"):  # buffered-protocol shape, closed by the driver
        return True
    if not hasattr(conn, "_reader"):
        return False  # unknown shape: no passive check possible
    reader, writer = conn._reader, getattr(conn, "_writer", None)
    if reader is None or writer is None:
        return True
    return bool(
        reader.at_eof()
        or reader.exception() is not None
        # aiomysql's reader records EOF even while unread data (an error packet) remains.
        or getattr(reader, "eof_received", False)
        or getattr(reader, "_buffer", None)
        or writer.transport.is_closing()
        or _readable(writer.transport)
    )


def _readable(transport: asyncio.BaseTransport) -> bool:
    """Whether the kernel holds bytes or EOF for an idle connection's socket (one poll(2))."""
    sock = transport.get_extra_info("socket")
    if sock is None or _poll is None:
        return False
    try:
        poller = _poll()
        poller.register(sock.fileno(), _POLL_EVENTS)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # the socket is being torn down
        return True


def transaction_ended(conn: Any) -> bool:
    """Tell whether the server's last reply says no transaction is open and nothing is pending.

    Only a connection opened by ``bounded_connector`` can tell (see ``_StatusTracking``): its
    ``server_status`` is known current when the last command sent (COMMIT, ROLLBACK, PING)
    was answered by an OK packet. Neither driver records an error reply: a statement that
    fails leaves the flags of the reply before it, which may well be a COMMIT's, although
    the failed statement opened a transaction on the server and may hold its locks. A
    statement answered with a result (rows or OK) leaves a result object behind. False
    whenever unsure, so that the ROLLBACK is sent.
    """
    if getattr(conn, "_asyncgone_status_current", False) is not True:
        return False
    result = getattr(conn, "_result", _MISSING)
    status = getattr(conn, "server_status", None)
    if result is not None or not isinstance(status, int):
        return False
    return not status & _SERVER_STATUS_IN_TRANS


class _StatusTracking:
    """Mixed into a driver's ``Connection``: records whether ``server_status`` is current.

    Both drivers send every command through ``_execute_command`` and read the OK packet
    that answers COMMIT, ROLLBACK, BEGIN and PING through ``_read_ok_packet``, which copies
    its status flags. An error reply raises from inside the read and copies nothing, so the
    flags are current exactly when the last command's ``_read_ok_packet`` returned. (asyncmy's
    prepared-statement fast path, which writes to the socket itself, runs only for its own
    class with ``_execute_command`` untouched, so not for this one.)
    """

    _asyncgone_status_current = False

    def _execute_command(self, command: int, sql: Any) -> Awaitable[None]:
        # Whatever the reply turns out to be, the flags held so far describe an earlier one.
        # Not a coroutine itself: handing back the driver's saves a frame on every command.
        self._asyncgone_status_current = False
        return super()._execute_command(command, sql)  # type: ignore[misc,no-any-return]

    async def _read_ok_packet(self, *args: Any, **kwargs: Any) -> Any:
        ok = await super()._read_ok_packet(*args, **kwargs)  # type: ignore[misc]
        self._asyncgone_status_current = True
        return ok


@functools.cache
def _status_tracking(connection_class: type) -> type:
    """Return ``connection_class`` with ``_StatusTracking`` mixed in, if it has the shape."""
    # A driver version that sends or reads differently keeps its own class: its connections
    # never claim a finished transaction, and returning one always costs a ROLLBACK.
    if not all(
        inspect.iscoroutinefunction(getattr(connection_class, name, None))
        for name in ("_execute_command", "_read_ok_packet")
    ):
        return connection_class
    return type(
        connection_class.__name__,
        (_StatusTracking, connection_class),
        {"__module__": connection_class.__module__},
    )


def last_usage(conn: Any) -> float | None:
    """Return when the driver last created a cursor, on ``time.monotonic()``'s clock."""
    usage = getattr(conn, "last_usage", None)
    loop = getattr(conn, "_loop", None)
    if not isinstance(usage, float) or loop is None:
        return None
    # Both drivers stamp loop.time(); asyncio's and uvloop's clocks are monotonic, but not
    # promised to share time.monotonic()'s origin, so convert through the current offset.
    return usage - float(loop.time()) + time.monotonic()


def transport_socket(conn: Any) -> Any:
    """Return the connection's socket (or uvloop's socket-like object), or None."""
    transport = _transport(conn)
    if transport is None:
        return None
    return transport.get_extra_info("socket")


def abort(conn: Any) -> None:
    """Close the connection's socket at once, without a QUIT round trip or a write flush.

    Used on connections already judged dead, so that SQLAlchemy's own close afterwards has
    nothing to wait for on a network path that may not answer.
    """
    transport = _transport(conn)
    if transport is not None and isinstance(transport, asyncio.WriteTransport):
        transport.abort()
    close = getattr(conn, "close", None)
    if close is not None:
        close()


async def ping(conn: Any) -> None:
    """Send COM_PING and wait for the answer, never reconnecting."""
    await conn.ping(False)


async def _cursor(conn: Any) -> Any:
    cursor = conn.cursor()
    if inspect.isawaitable(cursor):  # aiomysql: cursor() returns an awaitable
        cursor = await cursor
    return cursor


async def fetch_row(conn: Any, sql: str) -> tuple[Any, ...] | None:
    """Run one query on the raw driver connection and return its first row."""
    cursor = await _cursor(conn)
    try:
        await cursor.execute(sql)
        row = await cursor.fetchone()
    finally:
        await cursor.close()
    return None if row is None else tuple(row)


async def execute(conn: Any, sql: str) -> None:
    """Run one statement that returns no rows on the raw driver connection."""
    cursor = await _cursor(conn)
    try:
        await cursor.execute(sql)
    finally:
        await cursor.close()


async def close(conn: Any, timeout: float) -> None:
    """Close politely (COM_QUIT) within ``timeout``, else abort the socket; never fails."""
    try:
        await bounded(conn.ensure_closed(), timeout)
    except asyncio.CancelledError:
        abort(conn)
        raise
    except Exception:
        abort(conn)


def thread_id(conn: Any) -> int | None:
    """Return the server's id for this connection (``CONNECTION_ID()``), or None."""
    ids = getattr(conn, "server_thread_id", None)
    return ids[0] if ids else None


def is_tcp(sock: Any) -> bool:
    """Tell whether a (pseudo)socket is TCP over IPv4/IPv6."""
    return getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6)


def bounded_connector(driver: str, timeout: float) -> Callable[..., Awaitable[Any]]:
    """Return a ``connect(**kwargs)`` for ``driver`` that gives up after ``timeout`` seconds.

    The drivers' own ``connect_timeout`` covers opening the TCP connection only: a server or
    proxy that accepts the connection and never sends its greeting hangs them forever. This
    bounds the whole handshake, closes the half-open socket on timeout or cancellation
    (aiomysql leaves it open), and raises the driver's error 2003, as a refused connection
    would. Its connections also track whether their status flags are current, which
    ``transaction_ended`` needs.
    """
    if driver == "aiomysql":
        from aiomysql import Connection
        from pymysql.err import OperationalError
    else:
        from asyncmy.connection import Connection
        from asyncmy.errors import OperationalError
    connection_class = _status_tracking(Connection)

    async def connect(*args: Any, **kwargs: Any) -> Any:
        conn = connection_class(*args, **kwargs)
        opening = conn._connect() if driver == "aiomysql" else conn.connect()
        try:
            await bounded(opening, timeout)
        except TimeoutError:
            conn.close()
            host = kwargs.get("host") or kwargs.get("unix_socket") or "localhost"
            raise OperationalError(
                2003,
                f"Can't connect to MySQL server on {host!r}: no server greeting within "
                f"{timeout:g} s (connect_timeout)",
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    return connect
