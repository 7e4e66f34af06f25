"""Replica reads on real GTID replication: ``read_only`` work goes to fit replicas, a lagging
or dead replica is avoided within one check interval, and the primary serves when none fits."""

from __future__ import annotations

import contextlib
import time

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

import asyncgone
from asyncgone._errors import error_code
from asyncgone.testing import ReplicationTopology

pytestmark = [pytest.mark.anyio, pytest.mark.topology]

INTERVAL = 0.5


def database(topology: ReplicationTopology, driver: str, **options: object) -> asyncgone.Database:
    return asyncgone.Database(
        topology.url(driver, role="primary"),
        replicas=topology.url(driver, role="replicas"),
        replica_check_interval=INTERVAL,
        **options,  # type: ignore[arg-type]
    )


async def port(session: AsyncSession) -> int:
    return int((await session.execute(text("SELECT @@port"))).scalar_one())


async def ports_read(db: asyncgone.Database, n: int = 4) -> set[int]:
    """The servers ``n`` read-only sessions open at once went to."""
    found = set()
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(n):
            session = await stack.enter_async_context(db.session(read_only=True))
            found.add(await port(session))
    return found


async def test_read_only_work_goes_to_the_replicas(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """read_only sessions and run(read_only=True) use both replicas; other work the primary."""
    topology = asyncgone_replication
    async with database(topology, driver) as db:
        assert await ports_read(db) == {r.port for r in topology.replicas}
        assert await db.run(port, read_only=True) in {r.port for r in topology.replicas}
        async with db.session() as session:
            assert await port(session) == topology.primary.port
        assert await db.run(port) == topology.primary.port


async def test_a_lagging_replica_is_avoided_within_one_check_interval(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """A replica whose SQL thread stopped gets no read_only session after one check
    interval (its pooled connections retired), and gets them again once it recovered."""
    topology = asyncgone_replication
    lagging, healthy = topology.replicas
    async with database(topology, driver, pool_size=4) as db:
        await ports_read(db)  # connections to both replicas in the pool
        with topology.lag(lagging):
            # One check interval, and one in progress; polled, with a generous bound.
            with anyio.fail_after(10):
                while await ports_read(db, 6) != {healthy.port}:  # noqa: ASYNC110
                    await anyio.sleep(INTERVAL / 2)
        await anyio.to_thread.run_sync(topology.wait_caught_up)
        # Recovered: new connections (beyond the 4 pooled ones, all on the healthy
        # replica now) go to it again.
        with anyio.fail_after(10):
            while lagging.port not in await ports_read(db, 8):  # noqa: ASYNC110
                await anyio.sleep(INTERVAL)


async def test_with_no_fit_replica_the_primary_serves_or_it_raises(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """Every replica lagging: read_only work goes to the primary, or raises
    DatabaseUnavailable naming each replica and why with replica_fallback="raise"."""
    topology = asyncgone_replication
    first, second = topology.replicas
    with topology.lag(first), topology.lag(second):
        async with database(topology, driver) as db:
            assert await ports_read(db) == {topology.primary.port}
        async with database(topology, driver, replica_fallback="raise") as db:
            with pytest.raises(asyncgone.DatabaseUnavailable, match="Slave_SQL_Running=No") as info:
                async with db.session(read_only=True):
                    pass
            assert str(first.port) in str(info.value)


async def test_a_killed_replica_costs_read_only_work_no_error(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """8 workers reading through run(read_only=True); one replica SIGKILLed: 0 errors, and
    the reads continue on the other replica."""
    topology = asyncgone_replication
    victim, other = topology.replicas
    served: list[tuple[float, int]] = []
    errors: list[BaseException] = []

    async def reader(db: asyncgone.Database, stop: anyio.Event) -> None:
        async def read(session: AsyncSession) -> int:
            await session.execute(text("SELECT SLEEP(0.01)"))
            return await port(session)

        while not stop.is_set():
            try:
                served.append((time.monotonic(), await db.run(read, read_only=True)))
            except Exception as exc:
                errors.append(exc)

    async with database(topology, driver, pool_size=8) as db:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(reader, db, stop)
            await anyio.sleep(1.0)
            await anyio.to_thread.run_sync(topology.kill, victim)
            killed = time.monotonic()
            await anyio.sleep(2 * INTERVAL + 1.0)
            stop.set()
        replays = db.stats().replays
    assert errors == []
    assert {p for _, p in served if p != other.port} == {victim.port}  # both served before
    late = [p for t, p in served if t > killed + 2 * INTERVAL]
    assert late
    assert set(late) == {other.port}
    print(
        f"\nFIGURES replica kill {driver}: {len(served)} reads, "
        f"{sum(1 for t, _ in served if t > killed)} after the kill, 0 errors; "
        f"replays {replays}"
    )


async def test_a_read_after_a_write_sees_it_while_a_replica_lags(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """A write, then at once a read_only read in the same task: the read sees the write in
    100 of 100 trials, with one replica lagging from the first trial on (avoided after
    one check interval; until then the wait for the GTID moves the read to the primary)."""
    topology = asyncgone_replication
    topology.primary.query("CREATE TABLE test.ryw (id INT PRIMARY KEY)")
    lagging = topology.replicas[0]
    seen = 0
    served: set[int] = set()

    async def trial(db: asyncgone.Database, n: int) -> None:
        nonlocal seen

        async def write(session: AsyncSession) -> None:
            await session.execute(text("INSERT INTO ryw VALUES (:n)"), {"n": n})

        async def read(session: AsyncSession) -> int:
            served.add(await port(session))
            found = await session.execute(text("SELECT COUNT(*) FROM ryw WHERE id = :n"), {"n": n})
            return int(found.scalar_one())

        await db.run(write)
        seen += await db.run(read, read_only=True)

    async with database(topology, driver, causal_reads_timeout=0.3) as db:
        with topology.lag(lagging):
            for n in range(100):
                async with anyio.create_task_group() as tg:  # each trial its own context
                    tg.start_soon(trial, db, n)
    assert seen == 100
    assert topology.replicas[1].port in served  # replicas did serve reads after writes


def com(server: object, name: str) -> int:
    rows = server.query(f"SHOW GLOBAL STATUS LIKE '{name}'")  # type: ignore[attr-defined]
    return int(rows[0]["Value"])


async def test_learning_a_commits_gtid_costs_one_select_and_no_rollback(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """With replicas, each commit of a read-write unit adds one SELECT (@@last_gtid) on its
    connection and no ROLLBACK on the connection's return."""
    topology = asyncgone_replication
    topology.primary.query("CREATE TABLE test.costs (id INT PRIMARY KEY)")

    async def write(session: AsyncSession, n: int) -> None:
        await session.execute(text("INSERT INTO costs VALUES (:n)"), {"n": n})

    async with database(topology, driver, keepalive=False) as db:
        await db.run(lambda s: write(s, 0))  # the pool's connection is open
        before = {name: com(topology.primary, name) for name in ("Com_rollback", "Com_select")}
        for n in range(1, 11):
            await db.run(lambda s, n=n: write(s, n))
        after = {name: com(topology.primary, name) for name in ("Com_rollback", "Com_select")}
    assert after["Com_rollback"] - before["Com_rollback"] == 0
    assert after["Com_select"] - before["Com_select"] == 10  # the GTID reads


async def test_a_stale_verdict_sends_read_only_work_to_the_primary(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """The monitor stops checking (its task gone): after STALE_AFTER intervals its last
    verdict no longer counts, and read_only sessions go to the primary."""
    topology = asyncgone_replication
    async with database(topology, driver) as db:
        assert await ports_read(db, 2) <= {r.port for r in topology.replicas}
        routing = db._routing
        assert routing is not None
        monitor = routing.monitor
        assert monitor is not None
        task = monitor._task
        assert task is not None
        task.cancel()
        with anyio.fail_after(10):
            while monitor.fit():  # noqa: ASYNC110
                await anyio.sleep(INTERVAL)
        assert await ports_read(db, 2) == {topology.primary.port}
        assert "no replica check" in routing.report()


async def test_a_write_in_a_read_only_session_is_the_applications_error(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """A write that a read_only session sends to a replica is refused there (1290) as the
    application's mistake: no disconnect and no outage (a 503 from the integrations), no
    replay by run(), and the replica's connection is kept."""
    topology = asyncgone_replication
    calls = 0

    async def write(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.execute(text("CREATE TABLE ag_written_on_a_replica (id INT)"))

    async with database(topology, driver) as db:
        with pytest.raises(DBAPIError) as info:
            async with db.session(read_only=True) as session:
                await write(session)
        assert error_code(info.value) in {1290, 1792}
        assert not asyncgone.is_disconnect(info.value)
        assert not asyncgone.is_unavailable(info.value)
        with pytest.raises(DBAPIError):
            await db.run(write, read_only=True)
        assert calls == 2  # run() tried once
        replica_engine = db._routing.engine  # type: ignore[union-attr]
        assert asyncgone.stats(replica_engine).replaced == {}
