"""Fixtures shared by the whole suite: event loops, drivers, and the servers under test.

Tests run against real MariaDB servers only:

- the shared server (``$ASYNCGONE_TEST_URL``, default ``mysql://root@127.0.0.1:3306/test``),
  which tests never restart or reconfigure globally;
- one disposable server per test session (``asyncgone.testing.MariaDBServer``), for tests
  that restart or crash a server or read its global status counters undisturbed.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from sqlalchemy.engine import make_url

from asyncgone._url import mask
from asyncgone.testing import MariaDBServer

from ._support import Server, calibrate

URL_ENV = "ASYNCGONE_TEST_URL"
DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"


LOOPS_ENV = "ASYNCGONE_TEST_LOOPS"
LOOPS = {"asyncio": ("asyncio", {}), "uvloop": ("asyncio", {"use_uvloop": True})}


def _loops() -> list[str]:
    """The event loops to run on: all of them, or those ``$ASYNCGONE_TEST_LOOPS`` names."""
    names = os.environ.get(LOOPS_ENV, ",".join(LOOPS)).replace(" ", "").split(",")
    unknown = sorted(set(names) - set(LOOPS))
    if unknown:
        raise pytest.UsageError(f"${LOOPS_ENV}: unknown loop {unknown}; choose from {list(LOOPS)}")
    return names


@pytest.fixture(params=[pytest.param(LOOPS[name], id=name) for name in _loops()])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Every async test runs on asyncio's default loop and on uvloop (see ``_loops``)."""
    return request.param


@pytest.fixture(params=["aiomysql", "asyncmy"])
def driver(request: pytest.FixtureRequest) -> str:
    """Every database test runs with both drivers."""
    return str(request.param)


@pytest.fixture(scope="session")
def shared() -> Server:
    """The long-running test server; the session stops with one clear message if it is down."""
    url = make_url(os.environ.get(URL_ENV, DEFAULT_URL))
    server = Server(
        host=url.host or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",  # type: ignore[arg-type]
        database=url.database or "test",
    )
    try:
        server.query("SELECT 1")
    except pymysql.MySQLError as exc:
        pytest.exit(
            f"the test database {mask(url)} is unreachable: {exc}. Start MariaDB "
            f"(start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd) "
            f"or point ${URL_ENV} at one.",
            returncode=3,
        )
    return server


@pytest.fixture
def url(shared: Server, driver: str) -> str:
    """A URL for the shared server with this test's driver."""
    return shared.url(driver)


@pytest.fixture(scope="session")
def disposable_server() -> Iterator[MariaDBServer]:
    """A private MariaDB for the session; tests that stop it must start it again."""
    with MariaDBServer() as server:
        yield server


@pytest.fixture
def disposable(disposable_server: MariaDBServer) -> Server:
    """The disposable server, running, with admin helpers."""
    if not disposable_server.running:
        disposable_server.start()
    server = Server(host=disposable_server.host, port=disposable_server.port)
    calibrate(server)
    return server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Topology scenarios (each builds servers of its own, tens of seconds) run each driver
    on one loop when both loops are selected: aiomysql on asyncio's, asyncmy on uvloop. Every
    driver and every loop still runs them; the rest of the suite crosses all four pairs."""
    if len(_loops()) < 2 or any("[" in arg for arg in config.args):
        return  # one loop only, or tests named with their parameters: run what was asked
    pairs = {("asyncio", "aiomysql"), ("uvloop", "asyncmy")}
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("topology") and "anyio_backend" in params and "driver" in params:
            loop = "uvloop" if params["anyio_backend"][1].get("use_uvloop") else "asyncio"
            if (loop, params["driver"]) not in pairs:
                dropped.append(item)
                continue
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what importing and collecting created out of the collector's way: the full
    collection after every test then walks only what tests made (~50 ms less per test)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _stranded_connections_fail_their_test(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Collect garbage after every test, so a connection the pool lost track of is reported
    (SQLAlchemy warns when the collector finds it) by the test that lost it, not by
    whichever test the collector happens to run in later."""
    yield
    # A logged traceback (SQLAlchemy logs failed terminates with exc_info) keeps the frames
    # that hold the connection alive until pytest drops the test's records, after teardown.
    # The call's report is already written: drop them now.
    for when in ("setup", "call"):
        caplog.get_records(when).clear()
    gc.collect()
