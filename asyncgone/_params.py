"""The driver's connect parameters, checked when the engine is made, not at the first connect.

SQLAlchemy's MySQL dialects hand the driver's ``connect()`` the URL's query (a few values
converted, the ``ssl_*`` keys gathered into a dict) and ``connect_args``. A key the driver
does not take, a port out of range or a TLS file that is not there used to fail only at
the first connect, deep in the driver and often without naming what was wrong
(``TypeError: __init__() got an unexpected keyword argument``, ``FileNotFoundError``
without a path, ``OverflowError``), and ``Database.start()`` reported it as an
unreachable server. ``create_engine()`` checks them first and raises
``ConfigurationError`` saying what to change.

TLS settings in the URL (``ssl_ca=``, ``ssl_cert=``, ``ssl_key=``, ``ssl_capath=``,
``ssl_cipher=``, ``ssl_check_hostname=``) reach the driver as a dict (as does a dict in
``connect_args``' ``ssl``), which asyncmy turns into an ``ssl.SSLContext`` and aiomysql
(0.2, 0.3) cannot use (its TLS handshake fails with ``'dict' object has no attribute
'wrap_bio'``). For aiomysql a non-empty dict becomes the context
PyMySQL makes from the same dict (``pymysql.connections.Connection._create_ssl_ctx``,
reached through ``_drivers``: aiomysql is built on PyMySQL and depends on it), made once per
engine; without that function the URL form is refused with the advice to pass a context
in ``connect_args``.
"""

from __future__ import annotations

import difflib
import inspect
import os
import ssl
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL

from ._config import EngineOptions
from ._drivers import pymysql_ssl_context
from ._errors import ConfigurationError

__all__ = ["checked_connect_args"]

# The URL's TLS keys SQLAlchemy's MySQL dialects gather into the driver's ssl dict.
_TLS_KEYS = (
    "ssl_ca",
    "ssl_capath",
    "ssl_cert",
    "ssl_key",
    "ssl_cipher",
    "ssl_check_hostname",
)

# The dict keys SQLAlchemy makes from the URL's ssl_* keys that name files or directories.
_TLS_PATHS = {
    "ca": "the CA certificate that signed the server's",
    "capath": "a directory of CA certificates",
    "cert": "the client certificate",
    "key": "the client certificate's private key",
}

# Keys that are not the driver's but SQLAlchemy's async dialects' own (they take them out
# before calling the driver), or that the MySQL dialect adds itself.
_DIALECT_KEYS = frozenset({"client_flag", "async_creator_fn", "async_fallback"})


def driver_parameters(driver: str) -> frozenset[str] | None:
    """The keywords ``driver``'s connection class takes, or None when that cannot be told
    (another driver, or a signature that takes any keyword)."""
    if driver == "aiomysql":
        from aiomysql import Connection
    elif driver == "asyncmy":
        from asyncmy.connection import Connection
    else:
        return None
    try:
        parameters = inspect.signature(Connection.__init__).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return frozenset(name for name in parameters if name != "self")


def checked_connect_args(
    url: URL, connect_args: Mapping[str, Any], *, plugins: bool = False
) -> dict[str, Any]:
    """Check what the driver's ``connect()`` will get for ``url`` and ``connect_args``;
    return what to add to ``connect_args`` (for aiomysql, the URL's TLS settings as an
    ``ssl.SSLContext``). With ``plugins`` (SQLAlchemy engine plugins, which take their
    own keys out of the URL later) the keys are not checked.

    Raises:
        ConfigurationError: the port is out of range, a key is not the driver's (or is one
            of asyncgone's keywords, which go to ``create_engine()``), or a TLS file is
            missing or unusable.
    """
    driver = url.get_driver_name()
    if driver not in ("aiomysql", "asyncmy"):
        _check_port(url.port)
        return {}
    try:
        made = url.get_dialect()().create_connect_args(url)[1]
    except (TypeError, ValueError) as exc:  # a value SQLAlchemy cannot read (local_infile=x)
        raise ConfigurationError(f"a parameter in the URL is unusable: {exc}") from exc
    params = {**made, **connect_args}
    _check_port(params.get("port", url.port))
    if not plugins and "plugin" not in url.query:
        _check_keys(driver, url, params)
    tls = params.get("ssl")
    if not isinstance(tls, dict) or not tls:  # an empty dict: no TLS, as the drivers read it
        return {}
    _check_tls_files(tls)
    if driver == "aiomysql":
        return {"ssl": _aiomysql_context(tls)}
    return {}


def _check_port(port: object) -> None:
    if port is not None and not (isinstance(port, int) and 1 <= port <= 65535):
        raise ConfigurationError(
            f"port {port!r} in the URL is out of range: a TCP port is 1 to 65535 (MySQL's is 3306)"
        )


def _check_keys(driver: str, url: URL, params: Mapping[str, Any]) -> None:
    accepted = driver_parameters(driver)
    if accepted is None:
        return
    for key in params:
        if key in accepted or key in _DIALECT_KEYS:
            continue
        where = "the URL" if key in url.query else "connect_args"
        if key in EngineOptions.names():
            raise ConfigurationError(
                f"{key} is one of asyncgone's options, not a connection parameter: pass "
                f"{key}=... to create_engine() or Database() instead of in {where}"
            )
        close = difflib.get_close_matches(key, sorted(accepted), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if key.startswith("ssl_"):
            hint = f" (TLS settings in the URL: {', '.join(_TLS_KEYS)})"
        raise ConfigurationError(
            f"{key!r} in {where} is not a parameter {driver} takes{hint}; its connection "
            f"parameters are: {', '.join(sorted(accepted))}"
        )


def _check_tls_files(tls: Mapping[str, Any]) -> None:
    for key in _TLS_PATHS:
        path = tls.get(key)
        if path is None:
            continue
        exists = os.path.isdir(path) if key == "capath" else os.path.isfile(path)
        if not exists:
            kind = "directory" if key == "capath" else "file"
            raise ConfigurationError(
                f"ssl_{key}={path!r}: no such {kind} (seen from {os.getcwd()!r}); give the "
                f"path of {_TLS_PATHS[key]} (the URL's ssl_{key}, or connect_args' ssl dict)"
            )


def _aiomysql_context(tls: Mapping[str, Any]) -> ssl.SSLContext:
    """The context PyMySQL makes from the same dict (see the module docstring)."""
    try:
        context = pymysql_ssl_context(dict(tls))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigurationError(
            f"the TLS settings are unusable: {exc}; check ssl_ca, ssl_cert, ssl_key, ssl_cipher"
        ) from exc
    if context is None:
        raise ConfigurationError(
            "aiomysql takes TLS settings only as an ssl.SSLContext: give the engine "
            "connect_args={'ssl': ssl.create_default_context(cafile=CA_FILE)} instead of "
            "ssl_* keys in the URL"
        )
    return context
