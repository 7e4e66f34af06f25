"""Session scopes grouped by request: what a client that hangs up must stop.

An integration opens a ``ScopeGroup`` for each request (``ScopeGroup.collecting()``); every
session scope opened in that context registers with it, including those opened by tasks
the request starts (tasks copy the context) and inside a streaming response's body
iterator. When the client hangs up before the response is complete, the integration cancels
the request and then calls ``abandon()``: every scope of the group still open gets its
running statements stopped on the server (``KILL QUERY``) and its task cancelled, so its own
cleanup returns or discards its connection. Nothing the request started keeps running for a
client that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

from ._waits import finish

if TYPE_CHECKING:
    from ._session import SessionScope

__all__ = ["ScopeGroup", "register"]

log = logging.getLogger("asyncgone")

_CURRENT: contextvars.ContextVar[ScopeGroup | None] = contextvars.ContextVar(
    "asyncgone_scope_group", default=None
)


def register(scope: SessionScope) -> None:
    """Record ``scope``, opened by the current task, in the current group, if any."""
    group = _CURRENT.get()
    if group is not None:
        group._members.append((scope, asyncio.current_task()))


class ScopeGroup:
    """The session scopes opened in one context and in the tasks it starts.

    ::

        group = ScopeGroup()
        with group.collecting():
            ...                                  # scopes opened here join the group
        stopped = await group.abandon()          # the client hung up
    """

    def __init__(self) -> None:
        self._members: list[tuple[SessionScope, asyncio.Task[object] | None]] = []

    @contextlib.contextmanager
    def collecting(self) -> Iterator[ScopeGroup]:
        """Make every scope opened in this context (and tasks started from it) join."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    def unfinished(self) -> list[SessionScope]:
        """The group's scopes that have not ended yet."""
        return [scope for scope, _ in self._members if not scope.finished]

    async def abandon(self, timeout: float, *, spare: Collection[asyncio.Task[Any]] = ()) -> int:
        """End every scope of the group still open, for a client that hung up.

        Scopes used by a running task (not the current one) get their statements stopped
        (``KILL QUERY``) and their task cancelled, and are waited for, at most ``timeout``
        seconds. Scopes nobody drives any more, such as one opened in a streaming body
        iterator that the framework left unfinished (until the garbage collector closes
        it), are rolled back and closed here. Scopes opened by a task in ``spare`` are left
        alone: a framework's own tasks meant to outlive the request (Quart's
        ``add_background_task``). Returns how many scopes were ended.
        """
        current = asyncio.current_task()
        members = [(scope, task) for scope, task in self._members if task not in spare]
        tasks: set[asyncio.Task[object]] = set()
        count = 0
        for scope, task in members:
            if scope.finished:
                continue
            count += 1
            scope.stop_statements()
            if task is not None and task is not current and not task.done():
                task.cancel("the client hung up")
                tasks.add(task)
        if tasks:
            with contextlib.suppress(TimeoutError):
                await finish(asyncio.wait(tasks), timeout, "abandoning a request's sessions")
        for scope, _ in members:
            if not scope.finished:  # its task is done, or was this one: nothing drives it
                await scope.rollback(ClientGone("the client hung up"))
        if count:
            log.info("ended %d session(s) of a request whose client hung up", count)
        return count


class ClientGone(ConnectionError):
    """The client of a request went away before its response was complete."""
