"""Database URLs: parsing with errors that say what to write, driver choice, password masking."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ._errors import ConfigurationError

__all__ = ["DRIVERS", "ENV_VAR", "mask", "resolve_url"]

#: The async MySQL drivers asyncgone supports, in the order a bare ``mysql://`` URL tries them.
DRIVERS = ("asyncmy", "aiomysql")

#: Environment variable read when no URL is given.
ENV_VAR = "DATABASE_URL"

_BACKENDS = ("mysql", "mariadb")
_EXAMPLE = "mysql+asyncmy://user:password@host:3306/database"

# Whatever looks like "name:secret@" in a string SQLAlchemy could not parse: masked before the
# string is quoted in an error. Over-masking a malformed string is fine; leaking is not.
_USERINFO = re.compile(r"([^\s:/@]+):\S*@")  # greedy: a password may hold an @
# The same after "//": the user name is what follows it (the scheme stays as written).
_AUTHORITY_USERINFO = re.compile(r"(//[^\s:/@]*):\S*@")
# Query keys whose values are secrets (the drivers' password keys), and such a key's value
# in a string that did not parse.
_QUERY_SECRET_KEY = re.compile(r"passw(or)?d\d?", re.IGNORECASE)
_QUERY_SECRET = re.compile(r"([?&]passw(?:or)?d\d?=)[^&\s]*", re.IGNORECASE)


def mask(url: str | URL) -> str:
    """Render a URL with its password replaced by ``***``, also when it does not parse, and
    also a password given in its query (``?password=``)."""
    if isinstance(url, str):
        text = url
        try:
            url = make_url(text)
        except (ArgumentError, ValueError, TypeError):
            userinfo = _AUTHORITY_USERINFO if "//" in text else _USERINFO
            return _QUERY_SECRET.sub(r"\1***", userinfo.sub(r"\1:***@", text))
    secrets = {key: "***" for key in url.query if _QUERY_SECRET_KEY.fullmatch(key)}
    if secrets:
        url = url.update_query_dict(secrets)
    # SQLAlchemy quotes query values: the mask is shown as it is.
    return url.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def _password_from_query(url: URL) -> URL:
    """The URL with a ``?password=`` moved to its password, where SQLAlchemy masks it in
    every rendering (the drivers get it either way)."""
    given = url.query.get("password")
    if given is None:
        return url
    if url.password or not isinstance(given, str):  # an empty one before the @ is none
        raise ConfigurationError(
            f"the URL {mask(url)} gives more than one password: keep the one before the @"
        )
    return url.difference_update_query(["password"]).set(password=given)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _async_dialect(url: URL) -> bool:
    """Whether SQLAlchemy knows ``url``'s dialect (built in, registered or by entry point)
    and it is an asyncio one."""
    try:
        dialect = url.get_dialect()
    except Exception:  # NoSuchModuleError, or a dialect module that fails to import
        return False
    return bool(getattr(dialect, "is_async", False))


def resolve_url(url: str | URL | None) -> URL:
    """Parse and check a MySQL/MariaDB URL, choosing an installed async driver if none is named.

    ``None`` reads ``$DATABASE_URL``. Raises ``ConfigurationError`` with a message that says
    what to change for a malformed URL, another database, a sync or unknown driver, or a
    driver that is not installed.
    """
    if url is None:
        env = os.environ.get(ENV_VAR)
        if not env:
            raise ConfigurationError(
                f"no database URL given and ${ENV_VAR} is not set: pass a URL such as "
                f"{_EXAMPLE!r} or set {ENV_VAR}"
            )
        url = env
    if isinstance(url, str):
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:
            raise ConfigurationError(
                f"could not parse database URL {mask(url)!r}; expected the form {_EXAMPLE!r}"
            ) from exc
    elif isinstance(url, URL):
        parsed = url
    else:
        raise ConfigurationError(
            f"database URL must be a string or sqlalchemy.engine.URL, not {type(url).__name__}"
        )

    parsed = _password_from_query(parsed.set(drivername=parsed.drivername.lower()))
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in _BACKENDS:
        raise ConfigurationError(
            f"asyncgone works with MySQL and MariaDB only, got a {backend!r} URL "
            f"({mask(parsed)}); use a URL such as {_EXAMPLE!r}"
        )
    if not driver or driver in ("mysqldb", "pymysql", "mysqlconnector", "mariadbconnector"):
        if driver:
            hint = f"{driver!r} is a synchronous driver; "
        else:
            found = next((name for name in DRIVERS if _installed(name)), None)
            if found is not None:
                return parsed.set(drivername=f"{backend}+{found}")
            hint = "no async MySQL driver is installed; "
        raise ConfigurationError(
            f"{hint}asyncgone needs aiomysql or asyncmy: write {backend}+asyncmy:// or "
            f"{backend}+aiomysql:// and install it with pip install 'asyncgone[asyncmy]'"
        )
    if driver not in DRIVERS:
        if _async_dialect(parsed):
            # Another async MySQL dialect (a wrapper around a driver, say): accepted; the
            # checks that need to know its connections fall back to bounded pings.
            return parsed
        close = difflib.get_close_matches(driver, DRIVERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigurationError(
            f"unknown driver {driver!r}{hint} in {mask(parsed)}; asyncgone supports "
            f"{' and '.join(DRIVERS)} ({backend}+asyncmy:// or {backend}+aiomysql://), and "
            f"any other installed async MySQL dialect"
        )
    if not _installed(driver):
        raise ConfigurationError(
            f"the URL asks for the {driver} driver, which is not installed: "
            f"pip install 'asyncgone[{driver}]'"
        )
    return parsed
