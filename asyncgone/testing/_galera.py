"""GaleraCluster: a disposable MariaDB Galera cluster on loopback, for node-failure tests.

Each node is a ``MariaDBServer`` with four free ports: SQL, Galera replication
(``base_port``), incremental state transfer (``ist.recv_addr``) and full state transfer
(``wsrep_sst_receive_address``, an rsync daemon the joiner runs). The first node bootstraps
the cluster (``--wsrep-new-cluster``) once; every later start of any node, that one included,
is an ordinary join through the cluster address, as it would be in production.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence

from ._mariadb import AdminQueryError, MariaDBServer, ServerBinaryNotFound, free_ports
from ._topology import (
    APP_USER_SQL,
    Topology,
    TopologyError,
    User,
    multi_host_url,
    poll,
    where,
)

__all__ = ["GaleraCluster"]

DEFAULT_NODES = 3
DEFAULT_TIMEOUT = 60.0
_PROVIDERS = (
    "/usr/lib/galera/libgalera_smm.so",  # Debian, Ubuntu: galera-4
    "/usr/lib/libgalera_smm.so",
    "/usr/lib64/galera-4/libgalera_smm.so",  # RHEL, Fedora, openSUSE
    "/usr/lib64/galera/libgalera_smm.so",
    "/usr/local/lib/galera/libgalera_smm.so",
    "/opt/homebrew/lib/libgalera_smm.so",
)
_MISSING = (
    "a Galera cluster needs the Galera provider (libgalera_smm.so) and rsync for state "
    "transfers; install them (Debian: apt install galera-4 rsync) or pass provider="
)
_SYNCED = "4"  # wsrep_local_state: 1 Joining, 2 Donor/Desynced, 3 Joined, 4 Synced

_NODE_OPTIONS = (
    "--wsrep-on=ON",
    "--wsrep-sst-method=rsync",
    "--binlog-format=ROW",
    "--innodb-autoinc-lock-mode=2",
    "--default-storage-engine=InnoDB",
)


def find_provider(provider: str | None = None) -> str:
    """The Galera provider library: ``provider`` if given, else the first that exists of the
    usual install locations.

    Raises:
        ServerBinaryNotFound: no provider, or no ``rsync`` (state transfers need it).
    """
    found = provider or next((p for p in _PROVIDERS if os.path.exists(p)), None)
    if found is None or not os.path.exists(found):
        raise ServerBinaryNotFound(_MISSING + f"; looked for {provider or list(_PROVIDERS)}")
    if shutil.which("rsync") is None:
        raise ServerBinaryNotFound(_MISSING + "; rsync is not on PATH")
    return found


class GaleraCluster(Topology):
    """A MariaDB Galera cluster of ``nodes`` nodes on free loopback ports.

    Every call blocks (forming three nodes takes 10 to 20 s: each joiner copies the first
    node's data with rsync); run them in a thread from async code::

        with GaleraCluster() as cluster:
            url = cluster.url("asyncmy")        # every node, as `app`
            node = cluster.nodes[2]
            cluster.kill(node)                  # SIGKILL: the others go on as a 2-node cluster
                                                # once they evict it (writes stall ~6 s)
            cluster.rejoin(node)                # started again, back when Synced
            cluster.desync(node)                # up, but tables answer error 1047
            cluster.resync(node)

    Parameters:
        nodes: how many nodes (three keeps a majority when one fails).
        host: loopback address to bind and to put in URLs.
        provider: path to ``libgalera_smm.so``; found in the usual places by default.
        options: extra server flags for every node.
        startup_timeout: seconds a node may take to accept connections (a joiner's SQL port
            opens only after its state transfer).
        timeout: default bound, in seconds, for waits on the wsrep state.

    Raises:
        ServerBinaryNotFound: no Galera provider or no rsync (Debian packages galera-4, rsync).
    """

    def __init__(
        self,
        *,
        nodes: int = DEFAULT_NODES,
        host: str = "127.0.0.1",
        provider: str | None = None,
        options: Sequence[str] = (),
        startup_timeout: float = 120.0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a Galera cluster needs at least one node, not {nodes}")
        self.timeout = timeout
        self.provider = find_provider(provider)
        # A cluster name of its own: gcomm would merge clusters that find each other.
        self.name = f"asyncgone-{uuid.uuid4().hex[:12]}"
        ports = free_ports(4 * nodes, host)
        galera_ports = ports[nodes : 2 * nodes]
        address = "gcomm://" + ",".join(f"{host}:{port}" for port in galera_ports)
        self._servers = []
        for index in range(nodes):
            sql, galera, ist, sst = ports[index::nodes]
            provider_options = f"base_port={galera};ist.recv_addr={host}:{ist};gcache.size=32M"
            node_options = (
                *_NODE_OPTIONS,
                f"--wsrep-provider={self.provider}",
                f"--wsrep-cluster-name={self.name}",
                f"--wsrep-cluster-address={address}",
                f"--wsrep-node-name=node{index + 1}",
                f"--wsrep-node-address={host}:{galera}",
                f"--wsrep-provider-options={provider_options}",
                f"--wsrep-sst-receive-address={host}:{sst}",
                *options,
            )
            self._servers.append(
                MariaDBServer(
                    host=host, port=sql, options=node_options, startup_timeout=startup_timeout
                )
            )

    # -- nodes and URLs ----------------------------------------------------------------------

    @property
    def nodes(self) -> list[MariaDBServer]:
        """The nodes, running or not, in the order of the cluster address."""
        return list(self._servers)

    def url(
        self,
        driver: str = "asyncmy",
        *,
        user: User = "app",
        nodes: Sequence[MariaDBServer] | None = None,
        database: str = "test",
    ) -> str:
        """A multi-host URL (``mysql+DRIVER://app:app@/test?host=H:P&host=H:P``) for ``nodes``
        (all by default); see ``ReplicationTopology.url`` for how SQLAlchemy parses it."""
        chosen = [self._member(n) for n in nodes] if nodes is not None else self._servers
        return multi_host_url(chosen, driver, user=user, database=database)

    def node_url(
        self,
        node: MariaDBServer,
        driver: str = "asyncmy",
        *,
        user: User = "app",
        database: str = "test",
    ) -> str:
        """A plain URL for one node: ``mysql+DRIVER://app:app@127.0.0.1:PORT/test``."""
        return self.server_url(node, driver, user=user, database=database)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> GaleraCluster:
        """Bootstrap the cluster on the first node, create the ``app`` user, join the other
        nodes and wait until all are Synced; return self.

        Raises:
            RuntimeError: a node did not start (its log tail is in the message).
            TopologyError: a node did not reach Synced within ``timeout``.
        """
        if any(node.running for node in self._servers):
            return self
        self.bootstrap(self._servers[0])
        self._servers[0].query(APP_USER_SQL)
        # Together: a joiner whose donor is busy with another transfer retries every second.
        self._start_servers(self._servers[1:])
        self.wait_synced()
        return self

    def bootstrap(self, node: MariaDBServer, *, timeout: float | None = None) -> None:
        """Start ``node`` as a new cluster from its own data, when no node runs (after all were
        killed or stopped); ``rejoin()`` the others afterwards. Pick the node that committed
        last: a node ahead of it is given a full copy of its data when it joins.

        Raises:
            TopologyError: another node still runs, or ``node`` did not become Synced.
        """
        running = [where(n) for n in self._servers if n.running]
        if running:
            raise TopologyError(f"cannot bootstrap {where(node)}: {running} still run")
        grastate = self._member(node).datadir / "grastate.dat"
        if grastate.exists():
            # A killed node leaves `safe_to_bootstrap: 0`; the choice is the caller's here.
            text = grastate.read_text()
            grastate.write_text(re.sub(r"safe_to_bootstrap:\s*0", "safe_to_bootstrap: 1", text))
        # --wsrep-new-cluster only this once: starting with it later would split off a second
        # cluster.
        self._start_once(node, "--wsrep-new-cluster")
        self.wait_synced(node, timeout=timeout)

    def stop(self, node: MariaDBServer) -> None:
        """Shut a node down gracefully (SIGTERM): it leaves the cluster cleanly."""
        self._member(node).stop()

    def rejoin(self, node: MariaDBServer, *, timeout: float | None = None) -> None:
        """Start a stopped or killed node again and wait until it is Synced with the data it
        missed: from a peer's gcache (IST) when it can, else as a full rsync copy (SST). A
        killed node first has its position recovered from InnoDB (``--wsrep-recover``), as
        systemd's ``galera_recovery`` does.

        Raises:
            TopologyError: no other node runs (``bootstrap()`` one first), or ``node`` did not
                reach Synced within ``timeout`` seconds.
            RuntimeError: the node did not start (its log tail is in the message).
        """
        others = [n for n in self._servers if n is not self._member(node) and n.running]
        if not others:
            raise TopologyError(f"{where(node)} has no running node to join: bootstrap() one first")
        deadline = self._deadline(timeout)
        if not node.running:
            position = self._start_position(node)
            # A node killed a moment ago is still a member for the others until they suspect it
            # (evs.suspect_timeout, 5 s); joining again before that costs them another ten
            # seconds of sorting out its two identities.
            poll(lambda: self._size(others[0]) == len(others), timeout=self._left(deadline))
            self._start_once(node, *position)
        self.wait_synced(node, timeout=self._left(deadline))

    # -- wsrep state -------------------------------------------------------------------------

    def status(self, node: MariaDBServer) -> dict[str, str | None]:
        """``SHOW GLOBAL STATUS LIKE 'wsrep%'`` of a node as a dict (``wsrep_ready``,
        ``wsrep_local_state``, ``wsrep_cluster_size``, ``wsrep_cluster_status``, ...)."""
        rows = self._member(node).query("SHOW GLOBAL STATUS LIKE 'wsrep%'", timeout=10)
        return {row["Variable_name"] or "": row["Value"] for row in rows}

    def desync(self, node: MariaDBServer) -> None:
        """Take a node out of service while it stays up: ``wsrep_desync=ON`` (it stops
        holding the cluster back; ``wsrep_local_state`` 2, Donor/Desynced) and
        ``wsrep_reject_queries=ALL``. Connections stay open and new ones are accepted, but
        statements that touch tables answer error 1047 ("WSREP has not yet prepared node for
        application use"); ``SELECT 1``, ``SET`` and ``SHOW`` still work."""
        self._member(node).query(
            "SET GLOBAL wsrep_desync=ON; SET GLOBAL wsrep_reject_queries=ALL", timeout=10
        )

    def resync(self, node: MariaDBServer, *, timeout: float | None = None) -> None:
        """Undo ``desync()`` and wait until the node is Synced again."""
        self._member(node).query(
            "SET GLOBAL wsrep_reject_queries=NONE; SET GLOBAL wsrep_desync=OFF", timeout=10
        )
        self.wait_synced(node, timeout=timeout)

    def wait_synced(
        self, node: MariaDBServer | None = None, *, timeout: float | None = None
    ) -> None:
        """Wait until ``node`` (by default every running node) is ready (``wsrep_ready=ON``),
        Synced (``wsrep_local_state=4``) in a Primary component that holds every running
        node.

        Raises:
            TopologyError: ``timeout`` seconds passed; the message shows the wsrep state and
                the end of the node's error log.
        """
        deadline = self._deadline(timeout)
        for waited in [self._member(node)] if node else [n for n in self._servers if n.running]:
            last: dict[str, str | None] = {}

            def synced(waited: MariaDBServer = waited) -> bool:
                nonlocal last
                try:
                    last = self.status(waited)
                except AdminQueryError as exc:
                    last = {"error": str(exc)}
                size = str(sum(n.running for n in self._servers))
                return last.get("wsrep_cluster_size") == size and self._serving(last)

            if not poll(synced, timeout=self._left(deadline)):
                state = {k.removeprefix("wsrep_"): v for k, v in last.items() if k in _SHOWN}
                raise TopologyError(
                    f"Galera node {where(waited)} did not become Synced in time: {state}; "
                    f"its log ends with:\n{waited.log_tail(15)}"
                )

    def wait_applied(
        self, node: MariaDBServer | None = None, *, timeout: float | None = None
    ) -> None:
        """Wait until ``node`` (by default every running node) applied every transaction the
        cluster committed so far: a commit returns once the cluster certified it, and the other
        nodes apply it a moment later.

        Raises:
            TopologyError: ``timeout`` seconds passed, or the node could not answer.
        """
        deadline = self._deadline(timeout)
        for waited in [self._member(node)] if node else [n for n in self._servers if n.running]:
            try:
                # A causal read (wsrep_sync_wait) starts only once the node applied everything
                # committed before it.
                waited.query(
                    "SET SESSION wsrep_sync_wait=1;"
                    " SELECT COUNT(*) FROM information_schema.SCHEMATA",
                    timeout=max(1.0, self._left(deadline)),
                )
            except AdminQueryError as exc:
                raise TopologyError(f"Galera node {where(waited)} did not catch up: {exc}") from exc

    def check(self) -> None:
        """Raise ``TopologyError`` listing what is unhealthy: a node down, not Synced, or
        rejecting queries."""
        problems = []
        for node in self._servers:
            if not node.running:
                problems.append(f"{where(node)} is not running")
                continue
            try:
                state = self.status(node)
                rejecting = node.value("SELECT @@wsrep_reject_queries", timeout=10)
            except AdminQueryError as exc:
                problems.append(str(exc))
                continue
            if not self._serving(state) or rejecting != "NONE":
                size = state.get("wsrep_cluster_size")
                problems.append(
                    f"{where(node)} is {state.get('wsrep_local_state_comment')} in a cluster of "
                    f"{size}, rejecting queries: {rejecting}"
                )
        if problems:
            raise TopologyError("; ".join(problems))

    @staticmethod
    def _start_once(node: MariaDBServer, *options: str) -> None:
        regular = node.options
        node.options = (*regular, *options)
        try:
            node.start()
        finally:
            node.options = regular

    @staticmethod
    def _start_position(node: MariaDBServer) -> list[str]:
        # A crashed node leaves seqno -1 in grastate.dat and, not knowing its position, would
        # ask for a full copy (SST). Like systemd's galera_recovery, find the position in
        # InnoDB first (a second's work), so that it catches up from a peer's gcache (IST).
        grastate = node.datadir / "grastate.dat"
        if not grastate.exists() or not re.search(r"seqno:\s*-1\b", grastate.read_text()):
            return []
        found = re.search(r"Recovered position: (\S+:\d+)", node.run_once("--wsrep-recover"))
        return [f"--wsrep-start-position={found.group(1)}"] if found else []

    def _size(self, node: MariaDBServer) -> int:
        try:
            return int(self.status(node).get("wsrep_cluster_size") or 0)
        except (AdminQueryError, ValueError):
            return 0

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    @staticmethod
    def _serving(state: dict[str, str | None]) -> bool:
        return (
            state.get("wsrep_ready") == "ON"
            and state.get("wsrep_local_state") == _SYNCED
            and state.get("wsrep_cluster_status") == "Primary"
        )

    def __repr__(self) -> str:
        nodes = ", ".join(f"{where(n)}{'' if n.running else ' (down)'}" for n in self._servers)
        return f"<GaleraCluster {self.name}: {nodes}>"


_SHOWN = (
    "wsrep_ready",
    "wsrep_local_state_comment",
    "wsrep_cluster_status",
    "wsrep_cluster_size",
    "wsrep_connected",
    "error",
)
