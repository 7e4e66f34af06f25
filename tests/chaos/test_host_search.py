"""The host search's bounds, against a host that accepts connections and never answers (a
blackholed path): one attempt costs its connect bound, the whole search its own bound."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

import asyncgone
from asyncgone._state import state_of
from asyncgone.testing import FaultProxy
from tests._support import Server, eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
def blackholed(shared: Server) -> Iterator[FaultProxy]:
    """A proxy in front of the shared server whose every connection is silently dropped."""
    with FaultProxy(shared.host, shared.port) as proxy:
        proxy.blackhole(include_new=True)
        yield proxy


def two_hosts(shared: Server, proxy: FaultProxy, driver: str) -> str:
    auth = shared.user + (f":{shared.password}" if shared.password else "")
    return (
        f"mysql+{driver}://{auth}@/test"
        f"?host={proxy.host}:{proxy.port}&host={shared.host}:{shared.port}"
    )


async def test_a_blackholed_host_costs_one_connect_bound(
    shared: Server, blackholed: FaultProxy, driver: str
) -> None:
    """The first host never greets: after connect_timeout the search moves on to the next,
    which answers; the blackholed host is tried last for a while after that."""
    engine = asyncgone.create_engine(
        two_hosts(shared, blackholed, driver), connect_timeout=1, target_role="any"
    )
    try:
        started = time.monotonic()
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT @@port"))).scalar_one() == shared.port
        # One connect bound, less a step of uvloop's clock (its timers may fire a step before
        # time.monotonic() reaches their deadline), and slack.
        assert 1.0 - 0.001 <= time.monotonic() - started < 1.0 + 3.0
        assert blackholed.accepted == 1
        async with engine.connect() as first, engine.connect() as second:  # one new one
            for conn in (first, second):
                await conn.execute(text("SELECT 1"))
        assert blackholed.accepted == 1  # the host that answered is tried first now
    finally:
        await engine.dispose()


async def failed_search(url: str, host_search_timeout: float) -> str:
    """The message of the error a fresh engine's first checkout raises, its search bounded
    by ``host_search_timeout`` (below the connect bound)."""
    engine = asyncgone.create_engine(
        url, connect_timeout=5, host_search_timeout=host_search_timeout, target_role="any"
    )
    try:
        with pytest.raises(sa_exc.OperationalError) as info:
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    return str(info.value)


async def test_the_whole_search_is_bounded_and_says_what_it_did_not_try(
    shared: Server, blackholed: FaultProxy, driver: str
) -> None:
    """host_search_timeout below one connect bound: the search ends at it, and the error
    names the host it had no time for."""
    started = time.monotonic()
    message = await failed_search(two_hosts(shared, blackholed, driver), 0.5)
    assert time.monotonic() - started < 0.5 + 2.0
    assert f"{blackholed.host}:{blackholed.port} unreachable" in message
    untried = f"not tried within 0.5 s (host_search_timeout): {shared.host}:{shared.port}"
    assert untried in message


async def test_a_search_cut_at_its_deadline_leaves_the_next_host_untried(
    shared: Server, blackholed: FaultProxy, driver: str
) -> None:
    """Search after search, the host that never greets takes the whole short search and the
    next is reported not tried: never tried in a sliver of the deadline and called
    unreachable (uvloop fires timers by a millisecond clock, before time.monotonic() has
    reached their deadline; CI met it once)."""
    for _ in range(40):  # a fresh engine each time: a host found unreachable is tried last
        message = await failed_search(two_hosts(shared, blackholed, driver), 0.02)
        untried = f"not tried within 0.02 s (host_search_timeout): {shared.host}:{shared.port}"
        assert untried in message


async def test_access_denied_is_raised_at_once_not_searched_past(
    shared: Server, driver: str
) -> None:
    """A wrong password fails the same on every host: the driver's "Access denied" is
    raised from the first host, not turned into "no host fits"."""
    with FaultProxy(shared.host, shared.port) as proxy:
        url = (
            f"mysql+{driver}://nobody:wrong@/test"
            f"?host={shared.host}:{shared.port}&host={proxy.host}:{proxy.port}"
        )
        engine = asyncgone.create_engine(url, target_role="any")
        try:
            with pytest.raises(sa_exc.OperationalError, match="Access denied") as info:
                async with engine.connect():
                    pass
            assert "no host" not in str(info.value)
            assert proxy.accepted == 0
        finally:
            await engine.dispose()


async def test_database_start_waits_for_the_search_past_blackholed_hosts(
    shared: Server, blackholed: FaultProxy, driver: str
) -> None:
    """Two blackholed hosts ahead of the server: the search needs two connect bounds, more
    than connect_timeout + ping_timeout; Database.start() waits for the search's own
    deadline and starts."""
    with FaultProxy(shared.host, shared.port) as second:
        second.blackhole(include_new=True)
        auth = shared.user + (f":{shared.password}" if shared.password else "")
        url = (
            f"mysql+{driver}://{auth}@/test?host={blackholed.host}:{blackholed.port}"
            f"&host={second.host}:{second.port}&host={shared.host}:{shared.port}"
        )
        db = asyncgone.Database(url, connect_timeout=1, ping_timeout=0.5, target_role="any")
        async with db, db.session() as session:
            assert (await session.execute(text("SELECT @@port"))).scalar_one() == shared.port
        assert blackholed.accepted == 1
        assert second.accepted == 1


async def test_a_host_avoided_while_connecting_is_not_handed_out(
    shared: Server, driver: str
) -> None:
    """The owner (the replica monitor) avoids a host while a connection to it is being
    opened (0.3 s per round trip through a slow proxy): the search drops that connection
    rather than hand out one that the owner's pool invalidation already missed."""
    with FaultProxy(shared.host, shared.port) as proxy:
        proxy.set_latency(0.3)
        auth = shared.user + (f":{shared.password}" if shared.password else "")
        url = f"mysql+{driver}://{auth}@{proxy.host}:{proxy.port}/test"
        engine = asyncgone.create_engine(url, target_role="primary", connect_timeout=10)
        state = state_of(engine)
        assert state is not None
        search = state.search
        assert search is not None
        try:

            async def avoid_soon() -> None:
                # Inside the connect (several round trips of 0.3 s each), once the search
                # chose the host: avoided earlier, it would be skipped, not dropped.
                await eventually(lambda: proxy.accepted >= 1)
                search.avoided = frozenset(search.hosts)

            async with anyio.create_task_group() as tg:
                tg.start_soon(avoid_soon)
                with pytest.raises(sa_exc.OperationalError, match="avoided meanwhile"):
                    async with engine.connect():
                        pass
        finally:
            await engine.dispose()


