"""Read-your-writes details on real GTID replication: what a context remembers of its
commits, and the wait before a ``read_only`` session, however the session is opened."""

from __future__ import annotations

import contextlib

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import asyncgone
from asyncgone._causal import PRIMARY, applied, merge
from asyncgone._errors import error_code
from asyncgone.testing import FaultProxy, ReplicationTopology

pytestmark = [pytest.mark.anyio, pytest.mark.topology]


def database(topology: ReplicationTopology, driver: str, **options: object) -> asyncgone.Database:
    return asyncgone.Database(
        topology.url(driver, role="primary"),
        replicas=topology.url(driver, role="replicas"),
        **options,  # type: ignore[arg-type]
    )


async def connection_id(session: AsyncSession) -> int:
    return int((await session.execute(text("SELECT CONNECTION_ID()"))).scalar_one())


async def count(session: AsyncSession, table: str, n: int) -> int:
    found = await session.execute(text(f"SELECT COUNT(*) FROM {table} WHERE id = :n"), {"n": n})
    return int(found.scalar_one())


def test_positions_merge_per_domain_and_never_move_backwards() -> None:
    """The larger sequence number per domain wins; PRIMARY sticks; MySQL sets are replaced."""
    assert merge(None, "0-1-5") == "0-1-5"
    assert merge("0-1-7", "0-1-5") == "0-1-7"
    assert merge("0-1-5", "0-1-7") == "0-1-7"
    assert merge("0-1-7", "1-2-3") == "0-1-7,1-2-3"
    assert merge("0-1-7,1-2-3", "1-2-9,0-1-2") == "0-1-7,1-2-9"
    assert merge(PRIMARY, "0-1-9") == PRIMARY
    assert merge("0-1-7", "garbage") == PRIMARY
    assert merge("uuid:1-5", "uuid:1-9") == "uuid:1-9"
    assert applied("0-1-7,1-2-9", "0-1-7,1-2-3")
    assert not applied("0-1-7,1-2-2", "0-1-7,1-2-3")
    assert not applied("0-1-7", "0-1-7,1-2-3")


