"""Every use of SQLAlchemy's, anyio's and pytest-asyncio's private state, in one place.

asyncgone uses documented API wherever one exists. What follows has none, so each piece is
guarded by a check of the object's shape or behaviour (never a version number), and says
what happens when that check fails. ``docs/architecture.md`` lists them with the versions
tested.

- SQLAlchemy's ``QueuePool`` idle queue and record reconnection, for the keepalive, which
  visits idle connections without checking them out (no public API reaches them): without
  that shape the keepalive does nothing and says so once.
- SQLAlchemy's ``Pool._do_get`` (take a record for a checkout) and
  ``_ConnectionRecord._checkin_failed``, for the checkout check, which runs inside the first
  (``checking_pool_class``); a pool without them is checked through the documented
  ``checkout`` event instead, at about 10 000 more instructions per checkout. With
  QueuePool's ``_do_return_conn`` and ``_dec_overflow`` also a return step that may close
  an overflow connection for good, as QueuePool's own does when the pool is full
  (``_giveback``); without them nothing is given back. The asyncio pool's idle queue is
  also taken from and put back into directly (``_takes_directly``), where its shape allows.
- a pooled connection's record (``_ConnectionFairy._connection_record``), for the return
  path's per-connection state: without it every return rolls back.
- anyio's cancel scopes: whether a cancellation will be delivered again by the scope that
  caused it, decided from anyio's documented ``current_effective_deadline()``.
- pytest-asyncio's per-scope runner fixtures and anyio's pytest runner, for the pytest
  plugin's fixtures that must run in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from sqlalchemy.engine import URL
from sqlalchemy.pool import ConnectionPoolEntry, Pool, QueuePool
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util.queue import AsyncAdaptedQueue

__all__ = [
    "CHECK_ATTRIBUTE",
    "FAIRY_CHECKOUTS",
    "FAIRY_RECORD",
    "GIVE_BACK_ATTRIBUTE",
    "can_keep",
    "checking_pool_class",
    "default_pool_class",
    "drop_closed_loop_socket",
    "give_back",
    "idle_records",
    "max_overflow",
    "open_idle",
    "reconnect",
    "returning_to_pool",
    "scope_will_redeliver",
    "set_max_overflow",
    "statement_done",
    "statement_running",
    "take_idle",
    "test_loop_runner",
]

log = logging.getLogger("asyncgone")

# -- SQLAlchemy: the QueuePool's idle queue ---------------------------------------------------
#
# QueuePool keeps idle records in ``_pool`` (sqlalchemy.util.queue: get_nowait() raises
# Empty, put(item, False) never blocks), returns one with ``_do_return_conn`` (which closes
# it when the queue is full), admits a new connection with ``_inc_overflow`` (False beyond
# pool_size + max_overflow) and opens it with ``_create_connection``; a record reconnects
# with ``get_connection()`` (SQLAlchemy 2.0 and 2.1 alike).

_POOL_SHAPE = ("_pool", "_do_return_conn", "_inc_overflow", "_dec_overflow", "_create_connection")
_QUEUE_SHAPE = ("get_nowait", "qsize")
_warned: set[type] = set()


def can_keep(pool: QueuePool) -> bool:
    """Whether the keepalive can reach this pool's idle connections (warn once if not)."""
    queue = getattr(pool, "_pool", None)
    if all(hasattr(pool, name) for name in _POOL_SHAPE) and all(
        hasattr(queue, name) for name in _QUEUE_SHAPE
    ):
        return True
    if type(pool) not in _warned:
        _warned.add(type(pool))
        log.warning(
            "the keepalive cannot reach the idle connections of %s (this SQLAlchemy's pool "
            "is shaped differently); it does nothing, and checkouts still check every "
            "connection",
            type(pool).__name__,
        )
    return False


def take_idle(pool: QueuePool) -> ConnectionPoolEntry | None:
    """Take one idle record out of the pool without waiting, or None if there is none."""
    try:
        record: ConnectionPoolEntry = pool._pool.get_nowait()
    except Exception:  # sqlalchemy.util.queue.Empty
        return None
    return record


def give_back(pool: QueuePool, record: ConnectionPoolEntry) -> None:
    """Return a record taken with ``take_idle`` (a waiting user gets it at once)."""
    pool._do_return_conn(record)


def max_overflow(pool: QueuePool) -> int | None:
    """The pool's ``max_overflow``; None when unlimited or when the pool keeps it elsewhere.

    QueuePool keeps it only in ``_max_overflow`` (SQLAlchemy 2.0 and 2.1; -1: unlimited).
    """
    overflow = getattr(pool, "_max_overflow", None)
    return overflow if isinstance(overflow, int) and overflow >= 0 else None


