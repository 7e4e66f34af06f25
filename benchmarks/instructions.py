"""Instructions per unit of work, counted by valgrind's callgrind: asyncgone's own cost.

    python benchmarks/instructions.py [--url URL] [--units 500] [--drivers aiomysql,asyncmy]

The client CPU time of ``overhead.py`` moves by several microseconds from run to run on a
shared machine; the instructions a unit runs do not depend on what else the machine does.
For each driver and engine (plain ``create_async_engine``, ``asyncgone.create_engine``),
this runs the unit of ``overhead.py`` (check out a pooled connection, ``SELECT 1``, return
it) in a process of its own under ``valgrind --tool=callgrind``, once with ``--units``
units after a warm-up and once with the warm-up alone; the difference of the two totals,
divided by ``--units``, is the cost of one unit: Python's interpreter, SQLAlchemy, the
driver and asyncgone, in user space (the kernel's side of the socket calls is not
counted, nor is the time waited for the server).

The count of one process depends on how its dictionaries, sets and CPython's type
attribute cache are laid out: with ``PYTHONHASHSEED`` fixed, runs agree to a few
instructions, but another seed (or another module imported) moves a unit by several
thousand, in either engine. So every process makes and warms both engines, then runs the
units on one of them, and each figure is the mean over ``--seeds`` (default 0 to 4).

``--breakdown`` also counts asyncgone engines with one part switched off at a time (the
parts of ``overhead.py --breakdown``; such an engine is not safe to use), and one with all
of them off.

Needs valgrind (Debian's ``valgrind``) and a MariaDB server at ``--url``. Each run takes
about half a minute; ``--jobs`` (the number of CPUs) run at a time, which does not
change what they count.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import re
import statistics
import subprocess
import sys
from typing import Any

from sqlalchemy.engine import make_url

WARM = 300


def child(url: str, engine_kind: str, units: int) -> None:
    """Run the units (in the process valgrind watches)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    sys.path.insert(0, os.path.dirname(__file__))
    from overhead import PARTS, without

    async def main() -> None:
        # Both engines in every process, both warmed: the processes that count one or the
        # other are laid out alike (see the module docstring).
        plain = create_async_engine(url, pool_size=1)
        off = engine_kind.removeprefix("asyncgone-") if "-" in engine_kind else ""
        ours = without(tuple(PARTS) if off == "all" else (off,) if off else (), url)
        statement = text("SELECT 1")

        async def run(engine: Any, n: int) -> None:
            for _ in range(n):
                async with engine.connect() as conn:
                    await conn.execute(statement)

        for _ in range(WARM // 10):
            await run(plain, 10)
            await run(ours, 10)
        engine = plain if engine_kind == "sqlalchemy" else ours
        await run(engine, WARM + units)
        await plain.dispose()
        await ours.dispose()

    asyncio.run(main())


def count(url: str, engine_kind: str, units: int, seed: int) -> int:
    """Instructions the child runs, as callgrind reports them."""
    environment = dict(os.environ, PYTHONHASHSEED=str(seed))
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            engine_kind,
            "--url",
            url,
            "--units",
            str(units),
        ],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"{engine_kind} with {units} units failed:\n{done.stderr[-3000:]}")
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="mysql+aiomysql://root@127.0.0.1:3306/test")
    parser.add_argument("--units", type=int, default=500)
    parser.add_argument("--drivers", default="aiomysql,asyncmy")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.url, args.child, args.units)
        return
    kinds = ["sqlalchemy", "asyncgone"]
    if args.breakdown:
        sys.path.insert(0, os.path.dirname(__file__))
        from overhead import PARTS

        kinds += [f"asyncgone-{part}" for part in PARTS] + ["asyncgone-all"]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs = [
        (driver, kind, units, seed)
        for driver in args.drivers.split(",")
        for kind in kinds
        for units in (0, args.units)
        for seed in seeds
    ]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        totals = dict(
            zip(
                runs,
                pool.map(
                    lambda run: count(
                        make_url(args.url)
                        .set(drivername=f"mysql+{run[0]}")
                        .render_as_string(hide_password=False),
                        run[1],
                        run[2],
                        run[3],
                    ),
                    runs,
                ),
                strict=True,
            )
        )
    for driver in args.drivers.split(","):
        per_unit = {
            kind: statistics.mean(
                (totals[(driver, kind, args.units, seed)] - totals[(driver, kind, 0, seed)])
                / args.units
                for seed in seeds
            )
            for kind in kinds
        }
        plain, ours = per_unit["sqlalchemy"], per_unit["asyncgone"]
        differences = [
            (
                totals[(driver, "asyncgone", args.units, seed)]
                - totals[(driver, "asyncgone", 0, seed)]
                - totals[(driver, "sqlalchemy", args.units, seed)]
                + totals[(driver, "sqlalchemy", 0, seed)]
            )
            / args.units
            for seed in seeds
        ]
        print(
            f"{driver}: sqlalchemy {plain:,.0f} instructions/unit, asyncgone {ours:,.0f}, "
            f"difference {ours - plain:+,.0f} ({(ours - plain) / plain:+.2%}; by seed "
            + ", ".join(f"{difference:+,.0f}" for difference in differences)
            + ")"
        )
        for kind in kinds[2:]:
            part = kind.removeprefix("asyncgone-")
            if part == "all":
                print(f"  all parts off: {per_unit[kind] - plain:+,.0f} over sqlalchemy")
            else:
                print(f"  {part}: {ours - per_unit[kind]:+,.0f}")


if __name__ == "__main__":
    main()
