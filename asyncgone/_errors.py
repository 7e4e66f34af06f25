"""asyncgone's exceptions and the disconnect classification used everywhere.

Exception tree::

    AsyncGoneError                      root of everything asyncgone raises itself
    ├── ConfigurationError (ValueError) a bad URL, driver or option: fix the call
    ├── CommitOutcomeUnknown            the connection was lost while COMMIT was in flight:
    │                                   it may or may not have been applied; never replayed
    └── DatabaseUnavailable             no working connection could be had within a deadline

    ConfigurationWarning (UserWarning)  a setting that works against the server's limits

Errors that come from the database (``sqlalchemy.exc.OperationalError`` and friends) are
never replaced by asyncgone exceptions: they reach the caller as SQLAlchemy raised them.

Classification answers two questions about an exception: is the connection it happened on
gone (``is_disconnect``), and is that a fact about this one connection or about the whole
server (``disconnect_scope``)? SQLAlchemy's own list misses several ways MySQL and MariaDB
connections die; the additions are listed next to each constant below.
"""

from __future__ import annotations

import enum

from sqlalchemy import exc as sa_exc

__all__ = [
    "CAPACITY_CODES",
    "DEFAULT_RETRY_CODES",
    "REFUSAL_CODES",
    "SERVER_REFUSALS",
    "AsyncGoneError",
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "ConfigurationWarning",
    "DatabaseUnavailable",
    "Scope",
    "add_note",
    "describe",
    "disconnect_scope",
    "error_code",
    "is_aftermath",
    "is_disconnect",
    "is_node_not_ready",
    "is_read_only_refusal",
    "is_refusal",
    "is_unavailable",
]

#: Server errors after which a unit of work is rolled back and safe to run again: deadlock
#: (1213) and lock wait timeout (1205). Disconnects before COMMIT are always replayable.
DEFAULT_RETRY_CODES: frozenset[int] = frozenset({1205, 1213})


class AsyncGoneError(Exception):
    """Root of the exceptions asyncgone raises itself."""


class ConfigurationError(AsyncGoneError, ValueError):
    """A URL, driver or option given to asyncgone is unusable; the message says what to change."""


class CommitOutcomeUnknown(AsyncGoneError):
    """The connection was lost while COMMIT was in flight.

    The server may have committed the transaction or not; nothing on the client can tell.
    asyncgone never replays such a unit of work. The driver's error is the ``__cause__``.
    Check the data (or make the work idempotent) before running it again.
    """


class DatabaseUnavailable(AsyncGoneError):
    """No working connection could be had within the deadline.

    The message names the target (password masked) and the last error, which is also the
    ``__cause__``.
    """


class ConfigurationWarning(UserWarning):
    """A setting works against the server's own limits (e.g. recycle above ``wait_timeout``)."""


class Scope(enum.Enum):
    """How far a disconnect reaches."""

    CONNECTION = "connection"  # replace this connection only
    SERVER = "server"  # every pooled connection is suspect: invalidate the pool


# Client and server codes that mean "this connection is gone". SQLAlchemy knows 1927, 2006,
# 2013, 2014, 2045, 2055 and 4031; 1153 is added because the server closes the connection
# right after sending it (a statement above max_allowed_packet), so the rollback that follows
# fails with a 2013 that would hide the real error. 1927 (ER_CONNECTION_KILLED) is what
# MariaDB sends to a connection killed by KILL CONNECTION: one connection, not the server.
_CONNECTION_CODES = frozenset({1153, 1927, 2006, 2013, 2014, 2045, 2055, 4031})

# Codes that speak for the whole server: it is shutting down (1053), or it was demoted to
# read-only in a failover (1836; 1290 only with a read-only message, as 1290 also reports
# --secure-file-priv and similar options). A restart without either code shows up as
# several connections dying together, which the connection policy escalates as well.
_READ_ONLY_MODE = 1836
_SERVER_CODES = frozenset({1053, _READ_ONLY_MODE})
_READ_ONLY_OPTION = 1290

# A Galera node that may not serve (not Synced, out of the primary component, rejecting
# queries) answers 1047 with a "WSREP" message on a socket that stays open: the node, not
# the connection (1047 without it is MySQL's "unknown command", a protocol error).
_NODE_NOT_READY = 1047