def set_max_overflow(pool: QueuePool, value: int) -> bool:
    """Change the pool's ``max_overflow`` to ``value`` (at least 0) while it runs; False when
    the pool keeps no such limit (then nothing changes).

    QueuePool reads ``_max_overflow`` at every checkout that finds no idle connection: at
    the limit, the checkout waits for one to be returned (up to ``pool_timeout``) instead of
    opening one. Connections already open stay; ``recreate()`` copies the value.
    """
    if max_overflow(pool) is None or value < 0:
        return False
    pool._max_overflow = value
    return True


def idle_records(pool: QueuePool) -> list[ConnectionPoolEntry]:
    """A snapshot of the pool's idle records, not taken out of it (empty if unknown)."""
    queue = getattr(getattr(pool, "_pool", None), "_queue", None)
    items = getattr(queue, "_queue", None)  # the asyncio.Queue's deque
    return list(items) if items is not None else []


def open_idle(pool: QueuePool) -> ConnectionPoolEntry | None:
    """Open one connection for the idle queue; None when the pool is full.

    Runs in SQLAlchemy's greenlet. It does what a checkout that opens a connection does:
    take a slot and open the connection (which fires the connect events). ``give_back``
    then hands it to the idle queue, which gives it at once to a user waiting for a
    connection, or closes it and frees the slot if the queue is full.
    """
    if not pool._inc_overflow():
        return None
    try:
        record: ConnectionPoolEntry = pool._create_connection()
    except BaseException:
        pool._dec_overflow()
        raise
    return record


def reconnect(record: ConnectionPoolEntry) -> None:
    """Open a new connection in a record whose connection was closed (in the greenlet)."""
    record.get_connection()  # type: ignore[attr-defined]


# -- SQLAlchemy: the pool's own checkout ---------------------------------------------------

#: The attribute of SQLAlchemy's pooled connection (``_ConnectionFairy``) that holds its
#: pool record (2.0 and 2.1); read by name on the return path (``_reset.do_rollback``).
FAIRY_RECORD = "_connection_record"
#: Its checkout count (see ``returning_to_pool``), read inline on the return path.
FAIRY_CHECKOUTS = "_counter"


def default_pool_class(url: URL) -> type[Pool]:
    """The pool class ``create_async_engine(url)`` would use (the async dialect's own)."""
    dialect: Any = url.get_dialect()
    if not dialect.is_async:
        dialect = dialect.get_async_dialect_cls(url)
    pool_class: type[Pool] = dialect.get_pool_class(url)
    return pool_class


#: The attribute of an engine's dialect that holds its checkout check (see
#: ``checking_pool_class``): the pool reaches its dialect as ``_dialect``, also after
#: ``Engine.dispose()`` recreates it.
CHECK_ATTRIBUTE = "_asyncgone_checkout_check"

#: The dialect attribute a checking QueuePool's returns ask, while it is set (``_giveback``).
GIVE_BACK_ATTRIBUTE = "_asyncgone_give_back"

_checking_classes: dict[type[Pool], type[Pool] | None] = {}


def _takes_directly(base: type[Pool]) -> bool:
    """Whether the checking subclass of ``base`` takes and returns idle records itself.

    SQLAlchemy's ``AsyncAdaptedQueuePool`` keeps them in an ``asyncio.Queue`` (``LifoQueue``
    with ``pool_use_lifo``) made on first use (``AsyncAdaptedQueue._queue``), reached through
    16 calls per unit of work. The subclass does what ``get_nowait()`` and ``put_nowait()``
    do on its storage (``_queue``), ``_maxsize`` and waiting getters (``_getters``, woken
    with ``_wakeup_next``), Python 3.10 to 3.13 alike, but for what SQLAlchemy never uses
    (putters, unfinished tasks). An empty or full queue, a checkout while others wait
    (SQLAlchemy 2.0 lets a woken waiter go first on Python 3.10 and 3.11) and a pool class
    with its own ``_do_get`` or ``_do_return_conn`` take SQLAlchemy's own steps.
    """
    if (
        getattr(base, "_queue_class", None) is not AsyncAdaptedQueue
        or getattr(base, "_do_get", None) is not QueuePool._do_get
        or getattr(base, "_do_return_conn", None) is not QueuePool._do_return_conn
    ):
        return False  # another queue, or an application's own steps: those run
    try:
        fifo: Any = AsyncAdaptedQueue(1)._queue
        lifo: Any = AsyncAdaptedQueue(1, use_lifo=True)._queue
    except Exception:
        return False
    return (
        type(fifo) is asyncio.Queue
        and type(getattr(fifo, "_queue", None)) is collections.deque
        and type(lifo) is asyncio.LifoQueue
        and type(getattr(lifo, "_queue", None)) is list
        and all(
            type(getattr(queue, "_getters", None)) is collections.deque
            and getattr(queue, "_maxsize", None) == 1
            and callable(getattr(queue, "_wakeup_next", None))
            for queue in (fifo, lifo)
        )
    )


