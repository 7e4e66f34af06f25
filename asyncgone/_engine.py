"""``create_engine()``: SQLAlchemy's ``create_async_engine`` with health defaults applied.

It validates asyncgone's options, creates the engine, makes its ``EngineState`` and installs
one listener object per hook: connect setup (``_connect``), the checkout check
(``_checkout``), the reset decision (``_reset``), error handling (``_invalidation``), the
closing guard (``_closing``), and, when asked for, ``KILL QUERY`` after cancellations
(``_cancel``) and leak detection (``_leaks``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ._admission import admission_for
from ._cancel import StatementKiller
from ._checkout import CheckoutCheck
from ._closing import guard_closing
from ._config import given_connect_timeout, split_options
from ._connect import ConnectSetup
from ._drivers import support_for
from ._invalidation import ErrorHandling
from ._leaks import LeakDetection
from ._reset import install_reset, pool_reset, reset_mode
from ._state import EngineState, attach
from ._url import resolve_url

__all__ = ["create_engine"]


def create_engine(url: str | URL | None = None, **kwargs: Any) -> AsyncEngine:
    """Create an ``AsyncEngine`` whose pooled connections survive idle timeouts, kills,
    restarts and silently dropped network paths.

    A drop-in for ``sqlalchemy.ext.asyncio.create_async_engine``: every keyword it accepts
    passes through. asyncgone's own keywords (see ``EngineOptions``) are validated here,
    before anything connects::

        engine = asyncgone.create_engine("mysql+asyncmy://app:secret@db/app")
        engine = asyncgone.create_engine(url, pool_size=20, ping_timeout=2.0)
        engine = asyncgone.create_engine()  # reads $DATABASE_URL

    Args:
        url (str | sqlalchemy.engine.URL | None): ``mysql+asyncmy://`` or
            ``mysql+aiomysql://`` (``mariadb+`` also works; any other installed async MySQL
            dialect is accepted with reduced checks); a bare ``mysql://`` picks an
            installed driver; ``None`` reads ``$DATABASE_URL``.
        **kwargs: asyncgone's options (``recycle``, ``max_lifetime``, ``ping_after``,
            ``ping_timeout``, ``connect_timeout``, ``tcp_keepalive``, ``kill_on_cancel``,
            ``keepalive_interval``, ``network_idle_limit``, ``min_idle``,
            ``leak_threshold``, ``max_connecting``, ``connect_retry``,
            ``connect_backoff_max``: see ``EngineOptions``) and anything
            ``create_async_engine`` takes. ``pool_pre_ping=True`` means ``ping_after=0``
            (a bounded ping at each checkout of a reused connection, after the socket
            check); ``pool_reset_on_return`` keeps its meaning.

    Returns:
        sqlalchemy.ext.asyncio.AsyncEngine: the engine; ``asyncgone.stats(engine)`` reads
        what asyncgone did on it.

    Raises:
        ConfigurationError: the URL, the driver or an option is unusable, or a keyword is a
            misspelling of one of asyncgone's; the message says what to change.
    """
    options, sa_kwargs = split_options(kwargs)
    resolved = resolve_url(url)
    connect_args = dict(sa_kwargs.pop("connect_args", None) or {})
    connect_timeout = given_connect_timeout(resolved, connect_args)
    if connect_timeout is None:
        connect_timeout = connect_args["connect_timeout"] = options.connect_timeout
    # Not given: asyncgone's "rollback when needed"; given: what SQLAlchemy documents.
    given = [sa_kwargs.pop("pool_reset_on_return")] if "pool_reset_on_return" in sa_kwargs else []
    mode = reset_mode(*given)
    engine = create_async_engine(
        resolved,
        connect_args=connect_args,
        # asyncgone's do_rollback decides whether the pool's ROLLBACK is needed (_reset).
        pool_reset_on_return=pool_reset(mode),
        **sa_kwargs,
    )
    sync = engine.sync_engine
    dialect = sync.dialect
    driver = support_for(dialect)
    state = EngineState(
        options,
        connect_timeout=connect_timeout,
        driver=driver,
        pool_recycle=sa_kwargs.get("pool_recycle"),
    )
    state.admission = admission_for(options, sa_kwargs.get("pool_timeout"), state.counters, driver)
    dbapi = dialect.loaded_dbapi
    connect = ConnectSetup(state, dbapi)
    connect.install(sync)
    CheckoutCheck(state).install(sync)
    install_reset(dialect, state, mode)
    ErrorHandling(state, dbapi).install(sync)
    guard_closing(dialect, driver)
    if options.kill_on_cancel:
        state.killer = StatementKiller(state, connect)
        state.killer.install(sync)
    if options.leak_threshold is not None:
        LeakDetection(state, options.leak_threshold).install(sync)
    if state.admission is not None:
        state.admission.watch(sync)
    attach(sync, state)
    return engine
