"""Client CPU per unit of work: what asyncgone's own code costs, without server noise.

    python benchmarks/overhead.py [--url URL] [--units 20000] [--pairs 5]
                                  [--drivers aiomysql,asyncmy] [--breakdown]

Runs the same unit (check out a pooled connection, ``SELECT 1``, return it) on a plain
``create_async_engine`` and on ``asyncgone.create_engine``, alternating unit by unit, and
measures each unit's client CPU time (``time.process_time_ns``: user and kernel time of this
process, so the ``poll(2)`` of the socket check counts; waiting for the server does not).
Both engines send the server the same two commands per unit here, so the difference is
asyncgone's own work at checkout, statement and return.

Alternating single units (rather than rounds of many) puts both engines under the same
machine conditions at every moment, and the medians of many short samples ignore the
interruptions that make rounds noisy. What they do not average out is where a pair of
engines' objects land in memory, which moves the difference by a microsecond from one
pair to the next: so the units are split over ``--pairs`` pairs of engines (5), each made
afresh. Reported per driver: the median CPU per unit of each engine over all units, the
median of the pairs' differences with the lowest and highest of them, and a 95 % interval
for the difference from resampling all units (bootstrap), which says how well the units
pin it down, not how far another pair of engines would move it. A process's own layout
(its hash seed, where the interpreter put its objects) moves all its pairs together, by
about a microsecond between two runs of the same code: compare several runs.

``--breakdown`` also measures asyncgone engines with one part switched off at a time (by
replacing asyncgone internals for the measurement only; such an engine is not safe to use):
what each part costs is the full difference minus that engine's; and one with all four
off, which leaves what no part accounts for.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncgone


async def unit(engine: AsyncEngine) -> int:
    """One unit of work; returns its client CPU time in nanoseconds."""
    started = time.process_time_ns()
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    return time.process_time_ns() - started


def interval(a: list[int], b: list[int], rounds: int = 200) -> tuple[float, float]:
    """A 95 % bootstrap interval for median(b) - median(a), in microseconds."""
    rng = random.Random(0)
    diffs = sorted(
        statistics.median(rng.choices(b, k=len(b))) - statistics.median(rng.choices(a, k=len(a)))
        for _ in range(rounds)
    )
    return diffs[int(rounds * 0.025)] / 1000, diffs[int(rounds * 0.975)] / 1000


#: The parts ``--breakdown`` switches off, one at a time: (module, attribute, replacement).
PARTS: dict[str, tuple[str, str, Callable[..., Any]]] = {
    "checkout check": ("_checkout", "CheckoutCheck.check_record", lambda self, p, r, b: None),
    "return (ROLLBACK decision)": ("_engine", "install_reset", lambda *a: None),
    "cursor counting": ("_drivers", "DriverSupport.count_cursors", lambda self, c: None),
    "error listeners": ("_invalidation", "ErrorHandling.install", lambda self, e: None),
}


def without(parts: tuple[str, ...], url: str) -> AsyncEngine:
    """An asyncgone engine, with ``parts`` (keys of ``PARTS``) switched off."""
    saved: list[tuple[Any, str, Any]] = []
    for part in parts:
        module_name, path, replacement = PARTS[part]
        owner: Any = importlib.import_module(f"asyncgone.{module_name}")
        *outer, name = path.split(".")
        for step in outer:
            owner = getattr(owner, step)
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)
    try:
        return asyncgone.create_engine(url, pool_size=1)
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


async def measure(url: str, units: int, parts: tuple[str, ...] = ()) -> tuple[list[int], list[int]]:
    """CPU nanoseconds per unit on each engine, units alternating between them."""
    plain = create_async_engine(url, pool_size=1)
    ours = without(parts, url)
    try:
        for _ in range(500):  # warm: connections, statement caches, specialised bytecode
            await unit(plain)
            await unit(ours)
        cost: tuple[list[int], list[int]] = ([], [])
        for i in range(units):
            first, second = (plain, ours) if i % 2 else (ours, plain)
            a = await unit(first)
            b = await unit(second)
            cost[0].append(a if first is plain else b)
            cost[1].append(b if first is plain else a)
        return cost
    finally:
        await plain.dispose()
        await ours.dispose()


async def paired(
    url: str, units: int, pairs: int, parts: tuple[str, ...] = ()
) -> tuple[list[int], list[int], list[float]]:
    """``measure()`` over ``pairs`` fresh pairs of engines sharing ``units``: all units of
    each kind, and each pair's difference of medians in microseconds."""
    plain: list[int] = []
    ours: list[int] = []
    differences: list[float] = []
    for _ in range(pairs):
        a, b = await measure(url, units // pairs, parts)
        plain += a
        ours += b
        differences.append((statistics.median(b) - statistics.median(a)) / 1000)
    return plain, ours, differences


async def main(args: argparse.Namespace) -> None:
    for driver in args.drivers:
        url = make_url(args.url).set(drivername=f"mysql+{driver}")
        target = url.render_as_string(hide_password=False)
        plain, ours, pairs = await paired(target, args.units, args.pairs)
        low, high = interval(plain, ours)
        median_plain = statistics.median(plain) / 1000
        median_ours = statistics.median(ours) / 1000
        full = statistics.median(pairs)
        print(
            f"{driver}: sqlalchemy {median_plain:.1f} µs/unit, asyncgone {median_ours:.1f} "
            f"µs/unit, difference {full:+.1f} µs (median of {len(pairs)} pairs of engines, "
            f"from {min(pairs):+.1f} to {max(pairs):+.1f}; 95 % interval of all units "
            f"{low:+.1f} to {high:+.1f}; {len(plain)} units each)",
            flush=True,
        )
        for part in PARTS if args.breakdown else ():
            rest = statistics.median((await paired(target, args.units, args.pairs, (part,)))[2])
            print(f"  {part}: {full - rest:+.1f} µs (without it {rest:+.1f})", flush=True)
        if args.breakdown:
            rest = statistics.median(
                (await paired(target, args.units, args.pairs, tuple(PARTS)))[2]
            )
            print(f"  without all four: {rest:+.1f} µs", flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="mysql://root@127.0.0.1:3306/test")
    parser.add_argument("--drivers", type=lambda s: s.split(","), default=["aiomysql", "asyncmy"])
    parser.add_argument("--units", type=int, default=20000)
    parser.add_argument("--pairs", type=int, default=5, help="pairs of engines to split them over")
    parser.add_argument("--breakdown", action="store_true", help="cost of each part too")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
