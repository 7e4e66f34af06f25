"""Database: lifecycle, eager validation, and run() semantics on a healthy server."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import asyncgone
from asyncgone import AsyncGoneError, ConfigurationError, Database, DatabaseUnavailable
from tests._support import Server, wait_until

pytestmark = pytest.mark.anyio


def connected(server: Server, thread: int) -> bool:
    [(n,)] = server.query(
        f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = {thread}"
    )
    return bool(n)


async def test_start_probes_and_close_disposes(url: str, shared: Server) -> None:
    """``async with db`` answers queries; afterwards the engine is gone for good."""
    db = Database(url)
    async with db:
        engine = db.engine
        assert await db.run(lambda s: s.scalar(text("SELECT 41 + 1"))) == 42
        thread = await db.run(lambda s: s.scalar(text("SELECT CONNECTION_ID()")))
    assert engine.sync_engine.pool.checkedin() == 0  # type: ignore[attr-defined]
    await wait_until(lambda: not connected(shared, thread))  # closed on the server too
    with pytest.raises(AsyncGoneError, match="not started"):
        db.engine  # noqa: B018
    with pytest.raises(AsyncGoneError, match="cannot be reused"):
        await db.start()


async def test_unreachable_server_fails_fast(driver: str) -> None:
    """Starting against a closed port raises DatabaseUnavailable naming the masked target."""
    db = Database(f"mysql+{driver}://app:hunter2@127.0.0.1:1/test")
    with pytest.raises(DatabaseUnavailable) as info:
        async with db:
            pass
    message = str(info.value)
    assert "app:***@127.0.0.1:1" in message
    assert "hunter2" not in message
    assert "2003" in message


async def test_options_are_validated_at_construction() -> None:
    """Bad URLs and options raise before any connection is attempted."""
    with pytest.raises(ConfigurationError, match="unknown driver"):
        Database("mysql+nope://h/db")
    with pytest.raises(ConfigurationError, match="ping_timeout"):
        Database("mysql+asyncmy://h/db", ping_timeout=0)
    with pytest.raises(ConfigurationError, match="attempts"):
        Database("mysql+asyncmy://h/db", attempts=0)
    with pytest.raises(ConfigurationError, match="deadline"):
        Database("mysql+asyncmy://h/db", run_deadline=-1)
    with pytest.raises(ConfigurationError, match="retry_codes"):
        Database("mysql+asyncmy://h/db", retry_codes="1213")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cleanup_timeout"):
        Database("mysql+asyncmy://h/db", cleanup_timeout=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry_codes": 1213}, r"retry_codes must be a collection .* got 1213"),
        ({"replica_fallback": "rais"}, r"replica_fallback must be 'primary' or 'raise'"),
        ({"max_replica_lag": -1}, r"max_replica_lag"),
        ({"replica_check_interval": 0}, r"replica_check_interval"),
        ({"causal_reads_timeout": float("nan")}, r"causal_reads_timeout"),
        (
            {"session_options": {"expire_on_comit": True}},
            r"'expire_on_comit' is not a keyword AsyncSession takes \(did you mean "
            r"'expire_on_commit'\?\)",
        ),
        ({"session_options": {"sync_session_class": dict}}, r"sync_session_class must be"),
        ({"session_options": {"bind": None}}, r"cannot give bind="),
    ],
)
def test_every_option_is_validated_also_when_it_does_not_apply_yet(
    options: dict[str, object], message: str
) -> None:
    """Replica options without ``replicas``, ``retry_codes`` that is not a collection and
    session options ``AsyncSession`` does not take are refused at construction, not when
    replicas are added or the first session opens."""
    with pytest.raises(ConfigurationError, match=message):
        Database("mysql+asyncmy://h/db", **options)  # type: ignore[arg-type]


async def test_session_options_given_per_session_are_checked(url: str) -> None:
    """A misspelt ``AsyncSession`` keyword for one session, through ``Database.session()``
    or ``managed_session()``, is refused before anything connects; a correct one, or
    one a Session subclass of the application's takes, is used."""

    class Tagged(Session):
        def __init__(self, *args: object, tag: str = "", **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.info["tag"] = tag

    async with Database(url, keepalive=False) as db:
        with pytest.raises(ConfigurationError, match="did you mean 'autoflush'"):
            db.session(autoflsh=False)
        with pytest.raises(ConfigurationError, match="did you mean 'autoflush'"):
            async with asyncgone.managed_session(db.engine, autoflsh=False):
                pass
        async with db.session(autoflush=False, sync_session_class=None) as session:
            assert session.autoflush is False  # and None is SQLAlchemy's Session
        async with db.session(sync_session_class=Tagged, tag="t") as session:
            assert session.sync_session.info["tag"] == "t"


async def test_run_raises_non_retryable_errors_at_once(url: str) -> None:
    """A syntax error is not replayed: the work runs once and its error propagates."""
    calls = 0

    async def work(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.execute(text("SELEKT 1"))

    async with Database(url) as db:
        with pytest.raises(ProgrammingError):
            await db.run(work)
        assert calls == 1
        assert db.stats().replays == 0


async def test_run_commits_the_unit_of_work(url: str) -> None:
    """run() commits what the work did and returns what it returned."""
    async with Database(url) as db:
        async with db.session() as session:
            await session.execute(text("CREATE TABLE IF NOT EXISTS ag_run (id INT PRIMARY KEY)"))
            await session.execute(text("DELETE FROM ag_run"))

        async def insert(session: AsyncSession) -> str:
            await session.execute(text("INSERT INTO ag_run VALUES (1)"))
            return "done"

        assert await db.run(insert) == "done"
        with pytest.raises(IntegrityError):
            await db.run(insert)  # duplicate key: not retryable, not replayed
        assert await db.run(lambda s: s.scalar(text("SELECT COUNT(*) FROM ag_run"))) == 1


async def test_repr_masks_the_password() -> None:
    """The Database's repr shows where it points without the password."""
    db = Database("mysql+asyncmy://app:hunter2@db.example/app")
    assert repr(db) == "<Database mysql+asyncmy://app:***@db.example/app new>"
    assert "hunter2" not in repr(db)


def test_exception_tree() -> None:
    """The new exceptions hang under AsyncGoneError as the module docstring draws."""
    assert issubclass(asyncgone.CommitOutcomeUnknown, AsyncGoneError)
    assert issubclass(asyncgone.DatabaseUnavailable, AsyncGoneError)


class Boom(Exception):
    pass


async def test_error_leaving_the_block_still_disposes(url: str, shared: Server) -> None:
    """An exception out of ``async with db`` closes every connection and propagates as is."""
    db = Database(url)
    with pytest.raises(Boom):
        async with db:
            thread = await db.run(lambda s: s.scalar(text("SELECT CONNECTION_ID()")))
            raise Boom
    await wait_until(lambda: not connected(shared, thread))


async def test_cancelled_close_still_stops_the_keepalive_and_stays_cancelled(url: str) -> None:
    """A task cancelled while it closes a Database ends cancelled, with the keepalive stopped
    and the engine disposed (the cancellation is delivered, not swallowed)."""
    db = Database(url, keepalive=True)
    await db.start()
    keepalive_tasks = [t for t in asyncio.all_tasks() if t.get_name() == "asyncgone-keepalive"]
    assert keepalive_tasks

    async def close_then_continue() -> str:
        await db.close()
        await asyncio.sleep(0)
        return "ran on"

    task = asyncio.ensure_future(close_then_continue())
    await asyncio.sleep(0)  # close() has begun
    task.cancel()
    await asyncio.wait({task})
    assert task.cancelled()
    assert all(t.done() for t in keepalive_tasks)
    with pytest.raises(AsyncGoneError, match="not started"):
        db.engine  # noqa: B018