def checking_pool_class(base: type[Pool]) -> type[Pool] | None:
    """A subclass of the pool class ``base`` whose checkouts run the check its dialect
    holds (``CHECK_ATTRIBUTE``: ``check(pool, record, began)``) on the record taken for
    them, or None when ``base`` lacks the private steps it needs.

    Every checkout takes its record through ``Pool._do_get()`` before SQLAlchemy's
    pre-ping and ``checkout`` event, and then opens the record's connection if it has none
    (``get_connection()``). The check runs in between, in SQLAlchemy's greenlet, and gets
    ``began``, the ``time.monotonic()`` from before the record was taken: a connection
    opened after it was opened for this very checkout. It replaces a connection by
    invalidating the record; if it raises (a cancellation during a ping), the record goes
    back to the pool, invalidated, as SQLAlchemy does for a failed ``checkout`` event.

    One subclass per pool class, shared by every engine: SQLAlchemy's code that reads pool
    attributes stays specialised for one type (a class per engine made each checkout of a
    process with 20 engines about 8 µs slower). It keeps the name and module of ``base``,
    so the pool logs under SQLAlchemy's usual logger name. It is meant for
    ``create_async_engine(poolclass=...)``: assigning it to an existing pool's ``__class__``
    makes every attribute access on that pool slower (CPython 3.13 turns the instance's
    inline attribute values into a dictionary).

    For a QueuePool, returns also ask the dialect's ``GIVE_BACK_ATTRIBUTE``, when it is not
    None, ``give_back(pool)``: true closes the returning connection for good, one connection
    fewer in the pool (``_giveback``).
    """
    if base in _checking_classes:
        return _checking_classes[base]
    do_get = getattr(base, "_do_get", None)
    if do_get is None or not hasattr(_ConnectionRecord, "_checkin_failed"):
        _checking_classes[base] = None
        return None
    monotonic = time.monotonic
    direct = _takes_directly(base)

    def _do_get(self: Any) -> ConnectionPoolEntry:
        began = monotonic()
        record: ConnectionPoolEntry
        if direct and not (queue := (idle := self._pool)._queue)._getters and queue._queue:
            # An idle record, taken as the queue's get_nowait() would (see _takes_directly);
            # with checkouts waiting, SQLAlchemy's own step decides who gets it.
            record = queue._queue.pop() if idle.use_lifo else queue._queue.popleft()
        else:
            record = do_get(self)
        # CHECK_ATTRIBUTE read as a plain attribute, which CPython specialises: getattr()
        # would look the name up on the dialect's class at every checkout.
        try:
            check = self._dialect._asyncgone_checkout_check
        except AttributeError:
            return record  # not an asyncgone engine's dialect (yet): nothing to check
        try:
            check(self, record, began)
        except BaseException as error:
            record._checkin_failed(error, _fairy_was_created=False)  # type: ignore[attr-defined]
            raise
        return record

    namespace: dict[str, Any] = {
        "_do_get": _do_get,
        "__module__": base.__module__,
        "__doc__": base.__doc__,
    }
    do_return = getattr(base, "_do_return_conn", None)
    if do_return is not None and hasattr(base, "_dec_overflow"):

        def _do_return_conn(self: Any, record: ConnectionPoolEntry) -> None:
            try:  # GIVE_BACK_ATTRIBUTE, as a plain attribute (see _do_get)
                give_back = self._dialect._asyncgone_give_back
            except AttributeError:
                give_back = None
            if give_back is None or not give_back(self):
                if direct:
                    idle = self._pool._queue
                    items = idle._queue
                    if idle._maxsize <= 0 or len(items) < idle._maxsize:
                        # As the queue's put_nowait() would, a waiting checkout woken.
                        items.append(record)
                        if idle._getters:
                            idle._wakeup_next(idle._getters)
                        return
                do_return(self, record)  # full: QueuePool closes it
                return
            # Closed for good, as QueuePool does with a connection that finds it full; the
            # count first, as closing may wait (COM_QUIT) while other returns ask.
            self._dec_overflow()
            record.close()

        namespace["_do_return_conn"] = _do_return_conn
    checking: type[Pool] = type(base.__name__, (base,), namespace)
    _checking_classes[base] = checking
    return checking


# -- SQLAlchemy: a pooled connection on its way back ----------------------------------------


