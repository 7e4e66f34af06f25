"""Galera nodes failing under an application, on a real three-node MariaDB Galera cluster:
a node killed and rejoined under 8 writers, a node desynced and resynced, a certification
conflict between two nodes. Both drivers; the cluster is shared (``asyncgone_galera``)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import asyncgone
from asyncgone._state import state_of
from asyncgone.testing import GaleraCluster, MariaDBServer
from tests._support import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.topology]

WORKERS = 8
INTERVAL = 1.0  # keepalive_interval: a round, and so a check of every node, each 0.5 s


def setup(cluster: GaleraCluster) -> None:
    """A ledger and a counter row, created on the first node and applied everywhere."""
    cluster.nodes[0].query(
        "CREATE TABLE test.ledger (seq INT AUTO_INCREMENT PRIMARY KEY, token INT NOT NULL);"
        " CREATE TABLE test.counter (id INT PRIMARY KEY, n INT NOT NULL);"
        " INSERT INTO test.counter VALUES (1, 0);"
        " CREATE TABLE test.probe (id INT AUTO_INCREMENT PRIMARY KEY)"
    )
    cluster.wait_applied()


async def port_of(session: AsyncSession) -> int:
    return int((await session.execute(text("SELECT @@port"))).scalar_one())


async def ports(db: asyncgone.Database, rounds: int = 4) -> Counter[int]:
    """The nodes ``WORKERS`` concurrent sessions ran on, ``rounds`` times over."""
    seen: Counter[int] = Counter()

    async def one() -> None:
        seen[await db.run(port_of)] += 1

    for _ in range(rounds):
        async with anyio.create_task_group() as tg:
            for _ in range(WORKERS):
                tg.start_soon(one)
    return seen


async def test_a_desynced_node_gets_no_new_sessions_until_it_is_synced_again(
    asyncgone_galera: GaleraCluster, driver: str
) -> None:
    """With galera_spread, sessions go to all three nodes; a node desynced (wsrep_desync,
    wsrep_reject_queries=ALL) gets none once the keepalive's next round notes it, and gets
    them back once a round finds it Synced again."""
    cluster = asyncgone_galera
    third = cluster.nodes[2]
    url = cluster.url(driver)
    async with asyncgone.Database(
        url, pool_size=WORKERS, galera_spread=True, keepalive_interval=INTERVAL
    ) as db:
        search = state_of(db.engine).search  # type: ignore[union-attr]
        assert search is not None

        def noted() -> bool:
            return third.port in {h.port for h in search.unsynced}

        assert set(await ports(db)) == {n.port for n in cluster.nodes}
        await anyio.to_thread.run_sync(cluster.desync, third)
        # The watch's next round (half an interval, plus the round's own checks) notes it:
        # waited for, not slept, as a loaded machine may stretch the round.
        await eventually(noted, limit=2 * INTERVAL + 2)
        assert third.port not in await ports(db)
        await anyio.to_thread.run_sync(cluster.resync, third)
        await eventually(lambda: not noted(), limit=2 * INTERVAL + 2)
        back = await ports(db)
        stats = db.stats()
    assert third.port in back
    assert stats.unavailable == 0


async def test_the_node_in_use_desynced_moves_every_session_to_the_next(
    asyncgone_galera: GaleraCluster, driver: str
) -> None:
    """By default every session goes to one node (the first in URL order); desynced, its
    sessions move to the next node within one keepalive interval, with no error for work
    that reads tables (1047 on the desynced node is replayed elsewhere)."""
    cluster = asyncgone_galera
    setup(cluster)
    first, second, _ = cluster.nodes
    errors: list[BaseException] = []

    async def count(session: AsyncSession) -> tuple[int, int]:
        row = (await session.execute(text("SELECT @@port, COUNT(*) FROM ledger"))).one()
        return int(row[0]), int(row[1])

    async with asyncgone.Database(
        cluster.url(driver), pool_size=WORKERS, keepalive_interval=INTERVAL
    ) as db:
        assert set(await ports(db)) == {first.port}
        await anyio.to_thread.run_sync(cluster.desync, first)
        try:
            for _ in range(20):  # table reads while the watch has not yet noticed
                try:
                    await db.run(count)
                except Exception as exc:
                    errors.append(exc)
            await anyio.sleep(INTERVAL)
            assert set(await ports(db)) == {second.port}
        finally:
            await anyio.to_thread.run_sync(cluster.resync, first)
    assert errors == []


async def test_a_1047_on_a_pooled_connection_moves_work_to_the_next_node_at_once(
    asyncgone_galera: GaleraCluster, driver: str
) -> None:
    """Without the keepalive: the node in use starts rejecting queries under a warm pool;
    the first table read meets 1047, the node is tried last from then on, and the read is
    replayed on the next node."""
    cluster = asyncgone_galera
    setup(cluster)
    first, second, _ = cluster.nodes

    async def count(session: AsyncSession) -> int:
        await session.execute(text("SELECT COUNT(*) FROM ledger"))
        return await port_of(session)

    async with asyncgone.Database(cluster.url(driver), pool_size=2, keepalive=False) as db:
        assert set(await ports(db, rounds=1)) == {first.port}
        await anyio.to_thread.run_sync(first.query, "SET GLOBAL wsrep_reject_queries=ALL")
        try:
            assert await db.run(count) == second.port
            replays = db.stats().replays
            search = state_of(db.engine).search  # type: ignore[union-attr]
            assert search is not None
            unsynced = set(search.unsynced)
            # Marked by the error itself, not by a connect attempt that found it rejecting.
            why = next(v for h, v in search.seen.items() if h.port == first.port)
        finally:
            await anyio.to_thread.run_sync(first.query, "SET GLOBAL wsrep_reject_queries=NONE")
    assert replays == 1
    assert {h.port for h in unsynced} == {first.port}
    assert "1047" in why


async def test_a_certification_conflict_between_two_nodes_is_replayed(
    asyncgone_galera: GaleraCluster, driver: str
) -> None:
    """Two units of work update one row, on two nodes: the one that commits second fails
    certification (1213 at COMMIT, nothing committed), run() replays it, both complete."""
    cluster = asyncgone_galera
    setup(cluster)
    first, second, _ = cluster.nodes
    attempts = 0
    updated = anyio.Event()
    other_committed = anyio.Event()

    async def slow(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        await session.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))
        if attempts == 1:
            updated.set()
            await other_committed.wait()

    async def quick(session: AsyncSession) -> None:
        await session.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))

    async with (
        asyncgone.Database(cluster.node_url(first, driver)) as one,
        asyncgone.Database(cluster.node_url(second, driver)) as two,
    ):
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(one.run, slow)
                await updated.wait()
                await two.run(quick)
                other_committed.set()
        replays = one.stats().replays
    await anyio.to_thread.run_sync(cluster.wait_applied)
    assert attempts == 2
    assert replays == 1
    for node in cluster.nodes:
        assert node.value("SELECT n FROM test.counter WHERE id = 1") == "2"


async def test_wsrep_sync_wait_is_set_on_each_new_connection(
    asyncgone_galera: GaleraCluster, driver: str
) -> None:
    """wsrep_sync_wait=1 makes every session's reads causal on a Galera node."""
    cluster = asyncgone_galera
    engine = asyncgone.create_engine(cluster.url(driver), wsrep_sync_wait=1)
    try:
        async with engine.connect() as conn:
            value = (await conn.execute(text("SELECT @@session.wsrep_sync_wait"))).scalar_one()
    finally:
        await engine.dispose()
    assert int(value) == 1