async def test_the_keepalive_fills_min_idle_past_blackholed_hosts(
    shared: Server, blackholed: FaultProxy, driver: str
) -> None:
    """Three blackholed hosts ahead of the server: opening one connection takes three
    connect bounds, more than the keepalive's per-connection bound used to allow
    (connect_timeout + ping_timeout + 5 s); it waits for the search's deadline instead."""
    with (
        FaultProxy(shared.host, shared.port) as second,
        FaultProxy(shared.host, shared.port) as third,
    ):
        for proxy in (second, third):
            proxy.blackhole(include_new=True)
        auth = shared.user + (f":{shared.password}" if shared.password else "")
        hosts = "&".join(f"host={p.host}:{p.port}" for p in (blackholed, second, third, shared))
        engine = asyncgone.create_engine(
            f"mysql+{driver}://{auth}@/test?{hosts}",
            connect_timeout=3,
            ping_timeout=0.5,
            target_role="any",
        )
        try:
            async with asyncgone.keepalive(engine, interval=0.2, min_idle=1):
                with anyio.fail_after(30):
                    while engine.sync_engine.pool.checkedin() < 1:  # type: ignore[attr-defined]  # noqa: ASYNC110
                        await anyio.sleep(0.2)
            assert third.accepted == 1
        finally:
            await engine.dispose()
