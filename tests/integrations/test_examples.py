"""The example applications (Starlette, FastAPI, Quart) against real faults on MariaDB."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

import asyncgone
from asyncgone.testing import MariaDBServer
from tests._support import Server, eventually, wait_until
from tests.integrations._apps import APPS, free_port, in_process, make_app, served

pytestmark = pytest.mark.anyio

POOL = 5


@pytest.fixture
def anyio_backend() -> str:
    """The frameworks run on asyncio; the event-loop variants are covered elsewhere."""
    return "asyncio"


@pytest.fixture(params=APPS)
def app_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db(disposable: Server, driver: str) -> asyncgone.Database:
    disposable.query("DROP TABLE IF EXISTS notes")
    # A server that stays down answers 503 once connect_retry is over: 1 s, not 5, here.
    return asyncgone.Database(
        disposable.url(driver), pool_size=POOL, max_overflow=0, pool_timeout=30, connect_retry=1.0
    )


def other_threads(server: Server) -> list[int]:
    rows = server.query("SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()")
    return [int(row[0]) for row in rows]


def notes(server: Server) -> list[tuple[int, str]]:
    return [(int(i), str(t)) for i, t in server.query("SELECT id, text FROM notes ORDER BY id")]


async def kill_every_connection(server: Server) -> int:
    """KILL every client connection but the administrator's own, wait until the server has
    dropped them, and return how many there were."""
    threads = other_threads(server)
    server.kill(*threads)
    await wait_until(lambda: not set(threads) & set(other_threads(server)))
    return len(threads)


async def test_requests_after_every_connection_was_killed(
    app_name: str, db: asyncgone.Database, disposable: Server
) -> None:
    """Scenario 1: every pooled connection killed before each of several rounds of
    concurrent requests; every request succeeds."""
    async with in_process(make_app(app_name, db)) as client:
        # Concurrent requests, so that the pool holds several connections to be killed.
        written = await asyncio.gather(
            *(client.post("/notes", json={"text": f"n{n}"}) for n in range(POOL))
        )
        assert [r.status_code for r in written] == [201] * POOL
        ids = [r.json()["id"] for r in written]
        failed: list[str] = []
        for round_ in range(5):
            killed = await kill_every_connection(disposable)
            assert killed > 1, f"round {round_}: only {killed} connection(s) to kill"
            responses = await asyncio.gather(
                client.post("/notes", json={"text": f"after {round_}"}),
                *(client.get(f"/notes/{note_id}") for note_id in ids),
            )
            failed += [
                f"round {round_}: {r.request.method} {r.request.url.path} -> "
                f"{r.status_code} {r.text}"
                for r in responses
                if r.status_code not in (200, 201)
            ]
        assert failed == []


async def test_200_concurrent_requests_over_a_pool_of_5(
    app_name: str, db: asyncgone.Database
) -> None:
    """Scenario 2: 200 requests at once on 5 connections: all served, nothing checked out."""
    async with in_process(make_app(app_name, db)) as client:
        responses = await asyncio.gather(
            *(client.post("/notes", json={"text": f"c{n}"}) for n in range(200))
        )
        assert [r.status_code for r in responses] == [201] * 200
        assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_write_is_committed_before_the_response(
    app_name: str, db: asyncgone.Database, disposable: Server
) -> None:
    """Scenario 5: the row is committed before the response starts: another connection
    sees it at the moment the app sends the status line."""
    app = make_app(app_name, db)
    seen_at_start: list[list[tuple[int, str]]] = []

    async def watched(scope: Scope, receive: Receive, send: Send) -> None:
        # The client of an in-process transport only returns once the whole app call is
        # over, when a commit made after the response would be done too: look at the
        # server from inside the call, as the status line goes out.
        async def send_and_look(message: Message) -> None:
            if message["type"] == "http.response.start" and scope["method"] == "POST":
                seen_at_start.append(await anyio.to_thread.run_sync(notes, disposable))
            await send(message)

        await app(scope, receive, send_and_look)

    async with in_process(app, asgi=watched) as client:
        for n in range(5):
            response = await client.post("/notes", json={"text": f"w{n}"})
            assert response.status_code == 201
            note_id = response.json()["id"]
            assert (note_id, f"w{n}") in seen_at_start[n]
            assert (await client.get(f"/notes/{note_id}")).json()["text"] == f"w{n}"


async def test_handler_failing_after_a_write_commits_nothing(
    app_name: str, db: asyncgone.Database, disposable: Server
) -> None:
    """Scenario 5: a batch whose second note is too long fails with 500; the first is not
    committed either."""
    async with in_process(make_app(app_name, db)) as client:
        response = await client.post("/notes/batch", json=[{"text": "ok"}, {"text": "x" * 500}])
        assert response.status_code == 500
        assert notes(disposable) == []
        assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_unavailable_database_answers_503_and_ready_follows(
    app_name: str, db: asyncgone.Database, disposable_server: MariaDBServer, disposable: Server
) -> None:
    """While the server is down: 503 with Retry-After, and /ready says 503; after it comes
    back, both recover."""
    async with in_process(make_app(app_name, db)) as client:
        assert (await client.post("/notes", json={"text": "before"})).status_code == 201
        assert (await client.get("/ready")).json()["ok"] is True
        await anyio.to_thread.run_sync(disposable_server.kill)
        try:
            response = await client.get("/notes/1")
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "5"
            ready = await client.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["ok"] is False
        finally:
            await anyio.to_thread.run_sync(disposable_server.start)
        assert (await client.get("/notes/1")).status_code == 200
        assert (await client.get("/ready")).status_code == 200


async def test_served_by_a_real_server(
    app_name: str, db: asyncgone.Database, disposable: Server
) -> None:
    """Scenario 4: the example behind uvicorn (hypercorn for Quart) on loopback, through a
    kill of every connection."""
    app = make_app(app_name, db)
    async with served(app_name, app) as base, httpx.AsyncClient(base_url=base) as client:
        assert (await client.post("/notes", json={"text": "served"})).status_code == 201
        disposable.kill(*other_threads(disposable))
        await anyio.sleep(0.1)
        assert (await client.get("/notes/1")).json() == {"id": 1, "text": "served"}


async def test_client_disconnecting_mid_request(
    app_name: str, db: asyncgone.Database, disposable: Server
) -> None:
    """Scenario 3: the client hangs up while its update waits for a row lock: the session is
    rolled back, the connection returned, and the waiting statement stopped."""
    app = make_app(app_name, db)
    async with served(app_name, app) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            note_id = (await client.post("/notes", json={"text": "original"})).json()["id"]
        with disposable.admin() as blocker:
            blocker.execute("BEGIN")
            blocker.execute(f"SELECT id FROM notes WHERE id = {note_id} FOR UPDATE")
            host, port = base.removeprefix("http://").split(":")
            _, writer = await asyncio.open_connection(host, int(port))
            body = b'{"text": "abandoned"}'
            writer.write(
                f"PUT /notes/{note_id} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            await wait_until(lambda: waiting_updates(disposable) == 1)
            writer.close()  # the client hangs up
            await wait_until(lambda: waiting_updates(disposable) == 0)
            blocker.execute("ROLLBACK")
        await eventually(lambda: db.engine.sync_engine.pool.checkedout() == 0)  # type: ignore[attr-defined]
        assert notes(disposable) == [(note_id, "original")]


def waiting_updates(server: Server) -> int:
    [(n,)] = server.query(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'UPDATE notes%'"
    )
    return int(n)


ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS_PAGE = ROOT / "docs" / "frameworks.md"
# The extra that installs each example's framework.
EXTRAS = {"starlette_app": "starlette", "fastapi_app": "fastapi", "quart_app": "quart"}


def documented_commands(page: Path = FRAMEWORKS_PAGE) -> list[str]:
    """The ``DATABASE_URL=... uvicorn|hypercorn examples.X:app`` lines of the frameworks page."""
    serve = r"^\$ (DATABASE_URL=\S+ (?:uvicorn|hypercorn) examples\.\w+:app)$"
    return re.findall(serve, page.read_text(), re.MULTILINE)


def documented_install(page: Path = FRAMEWORKS_PAGE) -> str:
    """The page's ``pip install`` line for running the examples."""
    [line] = re.findall(r"^\$ (pip install .*)$", page.read_text(), re.MULTILINE)
    return str(line)


