"""What asyncgone needs from a driver connection, and every use of the drivers' private state.

The drivers expose their stream state only through private attributes, so each such access
lives here, chosen once per driver from the shape of its first connection (``learn``), never
from a version number. Two shapes are known:

- asyncio streams (aiomysql, asyncmy < 0.2.13): ``_reader`` (a ``StreamReader``) and
  ``_writer`` (a ``StreamWriter``);
- a buffered protocol (asyncmy >= 0.2.13): ``_proto`` with ``eof``/``exc``/``length``/``pos``
  and ``_transport``.

A connection of any other shape (a driver upgrade that renamed an attribute, a third-party
async MySQL dialect) gets one WARNING naming the driver and its version, and asyncgone falls
back to what its documentation promises for that case: a bounded ping at every checkout,
and a ROLLBACK at every return.

asyncgone does not subclass or patch the drivers' classes: asyncmy (0.2.18) takes the fast
path of its prepared statements only for its own ``Connection`` class with its own command
methods. The one thing asyncgone wraps, per connection, is ``cursor()`` (``count_cursors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import socket
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.util import greenlet_spawn

from ._compat import drop_closed_loop_socket, running_loop
from ._waits import LOOP_CLOCK_TICK, bounded
from ._watch import WATCHES, Closed, Poll, poll_once, watch_unknown

__all__ = [
    "CursorCount",
    "DriverSupport",
    "abandon_stream",
    "abort_connection",
    "connect_error",
    "drop_read_result",
    "is_tcp",
    "new_connection",
    "support_for",
    "thread_id",
    "transport",
    "transport_socket",
]

log = logging.getLogger("asyncgone")

_SERVER_STATUS_IN_TRANS = 1


_KNOWN = ("aiomysql", "asyncmy")


class Shape(enum.Enum):
    """How a driver connection holds its stream."""

    STREAMS = "streams"
    BUFFERED = "buffered"
    UNKNOWN = "unknown"


def shape_of(conn: Any) -> Shape:
    """Tell a driver connection's shape from its attributes."""
    proto = getattr(conn, "_proto", None)
    if (
        proto is not None
        and all(hasattr(proto, a) for a in ("eof", "exc", "length", "pos"))
        and hasattr(conn, "_transport")
    ):
        return Shape.BUFFERED
    reader = getattr(conn, "_reader", None)
    if (
        reader is not None
        and all(hasattr(reader, a) for a in ("at_eof", "exception"))
        and hasattr(getattr(conn, "_writer", None), "transport")
    ):
        return Shape.STREAMS
    return Shape.UNKNOWN


def _transport(conn: Any) -> Any:
    transport = getattr(conn, "_transport", None)
    if transport is not None:
        return transport
    return getattr(getattr(conn, "_writer", None), "transport", None)


def _driver_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown version"


