"""Read your own writes: a ``read_only`` session after a commit waits for its replica to
apply that commit, or goes to the primary.

After each COMMIT on the primary engine of a ``Database`` with replicas, asyncgone reads
the transaction's GTID on the same connection, before it returns to the pool (MariaDB:
``@@last_gtid``, the GTID of this session's last commit; MySQL: ``@@global.gtid_executed``,
a superset). Neither driver asks for session-state tracking (``CLIENT_SESSION_TRACK``),
so the server never puts the GTID in the COMMIT's OK packet: this costs one small query
after a commit, and none otherwise. The GTID is kept in a
context variable: the task (request) that committed, and the tasks it starts afterwards,
see it; others do not.

A ``read_only`` session in such a context first runs ``MASTER_GTID_WAIT(gtid, timeout)``
(MySQL: ``WAIT_FOR_EXECUTED_GTID_SET``) on its replica connection, bounded by
``causal_reads_timeout``; when the replica has not applied the commit by then, or when the
GTID could not be read, the session goes to the primary instead. When the monitor's last
check found every usable replica past that GTID, nothing is waited for at all.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ._drivers import drop_read_result
from ._session import SessionScope
from ._statements import fetch_row
from ._waits import bounded

__all__ = ["PRIMARY", "CausalScope", "GtidTracker", "applied", "merge"]

log = logging.getLogger("asyncgone")

#: What the context holds when a commit's GTID could not be read: read from the primary.
PRIMARY = "primary"

_MARIADB_SQL = "SELECT @@last_gtid"
_MYSQL_SQL = "SELECT @@global.gtid_executed"


def _domains(position: str) -> dict[str, tuple[str, int]]:
    """A MariaDB GTID position as {domain: (server_id, sequence)}; ValueError if it is not
    one."""
    found: dict[str, tuple[str, int]] = {}
    for part in position.split(","):
        part = part.strip()
        if not part:
            continue
        domain, server, seq = part.split("-")
        found[domain] = (server, int(seq))
    return found


def applied(position: str, gtid: str) -> bool:
    """Whether a MariaDB GTID position (``"0-1-42,1-2-7"``) includes ``gtid`` (one GTID,
    ``"0-1-40"``, or a position): in each of its domains, the sequence number is at least
    the GTID's. False for anything else."""
    try:
        have, want = _domains(position), _domains(gtid)
    except ValueError:
        return False
    return bool(want) and all(
        have.get(domain, ("", -1))[1] >= seq for domain, (_, seq) in want.items()
    )


def merge(known: str | None, new: str) -> str:
    """What a context knows after a commit whose connection reported ``new``: the position
    that includes both (per domain the larger sequence number; never backwards), ``PRIMARY``
    once a GTID could not be read or parsed. A MySQL GTID set (``uuid:1-42``) is the
    server's executed set, which only grows: the newer one stands."""
    if known == PRIMARY:
        return PRIMARY
    if not known:
        return new
    if ":" in new or ":" in known:
        return new
    try:
        merged = _domains(known)
        for domain, (server, seq) in _domains(new).items():
            if seq > merged.get(domain, ("", -1))[1]:
                merged[domain] = (server, seq)
    except ValueError:
        return PRIMARY
    return ",".join(f"{d}-{server}-{seq}" for d, (server, seq) in sorted(merged.items()))


class GtidTracker:
    """The GTID of the last commit in the current context, for one ``Database``."""

    def __init__(self, timeout: float) -> None:
        self._var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            f"asyncgone_last_commit_{id(self)}", default=None
        )
        self._timeout = timeout

    def get(self) -> str | None:
        """The last commit's GTID in this context, ``PRIMARY``, or None."""
        return self._var.get()

    def after_commit(self, dbapi_connection: Any, mariadb: bool) -> None:
        """Read the GTID of the commit just made on ``dbapi_connection`` (in SQLAlchemy's
        greenlet, which shares the caller's context) and merge it into the context's.

        A commit that wrote nothing reports the connection's older ``@@last_gtid`` (perhaps
        another task's): merged, it never moves the context's position backwards. A GTID
        that cannot be read leaves ``PRIMARY``, which later reads do not overwrite."""
        sql = _MARIADB_SQL if mariadb else _MYSQL_SQL
        try:
            row = dbapi_connection.run_async(lambda c: bounded(fetch_row(c, sql), self._timeout))
        except Exception as exc:  # the commit stands; only where to read it is unknown
            log.debug("could not read the GTID of a commit: %s", exc)
            self._var.set(PRIMARY)
            return
        drop_read_result(dbapi_connection.driver_connection)
        gtid = str(row[0]) if row and row[0] else ""
        if gtid:
            self._var.set(merge(self._var.get(), gtid))


class CausalScope(SessionScope):
    """A ``read_only`` session scope that first waits until its replica applied ``gtid``,
    and moves to ``primary`` if that takes longer than ``timeout`` seconds."""

    def __init__(
        self,
        engine: AsyncEngine,
        session_options: dict[str, Any],
        *,
        cleanup_timeout: float,
        primary: AsyncEngine,
        gtid: str,
        timeout: float,
    ) -> None:
        super().__init__(engine, session_options, cleanup_timeout=cleanup_timeout)
        self._primary = primary
        self._gtid = gtid
        self._timeout = timeout
        #: Whether the session went to the primary after all.
        self.fell_back = False

    async def __aenter__(self) -> AsyncSession:
        session = self.open()
        mariadb = "-" in self._gtid and ":" not in self._gtid
        sql = (
            "SELECT MASTER_GTID_WAIT(:gtid, :timeout)"
            if mariadb
            else "SELECT WAIT_FOR_EXECUTED_GTID_SET(:gtid, :timeout)"
        )
        try:
            result = await session.execute(
                text(sql), {"gtid": self._gtid, "timeout": self._timeout}
            )
            waited = result.scalar()
        except Exception as exc:  # the replica failed: the primary has the data for sure
            log.debug("waiting for a replica to apply %s failed: %s", self._gtid, exc)
            waited = None
        if waited == 0:
            return session
        await self._cleanup(session, None, rollback=True)
        self.engine = self._primary
        self._session = None
        self.fell_back = True
        return self.open()
