"""Disconnect classification: what counts as a dead connection, and how far it reaches.

Most rows build the exception the driver raises for a given server code (the classification
is a pure function of the exception); the real faults behind them are produced against
MariaDB in ``tests/chaos``. The last tests produce errors that must NOT count as
disconnects for real.
"""

from __future__ import annotations

import asyncio

import asyncmy.errors
import pymysql.err
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

import asyncgone
from asyncgone._errors import Scope, disconnect_scope, error_code

from ._support import Server

pytestmark = pytest.mark.anyio

DRIVER_ERRORS = {
    "aiomysql": (
        pymysql.err.OperationalError,
        pymysql.err.InterfaceError,
        pymysql.err.InternalError,
    ),
    "asyncmy": (
        asyncmy.errors.OperationalError,
        asyncmy.errors.InterfaceError,
        asyncmy.errors.InternalError,
    ),
}

CONNECTION_SCOPE = [
    (0, 2006, "MySQL server has gone away"),
    (0, 2013, "Lost connection to MySQL server during query"),
    (0, 2014, "Command Out of Sync"),
    (0, 2055, "Lost connection to MySQL server at 'reading', system error: 32"),
    (0, 4031, "The client was disconnected by the server because of inactivity."),
    (0, 1153, "Got a packet bigger than 'max_allowed_packet' bytes"),
    (0, 1927, "Connection was killed"),
    (1, 0, "Not connected"),
    (1, None, "Cancelled during execution"),
    (2, None, "Packet sequence number wrong - got 1 expected 0"),
]
SERVER_SCOPE = [
    (0, 1053, "Server shutdown in progress"),
    (0, 1836, "Running in read-only mode"),
    (
        0,
        1290,
        "The MariaDB server is running with the --read-only option so it cannot execute "
        "this statement",
    ),
]
NOT_DISCONNECTS = [
    (0, 1205, "Lock wait timeout exceeded; try restarting transaction"),
    (0, 1213, "Deadlock found when trying to get lock; try restarting transaction"),
    (0, 1317, "Query execution was interrupted"),
    (0, 1290, "The MariaDB server is running with the --secure-file-priv option"),
    (0, 1045, "Access denied for user 'app'@'localhost' (using password: YES)"),
]


def _make(driver: str, kind: int, code: int | None, message: str) -> Exception:
    cls = DRIVER_ERRORS[driver][kind]
    return cls(message) if code is None else cls(code, message)


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
@pytest.mark.parametrize(("kind", "code", "message"), CONNECTION_SCOPE)
def test_connection_scope_disconnects(
    driver: str, kind: int, code: int | None, message: str
) -> None:
    """Errors that kill one connection are disconnects of connection scope, raw or wrapped."""
    error = _make(driver, kind, code, message)
    assert asyncgone.is_disconnect(error)
    assert disconnect_scope(error) is Scope.CONNECTION
    wrapped = sa_exc.OperationalError("SELECT 1", {}, error)
    assert disconnect_scope(wrapped) is Scope.CONNECTION


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
@pytest.mark.parametrize(("kind", "code", "message"), SERVER_SCOPE)
def test_server_scope_disconnects(driver: str, kind: int, code: int | None, message: str) -> None:
    """Shutdown and read-only failover codes speak for every connection to that server."""
    error = _make(driver, kind, code, message)
    assert disconnect_scope(error) is Scope.SERVER
    assert asyncgone.is_disconnect(sa_exc.OperationalError("INSERT", {}, error))


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
@pytest.mark.parametrize(("kind", "code", "message"), NOT_DISCONNECTS)
def test_errors_that_leave_the_connection_usable(
    driver: str, kind: int, code: int | None, message: str
) -> None:
    """Deadlocks, lock timeouts, KILL QUERY and other option errors are not disconnects."""
    assert not asyncgone.is_disconnect(_make(driver, kind, code, message))


def test_event_loop_errors_for_a_dead_socket() -> None:
    """uvloop's closed-transport RuntimeError and socket resets are disconnects."""
    uvloop_error = RuntimeError(
        "unable to perform operation on <TCPTransport closed=True reading=False 0x55>; "
        "the handler is closed"
    )
    assert disconnect_scope(uvloop_error) is Scope.CONNECTION
    assert (
        disconnect_scope(ConnectionResetError(104, "Connection reset by peer")) is Scope.CONNECTION
    )
    assert not asyncgone.is_disconnect(RuntimeError("something else is closed"))
    assert not asyncgone.is_disconnect(ValueError("2013"))


def test_errors_raised_outside_the_database_are_not_disconnects() -> None:
    """A socket reset or an "already closed" raised by non-database code (an HTTP call in a
    unit of work) is not a database disconnect, so run() does not replay for it."""

    def http_call() -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    def read_file() -> None:
        raise ValueError("I/O operation on file already closed")

    for fails in (http_call, read_file):
        with pytest.raises((ConnectionResetError, ValueError)) as info:
            fails()
        assert not asyncgone.is_disconnect(info.value)


def test_sqlalchemy_disconnection_errors() -> None:
    """SQLAlchemy's own disconnect exceptions keep their pool-wide flag."""
    assert disconnect_scope(sa_exc.DisconnectionError("x")) is Scope.CONNECTION
    assert disconnect_scope(sa_exc.InvalidatePoolError("x")) is Scope.SERVER


def test_error_code_reads_raw_and_wrapped_errors() -> None:
    """``error_code`` finds the MySQL code inside SQLAlchemy's wrapper."""
    raw = pymysql.err.OperationalError(2013, "Lost connection")
    assert error_code(raw) == 2013
    assert error_code(sa_exc.OperationalError("SELECT 1", {}, raw)) == 2013
    assert error_code(RuntimeError("no code")) is None


async def test_kill_query_is_not_a_disconnect(url: str, shared: Server) -> None:
    """A real KILL QUERY (1317) leaves the connection usable and is classified so."""
    engine = asyncgone.create_engine(url)
    try:
        async with engine.connect() as conn:
            thread = (await conn.execute(text("SELECT CONNECTION_ID()"))).scalar_one()

            async def kill_soon() -> None:
                await asyncio.sleep(0.3)
                await asyncio.to_thread(shared.query, f"KILL QUERY {thread}")

            killer = asyncio.ensure_future(kill_soon())
            with pytest.raises(sa_exc.OperationalError) as info:
                await conn.execute(text("SELECT SLEEP(5) FROM DUAL WHERE 1 = (SELECT 1)"))
            await killer
            assert error_code(info.value) == 1317
            assert not asyncgone.is_disconnect(info.value)
            await conn.rollback()
            assert (await conn.execute(text("SELECT CONNECTION_ID()"))).scalar_one() == thread
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("error", "aftermath"),
    [
        (pymysql.err.InterfaceError("Cancelled during execution"), True),
        (pymysql.err.InterfaceError("(0, 'Not connected')"), True),
        (
            asyncmy.errors.InternalError("network operation failed due to asyncmy attribute error"),
            True,
        ),
        (pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query"), False),
        (asyncmy.errors.OperationalError(2006, "MySQL server has gone away"), False),
    ],
)
def test_aftermath_of_an_earlier_loss(error: Exception, aftermath: bool) -> None:
    """Errors from reusing a connection the driver already closed are told apart from new losses."""
    from asyncgone._errors import is_aftermath

    assert is_aftermath(error) is aftermath
    assert is_aftermath(sa_exc.OperationalError("ROLLBACK", {}, error)) is aftermath
    assert asyncgone.is_disconnect(error)
