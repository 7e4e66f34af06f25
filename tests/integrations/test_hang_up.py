"""A client that hangs up stops its database work, behind real ASGI servers.

Each combination of framework, server, event loop and driver serves
``tests/integrations/_hang_up_apps.py`` from a subprocess started with the server's own
command line, with a pool of 2. The client hangs up on a streaming export (after 64 KiB),
or, before any response, on a plain endpoint reading rows, on a server-side cursor of the
request's own session, and on a request waiting for a task it started. Within ``BOUND``
seconds the marked statement must be gone from the server's PROCESSLIST, the pool slot
back, and no more rows read; then two exports at once must both start on the pool of 2.

Run with ``-s`` to see the measured times (from the close to the statement gone and to the
slot returned) and the rows read after the hang-up: one line per scenario as it runs, and
one table for all of them at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest

from tests._support import Server
from tests.integrations._apps import free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
#: Seconds within which a hang-up must have stopped the statement and returned the slot
#: (measured: well under one; the bound is generous for a noisy, shared machine).
BOUND = 3.0
#: How long the measurement keeps polling, so that a figure over the bound is still recorded.
LIMIT = 10.0
#: Bytes of an export the client reads before it hangs up.
READ = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Combination:
    """One way of serving the app: framework, ASGI server, event loop, driver."""

    framework: str
    server: str
    loop: str
    driver: str

    @property
    def id(self) -> str:
        return f"{self.framework}-{self.server}-{self.loop}-{self.driver}"

    def command(self, port: int) -> list[str]:
        """The server's own command line, as it would be typed, run by this Python."""
        target = f"tests.integrations._hang_up_apps:{self.framework}_app"
        if self.server == "uvicorn":
            return [
                *(sys.executable, "-m", "uvicorn", target),
                *("--host", "127.0.0.1", "--port", str(port)),
                *("--loop", self.loop, "--log-level", "warning"),
            ]
        return [
            *(sys.executable, "-m", "hypercorn", target),
            *("--bind", f"127.0.0.1:{port}", "--worker-class", self.loop),
        ]


# Every driver and loop behind the most common stack; one combination for each other
# framework and server, together covering both loops and both drivers again.
COMBINATIONS = [
    *(
        Combination("starlette", "uvicorn", loop, driver)
        for loop in ("asyncio", "uvloop")
        for driver in ("aiomysql", "asyncmy")
    ),
    Combination("fastapi", "uvicorn", "uvloop", "asyncmy"),
    Combination("quart", "hypercorn", "asyncio", "aiomysql"),
    Combination("starlette", "hypercorn", "uvloop", "aiomysql"),
    Combination("quart", "uvicorn", "uvloop", "asyncmy"),
]


@dataclasses.dataclass(frozen=True)
class Figures:
    """What one hang-up measured, in seconds from the client's close."""

    scenario: str
    statement_gone: float | None
    slot_returned: float | None
    rows_after: int

    def line(self, combination: str) -> str:
        def seconds(value: float | None) -> str:
            return "never" if value is None else f"{value:.2f} s"

        return (
            f"hang-up {combination} {self.scenario}: statement gone {seconds(self.statement_gone)}"
            f", slot returned {seconds(self.slot_returned)}, rows read after {self.rows_after}"
        )


@dataclasses.dataclass
class App:
    """A served app, its server's log, and where the tests record what they measure."""

    combination: Combination
    base: str
    log: Path
    database: Server
    figures: list[tuple[str, Figures]]

    async def status(self, marker: str | None = None) -> dict[str, int]:
        async with httpx.AsyncClient(base_url=self.base, timeout=5) as client:
            response = await client.get("/status", params={"marker": marker} if marker else {})
            response.raise_for_status()
            return dict(response.json())

    async def running(self, marker: str) -> int:
        """How many statements carrying ``marker`` the server runs now."""
        sql = (
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            f"WHERE INFO LIKE '%{marker}%' AND ID <> CONNECTION_ID()"
        )
        [(n,)] = await anyio.to_thread.run_sync(self.database.query, sql)
        return int(n)

    async def until_running(self, marker: str) -> None:
        with anyio.fail_after(LIMIT):
            # Polling is the point: the statement runs in another process (the server).
            while not await self.running(marker):  # noqa: ASYNC110
                await anyio.sleep(0.02)

    def record(self, figures: Figures) -> None:
        self.figures.append((self.combination.id, figures))
        print(figures.line(self.combination.id))


