"""asyncgone: keep async SQLAlchemy applications on MySQL and MariaDB working when their
database connections die.

    import asyncgone

    engine = asyncgone.create_engine("mysql+asyncmy://user:password@host/db")
"""

import logging

from ._config import (
    DEFAULT_CONNECT_BACKOFF_MAX,
    DEFAULT_CONNECT_RETRY,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_MAX_CONNECTING,
    DEFAULT_MAX_LIFETIME,
    DEFAULT_NETWORK_IDLE_LIMIT,
    DEFAULT_PING_AFTER,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_RECYCLE,
    DEFAULT_TCP_KEEPALIVE,
    EngineOptions,
    RunOptions,
    TCPKeepalive,
)
from ._database import (
    DEFAULT_ATTEMPTS,
    DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_RUN_DEADLINE,
    Database,
    managed_session,
)
from ._engine import create_engine
from ._errors import (
    DEFAULT_RETRY_CODES,
    AsyncGoneError,
    CommitOutcomeUnknown,
    ConfigurationError,
    ConfigurationWarning,
    DatabaseUnavailable,
    is_disconnect,
    is_unavailable,
)
from ._groups import ScopeGroup
from ._keepalive import Keepalive, keepalive
from ._session import DEFAULT_CLEANUP_TIMEOUT, DEFAULT_SESSION_OPTIONS, SessionScope
from ._state import stats
from ._stats import Health, PoolStatus, Reason, Stats

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_CLEANUP_TIMEOUT",
    "DEFAULT_CONNECT_BACKOFF_MAX",
    "DEFAULT_CONNECT_RETRY",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HEALTH_TIMEOUT",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_MAX_CONNECTING",
    "DEFAULT_MAX_LIFETIME",
    "DEFAULT_NETWORK_IDLE_LIMIT",
    "DEFAULT_PING_AFTER",
    "DEFAULT_PING_TIMEOUT",
    "DEFAULT_RECYCLE",
    "DEFAULT_RETRY_CODES",
    "DEFAULT_RUN_DEADLINE",
    "DEFAULT_SESSION_OPTIONS",
    "DEFAULT_TCP_KEEPALIVE",
    "AsyncGoneError",
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "ConfigurationWarning",
    "Database",
    "DatabaseUnavailable",
    "EngineOptions",
    "Health",
    "Keepalive",
    "PoolStatus",
    "Reason",
    "RunOptions",
    "ScopeGroup",
    "SessionScope",
    "Stats",
    "TCPKeepalive",
    "create_engine",
    "is_disconnect",
    "is_unavailable",
    "keepalive",
    "managed_session",
    "stats",
]

# A library leaves handlers to the application (logging HOWTO, "Configuring Logging for a
# Library"); records reach whatever the application configures for "asyncgone".
logging.getLogger("asyncgone").addHandler(logging.NullHandler())

# Tracebacks and reprs show the public path (asyncgone.X), not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and callable(_obj):
        _obj.__module__ = __name__
del _name, _obj
