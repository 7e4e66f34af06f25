"""Galera state in the server-facts query: read with no round trip of its own, harmless on
a server without Galera; the options that go with it are checked early."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import asyncgone
from asyncgone._errors import is_node_not_ready
from asyncgone._server import read_facts
from asyncgone._wsrep import WsrepState, parse
from tests._support import Server, delta

pytestmark = pytest.mark.anyio


def test_a_synced_node_in_a_primary_component_is_eligible() -> None:
    """Only ready + Synced (4) + Primary serves; a server without wsrep always does."""
    on = "WSREP_ON=ON,WSREP_REJECT_QUERIES=NONE"
    status = "WSREP_CLUSTER_STATUS=Primary,WSREP_LOCAL_STATE=4,WSREP_READY=ON"
    synced = parse(on, status)
    assert synced == WsrepState(True, True, 4, "Primary", "NONE")
    assert synced.eligible
    desynced = parse(on, status.replace("STATE=4", "STATE=2"))
    assert desynced is not None
    assert not desynced.eligible
    assert desynced.describe() == "Donor/Desynced, ready, Primary component"
    rejecting = parse(on.replace("NONE", "ALL"), status)
    assert rejecting is not None
    assert not rejecting.eligible
    cut_off = parse(on, "WSREP_CLUSTER_STATUS=non-Primary,WSREP_LOCAL_STATE=4,WSREP_READY=OFF")
    assert cut_off is not None
    assert not cut_off.eligible
    plain = parse("WSREP_ON=OFF", "WSREP_CLUSTER_STATUS=Disconnected,WSREP_READY=OFF")
    assert plain is not None
    assert plain.eligible
    assert parse(None, None) is None


async def test_the_facts_of_a_server_without_galera_say_wsrep_off(
    shared: Server, driver: str
) -> None:
    """The shared MariaDB (no Galera) answers the facts query of a host search (role and
    wsrep columns): wsrep off, eligible; a single-host engine's query asks neither."""
    engine = asyncgone.create_engine(shared.url(driver))
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            facts = await read_facts(raw.driver_connection, 5.0, role=True)
            plain = await read_facts(raw.driver_connection, 5.0)
    finally:
        await engine.dispose()
    assert (plain.wsrep, plain.read_only) == (None, False)
    assert facts.wsrep is not None
    assert (facts.wsrep.on, facts.wsrep.eligible) == (False, True)
    assert facts.wait_timeout > 0


async def test_a_new_connection_still_costs_one_query(disposable: Server, driver: str) -> None:
    """A new connection of a multi-host engine sends one statement more than SQLAlchemy's
    own: the facts query, with the wsrep columns in it."""
    host = f"{disposable.host}:{disposable.port}"
    multi = disposable.url(driver).replace(f"@{host}/", "@/") + f"?host={host}"
    costs = []
    for engine in (
        asyncgone.create_engine(multi, target_role="primary"),
        create_async_engine(disposable.url(driver)),
    ):
        try:
            async with engine.connect():  # the first connection also initialises the dialect
                before = disposable.status()
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                costs.append(delta(before, disposable.status()))
        finally:
            await engine.dispose()
    ours, theirs = costs
    assert ours["Connections"] == theirs["Connections"] == 1
    assert ours["Questions"] == theirs["Questions"] + 1


def test_1047_with_a_wsrep_message_is_a_node_refusal_only() -> None:
    """1047 from Galera speaks for the node; MySQL's 1047 "Unknown command" does not."""
    refusal = Exception(1047, "WSREP has not yet prepared node for application use")
    assert is_node_not_ready(refusal)
    assert asyncgone.is_disconnect(refusal)
    assert not is_node_not_ready(Exception(1047, "Unknown command"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"wsrep_sync_wait": 16}, "bitmask from 0 to 15"),
        ({"wsrep_sync_wait": -1}, "at least 0"),
        ({"galera_spread": "yes"}, "True or False"),
    ],
)
def test_galera_options_are_checked_early(options: dict[str, object], message: str) -> None:
    """Bad Galera options fail at create_engine(), naming the option."""
    with pytest.raises(asyncgone.ConfigurationError, match=message):
        asyncgone.create_engine("mysql+asyncmy://u:p@/db?host=a&host=b", **options)