class DriverSupport:
    """What asyncgone can do with the connections of one dialect's driver."""

    def __init__(self, dialect: Dialect) -> None:
        self.name = str(dialect.driver)
        self._dialect = dialect
        self._shape: Shape | None = None
        # Until a connection shows otherwise, assume the socket can be checked for free.
        self.passive_check = True
        self._watch: Callable[[Poll | None, Any], Closed] = watch_unknown

    # -- shape -------------------------------------------------------------------------------

    def learn(self, conn: Any) -> None:
        """Decide, from the first connection, how to inspect this driver's connections."""
        if self._shape is not None:
            return
        shape = shape_of(conn)
        self._shape = shape
        self._watch = WATCHES[shape.value]
        if shape is Shape.UNKNOWN:
            self.passive_check = False
            module = type(conn).__module__.split(".")[0]
            log.warning(
                "asyncgone does not recognise the connections of the %s driver (%s %s): it "
                "cannot see a closed socket without a round trip, so every checkout of a "
                "reused connection is pinged (bounded by ping_timeout) and every return "
                "rolls back",
                self.name,
                module,
                _driver_version(module),
            )

    def is_closed(self, conn: Any) -> bool:
        """Tell, without a round trip, whether an idle connection can no longer be used."""
        transport = _transport(conn)
        return self._watch(poll_once(transport), transport)(conn, True)

    def watch(self, conn: Any) -> Closed:
        """``is_closed`` for one connection, its poll object made once: for the checkout,
        which asks it at every reuse."""
        transport = _transport(conn)
        return self._watch(poll_once(transport), transport)

    @property
    def shape(self) -> Shape | None:
        """The shape learnt from the first connection (None before it)."""
        return self._shape

    # -- status flags ------------------------------------------------------------------------

    def count_cursors(self, conn: Any) -> CursorCount | None:
        """Make ``conn`` count the cursors it creates; return the count (None when the
        connection's shape is unknown).

        Every statement needs a cursor, whether SQLAlchemy, the application or asyncmy's
        prepared-statement path sends it; COMMIT, ROLLBACK and ping need none. The count is
        kept by wrapping the instance's ``cursor`` method: the driver's class and its
        command methods are untouched, which asyncmy 0.2.18 requires of a connection before
        it takes its prepared statements' fast path.
        """
        if self._shape is Shape.UNKNOWN:
            return None
        counts = getattr(getattr(conn, "cursor", None), "counts", None)
        return counts if isinstance(counts, CursorCount) else _counting_cursor(conn)

    def streaming(self, conn: Any) -> bool:
        """Whether an unbuffered result (a server-side cursor, ``session.stream()``) is
        still being read: sending anything now would first read all its remaining rows."""
        # aiomysql keeps a bool, asyncmy (a Cython class) an int.
        return bool(getattr(getattr(conn, "_result", None), "unbuffered_active", False))

    @staticmethod
    def transaction_ended(conn: Any, cursors: CursorCount | None, ended_at: int | None) -> bool:
        """Tell whether no transaction can be open: SQLAlchemy ended one when ``conn`` had
        created ``ended_at`` cursors, it created none since, and the driver's last reply
        agrees (no pending result, no "in transaction" status flag; both drivers clear the
        result when they send a command). False whenever unsure."""
        if cursors is None or cursors.count != ended_at:
            return False
        status = getattr(conn, "server_status", None)
        if getattr(conn, "_result", True) is not None or not isinstance(status, int):
            return False
        return not status & _SERVER_STATUS_IN_TRANS

    def last_usage(self, conn: Any) -> float | None:
        """Return when the driver last created a cursor, on ``time.monotonic()``'s clock."""
        usage = getattr(conn, "last_usage", None)
        loop = getattr(conn, "loop", None)
        if not isinstance(usage, float) or loop is None:
            return None
        # Both drivers stamp loop.time(); asyncio's and uvloop's clocks are monotonic, but
        # not promised to share time.monotonic()'s origin: convert through the current offset,
        # less uvloop's tick (its clock moves in milliseconds): never later than the truth.
        return usage - float(loop.time()) + time.monotonic() - LOOP_CLOCK_TICK

    # -- sockets and closing -----------------------------------------------------------------

    def transport_socket(self, conn: Any) -> Any:
        """Return the connection's socket (or uvloop's socket-like object), or None."""
        return transport_socket(conn)

    def abort(self, conn: Any) -> None:
        """Close the connection's socket at once, without a QUIT round trip or a flush.

        Used on connections already judged dead, so that SQLAlchemy's own close afterwards
        has nothing to wait for on a network path that may not answer.
        """
        abort_connection(conn)

    def tls_transport(self, conn: Any) -> Any:
        """The connection's transport if it speaks TLS, else None."""
        transport = _transport(conn)
        if transport is None or transport.get_extra_info("ssl_object") is None:
            return None
        return transport

    def foreign(self, conn: Any) -> bool:
        """Whether ``conn`` belongs to an event loop other than the running one, or to a
        closed one: it can neither be used nor closed politely from here."""
        loop = getattr(conn, "loop", None)
        if not isinstance(loop, asyncio.AbstractEventLoop):
            return False
        if loop.is_closed():
            return True
        running = running_loop()
        return running is not None and loop is not running

    def release_foreign(self, conn: Any) -> None:
        """Let go of a connection that belongs to another or a closed event loop.

        A live loop (another thread's) is asked to abort it itself. Of a closed loop's
        transport only the socket is closed, by hand: every transport method would call
        into the closed loop and fail, and the transport would warn about its open socket
        when collected. uvloop closes its own transports when its loop closes.
        """
        loop = getattr(conn, "loop", None)
        transport = _transport(conn)
        if transport is not None and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(transport.abort)
            except RuntimeError:  # it closed meanwhile
                drop_closed_loop_socket(transport)
        elif transport is not None:
            drop_closed_loop_socket(transport)
        # The driver's own finalizer would try to close it again, on the closed loop.
        for name in ("_writer", "_reader", "_transport"):
            if getattr(conn, name, None) is not None:
                with contextlib.suppress(AttributeError):  # a read-only (Cython) attribute
                    setattr(conn, name, None)

    # -- ending transactions -----------------------------------------------------------------

    async def rollback(self, conn: Any) -> None:
        """ROLLBACK on the driver connection."""
        await _maybe_await(conn.rollback())

    async def commit(self, conn: Any) -> None:
        """COMMIT on the driver connection."""
        await _maybe_await(conn.commit())

    # -- opening -----------------------------------------------------------------------------

    @property
    def known(self) -> bool:
        """Whether asyncgone knows how to open this driver's connections itself."""
        return self.name in _KNOWN

    async def open_with_dialect(self, params: dict[str, Any], timeout: float) -> Any:
        """Open a raw driver connection through the dialect (for drivers asyncgone does not
        know), bounded; return the driver's connection."""
        adapted = await bounded(greenlet_spawn(self._dialect.connect, **params), timeout)
        return adapted.driver_connection


