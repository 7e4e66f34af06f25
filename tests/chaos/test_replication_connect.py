"""Role-aware connect on real GTID replication: the writable host is found whatever the
order of the hosts, a host that is down costs at most its connect bound, and a search that
finds no fitting host says which hosts it tried and what they were."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import anyio.to_thread
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

import asyncgone
from asyncgone.testing import MariaDBServer, ReplicationTopology
from asyncgone.testing._topology import multi_host_url

pytestmark = [pytest.mark.anyio, pytest.mark.topology]


def url_of(servers: list[MariaDBServer], driver: str) -> str:
    return multi_host_url(servers, driver, user="app", database="test")


async def port_of(engine: object) -> int:
    async with engine.connect() as conn:  # type: ignore[attr-defined]
        return int((await conn.execute(text("SELECT @@port"))).scalar_one())


@pytest.mark.parametrize("position", [0, 1, 2])
async def test_the_writable_host_is_found_in_any_position(
    asyncgone_replication: ReplicationTopology, driver: str, position: int
) -> None:
    """With the primary first, in the middle or last, every connection goes to it, and the
    role came with the query asyncgone runs anyway: no extra round trip per connection."""
    topology = asyncgone_replication
    servers = list(topology.replicas)
    servers.insert(position, topology.primary)
    engine = asyncgone.create_engine(url_of(servers, driver), pool_size=3)
    try:
        assert {await port_of(engine) for _ in range(3)} == {topology.primary.port}
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE IF NOT EXISTS rc (id INT PRIMARY KEY)"))
            await conn.execute(text("INSERT INTO rc VALUES (1)"))
        assert asyncgone.stats(engine).connects == 1  # one pooled connection, reused
    finally:
        await engine.dispose()


async def test_target_role_replica_spreads_over_the_read_only_hosts(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """target_role="replica" connects only to read-only servers, round-robin over them."""
    topology = asyncgone_replication
    engine = asyncgone.create_engine(
        topology.url(driver), target_role="replica", pool_size=4, max_overflow=0
    )
    try:
        conns = [await engine.connect() for _ in range(4)]
        try:
            ports = [int((await c.execute(text("SELECT @@port"))).scalar_one()) for c in conns]
        finally:
            for c in conns:
                await c.close()
        assert sorted(set(ports)) == sorted(r.port for r in topology.replicas)
        assert topology.primary.port not in ports
    finally:
        await engine.dispose()


async def test_a_host_that_is_down_costs_at_most_its_connect_bound(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """A killed first host is skipped: connecting takes at most one connect bound more."""
    topology = asyncgone_replication
    victim = topology.replicas[0]
    await anyio.to_thread.run_sync(topology.kill, victim)
    servers = [victim, topology.primary, topology.replicas[1]]
    engine = asyncgone.create_engine(url_of(servers, driver), connect_timeout=2)
    try:
        started = time.monotonic()
        assert await port_of(engine) == topology.primary.port
        assert time.monotonic() - started < 2 + 3 + 2  # connect bound + facts + slack
    finally:
        await engine.dispose()


async def test_no_fitting_host_names_every_host_and_its_role(
    asyncgone_replication: ReplicationTopology, driver: str
) -> None:
    """Only replicas listed and a primary asked for: error 2003 listing each host as
    read-only, without the password; a Database fails fast at start."""
    topology = asyncgone_replication
    url = topology.url(driver, role="replicas")
    engine = asyncgone.create_engine(url, target_role="primary")
    try:
        with pytest.raises(sa_exc.OperationalError) as info:
            await port_of(engine)
        message = str(info.value)
        assert "2003" in message
        for replica in topology.replicas:
            assert f"127.0.0.1:{replica.port} read-only" in message
        assert ":app@" not in message
        assert "target_role='primary'" in message
    finally:
        await engine.dispose()
    with pytest.raises(asyncgone.DatabaseUnavailable, match="read-only"):
        async with asyncgone.Database(url, target_role="primary"):
            pass


def test_doctor_reports_every_host(asyncgone_replication: ReplicationTopology, driver: str) -> None:
    """``asyncgone doctor`` on a multi-host URL lists each host: its role, replication
    state, lag and GTID position, and what asyncgone does with it; a dead host is shown
    unreachable, a lagging one avoided."""
    topology = asyncgone_replication
    dead, lagging = topology.replicas
    topology.kill(dead)
    with topology.lag(lagging):
        result = subprocess.run(
            [sys.executable, "-m", "asyncgone", "doctor", "--json", topology.url(driver)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        text_report = subprocess.run(
            [sys.executable, "-m", "asyncgone", "doctor", topology.url(driver)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    hosts = {h["host"]: h for h in json.loads(result.stdout)["hosts"]}
    primary = hosts[f"127.0.0.1:{topology.primary.port}"]
    assert primary["role"] == "primary"
    assert "go here" in primary["asyncgone"]
    assert primary["gtid_position"] == topology.gtid_position(topology.primary)
    assert hosts[f"127.0.0.1:{dead.port}"]["reachable"] is False
    held = hosts[f"127.0.0.1:{lagging.port}"]
    assert held["role"] == "replica"
    assert held["replicating"] is False
    assert "Slave_SQL_Running=No" in held["replication"]
    assert "skipped for target_role='primary'" in held["asyncgone"]
    assert "hosts:" in text_report.stdout
    assert f"127.0.0.1:{dead.port}" in text_report.stdout
    assert ":app@" not in text_report.stdout + result.stdout