def returning_to_pool(pooled: Any) -> bool:
    """Whether a pooled connection (SQLAlchemy's ``_ConnectionFairy``) is being returned:
    its checkout count, ``_counter``, is 0 while the pool resets it, and at least 1 while a
    ``Connection`` uses it (SQLAlchemy 2.0 and 2.1). Unknown: False, so a rollback counts
    as the application's own."""
    return getattr(pooled, FAIRY_CHECKOUTS, 1) == 0


# -- SQLAlchemy: the async adapters' statement lock --------------------------------------------


def statement_running(adapted: Any) -> bool:
    """Whether a statement runs on an adapted connection right now (see ``statement_done``)."""
    mutex = getattr(adapted, "_execute_mutex", None)
    return isinstance(mutex, asyncio.Lock) and mutex.locked()


async def statement_done(adapted: Any) -> None:
    """Wait until no statement runs on an adapted (DBAPI-level) connection.

    SQLAlchemy's asyncio adapters (2.0 and 2.1) serialise statements on a connection with
    an ``asyncio.Lock`` in ``_execute_mutex``; acquiring it waits for the one in flight.
    Without that shape there is nothing to wait on, and the caller goes ahead.
    """
    mutex = getattr(adapted, "_execute_mutex", None)
    if isinstance(mutex, asyncio.Lock):
        async with mutex:
            pass


# -- anyio: cancel scopes ---------------------------------------------------------------------


def scope_will_redeliver() -> bool:
    """Whether an anyio cancel scope around the current task is cancelled, and so delivers
    its cancellation again at the task's next await inside it.

    anyio documents ``current_effective_deadline()`` as ``-inf`` when the current scope has
    been cancelled; outside anyio's scopes (a plain ``task.cancel()``), or when no event
    loop anyio knows runs, the answer is False.
    """
    try:
        return anyio.current_effective_deadline() == -math.inf
    except Exception:  # not inside an anyio-compatible task
        return False


# -- pytest-asyncio and anyio's pytest plugin: the test's own event loop ------------------------


def test_loop_runner(request: Any, stack: contextlib.ExitStack) -> Callable[[Awaitable[Any]], Any]:
    """Return a function that runs an awaitable in the event loop of the requesting test.

    Raises ``LookupError`` with what to do when the test is not async or when the installed
    plugin offers no such runner.
    """
    if "anyio_backend" in request.fixturenames:
        from anyio.pytest_plugin import extract_backend_and_options, get_runner

        name, options = extract_backend_and_options(request.getfixturevalue("anyio_backend"))
        runner = stack.enter_context(get_runner(name, options))
        return lambda aw: runner.run_fixture(_await, {"awaitable": aw})
    marker = request.node.get_closest_marker("asyncio")
    if marker is None:
        raise LookupError(
            f"{request.fixturename} needs an async test: mark it with @pytest.mark.asyncio "
            f"(pytest-asyncio) or @pytest.mark.anyio (anyio)"
        )
    scope = (
        marker.kwargs.get("loop_scope")
        or marker.kwargs.get("scope")
        or request.config.getini("asyncio_default_test_loop_scope")
        or "function"
    )
    # pytest-asyncio 1.1 and later keep an asyncio.Runner per loop scope in the fixture
    # _<scope>_scoped_runner; 1.0 kept the loop itself in _<scope>_event_loop.
    import pytest

    scoped: Any
    try:
        scoped = request.getfixturevalue(f"_{scope}_scoped_runner")
    except pytest.FixtureLookupError:
        scoped = None
    if callable(getattr(scoped, "run", None)):
        return lambda aw: scoped.run(_await(aw))
    try:
        loop = request.getfixturevalue(f"_{scope}_event_loop")
    except pytest.FixtureLookupError:
        loop = None
    if isinstance(loop, asyncio.AbstractEventLoop):
        return lambda aw: loop.run_until_complete(_await(aw))
    raise LookupError(
        "asyncgone's async fixtures need pytest-asyncio 1.0 or later (or anyio's pytest "
        "plugin): this pytest-asyncio keeps its event loops where asyncgone cannot find them"
    )


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def drop_closed_loop_socket(transport: Any) -> None:
    """Close the socket of an asyncio selector transport whose loop is closed.

    Every transport method would call into the closed loop and fail; the transport keeps its
    socket in ``_sock`` and warns about it when collected unless that is None, and a
    ``StreamWriter`` over it warns unless ``is_closing()`` (``_closing``) says so. uvloop's
    transports have no ``_sock``: uvloop closes them itself when its loop closes.
    """
    sock = getattr(transport, "_sock", None)
    if sock is None:
        return
    transport._closing = True
    transport._sock = None
    sock.close()


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop, or None outside one (e.g. a garbage-collector finalizer)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
