"""URL handling: clear errors for unusable URLs, driver choice, and masked passwords."""

from __future__ import annotations

import pytest

import asyncgone
from asyncgone import ConfigurationError
from asyncgone._url import mask, resolve_url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "could not parse database URL 'not a url'"),
        ("postgresql+asyncpg://u:pw@h/db", "asyncgone works with MySQL and MariaDB only"),
        ("mysql+pymysql://u:pw@h/db", "'pymysql' is a synchronous driver"),
        ("mysql+mysqldb://u:pw@h/db", "'mysqldb' is a synchronous driver"),
        ("mysql+aiomysqll://u:pw@h/db", "unknown driver 'aiomysqll'"),
    ],
)
def test_unusable_urls_are_explained(url: str, message: str) -> None:
    """Each unusable URL raises ``ConfigurationError`` saying what to write instead."""
    with pytest.raises(ConfigurationError, match=message) as info:
        asyncgone.create_engine(url)
    assert "pw" not in str(info.value)


def test_malformed_url_does_not_echo_its_password() -> None:
    """A URL that does not even parse is quoted with its password masked."""
    with pytest.raises(ConfigurationError) as info:
        resolve_url("mysql+asyncmy//admin:hunter2@db:3306/app")
    assert "hunter2" not in str(info.value)
    assert mask("mysql+asyncmy//admin:hunter2@db/app") == "mysql+asyncmy//admin:***@db/app"
    assert "hunter2" not in mask("weird://admin:hunter2@db:notaport/app")
    assert "hunter2" not in mask("mysql+asyncmy:admin:hunter2@db/app")


def test_bare_mysql_url_picks_an_installed_driver() -> None:
    """``mysql://`` (as in many $DATABASE_URLs) gets an installed async driver."""
    assert resolve_url("mysql://u@h/db").drivername == "mysql+asyncmy"
    assert resolve_url("mariadb://u@h/db").drivername == "mariadb+asyncmy"


def test_missing_url_and_environment_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no URL and no ``$DATABASE_URL`` the error says to set one."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="DATABASE_URL is not set"):
        asyncgone.create_engine()


def test_database_url_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``create_engine()`` without a URL uses ``$DATABASE_URL``."""
    monkeypatch.setenv("DATABASE_URL", "mysql+aiomysql://u:pw@dbhost:3307/app")
    engine = asyncgone.create_engine()
    assert engine.url.host == "dbhost"
    assert engine.url.port == 3307
    assert engine.url.drivername == "mysql+aiomysql"


def test_mask_hides_the_password() -> None:
    """Rendered URLs never show the password."""
    assert mask("mysql+asyncmy://app:s3cret@db/app") == "mysql+asyncmy://app:***@db/app"