async def test_a_commit_that_wrote_nothing_does_not_move_the_position_back(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """A write, then a commit of a session that only read, on a pooled connection whose
    @@last_gtid is an older write's: a read_only session then still sees the write while
    every replica lags (the monitor has not noticed: a long check interval)."""
    topology = asyncgone_replication
    topology.primary.query("CREATE TABLE test.back (id INT PRIMARY KEY)")
    options = {
        "replica_check_interval": 60.0,
        "causal_reads_timeout": 0.3,
        "pool_size": 2,
        "max_overflow": 0,
        "keepalive": False,
    }
    async with database(topology, driver, **options) as db:
        older: list[int] = []

        async def older_write() -> None:  # another context: another task's commit
            async with db.session() as session:
                older.append(await connection_id(session))
                await session.execute(text("INSERT INTO back VALUES (1)"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(older_write)
        await anyio.to_thread.run_sync(topology.wait_caught_up)
        with contextlib.ExitStack() as lags:
            for replica in topology.replicas:
                lags.enter_context(topology.lag(replica))
            first, second = db.session(), db.session()
            sessions = [await first.__aenter__(), await second.__aenter__()]
            ids = [await connection_id(s) for s in sessions]
            assert older[0] in ids  # the pool holds the older write's connection
            stale = ids.index(older[0])
            scopes = [first, second]
            await sessions[1 - stale].execute(text("INSERT INTO back VALUES (2)"))
            await scopes[1 - stale].commit()
            await scopes[stale].commit()  # wrote nothing: its @@last_gtid is the older one
            async with db.session(read_only=True) as session:
                assert await count(session, "back", 2) == 1


async def test_a_gtid_every_replica_had_is_still_waited_for_later(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """The monitor saw the commit applied everywhere: that session skips the wait, but the
    context keeps the GTID for later sessions."""
    topology = asyncgone_replication
    topology.primary.query("CREATE TABLE test.kept (id INT PRIMARY KEY)")
    async with database(topology, driver, replica_check_interval=0.2) as db:
        async with db.session() as session:
            await session.execute(text("INSERT INTO kept VALUES (1)"))
        routing = db._routing
        assert routing is not None
        gtid = routing.tracker.get()
        assert gtid is not None
        assert gtid != PRIMARY
        monitor = routing.monitor
        assert monitor is not None
        with anyio.fail_after(10):
            while not monitor.applied_everywhere(gtid):  # noqa: ASYNC110
                await anyio.sleep(0.1)
        async with db.session(read_only=True) as session:
            assert await count(session, "kept", 1) == 1
        assert routing.tracker.get() == gtid


async def test_a_cancelled_wait_leaves_no_replica_connection_checked_out(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """A read_only session after a write waits for a replica whose SQL thread stopped; the
    task is cancelled during the wait: the replica connection goes back (discarded), none
    stays checked out, and the next session works."""
    topology = asyncgone_replication
    topology.primary.query("CREATE TABLE test.cancelled (id INT PRIMARY KEY)")
    async with database(
        topology, driver, replica_check_interval=60.0, causal_reads_timeout=30.0
    ) as db:
        routing = db._routing
        assert routing is not None
        replica_engine = routing.engine
        assert replica_engine is not None
        with contextlib.ExitStack() as lags:
            for replica in topology.replicas:
                lags.enter_context(topology.lag(replica))
            async with db.session() as session:
                await session.execute(text("INSERT INTO cancelled VALUES (1)"))
            scope = db.session(read_only=True)
            with anyio.move_on_after(0.5) as waited:
                async with scope as session:
                    await session.execute(text("SELECT 1"))
            assert waited.cancelled_caught  # it was inside the wait (30 s) when cancelled
            assert scope.finished  # rolled back and closed by the scope
            assert scope.session is not None
            assert not scope.session.in_transaction()
            assert replica_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        await anyio.to_thread.run_sync(topology.wait_caught_up)
        async with db.session(read_only=True) as session:
            assert await count(session, "cancelled", 1) == 1


async def test_replica_sessions_are_read_only_even_for_root(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """root may write on a read_only server; a read_only session on a replica may not: its
    connection's transactions are read-only (error 1792)."""
    topology = asyncgone_replication
    topology.primary.query("CREATE TABLE test.ro (id INT PRIMARY KEY)")
    await anyio.to_thread.run_sync(topology.wait_caught_up)
    db = asyncgone.Database(
        topology.url(driver, role="primary", user="root"),
        replicas=topology.url(driver, role="replicas", user="root"),
    )
    async with db:
        with pytest.raises(sa_exc.DBAPIError) as info:
            async with db.session(read_only=True) as session:
                assert int((await session.execute(text("SELECT @@port"))).scalar_one()) in {
                    r.port for r in topology.replicas
                }
                await session.execute(text("INSERT INTO ro VALUES (1)"))
        assert error_code(info.value) == 1792  # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION


async def test_read_only_work_on_a_replica_whose_commit_is_lost_is_replayed(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """run(read_only=True) on a replica (read-only sessions): a COMMIT lost in flight
    committed nothing, so the work is replayed, not reported as CommitOutcomeUnknown."""
    topology = asyncgone_replication
    replica = topology.replicas[0]
    calls = 0

    async def read(session: AsyncSession) -> int:
        nonlocal calls
        calls += 1
        return int((await session.execute(text("SELECT @@port"))).scalar_one())

    with FaultProxy(replica.host, replica.port) as proxy:
        db = asyncgone.Database(
            topology.url(driver, role="primary"),
            replicas=proxy.route(topology.server_url(replica, driver)),
        )
        async with db:
            # A connection in the replica pool first: the read below then goes to it.
            assert await db.run(read, read_only=True) == replica.port
            proxy.cut_on(b"COMMIT", deliver=True)
            # The replay chooses again: the cut replica may be taken for down meanwhile.
            got = await db.run(read, read_only=True)
            assert got in {replica.port, topology.primary.port}
            assert calls == 3
            assert proxy.tripped == 1
            assert db.stats().commit_outcome_unknown == 0
            assert db.stats().replays == 1


async def test_with_no_replica_to_wait_on_the_read_goes_to_the_primary(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """Every replica killed after the monitor's last check (a check once a minute): the
    wait finds no replica connection, and the session reads its write from the primary
    instead of failing."""
    topology = asyncgone_replication
    topology.primary.query("CREATE TABLE test.gone (id INT PRIMARY KEY)")
    async with database(
        topology, driver, replica_check_interval=60.0, connect_timeout=2, keepalive=False
    ) as db:
        async with db.session() as session:
            await session.execute(text("INSERT INTO gone VALUES (1)"))
        for replica in topology.replicas:
            await anyio.to_thread.run_sync(topology.kill, replica)
        scope = db.session(read_only=True)
        async with scope as session:
            assert await count(session, "gone", 1) == 1
            assert int((await session.execute(text("SELECT @@port"))).scalar_one()) == (
                topology.primary.port
            )
        assert getattr(scope, "fell_back", False)
