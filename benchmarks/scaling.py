"""Client CPU per unit as pools grow and engines multiply: asyncgone against plain SQLAlchemy.

    python benchmarks/scaling.py [--url URL] [--units 6000] [--drivers aiomysql,asyncmy]

asyncgone's per-checkout work must not grow with the pool (its checks read one connection,
never the pool) nor with the number of engines a process holds (no global registry is
walked per checkout). For each driver and configuration, this runs the unit of
``overhead.py`` (check out, ``SELECT 1``, return) alternately on plain
``create_async_engine`` engines and on ``asyncgone.create_engine`` engines, and reports the
median client CPU per unit of each and their difference:

- pool 5 and pool 50: the pool is first filled (that many connections opened together and
  returned), so that sequential units cycle through every idle connection (SQLAlchemy's
  pool is first in, first out);
- 1 and 20 engines: units go round-robin over that many engines of each kind.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncgone

sys.path.insert(0, str(Path(__file__).parent))
from overhead import interval, unit  # a sibling script, not a package

CONFIGURATIONS = (("pool 5", 1, 5), ("pool 50", 1, 50), ("1 engine", 1, 1), ("20 engines", 20, 1))


async def fill(engine: AsyncEngine, size: int) -> None:
    """Open ``size`` connections at once and return them all to the pool."""
    opened: list[None] = []
    all_open, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            opened.append(None)
            if len(opened) == size:
                all_open.set()
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(size)]
    await all_open.wait()
    release.set()
    await asyncio.gather(*tasks)


async def measure(url: str, engines: int, pool: int, units: int) -> tuple[list[int], list[int]]:
    """CPU nanoseconds per unit: (plain, asyncgone), units alternating between the kinds."""
    plain = [create_async_engine(url, pool_size=pool, max_overflow=0) for _ in range(engines)]
    ours = [asyncgone.create_engine(url, pool_size=pool, max_overflow=0) for _ in range(engines)]
    try:
        for engine in (*plain, *ours):
            await fill(engine, pool)
        for i in range(300 * engines):  # warm: statement caches, specialised bytecode
            await unit(plain[i % engines])
            await unit(ours[i % engines])
        cost: tuple[list[int], list[int]] = ([], [])
        for i in range(units):
            engine = i % engines
            if i % 2:
                cost[0].append(await unit(plain[engine]))
                cost[1].append(await unit(ours[engine]))
            else:
                cost[1].append(await unit(ours[engine]))
                cost[0].append(await unit(plain[engine]))
        return cost
    finally:
        for engine in (*plain, *ours):
            await engine.dispose()


async def main(args: argparse.Namespace) -> None:
    print("| driver | configuration | sqlalchemy µs/unit | asyncgone µs/unit | difference (95 %) |")
    print("|---|---|---:|---:|---:|")
    for driver in args.drivers:
        url = make_url(args.url).set(drivername=f"mysql+{driver}")
        for name, engines, pool in CONFIGURATIONS:
            plain, ours = await measure(
                url.render_as_string(hide_password=False), engines, pool, args.units
            )
            low, high = interval(plain, ours)
            a, b = statistics.median(plain) / 1000, statistics.median(ours) / 1000
            print(
                f"| {driver} | {name} | {a:.1f} | {b:.1f} | {b - a:+.1f} "
                f"({low:+.1f} to {high:+.1f}) |",
                flush=True,
            )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="mysql://root@127.0.0.1:3306/test")
    parser.add_argument("--drivers", type=lambda s: s.split(","), default=["aiomysql", "asyncmy"])
    parser.add_argument("--units", type=int, default=6000)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
