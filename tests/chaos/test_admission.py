"""A full server (1040) and a server that is not listening yet: connects wait, within their
deadline, instead of failing; an engine caps its connection attempts in flight."""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pymysql
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

import asyncgone
from asyncgone import _compat
from asyncgone._state import state_of
from asyncgone.testing import FaultProxy, MariaDBServer
from tests._support import wait_until

pytestmark = pytest.mark.anyio

# MariaDB's smallest max_connections.
MAX_CONNECTIONS = 10


@pytest.fixture(scope="module")
def small_server() -> Iterator[MariaDBServer]:
    """A disposable server with max_connections=10 and an account without SUPER or
    CONNECTION ADMIN (so without the connection MariaDB keeps for administrators)."""
    with MariaDBServer(options=[f"--max-connections={MAX_CONNECTIONS}"]) as server:
        server.query("CREATE USER IF NOT EXISTS 'app'@'%'")
        server.query("GRANT ALL ON test.* TO 'app'@'%'")
        yield server


class Hogs:
    """Connections of another client that keep the server full, released one at a time.

    ``stop`` (called from the thread that connects) ends the filling early: a test whose
    engine gives overflow back while the server fills keeps the freed connections for its
    newcomer, which a client that goes on taking them would otherwise get first."""

    def __init__(
        self, server: MariaDBServer, spare: int = 0, stop: Callable[[], bool] | None = None
    ) -> None:
        self._server = server
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        refused = 0
        # Full once refused twice in a row, a moment apart: a refused connection still
        # counts on the server for a moment after the refusal.
        while refused < 2 and not (stop is not None and stop()):
            try:
                self._conns.append(self._connect())
                refused = 0
            except pymysql.err.OperationalError as exc:
                if exc.args[0] != 1040:  # anything but "too many connections" is a failure
                    raise
                refused += 1
                time.sleep(0.2)
        for _ in range(spare):
            self.release()

    def _connect(self) -> Any:
        return pymysql.connect(
            host=self._server.host, port=self._server.port, user="app", connect_timeout=5
        )

    def release(self) -> None:
        with self._lock:
            self._conns.pop().close()

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()


@contextlib.contextmanager
def full(server: MariaDBServer, spare: int = 0) -> Iterator[Hogs]:
    hogs = Hogs(server, spare)
    try:
        yield hogs
    finally:
        hogs.close()


def app_url(server: MariaDBServer, driver: str) -> str:
    return f"mysql+{driver}://app@{server.host}:{server.port}/test"


async def release_later(hogs: Hogs, delay: float) -> None:
    await anyio.sleep(delay)
    await anyio.to_thread.run_sync(hogs.release)


async def test_a_connect_waits_for_capacity_instead_of_failing(
    small_server: MariaDBServer, driver: str
) -> None:
    """While the server answers 1040, the connect backs off and tries again; once another
    client lets a connection go, it succeeds: the caller never sees the refusals."""
    engine = asyncgone.create_engine(app_url(small_server, driver), pool_size=1, max_overflow=0)
    try:
        with full(small_server) as hogs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(release_later, hogs, 1.0)
                async with engine.connect() as conn:
                    assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        stats = asyncgone.stats(engine)
        assert stats.connects_refused >= 1
        assert stats.connect_attempts == stats.connects_refused + 1
        assert stats.connects == 1
    finally:
        await engine.dispose()


async def test_without_retries_the_first_refusal_is_raised(
    small_server: MariaDBServer, driver: str
) -> None:
    """``connect_retry=None``: the server's 1040 reaches the caller at the first refusal."""
    engine = asyncgone.create_engine(
        app_url(small_server, driver), pool_size=1, max_overflow=0, connect_retry=None
    )
    try:
        with full(small_server), pytest.raises(OperationalError) as info:
            async with engine.connect():
                pass
        assert asyncgone.is_unavailable(info.value)
        assert info.value.orig is not None
        assert info.value.orig.args[0] == 1040
        assert asyncgone.stats(engine).connect_attempts == 1
    finally:
        await engine.dispose()


