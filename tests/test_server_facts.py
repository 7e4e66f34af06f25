"""The server-facts query each new connection runs: single-host engines run the query they
always ran; engines with a host search also read the role, whatever form it takes."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

import asyncgone
from asyncgone._server import FACTS_SQL, is_on, read_facts
from tests._support import Server

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("value", "read_only"),
    [
        (0, False),
        (1, True),
        ("0", False),
        ("1", True),
        ("OFF", False),
        ("off", False),
        ("ON", True),
        ("NO_LOCK", True),  # MariaDB 11.8+: read_only is an enum
        ("NO_LOCK_NO_ADMIN", True),
        (b"OFF", False),
        (b"NO_LOCK", True),
        (2, True),
        (3, True),
        ("", False),
        (None, False),  # a variable the server lacks
    ],
)
def test_every_form_of_a_read_only_value_parses(value: Any, read_only: bool) -> None:
    """Ints, ON/OFF and the enum's names: anything but off means read-only; nothing raises."""
    assert is_on(value) is read_only


async def _raw(shared: Server, driver: str) -> Any:
    if driver == "aiomysql":
        import aiomysql

        return await aiomysql.connect(
            host=shared.host, port=shared.port, user=shared.user, password=shared.password,
            db=shared.database,
        )  # fmt: skip
    import asyncmy

    return await asyncmy.connect(
        host=shared.host, port=shared.port, user=shared.user, password=shared.password,
        database=shared.database,
    )  # fmt: skip


async def test_a_missing_role_variable_does_not_fail_the_connect(
    shared: Server, driver: str
) -> None:
    """A server without one of the role variables (error 1193) is asked again without it."""
    conn = await _raw(shared, driver)
    try:
        facts = await read_facts(conn, 5.0, role=True, variables=("read_only", "no_such_var"))
        assert facts.read_only is False
        assert facts.wait_timeout > 0
        # The connection is still usable after the refused query.
        plain = await read_facts(conn, 5.0)
        assert plain.max_allowed_packet == facts.max_allowed_packet
    finally:
        conn.close()


def _facts_queries(server: Server) -> list[str]:
    with server.admin() as cur:
        cur.execute(
            "SELECT CONVERT(argument USING utf8mb4) FROM mysql.general_log "
            "WHERE command_type = 'Query' AND argument LIKE '%@@session.wait_timeout%' "
            "AND argument NOT LIKE '%general_log%'"
        )
        return [row[0] for row in cur.fetchall()]


async def test_only_engines_with_a_host_search_read_the_role(
    disposable: Server, driver: str
) -> None:
    """A single-host engine sends exactly the facts query it sent before role reading
    existed; an engine with a target_role (a host search) adds the role columns."""
    with disposable.admin() as cur:
        cur.execute("SET GLOBAL log_output = 'TABLE'")
        cur.execute("TRUNCATE mysql.general_log")
        cur.execute("SET GLOBAL general_log = ON")
    try:
        engine = asyncgone.create_engine(disposable.url(driver))
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        finally:
            await engine.dispose()
        assert _facts_queries(disposable) == ["SELECT @@session.wait_timeout, @@max_allowed_packet"]
        assert FACTS_SQL == "SELECT @@session.wait_timeout, @@max_allowed_packet"
        with disposable.admin() as cur:
            cur.execute("SET GLOBAL general_log = OFF")
            cur.execute("TRUNCATE mysql.general_log")
            cur.execute("SET GLOBAL general_log = ON")
        engine = asyncgone.create_engine(disposable.url(driver), target_role="primary")
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        finally:
            await engine.dispose()
        queries = _facts_queries(disposable)
        assert len(queries) == 1
        assert "@@global.read_only" in queries[0]
        assert "@@global.innodb_read_only" in queries[0]
    finally:
        with disposable.admin() as cur:
            cur.execute("SET GLOBAL general_log = OFF")
            cur.execute("SET GLOBAL log_output = 'FILE'")
            cur.execute("TRUNCATE mysql.general_log")
