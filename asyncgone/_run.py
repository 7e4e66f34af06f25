"""The unit-of-work runner behind ``Database.run()``: replay only what cannot apply twice.

A unit of work runs in a fresh session scope and is committed by the scope. It is run
again, after a jittered backoff, only when it failed and left nothing behind: a disconnect
before COMMIT was sent (the server rolled the transaction back), a refusal by the server
(a COMMIT refused by a server turned read-only, or by a Galera node that may not serve,
1047), or an error code the caller lists (deadlock, lock wait timeout; a Galera
certification failure is a 1213 at COMMIT or at the next statement, and nothing of the
transaction committed). While no connection can be had at all, the runner waits, up to its
deadline. A connection lost while COMMIT was in flight is never replayed:
``CommitOutcomeUnknown``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import anyio
from sqlalchemy.ext.asyncio import AsyncSession

from ._config import RunOptions
from ._connect_deadlines import connect_deadline, retries_end
from ._errors import (
    CommitOutcomeUnknown,
    DatabaseUnavailable,
    add_note,
    describe,
    error_code,
    is_disconnect,
    is_node_not_ready,
    is_read_only_refusal,
    is_unavailable,
)
from ._session import SessionScope, commits
from ._stats import Counters

__all__ = ["run_unit"]

log = logging.getLogger("asyncgone")

_T = TypeVar("_T")

# Full-jitter exponential backoff between attempts: 50 ms, 100 ms, ... capped at 1 s.
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 1.0


def backoff(attempt: int) -> float:
    """A full-jitter exponential backoff delay for the given attempt, in seconds."""
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))


async def run_unit(
    open_scope: Callable[[], SessionScope],
    work: Callable[[AsyncSession], Awaitable[_T]],
    options: RunOptions,
    counters: Counters,
    target: str,
    replayable: Callable[[SessionScope], bool] | None = None,
) -> _T:
    """Run ``work`` as ``Database.run()`` documents; ``target`` is the masked URL.

    ``replayable`` tells whether an attempt's session ran where nothing can have been
    written (a replica engine, whose sessions are read-only): a COMMIT lost in flight there
    committed nothing and is replayed. Anywhere else it raises ``CommitOutcomeUnknown``."""
    started = time.monotonic()
    # The caller's cancel scope, when sooner, ends the waits a little before it expires:
    # DatabaseUnavailable, naming the last error, must reach the caller before the scope
    # turns the wait into a bare timeout.
    give_up_at = min(started + options.deadline, retries_end(started))
    failures = waits = 0
    scope: SessionScope | None = None
    while True:
        connected = False
        work_commits = (0, 0)
        try:
            scope = open_scope()
            async with scope as session:
                # A working connection, or an error here; a connect the server refuses is
                # retried (_admission) no later than this run's own deadline.
                with connect_deadline(give_up_at):
                    await session.connection()
                connected = True
                try:
                    return await work(session)
                finally:
                    work_commits = commits(session)  # before the scope's own COMMIT
        except Exception as exc:
            # Work whose session was read-only (a replica's) committed nothing, whatever
            # became of its COMMIT: replayed like a disconnect. Any other work's is never
            # replayed, read_only=True or not: the caller's word is no guarantee.
            lost_commit = isinstance(exc, CommitOutcomeUnknown)
            if lost_commit and (scope is None or replayable is None or not replayable(scope)):
                raise  # counted by the session that raised it
            if work_commits != (0, 0):
                # work committed (part of) itself: replaying would apply that part twice.
                _unreplayable(exc, work_commits, counters, target)
            now = time.monotonic()
            if not connected:
                if not is_unavailable(exc):
                    raise
                if now >= give_up_at:
                    counters.unavailable += 1
                    raise DatabaseUnavailable(
                        f"no working connection to {target} within "
                        f"{_budget(started, give_up_at, options.deadline)}; "
                        f"last error: {describe(exc)}"
                    ) from exc
                waits += 1
                delay = backoff(min(waits, 5))
            else:
                failures += 1
                retryable = (
                    lost_commit or is_disconnect(exc) or error_code(exc) in options.retry_codes
                )
                if not retryable or failures >= options.attempts or now >= give_up_at:
                    raise
                counters.replays += 1
                delay = backoff(failures)
                log.info(
                    "replaying a unit of work after %s (attempt %d of %d)",
                    describe(exc),
                    failures + 1,
                    options.attempts,
                )
            await anyio.sleep(min(delay, max(0.0, give_up_at - now)))


def _budget(started: float, give_up_at: float, deadline: float) -> str:
    """The time the runner had, as its error message says it."""
    if give_up_at >= started + deadline:
        return f"{deadline:g} s"
    return f"{round(max(0.0, give_up_at - started), 1):g} s (the caller's cancel scope)"


def _unreplayable(
    exc: Exception, work_commits: tuple[int, int], counters: Counters, target: str
) -> NoReturn:
    """Raise for a unit of work that failed after committing inside ``work``."""
    begun, done = work_commits
    refused = is_read_only_refusal(exc) or is_node_not_ready(exc)
    if begun > done and is_disconnect(exc) and not refused:
        counters.commit_outcome_unknown += 1
        raise CommitOutcomeUnknown(
            f"the connection to {target} was lost while a COMMIT issued by the unit of work "
            f"itself was in flight: it may or may not have been committed, and asyncgone "
            f"will not replay it. Check the data before running this work again, and leave "
            f"the COMMIT to run()."
        ) from exc
    add_note(
        exc,
        "asyncgone: not replayed, because the unit of work had already committed part of "
        "itself (leave the COMMIT to run() to make it replayable)",
    )
    raise exc