def test_the_frameworks_page_documents_one_command_per_example() -> None:
    """The page shows how to serve each of the three example applications."""
    commands = documented_commands()
    assert [c.split()[-1] for c in commands] == [f"examples.{name}:app" for name in APPS]


def test_the_documented_install_provides_what_the_commands_run() -> None:
    """The page's install line installs this clone with the driver of the documented URLs and
    each example's framework, and every server program the documented commands run (no
    extra installs one)."""
    project, *others = shlex.split(documented_install())[2:]
    path, _, extras = project.partition("[")
    assert path == "."
    installed = set(extras.rstrip("]").split(","))
    for command in documented_commands():
        assignment, program, target = shlex.split(command)
        driver = re.fullmatch(r"DATABASE_URL=mysql\+(\w+)://\S+", assignment)
        assert driver is not None, command
        assert driver[1] in installed, command
        assert EXTRAS[target.removeprefix("examples.").removesuffix(":app")] in installed, command
        assert program in others, command


async def serve_as_documented(
    command: str, url: str, log: Path, *, bin_dir: Path | None = None, cwd: Path = ROOT
) -> None:
    """Run a documented ``DATABASE_URL=... server examples.X:app`` command from ``cwd`` with
    the server from ``bin_dir`` (this environment's by default), its URL swapped for ``url``
    and a free port added; write a note through it and read it back; stop it with Ctrl-C
    and check that it exits cleanly."""
    assignment, *argv = shlex.split(command)
    assert assignment.startswith("DATABASE_URL=")
    port = free_port()
    argv += ["--port", str(port)] if argv[0] == "uvicorn" else ["--bind", f"127.0.0.1:{port}"]
    argv[0] = str((bin_dir or Path(sys.executable).parent) / argv[0])
    env = {**os.environ, "DATABASE_URL": url}
    with log.open("w") as out:
        process = await anyio.open_process(argv, cwd=cwd, env=env, stdout=out, stderr=out)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            response = None
            with anyio.fail_after(30):
                while response is None and process.returncode is None:
                    try:
                        response = await client.post("/notes", json={"text": "as documented"})
                    except httpx.TransportError:
                        await anyio.sleep(0.1)
            assert response is not None, await anyio.Path(log).read_text()
            assert response.status_code == 201
            note = response.json()["id"]
            assert (await client.get(f"/notes/{note}")).json() == {
                "id": note,
                "text": "as documented",
            }
    finally:
        process.send_signal(signal.SIGINT)
        with anyio.move_on_after(15):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.aclose()
    output = await anyio.Path(log).read_text()
    assert process.returncode == 0, output
    assert "Traceback" not in output


@pytest.mark.parametrize("command", documented_commands(), ids=APPS)
async def test_documented_command_serves_the_example(
    command: str, disposable: Server, tmp_path: Path
) -> None:
    """Each documented command, run as written (only the URL points at the test server and a
    free port is added), serves its example: a note written, then read back."""
    disposable.query("DROP TABLE IF EXISTS notes")
    await serve_as_documented(command, disposable.url("asyncmy"), tmp_path / "server.log")
