"""asyncgone's pytest plugin: fixtures for testing applications against dying connections.

Registered through the ``pytest11`` entry point, so installing asyncgone enables it. Every
fixture is prefixed ``asyncgone_``:

- ``asyncgone_url``: the database under test (see "Configuration" below);
- ``asyncgone_engine``: an engine for it, bound to the event loop the test runs in (any
  pytest-asyncio loop scope, or anyio's plugin), disposed after the test;
- ``asyncgone_engine_options``: keywords for those engines (``create_engine()``'s); override
  it in a ``conftest.py`` to test with the options the application uses;
- ``asyncgone_session``: an ``AsyncSession`` inside an outer transaction that is rolled back
  after the test, even if the code under test commits (its commits become savepoints);
- ``asyncgone_proxy``: a ``FaultProxy`` in front of the database (``asyncgone_proxy.url``);
- ``asyncgone_proxy_engine``: an engine whose connections go through ``asyncgone_proxy``;
- ``asyncgone_mariadb``: a disposable MariaDB server for tests that restart or reconfigure
  one (started once per session, started again if a test left it stopped);
- ``asyncgone_replication``: a primary with two GTID replicas
  (``asyncgone.testing.ReplicationTopology``) for failover tests;
- ``asyncgone_galera``: a three-node Galera cluster (``asyncgone.testing.GaleraCluster``).

The two topologies are shared by the session and handed to each test healthy, with an empty
``test`` database: one that a test left broken (a server down, a replica not replicating, a
node desynced) is rebuilt, which takes about five seconds (a replication topology) or 10 to
20 s (a Galera cluster); one that is whole with other roles (after a switchover) is kept.

Configuration of the URL, first one set wins: the ``asyncgone_url`` ini option, the
``--asyncgone-url`` command-line option, the ``ASYNCGONE_URL`` environment variable, then
``mysql://root@127.0.0.1:3306/test``. An unreachable database stops the run with one
message naming it (password masked) and these three ways to change it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ._compat import test_loop_runner
from ._engine import create_engine
from ._url import mask, resolve_url
from .testing import (
    AdminQueryError,
    FaultProxy,
    GaleraCluster,
    MariaDBServer,
    ReplicationTopology,
    TopologyError,
)

__all__ = [
    "asyncgone_engine",
    "asyncgone_engine_options",
    "asyncgone_galera",
    "asyncgone_mariadb",
    "asyncgone_proxy",
    "asyncgone_proxy_engine",
    "asyncgone_replication",
    "asyncgone_session",
    "asyncgone_url",
]

_T = TypeVar("_T")

URL_INI = "asyncgone_url"
URL_OPTION = "--asyncgone-url"
URL_ENV = "ASYNCGONE_URL"
DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"
_PROBE_TIMEOUT = 10.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("asyncgone", "asyncgone: testing against dying MySQL connections")
    group.addoption(
        URL_OPTION,
        dest="asyncgone_url",
        default=None,
        help=f"database URL for asyncgone's fixtures (also: ini {URL_INI}, ${URL_ENV})",
    )
    parser.addini(URL_INI, "database URL for asyncgone's fixtures", default=None)


def configured_url(config: pytest.Config) -> tuple[str, str]:
    """Return the URL for the fixtures and where it came from."""
    sources = (
        ("the asyncgone_url ini option", config.getini(URL_INI)),
        ("--asyncgone-url", config.getoption("asyncgone_url")),
        (f"${URL_ENV}", os.environ.get(URL_ENV)),
    )
    for source, value in sources:
        if value:
            return str(value), source
    return DEFAULT_URL, "the default"


def _probe(url: str) -> None:
    """Open and close one connection, on a private loop in a thread of its own (the tests'
    loops may not exist yet, and must not see this connection)."""

    async def probe() -> None:
        # One attempt: a database that is not there is reported now, not after retries.
        engine = create_engine(url, connect_timeout=_PROBE_TIMEOUT, connect_retry=None)
        try:
            async with engine.connect():
                pass
        finally:
            await engine.dispose()

    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(probe())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="asyncgone-probe", daemon=True)
    thread.start()
    thread.join(_PROBE_TIMEOUT + 5)
    if failure:
        raise failure[0]


@pytest.fixture(scope="session")
def asyncgone_url(pytestconfig: pytest.Config) -> str:
    """The database under test; the run stops with one clear message if it is unreachable."""
    url, source = configured_url(pytestconfig)
    try:
        _probe(url)
    except Exception as exc:
        pytest.exit(
            f"asyncgone: cannot reach the test database {mask(url)} (from {source}): "
            f"{type(exc).__name__}: {exc}. Start it, or point the tests at another one with "
            f"the {URL_INI} ini option, {URL_OPTION}=URL, or ${URL_ENV}.",
            returncode=3,
        )
    return url


class _TestLoop:
    """Runs coroutines in the event loop the requesting test runs in, between its steps."""

    def __init__(self, request: pytest.FixtureRequest, stack: contextlib.ExitStack) -> None:
        try:
            self._run = test_loop_runner(request, stack)
        except LookupError as exc:
            raise pytest.UsageError(str(exc)) from None

    def run(self, awaitable: Awaitable[_T]) -> _T:
        result: _T = self._run(awaitable)
        return result


@contextlib.contextmanager
def _engine_in_test_loop(
    request: pytest.FixtureRequest, url: Any, options: dict[str, Any]
) -> Iterator[AsyncEngine]:
    with contextlib.ExitStack() as stack:
        loop = _TestLoop(request, stack)
        # Creating an engine binds it to no loop; its first connection is opened inside the
        # test, in the test's loop, and disposal below runs in that same loop.
        engine = create_engine(url, **options)
        try:
            yield engine
        finally:
            loop.run(engine.dispose())


@pytest.fixture
def asyncgone_engine_options() -> dict[str, Any]:
    """Keywords for ``asyncgone_engine`` and ``asyncgone_proxy_engine``; override to change::

    @pytest.fixture
    def asyncgone_engine_options():
        return {"pool_size": 2, "ping_after": 0.5, "ping_timeout": 1.0}
    """
    return {}


@pytest.fixture
def asyncgone_engine(
    request: pytest.FixtureRequest, asyncgone_url: str, asyncgone_engine_options: dict[str, Any]
) -> Iterator[AsyncEngine]:
    """An ``AsyncEngine`` for the database under test, disposed after the test.

    It lives in the event loop of the test using it, whatever its loop scope, so it never
    meets "attached to a different loop".
    """
    with _engine_in_test_loop(request, asyncgone_url, asyncgone_engine_options) as engine:
        yield engine


@pytest.fixture
def asyncgone_session(
    request: pytest.FixtureRequest, asyncgone_engine: AsyncEngine
) -> Iterator[AsyncSession]:
    """An ``AsyncSession`` whose work is rolled back after the test, commits included.

    The session joins an outer transaction with ``join_transaction_mode="create_savepoint"``:
    ``session.commit()`` in the code under test releases a savepoint, and the outer
    transaction is rolled back at teardown, so the test leaves no rows behind.
    """
    with contextlib.ExitStack() as stack:
        loop = _TestLoop(request, stack)
        conn = loop.run(asyncgone_engine.connect())
        outer = loop.run(conn.begin())
        session = AsyncSession(
            bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            yield session
        finally:
            try:
                loop.run(session.close())
                if outer.is_active:
                    loop.run(outer.rollback())
            finally:
                loop.run(conn.close())


@pytest.fixture
def asyncgone_proxy(asyncgone_url: str) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` in front of the database under test; ``asyncgone_proxy.url`` goes
    through it."""
    with FaultProxy.for_url(resolve_url(asyncgone_url)) as proxy:
        yield proxy


