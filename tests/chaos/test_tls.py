"""TLS connections, as production servers require them, through the same faults as clear text.

A disposable MariaDB serves TLS with certificates from a private CA made for this module
(``MariaDBServer(tls=True)``), and has an application account that requires TLS. Both
drivers get their TLS settings the way each supports: an ``ssl.SSLContext`` in
``connect_args`` (both), or ``ssl_*`` keys in the URL (asyncmy only: SQLAlchemy hands them
to the driver as a dict, which aiomysql cannot use; ``tests/test_cli.py`` shows what doctor
says then, in a process of its own, as aiomysql leaks a socket on that failure). The
FaultProxy forwards bytes, so TLS passes through it end to end and its faults hit TLS
connections like any others.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncgone
from asyncgone import _drivers
from asyncgone._errors import error_code
from asyncgone._state import state_of
from asyncgone.testing import FaultProxy, MariaDBServer
from tests._support import Server, connection_id, count_errors, wait_until, warm

pytestmark = pytest.mark.anyio

APP_USER, APP_PASSWORD = "app", "tls-only-secret"


@pytest.fixture(scope="module")
def tls_server() -> Iterator[MariaDBServer]:
    """A disposable MariaDB serving TLS, with an account that may only log in over TLS."""
    with MariaDBServer(tls=True) as server:
        server.create_user(APP_USER, APP_PASSWORD, require_tls=True)
        yield server


@pytest.fixture
def admin(tls_server: MariaDBServer) -> Server:
    """Administration of the TLS server as root (who may use clear text)."""
    return Server(host=tls_server.host, port=tls_server.port)


@pytest.fixture
def app_url(tls_server: MariaDBServer, driver: str) -> str:
    """The application account's URL, without TLS settings."""
    return Server(tls_server.host, tls_server.port, APP_USER, APP_PASSWORD).url(driver)


@pytest.fixture
def context(tls_server: MariaDBServer) -> ssl.SSLContext:
    """A client context that trusts the server's private CA and checks the host name."""
    assert tls_server.tls is not None
    return tls_server.tls.client_context()


