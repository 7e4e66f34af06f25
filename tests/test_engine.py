"""create_engine(): a drop-in for create_async_engine, with checks that run at checkout."""

from __future__ import annotations

import logging
import time
import warnings

import anyio
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.dialects import plugins
from sqlalchemy.engine import URL, CreateEnginePlugin
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

import asyncgone
from asyncgone import ConfigurationWarning
from asyncgone._config import split_options
from asyncgone._engine import first_connect_bound
from asyncgone._errors import error_code
from asyncgone._search import HostConnections
from asyncgone._state import _LIFETIME_JITTER, lifetime_deadline, state_of
from asyncgone.testing import FaultProxy
from asyncgone.testing._mariadb import free_port

from ._support import Server, connection_id, warm

pytestmark = pytest.mark.anyio


async def test_sqlalchemy_keywords_pass_through(url: str) -> None:
    """Pool and engine keywords reach SQLAlchemy unchanged."""
    engine = asyncgone.create_engine(url, pool_size=7, max_overflow=2, pool_timeout=4, echo=False)
    try:
        assert isinstance(engine, AsyncEngine)
        pool = engine.sync_engine.pool
        assert (pool.size(), pool._max_overflow, pool._timeout) == (7, 2, 4)  # type: ignore[attr-defined]
        assert await connection_id(engine) > 0
    finally:
        await engine.dispose()


async def test_unknown_keyword_is_refused_by_sqlalchemy(url: str) -> None:
    """A keyword neither asyncgone nor SQLAlchemy knows fails at once, as with SQLAlchemy."""
    with pytest.raises(TypeError, match="pool_sise"):
        asyncgone.create_engine(url, pool_sise=5)


async def test_null_pool_works_without_checks(url: str) -> None:
    """With NullPool nothing is pooled, so nothing is read or checked; queries work."""
    engine = asyncgone.create_engine(url, poolclass=NullPool)
    try:
        assert await connection_id(engine) != await connection_id(engine)
        assert asyncgone.stats(engine).pings == 0
    finally:
        await engine.dispose()


async def test_refused_connection_fails_fast_with_2003(driver: str) -> None:
    """Nothing listens on a port this engine never reached (a wrong port, not a restart): a
    clear 2003 error at once, although refused connects are retried after a restart."""
    engine = asyncgone.create_engine(
        f"mysql+{driver}://root:s3cret@127.0.0.1:1/test", connect_retry=10.0
    )
    try:
        started = time.monotonic()
        with pytest.raises(sa_exc.OperationalError, match="2003") as info:
            await connection_id(engine)
        assert time.monotonic() - started < asyncgone.DEFAULT_CONNECT_TIMEOUT
        assert "s3cret" not in str(info.value)
        stats = asyncgone.stats(engine)
        assert (stats.connect_attempts, stats.connects_refused) == (1, 0)
    finally:
        await engine.dispose()


