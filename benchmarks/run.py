"""Throughput and server round trips: asyncgone against plain SQLAlchemy, in one run.

    python benchmarks/run.py                     # disposable MariaDB, both drivers
    python benchmarks/run.py --url mysql://root@127.0.0.1:3306/test --seconds 2
    python benchmarks/run.py --markdown docs/performance-table.md

For each driver, concurrency and unit of work it runs every engine kind in turn, several
rounds interleaved so that drift on a noisy machine spreads over all of them, and reports
the median throughput; its ratio to plain ``create_async_engine``, taken round by round
(each engine against the plain engine's run of the same round, a few seconds apart, so
that drift between rounds cancels out) with the median and the lowest and highest of those
ratios; the client's CPU time per unit (less noisy than throughput when client and server
share a machine); and the server commands per unit read from the server's own status
counters (``Questions``,
``Com_admin_commands``, ``Com_rollback``, ``Com_commit``). A disposable server (the
default) is the only way those counters see nothing but the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version

import pymysql
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import asyncgone
from asyncgone.testing import MariaDBServer

ROWS = 1000
COUNTERS = ("Questions", "Com_admin_commands", "Com_rollback", "Com_commit", "Connections")
ENGINES = ("sqlalchemy", "sqlalchemy pre-ping", "asyncgone", "asyncgone + keepalive")

Unit = Callable[[AsyncEngine, int], Awaitable[None]]


async def connection_read(engine: AsyncEngine, i: int) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT v FROM bench WHERE id = :id"), {"id": i % ROWS + 1})


async def session_read(engine: AsyncEngine, i: int) -> None:
    async with AsyncSession(engine) as session:
        await session.execute(text("SELECT v FROM bench WHERE id = :id"), {"id": i % ROWS + 1})


async def session_write(engine: AsyncEngine, i: int) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await session.execute(text("INSERT INTO bench_writes (v) VALUES (:v)"), {"v": i})


UNITS: dict[str, Unit] = {
    "connection read": connection_read,
    "session read": session_read,
    "session write": session_write,
}


@dataclass
class Cell:
    rates: list[float]  # units per second, one per round
    cpu: list[float]  # client CPU microseconds per unit, one per round
    commands: dict[str, float]


class Counters:
    """Server status counters over a dedicated admin connection."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self._conn = pymysql.connect(
            host=parsed.host,
            port=parsed.port or 3306,
            user=parsed.username,
            password=parsed.password or "",
            database=parsed.database,
            autocommit=True,
        )
        first, second = self.read(), self.read()
        self._cost = {name: second[name] - first[name] for name in COUNTERS}  # of one read

    def read(self) -> dict[str, int]:
        with self._conn.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS")
            values = dict(cur.fetchall())
        return {name: int(values[name]) for name in COUNTERS}

    def delta(self, before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {name: after[name] - before[name] - self._cost[name] for name in COUNTERS}


def make_engine(kind: str, url: str, pool: int) -> AsyncEngine:
    if kind.startswith("asyncgone"):
        return asyncgone.create_engine(url, pool_size=pool, max_overflow=0)
    return create_async_engine(
        url, pool_size=pool, max_overflow=0, pool_pre_ping=kind.endswith("pre-ping")
    )


@contextlib.asynccontextmanager
async def running(kind: str, engine: AsyncEngine) -> AsyncIterator[None]:
    if kind.endswith("keepalive"):
        async with asyncgone.keepalive(engine):
            yield
    else:
        yield


async def measure(
    engine: AsyncEngine, unit: Unit, concurrency: int, seconds: float
) -> tuple[int, float]:
    """Run ``unit`` from ``concurrency`` workers for ``seconds``; return units done, elapsed."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < stop_at:
            await unit(engine, i)
            i += concurrency
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return done, time.perf_counter() - started


async def warm(engine: AsyncEngine, n: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(n):
            conn = await stack.enter_async_context(engine.connect())
            await conn.execute(text("SELECT 1"))


async def prepare(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS bench, bench_writes"))
        await conn.execute(text("CREATE TABLE bench (id INT PRIMARY KEY, v INT) ENGINE=InnoDB"))
        await conn.execute(
            text(
                "CREATE TABLE bench_writes (id INT AUTO_INCREMENT PRIMARY KEY, v INT) ENGINE=InnoDB"
            )
        )
        await conn.execute(
            text("INSERT INTO bench VALUES (:id, :v)"),
            [{"id": i, "v": i} for i in range(1, ROWS + 1)],
        )
    await engine.dispose()


async def run_cell(
    url: str, counters: Counters, concurrency: int, unit_name: str, rounds: int, seconds: float
) -> dict[str, Cell]:
    unit = UNITS[unit_name]
    cells = {kind: Cell([], [], {}) for kind in ENGINES}
    engines = {kind: make_engine(kind, url, concurrency) for kind in ENGINES}
    totals = {kind: dict.fromkeys(COUNTERS, 0) for kind in ENGINES}
    units = dict.fromkeys(ENGINES, 0)
    try:
        for engine in engines.values():
            await warm(engine, concurrency)
        for _ in range(rounds):
            for kind, engine in engines.items():
                async with running(kind, engine):
                    before = counters.read()
                    cpu = time.process_time()
                    done, elapsed = await measure(engine, unit, concurrency, seconds)
                    cpu = time.process_time() - cpu
                    after = counters.read()
                cells[kind].rates.append(done / elapsed)
                cells[kind].cpu.append(cpu / done * 1e6)
                for name, value in counters.delta(before, after).items():
                    totals[kind][name] += value
                units[kind] += done
    finally:
        for engine in engines.values():
            await engine.dispose()
    for kind in ENGINES:
        cells[kind].commands = {name: totals[kind][name] / units[kind] for name in COUNTERS}
    return cells


def table(results: list[tuple[str, int, str, dict[str, Cell]]]) -> str:
    lines = [
        "| driver | workers | unit of work | engine | units/s | vs SQLAlchemy | lowest, highest "
        "| client CPU µs/unit | commands/unit | pings | rollbacks | commits |",
        "|---|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for driver, concurrency, unit_name, cells in results:
        base = cells["sqlalchemy"].rates
        for kind in ENGINES:
            cell = cells[kind]
            rate = statistics.median(cell.rates)
            ratios = [mine / plain for mine, plain in zip(cell.rates, base, strict=True)]
            c = cell.commands
            lines.append(
                f"| {driver} | {concurrency} | {unit_name} | {kind} | {rate:,.0f} | "
                f"{statistics.median(ratios):.2f} | {min(ratios):.2f}, {max(ratios):.2f} | "
                f"{statistics.median(cell.cpu):.0f} | "
                f"{c['Questions'] + c['Com_admin_commands']:.2f} | "
                f"{c['Com_admin_commands']:.2f} | {c['Com_rollback']:.2f} | {c['Com_commit']:.2f} |"
            )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> str:
    with contextlib.ExitStack() as stack:
        base_url = args.url
        if base_url is None:
            server = stack.enter_context(MariaDBServer(options=["--max-connections=500"]))
            base_url = server.url("asyncmy")
        results = []
        for driver in args.drivers:
            url = (
                make_url(base_url)
                .set(drivername=f"mysql+{driver}")
                .render_as_string(hide_password=False)
            )
            await prepare(url)
            counters = Counters(url)
            for concurrency in args.concurrency:
                for unit_name in UNITS:
                    cells = await run_cell(
                        url, counters, concurrency, unit_name, args.rounds, args.seconds
                    )
                    results.append((driver, concurrency, unit_name, cells))
                    print(f"  {driver} x{concurrency} {unit_name}: done", file=sys.stderr)
    header = (
        f"Python {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}, "
        f"aiomysql {version('aiomysql')}, asyncmy {version('asyncmy')}, "
        f"{'a disposable MariaDB' if args.url is None else 'the given server'}; "
        f"{args.rounds} rounds of {args.seconds:g} s per cell; medians, and each round's "
        "ratio to plain SQLAlchemy's run of that round."
    )
    return header + "\n\n" + table(results) + "\n"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a MySQL/MariaDB URL (default: start a disposable MariaDB)")
    parser.add_argument("--drivers", type=lambda s: s.split(","), default=["aiomysql", "asyncmy"])
    parser.add_argument(
        "--concurrency", type=lambda s: [int(n) for n in s.split(",")], default=[1, 32]
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per engine and cell")
    parser.add_argument("--markdown", help="also write the table to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    report = asyncio.run(main(arguments))
    print(report)
    if arguments.markdown:
        with open(arguments.markdown, "w") as out:
            out.write(report)
