"""The pytest plugin, tested the way users run it: sample projects run by pytester in a
subprocess, once per event loop setup (pytest-asyncio's function, module and session loop
scopes, and anyio's plugin), with every warning an error."""

from __future__ import annotations

import textwrap

import pytest

from tests._support import Server

LOOPS = {
    "asyncio-function": "pytestmark = pytest.mark.asyncio(loop_scope='function')",
    "asyncio-module": "pytestmark = pytest.mark.asyncio(loop_scope='module')",
    "asyncio-session": "pytestmark = pytest.mark.asyncio(loop_scope='session')",
    "anyio": textwrap.dedent(
        """
        pytestmark = pytest.mark.anyio

        @pytest.fixture(scope="module")
        def anyio_backend():
            return "asyncio"
        """
    ),
}

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""


def run(pytester: pytest.Pytester, loop: str, body: str, *args: str) -> pytest.RunResult:
    pytester.makeini(INI)
    source = (
        "import pytest\nfrom sqlalchemy import text\n" + LOOPS[loop] + "\n" + textwrap.dedent(body)
    )
    pytester.makepyfile(test_sample=source)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


ENGINE_TESTS = """
async def test_first(asyncgone_engine):
    async with asyncgone_engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1

async def test_second_in_the_same_loop_scope(asyncgone_engine):
    async with asyncgone_engine.begin() as conn:
        assert (await conn.execute(text("SELECT 2"))).scalar_one() == 2
"""


@pytest.mark.parametrize("loop", list(LOOPS))
def test_engine_works_in_every_loop_setup(
    pytester: pytest.Pytester, shared: Server, loop: str
) -> None:
    """Two tests share nothing that would break across loops; no warning at teardown."""
    result = run(pytester, loop, ENGINE_TESTS, f"--asyncgone-url={shared.url('asyncmy')}")
    result.assert_outcomes(passed=2)


def test_engine_in_pytest_asyncio_auto_mode(pytester: pytest.Pytester, shared: Server) -> None:
    """In auto mode, unmarked async tests get the engine in their loop too."""
    pytester.makeini(INI + "asyncio_mode = auto\n")
    pytester.makepyfile(test_sample="import pytest\nfrom sqlalchemy import text\n" + ENGINE_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--asyncgone-url={shared.url('aiomysql')}"
    )
    result.assert_outcomes(passed=2)


SESSION_TESTS = """
async def test_commits_inside_the_test(asyncgone_session):
    await asyncgone_session.execute(text("INSERT INTO ag_plugin_rows VALUES (1)"))
    await asyncgone_session.commit()
    rows = await asyncgone_session.execute(text("SELECT COUNT(*) FROM ag_plugin_rows"))
    assert rows.scalar_one() == 1

async def test_sees_nothing_of_the_previous_test(asyncgone_session):
    rows = await asyncgone_session.execute(text("SELECT COUNT(*) FROM ag_plugin_rows"))
    assert rows.scalar_one() == 0
"""


@pytest.mark.parametrize("loop", list(LOOPS))
def test_session_rolls_back_even_committed_work(
    pytester: pytest.Pytester, shared: Server, loop: str, driver: str
) -> None:
    """A test's commits are savepoints of an outer transaction rolled back after it."""
    shared.query("CREATE TABLE IF NOT EXISTS ag_plugin_rows (id INT PRIMARY KEY)")
    shared.query("DELETE FROM ag_plugin_rows")
    result = run(pytester, loop, SESSION_TESTS, f"--asyncgone-url={shared.url(driver)}")
    result.assert_outcomes(passed=2)
    assert shared.query("SELECT COUNT(*) FROM ag_plugin_rows") == [(0,)]


PROXY_TESTS = """
import asyncio

import asyncgone

@pytest.fixture
def asyncgone_engine_options():
    return {"ping_after": 0.1, "ping_timeout": 1.0}

async def test_cut_in_the_middle_of_app_code(asyncgone_proxy, asyncgone_proxy_engine):
    async with asyncgone_proxy_engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        assert asyncgone_proxy.cut() == 1
        with pytest.raises(Exception) as info:
            await conn.execute(text("SELECT 1"))
        assert asyncgone.is_disconnect(info.value)
    async with asyncgone_proxy_engine.connect() as conn:  # the app recovers
        assert (await conn.execute(text("SELECT 3"))).scalar_one() == 3

async def test_blackhole_then_fresh_connection(asyncgone_proxy, asyncgone_proxy_engine):
    async with asyncgone_proxy_engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    asyncgone_proxy.blackhole()
    await asyncio.sleep(0.2)  # idle past ping_after: the checkout pings, times out, replaces
    async with asyncgone_proxy_engine.connect() as conn:  # new flows work (the LB case)
        assert (await conn.execute(text("SELECT 4"))).scalar_one() == 4
    assert asyncgone.stats(asyncgone_proxy_engine).replaced == {"ping_timeout": 1}
"""


