"""``asyncgone doctor --processes N``: what a fleet of processes may open against the server's
connection limits, and what to change.

The arithmetic, all in connections:

- each process holds up to ``pool_size`` connections for long, and up to ``max_overflow``
  more for a burst; a fleet of N processes, N times that;
- the server takes ``max_connections`` client connections; one more is kept for an account
  with ``SUPER`` or ``CONNECTION ADMIN`` (MariaDB 10.5.2 and later; MySQL: ``SUPER`` or
  ``CONNECTION_ADMIN``) so that an administrator can still log in when it is full, and
  MariaDB's ``extra_port``, when set, takes ``extra_max_connections`` more, for
  administrators too (MariaDB Knowledge Base: max_connections, extra_max_connections;
  MySQL Reference Manual, "Too many connections");
- ``max_user_connections`` (the account's own limit from ``GRANT ... WITH
  MAX_USER_CONNECTIONS``, else the global value; 0: none) caps one account, whatever
  ``max_connections`` says;
- what other clients hold now (``Threads_connected``, less this check's own connection) is
  not available to the fleet.

An application account with ``SUPER``/``CONNECTION ADMIN`` ignores ``max_user_connections``
and may take the administrators' connection: the advice says so, since it leaves nobody a
way in when the fleet fills the server.
"""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ._config import DEFAULT_MAX_CONNECTING, check_count
from ._waits import bounded

__all__ = [
    "DEFAULT_MAX_OVERFLOW",
    "DEFAULT_POOL_SIZE",
    "add_fleet_arguments",
    "admin_privileged",
    "fleet_budget",
    "fleet_of",
    "fleet_summary",
    "read_limits",
]

#: SQLAlchemy's QueuePool defaults, which the command assumes unless told otherwise.
DEFAULT_POOL_SIZE = 5
DEFAULT_MAX_OVERFLOW = 10

# Privileges that let an account past max_connections (and max_user_connections).
_ADMIN_PRIVILEGES = ("ALL PRIVILEGES", "SUPER", "CONNECTION ADMIN", "CONNECTION_ADMIN")


def admin_privileged(grants: list[str]) -> bool:
    """Whether ``SHOW GRANTS`` lines give the account a global privilege that lets it past
    ``max_connections``."""
    for grant in grants:
        privileges, on, _ = grant.upper().partition(" ON *.*")
        if on and any(name in privileges for name in _ADMIN_PRIVILEGES):
            return True
    return False


async def read_limits(conn: AsyncConnection, timeout: float) -> tuple[dict[str, Any], bool]:
    """This account's connection limits (``max_user_connections``, MariaDB's ``extra_port``
    and ``extra_max_connections``; absent ones as None) and whether it has ``SUPER`` or
    ``CONNECTION ADMIN``, each read in one query bounded by ``timeout`` seconds."""
    names = ("max_user_connections", "extra_port", "extra_max_connections")
    rows = await bounded(
        conn.execute(
            text("SHOW VARIABLES WHERE Variable_name IN :names").bindparams(
                bindparam("names", expanding=True)
            ),
            {"names": list(names)},
        ),
        timeout,
    )
    found = {str(name): value for name, value in rows.tuples()}
    grants = await bounded(conn.execute(text("SHOW GRANTS")), timeout)
    return {name: found.get(name) for name in names}, admin_privileged(
        [str(row[0]) for row in grants]
    )


