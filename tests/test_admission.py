"""The connect admission's own decisions: slots, backoff, classification, deadlines (the
behaviour against a server is in tests/chaos/test_admission.py)."""

from __future__ import annotations

import math
import time

import anyio
import pymysql
import pytest

from asyncgone._admission import Admission, connect_deadline, retry_until
from asyncgone._errors import is_refusal
from asyncgone._stats import Counters
from asyncgone._waits import Slots

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
    from asyncgone._connect_deadlines import _DEADLINE

    assert _DEADLINE.get() == math.inf
    with connect_deadline(100.0):
        with connect_deadline(200.0):
            assert _DEADLINE.get() == 100.0
        with connect_deadline(50.0):
            assert _DEADLINE.get() == 50.0
    assert _DEADLINE.get() == math.inf


async def test_slots_go_in_order_and_survive_cancelled_waiters() -> None:
    """First come, first served; a waiter cancelled while waiting leaves no trace."""
    slots = Slots(1)
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
    slots = Slots(1)
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
    """With the only slot taken by a slow attempt past ``turn_wait``, the next caller
    gives up with error 2003 naming max_connecting, without an attempt of its own."""
    gate = admission(retry_for=0.1, turn_wait=0.2)

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


@pytest.mark.parametrize("retry_for", [0.0, 0.2])
async def test_a_turn_is_waited_for_past_the_retry_window(retry_for: float) -> None:
    """Three callers for one slot, each attempt taking 0.3 s: nothing was refused, so the
    later callers wait for their turn (up to ``turn_wait``), also with retries off or a
    retry window shorter than the queue, and all get a connection."""
    gate = admission(retry_for=retry_for)
    got: list[str] = []

    async def slow() -> str:
        await anyio.sleep(0.3)
        return "connection"

    async def caller() -> None:
        got.append(await gate.connect(slow))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(caller)
    assert got == ["connection"] * 3


async def test_a_turn_is_waited_for_up_to_the_callers_own_deadline() -> None:
    """A caller never refused waits for its turn up to its cancel scope's deadline, not
    the shorter end that retries after a refusal keep (1.6 s into a 2 s scope): the slot
    comes free at 1.65 s and its connect is done at 1.66 s, within the scope."""
    gate = admission(retry_for=5.0)

    async def holder() -> str:
        await anyio.sleep(1.65)
        return "connection"

    async def quick() -> str:
        await anyio.sleep(0.01)
        return "connection"

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.connect, holder)
            await anyio.sleep(0.01)
            with anyio.fail_after(2.0):
                assert await gate.connect(quick) == "connection"


def full_server(times: list[float]) -> object:
    """A connect attempt that notes its time and meets a full server."""

    async def attempt() -> str:
        times.append(anyio.current_time())
        raise pymysql.err.OperationalError(1040, "Too many connections")

    return attempt


@pytest.fixture
def longest_backoffs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every backoff at its jitter's upper end: 0.1, 0.2, 0.4, 0.8 s, ... (capped at 2)."""
    monkeypatch.setattr(
        Admission, "backoff", lambda self: min(self.backoff_max, 0.1 * 2 ** min(self._streak, 30))
    )


def near(
    times: list[float], began: float, expected: list[float], *, last_at_end: bool = False
) -> bool:
    """Whether the tries came at the expected seconds, none early and none late by 0.15 s
    or more. Each backoff runs from the try before it, so each try is measured from the
    one before (a loaded machine's overshoots would add up); a last try at the retry
    window's end (``last_at_end``) is measured from ``began``, as the window is."""
    seen = [t - began for t in times]
    if len(seen) != len(expected):
        return False

    def on_time(got: float, want: float) -> bool:
        return want - 0.01 <= got <= want + 0.15

    chained = len(expected) - 1 if last_at_end else len(expected)
    steps = [(seen[0], expected[0])] + [
        (seen[i] - seen[i - 1], expected[i] - expected[i - 1]) for i in range(1, chained)
    ]
    if last_at_end:
        steps.append((seen[-1], expected[-1]))
    return all(on_time(got, want) for got, want in steps)


@pytest.mark.usefixtures("longest_backoffs")
async def test_a_last_try_comes_at_the_end_of_the_retry_window() -> None:
    """When the next backoff would pass the retry window, one last try comes at its end
    (tries at 0, 0.1, 0.3, 0.7 and 1.0 s), then the server's refusal is raised."""
    gate, times = admission(retry_for=1.0, max_connecting=None), []
    began = anyio.current_time()
    with anyio.fail_after(10), pytest.raises(pymysql.err.OperationalError) as info:
        await gate.connect(full_server(times))  # type: ignore[arg-type]
    assert info.value.args[0] == 1040
    assert near(times, began, [0.0, 0.1, 0.3, 0.7, 1.0], last_at_end=True), [
        t - began for t in times
    ]


