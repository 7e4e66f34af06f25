"""Failover and switchover under writes, on real GTID replication: 8 workers write through
``Database.run()``; the primary is SIGKILLed and a replica promoted 2 s later (the other
re-pointed), or switched over as planned. Writes resume without a user-visible error and
the ledger of acknowledged writes on the new primary is exact.

The topology replicates semi-synchronously (``AFTER_SYNC``): a COMMIT is acknowledged only
once a replica has it, so a crash cannot take acknowledged writes with it. With
asynchronous replication a crash may lose the last acknowledged commits; no client can
prevent that (see the Topologies page).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import asyncgone
from asyncgone.testing import MariaDBServer, ReplicationTopology

pytestmark = [pytest.mark.anyio, pytest.mark.topology]

WORKERS = 8
SEMI_SYNC = (
    "--rpl-semi-sync-master-enabled=ON",
    "--rpl-semi-sync-slave-enabled=ON",
    "--rpl-semi-sync-master-wait-point=AFTER_SYNC",
    "--rpl-semi-sync-master-timeout=10000",
)


@pytest.fixture
def topology() -> Iterator[ReplicationTopology]:
    """A fresh semi-synchronous topology with an empty ledger table."""
    with ReplicationTopology(options=SEMI_SYNC) as topology:
        topology.primary.query(
            "CREATE TABLE test.ledger (seq INT AUTO_INCREMENT PRIMARY KEY, id INT NOT NULL)"
        )
        topology.wait_caught_up()
        yield topology


def received(replica: MariaDBServer, topology: ReplicationTopology) -> int:
    """The highest sequence number a replica has received (its relay log included)."""
    status = topology.replica_status(replica)
    positions = (status.get("Gtid_IO_Pos") or "").split(",")
    return max((int(p.rsplit("-", 1)[1]) for p in positions if p), default=0)


class Ledger:
    """What the workers were told: acknowledged ids, unknown outcomes, errors, and when."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.acked: list[tuple[float, int]] = []
        self.unknown: list[int] = []
        self.errors: list[BaseException] = []

    async def worker(self, db: asyncgone.Database, stop: anyio.Event) -> None:
        while not stop.is_set():
            value = next(self.ids)

            async def insert(session: AsyncSession, value: int = value) -> None:
                await session.execute(text("INSERT INTO ledger (id) VALUES (:v)"), {"v": value})

            try:
                await db.run(insert)
            except asyncgone.CommitOutcomeUnknown:
                self.unknown.append(value)
            except Exception as exc:
                self.errors.append(exc)
            else:
                self.acked.append((time.monotonic(), value))
            await anyio.sleep(0.005)

    def check(self, primary: MariaDBServer) -> dict[str, int]:
        """Compare with the new primary's table: every acknowledged id exactly once, an
        unknown one at most once, nothing else."""
        rows = primary.query("SELECT id, COUNT(*) AS n FROM test.ledger GROUP BY id")
        counts = {int(row["id"]): int(row["n"]) for row in rows}  # type: ignore[arg-type]
        acked = {value for _, value in self.acked}
        lost = [v for v in acked if counts.get(v, 0) == 0]
        duplicated = [v for v, n in counts.items() if n > 1]
        strangers = [v for v in counts if v not in acked and v not in self.unknown]
        assert (lost, duplicated, strangers) == ([], [], [])
        return {
            "acknowledged": len(acked),
            "unknown": len(self.unknown),
            "unknown_committed": sum(1 for v in self.unknown if v in counts),
        }


@contextlib.asynccontextmanager
async def writing(db: asyncgone.Database, ledger: Ledger) -> Any:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        for _ in range(WORKERS):
            tg.start_soon(ledger.worker, db, stop)
        try:
            yield
        finally:
            stop.set()


async def acked_after(ledger: Ledger, moment: float, count: int, limit: float = 30.0) -> None:
    with anyio.fail_after(limit):
        while sum(1 for t, _ in ledger.acked if t > moment) < count:  # noqa: ASYNC110 - a list other tasks append to
            await anyio.sleep(0.05)