def new_marker() -> str:
    return f"hu_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def anyio_backend() -> str:
    """The client's loop does not matter; the servers run on the loops under test."""
    return "asyncio"


@pytest.fixture(scope="module")
def figures() -> Iterator[list[tuple[str, Figures]]]:
    """What every test of the module measured, printed as one table at the end (``-s``)."""
    measured: list[tuple[str, Figures]] = []
    yield measured
    if measured:
        print("\n\nhang-up figures: seconds from the client's close; rows read after it")
        print(f"{'combination':36} {'scenario':36} {'gone':>6} {'slot':>6} {'rows':>8}")
        for combination, row in measured:
            gone, slot = (
                "never" if value is None else f"{value:.2f}"
                for value in (row.statement_gone, row.slot_returned)
            )
            print(f"{combination:36} {row.scenario:36} {gone:>6} {slot:>6} {row.rows_after:>8}")


@pytest.fixture(scope="module", params=COMBINATIONS, ids=lambda c: c.id)
def app(
    request: pytest.FixtureRequest,
    shared: Server,
    figures: list[tuple[str, Figures]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[App]:
    """The app served by a real server in a subprocess, for every test of one combination."""
    combination: Combination = request.param
    port = free_port()
    log = tmp_path_factory.mktemp(combination.id) / "server.log"
    env = {
        **os.environ,
        "HANG_UP_URL": shared.url(combination.driver),
        # The working tree's asyncgone and tests, also where an env has asyncgone installed.
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    served = App(combination, f"http://127.0.0.1:{port}", log, shared, figures)
    with log.open("w") as out:
        process = subprocess.Popen(
            combination.command(port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _until_serving(served, process)
        yield served
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _until_serving(app: App, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {app.log.read_text()}")
        try:
            response = httpx.get(f"{app.base}/status", timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if response.status_code != 200:
            raise RuntimeError(f"/status answered {response.status_code}: {app.log.read_text()}")
        return
    raise RuntimeError(f"the server did not answer within 30 s: {app.log.read_text()}")


@contextlib.asynccontextmanager
async def client(app: App) -> AsyncIterator[httpx.AsyncClient]:
    # One connection per client: leaving the block closes it, which is the hang-up.
    async with httpx.AsyncClient(base_url=app.base, timeout=LIMIT) as http:
        yield http


async def start_export(http: httpx.AsyncClient, marker: str) -> AsyncIterator[int]:
    """Stream an export, yielding the bytes received so far after each chunk."""
    async with http.stream("GET", "/export", params={"marker": marker}) as response:
        assert response.status_code == 200
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            yield received


async def hang_up_after_64k(
    app: App, marker: str, *, together: Barrier | None = None
) -> tuple[float, int]:
    """Read 64 KiB of an export and close (once every export of ``together`` got there);
    return when it closed and the rows read then."""
    async with client(app) as http:
        with anyio.fail_after(LIMIT):
            async for received in start_export(http, marker):
                if received >= READ:
                    break
            if together is not None:
                await together.wait()
        rows = (await app.status(marker))["rows"]
    return time.monotonic(), rows


class Barrier:
    """Lets ``parties`` tasks go on once all of them have arrived."""

    def __init__(self, parties: int) -> None:
        self._waiting = parties
        self._all_there = anyio.Event()

    async def wait(self) -> None:
        self._waiting -= 1
        if not self._waiting:
            self._all_there.set()
        await self._all_there.wait()


async def hang_up_while_running(app: App, path: str, marker: str) -> tuple[float, int]:
    """Send a request, wait until its marked statement runs, then close before any
    response; return when it closed and the rows read then."""
    async with client(app) as http, anyio.create_task_group() as requests:
        answered: list[httpx.Response] = []

        async def ask() -> None:
            answered.append(await http.get(path, params={"marker": marker}))

        requests.start_soon(ask)
        await app.until_running(marker)
        rows = (await app.status(marker))["rows"]
        requests.cancel_scope.cancel()  # the client gives up: httpx closes the connection
    assert answered == []
    return time.monotonic(), rows


async def measure(app: App, scenario: str, marker: str, closed: float, rows: int) -> Figures:
    """Poll until the marked statement is gone and the pool has nothing checked out (and no
    background task runs); check that no rows are read any more; record the figures."""
    gone: float | None = None
    returned: float | None = None
    while (gone is None or returned is None) and time.monotonic() - closed < LIMIT:
        if gone is None and not await app.running(marker):
            gone = time.monotonic() - closed
        state = await app.status(marker)
        if returned is None and state["checked_out"] == 0 and state["tasks"] == 0:
            returned = time.monotonic() - closed
        await anyio.sleep(0.02)
    await anyio.sleep(max(0.0, closed + 0.5 - time.monotonic()))
    settled = (await app.status(marker))["rows"]
    await anyio.sleep(0.5)
    later = (await app.status(marker))["rows"]
    figures = Figures(scenario, gone, returned, later - rows)
    app.record(figures)
    summary = figures.line(app.combination.id)
    assert gone is not None, summary
    assert gone < BOUND, summary
    assert returned is not None, summary
    assert returned < BOUND, summary
    assert later == settled, f"rows still read after the hang-up: {settled} then {later}"
    return figures


async def test_streaming_export_stops(app: App) -> None:
    """A client that reads 64 KiB of a streaming export and hangs up: the body's session
    stops its statement and returns its connection, and no more rows are read."""
    marker = new_marker()
    closed, rows = await hang_up_after_64k(app, marker)
    await measure(app, "streaming export", marker, closed, rows)


async def test_plain_endpoint_reading_a_stream_stops(app: App) -> None:
    """A client that hangs up while the endpoint reads rows through session.stream(),
    before any response: the statement stops, the connection returns, no more rows."""
    marker = new_marker()
    closed, rows = await hang_up_while_running(app, "/count", marker)
    await measure(app, "plain endpoint, session.stream()", marker, closed, rows)


async def test_server_side_cursor_of_the_request_session_stops(app: App) -> None:
    """A client that hangs up while the endpoint reads a server-side cursor on the
    request's own session: the statement stops, the connection returns, no more rows."""
    marker = new_marker()
    closed, rows = await hang_up_while_running(app, "/cursor", marker)
    await measure(app, "request session, server-side cursor", marker, closed, rows)


async def test_task_the_request_started_stops(app: App) -> None:
    """A client that hangs up while the request waits for a task it started, which runs
    a long statement in its own session: the task is cancelled, its statement stopped and
    its connection returned."""
    marker = new_marker()
    closed, rows = await hang_up_while_running(app, "/background", marker)
    await measure(app, "task started by the request", marker, closed, rows)


async def test_pool_serves_two_exports_after_the_hang_ups(app: App) -> None:
    """After the hang-ups above, two exports at once both start on the pool of 2 (no
    pool timeout), and both stop when their clients hang up together."""
    markers = [new_marker(), new_marker()]
    results: dict[str, tuple[float, int]] = {}

    both_streaming = Barrier(len(markers))

    async def export(marker: str) -> None:
        results[marker] = await hang_up_after_64k(app, marker, together=both_streaming)

    async with anyio.create_task_group() as exports:
        for marker in markers:
            exports.start_soon(export, marker)
    async with anyio.create_task_group() as measurements:  # both from their own close
        for marker in markers:
            measurements.start_soon(
                measure, app, "one of two concurrent exports", marker, *results[marker]
            )


def test_the_server_logged_no_error(app: App) -> None:
    """Through all the hang-ups above, the server logged no traceback: nothing escaped the
    application, its middleware or its session cleanup."""
    log = app.log.read_text()
    assert "Traceback" not in log, log
    assert "Exception in ASGI application" not in log, log