async def test_the_retry_window_and_the_callers_deadline_end_the_wait(
    small_server: MariaDBServer, driver: str
) -> None:
    """A server that stays full: the server's own 1040 is raised once ``connect_retry`` is
    over, and a caller's cancel scope ends the wait at its deadline."""
    url = app_url(small_server, driver)
    engine = asyncgone.create_engine(url, pool_size=1, max_overflow=0, connect_retry=1.0)
    scoped = asyncgone.create_engine(url, pool_size=1, max_overflow=0)  # retry: 30 s
    try:
        with full(small_server):
            with anyio.fail_after(20), pytest.raises(OperationalError) as info:
                async with engine.connect():
                    pass
            assert info.value.orig is not None
            assert info.value.orig.args[0] == 1040
            assert asyncgone.stats(engine).connects_refused >= 2
            with anyio.fail_after(20):  # the bound on the test, far beyond the scope's
                with pytest.raises((OperationalError, TimeoutError)):
                    with anyio.fail_after(1.5):
                        async with scoped.connect():
                            pass
            assert asyncgone.stats(scoped).connects_refused >= 2
    finally:
        await engine.dispose()
        await scoped.dispose()


async def test_start_waits_for_capacity_within_its_deadline(
    small_server: MariaDBServer, driver: str
) -> None:
    """``Database.start()`` meeting 1040 waits for a connection to come free; without
    retries it fails at once with ``DatabaseUnavailable``."""
    url = app_url(small_server, driver)
    with full(small_server) as hogs:
        hasty = asyncgone.Database(url, keepalive=False, connect_retry=None)
        with pytest.raises(asyncgone.DatabaseUnavailable, match="1040"):
            await hasty.start()
        db = asyncgone.Database(url, keepalive=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_later, hogs, 1.0)
            await db.start()
        try:
            assert await db.run(lambda s: s.scalar(text("SELECT 2"))) == 2
            assert db.stats().connects_refused >= 1
        finally:
            await db.close()


async def test_start_waits_its_whole_connect_timeout_past_connect_retry(
    small_server: MariaDBServer, driver: str
) -> None:
    """``Database.start()`` has nothing to fall back on: it keeps retrying a full server for
    ``connect_timeout`` even when ``connect_retry`` is shorter, then names the 1040."""
    url = app_url(small_server, driver)
    with full(small_server) as hogs:
        stubborn = asyncgone.Database(url, keepalive=False, connect_retry=0.5, connect_timeout=4)
        began = time.monotonic()
        with pytest.raises(asyncgone.DatabaseUnavailable, match="1040"):
            await stubborn.start()
        # Past connect_retry (0.5 s): a last try at the end of connect_timeout (4 s), within
        # the bound (4 + ping_timeout).
        assert 3.5 <= time.monotonic() - began <= 7.5
        db = asyncgone.Database(url, keepalive=False, connect_retry=0.5, connect_timeout=8)
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_later, hogs, 2.0)
            await db.start()
        try:
            assert db.stats().connects_refused >= 2
        finally:
            await db.close()


async def test_a_full_server_holds_the_pools_overflow(
    small_server: MariaDBServer, driver: str
) -> None:
    """After a 1040 the pool opens nothing beyond the connections it has (checkouts wait for
    one of them); the limit comes back, one connection at a time, once the refusals stop."""
    engine = asyncgone.create_engine(
        app_url(small_server, driver), pool_size=1, max_overflow=3, connect_backoff_max=0.2
    )
    pool: Any = engine.sync_engine.pool
    try:
        async with engine.connect() as first:
            await first.execute(text("SELECT 1"))
            with full(small_server) as hogs:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(release_later, hogs, 1.0)
                    async with engine.connect() as second:  # overflow: refused, then waits
                        await second.execute(text("SELECT 1"))
                        assert _compat.max_overflow(pool) == 0
            assert asyncgone.stats(engine).connects_refused >= 1
        # No refusal since: the limit rises by one every 5 * connect_backoff_max seconds.
        await wait_until(lambda: _compat.max_overflow(pool) == 3, limit=10)
    finally:
        await engine.dispose()


