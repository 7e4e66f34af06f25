"""Let SQLAlchemy finish discarding a connection even when a cancellation interrupts it.

When a connection is invalidated (a disconnect, a statement interrupted by cancellation),
SQLAlchemy's asyncio dialects ``terminate()`` it: a graceful close, awaited, falling back to
a force close. A cancellation that arrives during that await (anyio's cancel scopes deliver
theirs again at every await; a second ``task.cancel()`` does too) makes ``terminate()``
force-close the socket and re-raise. SQLAlchemy before 2.0.55 lets that error abort the
invalidation half-way: the connection is never checked back in and its pool slot stays
taken until the garbage collector finds it ("The garbage collector is trying to clean up
non-checked-in connection"). Observed: every ``health(timeout=...)`` on a blackholed path
stranded one connection on SQLAlchemy 2.0.50 to 2.0.54; 2.0.55 completes the invalidation
in ``finally`` blocks.

On those older releases, ``guard_terminate()`` wraps the engine's dialect so that a
cancellation raised by ``terminate()``, after the socket is closed, is absorbed (see
``absorb_cancellation``): the pool's bookkeeping completes and the cancellation still
arrives.
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any

import sqlalchemy
from sqlalchemy.engine import Dialect

from ._waits import absorb_cancellation

__all__ = ["guard_terminate", "needs_guard"]


#: The first SQLAlchemy release that completes an invalidation interrupted by cancellation.
FIXED_IN = (2, 0, 55)


def needs_guard(version: str = sqlalchemy.__version__) -> bool:
    """Tell whether this SQLAlchemy release strands connections whose terminate is cancelled."""
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    return parts < FIXED_IN


def guard_terminate(dialect: Dialect) -> None:
    """Make ``dialect.do_terminate`` absorb, rather than raise, a cancellation."""
    terminate = dialect.do_terminate

    def do_terminate(dbapi_connection: Any) -> None:
        handling = sys.exc_info()[1]  # usually the error that got the connection invalidated
        try:
            terminate(dbapi_connection)
        except asyncio.CancelledError as cancelled:
            # terminate() force-closed the connection before re-raising: nothing is left
            # to clean up, only the cancellation to deliver.
            absorb_cancellation(cancelled, handling)

    # The dialect instance belongs to this engine alone: create_async_engine makes one each.
    dialect.do_terminate = do_terminate  # type: ignore[method-assign]
