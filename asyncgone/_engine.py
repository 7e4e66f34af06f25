"""``create_engine()``: SQLAlchemy's ``create_async_engine`` with health defaults applied.

It validates asyncgone's options, creates the engine, makes its ``EngineState`` and installs
one listener object per hook: connect setup (``_connect``), the checkout check
(``_checkout``), the reset decision (``_reset``), error handling (``_invalidation``), the
closing guard (``_closing``), and, when asked for, a ``KILL`` after cancellations
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
from ._compat import default_pool_class
from ._config import EngineOptions, given_connect_timeout, split_options
from ._connect import ConnectSetup
from ._drivers import DriverSupport, connect_error, support_for
from ._errors import ConfigurationError
from ._giveback import GiveBack
from ._hosts import DEFAULT_PORT, HostAddress, hosts_of, without_hosts
from ._invalidation import ErrorHandling
from ._leaks import LeakDetection
from ._params import checked_connect_args
from ._reset import install_reset, pool_reset, reset_mode
from ._search import HostSearch
from ._state import EngineState, attach, state_of
from ._url import resolve_url

__all__ = ["create_engine", "first_connect_bound"]


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
            installed driver; ``None`` reads ``$DATABASE_URL``. Several servers are
            named with repeated ``host`` parameters and no host before the path
            (``mysql+asyncmy://app:pw@/app?host=db1:3306&host=db2:3306``): each new
            connection then goes to the first host, in the search order, whose role
            (read from ``@@read_only`` and ``@@innodb_read_only`` by the query asyncgone
            runs on each new connection anyway) fits ``target_role``. When none fits within
            ``host_search_timeout``, connecting fails with the driver's error 2003 naming
            every host tried and its role. A Galera node fits only while it is ready and
            Synced in a Primary component (read by the same query; see the Topologies
            page).
        **kwargs: asyncgone's options (``recycle``, ``max_lifetime``, ``ping_after``,
            ``ping_timeout``, ``connect_timeout``, ``tcp_keepalive``, ``kill_on_cancel``,
            ``keepalive_interval``, ``network_idle_limit``, ``min_idle``,
            ``leak_threshold``, ``target_role``, ``host_search_timeout``,
            ``max_connecting``, ``connect_retry``, ``connect_backoff_max``,
            ``overflow_give_back``, ``galera_spread``, ``wsrep_sync_wait``: see
            ``EngineOptions``) and anything ``create_async_engine`` takes.
            ``pool_pre_ping=True`` means ``ping_after=0`` (a bounded ping at each checkout
            of a reused connection, after the socket check); ``pool_reset_on_return`` keeps
            its meaning.

    Returns:
        sqlalchemy.ext.asyncio.AsyncEngine: the engine; ``asyncgone.stats(engine)`` reads
        what asyncgone did on it.

    Raises:
        ConfigurationError: the URL, the driver or an option is unusable, or a keyword is a
            misspelling of one of asyncgone's; the message says what to change.
    """
    options, sa_kwargs = split_options(kwargs)
    resolved = resolve_url(url)
    hosts = hosts_of(resolved)
    if hosts:
        resolved = without_hosts(resolved, hosts[0])
    connect_args = dict(sa_kwargs.pop("connect_args", None) or {})
    connect_timeout = given_connect_timeout(resolved, connect_args)
    if connect_timeout is None:
        connect_timeout = connect_args["connect_timeout"] = options.connect_timeout
    if "async_creator" not in sa_kwargs and "creator" not in sa_kwargs:
        # A creator of the application's own decides what to connect with.
        plugins = bool(sa_kwargs.get("plugins"))
        connect_args.update(checked_connect_args(resolved, connect_args, plugins=plugins))
    # Not given: asyncgone's "rollback when needed"; given: what SQLAlchemy documents.
    given = [sa_kwargs.pop("pool_reset_on_return")] if "pool_reset_on_return" in sa_kwargs else []
    mode = reset_mode(*given)
    check = CheckoutCheck()
    # A pool made by the application (pool=) keeps its reset setting and is checked through
    # the checkout event; otherwise the engine's pool class runs the check itself.
    if "pool" not in sa_kwargs:
        base = sa_kwargs.get("poolclass") or default_pool_class(resolved)
        sa_kwargs["poolclass"] = check.pool_class(base) or base
        # asyncgone's do_rollback decides whether the pool's ROLLBACK is needed (_reset).
        sa_kwargs["pool_reset_on_return"] = pool_reset(mode)
    engine = create_async_engine(resolved, connect_args=connect_args, **sa_kwargs)
    sync = engine.sync_engine
    dialect = sync.dialect
    driver = support_for(dialect)
    state = EngineState(
        options,
        connect_timeout=connect_timeout,
        driver=driver,
        pool_recycle=sa_kwargs.get("pool_recycle"),
    )
    state.search = _host_search(resolved, hosts, options, driver, connect_timeout)
    if state.search is not None:
        # For connections outside the pool to each host (the replica monitor, doctor).
        state.search.params = {**dialect.create_connect_args(resolved)[1], **connect_args}
    state.admission = admission_for(
        options,
        sa_kwargs.get("pool_timeout"),
        state.counters,
        driver,
        host_search=state.search is not None,
    )
    if state.admission is not None and state.search is None and options.overflow_give_back:
        # One server's counters: a multi-host engine's connections go to several.
        state.give_back = GiveBack(
            state, dialect, interval=options.connect_backoff_max, timeout=options.ping_timeout
        )
    dbapi = dialect.loaded_dbapi
    connect = ConnectSetup(state, dbapi)
    connect.install(sync)
    check.install(sync, state)
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


def first_connect_bound(engine: AsyncEngine, options: EngineOptions) -> float:
    """Seconds a first connection and one statement on it may take: the host search's own
    deadline when the engine has one (it may try several hosts, each bounded by
    ``connect_timeout``), else ``connect_timeout`` (the one the driver got: from
    ``connect_args`` or the URL when given there); plus ``ping_timeout``."""
    state = state_of(engine)
    search = None if state is None else state.search
    connect = options.connect_timeout if state is None else state.connect_timeout
    if search is not None:
        connect = max(connect, search.deadline)
    return connect + options.ping_timeout


def _host_search(
    url: URL,
    hosts: tuple[HostAddress, ...],
    options: EngineOptions,
    driver: DriverSupport,
    connect_timeout: float,
) -> HostSearch | None:
    """The host search for a multi-host URL or an explicit ``target_role`` (else None)."""
    target = options.target_role or ("primary" if len(hosts) > 1 else "any")
    if not hosts and target == "any" and options.wsrep_sync_wait is None:
        return None
    if not driver.known:
        raise ConfigurationError(
            f"several hosts or a target_role need the aiomysql or asyncmy driver, not "
            f"{url.drivername!r}"
        )
    candidates = hosts or (HostAddress(url.host or "localhost", url.port or DEFAULT_PORT),)
    deadline = options.host_search_timeout or len(candidates) * (
        connect_timeout + options.ping_timeout
    )
    return HostSearch(
        candidates,
        target,
        ping_timeout=options.ping_timeout,
        deadline=deadline,
        error=connect_error(driver.name),
        spread=options.galera_spread,
        sync_wait=options.wsrep_sync_wait,
    )
