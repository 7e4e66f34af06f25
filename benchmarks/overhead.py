"""Client CPU per unit of work: what asyncgone's listeners cost, without server noise.

    python benchmarks/overhead.py [--url URL] [--rounds 15] [--units 1000]

Runs the same unit (check out a pooled connection, ``SELECT 1``, return it) on a plain
``create_async_engine`` and on ``asyncgone.create_engine``, alternating rounds, and reports
the client process's CPU time per unit (``time.process_time``): the median of each, the
difference, and the spread of the per-round differences. Both engines send the server the
same two commands per unit here, so the difference is asyncgone's own work at checkout,
reset and checkin.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncgone


async def run(engine: AsyncEngine, units: int) -> float:
    """Client CPU microseconds per unit over ``units`` sequential units."""
    started = time.process_time()
    for _ in range(units):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    return (time.process_time() - started) / units * 1e6


async def main(args: argparse.Namespace) -> None:
    for driver in args.drivers:
        url = make_url(args.url).set(drivername=f"mysql+{driver}")
        plain = create_async_engine(url, pool_size=1)
        ours = asyncgone.create_engine(url, pool_size=1)
        try:
            for engine in (plain, ours):
                await run(engine, args.units // 5)  # warm: connection, caches
            cost: dict[str, list[float]] = {"sqlalchemy": [], "asyncgone": []}
            for _ in range(args.rounds):
                cost["sqlalchemy"].append(await run(plain, args.units))
                cost["asyncgone"].append(await run(ours, args.units))
        finally:
            await plain.dispose()
            await ours.dispose()
        diffs = [a - b for a, b in zip(cost["asyncgone"], cost["sqlalchemy"], strict=True)]
        quartiles = statistics.quantiles(diffs, n=4)
        print(
            f"{driver}: sqlalchemy {statistics.median(cost['sqlalchemy']):.0f} µs/unit, "
            f"asyncgone {statistics.median(cost['asyncgone']):.0f} µs/unit, difference "
            f"{statistics.median(diffs):+.1f} µs (middle half of rounds {quartiles[0]:+.1f} to "
            f"{quartiles[2]:+.1f})"
        )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="mysql://root@127.0.0.1:3306/test")
    parser.add_argument("--drivers", type=lambda s: s.split(","), default=["aiomysql", "asyncmy"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--units", type=int, default=1000)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
