"""ReplicationTopology: a disposable MariaDB primary with GTID replicas, for failover tests.

Every server is a ``MariaDBServer`` with a binary log, its own ``--server-id``,
``--log-slave-updates`` (so any replica can become the primary and serve the others: its
binary log holds every transaction since the topology started) and ``--gtid-strict-mode`` (so
a server holding a transaction the primary never had stops replicating loudly instead of
drifting). Replicas replicate with ``MASTER_USE_GTID=slave_pos`` and run read-only.

Administration goes through ``MariaDBServer.query`` (the ``mariadb`` client as ``root``);
applications connect as ``app`` (password ``app``), a user without SUPER or READ ONLY ADMIN,
because MariaDB lets those two privileges write on a read-only server.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Literal

from ._mariadb import AdminQueryError, MariaDBServer, free_ports
from ._topology import (
    APP_USER_SQL,
    DEFAULT_TIMEOUT,
    Topology,
    TopologyError,
    User,
    multi_host_url,
    where,
)

__all__ = ["ReplicationTopology"]

DEFAULT_REPLICAS = 2
_REPL_USER = "repl"
_REPL_PASSWORD = "repl"
_WAIT_STEP = 1.0  # seconds per MASTER_GTID_WAIT, so replication errors are noticed quickly

_SERVER_OPTIONS = (
    "--binlog-format=ROW",
    "--log-slave-updates",
    "--gtid-strict-mode=ON",
    # Named explicitly: the default name follows the host name.
    "--relay-log=relay-bin",
)
# Also a start flag, so a replica that restarts comes back read-only, as a configured one would.
_READ_ONLY = "--read-only=ON"

# On the first primary only: the binary log carries the users to every replica.
_USERS_SQL = f"""\
CREATE USER '{_REPL_USER}'@'%' IDENTIFIED BY '{_REPL_PASSWORD}';
GRANT REPLICATION SLAVE ON *.* TO '{_REPL_USER}'@'%';
{APP_USER_SQL}"""

Role = Literal["all", "primary", "replicas"]


class ReplicationTopology(Topology):
    """A MariaDB primary with ``replicas`` GTID replicas on free loopback ports.

    Every call blocks (starting three servers takes a few seconds); run them in a thread from
    async code. Roles change with ``promote()`` and ``switchover()``; ``primary`` and
    ``replicas`` always show the current ones::

        with ReplicationTopology() as topology:
            url = topology.url("asyncmy")                # every server, primary first, as `app`
            topology.kill(topology.primary)              # the primary crashes
            old = topology.primary
            topology.promote(topology.replicas[0])       # failover: a replica takes over
            topology.rejoin(old)                         # restarted, now a read-only replica

    Parameters:
        replicas: how many replicas (at least one).
        host: loopback address to bind and to put in URLs.
        options: extra server flags for every server.
        startup_timeout: seconds each server may take to accept connections.
        timeout: default bound, in seconds, for every wait (catching up, promotion, rejoin).

    Waits that do not finish raise ``TopologyError``; misuse (a server of another topology,
    promoting the primary) raises ``ValueError``.
    """

    def __init__(
        self,
        *,
        replicas: int = DEFAULT_REPLICAS,
        host: str = "127.0.0.1",
        options: Sequence[str] = (),
        startup_timeout: float = 60.0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"a replication topology needs at least one replica, not {replicas}")
        self.timeout = timeout
        self._options = tuple(options)
        ports = free_ports(replicas + 1, host)
        self._servers = [
            MariaDBServer(
                host=host,
                port=port,
                log_bin=True,
                server_id=number,
                startup_timeout=startup_timeout,
            )
            for number, port in enumerate(ports, start=1)
        ]
        self._primary = self._servers[0]
        self._next_server_id = len(self._servers) + 1
        for server in self._servers:
            self._set_role(server)

    # -- roles and URLs ----------------------------------------------------------------------

    @property
    def primary(self) -> MariaDBServer:
        """The current primary (it may have been killed: see ``promote()``)."""
        return self._primary

    @property
    def replicas(self) -> list[MariaDBServer]:
        """Every other server, running or not, in the order they were created."""
        return [s for s in self._servers if s is not self._primary]

    @property
    def servers(self) -> list[MariaDBServer]:
        """The primary, then the replicas."""
        return [self._primary, *self.replicas]

    def url(
        self,
        driver: str = "asyncmy",
        *,
        role: Role = "all",
        user: User = "app",
        database: str = "test",
    ) -> str:
        """A multi-host URL (``mysql+DRIVER://app:app@/test?host=H:P&host=H:P``), primary first.

        ``make_url()`` parses the hosts into a tuple, ``url.query["host"]``; SQLAlchemy's
        MySQL dialects cannot connect with it by themselves; ``asyncgone.create_engine()``
        can (each connection searches for a host of its ``target_role``). ``role`` picks
        the servers:
        ``"all"``, ``"primary"`` or ``"replicas"``; ``user`` is ``"app"`` (password ``app``)
        or ``"root"`` (no password).
        """
        chosen = {"all": self.servers, "primary": [self._primary], "replicas": self.replicas}
        return multi_host_url(chosen[role], driver, user=user, database=database)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ReplicationTopology:
        """Start every server, create the users, start replication and wait until the
        replicas caught up; return self.

        Raises:
            TopologyError: replication did not start within ``timeout``.
            RuntimeError: a server did not start (its log tail is in the message).
        """
        self._start_servers(self._servers)
        self._primary.query(_USERS_SQL)
        for replica in self.replicas:
            self._replicate_from(replica, self._primary)
        self._wait_following(self.replicas, self._deadline(None))
        return self

    def start_server(self, server: MariaDBServer) -> None:
        """Start a stopped server again with its data; a replica resumes replicating.

        A killed primary that was replaced comes back read-only and replicating from nobody:
        ``rejoin()`` it.
        """
        self._member(server).start()

    def restart(self, server: MariaDBServer) -> None:
        """Stop a server gracefully and start it again."""
        self._member(server).restart()

    # -- failover ----------------------------------------------------------------------------

    def promote(
        self, replica: MariaDBServer, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        """Fail over: make ``replica`` the primary and point the other servers at it.

        The old primary, if it still runs, is made read-only first and becomes a replica of
        the new one (it must not hold transactions the new primary lacks); if it is down it
        stays down, read-only at its next start: ``rejoin()`` it then. With ``wait``, the
        promoted replica first applies every transaction it had received, and the call returns
        once the other running servers replicate from it and caught up.

        Raises:
            ValueError: ``replica`` is the primary or not of this topology.
            TopologyError: ``replica`` is not running, or a wait passed ``timeout`` seconds
                (``self.timeout`` by default), or a server could not follow the new primary.
        """
        deadline = self._deadline(timeout)
        self._replica(replica)
        if not replica.running:
            raise TopologyError(f"cannot promote {where(replica)}: it is not running")
        old = self._primary
        if old.running:
            # Before anything else: no application write may land on the old primary after
            # the new one took over.
            old.query("SET GLOBAL read_only=ON")
        if wait:
            self._apply_relay_log(replica, deadline)
        replica.query("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only=OFF")
        self._primary = replica
        for server in self._servers:
            self._set_role(server)
        followers = [s for s in self.replicas if s.running]
        for server in followers:
            self._replicate_from(server, replica)
        if wait:
            self._wait_following(followers, deadline)

    def switchover(self, replica: MariaDBServer, *, timeout: float | None = None) -> None:
        """Planned failover without losing a transaction: the primary turns read-only,
        ``replica`` applies everything it committed, then takes over (see ``promote()``); the
        old primary replicates from it.

        Raises:
            ValueError: as ``promote()``.
            TopologyError: the primary or ``replica`` is down, or ``replica`` did not catch up
                within ``timeout`` seconds (the old primary is then writable again).
        """
        deadline = self._deadline(timeout)
        self._replica(replica)
        old = self._primary
        if not (old.running and replica.running):
            down = old if not old.running else replica
            raise TopologyError(f"switchover needs both servers running; {where(down)} is not")
        old.query("SET GLOBAL read_only=ON")
        try:
            self._wait_applied(replica, self.gtid_position(old), deadline)
        except BaseException:
            old.query("SET GLOBAL read_only=OFF")
            raise
        self.promote(replica, timeout=max(0.0, deadline - time.monotonic()))

    def rejoin(self, server: MariaDBServer, *, timeout: float | None = None) -> None:
        """Start ``server`` if it is down and make it a read-only replica of the primary,
        caught up when this returns; for an old primary after ``promote()``.

        Raises:
            ValueError: ``server`` is the primary or not of this topology.
            TopologyError: it did not catch up within ``timeout`` seconds, or it cannot
                replicate because it holds transactions the primary lacks (a crashed primary's
                last commits that never reached a replica): ``rebuild()`` it.
        """
        deadline = self._deadline(timeout)
        self._replica(server)
        server.start()
        self._replicate_from(server, self._primary)
        self._wait_following([server], deadline)

    def rebuild(self, server: MariaDBServer, *, timeout: float | None = None) -> None:
        """Discard a replica's data and make it a fresh copy of the primary.

        The primary's binary log holds every transaction since the topology started (the
        servers keep their binary logs and log what they replicate), so a fresh server that
        replicates from the empty position gets everything. It gets a new ``--server-id``:
        a replica skips the events that carry its own, and some of those are this server's
        own earlier transactions.

        Raises:
            ValueError, TopologyError: as ``rejoin()``.
        """
        self._replica(server).wipe()
        server.server_id, self._next_server_id = self._next_server_id, self._next_server_id + 1
        self.rejoin(server, timeout=timeout)

    # -- replication control -----------------------------------------------------------------

    def stop_replication(self, replica: MariaDBServer) -> None:
        """``STOP SLAVE``: the replica neither receives nor applies until started again."""
        self._replica(replica).query("STOP SLAVE")

    def start_replication(self, replica: MariaDBServer) -> None:
        """``START SLAVE``: resume receiving and applying."""
        self._replica(replica).query("START SLAVE")

    @contextlib.contextmanager
    def lag(self, replica: MariaDBServer) -> Iterator[MariaDBServer]:
        """Hold back a replica: inside the block it still receives the primary's transactions
        (its connection to the primary stays up) but applies none (``STOP SLAVE SQL_THREAD``);
        leaving the block starts applying again without waiting (see ``wait_caught_up()``)::

            with topology.lag(replica):
                ...  # a write on the primary is not visible on replica
            topology.wait_caught_up(replica)
        """
        self._replica(replica).query("STOP SLAVE SQL_THREAD")
        try:
            yield replica
        finally:
            if replica.running and replica is not self._primary:
                replica.query("START SLAVE SQL_THREAD")

    def gtid_position(self, server: MariaDBServer) -> str:
        """``@@gtid_binlog_pos``: the last transaction the server committed or applied, per
        replication domain (``"0-1-42"``; empty before the first one)."""
        return self._member(server).value("SELECT @@gtid_binlog_pos") or ""

    def wait_caught_up(
        self, replica: MariaDBServer | None = None, *, timeout: float | None = None
    ) -> None:
        """Wait until ``replica`` (by default every running replica) applied everything the
        primary has committed so far.

        Raises:
            TopologyError: ``timeout`` seconds passed, the primary is down, or replication is
                stopped or failed (``lag()``, ``stop_replication()``, a replication error: see
                its message).
        """
        deadline = self._deadline(timeout)
        if not self._primary.running:
            raise TopologyError(f"the primary {where(self._primary)} is down: promote() a replica")
        targets = [self._replica(replica)] if replica else [s for s in self.replicas if s.running]
        position = self.gtid_position(self._primary)
        for server in targets:
            self._wait_applied(server, position, deadline)

    def replica_status(self, replica: MariaDBServer) -> dict[str, str | None]:
        """``SHOW SLAVE STATUS`` of a server as a dict (empty if it replicates from nobody)."""
        rows = self._member(replica).query("SHOW SLAVE STATUS")
        return rows[0] if rows else {}

    def check(self) -> None:
        """Raise ``TopologyError`` listing what is unhealthy: a server down, a primary that is
        read-only, a replica that is writable or not replicating from the primary."""
        problems = []
        for server in self._servers:
            if not server.running:
                problems.append(f"{where(server)} is not running")
                continue
            try:
                read_only = server.value("SELECT @@read_only", timeout=5)
                status = {} if server is self._primary else self.replica_status(server)
            except AdminQueryError as exc:
                problems.append(str(exc))
                continue
            if server is self._primary:
                if read_only != "0":
                    problems.append(f"primary {where(server)} is read-only")
                continue
            if read_only != "1":
                problems.append(f"replica {where(server)} is writable")
            state = [status.get(k) for k in ("Slave_IO_Running", "Slave_SQL_Running")]
            if status.get("Master_Port") != str(self._primary.port) or state != ["Yes", "Yes"]:
                problems.append(f"replica {where(server)} does not replicate from the primary")
        if problems:
            raise TopologyError("; ".join(problems))

    # -- internals ---------------------------------------------------------------------------

    def _replica(self, server: MariaDBServer) -> MariaDBServer:
        if self._member(server) is self._primary:
            raise ValueError(f"{where(server)} is the primary, not a replica")
        return server

    def _set_role(self, server: MariaDBServer) -> None:
        role = () if server is self._primary else (_READ_ONLY,)
        server.options = (*_SERVER_OPTIONS, *self._options, *role)

    def _replicate_from(self, server: MariaDBServer, source: MariaDBServer) -> None:
        # With --log-slave-updates the binary log position is everything the server holds,
        # whatever its past role: for an old primary, whose gtid_slave_pos is empty or stale,
        # it is the only right starting point (MASTER_USE_GTID=current_pos, which did this,
        # is deprecated since 10.10).
        server.query(
            "SET GLOBAL read_only=ON; STOP SLAVE; RESET SLAVE ALL;"
            " SET GLOBAL gtid_slave_pos=@@gtid_binlog_pos;"
            f" CHANGE MASTER TO MASTER_HOST='{source.host}', MASTER_PORT={source.port},"
            f" MASTER_USER='{_REPL_USER}', MASTER_PASSWORD='{_REPL_PASSWORD}',"
            " MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1;"
            " START SLAVE"
        )

    def _apply_relay_log(self, replica: MariaDBServer, deadline: float) -> None:
        # Stop receiving, then apply all that was received: nothing the replica has already
        # fetched from the old primary is lost by promoting it.
        replica.query("STOP SLAVE IO_THREAD; START SLAVE SQL_THREAD")
        received = self.replica_status(replica).get("Gtid_IO_Pos") or ""
        self._wait_applied(replica, received, deadline, receiving=False)

    def _wait_following(self, servers: list[MariaDBServer], deadline: float) -> None:
        # After CHANGE MASTER, wait for the primary to accept the replica first: it then sends
        # the name of the binary log it serves from (Master_Log_File, empty until then), or
        # refuses one that holds transactions it lacks (error 1236). Until either happens,
        # MASTER_GTID_WAIT, which compares only sequence numbers, could call a diverged server
        # caught up.
        position = self.gtid_position(self._primary)
        for server in servers:
            while not (status := self.replica_status(server)).get("Master_Log_File"):
                stopped = [k for k in ["Slave_IO_Running"] if status.get(k, "No") == "No"]
                if stopped or time.monotonic() >= deadline:
                    raise TopologyError(self._lag_report(server, position, status, stopped))
                time.sleep(0.05)
            self._wait_applied(server, position, deadline)

    def _wait_applied(
        self, server: MariaDBServer, position: str, deadline: float, *, receiving: bool = True
    ) -> None:
        # MASTER_GTID_WAIT in short steps: between them, a stopped replication thread ends the
        # wait at once instead of at the deadline.
        while True:
            step = min(_WAIT_STEP, max(0.0, deadline - time.monotonic()))
            wait = f"SELECT MASTER_GTID_WAIT('{position}', {step:.3f})"
            if server.value(wait, timeout=step + 10) == "0":
                return
            status = self.replica_status(server)
            threads = ["Slave_SQL_Running", *(["Slave_IO_Running"] if receiving else [])]
            stopped = [k for k in threads if status.get(k, "No") == "No"]
            if stopped or time.monotonic() >= deadline:
                raise TopologyError(self._lag_report(server, position, status, stopped))

    def _lag_report(
        self,
        server: MariaDBServer,
        position: str,
        status: dict[str, str | None],
        stopped: list[str],
    ) -> str:
        try:
            applied = server.value("SELECT @@gtid_slave_pos", timeout=5)
        except AdminQueryError as exc:
            applied = f"? ({exc})"
        what = f"stopped ({', '.join(stopped)}=No)" if stopped else "did not catch up in time"
        errors = [
            f"; error {status[key]}: {status[key.replace('Errno', 'Error')]}"
            for key in ("Last_IO_Errno", "Last_SQL_Errno")
            if status.get(key, "0") != "0"
        ]
        if any(e.startswith("; error 1236") for e in errors):
            errors.append(" (it holds transactions the primary lacks: rebuild() it)")
        return (
            f"replica {where(server)} {what}: waiting for GTID position {position!r}, applied "
            f"{applied!r}{''.join(errors)}; its log ends with:\n{server.log_tail(10)}"
        )

    def __repr__(self) -> str:
        def show(server: MariaDBServer) -> str:
            return f"{where(server)}{'' if server.running else ' (down)'}"

        replicas = ", ".join(show(s) for s in self.replicas)
        return f"<ReplicationTopology primary {show(self._primary)}, replicas {replicas}>"
