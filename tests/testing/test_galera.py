"""GaleraCluster: a write on one node reaches the others; nodes crash, rejoin and desync."""

from __future__ import annotations

from typing import Any

import pymysql
import pytest
from sqlalchemy.engine import make_url

from asyncgone.testing import GaleraCluster, MariaDBServer, ServerBinaryNotFound, TopologyError

pytestmark = pytest.mark.topology

ER_UNKNOWN_COM_ERROR = 1047  # "WSREP has not yet prepared node for application use"


def connect(node: MariaDBServer, user: str = "app") -> Any:
    return pymysql.connect(
        host=node.host,
        port=node.port,
        user=user,
        password="app" if user == "app" else "",
        database="test",
        autocommit=True,
        connect_timeout=5,
        read_timeout=30,
    )


def app(node: MariaDBServer, sql: str, user: str = "app") -> list[tuple[Any, ...]]:
    """Run one statement on a new connection, autocommit, and return its rows."""
    conn = connect(node, user)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


def run(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall())


@pytest.fixture
def cluster(asyncgone_galera: GaleraCluster) -> GaleraCluster:
    """The plugin's cluster with a table ``t`` holding one row, created on the first node."""
    app(asyncgone_galera.nodes[0], "CREATE TABLE t (id INT PRIMARY KEY)")
    app(asyncgone_galera.nodes[0], "INSERT INTO t VALUES (1)")
    return asyncgone_galera


def test_a_write_on_one_node_is_visible_on_another(cluster: GaleraCluster) -> None:
    """A row the app user commits on node 1 is on node 3 once node 3 applied it."""
    first, _, third = cluster.nodes
    app(first, "INSERT INTO t VALUES (2)")
    cluster.wait_applied(third)
    assert app(third, "SELECT id FROM t ORDER BY id") == [(1,), (2,)]
    status = cluster.status(third)
    assert (status["wsrep_ready"], status["wsrep_local_state"]) == ("ON", "4")
    assert (status["wsrep_cluster_size"], status["wsrep_cluster_status"]) == ("3", "Primary")


def test_a_killed_node_rejoins_synced_with_what_it_missed(cluster: GaleraCluster) -> None:
    """After SIGKILL the others go on as two; rejoin() brings the node back Synced with the
    row written while it was down."""
    first, second, third = cluster.nodes
    cluster.kill(third)
    app(first, "INSERT INTO t VALUES (2)")  # stalls until the others evict the dead node
    cluster.wait_synced()
    assert cluster.status(second)["wsrep_cluster_size"] == "2"
    cluster.rejoin(third)
    assert app(third, "SELECT id FROM t ORDER BY id") == [(1,), (2,)]
    assert cluster.status(third)["wsrep_local_state_comment"] == "Synced"
    assert cluster.status(first)["wsrep_cluster_size"] == "3"
    cluster.check()


def test_desync_answers_1047_to_table_queries_until_resync(cluster: GaleraCluster) -> None:
    """A desynced node keeps connections open and accepts new ones, but a query touching a
    table answers 1047, for root too; ``SELECT 1`` still works. resync() restores it."""
    node = cluster.nodes[1]
    opened = connect(node)
    try:
        cluster.desync(node)
        for conn in (opened, connect(node), connect(node, "root")):
            with pytest.raises(pymysql.err.OperationalError) as info:
                run(conn, "SELECT id FROM t")
            assert info.value.args == (
                ER_UNKNOWN_COM_ERROR,
                "WSREP has not yet prepared node for application use",
            )
            assert run(conn, "SELECT 1") == [(1,)]
        state = run(opened, "SELECT @@wsrep_desync, @@wsrep_reject_queries, @@read_only")
        assert state == [(1, "ALL", 0)]
        status = cluster.status(node)
        assert (status["wsrep_local_state"], status["wsrep_ready"]) == ("2", "ON")
        assert status["wsrep_local_state_comment"] == "Donor/Desynced"
        with pytest.raises(TopologyError, match="rejecting queries: ALL"):
            cluster.check()
        cluster.resync(node)
        assert run(opened, "SELECT id FROM t") == [(1,)]
        cluster.check()
    finally:
        opened.close()


def test_the_whole_cluster_restarts_from_a_bootstrapped_node(cluster: GaleraCluster) -> None:
    """After every node was killed, rejoin() refuses until bootstrap() started one; the others
    then rejoin it with the data."""
    first, second, third = cluster.nodes
    for node in cluster.nodes:
        cluster.kill(node)
    with pytest.raises(TopologyError, match="bootstrap"):
        cluster.rejoin(first)
    cluster.bootstrap(second)
    cluster.rejoin(first)
    cluster.rejoin(third)
    assert [app(node, "SELECT id FROM t") for node in cluster.nodes] == [[(1,)]] * 3
    cluster.check()


def test_urls_name_the_nodes(cluster: GaleraCluster) -> None:
    """url() is a multi-host URL SQLAlchemy parses into a tuple; node_url() names one node."""
    hosts = tuple(f"127.0.0.1:{node.port}" for node in cluster.nodes)
    url = make_url(cluster.url("aiomysql"))
    assert (url.username, url.password, url.query["host"]) == ("app", "app", hosts)
    assert make_url(cluster.url(nodes=cluster.nodes[1:])).query["host"] == hosts[1:]
    assert cluster.node_url(cluster.nodes[0]) == f"mysql+asyncmy://app:app@{hosts[0]}/test"


def test_a_missing_provider_names_the_packages() -> None:
    """Without the Galera library the error names the Debian packages to install."""
    with pytest.raises(ServerBinaryNotFound, match="apt install galera-4 rsync"):
        GaleraCluster(provider="/nonexistent/libgalera_smm.so")
