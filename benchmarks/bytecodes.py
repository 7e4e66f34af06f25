"""Where asyncgone's cost per unit of work goes: Python bytecode instructions per function.

    python benchmarks/bytecodes.py [--url URL] [--units 200] [--drivers aiomysql,asyncmy]

Runs the unit of ``overhead.py`` (check out a pooled connection, ``SELECT 1``, return it)
on a plain ``create_async_engine`` and on ``asyncgone.create_engine``, and counts, with
``sys.monitoring``'s ``INSTRUCTION`` event (Python 3.12 or later), the bytecode
instructions each function runs per unit. Prints, per driver, every function whose count
differs between the two engines by half an instruction or more: what asyncgone adds (its
own functions, and SQLAlchemy's that run more often) and what it saves (SQLAlchemy's and
asyncio's that it does not run), then both totals.

The counts are the same from run to run and do not depend on other load: they say which
code runs, not how long each instruction takes (an attribute read that CPython cannot
specialise, e.g. on the drivers' Cython objects, costs many machine instructions; see
``instructions.py`` for those). Counting slows the units down about a hundredfold, which
does not change what runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import sys
from types import CodeType

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncgone

TOOL = 3  # a sys.monitoring tool id not reserved for debuggers, coverage or profilers
WARM = 500


async def run(engine: AsyncEngine, units: int) -> None:
    statement = text("SELECT 1")
    for _ in range(units):
        async with engine.connect() as conn:
            await conn.execute(statement)


async def count(engine: AsyncEngine, units: int) -> collections.Counter[CodeType]:
    """Bytecode instructions run by each code object over ``units`` units."""
    monitoring = sys.monitoring
    seen: collections.Counter[CodeType] = collections.Counter()

    def on_instruction(code: CodeType, offset: int) -> None:
        seen[code] += 1

    monitoring.use_tool_id(TOOL, "asyncgone-bytecodes")
    try:
        monitoring.register_callback(TOOL, monitoring.events.INSTRUCTION, on_instruction)
        monitoring.set_events(TOOL, monitoring.events.INSTRUCTION)
        await run(engine, units)
    finally:
        monitoring.set_events(TOOL, 0)
        monitoring.free_tool_id(TOOL)
    return seen


def where(code: CodeType) -> str:
    """A function's name and where it is defined, relative to its package's directory."""
    path = re.sub(r".*/(site-packages|lib/python3\.\d+)/", "", code.co_filename)
    if path.startswith("/"):
        path = os.path.relpath(path)
    return f"{code.co_qualname} ({path}:{code.co_firstlineno})"


async def compare(url: str, units: int) -> None:
    plain = create_async_engine(url, pool_size=1)
    ours = asyncgone.create_engine(url, pool_size=1)
    try:
        for _ in range(WARM // 10):  # connections, statement caches, specialised bytecode
            await run(plain, 10)
            await run(ours, 10)
        base = await count(plain, units)
        mine = await count(ours, units)
    finally:
        await plain.dispose()
        await ours.dispose()
    rows = []
    for code in base.keys() | mine.keys():
        a, b = base[code] / units, mine[code] / units
        if abs(b - a) >= 0.5:
            rows.append((b - a, a, b, where(code)))
    print(f"{'difference':>10} {'plain':>8} {'asyncgone':>9}  function")
    for difference, a, b, name in sorted(rows):
        print(f"{difference:+10.1f} {a:8.1f} {b:9.1f}  {name}")
    total_plain = sum(base.values()) / units
    total_ours = sum(mine.values()) / units
    print(
        f"per unit: plain {total_plain:,.1f}, asyncgone {total_ours:,.1f}, difference "
        f"{total_ours - total_plain:+,.1f} ({(total_ours - total_plain) / total_plain:+.1%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="mysql://root@127.0.0.1:3306/test")
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--drivers", default="aiomysql,asyncmy")
    args = parser.parse_args()
    if sys.version_info < (3, 12):
        parser.error("sys.monitoring needs Python 3.12 or later")
    for driver in args.drivers.split(","):
        print(f"{driver}:")
        url = make_url(args.url).set(drivername=f"mysql+{driver}")
        asyncio.run(compare(url.render_as_string(hide_password=False), args.units))


if __name__ == "__main__":
    main()