@pytest.mark.parametrize("loop", list(LOOPS))
def test_proxy_injects_faults_into_app_code(
    pytester: pytest.Pytester, shared: Server, loop: str, driver: str
) -> None:
    """Cuts and blackholes reach the code under test through the proxied engine."""
    result = run(pytester, loop, PROXY_TESTS, f"--asyncgone-url={shared.url(driver)}")
    result.assert_outcomes(passed=2)


MARIADB_TESTS = """
import asyncgone

async def test_restart_under_the_app(asyncgone_mariadb):
    engine = asyncgone.create_engine(asyncgone_mariadb.url("asyncmy"))
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    asyncgone_mariadb.kill()
    asyncgone_mariadb.start()
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 5"))).scalar_one() == 5
    await engine.dispose()

async def test_left_stopped_then_started_again(asyncgone_mariadb):
    asyncgone_mariadb.stop()

async def test_running_again(asyncgone_mariadb):
    assert asyncgone_mariadb.running
"""


def test_disposable_mariadb(pytester: pytest.Pytester) -> None:
    """A disposable server for the session, restarted for whoever finds it stopped."""
    result = run(pytester, "anyio", MARIADB_TESTS)
    result.assert_outcomes(passed=3)


URL_PRINTER = """
def test_url(asyncgone_url):
    print("URL=" + asyncgone_url)
"""


def test_url_precedence(
    pytester: pytest.Pytester, shared: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ini option, then command line, then environment variable, then the default."""
    ini_url, cli_url, env_url = (
        shared.url(d) + q
        for d, q in [("asyncmy", ""), ("aiomysql", ""), ("asyncmy", "?charset=utf8mb4")]
    )
    pytester.makepyfile(test_url=URL_PRINTER)

    def chosen(*args: str) -> str:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", *args)
        result.assert_outcomes(passed=1)
        return next(line.split("URL=")[1] for line in result.outlines if "URL=" in line)

    monkeypatch.setenv("ASYNCGONE_URL", env_url)
    pytester.makeini(INI)
    assert chosen() == env_url
    assert chosen(f"--asyncgone-url={cli_url}") == cli_url
    pytester.makeini(INI + f"asyncgone_url = {ini_url}\n")
    assert chosen(f"--asyncgone-url={cli_url}") == ini_url
    monkeypatch.delenv("ASYNCGONE_URL")
    pytester.makeini(INI)
    assert chosen() == "mysql://root@127.0.0.1:3306/test"


def test_unreachable_database_is_one_clear_message(pytester: pytest.Pytester) -> None:
    """Ten tests against a closed port: one message naming the masked URL and the settings,
    no traceback, no password."""
    pytester.makepyfile(
        test_many="".join(f"def test_{n}(asyncgone_url):\n    pass\n" for n in range(10))
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--asyncgone-url=mysql+asyncmy://app:hunter2@127.0.0.1:1/test"
    )
    assert result.ret == 3
    output = "\n".join(result.outlines + result.errlines)
    assert output.count("cannot reach the test database") == 1
    assert "mysql+asyncmy://app:***@127.0.0.1:1/test" in output
    assert "asyncgone_url ini option, --asyncgone-url=URL, or $ASYNCGONE_URL" in output
    assert "hunter2" not in output
    assert "Traceback" not in output


def test_sync_test_gets_a_usage_error(pytester: pytest.Pytester, shared: Server) -> None:
    """Asking for an engine from a sync test says what to do."""
    pytester.makepyfile(test_sync="def test_sync(asyncgone_engine):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--asyncgone-url={shared.url('asyncmy')}"
    )
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*needs an async test*@pytest.mark.asyncio*@pytest.mark.anyio*"])


def test_documented_example_runs(pytester: pytest.Pytester, shared: Server) -> None:
    """examples/test_app_example.py, the example docs/testing.md walks through, passes."""
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "test_app_example.py"
    pytester.makeini(INI)
    pytester.makepyfile(test_app_example=example.read_text())
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--asyncgone-url={shared.url('asyncmy')}"
    )
    result.assert_outcomes(passed=5)
