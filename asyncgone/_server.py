"""Server facts as each connection gets them, and the idle limit derived from them.

An engine with a host search (a multi-host URL or a ``target_role``, ``_search``) asks the
same query whether the server is read-only (``role=True``): two more columns in the same
round trip, and, on MariaDB, two for a Galera node's wsrep state (``_wsrep``: whether it is
Synced and may serve). A single-host engine runs the query it always ran, without them.

``wait_timeout`` counts *idle* seconds on the server. A session's value comes from the
global ``wait_timeout``, or from ``interactive_timeout`` when the client connected with
CLIENT_INTERACTIVE, and an init command may change it, so asyncgone asks each new connection
for ``@@session.wait_timeout`` instead of guessing from globals.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._errors import error_code
from ._statements import fetch_row
from ._waits import bounded
from ._wsrep import WsrepState, for_server, parse

__all__ = [
    "FACTS_SQL",
    "ROLE_VARIABLES",
    "ServerFacts",
    "auto_idle_limit",
    "is_on",
    "read_facts",
    "recycle_warning",
]

FACTS_SQL = "SELECT @@session.wait_timeout, @@max_allowed_packet"

#: The global variables that make a server refuse the application's writes. MySQL's
#: super_read_only turns read_only on with it; Aurora readers report innodb_read_only, which
#: a server built without InnoDB lacks.
ROLE_VARIABLES = ("read_only", "innodb_read_only")

_UNKNOWN_SYSTEM_VARIABLE = 1193  # ER_UNKNOWN_SYSTEM_VARIABLE

# The idle limit stays this far below wait_timeout: 10 % of it, at least half a second (the
# clocks of client and server start counting idleness at slightly different moments), at
# most a minute (plenty for any clock difference on an 8-hour timeout).
_MARGIN_FRACTION = 0.1
_MARGIN_MIN = 0.5
_MARGIN_MAX = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class ServerFacts:
    """What the server told one connection about its limits and its role.

    ``read_only`` is true when ``@@global.read_only`` or ``@@global.innodb_read_only`` is on
    (see ``is_on``): the server refuses the application's writes (a replica, or a primary
    being switched over). ``wsrep`` is a MariaDB server's Galera state (None on MySQL, on a
    MariaDB built without wsrep support, or when not asked); see ``_wsrep.WsrepState``. Both
    are read only when asked for (``read_facts(role=True)``).
    """

    wait_timeout: float
    max_allowed_packet: int
    read_only: bool = False
    wsrep: WsrepState | None = None


def is_on(value: Any) -> bool:
    """Whether a read-only variable's value says the server refuses writes.

    Anything but off counts: ``1``, ``"ON"``, and the levels of MariaDB's enum
    ``read_only`` (11.8 and later: ``OFF``, ``ON``, ``NO_LOCK``, ``NO_LOCK_NO_ADMIN``, or
    their numbers 0-3); off is ``0``, ``"0"``, ``"OFF"``, ``"FALSE"``, an empty value or
    NULL (a variable the server lacks).
    """
    if value is None:
        return False
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        return value.strip().upper() not in ("", "0", "OFF", "FALSE", "NO")
    return bool(value)


def _role_sql(variables: tuple[str, ...]) -> str:
    return ", ".join([FACTS_SQL, *(f"@@global.{name}" for name in variables)])


async def read_facts(
    conn: Any, timeout: float, *, role: bool = False, variables: tuple[str, ...] = ROLE_VARIABLES
) -> ServerFacts:
    """Ask a new driver connection for its limits, within ``timeout`` seconds in all.

    With ``role``, the same query also reads ``variables`` (default ``ROLE_VARIABLES``);
    a server that lacks one of them (error 1193) is asked again without those after the
    first (``@@global.read_only`` exists everywhere), so a missing variable never fails
    the connect; on MariaDB it also reads the wsrep state (``_wsrep.for_server``).
    """
    if not role:
        row = await bounded(fetch_row(conn, FACTS_SQL), timeout)
        if row is None:  # pragma: no cover - the server always answers a SELECT of variables
            raise RuntimeError(f"{FACTS_SQL!r} returned no row")
        return ServerFacts(wait_timeout=float(row[0]), max_allowed_packet=int(row[1]))
    row, count = await bounded(_fetch_role_row(conn, variables, for_server(conn)), timeout)
    if row is None:  # pragma: no cover - the server always answers a SELECT of variables
        raise RuntimeError("the server facts query returned no row")
    wsrep = row[2 + count :]
    return ServerFacts(
        wait_timeout=float(row[0]),
        max_allowed_packet=int(row[1]),
        read_only=any(is_on(value) for value in row[2 : 2 + count]),
        wsrep=parse(wsrep[0], wsrep[1]) if len(wsrep) >= 2 else None,
    )


async def _fetch_role_row(
    conn: Any, variables: tuple[str, ...], wsrep_columns: str
) -> tuple[tuple[Any, ...] | None, int]:
    """The role query's row and how many of ``variables`` it holds."""
    try:
        return await fetch_row(conn, _role_sql(variables) + wsrep_columns), len(variables)
    except Exception as exc:
        if error_code(exc) != _UNKNOWN_SYSTEM_VARIABLE or len(variables) < 2:
            raise
    return await fetch_row(conn, _role_sql(variables[:1]) + wsrep_columns), 1


def auto_idle_limit(wait_timeout: float) -> float:
    """Return how long a connection may sit idle before asyncgone replaces it."""
    margin = min(max(wait_timeout * _MARGIN_FRACTION, _MARGIN_MIN), _MARGIN_MAX)
    return max(wait_timeout - margin, wait_timeout / 2)


def recycle_warning(
    *, recycle: float | str | None, pool_recycle: float | None, wait_timeout: float
) -> str | None:
    """Explain a configured limit that lets the server close idle connections first.

    ``recycle`` is asyncgone's option ("auto", seconds or None); ``pool_recycle`` is
    SQLAlchemy's (None when unset or negative).
    """
    safe = auto_idle_limit(wait_timeout)
    if isinstance(recycle, (int, float)) and recycle >= wait_timeout:
        return (
            f"recycle={recycle:g} is not below this server's wait_timeout={wait_timeout:g}: "
            f"the server closes connections idle longer than that before asyncgone retires "
            f"them. Use recycle='auto' (the default) or a value of at most {safe:g}."
        )
    if recycle is None and pool_recycle is not None and pool_recycle >= wait_timeout:
        return (
            f"pool_recycle={pool_recycle:g} is not below this server's "
            f"wait_timeout={wait_timeout:g} and asyncgone's idle limit is off (recycle=None): "
            f"connections idle longer than {wait_timeout:g} s are closed by the server. "
            f"Use recycle='auto', or pool_recycle of at most {safe:g}."
        )
    return None