class Ledger:
    """What the workers were told: acknowledged tokens, unknown outcomes, errors, when."""

    def __init__(self) -> None:
        self.tokens = itertools.count(1)
        self.acked: list[tuple[float, int]] = []
        self.unknown: list[int] = []
        self.errors: list[BaseException] = []

    async def worker(self, db: asyncgone.Database, stop: anyio.Event) -> None:
        while not stop.is_set():
            token = next(self.tokens)

            async def write(session: AsyncSession, token: int = token) -> None:
                await session.execute(text("INSERT INTO ledger (token) VALUES (:t)"), {"t": token})
                await session.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))

            try:
                await db.run(write)
            except asyncgone.CommitOutcomeUnknown:
                self.unknown.append(token)
            except Exception as exc:
                self.errors.append(exc)
            else:
                self.acked.append((time.monotonic(), token))
            await anyio.sleep(0.005)

    async def acked_after(self, moment: float, count: int, limit: float = 60.0) -> float:
        """Wait until ``count`` writes were acknowledged after ``moment``; return when the
        first of them was."""
        with anyio.fail_after(limit):
            while sum(1 for t, _ in self.acked if t > moment) < count:  # noqa: ASYNC110 - a list other tasks append to
                await anyio.sleep(0.05)
        return min(t for t, _ in self.acked if t > moment)

    def check(self, cluster: GaleraCluster) -> dict[str, Any]:
        """Every node: every acknowledged token exactly once, an unknown one at most once,
        nothing else, and the counter equal to the ledger's rows."""
        acked = {token for _, token in self.acked}
        counters = []
        for node in cluster.nodes:
            rows = node.query("SELECT token, COUNT(*) AS k FROM test.ledger GROUP BY token")
            counts = {int(row["token"]): int(row["k"]) for row in rows}  # type: ignore[arg-type]
            lost = [t for t in acked if counts.get(t, 0) == 0]
            duplicated = [t for t, k in counts.items() if k > 1]
            strangers = [t for t in counts if t not in acked and t not in self.unknown]
            assert (lost, duplicated, strangers) == ([], [], [])
            counter = int(node.value("SELECT n FROM test.counter WHERE id = 1") or -1)
            assert counter == sum(counts.values())
            counters.append(counter)
        assert len(set(counters)) == 1
        return {
            "acknowledged": len(acked),
            "unknown": len(self.unknown),
            "unknown_committed": counters[0] - len(acked),
        }