# Driver messages for a connection that is closed or desynchronised. The first five are
# SQLAlchemy's; the rest are asyncgone's additions, seen with aiomysql and asyncmy.
_CONNECTION_MESSAGES = (
    "(0, '')",
    "already closed",
    "connection was killed",
    "not connected",
    "network operation failed",
    "cancelled during execution",  # the driver closed its socket when a read was cancelled
    "packet sequence number wrong",  # an unsolicited packet (e.g. 4031) desynchronised it
    "lost connection to mysql server",
    "mysql server has gone away",
)


# Errors from using a connection the driver has already closed on its own side (after an
# earlier failure or a cancellation): consequences of a loss already seen, not new evidence
# that the server or the network failed.
_AFTERMATH_MESSAGES = (
    "cancelled during execution",
    "not connected",
    "already closed",
    "network operation failed",  # asyncmy: an attribute of its closed stream is gone
    "(0, '')",
)


def is_aftermath(exc: BaseException) -> bool:
    """Tell whether ``exc`` comes from reusing a connection the driver had already closed."""
    inner = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    text = str(inner).lower()
    return any(message in text for message in _AFTERMATH_MESSAGES)


def error_code(exc: BaseException) -> int | None:
    """Return the MySQL error code of a driver or SQLAlchemy exception, or None."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


# Where an error must come from to be taken for a lost database connection on its looks
# alone (a socket reset, a closed transport, "already closed"): the drivers, SQLAlchemy and
# the event loop's transports under them.
_DATABASE_MODULES = ("aiomysql", "asyncmy", "pymysql", "sqlalchemy", "asyncgone._drivers")


def _from_database_stack(exc: BaseException) -> bool:
    """Tell whether ``exc`` was raised by database code, or cannot be told apart.

    A ``ConnectionResetError`` from an HTTP call inside a unit of work is not a database
    disconnect, and replaying the work for it would be wrong. An exception that was raised
    carries its path in its traceback; one that was never raised (built by hand) is judged
    on its looks.
    """
    if type(exc).__module__.startswith(_DATABASE_MODULES):
        return True
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith(_DATABASE_MODULES):
            return True
        tb = tb.tb_next
    return False


# Set on a replica's read-only refusal of a write (see mark_write_on_replica).
_WRITE_ON_REPLICA = "asyncgone_write_on_replica"


def mark_write_on_replica(exc: BaseException) -> None:
    """Mark ``exc``, a replica's 1290/1836, as a write sent to a replica: no disconnect and
    no outage, whatever its code says on a primary."""
    setattr(exc, _WRITE_ON_REPLICA, True)
    add_note(exc, "asyncgone: a write in a read_only session, which went to a replica")


def disconnect_scope(exc: BaseException) -> Scope | None:
    """Return how far a disconnect reaches, or None when ``exc`` is not a disconnect."""
    if isinstance(exc, sa_exc.DisconnectionError):
        return Scope.SERVER if exc.invalidate_pool else Scope.CONNECTION
    if isinstance(exc, sa_exc.DBAPIError):
        inner = exc.orig
        if inner is None:
            return Scope.CONNECTION if exc.connection_invalidated else None
        scope = disconnect_scope(inner)
        if scope is None and exc.connection_invalidated:
            return Scope.CONNECTION
        return scope
    if not _from_database_stack(exc):
        return None
    if isinstance(exc, ConnectionError):  # reset, broken pipe, aborted: the socket is gone
        return Scope.CONNECTION
    if isinstance(exc, RuntimeError):
        # uvloop raises this when a driver writes to a transport the peer already closed.
        text = str(exc)
        if "unable to perform operation on" in text and "closed" in text:
            return Scope.CONNECTION
        return None
    code = error_code(exc)
    if getattr(exc, _WRITE_ON_REPLICA, False):
        return None
    if code is not None:
        if code in _SERVER_CODES or is_node_not_ready(exc):
            return Scope.SERVER
        if code == _READ_ONLY_OPTION:
            text = str(exc).lower()
            return Scope.SERVER if "read-only" in text or "read_only" in text else None
        if code in _CONNECTION_CODES:
            return Scope.CONNECTION
    text = str(exc).lower()
    if any(message in text for message in _CONNECTION_MESSAGES):
        return Scope.CONNECTION
    return None


# Errors opening a connection that a server coming back, a failover or a busy server clear
# up by themselves: too many connections (1040, and 1203 for max_user_connections), host
# blocked (1129: until FLUSH HOSTS), shutdown in progress, can't connect, unknown host (DNS
# during a failover), lost at handshake. Access denied or an unknown database are not.
_UNAVAILABLE_CODES = frozenset({1040, 1053, 1129, 1203, 2002, 2003, 2005, 2006, 2013, 2055})


def is_unavailable(exc: BaseException) -> bool:
    """Tell whether ``exc`` means the database cannot be used right now but may be soon:
    ``DatabaseUnavailable``, a disconnect, or a transient failure to connect (a Galera
    node not ready, 1047, included)."""
    if isinstance(exc, (DatabaseUnavailable, OSError, TimeoutError)):
        return True
    return error_code(exc) in _UNAVAILABLE_CODES or is_disconnect(exc)


def is_node_not_ready(exc: BaseException) -> bool:
    """Tell whether ``exc`` is a Galera node's refusal to serve: error 1047 "WSREP has not
    yet prepared node for application use" (not Synced, out of the primary component, or
    ``wsrep_reject_queries``). The statement did not run; the node's connections are alive
    but useless until it is Synced again."""
    inner = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    return error_code(inner) == _NODE_NOT_READY and "wsrep" in str(inner).lower()


def is_read_only_refusal(exc: BaseException) -> bool:
    """Tell whether ``exc`` is the server's answer that it is read-only (1836, or 1290 for
    ``--read-only``): a server that turned read-only under a failover or switchover.

    The server answered: a COMMIT refused this way did not commit (the transaction is rolled
    back), so its outcome is known and the unit of work is safe to replay elsewhere.
    """
    inner = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    code = error_code(inner)
    if code == _READ_ONLY_OPTION:
        text = str(inner).lower()
        return "read-only" in text or "read_only" in text
    return code == _READ_ONLY_MODE


def is_disconnect(exc: BaseException) -> bool:
    """Tell whether ``exc`` means the database connection it happened on is gone.

    Accepts driver exceptions (aiomysql, asyncmy), SQLAlchemy's wrappers and the plain
    ``ConnectionError``/``RuntimeError`` the event loop raises for a dead socket::

        try:
            await session.execute(stmt)
        except Exception as exc:
            if asyncgone.is_disconnect(exc):
                ...  # safe to retry on a new connection if nothing was committed

    A deadlock (1213), a lock wait timeout (1205) or ``KILL QUERY`` (1317) leave the
    connection usable and are not disconnects.
    """
    return disconnect_scope(exc) is not None


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` (``BaseException.add_note`` on 3.11+, ``__notes__`` before)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        notes = getattr(exc, "__notes__", None)
        if notes is None:
            notes = []
            exc.__notes__ = notes  # type: ignore[attr-defined]
        notes.append(note)


def describe(exc: BaseException) -> str:
    """Describe an error in one line, unwrapping SQLAlchemy's wrapper.

    Driver and server messages never contain the password, so this is safe to log.
    """
    inner = getattr(exc, "orig", None) or exc
    return f"{type(inner).__name__}: {inner}"


#: Connect errors the server (or its host) clears by itself, and that repeating at once
#: only makes worse: too many connections (1040), ``max_user_connections`` reached (1203),
#: host blocked after too many connection errors (1129, until ``FLUSH HOSTS`` or
#: ``max_connect_errors`` allows it again), and nothing listening yet (2002 on a unix
#: socket, 2003 on TCP, each with the refused connect chained: a server starting or
#: restarting).
REFUSAL_CODES = frozenset({1040, 1129, 1203, 2002, 2003})

#: Refusals that mean the server is full (not down): too many connections, and the account's
#: max_user_connections.
CAPACITY_CODES = frozenset({1040, 1203})

#: Refusals the server sends itself (the others are the socket's).
SERVER_REFUSALS = frozenset({1040, 1129, 1203})


def is_refusal(exc: BaseException) -> bool:
    """Tell whether a failed connect is a refusal worth retrying after a backoff.

    2002/2003 count only when the socket's connect was refused (the drivers chain the
    ``ConnectionRefusedError``, or ``FileNotFoundError`` for a missing unix socket): a
    server that is not listening yet. A host that does not answer, or a server that accepts
    and never greets (``connect_timeout``), already cost the caller its time: not again.
    """
    code = error_code(exc)
    if code in SERVER_REFUSALS:
        return True
    if code not in (None, 2002, 2003) and not isinstance(exc, OSError):
        return False
    seen: BaseException | None = exc
    for _ in range(5):  # the driver's error, then what it was raised from
        if seen is None:
            break
        if isinstance(seen, (ConnectionRefusedError, FileNotFoundError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
