"""Giving overflow connections back to a full server, so that a fleet's pools come first.

A pool's ``max_overflow`` connections are borrowed from the server's spare capacity, and
SQLAlchemy closes one only when it comes back to a pool that already holds ``pool_size``
idle ones, which a pool under constant load never does. In a fleet whose pools fit the
server's ``max_connections`` but whose overflow does not, the processes that started first
keep their overflow for as long as their load lasts, and a process that starts later is
refused (1040) all that time: its ``Database.start()`` fails although the pools alone fit.

So an engine whose pool holds overflow connections (more than ``pool_size`` open) asks the
server, at most once every ``connect_backoff_max`` seconds (a quarter of that after a first
question, which only learns where the counters stand, and while the server is full), on a
connection being checked out: one ``SHOW GLOBAL STATUS`` round trip (and
``SELECT @@max_connections`` the first time, and after a restart), reading counters every
MariaDB and MySQL server keeps and shows to any account:
``Connection_errors_max_connections`` (1040 before authentication) plus
``Aborted_connects`` (1040 after it, which an account without ``CONNECTION ADMIN`` meets at
the last connection), less this engine's own refusals; ``Threads_connected``; ``Uptime``, to
tell a restarted server, whose counters start again from 0. When the server refused others
since the last question *and* is full (``Threads_connected`` at least
``max_connections - 1``), the engine owes that many connections: each connection returned
to the pool while one is owed and the pool holds overflow is closed for good, as QueuePool
closes one that finds it full, and the pool is held at what it has left (``_admission``: no
new overflow until the server went a while without refusing). The ``pool_size``
connections are never given back. A pool without overflow, or with an unlimited one
(``max_overflow=-1``, which nothing could hold), asks nothing and pays nothing.

What it leaves to chance: a connection given back goes to whichever client connects next
(a client that keeps opening connections takes each one, down to every pool's
``pool_size``); ``Aborted_connects`` also counts failed logins and TCP health
checks that never send a handshake; on a full server each costs every pool with overflow
one connection for a while. ``max_user_connections`` (1203) leaves the server not full, so
it gives nothing back. The counters are the server's: an engine whose connections go to
several servers (a multi-host URL) does not ask.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Dialect
from sqlalchemy.pool import QueuePool

from ._compat import GIVE_BACK_ATTRIBUTE, max_overflow, running_loop
from ._statements import fetch_row, fetch_rows
from ._waits import bounded

if TYPE_CHECKING:
    from ._state import EngineState

__all__ = ["STATUS_SQL", "GiveBack"]

log = logging.getLogger("asyncgone")

#: The server's refusals (1040 before and after authentication), its client connections,
#: and its uptime in seconds.
STATUS_SQL = (
    "SHOW GLOBAL STATUS WHERE Variable_name IN ('Connection_errors_max_connections', "
    "'Aborted_connects', 'Threads_connected', 'Uptime')"
)

# A server whose uptime grew this many seconds less than the time since the last question
# was restarted meanwhile (the two clocks tick apart by a second at most).
_RESTART_SLACK = 5.0

# The share of the interval after which the next question comes when the last one only set
# the baseline, or found the server full.
_SOON = 0.25


class GiveBack:
    """When one engine asks the server about refusals, what it heard, and what it owes.

    ``interval`` is the time between two questions (a quarter of it after a first one, and
    while the server is full), and ``timeout`` bounds each, in seconds.
    """

    def __init__(
        self, state: EngineState, dialect: Dialect, *, interval: float, timeout: float
    ) -> None:
        self._state = state
        self._dialect = dialect
        self._interval = interval
        self._timeout = timeout
        self.due = 0.0  # time.monotonic() before which no question is asked
        self.owed = 0  # connections still to give back, one per return
        # At the last question: the server's refusals, its uptime and our monotonic clock,
        # this engine's own capacity refusals; and the server's max_connections.
        self._seen: tuple[int, float, float, int] | None = None
        self._max_connections: int | None = None

    def __repr__(self) -> str:
        return f"<GiveBack every {self._interval} s, {self.owed} owed>"

    def _overflow_open(self, pool: Any) -> bool:
        """Whether ``pool`` holds open connections beyond its ``pool_size`` that a lowered
        ``max_overflow`` could keep from coming back (QueuePool counts the connects under
        way as connections: they are not)."""
        if not isinstance(pool, QueuePool) or max_overflow(pool) is None:
            return False
        admission = self._state.admission
        opening = 0 if admission is None else admission.opening
        return pool.overflow() - opening > 0

    def wanted(self, pool: Any) -> bool:
        """Whether a question is worth asking now for ``pool`` (else ask in a while)."""
        if self._overflow_open(pool):
            return True
        self.due = time.monotonic() + self._interval
        return False

    async def ask(self, conn: Any) -> None:
        """Ask the server on ``conn`` (a connection just taken for a checkout) what it
        refused since the last question, and owe as many connections if it is full; raise
        what the queries raised."""
        self.due = time.monotonic() + self._interval
        status = {
            str(name).lower(): int(value)
            for name, value in await bounded(fetch_rows(conn, STATUS_SQL), self._timeout)
        }
        now = time.monotonic()
        refused = status.get("connection_errors_max_connections", 0) + status.get(
            "aborted_connects", 0
        )
        uptime = float(status.get("uptime", 0))
        admission = self._state.admission
        own = 0 if admission is None else admission.capacity_refused
        seen, self._seen = self._seen, (refused, uptime, now, own)
        if seen is None or uptime + _RESTART_SLACK < seen[1] + (now - seen[2]):
            self._max_connections = None  # a first question, or a restarted server
            self.due = now + self._interval * _SOON  # that only set the baseline
            return
        if self._max_connections is None:
            row = await bounded(fetch_row(conn, "SELECT @@max_connections"), self._timeout)
            self._max_connections = None if row is None else int(row[0])
        others = (refused - seen[0]) - (own - seen[3])
        full = self._max_connections is not None and (
            status.get("threads_connected", 0) >= self._max_connections - 1
        )
        if full:  # others may be refused any moment: the next question comes sooner
            self.due = now + self._interval * _SOON
        if others > 0 and full:
            self.owed = others
            setattr(self._dialect, GIVE_BACK_ATTRIBUTE, self.give_back)

    def give_back(self, pool: Any) -> bool:
        """The pool's return step asks: close this returning connection for good? Yes while
        a connection is owed and the pool holds overflow; the pool is then held."""
        if self.owed <= 0 or not self._overflow_open(pool):
            self._settle()
            return False
        if running_loop() is None:
            return False  # a return outside the event loop: the pool could not be held
        self.owed -= 1
        state = self._state
        state.counters.overflow_given_back += 1
        if state.admission is not None:
            state.admission.hold_overflow(opening=1)  # the pool still counts this one
        log.info(
            "the server is full and refused other clients: giving one of this engine's "
            "%d overflow connections back",
            pool.overflow(),
        )
        if self.owed <= 0:
            self._settle()
        return True

    def _settle(self) -> None:
        """Nothing (more) owed: returns stop asking."""
        self.owed = 0
        if getattr(self._dialect, GIVE_BACK_ATTRIBUTE, None) is not None:
            setattr(self._dialect, GIVE_BACK_ATTRIBUTE, None)
