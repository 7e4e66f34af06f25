"""A fleet of processes through a server crash: refusals and connect attempts, with and without
asyncgone's fleet measures (``max_connecting``, ``connect_retry``, ``overflow_give_back``).

    python benchmarks/fleet.py                         # both drivers, cap on and off
    python benchmarks/fleet.py --driver asyncmy --mode cap --json

Each run starts a disposable MariaDB server with ``max_connections=28`` and an application
account without administrative privileges (so without the connection MariaDB keeps for
``SUPER``/``CONNECTION ADMIN``), then six worker processes, each a
``Database(pool_size=4, max_overflow=2)`` whose eight tasks run short units of work through
``Database.run()``: the pools (24) fit, not every overflow (36 in all). The load starts once
every process has started (``--staggered``: the processes start one a second, each
starting its load as soon as it has started, so the last ones start against a server the
first ones already fill). Once the fleet is warm the server is killed
with SIGKILL and started again under load; the workers keep going for a while and report.

Figures, per run: units completed and failed, processes that gave up, the seconds each
process's ``Database.start()`` took (sorted); refusals counted by
the server (``Connection_errors_max_connections``, before authentication, plus
``Aborted_connects``, which counts the 1040s sent after authentication) over both server
lives; connect attempts counted by the clients (``asyncgone.stats``: ``connect_attempts``,
``connects_refused``, ``overflow_given_back``), and the peak of attempts per second after
the restart.

``--mode nocap`` runs the same fleet with ``max_connecting=None, connect_retry=None,
overflow_give_back=False``: every connect at once, every refusal straight to ``run()``, and
overflow kept (what asyncgone did before).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROCESSES = 6
POOL_SIZE = 4
MAX_OVERFLOW = 2
MAX_CONNECTIONS = 28
TASKS = 8  # per process: more than pool_size + max_overflow, so the overflow is wanted
THINK = 0.0  # seconds a task pauses between units, at most: none, the load never lets up
WARM = 3.0  # seconds of load before the crash
STAGGER = 1.0  # --staggered: seconds between two processes' starts
AFTER = 15.0  # seconds of load after the server accepts connections again
STATUS = ("Connection_errors_max_connections", "Aborted_connects", "Connections")
MODES = {
    "cap": {},  # asyncgone's defaults
    "nocap": {"max_connecting": None, "connect_retry": None, "overflow_give_back": False},
}


# -- the worker: one application process ------------------------------------------------------


def _describe(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc
    return f"{type(inner).__name__}: {inner}"[:200]


async def _work(url: str, mode: str, stop: Path) -> dict[str, Any]:
    go = stop.with_name("go")
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession

    import asyncgone

    db = asyncgone.Database(
        url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, run_deadline=30.0, **MODES[mode]
    )
    result: dict[str, Any] = {
        "started": False,
        "done": 0,
        "outcome_unknown": 0,
        "failures": [],
        "samples": [],
    }
    began = time.monotonic()
    try:
        await db.start()
    except Exception as exc:
        result["failures"].append(f"start: {_describe(exc)}")
        return result
    finally:
        result["start_s"] = round(time.monotonic() - began, 2)
    result["started"] = True
    stopping = asyncio.Event()
    print("ready", flush=True)
    # The load starts when the whole fleet is up; polling is the point (another process).
    while not await asyncio.to_thread(go.exists):  # noqa: ASYNC110
        await asyncio.sleep(0.05)

    async def complete(name: str) -> None:
        """Run one unit to completion: a lost COMMIT is checked, as the docs advise."""

        async def unit(session: AsyncSession) -> None:
            await session.execute(text("INSERT INTO fleet (unit) VALUES (:u)"), {"u": name})

        async def applied(session: AsyncSession) -> bool:
            found = await session.execute(text("SELECT 1 FROM fleet WHERE unit = :u"), {"u": name})
            return found.first() is not None

        while True:
            try:
                await db.run(unit)
                return
            except asyncgone.CommitOutcomeUnknown:
                result["outcome_unknown"] += 1
                if await db.run(applied):
                    return

    async def task(number: int) -> None:
        done = 0
        while not stopping.is_set():
            try:
                await complete(f"{os.getpid()}-{number}-{done}")
                done += 1
                result["done"] += 1
            except Exception as exc:
                result["failures"].append(_describe(exc))
            await asyncio.sleep(random.uniform(0, THINK))  # think time

    async def sample() -> None:
        while not await asyncio.to_thread(stop.exists):
            s = db.stats()
            result["samples"].append((time.time(), s.connect_attempts, s.connects_refused))
            await asyncio.sleep(0.1)
        stopping.set()

    try:
        await asyncio.gather(sample(), *(task(n) for n in range(TASKS)))
    finally:
        s = db.stats()
        result["stats"] = {
            "connect_attempts": s.connect_attempts,
            "connects_refused": s.connects_refused,
            "overflow_given_back": s.overflow_given_back,
            "connects": s.connects,
            "replays": s.replays,
            "unavailable": s.unavailable,
        }
        await db.close()
    return result


def worker(url: str, mode: str, stop: Path) -> None:
    result = asyncio.run(_work(url, mode, stop))
    print(json.dumps(result), flush=True)


# -- the orchestrator ---------------------------------------------------------------------------


def _status(server: Any) -> dict[str, int]:
    """The server's counters, as root: even MariaDB's connection for administrators can be
    taken for a moment while the fleet hammers it, so a refusal is retried."""
    from asyncgone.testing import AdminQueryError

    for _ in range(100):
        try:
            rows = server.query("SHOW GLOBAL STATUS")
            break
        except AdminQueryError:
            time.sleep(0.1)
    else:
        raise RuntimeError("the server refused its administrator for 10 s")
    values = {row["Variable_name"]: row["Value"] for row in rows}
    return {name: int(values[name]) for name in STATUS}


def run_fleet(
    driver: str,
    mode: str,
    *,
    processes: int = PROCESSES,
    max_connections: int = MAX_CONNECTIONS,
    staggered: bool = False,
) -> dict[str, Any]:
    """Run one fleet through a crash; return its figures (see the module docstring)."""
    from asyncgone.testing import MariaDBServer

    options = [f"--max-connections={max_connections}", "--max-connect-errors=1000000"]
    with MariaDBServer(options=options) as server, tempfile.TemporaryDirectory() as tmp:
        server.query("CREATE USER IF NOT EXISTS 'app'@'%'")
        server.query("GRANT ALL ON test.* TO 'app'@'%'")
        server.query("CREATE TABLE test.fleet (unit VARCHAR(40) PRIMARY KEY)")
        url = f"mysql+{driver}://app@{server.host}:{server.port}/test"
        stop = Path(tmp) / "stop"
        if staggered:  # each process starts its load as soon as it has started
            stop.with_name("go").touch()
        command = [sys.executable, __file__, "--worker", url, "--mode", mode, "--stop", str(stop)]
        workers: list[subprocess.Popen[str]] = []
        firsts = []
        try:
            for number in range(processes):
                if staggered and number:  # the later ones find the earlier ones' load running
                    time.sleep(STAGGER)
                workers.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
            for proc in workers:  # each says "ready" once started (or reports, having failed)
                assert proc.stdout is not None
                firsts.append(proc.stdout.readline())
            stop.with_name("go").touch()
            time.sleep(WARM)
            before = _status(server)
            server.kill()
            crashed = time.time()
            server.start()
            restarted = time.time()
            time.sleep(AFTER)
            after = _status(server)
            stop.touch()
            outputs = [
                first + proc.communicate(timeout=60)[0]
                for first, proc in zip(firsts, workers, strict=False)
            ]
            rows = int(server.query("SELECT COUNT(*) AS n FROM test.fleet")[0]["n"])
        finally:
            stop.touch()
            for proc in workers:
                if proc.poll() is None:
                    proc.kill()
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    per_second: collections.Counter[int] = collections.Counter()
    refused_per_second: collections.Counter[int] = collections.Counter()
    for result in results:
        samples = result["samples"]
        for (_, a, r), (t, b, s) in itertools.pairwise(samples):
            per_second[math.floor(t - crashed)] += b - a
            refused_per_second[math.floor(t - crashed)] += s - r
    failures = [f for r in results for f in r["failures"]]
    return {
        "driver": driver,
        "mode": mode,
        "processes": processes,
        "max_connections": max_connections,
        "staggered": staggered,
        "restart_s": round(restarted - crashed, 1),
        "units_done": sum(r["done"] for r in results),
        "units_failed": len(failures),
        "rows": rows,
        "commit_outcome_unknown": sum(r["outcome_unknown"] for r in results),
        "failures": sorted(set(failures))[:5],
        "processes_gave_up": sum(1 for r in results if not r["started"]),
        "start_s": sorted(r["start_s"] for r in results),
        "exit_codes": [proc.returncode for proc in workers],
        # Status counters start again at 0 with the server: "before" covers the fleet's
        # start and warm-up, "after" the restart and the load after it.
        "server_refused_before_crash": before[STATUS[0]] + before[STATUS[1]],
        "server_refused_after_crash": after[STATUS[0]] + after[STATUS[1]],
        "server_refused_before_auth_after_crash": after[STATUS[0]],
        "server_connections_after_crash": after[STATUS[2]],
        "client_attempts": sum(r["stats"]["connect_attempts"] for r in results if "stats" in r),
        "client_refused": sum(r["stats"]["connects_refused"] for r in results if "stats" in r),
        "overflow_given_back": sum(
            r["stats"]["overflow_given_back"] for r in results if "stats" in r
        ),
        "client_attempts_after_crash": sum(n for second, n in per_second.items() if second >= 0),
        "client_refused_after_crash": sum(
            n for second, n in refused_per_second.items() if second >= 0
        ),
        "peak_attempts_per_s_after_crash": max(
            (n for second, n in per_second.items() if second >= 0), default=0
        ),
        "peak_refused_per_s_after_crash": max(
            (n for second, n in refused_per_second.items() if second >= 0), default=0
        ),
        "attempts_per_s": [per_second[i] for i in range(min(per_second), max(per_second) + 1)],
        "refused_per_s": [
            refused_per_second[i] for i in range(min(per_second), max(per_second) + 1)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", choices=("aiomysql", "asyncmy"), action="append")
    parser.add_argument("--mode", choices=tuple(MODES), action="append")
    parser.add_argument("--processes", type=int, default=PROCESSES)
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    parser.add_argument(
        "--staggered",
        action="store_true",
        help="start the processes one a second, each starting its load at once",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--stop", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.mode[0], Path(args.stop))
        return
    for driver in args.driver or ("aiomysql", "asyncmy"):
        for mode in args.mode or ("nocap", "cap"):
            figures = run_fleet(
                driver,
                mode,
                processes=args.processes,
                max_connections=args.max_connections,
                staggered=args.staggered,
            )
            if args.json:
                print(json.dumps(figures), flush=True)
            else:
                print(f"{driver} {mode}:")
                for key, value in figures.items():
                    print(f"  {key:<34}{value}")


if __name__ == "__main__":
    main()
