"""When a connect stops waiting: the retry window, a cancel scope's and run()'s deadlines.

A connect admitted by ``_admission`` waits for three things: a turn among the engine's
attempts in flight, the engine's backoff after refusals, and its own next try after a
refusal. Each wait ends at the earliest of the deadlines that apply to it (``Ends``): the
retry window (``connect_retry``, or a later end that ``Database.start()`` sets with
``retry_until``), the caller's anyio cancel scope, and a deadline ``Database.run()`` sets
with ``connect_deadline``; a turn is also waited for as long as a checkout may wait for a
connection (``pool_timeout``). Retries after a refusal of the caller's own end a little
before a cancel scope's deadline: the refusal, which says why the connect failed, must
reach the caller before the scope turns it into a bare timeout.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import NamedTuple

import anyio

__all__ = [
    "Ends",
    "connect_deadline",
    "ends",
    "retries_end",
    "retry_until",
    "under_connect_deadline",
]

# A cancel scope's or run()'s deadline less than this after the retry window's end leaves
# no room for a last try there, in seconds.
_LAST_TRY_ROOM = 1.0
# Retries end this long before a caller's cancel scope expires (or this share of the time
# the scope leaves, when less), in seconds: the server's refusal, which says why the
# connect failed, must reach the caller before the scope turns it into a bare timeout (a
# refused attempt and the backoff's sleep each take longer than planned on a busy machine).
_SCOPE_ROOM = 0.5
_SCOPE_SHARE = 0.2


# The deadline a caller such as Database.run() puts on the connects it causes, as a
# time.monotonic() value.
_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar(
    "asyncgone_connect_deadline", default=math.inf
)


# A later end of the retry window than connect_retry's (see retry_until), monotonic().
_RETRY_UNTIL = contextvars.ContextVar("asyncgone_retry_until", default=-math.inf)


@contextlib.contextmanager
def retry_until(when: float) -> Iterator[None]:
    """Within the block, connects retry refusals until ``when`` (``time.monotonic()``) even
    past ``connect_retry`` seconds, unless retries are off (``connect_retry=None``)."""
    token = _RETRY_UNTIL.set(when)
    try:
        yield
    finally:
        _RETRY_UNTIL.reset(token)


@contextlib.contextmanager
def connect_deadline(when: float) -> Iterator[None]:
    """Within the block, connects retry refusals until ``when`` (``time.monotonic()``) at the
    latest; for a caller (``Database.run()``) with a deadline of its own that is no cancel
    scope, and that tries again by itself (see the module docstring)."""
    token = _DEADLINE.set(min(when, _DEADLINE.get()))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def retries_end(now: float) -> float:
    """When retries under the caller's cancel scope must end, as a ``time.monotonic()``
    value (``now`` is the current one): ``_SCOPE_ROOM`` before the scope's deadline, or
    ``_SCOPE_SHARE`` of the time it leaves when less; ``math.inf`` without a deadline."""
    scope = anyio.current_effective_deadline()
    if scope == math.inf:
        return math.inf
    left = scope - anyio.current_time()  # on the event loop's clock
    return now + left - min(_SCOPE_ROOM, _SCOPE_SHARE * max(0.0, left))


def under_connect_deadline() -> bool:
    """Whether a caller such as ``Database.run()`` set a deadline (``connect_deadline``)."""
    return _DEADLINE.get() < math.inf


class Ends(NamedTuple):
    """When one caller's waits end, as ``time.monotonic()`` values."""

    #: Waiting for a slot while nothing was refused: ``turn_wait`` seconds or the retry
    #: window, whichever ends later, within the caller's deadlines.
    turn: float
    #: Waiting behind the engine's refusals (the probe, the backoff): the retry window.
    window: float
    #: Waiting after a refusal of the caller's own: the retry window, ending earlier than
    #: a cancel scope's deadline by ``_SCOPE_ROOM`` (or ``_SCOPE_SHARE`` of the time the
    #: scope has left, when less).
    retries: float
    #: Whether a last try fits at the window's end: not when a deadline comes within
    #: ``_LAST_TRY_ROOM`` of it (it would cut that try short).
    last_try: bool


def ends(now: float, retry_for: float, turn_wait: float) -> Ends:
    """The ends of a connect's waits that begins at ``now`` (``time.monotonic()``), for
    an engine that retries refusals for ``retry_for`` seconds (0: never) and lets a caller
    wait ``turn_wait`` seconds for its turn."""
    window = now + retry_for
    if retry_for > 0:
        window = max(window, _RETRY_UNTIL.get())
    hard = retries = _DEADLINE.get()
    scope = anyio.current_effective_deadline()
    if scope != math.inf:  # on the event loop's clock: make it a monotonic() time
        hard = min(hard, now + scope - anyio.current_time())
        retries = min(retries, retries_end(now))
    return Ends(
        turn=min(max(window, now + turn_wait), hard),
        window=min(window, hard),
        retries=min(window, retries),
        last_try=hard > window + _LAST_TRY_ROOM,
    )
