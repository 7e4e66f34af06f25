"""Per-engine counters of what asyncgone did, and the typed snapshot users read."""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["Counters", "Health", "PoolStatus", "Reason", "Stats"]


class Reason(str, enum.Enum):
    """Why asyncgone replaced a pooled connection."""

    CLOSED_BY_SERVER = "closed_by_server"  # FIN/RST or unsolicited bytes seen on the idle socket
    IDLE_LIMIT = "idle_limit"  # idle for nearly the server's wait_timeout (or recycle=)
    MAX_LIFETIME = "max_lifetime"  # reached its jittered maximum lifetime
    PING_FAILED = "ping_failed"  # the checkout ping raised
    PING_TIMEOUT = "ping_timeout"  # the checkout ping got no answer within ping_timeout
    POOL_INVALIDATED = "pool_invalidated"  # opened before a server-wide failure was seen
    ERROR = "error"  # a disconnect error while the connection was in use
    CANCELLED = "cancelled"  # a cancellation interrupted it mid-I/O: its stream is unusable
    FOREIGN_LOOP = "foreign_loop"  # opened on another (or a closed) event loop
    # Replaced in the background by the keepalive, for any of the reasons above (its log
    # line names which): no user paid for it.
    KEEPALIVE = "keepalive"


@dataclasses.dataclass(slots=True)
class Counters:
    """Mutable counters one engine's listeners update; read them through ``stats()``."""

    connects: int = 0
    connect_attempts: int = 0
    connects_refused: int = 0
    overflow_given_back: int = 0
    checkouts: int = 0
    checks: int = 0
    pings: int = 0
    ping_failures: int = 0
    pool_invalidations: int = 0
    kills: int = 0
    resets: int = 0
    resets_skipped: int = 0
    keepalive_runs: int = 0
    keepalive_visits: int = 0
    keepalive_pings: int = 0
    keepalive_errors: int = 0
    replays: int = 0
    commit_outcome_unknown: int = 0
    unavailable: int = 0
    leaks: int = 0
    replaced: Counter[Reason] = dataclasses.field(default_factory=Counter)
    errors: Counter[int] = dataclasses.field(default_factory=Counter)

    def snapshot(self) -> Stats:
        counts = {name: getattr(self, name) for name in _COUNTS}
        return Stats(
            **counts,
            replaced=MappingProxyType({reason.value: n for reason, n in self.replaced.items()}),
            errors=MappingProxyType(dict(self.errors)),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    """What asyncgone did on one engine since it was created.

    - ``connects``: connections opened.
    - ``connect_attempts``: connection attempts started through the connect admission
      (``max_connecting``, ``connect_retry``), refused ones included.
    - ``connects_refused``: attempts the server refused for want of capacity (1040, 1203,
      1129) or did not accept at all (2002, 2003), each retried after a backoff while the
      caller's deadline allowed.
    - ``overflow_given_back``: overflow connections closed because the server had refused
      connections meanwhile (``overflow_give_back``), so that other clients' pools get them.
    - ``checkouts``: connections handed out by the pool.
    - ``checks``: checkouts of a reused connection, each checked before use (a connection
      opened for its checkout needs none).
    - ``pings``: COM_PING round trips asyncgone sent (checkouts after long idleness, and the
      keepalive's).
    - ``ping_failures``: pings that raised or timed out.
    - ``pool_invalidations``: times the whole pool was invalidated (server-wide signal).
    - ``kills``: statements stopped with KILL QUERY after a cancellation abandoned them.
    - ``resets``: ROLLBACKs sent when a connection went back to the pool with a transaction
      possibly open.
    - ``resets_skipped``: returns that needed no ROLLBACK (the transaction had ended), each a
      round trip saved over SQLAlchemy's default.
    - ``keepalive_runs``, ``keepalive_visits``, ``keepalive_pings``, ``keepalive_errors``:
      rounds of the keepalive task, connections it borrowed, the pings among ``pings`` it
      sent, and rounds that failed. The connections it replaced are ``replaced["keepalive"]``.
    - ``replays``: units of work ``Database.run()`` ran again after a safe failure.
    - ``commit_outcome_unknown``: ``CommitOutcomeUnknown`` raised, by a session
      (``managed_session()``, ``Database.session()``, ``run()``'s; ``run()`` replays
      those of a replica's read-only session, which committed nothing) or by ``run()``
      for a COMMIT of the unit of work's own.
    - ``unavailable``: ``DatabaseUnavailable`` raised by ``Database.run()``.
    - ``leaks``: connections held longer than ``leak_threshold`` (each logged with the stack
      that acquired it).
    - ``replaced``: connections replaced, by reason (``Reason`` values as keys); those the
      keepalive replaced in the background count under ``"keepalive"`` whatever the cause
      (the log line for each names it), the others under their cause.
    - ``errors``: disconnect errors met while connections were in use, by MySQL error code
      (0 for errors without one, such as uvloop's closed-transport ``RuntimeError``).
    """

    connects: int
    connect_attempts: int
    connects_refused: int
    overflow_given_back: int
    checkouts: int
    checks: int
    pings: int
    ping_failures: int
    pool_invalidations: int
    kills: int
    resets: int
    resets_skipped: int
    keepalive_runs: int
    keepalive_visits: int
    keepalive_pings: int
    keepalive_errors: int
    replays: int
    commit_outcome_unknown: int
    unavailable: int
    leaks: int
    replaced: Mapping[str, int]
    errors: Mapping[int, int]

    @property
    def replaced_total(self) -> int:
        """All connections replaced, whatever the reason."""
        return sum(self.replaced.values())


# The plain counts, shared by Counters and Stats (the two mappings are converted apart).
_COUNTS = tuple(
    field.name for field in dataclasses.fields(Counters) if field.name not in ("replaced", "errors")
)


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStatus:
    """The pool's figures at one moment (all zero for pools that keep nothing)."""

    size: int  # configured pool_size
    checked_out: int  # connections in use
    idle: int  # live connections waiting in the pool
    overflow: int  # connections beyond pool_size now open
    idle_dead: int = 0  # idle slots known dead (server closed the socket) or empty


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    """The answer to "can this engine serve a query right now?", for readiness probes.

    - ``ok``: a connection was checked out and answered ``SELECT 1`` within the timeout.
    - ``latency``: seconds that took (None when it failed).
    - ``error``: why it failed, in one line (never containing the password), or None.
    - ``target``: the database URL, password masked.
    - ``pool``: the pool's figures when the check ended.
    """

    ok: bool
    latency: float | None
    error: str | None
    target: str
    pool: PoolStatus

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict, e.g. for a readiness endpoint."""
        return {
            "ok": self.ok,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 3),
            "error": self.error,
            "target": self.target,
            "pool": dataclasses.asdict(self.pool),
        }
