"""Keywords for ``AsyncSession``, checked where they are given, before any session opens.

``Database(session_options=...)``, ``Database.session(**options)`` and
``managed_session(**options)`` hand their keywords to ``AsyncSession`` (and through it to
the ``Session`` class, ``sync_session_class``), which would refuse a misspelt one only when
the first session opens, in the middle of a request. They are checked against the
signatures of the two classes when given; a ``Session`` subclass of the application's that
takes any keyword (``**kwargs``) is trusted.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ._errors import ConfigurationError

__all__ = ["check_session_options"]

# The keywords an AsyncSession over each Session class takes, once worked out.
_KEYWORDS: dict[type[Session], frozenset[str] | None] = {}


def _session_keywords(session_class: type[Session]) -> frozenset[str] | None:
    """The keywords an ``AsyncSession`` over ``session_class`` takes (None: any)."""
    if session_class in _KEYWORDS:
        return _KEYWORDS[session_class]
    keywords = _KEYWORDS[session_class] = _keywords_of(session_class)
    return keywords


def _keywords_of(session_class: type[Session]) -> frozenset[str] | None:
    accepted: set[str] = set()
    for function in (AsyncSession.__init__, session_class.__init__):
        parameters = inspect.signature(function).parameters.values()
        accepted.update(p.name for p in parameters if p.kind is not p.VAR_KEYWORD)
        if function is not AsyncSession.__init__ and any(
            p.kind is p.VAR_KEYWORD for p in parameters
        ):
            return None  # a Session subclass of the application's that takes anything
    return frozenset(accepted - {"self"})


def check_session_options(options: Mapping[str, Any]) -> None:
    """Check ``AsyncSession`` keywords before any session is made.

    Raises:
        ConfigurationError: a keyword the session (or its ``sync_session_class``) does not
            take, with the nearest one it does.
    """
    if "bind" in options:
        raise ConfigurationError(
            "session options cannot give bind=: asyncgone binds each session to its engine"
        )
    session_class = options.get("sync_session_class") or Session  # None: SQLAlchemy's
    if not isinstance(session_class, type) or not issubclass(session_class, Session):
        raise ConfigurationError(
            f"sync_session_class must be a subclass of sqlalchemy.orm.Session, got "
            f"{session_class!r}"
        )
    accepted = _session_keywords(session_class)
    if accepted is None:
        return
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(
                f"{key!r} is not a keyword AsyncSession takes{hint}: session options go to "
                f"sqlalchemy.ext.asyncio.AsyncSession"
            )
