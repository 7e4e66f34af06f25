"""The keepalive's watch over Galera nodes: which may serve, checked in the background.

Once the host search has met a Galera node (``@@wsrep_on``, read at connect by the
server-facts query, see ``_wsrep``), every keepalive round also checks each host of the
engine's URL, concurrently, on a connection of its own per host (outside the pool, kept
between rounds), with one ``SELECT`` of ``wsrep_on``, ``wsrep_ready``,
``wsrep_local_state`` and ``wsrep_cluster_status``. Each check is bounded by
``connect_timeout`` and ``ping_timeout``.

A node that is not ready and Synced in a Primary component, or does not answer, is
*unsynced*: the host search tries it after every other node (``HostSearch.unsynced``).
The pool's connections to an unsynced node are retired at their next checkout, with no
round trip (``HostSearch.retire``). Without ``galera_spread``, so are those to any node
but the one new connections go to (``HostSearch.preferred``): connections opened while
that node looked unreachable, which would otherwise write next to the others and meet
certification conflicts. A node found Synced again is tried in
its URL place again for new connections; with ``galera_spread`` the pool is invalidated
then too, so that its connections spread over it again (one reconnect each, once). The
checkout path pays nothing for any of this.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import _statements
from ._errors import describe
from ._hosts import HostAddress
from ._search import HostConnections, HostSearch
from ._state import EngineState
from ._waits import bounded
from ._wsrep import STATUS_SQL, WsrepState, parse

__all__ = ["GaleraWatch", "NodeCheck"]

log = logging.getLogger("asyncgone")

NodeCheck = WsrepState | str  # the node's state, or why it could not be read


class GaleraWatch:
    """The Galera nodes of one engine's host search; see the module docstring."""

    def __init__(self, state: EngineState, search: HostSearch) -> None:
        self._state = state
        self._search = search
        self._conns = HostConnections(state, search)
        #: The last check of each node.
        self.checks: dict[HostAddress, NodeCheck] = {}

    async def check(self) -> None:
        """Check every host now, if any is a Galera node; update what is unsynced."""
        search = self._search
        if not search.galera:
            return
        hosts = search.hosts
        results = await asyncio.gather(*(self._check(h) for h in hosts))
        self.checks = dict(zip(hosts, results, strict=True))
        back: list[str] = []
        for host, result in self.checks.items():
            if isinstance(result, WsrepState) and result.eligible:
                if host in search.unsynced:
                    log.info("Galera node %s is Synced again: it takes connections", host)
                    back.append(str(host))
                search.unsynced.discard(host)
                continue
            why = result.describe() if isinstance(result, WsrepState) else result
            if host not in search.unsynced:
                log.warning("Galera node %s may not serve: %s", host, why)
            search.node_unsynced(host, why)
        # Connections to a node that may not serve go; so do, unless connections spread,
        # those to any node but the one in use: a new connection went to another node
        # while that one looked unreachable, and two nodes writing the same rows conflict.
        retire = set(search.unsynced)
        keep = search.preferred
        spread = search.spread or search.target == "replica"  # replicas go round-robin
        if not spread and keep is not None:
            retire.update(h for h in search.hosts if h != keep)
        retired = search.retire(retire)
        if retired:
            log.info("retiring %d connections to Galera nodes other than %s", retired, keep)
        if back and spread:
            # Spread again: the pool's connections all went to the other nodes meanwhile.
            self._state.invalidate_pool(
                time.monotonic(), f"Galera nodes Synced again, to spread over: {', '.join(back)}"
            )

    async def close(self) -> None:
        """Close the watch's connections (bounded; safe twice)."""
        await self._conns.close()

    async def _check(self, host: HostAddress) -> NodeCheck:
        try:
            conn = await self._conns.get(host)
            row = await bounded(
                _statements.fetch_row(conn, STATUS_SQL), self._state.options.ping_timeout
            )
            found = None if row is None else parse(row[1], row[2])
            return found if found is not None else "no wsrep state"
        except Exception as exc:
            await self._conns.drop(host)
            return f"unreachable ({describe(exc)})"
