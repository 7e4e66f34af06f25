"""The host search: each new connection of a multi-host engine goes to a host whose role fits.

For each new connection the search tries the URL's hosts one at a time: it opens a
connection (bounded by ``connect_timeout``, through the engine's connector) and reads the
server facts (``_server.read_facts``, bounded by ``ping_timeout``): the query asyncgone runs
on every new connection anyway, which also says whether the server is read-only. A
connection whose role fits is kept, and its facts handed to the ``connect`` listener, so
that finding the role costs no round trip of its own. One that does not fit is closed and
the next host is tried. The whole search is bounded by ``host_search_timeout``.

A Galera node (``@@wsrep_on``, read by the same query, see ``_wsrep``) fits only while it
is ready and Synced in a Primary component; one that is not, or that answers 1047 to the
query, is noted as *unsynced*: tried after the others until it is found Synced again,
here or by the keepalive's watch (``_galera``). With ``galera_spread``, connections go
round-robin over the fitting hosts instead of to one node at a time.

Order: for ``"primary"`` and ``"any"``, the host that fitted last time first (in steady
state, one attempt per connection), then the others in the URL's order; for ``"replica"``,
round-robin over the hosts, so that connections spread over the replicas (and over
Galera nodes with ``galera_spread``). Hosts the
engine's owner marked as avoided (a replica that lags, see ``_replicas``) are not tried.

When no host fits, the search raises the driver's error 2003 ("can't connect"), naming
every host tried and what it was: run() and the checkout path take it as a server that is
unavailable for now (a failover in progress), and wait or fail as they do for one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Collection
from typing import TYPE_CHECKING, Any, TypeVar

from ._connector import Connector, open_connection
from ._errors import describe, is_node_not_ready, is_unavailable
from ._hosts import HostAddress, TargetRole, role_fits
from ._server import ServerFacts, read_facts
from ._statements import close, execute
from ._waits import LOOP_CLOCK_TICK, bounded

if TYPE_CHECKING:
    from ._state import ConnectionHolder, EngineState

__all__ = ["HostConnections", "HostSearch"]

_T = TypeVar("_T")

log = logging.getLogger("asyncgone")

_CANNOT_CONNECT = 2003  # CR_CONN_HOST_ERROR: what any failure to connect reports
_LOST = 2013  # CR_SERVER_LOST


class HostSearch:
    """Where one engine's new connections go; see the module docstring."""

    def __init__(
        self,
        hosts: tuple[HostAddress, ...],
        target: TargetRole,
        *,
        ping_timeout: float,
        deadline: float,
        error: type[Exception],
        spread: bool = False,
        sync_wait: int | None = None,
    ) -> None:
        self.hosts = hosts
        self.target = target
        self.deadline = deadline  # seconds, for the whole search
        self._ping_timeout = ping_timeout
        self._error = error
        self._turn = itertools.count()
        #: Round-robin over the fitting hosts (``galera_spread``) even for "primary".
        self.spread = spread
        #: ``wsrep_sync_wait`` to set on each new connection to a Galera node, or None.
        self.sync_wait = sync_wait
        #: Hosts found to be Galera nodes (``@@wsrep_on``): the keepalive watches these.
        self.galera: set[HostAddress] = set()
        #: Galera nodes last found not Synced, or refusing with 1047: tried last.
        self.unsynced: set[HostAddress] = set()
        #: The host the last connection went to (tried first for "primary" and "any").
        self.preferred: HostAddress | None = None
        #: Hosts not to connect to for now (set by the engine's owner, e.g. lagging replicas).
        self.avoided: frozenset[HostAddress] = frozenset()
        #: What each host was when last tried: "primary", "replica" or "unreachable: ...".
        self.seen: dict[HostAddress, str] = {}
        #: When each host was last found unreachable (monotonic); tried last for a while.
        self.down: dict[HostAddress, float] = {}
        #: How long a host found unreachable is tried after the others, in seconds.
        self.recheck_after = 1.0
        #: The driver's connect keywords, without host and port (set by create_engine()).
        self.params: dict[str, Any] = {}
        self._facts: weakref.WeakKeyDictionary[Any, ServerFacts] = weakref.WeakKeyDictionary()
        self._hosts_of: weakref.WeakKeyDictionary[Any, HostAddress] = weakref.WeakKeyDictionary()
        self._holders: weakref.WeakKeyDictionary[Any, ConnectionHolder] = (
            weakref.WeakKeyDictionary()
        )

    def usable(self, now: float | None = None) -> list[HostAddress]:
        """The hosts neither avoided nor found unreachable within ``recheck_after``."""
        now = time.monotonic() if now is None else now
        return [
            h
            for h in self.hosts
            if h not in self.avoided
            and h not in self.unsynced
            and now - self.down.get(h, -math.inf) >= self.recheck_after
        ]

    def order(self) -> list[HostAddress]:
        """The hosts in the order the next search tries them: the usable ones (see the
        module docstring), then those recently found unreachable."""
        hosts = self.usable()
        if (self.target == "replica" or self.spread) and hosts:
            start = next(self._turn) % len(hosts)
            hosts = hosts[start:] + hosts[:start]
        preferred = self.preferred
        if self.target != "replica" and not self.spread and preferred in hosts:
            hosts.remove(preferred)
            hosts.insert(0, preferred)
        down = [h for h in self.hosts if h not in hosts and h not in self.avoided]
        return hosts + sorted(down, key=lambda h: self.down.get(h, 0.0))

    def facts_of(self, conn: Any) -> ServerFacts | None:
        """The facts read from a connection this search opened (once), or None."""
        return self._facts.pop(conn, None)

    def host_of(self, conn: Any) -> HostAddress | None:
        """The host a connection this search opened goes to, or None."""
        return self._hosts_of.get(conn)

    def adopt(self, conn: Any, holder: ConnectionHolder) -> None:
        """Remember the holder of a pooled connection this search opened (for ``retire``)."""
        if conn in self._hosts_of:
            self._holders[conn] = holder

    def retire(self, hosts: Collection[HostAddress]) -> int:
        """Retire the pooled connections to ``hosts`` at their next checkout, as at the end
        of their lifetime (no round trip, nothing closed here); return how many."""
        retired = 0
        for conn, host in list(self._hosts_of.items()):
            holder = self._holders.get(conn)
            if host in hosts and holder is not None and holder.expires > -math.inf:
                holder.expires = holder.trusted_until = -math.inf
                retired += 1
        return retired

    def wrap(self, connect: Connector) -> Connector:
        """A connector that searches the hosts, opening each with ``connect``."""

        async def search(*args: Any, **kwargs: Any) -> Any:
            return await self._search(connect, args, kwargs)

        return search

    async def _search(self, connect: Connector, args: Any, kwargs: dict[str, Any]) -> Any:
        # On the loop's clock, which the attempts' timeouts fire by: on time.monotonic()'s,
        # an attempt cut at the deadline by uvloop could leave a sliver of it, and the next
        # host would be tried in that sliver and reported unreachable.
        clock = asyncio.get_running_loop().time
        give_up_at = clock() + self.deadline
        tried: list[str] = []
        order = self.order()
        for host in order:
            left = give_up_at - clock()
            if left < LOOP_CLOCK_TICK:
                break
            try:
                conn, facts = await bounded(self._attempt(connect, host, args, kwargs), left)
            except Exception as exc:
                if is_node_not_ready(exc):  # a Galera node rejecting queries (1047)
                    self.node_unsynced(host, f"not ready ({describe(exc)})")
                    tried.append(f"{host} Galera node not ready (1047)")
                    continue
                if not is_unavailable(exc):
                    raise  # access denied, unknown database: no other host will do better
                what = (
                    f"no answer within the search's {self.deadline:g} s"
                    if isinstance(exc, TimeoutError)
                    else describe(exc)
                )
                self.seen[host] = f"unreachable: {what}"
                self.down[host] = time.monotonic()
                tried.append(f"{host} unreachable ({what})")
                continue
            role = "replica" if facts.read_only else "primary"
            self.seen[host] = role
            self.down.pop(host, None)
            if host in self.avoided:
                # Avoided while this connection was being opened: the owner's invalidation
                # of the pool came before it and would not retire it.
                tried.append(f"{host} avoided meanwhile")
                await close(conn, self._ping_timeout)
                continue
            wsrep = facts.wsrep
            if wsrep is not None and wsrep.on:
                self.galera.add(host)
                if not wsrep.eligible:
                    self.node_unsynced(host, wsrep.describe())
                    tried.append(f"{host} Galera node not Synced ({wsrep.describe()})")
                    await close(conn, self._ping_timeout)
                    continue
                self.unsynced.discard(host)
            if role_fits(self.target, facts.read_only):
                if self.sync_wait is not None and wsrep is not None and wsrep.on:
                    await self._set_sync_wait(conn)
                self.preferred = host
                self._facts[conn] = facts
                self._hosts_of[conn] = host
                return conn
            tried.append(f"{host} {'read-only' if facts.read_only else 'writable'}")
            await close(conn, self._ping_timeout)
        untried = order[len(tried) :]
        raise self._error(_CANNOT_CONNECT, self._message(tried, untried))

    def node_unsynced(self, host: HostAddress, why: str) -> None:
        """Note a Galera node that may not serve: tried after the others from now on."""
        self.galera.add(host)
        self.seen[host] = f"Galera node not serving: {why}"
        self.unsynced.add(host)
        if self.preferred == host:
            self.preferred = None

    async def _set_sync_wait(self, conn: Any) -> None:
        sql = f"SET SESSION wsrep_sync_wait={self.sync_wait:d}"
        step = bounded(execute(conn, sql), self._ping_timeout)
        await self._on_new(conn, step, "setting wsrep_sync_wait")

    async def _attempt(
        self, connect: Connector, host: HostAddress, args: Any, kwargs: dict[str, Any]
    ) -> tuple[Any, ServerFacts]:
        conn = await connect(*args, **{**kwargs, "host": host.host, "port": host.port})
        step = read_facts(conn, self._ping_timeout, role=True)
        return conn, await self._on_new(conn, step, "reading the server's role")

    async def _on_new(self, conn: Any, step: Awaitable[_T], doing: str) -> _T:
        """Await ``step`` on a connection the search just opened. On any failure the
        connection is closed; a timeout or a transport error means it is lost (2013, as in
        _connect)."""
        try:
            return await step
        except BaseException as exc:
            await close(conn, self._ping_timeout)
            if isinstance(exc, (TimeoutError, OSError)):
                raise self._error(_LOST, f"Lost connection while {doing}: {describe(exc)}") from exc
            raise

    def _message(self, tried: list[str], untried: list[HostAddress]) -> str:
        wanted = {
            "primary": "a writable server",
            "replica": "a read-only server",
            "any": "a server that answers",
        }[self.target]
        parts = [f"no host is {wanted} (target_role={self.target!r})"]
        parts.append(f"tried {', '.join(tried)}" if tried else "tried none")
        avoided = [str(h) for h in self.hosts if h in self.avoided]
        if avoided:
            parts.append(f"avoided (lagging or down) {', '.join(avoided)}")
        if untried:
            parts.append(
                f"not tried within {self.deadline:g} s (host_search_timeout): "
                f"{', '.join(map(str, untried))}"
            )
        return "; ".join(parts)


class HostConnections:
    """One connection per host of a search, outside the pool, kept open between background
    checks (the replica monitor's, the Galera node watch's): opened on first use (bounded by
    ``connect_timeout``), dropped after a failed check, all closed by ``close()``."""

    def __init__(self, state: EngineState, search: HostSearch) -> None:
        self._state = state
        self._search = search
        self._conns: dict[HostAddress, Any] = {}

    async def get(self, host: HostAddress) -> Any:
        """The connection to ``host``, opened now if there is none."""
        conn = self._conns.get(host)
        if conn is None:
            params = {**self._search.params, "host": host.host, "port": host.port}
            state = self._state
            conn = await open_connection(state.driver, params, state.connect_timeout)
            self._conns[host] = conn  # closed by drop() or close() from here on
        return conn

    async def drop(self, host: HostAddress) -> None:
        """Close the connection to ``host`` (after a failed check), if there is one."""
        conn = self._conns.pop(host, None)
        if conn is not None:
            await close(conn, self._state.options.ping_timeout)

    async def close(self) -> None:
        """Close every connection (bounded; safe twice)."""
        conns, self._conns = self._conns, {}
        for conn in conns.values():
            await close(conn, self._state.options.ping_timeout)
