"""``asyncgone doctor`` for a multi-host URL: every host's reachability, role, replication
state, lag and GTID position, and what asyncgone would do with it.

Each host gets a connection of its own (bounded by the doctor's timeout), the query every
new asyncgone connection runs (``_server.read_facts``: the role), and the replica check
the ``Database``'s replica monitor runs (``_replicas.check_host``: ``SHOW SLAVE STATUS``,
the GTID positions; reading replication state needs the SLAVE MONITOR or REPLICATION
CLIENT privilege, else it shows as not replicating). A Galera node shows its wsrep state
instead, read by the same facts query (``_wsrep``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._connector import open_connection
from ._errors import describe
from ._hosts import HostAddress, TargetRole
from ._replicas import ReplicaHealth, check_host
from ._routing import DEFAULT_MAX_REPLICA_LAG
from ._server import read_facts
from ._state import EngineState
from ._statements import close

__all__ = ["examine_hosts", "host_lines"]


async def examine_hosts(
    state: EngineState, timeout: float, target: TargetRole = "primary"
) -> list[dict[str, Any]]:
    """One entry per host of the engine's search, checked concurrently, each bounded;
    ``target`` is the role the verdicts speak of (a multi-host URL's default)."""
    search = state.search
    if search is None:
        return []
    return list(
        await asyncio.gather(
            *(_examine(state, h, timeout, target, search.params) for h in search.hosts)
        )
    )


async def _examine(
    state: EngineState,
    host: HostAddress,
    timeout: float,
    target: TargetRole,
    params: dict[str, Any],
) -> dict[str, Any]:
    entry: dict[str, Any] = {"host": str(host), "reachable": False}
    try:
        conn = await open_connection(
            state.driver, {**params, "host": host.host, "port": host.port}, timeout
        )
    except Exception as exc:
        entry["error"] = describe(exc)
        entry["asyncgone"] = "skipped: unreachable (tried after the others for a while)"
        return entry
    try:
        facts = await read_facts(conn, timeout, role=True)
        health = await check_host(conn, host, timeout)
    except Exception as exc:
        entry["error"] = describe(exc)
        entry["asyncgone"] = "skipped: it does not answer asyncgone's queries"
        return entry
    finally:
        await close(conn, timeout)
    role = "replica" if facts.read_only else "primary"
    wsrep = facts.wsrep if facts.wsrep is not None and facts.wsrep.on else None
    if wsrep is not None:
        entry.update(
            reachable=True,
            role=role,
            read_only=facts.read_only,
            galera=wsrep.describe(),
            galera_eligible=wsrep.eligible,
            asyncgone=(
                f"connections for target_role={target!r} may go here (Synced)"
                if wsrep.eligible
                else "skipped: a Galera node that may not serve (tried after the others)"
            ),
        )
        return entry
    entry.update(
        reachable=True,
        role=role,
        read_only=facts.read_only,
        replicating=health.replicating,
        replication=health.error or "running",
        lag_s=health.lag,
        gtid_position=health.gtid_position,
        asyncgone=_verdict(target, role, health),
    )
    return entry


def _verdict(target: TargetRole, role: str, health: ReplicaHealth) -> str:
    if role == "primary":
        if target == "replica":
            return "skipped for target_role='replica' (writable)"
        return f"connections for target_role={target!r} go here"
    first = (
        "skipped for target_role='primary' (read-only)"
        if target == "primary"
        else f"connections for target_role={target!r} may go here"
    )
    why = health.why_not(DEFAULT_MAX_REPLICA_LAG)
    if why:
        return f"{first}; as one of replicas=, avoided for read_only work: {why}"
    return (
        f"{first}; as one of replicas=, takes read_only work (lag within "
        f"max_replica_lag={DEFAULT_MAX_REPLICA_LAG:g} s)"
    )


def host_lines(hosts: list[dict[str, Any]]) -> list[str]:
    """The hosts section of the doctor's text report."""
    lines = []
    for entry in hosts:
        if not entry["reachable"]:
            lines.append(f"  {entry['host']:<22}unreachable ({entry.get('error')})")
        elif "galera" in entry:
            lines.append(f"  {entry['host']:<22}Galera node: {entry['galera']}")
        else:
            lag = entry["lag_s"]
            gtid = entry["gtid_position"] or "-"
            if entry["replication"] == "no replication configured":
                state = "not replicating from anyone"
            else:
                shown = "unknown" if lag is None else f"{lag:g} s"
                state = f"replication {entry['replication']}, lag {shown}"
            lines.append(f"  {entry['host']:<22}{entry['role']}, {state}, GTID {gtid}")
        lines.append(f"  {'':<22}asyncgone: {entry['asyncgone']}")
    return lines