async def write_through(node: MariaDBServer, since: float, into: list[float]) -> None:
    await anyio.to_thread.run_sync(
        lambda: node.query("INSERT INTO test.probe VALUES (NULL)", timeout=60)
    )
    into.append(time.monotonic() - since)


async def node_in_use(db: asyncgone.Database, cluster: GaleraCluster) -> MariaDBServer:
    port = await db.run(port_of)
    return next(n for n in cluster.nodes if n.port == port)


async def test_nodes_killed_and_rejoined_under_writers_lose_nothing(
    asyncgone_galera: GaleraCluster, driver: str
) -> None:
    """8 writers under run(): the node in use is SIGKILLed, rejoins, then the next node in
    use is killed and rejoins. No acknowledged write is lost or applied twice, the counter
    row is the same on every node, and no error reaches the workers but counted unknown
    COMMIT outcomes."""
    cluster = asyncgone_galera
    setup(cluster)
    ledger = Ledger()
    stop = anyio.Event()
    reroutes: list[float] = []
    writable: list[float] = []  # when a survivor took a write again, after each kill
    killed_nodes = []
    async with asyncgone.Database(
        cluster.url(driver), pool_size=WORKERS, run_deadline=60, keepalive_interval=INTERVAL
    ) as db:
        async with anyio.create_task_group() as tg:
            for _ in range(WORKERS):
                tg.start_soon(ledger.worker, db, stop)
            try:
                await ledger.acked_after(0.0, 100)
                for _ in range(2):
                    victim = await node_in_use(db, cluster)
                    killed_nodes.append(victim.port)
                    await anyio.to_thread.run_sync(cluster.kill, victim)
                    killed = time.monotonic()
                    survivor = next(n for n in cluster.nodes if n.running)
                    async with anyio.create_task_group() as probes:
                        # The cluster's own stall: a write straight to a survivor returns
                        # once the others evicted the dead node.
                        probes.start_soon(write_through, survivor, killed, writable)
                        reroutes.append(await ledger.acked_after(killed, 50) - killed)
                    await anyio.to_thread.run_sync(cluster.rejoin, victim)
                    await ledger.acked_after(time.monotonic(), 50)
            finally:
                stop.set()
        stats = db.stats()
    await anyio.to_thread.run_sync(cluster.wait_applied)
    figures = ledger.check(cluster)
    assert ledger.errors == []
    assert stats.commit_outcome_unknown == len(ledger.unknown)
    assert len(set(killed_nodes)) == 2  # the second kill hit the node writes had moved to
    print(
        f"\nFIGURES galera kill {driver}: first acknowledged write "
        f"{', '.join(f'{r:.2f}' for r in reroutes)} s after each kill, a write straight to "
        f"a survivor {', '.join(f'{w:.2f}' for w in writable)} s; {figures}; "
        f"replays {stats.replays}, pool invalidations {stats.pool_invalidations}"
    )


def test_doctor_shows_each_nodes_wsrep_state(asyncgone_galera: GaleraCluster) -> None:
    """``asyncgone doctor`` on the nodes' URL shows each node's wsrep state; a desynced one
    as skipped."""
    cluster = asyncgone_galera
    third = cluster.nodes[2]
    cluster.desync(third)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "asyncgone", "doctor", "--json", cluster.url("asyncmy")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        text_report = subprocess.run(
            [sys.executable, "-m", "asyncgone", "doctor", cluster.url("asyncmy")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        cluster.resync(third)
    assert result.returncode == 0, result.stderr
    hosts = {h["host"]: h for h in json.loads(result.stdout)["hosts"]}
    first = hosts[f"127.0.0.1:{cluster.nodes[0].port}"]
    assert first["galera"] == "Synced, ready, Primary component"
    assert "may go here" in first["asyncgone"]
    desynced = hosts[f"127.0.0.1:{third.port}"]
    assert desynced["galera_eligible"] is False
    assert "wsrep_reject_queries=ALL" in desynced["galera"]
    assert "skipped" in desynced["asyncgone"]
    assert "Galera node: Donor/Desynced" in text_report.stdout
