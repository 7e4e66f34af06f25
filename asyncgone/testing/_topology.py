"""What the multi-server topologies share: the application user, URLs, the lifecycle, errors.

Both ``ReplicationTopology`` and ``GaleraCluster`` are groups of ``MariaDBServer`` objects
that start together, are closed together, and give applications the ``app`` user: one without
SUPER or READ ONLY ADMIN, because MariaDB lets those two privileges write on a read-only
server, which would hide exactly the failures failover tests are about.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Literal, TypeVar

from ._mariadb import MariaDBServer

__all__ = ["APP_PASSWORD", "APP_USER", "TopologyError"]

APP_USER = "app"
APP_PASSWORD = "app"
DEFAULT_TIMEOUT = 30.0

# Everything on `test`; to read replication state, SLAVE MONITOR (SHOW REPLICA STATUS) and
# BINLOG MONITOR (SHOW BINLOG STATUS). `@@gtid_*`, `@@read_only` and wsrep status variables
# need no privilege.
APP_USER_SQL = f"""\
CREATE USER IF NOT EXISTS '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}';
GRANT ALL PRIVILEGES ON test.* TO '{APP_USER}'@'%';
GRANT SLAVE MONITOR, BINLOG MONITOR ON *.* TO '{APP_USER}'@'%';
"""

User = Literal["app", "root"]
_T = TypeVar("_T", bound="Topology")


class TopologyError(RuntimeError):
    """A topology could not reach the state asked for in time, or cannot do what was asked;
    the message says which server and why, with the end of its error log where that helps."""


def where(server: MariaDBServer) -> str:
    """``host:port`` of a server, for messages."""
    return f"{server.host}:{server.port}"


def server_url(server: MariaDBServer, driver: str, *, user: User, database: str) -> str:
    """A single-host SQLAlchemy URL for ``server`` as ``user``."""
    if user == "root":
        return server.url(driver, database)
    return f"mysql+{driver}://{APP_USER}:{APP_PASSWORD}@{where(server)}/{database}"


def multi_host_url(
    servers: Sequence[MariaDBServer], driver: str, *, user: User, database: str
) -> str:
    """A multi-host URL in SQLAlchemy's query form: ``...@/test?host=H1:P1&host=H2:P2``.

    ``sqlalchemy.engine.make_url()`` parses repeated ``host`` parameters into a tuple in
    ``url.query["host"]`` (one host stays a string); SQLAlchemy's MySQL dialects cannot
    connect with such a URL by themselves, ``asyncgone.create_engine()`` can.
    """
    auth = "root" if user == "root" else f"{APP_USER}:{APP_PASSWORD}"
    hosts = "&".join(f"host={where(s)}" for s in servers)
    return f"mysql+{driver}://{auth}@/{database}?{hosts}"


def poll(check: Callable[[], bool], *, timeout: float, interval: float = 0.1) -> bool:
    """Call ``check`` until it returns True (then return True) or ``timeout`` seconds pass
    (then return False)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


class Topology:
    """Servers that start and close together; subclasses set ``_servers`` and ``start()``."""

    timeout: float
    _servers: list[MariaDBServer]

    def start(self: _T) -> _T:
        raise NotImplementedError

    def close(self) -> None:
        """Kill every server and delete its data."""
        for server in self._servers:
            server.close()

    def __enter__(self: _T) -> _T:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def server_url(
        self,
        server: MariaDBServer,
        driver: str = "asyncmy",
        *,
        user: User = "app",
        database: str = "test",
    ) -> str:
        """A plain URL for one server: ``mysql+DRIVER://app:app@127.0.0.1:PORT/test``."""
        return server_url(self._member(server), driver, user=user, database=database)

    def kill(self, server: MariaDBServer) -> None:
        """Kill a server with SIGKILL: to its clients and peers, a crash. Nothing else changes
        (a replica is not promoted, a node is not replaced)."""
        self._member(server).kill()

    def _start_servers(self, servers: Sequence[MariaDBServer]) -> None:
        # In parallel: each start waits mostly on the server's own initialisation.
        with ThreadPoolExecutor(max(1, len(servers))) as pool:
            list(pool.map(MariaDBServer.start, servers))

    def _member(self, server: MariaDBServer) -> MariaDBServer:
        if not any(server is s for s in self._servers):
            raise ValueError(f"{server!r} is not a server of this {type(self).__name__}")
        return server

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)
