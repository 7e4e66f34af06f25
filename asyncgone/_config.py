"""asyncgone's options: frozen keyword-only dataclasses, named defaults, eager validation.

Usage, one line per case::

    EngineOptions()                                  # the defaults below
    EngineOptions(recycle=600)                       # fixed idle limit instead of "auto"
    EngineOptions(ping_after=0)                      # ping on every checkout (bounded)
    EngineOptions(ping_after=None)                   # never ping; socket checks only
    EngineOptions(tcp_keepalive=None)                # leave the kernel's TCP settings alone
    EngineOptions(tcp_keepalive=TCPKeepalive(idle=60, interval=10, count=6, user_timeout=120))
    EngineOptions(max_connecting=None, connect_retry=None)  # no connect cap, no retries
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Collection, Mapping
from typing import Any, Literal

from sqlalchemy.engine import URL

from ._errors import ConfigurationError
from ._hosts import TargetRole, check_target_role

__all__ = [
    "DEFAULT_CONNECT_BACKOFF_MAX",
    "DEFAULT_CONNECT_RETRY",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_MAX_CONNECTING",
    "DEFAULT_MAX_LIFETIME",
    "DEFAULT_NETWORK_IDLE_LIMIT",
    "DEFAULT_PING_AFTER",
    "DEFAULT_PING_TIMEOUT",
    "DEFAULT_RECYCLE",
    "DEFAULT_TCP_KEEPALIVE",
    "EngineOptions",
    "RunOptions",
    "TCPKeepalive",
    "check_count",
    "check_flag",
    "check_keepalive",
    "given_connect_timeout",
    "seconds",
    "split_options",
]

#: Replace a pooled connection idle for nearly the server's ``wait_timeout`` (read per
#: connection) before the server closes it. A number sets a fixed idle limit in seconds.
DEFAULT_RECYCLE: Literal["auto"] = "auto"

#: Retire a connection this many seconds after it was opened, minus up to 25 % random
#: jitter so that connections opened together do not all reconnect together (HikariCP's
#: maxLifetime, whose default is also 30 minutes).
DEFAULT_MAX_LIFETIME = 1800.0

#: Ping a connection at checkout only when it sat idle in the pool this long. A connection
#: used within the last 30 s proved the network path recently; the socket check catches a
#: server-side close at any age for free; what is left (a load balancer or NAT that silently
#: forgot the flow) needs minutes of idleness (AWS NLB 350 s, Azure LB 4 min).
DEFAULT_PING_AFTER = 30.0

#: Bound on every round trip asyncgone makes itself (pings, the server-facts query). A
#: timeout counts as a dead connection.
DEFAULT_PING_TIMEOUT = 3.0

#: Bound on opening a connection, so an unreachable host fails in seconds.
DEFAULT_CONNECT_TIMEOUT = 5.0

#: Connection attempts one engine has in flight at most; the others wait for a slot. A pool
#: refilling after a restart then asks the server for two connections at a time, not for
#: all of them at once (HikariCP opens one at a time). ``None`` removes the cap.
DEFAULT_MAX_CONNECTING = 2

#: How long, in seconds, a connect keeps trying after the server refused it (1040 too many
#: connections, 1203 ``max_user_connections``, 1129 host blocked) or nothing listened (a
#: refused socket connect, 2002/2003): long enough for a restart or a burst of reconnects,
#: short enough that a server that stays down gets the caller an error (a 503 from the
#: integrations) within seconds. ``"pool_timeout"`` waits as long as a checkout may wait
#: for a connection anyway. A caller's cancel scope, and ``Database.run()``'s deadline, end
#: it earlier.
DEFAULT_CONNECT_RETRY = 5.0

#: The longest pause, in seconds, between two connect attempts of an engine the server keeps
#: refusing; the pauses start at 0.1 s and double with each refusal in a row, jittered.
DEFAULT_CONNECT_BACKOFF_MAX = 2.0

#: Pause on a flow after which load balancers, NAT gateways and firewalls may forget it
#: silently: Azure's load balancer after 4 minutes, AWS NLB after 350 s, GCP after 10
#: minutes. The keepalive's automatic interval stays well below it.
DEFAULT_NETWORK_IDLE_LIMIT = 240.0

#: The keepalive pings a connection idle for half the shorter of its server idle limit and
#: ``network_idle_limit``.
DEFAULT_KEEPALIVE_INTERVAL: Literal["auto"] = "auto"


def _seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    if math.isnan(value) or math.isinf(value) or value < 0 or (value == 0 and not allow_zero):
        floor = "zero or more" if allow_zero else "more than zero"
        raise ConfigurationError(
            f"{name} must be a finite number of seconds {floor}, got {value!r}"
        )
    return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TCPKeepalive:
    """Kernel-level dead-peer detection for each connection's socket (Linux names; skipped
    where the platform lacks an option, and for unix sockets).

    The defaults notice a silently dropped network path within about 30 seconds, idle or
    mid-query, and never cut a long query on a live server: its kernel answers the probes.

    - ``idle``: seconds of silence before the first probe (``TCP_KEEPIDLE``).
    - ``interval``: seconds between probes (``TCP_KEEPINTVL``).
    - ``count``: unanswered probes before the connection is dropped (``TCP_KEEPCNT``).
    - ``user_timeout``: seconds sent data may stay unacknowledged (``TCP_USER_TIMEOUT``);
      ``0`` leaves the kernel default (about 15 minutes of retransmissions).
    """

    idle: int = 15
    interval: int = 5
    count: int = 3
    user_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("idle", "interval", "count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"TCPKeepalive.{name} must be a whole number of at least 1 (the kernel "
                    f"counts whole seconds and probes), got {value!r}"
                )
        _seconds("TCPKeepalive.user_timeout", self.user_timeout, allow_zero=True)


#: Probes after 15 s of silence, every 5 s, 3 of them; unacknowledged data for 30 s drops it.
DEFAULT_TCP_KEEPALIVE = TCPKeepalive()


# wsrep_sync_wait's bits: 1 reads, 2 UPDATE and DELETE, 4 INSERT and REPLACE, 8 SHOW.
_MAX_SYNC_WAIT = 15


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """asyncgone's own keywords to ``create_engine()``; everything else goes to SQLAlchemy.

    - ``recycle``: ``"auto"`` (idle limit just below this connection's ``wait_timeout``), a
      number of seconds, or ``None`` to rely on the socket check alone.
    - ``max_lifetime``: seconds a connection lives at most (with jitter), or ``None``.
    - ``ping_after``: idle seconds after which checkout pings; ``0`` pings every checkout,
      ``None`` never pings.
    - ``ping_timeout``: bound on each ping and on the server-facts query.
    - ``connect_timeout``: bound on opening a connection (unless the URL or ``connect_args``
      set ``connect_timeout`` themselves).
    - ``tcp_keepalive``: ``TCPKeepalive`` settings, or ``None`` to keep the kernel's.
    - ``kill_on_cancel``: when a cancellation abandons a running statement, stop it on the
      server with ``KILL CONNECTION`` so it does not run on holding its locks.
    - ``keepalive_interval``: idle seconds after which the keepalive (``keepalive()``,
      ``Database(keepalive=True)``) pings a connection; ``"auto"`` derives it.
    - ``network_idle_limit``: seconds of silence after which the network between client and
      server may forget a connection (load balancer, NAT); the keepalive stays below it.
    - ``min_idle``: connections the keepalive keeps open while the engine is idle (at most
      ``pool_size``).
    - ``leak_threshold``: seconds a connection may stay checked out before asyncgone logs a
      warning with the stack that acquired it (``None``, the default, turns this off: it
      costs a stack capture per checkout).
    - ``target_role``: the role a new connection's server must have: ``"primary"``
      (writable: ``@@read_only`` and ``@@innodb_read_only`` off), ``"replica"`` (read-only)
      or ``"any"``; ``None`` (the default) means ``"primary"`` for a URL with several
      ``host=`` parameters and ``"any"`` for one server (whose role is then not checked).
    - ``host_search_timeout``: seconds the search for a fitting host may take in all, for a
      multi-host URL or a ``target_role``; ``None`` (the default) gives every host one full
      attempt (``connect_timeout`` plus ``ping_timeout`` each).
    - ``max_connecting``: connection attempts in flight at once per engine (default 2), or
      ``None`` for no cap; the others wait their turn, up to ``pool_timeout`` seconds.
    - ``connect_retry``: seconds a connect keeps retrying, with a backoff, after the server
      refused it (1040, 1203, 1129) or nothing listened (2002/2003, a refused socket
      connect, retried only once the engine has reached its server: before, it is more
      likely a wrong port, raised at once); default 5; ``"pool_timeout"`` uses the pool's
      ``pool_timeout``; ``None`` or ``0`` raises the first refusal.
    - ``connect_backoff_max``: the longest pause between two refused attempts, in seconds
      (default 2).
    - ``overflow_give_back``: while the pool holds connections beyond ``pool_size``, ask the
      server (one ``SHOW GLOBAL STATUS`` every ``connect_backoff_max`` seconds at most, a
      quarter of that after its first question, after a restart and while the server is
      full) whether it refused other clients while full, and if so close returning
      overflow connections, one per refusal, so that the pools of a fleet come before its
      overflow (default ``True``; single-host engines only; see ``docs/fleets.md``).
    - ``galera_spread``: for Galera nodes (and any multi-host URL), spread new connections
      round-robin over the hosts that fit instead of sending them all to one node at a time
      (the default, ``False``, which keeps certification conflicts between the
      application's own transactions away).
    - ``wsrep_sync_wait``: the ``wsrep_sync_wait`` bitmask (0 to 15; 1 makes reads causal)
      set on each new connection to a Galera node, one ``SET`` at connect; ``None`` (the
      default) keeps the server's.
    """

    recycle: float | Literal["auto"] | None = DEFAULT_RECYCLE
    max_lifetime: float | None = DEFAULT_MAX_LIFETIME
    ping_after: float | None = DEFAULT_PING_AFTER
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    tcp_keepalive: TCPKeepalive | None = DEFAULT_TCP_KEEPALIVE
    kill_on_cancel: bool = True
    keepalive_interval: float | Literal["auto"] = DEFAULT_KEEPALIVE_INTERVAL
    network_idle_limit: float = DEFAULT_NETWORK_IDLE_LIMIT
    min_idle: int = 0
    leak_threshold: float | None = None
    target_role: TargetRole | None = None
    host_search_timeout: float | None = None
    max_connecting: int | None = DEFAULT_MAX_CONNECTING
    connect_retry: float | Literal["pool_timeout"] | None = DEFAULT_CONNECT_RETRY
    connect_backoff_max: float = DEFAULT_CONNECT_BACKOFF_MAX
    overflow_give_back: bool = True
    galera_spread: bool = False
    wsrep_sync_wait: int | None = None

    def __post_init__(self) -> None:
        recycle: object = self.recycle
        if recycle != "auto" and recycle is not None:
            if isinstance(recycle, str):
                raise ConfigurationError(
                    f"recycle must be 'auto', a number of seconds or None, got {recycle!r}"
                )
            _seconds("recycle", recycle)
        if self.max_lifetime is not None:
            _seconds("max_lifetime", self.max_lifetime)
        if self.ping_after is not None:
            _seconds("ping_after", self.ping_after, allow_zero=True)
        _seconds("ping_timeout", self.ping_timeout)
        _seconds("connect_timeout", self.connect_timeout)
        interval: object = self.keepalive_interval
        if interval != "auto":
            if isinstance(interval, str):
                raise ConfigurationError(
                    f"keepalive_interval must be 'auto' or a number of seconds, got {interval!r}"
                )
            _seconds("keepalive_interval", interval)
        _seconds("network_idle_limit", self.network_idle_limit)
        check_count("min_idle", self.min_idle, minimum=0)
        if self.leak_threshold is not None:
            _seconds("leak_threshold", self.leak_threshold)
        check_flag("kill_on_cancel", self.kill_on_cancel)
        if self.target_role is not None:
            check_target_role(self.target_role)
        if self.host_search_timeout is not None:
            _seconds("host_search_timeout", self.host_search_timeout)
        if self.max_connecting is not None:
            check_count("max_connecting", self.max_connecting, minimum=1)
        retry: object = self.connect_retry
        if retry != "pool_timeout" and retry is not None:
            if isinstance(retry, str):
                raise ConfigurationError(
                    f"connect_retry must be 'pool_timeout', a number of seconds or None, "
                    f"got {retry!r}"
                )
            _seconds("connect_retry", retry, allow_zero=True)
        _seconds("connect_backoff_max", self.connect_backoff_max)
        check_flag("overflow_give_back", self.overflow_give_back)
        check_flag("galera_spread", self.galera_spread)
        if self.wsrep_sync_wait is not None:
            check_count("wsrep_sync_wait", self.wsrep_sync_wait, minimum=0)
            if self.wsrep_sync_wait > _MAX_SYNC_WAIT:
                raise ConfigurationError(
                    f"wsrep_sync_wait is a bitmask from 0 to {_MAX_SYNC_WAIT}, "
                    f"got {self.wsrep_sync_wait!r}"
                )
        if self.tcp_keepalive is not None and not isinstance(self.tcp_keepalive, TCPKeepalive):
            raise ConfigurationError(
                f"tcp_keepalive must be an asyncgone.TCPKeepalive or None, "
                f"got {self.tcp_keepalive!r}"
            )

    @classmethod
    def names(cls) -> frozenset[str]:
        """Return the keyword names these options accept."""
        return frozenset(field.name for field in dataclasses.fields(cls))


# -- the rest of asyncgone's options, validated here so every message reads the same ---------


def seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return ``value`` as seconds, or raise ``ConfigurationError`` naming ``name``."""
    return _seconds(name, value, allow_zero=allow_zero)


def check_flag(name: str, value: object) -> bool:
    """Return ``value`` if it is True or False, else raise ``ConfigurationError``."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}")
    return value


def check_count(name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` if it is a whole number of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(
            f"{name} must be a whole number of at least {minimum}, got {value!r}"
        )
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How ``Database.run()`` replays a unit of work (see there).

    - ``attempts``: tries of a unit of work that keeps failing retryably (at least 1).
    - ``deadline``: seconds ``run()`` keeps trying, waiting out a server that is down.
    - ``retry_codes``: MySQL error numbers after which the work is rolled back and safe to
      run again, besides disconnects.
    """

    attempts: int
    deadline: float
    retry_codes: frozenset[int]

    def __post_init__(self) -> None:
        check_count("attempts", self.attempts, minimum=1)
        _seconds("deadline", self.deadline, allow_zero=True)
        codes: object = self.retry_codes
        if not isinstance(codes, Collection) or isinstance(codes, (str, bytes)):
            raise ConfigurationError(
                f"retry_codes must be a collection of MySQL error numbers, such as "
                f"{{1205, 1213}}, got {codes!r}"
            )
        if not all(isinstance(code, int) and not isinstance(code, bool) for code in codes):
            raise ConfigurationError(f"retry_codes must be MySQL error numbers, got {codes!r}")
        object.__setattr__(self, "retry_codes", frozenset(self.retry_codes))

    def override(
        self,
        attempts: int | None = None,
        deadline: float | None = None,
        retry_codes: Collection[int] | None = None,
    ) -> RunOptions:
        """Return these options with the given ones replaced (and validated)."""
        return RunOptions(
            attempts=self.attempts if attempts is None else attempts,
            deadline=self.deadline if deadline is None else deadline,
            retry_codes=self.retry_codes if retry_codes is None else retry_codes,  # type: ignore[arg-type]
        )


def check_keepalive(interval: object, min_idle: object) -> None:
    """Validate the keepalive's interval (``"auto"`` or seconds) and ``min_idle``."""
    if interval != "auto":
        if isinstance(interval, str):
            raise ConfigurationError(
                f"keepalive interval must be 'auto' or a positive number of seconds, "
                f"got {interval!r}"
            )
        _seconds("keepalive interval", interval)
    check_count("min_idle", min_idle, minimum=0)


def given_connect_timeout(url: URL, connect_args: Mapping[str, Any]) -> float | None:
    """Return a connect timeout set in ``connect_args`` or the URL (which SQLAlchemy
    prefers), validated; None when neither sets one."""
    for source, value in (
        ("connect_args", connect_args.get("connect_timeout")),
        ("the URL", url.query.get("connect_timeout")),
    ):
        if value is None:
            continue
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = -1.0
        if not 0 < number < math.inf:
            raise ConfigurationError(
                f"connect_timeout in {source} must be a positive number of seconds, got {value!r}"
            )
        return number
    return None


# A keyword this close (difflib's ratio) to one of asyncgone's is taken for a misspelling of
# it rather than passed on to SQLAlchemy. SQLAlchemy's own keywords stay below: the closest,
# pool_timeout and pool_recycle, score 0.75 and 0.74 against ping_timeout and recycle.
_MISSPELLING = 0.8


def split_options(
    kwargs: Mapping[str, Any], *, also: Collection[str] = ()
) -> tuple[EngineOptions, dict[str, Any]]:
    """Separate asyncgone's keywords (validated now) from those meant for SQLAlchemy.

    ``pool_pre_ping=True`` becomes ``ping_after=0``: on an asyncgone engine it means a
    bounded ping at every checkout of a reused connection, after the free socket check (see
    the configuration docs). A keyword that is not asyncgone's but within a typo of one of
    asyncgone's names (or of ``also``, a caller's own) raises ``ConfigurationError`` naming
    the match; any other keyword is left for SQLAlchemy to accept or refuse.
    """
    names = EngineOptions.names()
    ours = {key: value for key, value in kwargs.items() if key in names}
    theirs = {key: value for key, value in kwargs.items() if key not in names}
    pre_ping = theirs.pop("pool_pre_ping", None)
    if pre_ping is not None:
        check_flag("pool_pre_ping", pre_ping)
        if pre_ping:
            if "ping_after" in ours:
                raise ConfigurationError(
                    "pass pool_pre_ping=True or ping_after, not both: on an asyncgone engine "
                    "pool_pre_ping=True means ping_after=0 (a bounded ping at every checkout)"
                )
            ours["ping_after"] = 0.0
    known = sorted(names | set(also))
    for key in theirs:
        match = difflib.get_close_matches(key, known, n=1, cutoff=_MISSPELLING)
        if match:
            raise ConfigurationError(
                f"unknown keyword {key!r}: did you mean {match[0]!r}? (asyncgone's keywords "
                f"are listed on EngineOptions; other keywords go to SQLAlchemy)"
            )
    return EngineOptions(**ours), theirs
