"""A Galera node's wsrep state, as the server-facts query reads it, and whether it may serve.

MariaDB Galera Cluster nodes serve the application only when ``wsrep_ready`` is ``ON`` and
``wsrep_local_state`` is 4 (Synced) in a ``Primary`` component (``wsrep_cluster_status``),
and the operator has not told them to refuse queries (``wsrep_reject_queries`` other than
``NONE``: such a node answers 1047 to every table query while it reports Synced).
A node that is joining (1, 3), donating its state or desynced (2), or cut off from the
primary component answers error 1047 ("WSREP has not yet prepared node for application
use") while its sockets stay open, or serves stale data.

The state costs no round trip of its own: ``COLUMNS_SQL`` adds three columns to the
server-facts query every new connection runs (``_server.FACTS_SQL``), read from
``information_schema.GLOBAL_VARIABLES`` and ``GLOBAL_STATUS`` with scalar subqueries, which
MariaDB answers with or without Galera (a server without the wsrep provider reports
``wsrep_on=OFF``; one built without wsrep support has no such rows, read as NULL). MySQL
8 has no ``information_schema.GLOBAL_STATUS``: the columns are asked of MariaDB servers
only (``for_server``), told by the version string of the handshake.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
    "COLUMNS_SQL",
    "NODE_NOT_READY",
    "STATUS_SQL",
    "WsrepState",
    "for_server",
    "parse",
]

#: ER_UNKNOWN_COM_ERROR: what a Galera node that may not serve answers to table queries.
NODE_NOT_READY = 1047

_SYNCED = 4
_STATES = {1: "Joining", 2: "Donor/Desynced", 3: "Joined", 4: "Synced"}

_VARIABLE_NAMES = "'WSREP_ON','WSREP_REJECT_QUERIES'"
_STATUS_NAMES = "'WSREP_READY','WSREP_LOCAL_STATE','WSREP_CLUSTER_STATUS'"

#: The extra columns of the server-facts query: the variables ``wsrep_on`` and
#: ``wsrep_reject_queries``, then the three status values, each column as ``NAME=VALUE``
#: pairs joined by commas (NULL when the server has none of them).
COLUMNS_SQL = (
    ", (SELECT GROUP_CONCAT(VARIABLE_NAME, '=', VARIABLE_VALUE)"
    f" FROM information_schema.GLOBAL_VARIABLES WHERE VARIABLE_NAME IN ({_VARIABLE_NAMES}))"
    ", (SELECT GROUP_CONCAT(VARIABLE_NAME, '=', VARIABLE_VALUE)"
    f" FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME IN ({_STATUS_NAMES}))"
)

#: The query the keepalive's watch runs on its own connection to each Galera node.
STATUS_SQL = "SELECT 1" + COLUMNS_SQL


@dataclasses.dataclass(frozen=True, slots=True)
class WsrepState:
    """What a server said about its Galera replication when a connection asked.

    ``on`` is ``@@wsrep_on``; ``ready`` is ``wsrep_ready``; ``local_state`` is
    ``wsrep_local_state`` (1 Joining, 2 Donor/Desynced, 3 Joined, 4 Synced; None if
    unknown); ``cluster_status`` is ``wsrep_cluster_status`` (``Primary``,
    ``non-Primary``, ``Disconnected``); ``reject_queries`` is ``@@wsrep_reject_queries``
    (``NONE``, ``ALL``, ``ALL_KILL``).
    """

    on: bool
    ready: bool = False
    local_state: int | None = None
    cluster_status: str = ""
    reject_queries: str = "NONE"

    @property
    def eligible(self) -> bool:
        """Whether the node may take the application's work: ready, Synced, Primary.

        Always true for a server that does not run Galera (``on`` false)."""
        return not self.on or (
            self.ready
            and self.local_state == _SYNCED
            and self.cluster_status == "Primary"
            and self.reject_queries == "NONE"
        )

    def describe(self) -> str:
        """The state in a few words, e.g. ``Synced, ready, Primary component``."""
        if not self.on:
            return "wsrep off (not a Galera node)"
        name = _STATES.get(self.local_state or 0, f"state {self.local_state}")
        ready = "ready" if self.ready else "not ready"
        text = f"{name}, {ready}, {self.cluster_status or 'unknown'} component"
        if self.reject_queries != "NONE":
            text += f", wsrep_reject_queries={self.reject_queries}"
        return text


def for_server(conn: Any) -> str:
    """The wsrep columns for a driver connection's server: ``COLUMNS_SQL`` for MariaDB,
    nothing for MySQL (no round trip: the version came with the handshake)."""
    try:
        version = str(conn.get_server_info())
    except Exception:  # pragma: no cover - both drivers keep the handshake's version
        return ""
    return COLUMNS_SQL if "mariadb" in version.lower() else ""


def parse(variables: object, status: object) -> WsrepState | None:
    """A ``WsrepState`` from the two extra columns, or None when the server has neither."""
    if variables is None and status is None:
        return None
    values: dict[str, str] = {}
    for pair in f"{variables or ''},{status or ''}".split(","):
        name, _, value = pair.partition("=")
        values[name.strip().upper()] = value.strip()
    local = values.get("WSREP_LOCAL_STATE", "")
    return WsrepState(
        on=values.get("WSREP_ON", "").upper() in ("ON", "1"),
        reject_queries=values.get("WSREP_REJECT_QUERIES", "NONE").upper() or "NONE",
        ready=values.get("WSREP_READY", "").upper() == "ON",
        local_state=int(local) if local.isdigit() else None,
        cluster_status=values.get("WSREP_CLUSTER_STATUS", ""),
    )