async def test_primary_killed_then_a_replica_promoted(
    topology: ReplicationTopology, driver: str
) -> None:
    """SIGKILL of the primary under 8 writers, a replica promoted 2 s later: writes resume
    on it with no error, and no acknowledged write is lost or applied twice. Two readers
    on the replicas go on reading throughout, also while no server takes writes."""
    ledger = Ledger()
    url = topology.url(driver)
    replicas = topology.url(driver, role="replicas")
    reads: list[float] = []
    read_errors: list[BaseException] = []

    async def reader(db: asyncgone.Database, stop: anyio.Event) -> None:
        async def count(session: AsyncSession) -> int:
            return int((await session.execute(text("SELECT COUNT(*) FROM ledger"))).scalar_one())

        while not stop.is_set():
            try:
                await db.run(count, read_only=True)
                reads.append(time.monotonic())
            except Exception as exc:
                read_errors.append(exc)
            await anyio.sleep(0.01)

    async with asyncgone.Database(url, replicas=replicas, pool_size=WORKERS, run_deadline=30) as db:
        stop_reading = anyio.Event()
        async with writing(db, ledger), anyio.create_task_group() as readers:
            for _ in range(2):
                readers.start_soon(reader, db, stop_reading)
            await acked_after(ledger, 0.0, 200)
            await anyio.to_thread.run_sync(topology.kill, topology.primary)
            killed = time.monotonic()
            await anyio.sleep(2.0)
            chosen = max(topology.replicas, key=lambda r: received(r, topology))
            promoting = time.monotonic()
            await anyio.to_thread.run_sync(topology.promote, chosen)
            promoted = time.monotonic()
            await acked_after(ledger, promoted, 200)
            stop_reading.set()
        first = min(t for t, _ in ledger.acked if t > promoting)
        outage_reads = sum(1 for t in reads if killed < t < promoting)
        # Nothing is acknowledged while no server is writable (after a moment for the
        # workers to report what was acknowledged before the kill).
        between = [v for t, v in ledger.acked if killed + 0.5 < t < promoting]
        figures = ledger.check(topology.primary)
        stats = db.stats()
    assert ledger.errors == []
    assert read_errors == []
    assert outage_reads > 0
    assert between == []
    print(
        f"\nFIGURES kill {driver}: promotion took {promoted - promoting:.2f} s; first write "
        f"{first - promoting:.2f} s after promotion began; {figures}; "
        f"replays {stats.replays}, pool invalidations {stats.pool_invalidations}; "
        f"{outage_reads} reads served by replicas while no server took writes"
    )


async def test_planned_switchover_has_no_errors_and_retires_the_old_primary(
    topology: ReplicationTopology, driver: str
) -> None:
    """The primary turns read-only, a replica catches up and takes over: 0 errors and 0
    unknown outcomes under run(); every connection to the old primary is retired."""
    ledger = Ledger()
    old = topology.primary
    async with asyncgone.Database(topology.url(driver), pool_size=WORKERS, run_deadline=30) as db:
        async with writing(db, ledger):
            await acked_after(ledger, 0.0, 200)
            started = time.monotonic()
            await anyio.to_thread.run_sync(topology.switchover, topology.replicas[0])
            switched = time.monotonic()
            await acked_after(ledger, switched, 200)
            with anyio.fail_after(10):
                while await anyio.to_thread.run_sync(app_connections, old):  # noqa: ASYNC110
                    await anyio.sleep(0.1)
        first = min(t for t, _ in ledger.acked if t > started)
        figures = ledger.check(topology.primary)
        stats = db.stats()
    assert ledger.errors == []
    assert ledger.unknown == []
    assert stats.commit_outcome_unknown == 0
    print(
        f"\nFIGURES switchover {driver}: switchover took {switched - started:.2f} s; "
        f"longest pause in acknowledged writes {longest_gap(ledger):.2f} s; first write "
        f"{max(0.0, first - switched):.2f} s after it ended; {figures}; replays {stats.replays}"
    )


def app_connections(server: MariaDBServer) -> int:
    """Connections of the application user to ``server``."""
    value = server.value("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER='app'")
    return int(value or 0)


def longest_gap(ledger: Ledger) -> float:
    times = sorted(t for t, _ in ledger.acked)
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)
