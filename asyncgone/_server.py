"""Server facts as each connection gets them, and the idle limit derived from them.

The same query tells whether the server is read-only, which the host search of a
multi-host URL (``_search``) needs to pick a server by role, and, on MariaDB, a Galera
node's wsrep state (``_wsrep``): whether it is Synced and may serve.

``wait_timeout`` counts *idle* seconds on the server. A session's value comes from the
global ``wait_timeout``, or from ``interactive_timeout`` when the client connected with
CLIENT_INTERACTIVE, and an init command may change it, so asyncgone asks each new connection
for ``@@session.wait_timeout`` instead of guessing from globals.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._statements import fetch_row
from ._waits import bounded
from ._wsrep import WsrepState, for_server, parse

__all__ = ["FACTS_SQL", "ServerFacts", "auto_idle_limit", "read_facts", "recycle_warning"]

# The role columns cost nothing more: the same one query, the same round trip. MySQL's
# super_read_only turns read_only on with it; Aurora readers report innodb_read_only.
FACTS_SQL = (
    "SELECT @@session.wait_timeout, @@max_allowed_packet, @@global.read_only, "
    "@@global.innodb_read_only"
)

# The idle limit stays this far below wait_timeout: 10 % of it, at least half a second (the
# clocks of client and server start counting idleness at slightly different moments), at
# most a minute (plenty for any clock difference on an 8-hour timeout).
_MARGIN_FRACTION = 0.1
_MARGIN_MIN = 0.5
_MARGIN_MAX = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class ServerFacts:
    """What the server told one connection about its limits and its role.

    ``read_only`` is true when ``@@read_only`` or ``@@innodb_read_only`` is on: the server
    refuses the application's writes (a replica, or a primary being switched over).
    ``wsrep`` is a MariaDB server's Galera state (None on MySQL, or a MariaDB built
    without wsrep support); see ``_wsrep.WsrepState``.
    """

    wait_timeout: float
    max_allowed_packet: int
    read_only: bool = False
    wsrep: WsrepState | None = None


async def read_facts(conn: Any, timeout: float) -> ServerFacts:
    """Ask a new driver connection for its limits, within ``timeout`` seconds."""
    sql = FACTS_SQL + for_server(conn)
    row = await bounded(fetch_row(conn, sql), timeout)
    if row is None:  # pragma: no cover - the server always answers a SELECT of variables
        raise RuntimeError(f"{sql!r} returned no row")
    return ServerFacts(
        wait_timeout=float(row[0]),
        max_allowed_packet=int(row[1]),
        read_only=bool(int(row[2] or 0) or int(row[3] or 0)),
        wsrep=parse(row[4], row[5]) if len(row) > 4 else None,
    )


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