@contextlib.asynccontextmanager
async def disposing(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """Yield ``engine``; then dispose of it and end the TLS layer of every connection it
    opened.

    A driver's polite close (COM_QUIT, then closing the transport) leaves a TLS transport
    exchanging close_notify with the server, a round trip nothing awaits: when the test's
    event loop ends first, asyncio's socket is left open and warns when collected. asyncgone
    does not end that exchange itself yet, so the test does, as a clean shutdown would.
    """
    transports: list[Any] = []

    def remember(dbapi_connection: Any, record: Any) -> None:
        transports.append(_drivers._transport(dbapi_connection.driver_connection))

    event.listen(engine.sync_engine, "connect", remember)
    try:
        yield engine
    finally:
        await engine.dispose()
        for transport in transports:
            if transport is not None:
                transport.abort()  # a no-op for one already closed


def tls_engine(url: Any, context: ssl.SSLContext, **options: Any) -> Any:
    """``disposing()`` an asyncgone engine whose connections use ``context``."""
    connect_args = {"ssl": context, **options.pop("connect_args", {})}
    return disposing(asyncgone.create_engine(url, connect_args=connect_args, **options))


def ssl_object(raw: Any) -> ssl.SSLObject:
    """The client side of a driver connection's TLS session."""
    found = _drivers._transport(raw).get_extra_info("ssl_object")
    assert isinstance(found, ssl.SSLObject)
    return found


async def session_tls(engine: AsyncEngine) -> tuple[str, ssl.SSLObject]:
    """The TLS version the server reports for a pooled connection, and its client side."""
    async with engine.connect() as conn:
        status = await conn.execute(text("SHOW SESSION STATUS LIKE 'Ssl_version'"))
        raw = (await conn.get_raw_connection()).driver_connection
        return str(status.one()[1]), ssl_object(raw)


async def test_steady_state_costs_no_ping_and_no_replacement(
    app_url: str, context: ssl.SSLContext
) -> None:
    """Reused TLS 1.3 connections, idle after their session tickets arrived, are handed out
    with no ping and no replacement: the socket check does not take those late handshake
    messages for a server hang-up."""
    async with tls_engine(app_url, context, pool_size=2, ping_after=30) as engine:
        await warm(engine, 2)
        await anyio.sleep(0.3)
        for _ in range(10):
            version, client = await session_tls(engine)
        assert version == "TLSv1.3"
        # TLS 1.3 sends tickets after the handshake; the client holds one: they came and went.
        assert client.session is not None
        assert client.session.has_ticket
        assert client.getpeercert()  # verified against the private CA
        stats = asyncgone.stats(engine)
        assert (stats.connects, stats.pings, stats.pool_invalidations) == (2, 0, 0)
        assert stats.replaced == {}
        assert stats.checks >= 10


async def test_both_drivers_take_tls_settings_from_the_url(
    tls_server: MariaDBServer, driver: str
) -> None:
    """``?ssl_ca=CA`` gives either driver a verified, host-checked TLS connection (aiomysql
    through the context asyncgone makes as PyMySQL would); ``?ssl_check_hostname=false``
    alone encrypts without verifying anything."""
    base = Server(tls_server.host, tls_server.port, APP_USER, APP_PASSWORD).url(driver)
    async with disposing(asyncgone.create_engine(f"{base}?ssl_ca={tls_server.ca_file}")) as e:
        version, client = await session_tls(e)
        assert version.startswith("TLSv1.")
        assert client.getpeercert()
        assert client.context.check_hostname
    async with disposing(asyncgone.create_engine(f"{base}?ssl_check_hostname=false")) as e:
        version, client = await session_tls(e)
        assert version.startswith("TLSv1.")
        assert client.getpeercert() == {}  # empty: the chain was not verified
        assert client.context.verify_mode == ssl.CERT_NONE


async def test_clear_text_is_refused_for_an_account_that_requires_tls(app_url: str) -> None:
    """Without TLS settings, the REQUIRE SSL account is refused (1045), with either driver."""
    async with disposing(asyncgone.create_engine(app_url)) as engine:
        with pytest.raises(sa_exc.OperationalError) as info:
            await connection_id(engine)
        assert error_code(info.value) == 1045


async def test_without_server_tls_aiomysql_falls_back_to_clear_text(
    disposable: Server, driver: str
) -> None:
    """Against a server without TLS, aiomysql given a context connects in clear text without
    a word, while asyncmy refuses: what the documentation warns about."""
    [(have_ssl,)] = disposable.query("SELECT @@have_ssl")
    if have_ssl != "DISABLED":  # MariaDB 11.4 and later make their own certificates
        pytest.skip(f"the disposable server has TLS (have_ssl={have_ssl})")
    async with tls_engine(disposable.url(driver), ssl.create_default_context()) as engine:
        if driver == "aiomysql":
            async with engine.connect() as conn:
                status = await conn.execute(text("SHOW SESSION STATUS LIKE 'Ssl_version'"))
                assert status.one()[1] == ""
        else:
            with pytest.raises(sa_exc.OperationalError, match=r"\[SSL: WRONG_VERSION_NUMBER\]"):
                await connection_id(engine)


async def test_killed_idle_tls_connection_is_replaced_without_errors(
    app_url: str, context: ssl.SSLContext, admin: Server
) -> None:
    """A KILL of an idle TLS connection costs 0 errors and no ping: only it is replaced."""
    async with tls_engine(app_url, context, pool_size=3) as engine:
        ids = await warm(engine, 3)
        admin.kill(ids[1])
        await wait_until(lambda: ids[1] not in admin.threads())
        with count_errors(engine) as errors:
            again = await warm(engine, 3)
        assert errors == []
        assert set(again) >= {ids[0], ids[2]}
        assert ids[1] not in again
        stats = asyncgone.stats(engine)
        assert stats.replaced == {"closed_by_server": 1}
        assert (stats.connects, stats.pings) == (4, 0)


async def test_server_idle_timeout_is_survived(
    app_url: str, context: ssl.SSLContext, admin: Server
) -> None:
    """A TLS connection the server closed at its session wait_timeout (idle limit off, so
    the socket check alone must see it) is replaced: 0 errors, no ping."""
    short = {"init_command": "SET SESSION wait_timeout=1"}
    async with tls_engine(app_url, context, recycle=None, connect_args=short) as engine:
        [first] = await warm(engine, 1)
        await wait_until(lambda: first not in admin.threads())
        with count_errors(engine) as errors:
            second = await connection_id(engine)
        assert second != first
        assert errors == []
        stats = asyncgone.stats(engine)
        assert stats.replaced == {"closed_by_server": 1}
        assert stats.pings == 0


async def test_cut_tls_connections_are_replaced_without_errors(
    app_url: str, context: ssl.SSLContext
) -> None:
    """Connections reset (RST) by the proxy mid-TLS-session are replaced: 0 errors, no ping."""
    with FaultProxy.for_url(app_url) as proxy:
        async with tls_engine(proxy.url, context, pool_size=2) as engine:
            ids = await warm(engine, 2)
            assert proxy.cut() == 2
            await anyio.sleep(0.2)
            with count_errors(engine) as errors:
                again = await warm(engine, 2)
            assert errors == []
            assert not set(ids) & set(again)
            stats = asyncgone.stats(engine)
            assert sum(stats.replaced.values()) == 2
            assert stats.pings == 0


async def test_blackholed_tls_connection_is_replaced_by_the_bounded_ping(
    app_url: str, context: ssl.SSLContext
) -> None:
    """A TLS connection whose path went silent is found out by the bounded ping and replaced;
    the unit of work completes, never hangs."""
    with FaultProxy.for_url(app_url) as proxy:
        options = {"pool_size": 1, "ping_after": 0.2, "ping_timeout": 1.0}
        async with tls_engine(proxy.url, context, **options) as engine:
            [first] = await warm(engine, 1)
            await anyio.sleep(0.3)
            assert proxy.blackhole() == 1
            with anyio.fail_after(15), count_errors(engine) as errors:
                second = await connection_id(engine)
            assert second != first
            assert errors == []
            stats = asyncgone.stats(engine)
            assert stats.replaced == {"ping_timeout": 1}
            assert stats.ping_failures == 1


async def test_socket_check_sees_a_server_close_without_a_round_trip(
    app_url: str, context: ssl.SSLContext, admin: Server
) -> None:
    """The socket check (``is_closed``, no I/O) is False for an idle TLS connection and
    turns True once the server has closed it, before anything is sent on it."""
    async with tls_engine(app_url, context, pool_size=1) as engine:
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            thread = _drivers.thread_id(raw)
        assert thread is not None
        state = state_of(engine)
        assert state is not None
        is_closed = state.driver.is_closed
        await anyio.sleep(0.3)
        assert not is_closed(raw)
        admin.kill(thread)
        with anyio.fail_after(5):
            while not is_closed(raw):  # noqa: ASYNC110 - the event loop must read the close
                await anyio.sleep(0.02)
        assert asyncgone.stats(engine).pings == 0
