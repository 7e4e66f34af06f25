"""Multi-host URLs and target_role: parsed and checked before anything connects."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

import asyncgone
from asyncgone._hosts import HostAddress, hosts_of, role_fits, without_hosts
from asyncgone._state import state_of

URL = "mysql+asyncmy://app:s3cret@/app?host=db1:3307&host=db2&host=[::1]:3308"


def test_hosts_come_in_the_order_written_with_default_ports() -> None:
    """Every host= parameter is a candidate, in order; a host without a port gets 3306."""
    assert hosts_of(make_url(URL)) == (
        HostAddress("db1", 3307),
        HostAddress("db2", 3306),
        HostAddress("::1", 3308),
    )
    assert hosts_of(make_url("mysql+asyncmy://app:pw@db/app")) == ()


def test_sqlalchemy_gets_the_first_host_and_no_host_parameters() -> None:
    """The dialect sees a one-host URL, so its connect arguments are complete."""
    url = without_hosts(make_url(URL + "&charset=utf8mb4"), HostAddress("db1", 3307))
    assert (url.host, url.port) == ("db1", 3307)
    assert dict(url.query) == {"charset": "utf8mb4"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql+asyncmy://app:s3cret@db0/app?host=db1", "both before the path and in"),
        ("mysql+asyncmy://app:s3cret@/app?host=db1:http", "must be a number from 1 to 65535"),
        ("mysql+asyncmy://app:s3cret@/app?host=db1:70000", "must be a number from 1 to 65535"),
        ("mysql+asyncmy://app:s3cret@/app?host=:3306", "empty host"),
        ("mysql+asyncmy://app:s3cret@/app?host=db1&host=db1:3306", "the same host twice"),
        ("mysql+asyncmy://app:s3cret@/app?host=DB1&host=db1", "the same host twice"),
        ("mysql+asyncmy://app:s3cret@/app?host=::1&host=db2", r"in brackets, e\.g\. host=\[::1\]"),
        ("mysql+asyncmy://app:s3cret@/app?host=db1,db2", "one per host= parameter"),
        ("mysql+asyncmy://app:s3cret@/app?host=%20db1&host=db2", "has spaces"),
        ("mysql+asyncmy://app:s3cret@/app?host=db1:3306%20&host=db2", "has spaces"),
        ("mysql+asyncmy://app:s3cret@/app?host=db1&host=db2&port=3307", "give each host its"),
    ],
)
def test_a_malformed_host_list_is_refused_without_the_password(url: str, message: str) -> None:
    """A bad host list raises ConfigurationError at create_engine(), password masked."""
    with pytest.raises(asyncgone.ConfigurationError, match=message) as info:
        asyncgone.create_engine(url)
    assert "s3cret" not in str(info.value)


def test_a_misspelt_target_role_is_refused_with_a_suggestion() -> None:
    """target_role="primay" names the valid roles and the one meant."""
    with pytest.raises(asyncgone.ConfigurationError, match="did you mean 'primary'"):
        asyncgone.create_engine(URL, target_role="primay")
    with pytest.raises(asyncgone.ConfigurationError, match="'primary', 'replica', 'any'"):
        asyncgone.Database(URL, target_role="writer")
    with pytest.raises(asyncgone.ConfigurationError, match="host_search_timeout"):
        asyncgone.create_engine(URL, host_search_timeout=0)


def test_several_hosts_search_for_the_primary_by_default() -> None:
    """Several hosts mean target_role="primary"; one plain host keeps the old path."""
    engine = asyncgone.create_engine(URL)
    state = state_of(engine)
    assert state is not None
    assert state.search is not None
    assert state.search.target == "primary"
    assert state.search.order()[0] == HostAddress("db1", 3307)
    assert engine.url.host == "db1"
    single = state_of(asyncgone.create_engine("mysql+asyncmy://app:pw@db/app"))
    assert single is not None
    assert single.search is None
    replica = state_of(asyncgone.create_engine(URL, target_role="replica"))
    assert replica is not None
    assert replica.search is not None
    firsts = {replica.search.order()[0] for _ in range(3)}
    assert len(firsts) == 3  # spread: each search starts at the next host


def test_roles() -> None:
    """A writable server is a primary, a read-only one a replica; "any" takes both."""
    assert role_fits("primary", False)
    assert not role_fits("primary", True)
    assert role_fits("replica", True)
    assert not role_fits("replica", False)
    assert role_fits("any", True)
    assert role_fits("any", False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_replica_lag": -1}, "max_replica_lag must be a finite number"),
        ({"replica_check_interval": 0}, "replica_check_interval must be"),
        ({"replica_fallback": "primay"}, "replica_fallback must be 'primary' or 'raise'"),
        ({"causal_reads_timeout": "1s"}, "causal_reads_timeout must be a number"),
        ({"max_replica_lagg": 5}, "did you mean 'max_replica_lag'"),
    ],
)
def test_replica_options_are_checked_when_the_database_is_made(
    options: dict[str, object], message: str
) -> None:
    """A bad replica option raises ConfigurationError from Database(), before any connect."""
    with pytest.raises(asyncgone.ConfigurationError, match=message):
        asyncgone.Database(URL, replicas="mysql+asyncmy://app:s3cret@/app?host=r1", **options)


def test_a_replica_url_with_a_sync_driver_is_refused_without_the_password() -> None:
    """replicas= goes through the same URL checks as the primary's."""
    with pytest.raises(asyncgone.ConfigurationError, match="synchronous driver") as info:
        asyncgone.Database(URL, replicas="mysql+pymysql://app:s3cret@r1/app")
    assert "s3cret" not in str(info.value)


def test_a_statement_kill_needs_the_driver_connection() -> None:
    """StatementKiller.stop() takes the driver connection, never defaulted: with several
    hosts only that connection says which server the thread id belongs to."""
    import inspect

    from asyncgone._cancel import StatementKiller

    raw = inspect.signature(StatementKiller.stop).parameters["raw"]
    assert raw.default is inspect.Parameter.empty