@pytest.fixture
def asyncgone_proxy_engine(
    request: pytest.FixtureRequest,
    asyncgone_proxy: FaultProxy,
    asyncgone_engine_options: dict[str, Any],
) -> Iterator[AsyncEngine]:
    """An engine whose connections go through ``asyncgone_proxy``, disposed after the test."""
    with _engine_in_test_loop(request, asyncgone_proxy.url, asyncgone_engine_options) as engine:
        yield engine


@pytest.fixture(scope="session")
def _asyncgone_mariadb_server() -> Iterator[MariaDBServer]:
    with MariaDBServer() as server:
        yield server


@pytest.fixture
def asyncgone_mariadb(_asyncgone_mariadb_server: MariaDBServer) -> MariaDBServer:
    """A disposable MariaDB for tests that restart, crash or reconfigure a server.

    Shared by the session; a test that leaves it stopped finds it started again by the next
    test. ``asyncgone_mariadb.url("asyncmy")`` gives a URL.
    """
    if not _asyncgone_mariadb_server.running:
        _asyncgone_mariadb_server.start()
    return _asyncgone_mariadb_server


# -- topologies ------------------------------------------------------------------------------

_TopologyT = TypeVar("_TopologyT", ReplicationTopology, GaleraCluster)
_RESET_TEST_DATABASE = "DROP DATABASE IF EXISTS test; CREATE DATABASE test"


