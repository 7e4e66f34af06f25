"""ReplicationTopology: GTID replication that lags, fails over, switches over and rejoins."""

from __future__ import annotations

import threading
from typing import Any

import pymysql
import pytest
from sqlalchemy.engine import make_url

from asyncgone.pytest_plugin import _healthy_topology
from asyncgone.testing import MariaDBServer, ReplicationTopology, TopologyError

pytestmark = pytest.mark.topology

ER_OPTION_PREVENTS_STATEMENT = 1290


def app(server: MariaDBServer, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one statement as the application user, autocommit, and return its rows."""
    conn = pymysql.connect(
        host=server.host,
        port=server.port,
        user="app",
        password="app",
        database="test",
        autocommit=True,
        connect_timeout=5,
        read_timeout=30,
    )
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args or None)
            return list(cur.fetchall())
    finally:
        conn.close()


def ids(server: MariaDBServer) -> list[int]:
    return [row[0] for row in app(server, "SELECT id FROM t ORDER BY id")]


@pytest.fixture
def topology(asyncgone_replication: ReplicationTopology) -> ReplicationTopology:
    """The plugin's topology with a table ``t`` on every server."""
    app(asyncgone_replication.primary, "CREATE TABLE t (id INT PRIMARY KEY)")
    asyncgone_replication.wait_caught_up()
    return asyncgone_replication


def test_a_write_on_the_primary_reaches_every_replica(topology: ReplicationTopology) -> None:
    """A row the app inserts on the primary is on both replicas once they caught up."""
    app(topology.primary, "INSERT INTO t VALUES (1)")
    topology.wait_caught_up()
    assert [ids(replica) for replica in topology.replicas] == [[1], [1]]
    position = topology.gtid_position(topology.primary)
    assert [topology.gtid_position(r) for r in topology.replicas] == [position, position]


def test_the_app_user_cannot_write_on_a_replica(topology: ReplicationTopology) -> None:
    """Replicas are read-only and the app user has no privilege that bypasses it: 1290."""
    replica = topology.replicas[0]
    assert app(replica, "SELECT @@read_only") == [(1,)]
    assert app(topology.primary, "SELECT @@read_only") == [(0,)]
    with pytest.raises(pymysql.err.OperationalError) as info:
        app(replica, "INSERT INTO t VALUES (1)")
    assert info.value.args[0] == ER_OPTION_PREVENTS_STATEMENT
    assert "--read-only" in info.value.args[1]
    grants = " ".join(row[0] for row in app(replica, "SHOW GRANTS"))
    assert "SUPER" not in grants
    assert "READ_ONLY ADMIN" not in grants


def test_the_app_user_reads_replication_state(topology: ReplicationTopology) -> None:
    """SLAVE MONITOR lets the app user see SHOW SLAVE STATUS; GTID positions need nothing."""
    replica = topology.replicas[0]
    [row] = app(replica, "SHOW SLAVE STATUS")
    assert topology.primary.port in row
    assert app(replica, "SELECT @@gtid_slave_pos") == [(topology.gtid_position(replica),)]


def test_lag_hides_writes_until_it_ends(topology: ReplicationTopology) -> None:
    """Inside lag() a replica misses a new row (and cannot catch up); after it, it has it."""
    lagging, other = topology.replicas
    with topology.lag(lagging):
        app(topology.primary, "INSERT INTO t VALUES (1)")
        topology.wait_caught_up(other)
        assert ids(other) == [1]
        assert ids(lagging) == []
        status = topology.replica_status(lagging)
        assert (status["Slave_IO_Running"], status["Slave_SQL_Running"]) == ("Yes", "No")
        with pytest.raises(TopologyError, match=f"{lagging.port} stopped"):
            topology.wait_caught_up(lagging, timeout=5)
    topology.wait_caught_up(lagging)
    assert ids(lagging) == [1]


def test_promote_after_the_primary_crashed(topology: ReplicationTopology) -> None:
    """After kill(primary) and promote(), the replica takes writes and the other follows it;
    the crashed primary rejoins as a read-only replica with the new rows."""
    old = topology.primary
    app(old, "INSERT INTO t VALUES (1)")
    topology.wait_caught_up()
    topology.kill(old)
    new, other = topology.replicas[0], topology.replicas[1]
    topology.promote(new)
    assert topology.primary is new
    assert topology.replicas == [old, other]
    assert app(new, "SELECT @@read_only") == [(0,)]
    app(new, "INSERT INTO t VALUES (2)")
    topology.wait_caught_up()
    assert ids(other) == [1, 2]
    assert topology.replica_status(other)["Master_Port"] == str(new.port)
    topology.rejoin(old)
    assert ids(old) == [1, 2]
    assert app(old, "SELECT @@read_only") == [(1,)]
    topology.check()


def test_switchover_loses_no_transaction(topology: ReplicationTopology) -> None:
    """Every row a writer committed on the old primary, up to its first 1290, is on the new
    primary after switchover(), even from a replica that was behind."""
    old, target = topology.primary, topology.replicas[0]
    committed: list[int] = []
    refused: list[int] = []

    def write() -> None:
        for n in range(1, 100_000):
            try:
                app(old, "INSERT INTO t VALUES (%s)", n)
            except pymysql.err.OperationalError as exc:
                refused.append(exc.args[0])
                return
            committed.append(n)

    writer = threading.Thread(target=write)
    with topology.lag(target):
        writer.start()
        while len(committed) < 20:
            writer.join(0.01)
    topology.switchover(target)
    writer.join(30)
    assert not writer.is_alive()
    assert refused == [ER_OPTION_PREVENTS_STATEMENT]
    assert ids(target) == committed
    app(target, "INSERT INTO t VALUES (0)")
    topology.wait_caught_up()
    assert ids(old) == [0, *committed]
    topology.check()


def test_rejoin_refuses_a_server_the_primary_cannot_serve(topology: ReplicationTopology) -> None:
    """A crashed primary holding a commit no replica got cannot rejoin; rebuild() copies the
    new primary's data into it instead."""
    old = topology.primary
    for replica in topology.replicas:
        topology.stop_replication(replica)
    app(old, "INSERT INTO t VALUES (1)")  # on the old primary only
    topology.kill(old)
    new = topology.replicas[0]
    topology.promote(new)
    app(new, "INSERT INTO t VALUES (2)")
    with pytest.raises(TopologyError, match="rebuild") as info:
        topology.rejoin(old, timeout=10)
    assert f"{old.port} stopped" in str(info.value)
    assert "error 1236" in str(info.value)
    topology.rebuild(old)
    assert ids(old) == [2]
    topology.check()


def test_urls_name_every_server_primary_first(topology: ReplicationTopology) -> None:
    """url() is a multi-host URL SQLAlchemy parses into a tuple of hosts; server_url() is one."""
    hosts = tuple(f"127.0.0.1:{s.port}" for s in topology.servers)
    url = make_url(topology.url("aiomysql"))
    assert (url.drivername, url.username, url.password, url.database) == (
        "mysql+aiomysql",
        "app",
        "app",
        "test",
    )
    assert url.host is None
    assert url.query["host"] == hosts
    assert make_url(topology.url(role="replicas")).query["host"] == hosts[1:]
    assert make_url(topology.url(role="primary", user="root")).query == {"host": hosts[0]}
    replica = topology.replicas[1]
    assert topology.server_url(replica) == f"mysql+asyncmy://app:app@{hosts[2]}/test"
    assert topology.server_url(replica, "aiomysql", user="root") == replica.url("aiomysql")


def test_misuse_is_refused_before_anything_changes(topology: ReplicationTopology) -> None:
    """Promoting the primary, or a server of another topology, raises ValueError."""
    with pytest.raises(ValueError, match="is the primary"):
        topology.promote(topology.primary)
    stranger = MariaDBServer()
    try:
        with pytest.raises(ValueError, match="not a server of this ReplicationTopology"):
            topology.kill(stranger)
    finally:
        stranger.close()
    with pytest.raises(ValueError, match="at least one replica"):
        ReplicationTopology(replicas=0)


def test_the_fixture_rebuilds_an_altered_topology_and_empties_a_healthy_one() -> None:
    """A topology with a server down is replaced; a healthy one is kept with an empty ``test``."""
    holder: dict[str, ReplicationTopology] = {}
    try:
        first = _healthy_topology(holder, lambda: ReplicationTopology(replicas=1))
        app(first.primary, "CREATE TABLE leftover (id INT)")
        assert _healthy_topology(holder, lambda: ReplicationTopology(replicas=1)) is first
        assert app(first.replicas[0], "SHOW TABLES") == []
        first.kill(first.replicas[0])
        second = _healthy_topology(holder, lambda: ReplicationTopology(replicas=1))
        assert second is not first
        assert not first.primary.basedir.exists()
        second.check()
    finally:
        for topology in holder.values():
            topology.close()