async def test_a_connect_waits_for_a_server_that_is_starting(
    disposable_server: MariaDBServer, driver: str
) -> None:
    """Nothing listens for a second (a restart of the server the engine reached before): the
    connect retries the refused TCP connects (2003) and succeeds once the server is up."""
    engine = asyncgone.create_engine(disposable_server.url(driver), pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:  # the engine reaches its server once
            await conn.execute(text("SELECT 1"))
        await engine.dispose()  # the next checkout connects anew
        await anyio.to_thread.run_sync(disposable_server.stop)

        async def start_later() -> None:
            await anyio.sleep(1.0)
            await anyio.to_thread.run_sync(disposable_server.start)

        async with anyio.create_task_group() as tg:
            tg.start_soon(start_later)
            with anyio.fail_after(30):
                async with engine.connect() as conn:
                    assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        assert asyncgone.stats(engine).connects_refused >= 1
    finally:
        if not disposable_server.running:
            await anyio.to_thread.run_sync(disposable_server.start)
        await engine.dispose()


@pytest.mark.parametrize(
    ("cap", "retry"),
    [(2, 5.0), (None, 5.0), (2, None), (2, 0.1)],
    ids=["capped", "uncapped", "capped-no-retries", "capped-retry-shorter-than-the-burst"],
)
async def test_max_connecting_caps_the_attempts_in_flight(
    disposable_server: MariaDBServer, driver: str, cap: int | None, retry: float | None
) -> None:
    """Eight checkouts at once on an empty pool behind a slow network: at most
    ``max_connecting`` connection attempts are in flight at any moment, and all succeed,
    also when the burst takes longer than ``connect_retry`` (a wait for a turn is no
    retry: it lasts as long as a checkout may wait)."""
    with FaultProxy.for_url(disposable_server.url(driver)) as proxy:
        proxy.set_latency(0.05)
        engine = asyncgone.create_engine(
            proxy.route(disposable_server.url(driver)),
            pool_size=8,
            max_overflow=0,
            max_connecting=cap,
            connect_retry=retry,
        )
        admission = state_of(engine).admission  # type: ignore[union-attr]
        assert admission is not None
        seen = 0

        async def watch() -> None:
            nonlocal seen
            while True:
                seen = max(seen, admission.in_flight)
                await anyio.sleep(0.005)

        async def unit() -> None:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT SLEEP(0.5)"))

        try:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as outer:
                    outer.start_soon(watch)
                    async with anyio.create_task_group() as tg:
                        for _ in range(8):
                            tg.start_soon(unit)
                    outer.cancel_scope.cancel()
            assert asyncgone.stats(engine).connects == 8
            if cap is None:
                assert seen > 2
            else:
                assert seen == cap
        finally:
            await engine.dispose()


async def test_run_takes_a_pooled_connection_rather_than_asking_a_full_server_again(
    small_server: MariaDBServer, driver: str
) -> None:
    """``run()`` meeting 1040 while its pool has a connection in use does not retry the
    connect: the pool's overflow is held, and the unit waits for that connection."""
    db = asyncgone.Database(
        app_url(small_server, driver), pool_size=1, max_overflow=2, keepalive=False
    )
    async with db:  # start() opens the pool's one connection; it stays in the pool
        with full(small_server):
            in_use = anyio.Event()

            async def hold() -> None:
                async with db.session() as session:
                    await session.connection()
                    in_use.set()
                    await session.execute(text("SELECT SLEEP(1)"))

            async def unit(session: Any) -> int:
                return int((await session.execute(text("SELECT 7"))).scalar_one())

            async with anyio.create_task_group() as tg:
                tg.start_soon(hold)
                await in_use.wait()  # the pooled connection is in use now
                with anyio.fail_after(20):
                    assert await db.run(unit) == 7
            stats = db.stats()
            assert stats.connects_refused == 1
            assert stats.connect_attempts == 2
            assert stats.connects == 1


class Busy:
    """An engine under constant load that keeps every connection it opened busy, overflow
    included; it notes the fewest connections its pool ever held once warmed up."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.pool: Any = engine.sync_engine.pool
        self.fewest: int | None = None

    async def task(self) -> None:
        # Checked out again at once: SQLAlchemy closes an overflow connection only when it
        # comes back to a pool with pool_size idle ones, which this load never leaves.
        while True:
            with contextlib.suppress(OperationalError):
                async with self.engine.connect() as conn:
                    await conn.execute(text("SELECT SLEEP(0.05)"))
            held = self.pool.checkedin() + self.pool.checkedout()
            self.fewest = held if self.fewest is None else min(self.fewest, held)


def giving_back(engine: Any) -> Callable[[], bool]:
    """Whether ``engine`` gave an overflow connection back since this was called."""
    before = asyncgone.stats(engine).overflow_given_back
    return lambda: asyncgone.stats(engine).overflow_given_back > before


async def server_status(server: MariaDBServer, name: str) -> int:
    rows = await anyio.to_thread.run_sync(lambda: server.query(f"SHOW GLOBAL STATUS LIKE '{name}'"))
    return int(rows[0]["Value"] or 0)


@pytest.mark.parametrize("give_back", [True, False])
async def test_a_busy_pool_gives_its_overflow_back_to_a_refused_newcomer(
    small_server: MariaDBServer, driver: str, give_back: bool
) -> None:
    """An engine whose load keeps its overflow busy fills the server with another client; a
    ``Database`` starting next is refused, and the busy engine gives overflow connections
    back until it gets in, never going below its ``pool_size``. With
    ``overflow_give_back=False`` the busy engine never asks the server, nor gives back."""
    url = app_url(small_server, driver)
    engine = asyncgone.create_engine(url, pool_size=2, max_overflow=4, overflow_give_back=give_back)
    busy = Busy(engine)
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(8):  # more tasks than connections: none is ever idle for long
                tg.start_soon(busy.task)
            await wait_until(lambda: busy.pool.overflow() == 4, limit=20)
            busy.fewest = None
            # Another client takes what is left (in a thread: the loop runs on). Its own
            # refusals may make the busy engine give back before it is done: it then stops,
            # or it would take what was given back for the newcomer.
            hogs = await anyio.to_thread.run_sync(
                functools.partial(Hogs, small_server, stop=giving_back(engine))
            )
            try:
                newcomer = asyncgone.Database(url, keepalive=False)
                if give_back:
                    with anyio.fail_after(30):
                        await newcomer.start()
                    try:
                        assert await newcomer.run(lambda s: s.scalar(text("SELECT 3"))) == 3
                    finally:
                        await newcomer.close()
                    # SQLAlchemy's own churn may have let the newcomer in first: refused
                    # while full once more, the busy engine gives back at its next question
                    # (every connect_backoff_max seconds, a quarter of that while full),
                    # unless that churn and its own refusals left it no overflow to give.
                    more = await anyio.to_thread.run_sync(
                        functools.partial(Hogs, small_server, stop=giving_back(engine))
                    )
                    try:
                        given_back = lambda: asyncgone.stats(engine).overflow_given_back  # noqa: E731
                        # Overflow connections open, not connects under way (which the
                        # pool counts too): only those can be given back.
                        admission = state_of(engine).admission  # type: ignore[union-attr]
                        if busy.pool.overflow() - admission.opening > 0:
                            await wait_until(lambda: given_back() >= 1, limit=10)
                        # Held at what it has left, after giving back or being refused.
                        assert _compat.max_overflow(busy.pool) < 4, asyncgone.stats(engine)
                    finally:
                        more.close()
                else:
                    before = await server_status(small_server, "Com_show_status")
                    # Mostly refused; SQLAlchemy itself may close an overflow connection
                    # that comes back to a pool with pool_size idle ones.
                    with contextlib.suppress(asyncgone.DatabaseUnavailable):
                        await newcomer.start()
                        await newcomer.close()
                    after = await server_status(small_server, "Com_show_status")
                    assert after - before == 1  # the test's own second query
                    assert asyncgone.stats(engine).overflow_given_back == 0
            finally:
                hogs.close()
            tg.cancel_scope.cancel()
        assert busy.fewest is not None
        assert busy.fewest >= 2  # the pool_size connections are never given back
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("max_overflow", "hold", "questions"),
    [(5, False, False), (-1, True, False), (5, True, True)],
    ids=["no-overflow-open", "unlimited-overflow", "overflow-open"],
)
async def test_only_a_pool_holding_limited_overflow_asks_the_server(
    small_server: MariaDBServer, driver: str, max_overflow: int, hold: bool, questions: bool
) -> None:
    """The give-back's ``SHOW GLOBAL STATUS`` is sent only while the pool holds overflow
    that could be held back: not within ``pool_size``, not with ``max_overflow=-1``; with
    overflow open (one connection held aside), at most once per interval."""
    engine = asyncgone.create_engine(
        app_url(small_server, driver),
        pool_size=1,
        max_overflow=max_overflow,
        connect_backoff_max=0.2,
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            if hold:  # the pool's one connection is held: the units use an overflow one
                held = await stack.enter_async_context(engine.connect())
                await held.execute(text("SELECT 1"))
            before = await server_status(small_server, "Com_show_status")
            started = time.monotonic()
            for _ in range(40):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                await anyio.sleep(0.02)
            elapsed = time.monotonic() - started
            asked = await server_status(small_server, "Com_show_status") - before - 1
        if questions:
            assert 1 <= asked <= elapsed / 0.2 + 3  # and one soon after the first
        else:
            assert asked == 0
        assert asyncgone.stats(engine).overflow_given_back == 0  # nobody was refused
    finally:
        await engine.dispose()


async def test_a_pool_asks_four_times_as_often_while_the_server_is_full(
    small_server: MariaDBServer, driver: str
) -> None:
    """While the server is full (nobody refused since the baseline, so nothing is owed),
    an engine holding overflow asks every quarter of ``connect_backoff_max``: refusals may
    come any moment, and a late process should not wait a whole interval for them."""
    engine = asyncgone.create_engine(
        app_url(small_server, driver), pool_size=1, max_overflow=2, connect_backoff_max=0.4
    )
    try:
        # Full before the engine's first question: the fill's own refusals are in its
        # baseline. Two connections are left for the engine (its pool one and an overflow).
        with full(small_server, spare=2):
            async with engine.connect() as held:  # the units use an overflow connection
                await held.execute(text("SELECT 1"))
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))  # opened: nothing asked yet
                give_back = state_of(engine).give_back  # type: ignore[union-attr]
                assert give_back is not None
                assert give_back._seen is None  # nothing asked yet
                before = await server_status(small_server, "Com_show_status")
                asked_at: list[float] = []  # when each question was asked (monotonic)
                with anyio.fail_after(30):
                    while len(asked_at) < 8:
                        async with engine.connect() as conn:
                            await conn.execute(text("SELECT 1"))
                        seen = give_back._seen
                        if seen is not None and (not asked_at or seen[2] != asked_at[-1]):
                            asked_at.append(seen[2])
                        await anyio.sleep(0.02)
                asked = await server_status(small_server, "Com_show_status") - before - 1
        # Timed by the engine's own record of its questions, not by the wall clock of the
        # loop: a loaded machine stretches the gaps, never shortens them.
        assert asked == len(asked_at)  # one SHOW STATUS per question, as the server counts
        gaps = [b - a for a, b in itertools.pairwise(asked_at)]
        assert min(gaps) >= 0.1 - 0.002, gaps  # never more often than a quarter interval
        # After the baseline's quarter interval, the server is full: a quarter again, never
        # the whole 0.4 s interval (the median, as one stall may stretch one gap).
        later = sorted(gaps[1:])
        assert later[len(later) // 2] < 0.3, gaps
        assert asyncgone.stats(engine).overflow_given_back == 0  # nobody was refused
    finally:
        await engine.dispose()


def test_a_multi_host_engine_does_not_ask() -> None:
    """Connections to several servers would mix their counters: no give-back there."""
    from asyncgone._state import state_of

    multi = asyncgone.create_engine("mysql+asyncmy://app@/test?host=db1:3306&host=db2:3306")
    single = asyncgone.create_engine("mysql+asyncmy://app@db1:3306/test")
    off = asyncgone.create_engine("mysql+asyncmy://app@db1:3306/test", overflow_give_back=False)
    assert getattr(state_of(multi), "give_back", 0) is None
    assert getattr(state_of(single), "give_back", None) is not None
    assert getattr(state_of(off), "give_back", 0) is None
