"""A module-level engine outlives event loops: pytest's function-scoped loops, scripts that
call ``asyncio.run()`` or ``anyio.run()`` more than once. Its connections are closed with
their loop and reopened on the next, with no error and no warning; a connection whose loop
closed without warning is released without touching that loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from tests._support import Server

# The test module a user writes: an engine at import time, used by tests that each get a
# new event loop (pytest-asyncio's default function scope, or anyio's plugin), once with
# asyncio's loop and once with uvloop.
MODULE_LEVEL_ENGINE = """
import pytest
import uvloop
from sqlalchemy import text

import asyncgone

engine = asyncgone.create_engine("{url}", pool_size=2)

{marker}

{loop}

async def test_first():
    async with engine.begin() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1

async def test_second():
    async with engine.begin() as conn:
        assert (await conn.execute(text("SELECT 2"))).scalar_one() == 2

async def test_third_holds_two():
    async with engine.connect() as a, engine.connect() as b:
        await a.execute(text("SELECT 3"))
        await b.execute(text("SELECT 3"))
    assert asyncgone.stats(engine).replaced == {{}}
"""

# pytest-asyncio 1.5 chooses loops through a hook (its event_loop_policy fixture is
# deprecated there); earlier releases through that fixture.
PYTEST_ASYNCIO_UVLOOP = """
import pytest
import pytest_asyncio.plugin
import uvloop

if hasattr(pytest_asyncio.plugin, "_collect_hook_loop_factories"):
    def pytest_asyncio_loop_factories(config, item):
        return {"uvloop": uvloop.new_event_loop}
else:
    @pytest.fixture(scope="session")
    def event_loop_policy():
        return uvloop.EventLoopPolicy()
"""

MARKERS = {
    "pytest-asyncio": "pytestmark = pytest.mark.asyncio",
    "anyio": "pytestmark = pytest.mark.anyio",
}
LOOP_CHOICE = {
    ("pytest-asyncio", "asyncio"): "",
    ("pytest-asyncio", "uvloop"): "",  # chosen in the conftest below
    ("anyio", "asyncio"): textwrap.dedent(
        """
        @pytest.fixture
        def anyio_backend():
            return "asyncio"
        """
    ),
    ("anyio", "uvloop"): textwrap.dedent(
        """
        @pytest.fixture
        def anyio_backend():
            return ("asyncio", {"use_uvloop": True})
        """
    ),
}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("plugin", ["pytest-asyncio", "anyio"])
def test_a_module_level_engine_serves_every_test(
    pytester: pytest.Pytester, shared: Server, driver: str, plugin: str, loop: str
) -> None:
    """Three tests, three event loops, one engine made at import: every test passes, with
    every warning an error (no "Event loop is closed", no unclosed transport)."""
    pytester.makeini(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\nfilterwarnings = error\n"
    )
    if (plugin, loop) == ("pytest-asyncio", "uvloop"):
        pytester.makeconftest(PYTEST_ASYNCIO_UVLOOP)
    pytester.makepyfile(
        test_sample=MODULE_LEVEL_ENGINE.format(
            url=shared.url(driver), marker=MARKERS[plugin], loop=LOOP_CHOICE[plugin, loop]
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=3)


SCRIPT = """
import asyncio, gc, sys
import anyio, uvloop
from sqlalchemy import text
import asyncgone

engine = asyncgone.create_engine(sys.argv[1], pool_size=2)

async def work(n):
    async with engine.begin() as conn:
        assert (await conn.execute(text(f"SELECT {n}"))).scalar_one() == n
    async with engine.connect() as a, engine.connect() as b:
        await a.execute(text("SELECT 1"))
        await b.execute(text("SELECT 1"))

run = {"asyncio": asyncio.run, "uvloop": uvloop.run, "anyio": anyio.run}[sys.argv[2]]
for n in range(3):
    run(work, n) if sys.argv[2] == "anyio" else run(work(n))
stats = asyncgone.stats(engine)
asyncio.run(engine.dispose())
gc.collect()
print(stats.connects, dict(stats.replaced))
"""


@pytest.mark.parametrize("runner", ["asyncio", "uvloop", "anyio"])
def test_a_script_may_run_several_event_loops(shared: Server, driver: str, runner: str) -> None:
    """A script calling asyncio.run(), uvloop.run() or anyio.run() three times with one
    engine: each loop closes its connections at its end (two per loop: six connects, none
    replaced), with every warning an error."""
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", SCRIPT, shared.url(driver), runner],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert (result.returncode, result.stdout, complaints(result.stderr)) == (0, "6 {}\n", "")


def complaints(stderr: str) -> str:
    """What a ``-X dev`` run printed, less asyncio's debug-mode notes on slow callbacks
    ("Executing <Task ...> took 0.139 seconds"), which a loaded machine produces."""
    return "".join(
        line
        for line in stderr.splitlines(keepends=True)
        if not (line.startswith("Executing <") and " took " in line)
    )


CLOSED_BY_HAND = """
import asyncio, gc, sys
from sqlalchemy import text
import asyncgone

engine = asyncgone.create_engine(sys.argv[1], pool_size=1)

async def work():
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT 7"))).scalar_one()

loop = asyncio.new_event_loop()
loop.run_until_complete(work())
loop.close()                      # by hand: no shutdown_asyncgens(), the connection stays
print(asyncio.run(work()))        # another loop: the old connection is released, replaced
stats = asyncgone.stats(engine)
asyncio.run(engine.dispose())
gc.collect()
print(stats.connects, dict(stats.replaced))
"""


def test_a_connection_whose_loop_was_closed_by_hand_is_released(
    shared: Server, driver: str
) -> None:
    """A loop closed without finalising its generators leaves its connection in the pool:
    the next loop's checkout releases it without calling into the closed loop, and opens
    another, with every warning an error."""
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", CLOSED_BY_HAND, shared.url(driver)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, complaints(result.stderr)) == (
        0,
        "7\n2 {'foreign_loop': 1}\n",
        "",
    ), result.stderr


def test_the_loop_watch_keeps_no_closed_loop_alive(shared: Server) -> None:
    """Engines used by many short-lived loops do not keep those loops in memory."""
    import gc
    import weakref

    from sqlalchemy import text

    import asyncgone

    engine = asyncgone.create_engine(shared.url("asyncmy"), pool_size=1)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def work() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    for _ in range(3):
        asyncio.run(work())
    gc.collect()
    assert [ref() for ref in loops] == [None, None, None]
    asyncio.run(engine.dispose())
