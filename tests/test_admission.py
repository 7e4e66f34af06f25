"""The connect admission's own decisions: slots, backoff, classification, deadlines (the
behaviour against a server is in tests/chaos/test_admission.py)."""

from __future__ import annotations

import math

import anyio
import pymysql
import pytest

from asyncgone._admission import Admission, _Slots, connect_deadline, is_refusal
from asyncgone._stats import Counters

pytestmark = pytest.mark.anyio


def admission(**kwargs: object) -> Admission:
    options: dict[str, object] = {
        "max_connecting": 1,
        "retry_for": 0.0,
        "backoff_max": 2.0,
        "counters": Counters(),
        "error": pymysql.err.OperationalError,
    }
    options.update(kwargs)
    return Admission(**options)  # type: ignore[arg-type]


def refused(code: int, cause: BaseException | None = None) -> BaseException:
    """The driver's error as raised from a failed socket connect."""
    error = pymysql.err.OperationalError(code, "Can't connect to MySQL server")
    error.__cause__ = cause if cause is not None else ConnectionRefusedError(111, "refused")
    return error


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (pymysql.err.OperationalError(1040, "Too many connections"), True),
        (pymysql.err.OperationalError(1203, "User app already has more than ..."), True),
        (pymysql.err.OperationalError(1129, "Host is blocked"), True),
        (refused(2003), True),
        (refused(2002, FileNotFoundError(2, "No such file or directory")), True),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (pymysql.err.OperationalError(2003, "no server greeting within 5 s"), False),
        (refused(2003, TimeoutError()), False),
        (pymysql.err.OperationalError(1045, "Access denied"), False),
        (pymysql.err.OperationalError(1049, "Unknown database"), False),
        (ValueError("bad ssl settings"), False),
    ],
)
def test_refusals_are_what_waiting_cures(error: BaseException, refused: bool) -> None:
    """A full server, a blocked host and a refused socket connect; not a host that never
    answers, nor errors that waiting does not cure."""
    assert is_refusal(error) is refused


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    """Each delay lies between half and all of 0.1 s x 2^streak, never above the cap."""
    gate = admission(backoff_max=1.0)
    for streak in range(8):
        gate._streak = streak
        ceiling = min(1.0, 0.1 * 2**streak)
        delays = [gate.backoff() for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)


def test_connect_deadlines_nest_to_the_earliest() -> None:
    from asyncgone._admission import _DEADLINE

    assert _DEADLINE.get() == math.inf
    with connect_deadline(100.0):
        with connect_deadline(200.0):
            assert _DEADLINE.get() == 100.0
        with connect_deadline(50.0):
            assert _DEADLINE.get() == 50.0
    assert _DEADLINE.get() == math.inf


async def test_slots_go_in_order_and_survive_cancelled_waiters() -> None:
    """First come, first served; a waiter cancelled while waiting leaves no trace."""
    slots = _Slots(1)
    await slots.acquire()
    order: list[str] = []

    async def wait(name: str) -> None:
        await slots.acquire()
        order.append(name)
        slots.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, "a")
        await anyio.sleep(0.01)
        async with anyio.create_task_group() as inner:
            inner.start_soon(wait, "gives up")
            await anyio.sleep(0.01)
            inner.cancel_scope.cancel()
        tg.start_soon(wait, "b")
        await anyio.sleep(0.01)
        slots.release()
    assert order == ["a", "b"]
    assert slots.waiting == 0
    await slots.acquire()  # the slot came back


async def test_a_slot_handed_to_a_waiter_being_cancelled_is_passed_on() -> None:
    """The slot is released to a waiter that is cancelled before it runs: whether the
    cancellation or the slot wins, the next waiter gets the slot after it and none is lost."""
    slots = _Slots(1)
    await slots.acquire()
    order: list[str] = []
    doomed = anyio.CancelScope()

    async def wait(name: str, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            await slots.acquire()
            order.append(name)
            slots.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, "doomed", doomed)
        await anyio.sleep(0.01)
        tg.start_soon(wait, "next")
        await anyio.sleep(0.01)
        slots.release()  # handed to the first waiter...
        doomed.cancel()  # ...cancelled before it could run
    assert order[-1] == "next"
    assert order in (["next"], ["doomed", "next"])
    assert slots.waiting == 0
    await slots.acquire()


async def test_a_caller_that_gets_no_slot_in_time_gets_the_drivers_2003() -> None:
    """With the only slot taken by a slow attempt past the retry window, the next caller
    gives up with error 2003 naming max_connecting, without an attempt of its own."""
    gate = admission(retry_for=0.2)

    async def slow() -> str:
        await anyio.sleep(1.0)
        return "connection"

    async def quick() -> str:
        return "connection"

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.connect, slow)
            await anyio.sleep(0.05)
            with pytest.raises(pymysql.err.OperationalError, match="max_connecting=1") as info:
                await gate.connect(quick)
    assert info.value.args[0] == 2003
    assert gate._counters.connect_attempts == 1