def _healthy_topology(holder: dict[str, _TopologyT], build: Callable[[], _TopologyT]) -> _TopologyT:
    """The held topology, checked and emptied; or, if a test left it altered, a new one."""
    topology = holder.pop("topology", None)
    if topology is not None:
        try:
            topology.check()
            # Run once and replicated: the waits return when every server applied it.
            if isinstance(topology, ReplicationTopology):
                topology.primary.query(_RESET_TEST_DATABASE)
                topology.wait_caught_up()
            else:
                topology.nodes[0].query(_RESET_TEST_DATABASE)
                topology.wait_applied()
        except (TopologyError, AdminQueryError):
            topology.close()
            topology = None
    if topology is None:
        with contextlib.ExitStack() as stack:
            topology = build()
            stack.callback(topology.close)
            topology.start()
            stack.pop_all()
    holder["topology"] = topology
    return topology


@pytest.fixture(scope="session")
def _asyncgone_replication_holder() -> Iterator[dict[str, ReplicationTopology]]:
    holder: dict[str, ReplicationTopology] = {}
    yield holder
    for topology in holder.values():
        topology.close()


@pytest.fixture
def asyncgone_replication(
    _asyncgone_replication_holder: dict[str, ReplicationTopology],
) -> ReplicationTopology:
    """A MariaDB primary with two GTID replicas, healthy, with an empty ``test`` database.

    Shared by the session: a test may kill, promote, lag or rejoin servers, and the next test
    gets a topology whose roles may differ but which is whole again (rebuilt if needed, in
    about five seconds). Applications connect as ``app`` (password ``app``), a user that
    read-only replicas refuse writes to::

        def test_failover(asyncgone_replication):
            url = asyncgone_replication.url("asyncmy")   # ?host=PRIMARY&host=REPLICA&...
            asyncgone_replication.kill(asyncgone_replication.primary)
            asyncgone_replication.promote(asyncgone_replication.replicas[0])
    """
    return _healthy_topology(_asyncgone_replication_holder, ReplicationTopology)


@pytest.fixture(scope="session")
def _asyncgone_galera_holder() -> Iterator[dict[str, GaleraCluster]]:
    holder: dict[str, GaleraCluster] = {}
    yield holder
    for cluster in holder.values():
        cluster.close()


@pytest.fixture
def asyncgone_galera(_asyncgone_galera_holder: dict[str, GaleraCluster]) -> GaleraCluster:
    """A three-node MariaDB Galera cluster, every node Synced, with an empty ``test``
    database.

    Shared by the session; a test that leaves a node down or desynced makes the next test
    wait for a new cluster (10 to 20 s; ``rejoin()`` or ``resync()`` in the test is
    quicker). Applications connect as ``app`` (password ``app``)::

        def test_node_loss(asyncgone_galera):
            url = asyncgone_galera.url("asyncmy")
            asyncgone_galera.kill(asyncgone_galera.nodes[0])
    """
    return _healthy_topology(_asyncgone_galera_holder, GaleraCluster)