@pytest.mark.usefixtures("longest_backoffs")
async def test_no_last_try_at_a_deadline_that_would_cut_it_short() -> None:
    """A cancel scope's deadline before the window's end gets no try at its very moment:
    the server's refusal is raised after the try at 0.7 s, not a timeout."""
    gate, times = admission(retry_for=5.0, max_connecting=None), []
    began = anyio.current_time()
    with pytest.raises(pymysql.err.OperationalError) as info, anyio.fail_after(1.0):
        await gate.connect(full_server(times))  # type: ignore[arg-type]
    assert info.value.args[0] == 1040
    assert near(times, began, [0.0, 0.1, 0.3, 0.7]), [t - began for t in times]


@pytest.mark.usefixtures("longest_backoffs")
async def test_a_slow_refusal_reaches_the_caller_before_its_scope_expires() -> None:
    """Refusals that take 0.25 s each (a busy machine) under a 1.6 s cancel scope: retries
    stop short of the scope (0.32 s, a fifth of it), so the caller gets the server's 1040
    after the try at 0.8 s, not a timeout from a try at 1.45 s that the scope cuts short."""
    gate, times = admission(retry_for=5.0, max_connecting=None), []
    refuse = full_server(times)

    async def slow_refusal() -> str:
        await anyio.sleep(0.25)
        return await refuse()  # type: ignore[operator, no-any-return]

    began = anyio.current_time()
    with pytest.raises(pymysql.err.OperationalError) as info, anyio.fail_after(1.6):
        await gate.connect(slow_refusal)
    assert info.value.args[0] == 1040
    assert near(times, began, [0.25, 0.6, 1.05]), [t - began for t in times]


@pytest.mark.usefixtures("longest_backoffs")
async def test_retry_until_extends_the_window_unless_retries_are_off() -> None:
    """``retry_until`` (``Database.start()``) retries past ``connect_retry``; with retries
    off (``connect_retry=None``: 0 s) the first refusal is still raised at once."""
    extended, times = admission(retry_for=0.2, max_connecting=None), []
    began = anyio.current_time()
    with retry_until(time.monotonic() + 1.0), pytest.raises(pymysql.err.OperationalError):
        await extended.connect(full_server(times))  # type: ignore[arg-type]
    assert near(times, began, [0.0, 0.1, 0.3, 0.7, 1.0], last_at_end=True), [
        t - began for t in times
    ]
    hasty, times = admission(retry_for=0.0, max_connecting=None), []
    with retry_until(time.monotonic() + 1.0), pytest.raises(pymysql.err.OperationalError):
        await hasty.connect(full_server(times))  # type: ignore[arg-type]
    assert len(times) == 1


async def test_while_the_server_refuses_one_attempt_at_a_time_probes_it() -> None:
    """After a refusal, attempts go one at a time (at most one in flight) until one
    succeeds; then they run ``max_connecting`` wide again."""
    gate = admission(max_connecting=3, retry_for=10.0, backoff_max=0.2)
    refusals = 4  # the server refuses this many attempts, then accepts
    in_flight = peak_refusing = peak_after = 0

    async def attempt() -> str:
        nonlocal refusals, in_flight, peak_refusing, peak_after
        in_flight += 1
        try:
            if refusals > 0:
                peak_refusing = max(peak_refusing, in_flight)
                await anyio.sleep(0.05)
                refusals -= 1
                raise pymysql.err.OperationalError(1040, "Too many connections")
            peak_after = max(peak_after, in_flight)
            await anyio.sleep(0.2)  # slow connects: the others overlap this one
            return "connection"
        finally:
            in_flight -= 1

    with anyio.fail_after(20):
        # The first refusal comes while only one attempt is in flight; six callers wait.
        with pytest.raises(pymysql.err.OperationalError), connect_deadline(time.monotonic()):
            await gate.connect(attempt)  # no retry: just the refusal
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(gate.connect, attempt)
    assert refusals == 0
    assert peak_refusing == 1
    assert peak_after == 3


@pytest.mark.usefixtures("longest_backoffs")
async def test_callers_that_were_refused_get_the_refusal_not_a_missed_turn() -> None:
    """Callers taking turns for one slot against a server that refuses them all each end
    with the server's own 1040, also one whose last turn never came before its deadline."""
    gate, times = admission(retry_for=1.0, max_connecting=1), []
    errors: list[int] = []

    async def caller() -> None:
        try:
            await gate.connect(full_server(times))  # type: ignore[arg-type]
        except pymysql.err.OperationalError as exc:
            errors.append(exc.args[0])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(caller)
    assert errors == [1040, 1040, 1040]
    assert gate._counters.connect_attempts == len(times) >= 3
