"""FaultProxy: each fault behaves as documented against a real MariaDB."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pymysql
import pytest
from sqlalchemy import exc as sa_exc

import asyncgone
from asyncgone.testing import FaultProxy
from tests._support import Server, connection_id, warm

pytestmark = pytest.mark.anyio


@pytest.fixture
def proxy(shared: Server) -> Iterator[FaultProxy]:
    with FaultProxy.for_url(shared.url("asyncmy")) as running:
        yield running


def client(proxy: FaultProxy, **kwargs: object) -> pymysql.connections.Connection:
    return pymysql.connect(host=proxy.host, port=proxy.port, user="root", database="test", **kwargs)


def test_forwards_traffic(proxy: FaultProxy) -> None:
    """A client talks to the server through the proxy as if directly."""
    conn = client(proxy)
    with conn.cursor() as cur:
        cur.execute("SELECT 40 + 2")
        assert cur.fetchone() == (42,)
    assert proxy.connections == 1
    conn.close()


def test_cut_resets_open_connections_and_keeps_accepting(proxy: FaultProxy) -> None:
    """``cut()`` kills open connections with a reset; new connections still work."""
    conn = client(proxy)
    assert proxy.cut() == 1
    with pytest.raises(pymysql.err.OperationalError) as info, conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert info.value.args[0] in (2006, 2013)
    fresh = client(proxy)
    with fresh.cursor() as cur:
        cur.execute("SELECT 1")
    fresh.close()


def test_blackhole_drops_bytes_of_open_connections_only(proxy: FaultProxy) -> None:
    """A blackholed connection never answers; a connection opened later works (the LB case)."""
    conn = client(proxy, read_timeout=1)
    assert proxy.blackhole() == 1
    started = time.monotonic()
    with pytest.raises(pymysql.err.OperationalError), conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert time.monotonic() - started >= 0.9  # it waited: no reset, no answer
    fresh = client(proxy)
    with fresh.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    fresh.close()


def test_blackhole_including_new_connections(proxy: FaultProxy) -> None:
    """With ``include_new`` even the handshake of a new connection goes nowhere."""
    proxy.blackhole(include_new=True)
    with pytest.raises(pymysql.err.OperationalError):
        client(proxy, connect_timeout=1, read_timeout=1)
    proxy.restore()
    conn = client(proxy)
    conn.close()


def test_latency_delays_each_round_trip(proxy: FaultProxy) -> None:
    """``set_latency`` adds the delay to each direction of every round trip."""
    conn = client(proxy)
    proxy.set_latency(0.2)
    started = time.monotonic()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert time.monotonic() - started >= 0.4
    proxy.restore()
    conn.close()


def test_reject_refuses_new_connections_until_restore(proxy: FaultProxy) -> None:
    """``reject()`` stops listening (connection refused, as a server that is down)."""
    proxy.reject()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=1)
    proxy.restore()
    socket.create_connection((proxy.host, proxy.port), timeout=1).close()


def test_bad_arguments_are_refused() -> None:
    """Nonsense ports and latencies fail at once."""
    with pytest.raises(ValueError, match="upstream_port"):
        FaultProxy("127.0.0.1", 0)
    with FaultProxy("127.0.0.1", 3306) as proxy, pytest.raises(ValueError, match="latency"):
        proxy.set_latency(-1)
    with pytest.raises(RuntimeError, match="for_url"):
        FaultProxy("127.0.0.1", 3306).start().url  # noqa: B018


def test_close_is_idempotent_and_stops_the_thread(shared: Server) -> None:
    """Closing twice is harmless and leaves no proxy thread behind."""
    proxy = FaultProxy.for_url(shared.url("aiomysql")).start()
    thread = proxy._thread
    proxy.close()
    proxy.close()
    assert thread is not None
    assert not thread.is_alive()


async def test_cut_in_the_middle_of_async_app_code(url: str) -> None:
    """From async code under either loop, a cut surfaces as a disconnect of that connection."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url)
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
                proxy.cut()
                with pytest.raises((sa_exc.OperationalError, RuntimeError)) as info:
                    await conn.exec_driver_sql("SELECT 1")
                assert asyncgone.is_disconnect(info.value)
            assert await connection_id(engine) > 0  # the engine recovers
            await warm(engine, 2)
        finally:
            await engine.dispose()


async def test_cut_on_a_keyword_waits_for_that_keyword(url: str) -> None:
    """``cut_on(b"COMMIT")`` armed before a connection opens leaves its
    ``SET AUTOCOMMIT = 0`` and a statement naming ``COMMIT_LOG`` alone, and cuts the
    ``COMMIT`` itself."""
    with FaultProxy.for_url(url) as proxy:
        engine = asyncgone.create_engine(proxy.url)
        try:
            proxy.cut_on(b"COMMIT")
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1 AS COMMIT_LOG, 'AUTOCOMMIT' AS x")
                assert proxy.tripped == 0
                with pytest.raises((sa_exc.OperationalError, RuntimeError)) as info:
                    await conn.commit()
                assert asyncgone.is_disconnect(info.value)
            assert proxy.tripped == 1
        finally:
            await engine.dispose()


@pytest.mark.parametrize("deliver", [False, True])
def test_cut_on_loses_a_statement_before_or_after_the_server(
    proxy: FaultProxy, shared: Server, deliver: bool
) -> None:
    """``cut_on`` cuts the connection sending the marker; with ``deliver`` the server ran it."""
    shared.query("CREATE TABLE IF NOT EXISTS ag_proxy_cut (id INT PRIMARY KEY)")
    shared.query("DELETE FROM ag_proxy_cut")
    conn = client(proxy, autocommit=True)
    proxy.cut_on(b"ag_proxy_cut", deliver=deliver)
    with pytest.raises(pymysql.err.OperationalError), conn.cursor() as cur:
        cur.execute("INSERT INTO ag_proxy_cut VALUES (1)")
    assert proxy.tripped == 1
    assert shared.query("SELECT COUNT(*) FROM ag_proxy_cut") == [(1 if deliver else 0,)]
    fresh = client(proxy)  # one-shot: the next connection is left alone
    fresh.close()