class CursorCount:
    """How many cursors a driver connection has created (``count``)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


_NO_KIND = object()  # ``cursor()`` called without a cursor class


def _counting_cursor(conn: Any) -> CursorCount:
    """Replace ``conn.cursor`` on the instance with a function that counts its calls.

    A plain function, not a callable object (an instance call costs a type lookup more per
    statement), holding the connection weakly: a bound method kept on the instance would
    make every connection a reference cycle, freed only by the garbage collector.
    """
    counts = CursorCount()
    ref = weakref.ref(conn)
    cursor = type(conn).cursor

    def counted(kind: Any = _NO_KIND, /, *args: Any, **kwargs: Any) -> Any:
        counts.count += 1
        # What SQLAlchemy's adapters call, a bare cursor() (asyncmy) or one cursor class
        # (aiomysql), is a plain call, which CPython makes without unpacking arguments.
        if kind is _NO_KIND:
            return cursor(ref(), **kwargs) if kwargs else cursor(ref())
        if args or kwargs:
            return cursor(ref(), kind, *args, **kwargs)
        return cursor(ref(), kind)

    counted.counts = counts  # type: ignore[attr-defined]
    conn.cursor = counted
    return counts


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


def support_for(dialect: Dialect) -> DriverSupport:
    """Return the ``DriverSupport`` for an engine's dialect (one per engine)."""
    return DriverSupport(dialect)


def transport(conn: Any) -> Any:
    """A driver connection's asyncio transport (TLS included), or None once closed."""
    return _transport(conn)


def abort_connection(conn: Any) -> None:
    """Close a driver connection's socket at once, then let the driver mark it closed."""
    transport = _transport(conn)
    if transport is not None and isinstance(transport, asyncio.WriteTransport):
        transport.abort()
    if callable(getattr(conn, "close", None)):
        conn.close()


def transport_socket(conn: Any) -> Any:
    """Return a driver connection's socket (or uvloop's socket-like object), or None."""
    transport = _transport(conn)
    return None if transport is None else transport.get_extra_info("socket")


def thread_id(conn: Any) -> int | None:
    """Return the server's id for this connection (``CONNECTION_ID()``), or None."""
    ids = getattr(conn, "server_thread_id", None)
    return ids[0] if ids else None


def drop_read_result(conn: Any) -> None:
    """Forget the driver's last result once it was read to its end (``_result``), as the
    driver itself does when it sends its next command: after asyncgone's own query that
    ends a transaction's work (the GTID read after COMMIT), the return to the pool then
    needs no ``ROLLBACK`` (see ``DriverSupport.transaction_ended``)."""
    result = getattr(conn, "_result", None)
    if result is not None and not getattr(result, "unbuffered_active", True):
        conn._result = None


def abandon_stream(conn: Any) -> None:
    """Mark the result ``conn`` was still reading as done, once ``conn`` is discarded:
    asyncmy 0.2.10's result finishes an unfinished one when it is garbage-collected, by
    calling a coroutine nobody awaits (a ``RuntimeWarning``), on a socket already closed."""
    result = getattr(conn, "_result", None)
    if result is not None and getattr(result, "unbuffered_active", False):
        with contextlib.suppress(AttributeError, TypeError):  # a read-only attribute
            result.unbuffered_active = False


def is_tcp(sock: Any) -> bool:
    """Tell whether a (pseudo)socket is TCP over IPv4/IPv6."""
    return getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6)


def new_connection(driver: str, *args: Any, **kwargs: Any) -> tuple[Any, Awaitable[None]]:
    """Create an aiomysql or asyncmy connection and return it with the coroutine that opens
    it: the caller bounds the handshake and can close the half-open socket on a timeout
    (aiomysql's own ``connect()`` leaves it open when cancelled)."""
    if driver == "aiomysql":
        from aiomysql import Connection

        conn = Connection(*args, **kwargs)
        return conn, conn._connect()
    from asyncmy.connection import Connection as AsyncmyConnection

    conn = AsyncmyConnection(*args, **kwargs)
    return conn, conn.connect()


def pymysql_ssl_context(settings: dict[str, Any]) -> ssl.SSLContext | None:
    """The ``ssl.SSLContext`` PyMySQL makes from a dict of TLS settings (its private
    ``Connection._create_ssl_ctx``, which takes no state of the connection), or None when
    this PyMySQL has none. Raises what PyMySQL raises (``ssl.SSLError``, ``OSError``)."""
    try:
        from pymysql.connections import Connection
    except ImportError:
        return None
    make = getattr(Connection, "_create_ssl_ctx", None)
    if make is None:
        return None
    context = make(None, settings)
    return context if isinstance(context, ssl.SSLContext) else None


def connect_error(driver: str) -> type[Exception]:
    """The driver's ``OperationalError`` class."""
    if driver == "aiomysql":
        from pymysql.err import OperationalError
    else:
        from asyncmy.errors import OperationalError
    error: type[Exception] = OperationalError
    return error
