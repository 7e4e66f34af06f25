"""``create_engine()``: SQLAlchemy's ``create_async_engine`` with health defaults applied."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ._cancel import StatementKiller
from ._checkout import _OURS, ConnectionPolicy
from ._config import EngineOptions
from ._errors import ConfigurationError
from ._stats import Counters, register
from ._terminate import guard_terminate, needs_guard
from ._url import resolve_url

__all__ = ["create_engine", "split_options"]


def split_options(kwargs: dict[str, Any]) -> tuple[EngineOptions, dict[str, Any]]:
    """Separate asyncgone's keywords (validated now) from those meant for SQLAlchemy."""
    names = EngineOptions.names()
    ours = {key: kwargs[key] for key in kwargs if key in names}
    theirs = {key: kwargs[key] for key in kwargs if key not in names}
    return EngineOptions(**ours), theirs


def _given_connect_timeout(url: URL, connect_args: dict[str, Any]) -> float | None:
    """Return a connect timeout set in connect_args or the URL (which SQLAlchemy prefers)."""
    for source, value in (
        ("connect_args", connect_args.get("connect_timeout")),
        ("the URL", url.query.get("connect_timeout")),
    ):
        if value is None:
            continue
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            seconds = -1.0
        if not 0 < seconds < float("inf"):
            raise ConfigurationError(
                f"connect_timeout in {source} must be a positive number of seconds, got {value!r}"
            )
        return seconds
    return None


def create_engine(url: str | URL | None = None, **kwargs: Any) -> AsyncEngine:
    """Create an ``AsyncEngine`` whose pooled connections survive idle timeouts, kills,
    restarts and silently dropped network paths.

    A drop-in for ``sqlalchemy.ext.asyncio.create_async_engine``: every keyword it accepts
    passes through. asyncgone's own keywords (see ``EngineOptions``) are validated here,
    before anything connects::

        engine = asyncgone.create_engine("mysql+asyncmy://app:secret@db/app")
        engine = asyncgone.create_engine(url, pool_size=20, ping_timeout=2.0)
        engine = asyncgone.create_engine()  # reads $DATABASE_URL

    Parameters:
        url: ``mysql+aiomysql://`` or ``mysql+asyncmy://`` (``mariadb+`` also works); a
            bare ``mysql://`` picks an installed driver; ``None`` reads ``$DATABASE_URL``.
        recycle, max_lifetime, ping_after, ping_timeout, connect_timeout, tcp_keepalive,
        kill_on_cancel: asyncgone's options, described on ``EngineOptions``.
        **kwargs: anything ``create_async_engine`` takes.

    Raises:
        ConfigurationError: the URL, the driver or an option is unusable; the message says
            what to change.
    """
    options, sa_kwargs = split_options(kwargs)
    resolved = resolve_url(url)
    connect_args = dict(sa_kwargs.pop("connect_args", None) or {})
    connect_timeout = _given_connect_timeout(resolved, connect_args)
    if connect_timeout is None:
        connect_timeout = connect_args["connect_timeout"] = options.connect_timeout
    reset_on_return = sa_kwargs.pop("pool_reset_on_return", _OURS)
    engine = create_async_engine(
        resolved,
        connect_args=connect_args,
        # asyncgone's reset listener decides when returning a connection needs a ROLLBACK.
        pool_reset_on_return=None if reset_on_return is _OURS else reset_on_return,
        **sa_kwargs,
    )
    counters = Counters()
    policy = ConnectionPolicy(
        options,
        counters,
        pool_recycle=sa_kwargs.get("pool_recycle"),
        connect_timeout=connect_timeout,
        reset_on_return=reset_on_return,
    )
    policy.install(engine.sync_engine)
    if needs_guard():
        guard_terminate(engine.sync_engine.dialect)
    if options.kill_on_cancel:
        killer = StatementKiller(
            counters, connect_timeout=connect_timeout, query_timeout=options.ping_timeout
        )
        killer.install(engine.sync_engine)
    register(engine.sync_engine, counters)
    return engine
