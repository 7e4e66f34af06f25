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

A ``read_only`` session in such a context, before its first statement (however it was
opened: ``async with`` or ``SessionScope.open()``), runs ``MASTER_GTID_WAIT(gtid, timeout)``
(MySQL: ``WAIT_FOR_EXECUTED_GTID_SET``) on the replica connection it then keeps, bounded by
``causal_reads_timeout`` (and on the client by that plus ``ping_timeout``); when the
replica has not applied the commit by then, or when the GTID could not be read, the
session goes to the primary instead. When the monitor's last
check found every usable replica past that GTID, that session waits for nothing (the
context keeps the GTID). Each commit's GTID merges into the context's position, per
domain, never backwards.
"""

from __future__ import annotations

import contextvars
import logging
import re
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from ._drivers import drop_read_result
from ._session import SessionScope
from ._statements import fetch_row
from ._waits import bounded, finish

__all__ = ["PRIMARY", "CausalScope", "GtidTracker", "applied", "merge"]

log = logging.getLogger("asyncgone")

#: What the context holds when a commit's GTID could not be read: read from the primary.
PRIMARY = "primary"

_MARIADB_SQL = "SELECT @@last_gtid"
# What a GTID, position or GTID set may contain; the wait's SQL quotes it as a literal.
_GTID_TEXT = re.compile(r"[0-9A-Za-z:,\-\s]+")
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


class _CausalSession:
    """Mixed into a ``read_only`` session's sync ``Session`` class: the first connection the
    session needs comes from its scope's ``bind()``, which waits for the GTID first."""

    info: dict[Any, Any]

    def get_bind(self, *args: Any, **kwargs: Any) -> Any:
        scope = self.info.get(_SCOPE)
        if scope is None:
            return super().get_bind(*args, **kwargs)  # type: ignore[misc]
        return scope.bind()


_causal_classes: dict[type[Session], type[Session]] = {}
_SCOPE = "asyncgone.causal_scope"


def _causal_class(base: type[Session]) -> type[Session]:
    cls = _causal_classes.get(base)
    if cls is None:
        cls = type(base.__name__, (_CausalSession, base), {"__module__": base.__module__})
        _causal_classes[base] = cls
    return cls


class CausalScope(SessionScope):
    """A ``read_only`` session scope that, before its first statement, waits until its
    replica applied ``gtid``, and moves to ``primary`` if that takes longer than
    ``timeout`` seconds.

    The wait runs when the session first needs a connection (its first statement, or
    ``session.connection()``), so ``open()``, which does no I/O, is as safe as ``async
    with``: the framework integrations open their request sessions that way. It runs on the
    replica connection the session then keeps for all its work (the replica that has the
    commit), bounded on the client too (``bound`` seconds: the timeout plus a ping's); a
    replica that fails or times out sends the session to the primary. A cancellation during
    the wait propagates through the statement, and the scope's rollback (``async with``,
    or the integration's) closes the connection, discarding it.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        session_options: dict[str, Any],
        *,
        cleanup_timeout: float,
        primary: AsyncEngine,
        gtid: str,
        timeout: float,
        bound: float,
    ) -> None:
        options = dict(session_options)
        options["sync_session_class"] = _causal_class(options.get("sync_session_class", Session))
        super().__init__(engine, options, cleanup_timeout=cleanup_timeout)
        self._primary = primary
        self._gtid = gtid
        self._timeout = timeout
        self._bound = bound
        self._bind: Any = None
        self._pinned: Connection | None = None
        self._broken = False
        #: Whether the session went to the primary after all.
        self.fell_back = False

    def open(self) -> AsyncSession:
        session = super().open()
        session.sync_session.info[_SCOPE] = self
        return session

    def bind(self) -> Any:
        """The session's bind: decided once, in SQLAlchemy's greenlet (sync code whose I/O
        is awaited on the caller's task): the replica connection that has the GTID, or the
        primary's engine."""
        if self._bind is None:
            self._bind = self._wait()
        return self._bind

    def _wait(self) -> Any:
        if not _GTID_TEXT.fullmatch(self._gtid):  # never the case for a server's answer
            self.engine, self.fell_back = self._primary, True
            return self._primary.sync_engine
        mariadb = "-" in self._gtid and ":" not in self._gtid
        sql = (
            f"SELECT MASTER_GTID_WAIT('{self._gtid}', {self._timeout:g})"
            if mariadb
            else f"SELECT WAIT_FOR_EXECUTED_GTID_SET('{self._gtid}', {self._timeout:g})"
        )
        try:
            conn = self.engine.sync_engine.connect()
        except Exception as exc:  # no replica connection: the primary has the data for sure
            log.debug("no replica connection to wait for %s on: %s", self._gtid, exc)
            self.engine, self.fell_back = self._primary, True
            return self._primary.sync_engine
        self._pinned = conn
        try:
            row = conn.connection.dbapi_connection.run_async(  # type: ignore[union-attr]
                lambda c: bounded(fetch_row(c, sql), self._bound)
            )
        except Exception as exc:  # the replica failed or took too long: the primary has it
            log.debug("waiting for a replica to apply %s failed: %s", self._gtid, exc)
            self._broken = True
            waited = None
        except BaseException:
            self._broken = True  # cancelled mid-query: the cleanup discards the connection
            raise
        else:
            waited = row[0] if row else None
        if waited == 0:
            return conn
        self._release_pinned()
        self.engine = self._primary
        self.fell_back = True
        return self._primary.sync_engine

    def _release_pinned(self) -> None:
        conn, self._pinned = self._pinned, None
        if conn is None:
            return
        if self._broken:
            conn.invalidate()  # a reply may still be on its way: never reuse it
        conn.close()

    async def _cleanup(
        self, session: AsyncSession, error: BaseException | None, *, rollback: bool
    ) -> None:
        try:
            await super()._cleanup(session, error, rollback=rollback)
        finally:
            if self._pinned is not None:
                try:
                    await finish(
                        greenlet_spawn(self._release_pinned),
                        self._cleanup_timeout,
                        "closing a replica connection",
                    )
                except Exception as exc:
                    log.debug("closing a replica connection failed: %s", exc)
