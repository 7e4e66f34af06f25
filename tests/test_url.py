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
    assert mask("weird://admin:hunter2@db:notaport/app") == "weird://admin:***@db:notaport/app"
    assert mask("weird://admin:hun@ter2@db:x/app") == "weird://admin:***@db:x/app"
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


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (":99999/test", r"port 99999 in the URL is out of range"),
        (":0/test", r"port 0 in the URL is out of range"),
        (
            "/test?target_role=primary",
            r"target_role is one of asyncgone's options.*to create_engine\(\)",
        ),
        (
            "/test?charest=utf8mb4",
            r"'charest' in the URL is not a parameter \w+ takes "
            r"\(did you mean 'charset'\?\)",
        ),
        ("/test?ssl_ca=/nowhere/ca.pem", r"ssl_ca='/nowhere/ca.pem': no such file"),
        ("/test?ssl_cert=/nowhere/c.pem&ssl_key=/nowhere/k.pem", r"ssl_cert='/nowhere/c.pem'"),
        ("/test?ssl_capath=/nowhere", r"ssl_capath='/nowhere': no such directory"),
        ("/test?password=one", r"gives more than one password"),
        ("/test?local_infile=maybe", r"a parameter in the URL is unusable"),
        ("/test?ssl_mode=REQUIRED", r"'ssl_mode' .* \(TLS settings in the URL: ssl_ca,"),
    ],
)
@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
def test_connect_parameters_are_checked_when_the_engine_is_made(
    driver: str, query: str, message: str
) -> None:
    """What would fail only at the first connect, deep in the driver (a port out of range,
    a parameter the driver does not take, an asyncgone option in the URL, a missing TLS
    file, two passwords), is refused by create_engine() with what to change, and without
    the password."""
    with pytest.raises(ConfigurationError, match=message) as info:
        asyncgone.create_engine(f"mysql+{driver}://u:pw@127.0.0.1{query}")
    assert "pw" not in str(info.value).replace("password", "")


def test_connect_args_are_checked_too() -> None:
    """A key in connect_args the driver does not take is named with where it came from."""
    with pytest.raises(ConfigurationError, match="'read_timout' in connect_args"):
        asyncgone.create_engine("mysql+asyncmy://u@127.0.0.1/test", connect_args={"read_timout": 5})


def test_a_password_in_the_query_is_masked_and_moved() -> None:
    """``?password=`` becomes the URL's password (masked wherever SQLAlchemy renders it),
    and mask() hides it in a string that does not even parse."""
    resolved = resolve_url("mysql+asyncmy://u@h/db?password=s3cret&charset=utf8mb4")
    assert (resolved.password, dict(resolved.query)) == ("s3cret", {"charset": "utf8mb4"})
    assert "s3cret" not in repr(resolved)
    assert mask("mysql+asyncmy://u@h/db?charset=x&password=s3cret") == (
        "mysql+asyncmy://u@h/db?charset=x&password=***"
    )
    assert (
        mask("mysql+asyncmy//u@h/db?password=s3cret&x=1")
        == "mysql+asyncmy//u@h/db?password=***&x=1"
    )


def test_the_scheme_is_case_insensitive() -> None:
    """``MYSQL+ASYNCMY://`` is read as ``mysql+asyncmy://``, as URL schemes are."""
    assert resolve_url("MYSQL+ASYNCMY://u@h/db").drivername == "mysql+asyncmy"
