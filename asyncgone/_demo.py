"""``asyncgone demo``: plain SQLAlchemy and asyncgone side by side, through the same faults."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ._engine import create_engine
from ._errors import describe, error_code
from ._state import stats
from ._waits import bounded
from .testing import FaultProxy

__all__ = ["Outcome", "run_demo"]

_HANG_LIMIT = 5.0  # how long the demo lets plain SQLAlchemy hang on a blackholed connection
_IDLE_BEFORE_BLACKHOLE = 1.1  # past ping_after=1, so asyncgone pings at the next checkout
_TICK = 1.0  # seconds between the dots that show a long wait is a wait, not a hang
_LEGEND = (
    "Each fault hits an idle pooled connection of plain SQLAlchemy and of asyncgone alike;\n"
    "then each engine runs one query. 'ok in N s' is how long that first query after the\n"
    "fault took, from asking the pool for a connection to the result (a dead connection's\n"
    "replacement included)."
)


@dataclasses.dataclass
class Outcome:
    fault: str
    plain: str
    asyncgone: str


async def _unit(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def _thread_id(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT CONNECTION_ID()"))).scalar_one())


async def _attempt(engine: AsyncEngine) -> str:
    """Run one unit of work; describe how it went."""
    started = time.monotonic()
    try:
        await bounded(_unit(engine), _HANG_LIMIT)
    except TimeoutError:
        return f"hung; gave up after {_HANG_LIMIT:g} s"
    except Exception as exc:
        code = error_code(exc)
        return f"failed ({code})" if code else f"failed: {describe(exc)[:60]}"
    elapsed = time.monotonic() - started
    replaced = stats(engine).replaced if _is_ours(engine) else {}
    how = f", replaced: {', '.join(replaced)}" if replaced else ""
    return f"ok in {elapsed:.2f} s{how}"


def _is_ours(engine: AsyncEngine) -> bool:
    try:
        stats(engine)
    except TypeError:
        return False
    return True


async def _side_by_side(
    fault: str,
    url: URL,
    out: TextIO,
    break_it: Callable[[AsyncEngine, AsyncEngine], Awaitable[None]],
    *,
    waiting: str | None = None,
    **options: Any,
) -> Outcome:
    """Warm one connection on each engine, break both the same way, then use them.

    ``waiting`` announces a long wait; a dot every ``_TICK`` seconds then shows it going on.
    """
    out.write(f"  {fault} ...")
    if waiting:
        out.write(f" {waiting}")
    out.flush()
    plain = create_async_engine(url, pool_size=1, **options.get("sqlalchemy", {}))
    ours = create_engine(url, pool_size=1, **options.get("asyncgone", {}))
    ticker = asyncio.ensure_future(_tick(out)) if waiting else None
    try:
        await asyncio.gather(_unit(plain), _unit(ours))
        await break_it(plain, ours)
        plain_result, our_result = await asyncio.gather(_attempt(plain), _attempt(ours))
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        await asyncio.gather(_dispose(plain), _dispose(ours))
    out.write(f" SQLAlchemy: {plain_result} | asyncgone: {our_result}\n")
    out.flush()
    return Outcome(fault, plain_result, our_result)


async def _tick(out: TextIO) -> None:
    """Write a dot every ``_TICK`` seconds until cancelled."""
    while True:
        await asyncio.sleep(_TICK)
        out.write(".")
        out.flush()


async def _dispose(engine: AsyncEngine) -> None:
    # A connection the demo broke may not close cleanly; the process ends soon anyway.
    with contextlib.suppress(Exception):
        await bounded(engine.dispose(), 5)


async def run_demo(url: URL, out: TextIO) -> list[Outcome]:
    """Run the four faults; print what the times mean, then progress, to ``out``; return
    the outcomes."""
    print(_LEGEND, file=out)
    admin = create_engine(url, pool_size=1)
    outcomes = []
    try:
        # 1. The server closes connections idle past this session's wait_timeout (1 s here).
        async def sit_idle(plain: AsyncEngine, ours: AsyncEngine) -> None:
            await asyncio.sleep(1.6)

        short = {"connect_args": {"init_command": "SET SESSION wait_timeout=1"}}
        outcomes.append(
            await _side_by_side(
                "idle past wait_timeout", url, out, sit_idle, sqlalchemy=short, asyncgone=short
            )
        )

        # 2. An administrator (or pt-kill) kills the idle pooled connection.
        async def kill(plain: AsyncEngine, ours: AsyncEngine) -> None:
            ids = await asyncio.gather(_thread_id(plain), _thread_id(ours))
            async with admin.connect() as conn:
                for thread in ids:
                    await conn.execute(text(f"KILL CONNECTION {int(thread)}"))
            await asyncio.sleep(0.2)

        outcomes.append(await _side_by_side("KILL CONNECTION", url, out, kill))

        # 3 and 4 go through a proxy that can reset or silence connections.
        with FaultProxy.for_url(url) as proxy:

            async def cut(plain: AsyncEngine, ours: AsyncEngine) -> None:
                proxy.cut()  # what clients see when the server restarts or a firewall resets
                await asyncio.sleep(0.2)

            outcomes.append(await _side_by_side("connections reset (restart)", proxy.url, out, cut))

            async def blackhole(plain: AsyncEngine, ours: AsyncEngine) -> None:
                await asyncio.sleep(_IDLE_BEFORE_BLACKHOLE)  # idle, then the LB forgets the flows
                proxy.blackhole()

            outcomes.append(
                await _side_by_side(
                    "network blackhole (LB forgot the flow)",
                    proxy.url,
                    out,
                    blackhole,
                    # Plain pre-ping never gives up by itself: say how long the demo lets it.
                    waiting=f"waiting up to {_IDLE_BEFORE_BLACKHOLE + _HANG_LIMIT:.0f} s (a ping "
                    "into a blackhole never answers) ",
                    sqlalchemy={"pool_pre_ping": True},
                    asyncgone={"ping_after": 1.0, "ping_timeout": 2.0},
                )
            )
    finally:
        await _dispose(admin)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    """The summary, as an aligned text table."""
    rows = [("fault", "plain SQLAlchemy", "asyncgone")]
    rows += [(o.fault, o.plain, o.asyncgone) for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