async def test_wrong_password_is_reported_without_the_password(
    disposable: Server, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Access denied is reported clearly; the password appears in no message or log line."""
    disposable.query("CREATE USER IF NOT EXISTS 'app'@'%' IDENTIFIED BY 'right-horse'")
    caplog.set_level(logging.DEBUG)
    url = f"mysql+{driver}://app:wrong-battery@{disposable.host}:{disposable.port}/test"
    engine = asyncgone.create_engine(url, echo_pool="debug")
    try:
        with pytest.raises(sa_exc.OperationalError, match="1045") as info:
            await connection_id(engine)
        assert "Access denied" in str(info.value)
        assert "wrong-battery" not in str(info.value)
        assert "wrong-battery" not in caplog.text
        assert "wrong-battery" not in repr(engine)
    finally:
        await engine.dispose()


async def test_a_password_in_the_url_query_is_used_and_never_shown(
    disposable: Server, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``?password=`` reaches the driver (the right one connects, a wrong one is refused)
    and shows in no rendering of the URL, error or log line."""
    disposable.query("CREATE USER IF NOT EXISTS 'app3'@'%' IDENTIFIED BY 'query-kettle'")
    disposable.query("GRANT ALL ON test.* TO 'app3'@'%'")
    caplog.set_level(logging.DEBUG)
    base = f"mysql+{driver}://app3@{disposable.host}:{disposable.port}/test"
    right = asyncgone.create_engine(f"{base}?password=query-kettle&charset=utf8mb4")
    wrong = asyncgone.create_engine(f"{base}?password=query-teapot")
    try:
        await connection_id(right)
        with pytest.raises(sa_exc.OperationalError, match="1045") as info:
            await connection_id(wrong)
        async with asyncgone.Database(f"{base}?password=query-kettle") as db:
            shown = [repr(right), repr(wrong), repr(db), str(info.value), caplog.text]
    finally:
        await right.dispose()
        await wrong.dispose()
    assert right.url.query == {"charset": "utf8mb4"}
    for text_ in shown:
        assert "query-kettle" not in text_
        assert "query-teapot" not in text_


async def test_no_password_in_logs_while_replacing_connections(
    disposable: Server, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncgone's own log lines about replaced connections never carry the password."""
    disposable.query("CREATE USER IF NOT EXISTS 'app2'@'%' IDENTIFIED BY 'correct-staple'")
    disposable.query("GRANT ALL ON test.* TO 'app2'@'%'")
    caplog.set_level(logging.DEBUG)
    url = f"mysql+{driver}://app2:correct-staple@{disposable.host}:{disposable.port}/test"
    engine = asyncgone.create_engine(url, echo=True, echo_pool="debug")
    try:
        [thread] = await warm(engine, 1)
        disposable.kill(thread)
        await anyio.sleep(0.2)
        await connection_id(engine)
        assert "replacing connection" in caplog.text
        assert "correct-staple" not in caplog.text
    finally:
        await engine.dispose()


async def test_recycle_at_or_above_wait_timeout_warns(url: str) -> None:
    """A fixed recycle the server's wait_timeout would beat is reported with what to set."""
    engine = asyncgone.create_engine(
        url, recycle=100, connect_args={"init_command": "SET SESSION wait_timeout=60"}
    )
    try:
        with pytest.warns(
            ConfigurationWarning, match=r"recycle=100 .* wait_timeout=60.*at most 54"
        ):
            await connection_id(engine)
    finally:
        await engine.dispose()


async def test_pool_recycle_alone_warns_only_when_the_idle_limit_is_off(url: str) -> None:
    """SQLAlchemy's pool_recycle above wait_timeout only matters with recycle=None."""
    init = {"init_command": "SET SESSION wait_timeout=60"}
    quiet = asyncgone.create_engine(url, pool_recycle=3600, connect_args=init)
    loud = asyncgone.create_engine(url, pool_recycle=3600, recycle=None, connect_args=init)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            await connection_id(quiet)
        with pytest.warns(ConfigurationWarning, match="pool_recycle=3600"):
            await connection_id(loud)
    finally:
        await quiet.dispose()
        await loud.dispose()


async def test_max_lifetime_retires_connections(url: str) -> None:
    """A connection past its (jittered) lifetime is replaced at checkout without error."""
    engine = asyncgone.create_engine(url, max_lifetime=0.5)
    try:
        [first] = await warm(engine, 1)
        await anyio.sleep(0.7)
        assert await connection_id(engine) != first
        assert asyncgone.stats(engine).replaced == {"max_lifetime": 1}
    finally:
        await engine.dispose()


def test_lifetimes_are_jittered() -> None:
    """Connections opened together get different deadlines within the jitter band."""
    deadlines = {lifetime_deadline(100.0, 1000.0) for _ in range(200)}
    assert len(deadlines) > 150
    assert all(100 + 1000 * (1 - _LIFETIME_JITTER) <= d <= 1100 for d in deadlines)
    assert lifetime_deadline(0.0, None) == float("inf")


async def test_ping_after_zero_pings_every_reused_connection(url: str) -> None:
    """``ping_after=0`` is the pessimistic policy: a bounded ping per checkout of a reused one."""
    engine = asyncgone.create_engine(url, ping_after=0, pool_size=1)
    try:
        for _ in range(4):
            await connection_id(engine)
        stats = asyncgone.stats(engine)
        assert (stats.pings, stats.ping_failures) == (3, 0)  # the first checkout was fresh
    finally:
        await engine.dispose()


async def test_ping_after_none_never_pings(url: str) -> None:
    """``ping_after=None`` relies on the socket check alone."""
    engine = asyncgone.create_engine(url, ping_after=None, pool_size=1)
    try:
        await warm(engine, 1)
        await anyio.sleep(0.1)
        await connection_id(engine)
        assert asyncgone.stats(engine).pings == 0
    finally:
        await engine.dispose()


async def test_stats_refuses_a_plain_engine(url: str) -> None:
    """``stats()`` explains that it only knows engines asyncgone created."""
    engine = create_async_engine(url)
    with pytest.raises(TypeError, match=r"not created by asyncgone\.create_engine\(\)"):
        asyncgone.stats(engine)
    await engine.dispose()


async def test_connect_timeout_from_the_url_is_kept(url: str) -> None:
    """A connect_timeout in the URL wins over asyncgone's default."""
    engine = asyncgone.create_engine(url + "?connect_timeout=17")
    try:
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            timeout = getattr(raw, "connect_timeout", None) or raw._connect_timeout
            assert timeout == 17
    finally:
        await engine.dispose()


@pytest.mark.parametrize("where", ["url", "connect_args"])
async def test_a_given_connect_timeout_also_bounds_database_start(url: str, where: str) -> None:
    """``Database.start()`` waits for the connect_timeout the driver got (from the URL or
    ``connect_args``), not asyncgone's default, plus ``ping_timeout``."""
    if where == "url":
        engine = asyncgone.create_engine(url + "?connect_timeout=17", ping_timeout=2)
    else:
        engine = asyncgone.create_engine(url, ping_timeout=2, connect_args={"connect_timeout": 17})
    try:
        options, _ = split_options({"ping_timeout": 2})
        assert first_connect_bound(engine, options) == 17 + 2
    finally:
        await engine.dispose()


async def test_a_given_connect_timeout_bounds_the_background_host_connections(
    url: str, driver: str
) -> None:
    """The connections a host search keeps outside the pool (the replica monitor's, the
    Galera watch's) are bounded by the URL's connect_timeout too, not asyncgone's default:
    a host that accepts and never greets fails them after 1 s."""
    with FaultProxy.for_url(url) as proxy:
        proxy.blackhole(include_new=True)
        hosts = f"host=127.0.0.1:{proxy.port}&host=127.0.0.1:{free_port()}"
        engine = asyncgone.create_engine(f"mysql+{driver}://root@/test?{hosts}&connect_timeout=1")
        state = state_of(engine.sync_engine)
        assert state is not None
        assert state.search is not None
        connections = HostConnections(state, state.search)
        try:
            with (
                anyio.fail_after(10),
                pytest.raises(Exception, match="greeting within 1 s") as info,
            ):
                await connections.get(state.search.hosts[0])
            assert error_code(info.value) == 2003
        finally:
            await connections.close()
            await engine.dispose()


class TagPlugin(CreateEnginePlugin):
    """A SQLAlchemy engine plugin taking its own key out of the URL, as plugins do."""

    def __init__(self, url: URL, kwargs: dict[str, object]) -> None:
        super().__init__(url, kwargs)
        self.tag = url.query.get("ag_tag")

    def update_url(self, url: URL) -> URL:
        return url.difference_update_query(["ag_tag"])


plugins.register("agtag", __name__, "TagPlugin")


async def test_sqlalchemy_plugins_keep_their_keys_in_the_url(url: str) -> None:
    """Keys a SQLAlchemy engine plugin takes out of the URL (``?plugin=`` or ``plugins=``)
    are not checked against the driver's parameters: the engine works as without
    asyncgone."""
    for engine in (
        asyncgone.create_engine(f"{url}?plugin=agtag&ag_tag=blue"),
        asyncgone.create_engine(f"{url}?ag_tag=blue", plugins=["agtag"]),
    ):
        try:
            assert await connection_id(engine) > 0
        finally:
            await engine.dispose()


async def test_transactions_and_results_behave_as_usual(url: str) -> None:
    """Ordinary work through an asyncgone engine: DDL, insert, commit, rollback, select."""
    engine = asyncgone.create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE IF EXISTS ag_engine_t"))
            await conn.execute(text("CREATE TABLE ag_engine_t (id INT PRIMARY KEY)"))
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO ag_engine_t VALUES (1), (2)"))
        async with engine.connect() as conn:
            await conn.execute(text("INSERT INTO ag_engine_t VALUES (3)"))
            await conn.rollback()
            rows = (await conn.execute(text("SELECT id FROM ag_engine_t ORDER BY id"))).all()
            assert [r.id for r in rows] == [1, 2]
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE ag_engine_t"))
    finally:
        await engine.dispose()