def fleet_budget(
    server: dict[str, Any],
    *,
    processes: int,
    pool_size: int,
    max_overflow: int,
    others: int,
    admin: bool,
) -> tuple[dict[str, Any], list[str]]:
    """The fleet's figures and advice. ``server`` holds ``max_connections``,
    ``max_user_connections`` (this account's, 0 for none), ``extra_port`` and
    ``extra_max_connections`` (None on servers without them); ``others`` is the number of
    client connections of other clients now; ``admin`` whether this account has
    ``SUPER``/``CONNECTION ADMIN``.

    Raises:
        ConfigurationError: ``processes`` below 1, ``pool_size`` below 1 or
            ``max_overflow`` below 0.
    """
    check_count("processes", processes, minimum=1)
    check_count("pool_size", pool_size, minimum=1)
    check_count("max_overflow", max_overflow, minimum=0)
    max_connections = int(server["max_connections"])
    user_limit = int(server.get("max_user_connections") or 0)
    extra_port = int(server.get("extra_port") or 0)
    extra = int(server.get("extra_max_connections") or 0) if extra_port else 0
    reserved = 1 + extra  # for SUPER / CONNECTION ADMIN only
    pools = processes * pool_size
    peak = processes * (pool_size + max_overflow)
    available = max(0, max_connections - others)
    limit = available if admin or not user_limit else min(available, user_limit)
    figures = {
        "processes": processes,
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pools": pools,
        "peak": peak,
        "max_connections": max_connections,
        "max_user_connections": user_limit,
        "reserved_for_admins": reserved,
        "others_connected": others,
        "available": limit,
        "attempts_in_flight_after_restart": processes * DEFAULT_MAX_CONNECTING,
        "admin_account": admin,
    }
    advice: list[str] = []
    what_limits = (
        f"max_user_connections={user_limit}"
        if limit == user_limit and user_limit and not admin
        else f"max_connections={max_connections}"
        + (f" less {others} held by other clients now" if others else "")
    )
    if pools > limit:
        fit = max(1, limit // processes)
        advice.append(
            f"{processes} processes with pool_size={pool_size} keep {pools} connections, more "
            f"than the {limit} this account can have ({what_limits}): after every restart some "
            f"processes wait for connections that never come free. Lower pool_size to {fit} "
            f"(and max_overflow to 0), or raise the server's limit to at least {pools} plus "
            f"what other clients need."
        )
    elif peak > limit:
        spare = (limit - pools) // processes
        advice.append(
            f"The pools fit ({pools} of {limit}, {what_limits}), but not every overflow: at a "
            f"peak the fleet may want {peak}, and the last {peak - limit} attempts are refused "
            f"with 1040/1203. asyncgone backs off and holds each pool's overflow at what it "
            f"has, so requests wait instead of failing; to stop the refusals, lower "
            f"max_overflow to {spare} or raise the limit to {peak}."
        )
    else:
        advice.append(
            f"The fleet fits: at most {peak} connections ({processes} x (pool_size="
            f"{pool_size} + max_overflow={max_overflow})) of the {limit} available "
            f"({what_limits}), {limit - peak} to spare."
        )
    if admin:
        advice.append(
            "This account has SUPER or CONNECTION ADMIN: it is not held by "
            "max_user_connections and may take the connection the server keeps for "
            "administrators, so a full fleet leaves nobody a way in. Give the application an "
            "account without them."
        )
    elif not extra_port:
        advice.append(
            f"Besides max_connections the server keeps {reserved} connection for an "
            f"administrator (SUPER / CONNECTION ADMIN). MariaDB's extra_port with "
            f"extra_max_connections gives administrators more room when the fleet fills it."
        )
    return figures, advice


def fleet_summary(figures: dict[str, Any]) -> str:
    """The ``fleet`` line of doctor's text report."""
    user = figures["max_user_connections"]
    return (
        f"{figures['processes']} x (pool {figures['pool_size']} + overflow "
        f"{figures['max_overflow']}): {figures['pools']} kept, up to {figures['peak']} at a "
        f"peak; {figures['available']} available (max_connections "
        f"{figures['max_connections']}"
        + (f", max_user_connections {user}" if user else "")
        + f", {figures['others_connected']} held by others; "
        f"{figures['reserved_for_admins']} more kept for administrators)"
    )


def add_fleet_arguments(doctor: argparse.ArgumentParser) -> None:
    """``--processes``, ``--pool-size`` and ``--max-overflow`` for ``asyncgone doctor``."""
    doctor.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="add up what N processes with this pool configuration may open against "
        "max_connections and max_user_connections",
    )
    doctor.add_argument(
        "--pool-size",
        type=int,
        default=DEFAULT_POOL_SIZE,
        help=f"each process's pool_size (default {DEFAULT_POOL_SIZE})",
    )
    doctor.add_argument(
        "--max-overflow",
        type=int,
        default=DEFAULT_MAX_OVERFLOW,
        help=f"each process's max_overflow (default {DEFAULT_MAX_OVERFLOW})",
    )


def fleet_of(args: argparse.Namespace) -> dict[str, int] | None:
    """The fleet ``--processes`` describes, checked before anything connects; None without.

    Raises:
        ConfigurationError: a figure below its minimum.
    """
    if args.processes is None:
        return None
    fleet = {
        "processes": args.processes,
        "pool_size": args.pool_size,
        "max_overflow": args.max_overflow,
    }
    for name, value in fleet.items():
        minimum = 0 if name == "max_overflow" else 1
        check_count(f"--{name.replace('_', '-')}", value, minimum=minimum)
    return fleet
