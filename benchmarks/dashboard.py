"""Draw a dashboard of asyncgone's metrics over a scripted run: docs/images/dashboard.png.

    python benchmarks/dashboard.py [--url URL] [--out docs/images/dashboard.png]

Needs prometheus_client and matplotlib (matplotlib is no dependency of asyncgone: install
it apart, in a scratch virtualenv). About 40 seconds of load on a ``Database`` (pool_size 4,
max_overflow 2, pool_timeout 0.5 s, no keepalive; its sessions get ``wait_timeout=4`` through
``init_command``, so nothing changes globally on the server), scraped through
``asyncgone.prometheus`` every 0.25 s, with these events:

- at 8 s, every connection of the pool is killed on the server (``KILL CONNECTION``);
- from 16 s to 22 s, a burst: 20 more workers hold connections 0.2 s each, so requests wait
  and some give up after ``pool_timeout``;
- from 26 s to 32 s, no traffic at all: the server closes the idle connections;
- from 32 s on, the steady load again.

Rates and quantiles are taken over one-second windows, as a dashboard's ``rate()`` and
``histogram_quantile()`` would.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable

import anyio
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

import asyncgone
import asyncgone.prometheus

KILL_AT = 8.0
BURST = (16.0, 22.0)
IDLE = (26.0, 32.0)
END = 40.0
STEADY = 3  # workers all along: fewer than pool_size, so no overflow churn
BURSTING = 20  # more workers during the burst, holding connections 0.2 s each
STEP = 0.25  # seconds between scrapes
WINDOW = 4  # scrapes per rate window (one second)

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Run:
    """The load, the events and the scrapes of one run."""

    def __init__(self, db: asyncgone.Database, registry: CollectorRegistry) -> None:
        self.db = db
        self.registry = registry
        self.started = time.monotonic()
        self.threads: set[int] = set()  # the server's ids of every connection used
        self.scrapes: list[tuple[float, Scrape]] = []

    def now(self) -> float:
        return time.monotonic() - self.started

    async def unit(self, session: AsyncSession) -> None:
        result = await session.execute(text("SELECT CONNECTION_ID(), SLEEP(0.02)"))
        self.threads.add(int(result.scalars().one()))

    async def steady(self) -> None:
        while (t := self.now()) < END:
            if IDLE[0] <= t < IDLE[1]:
                await anyio.sleep(IDLE[1] - t)
                continue
            # During the burst a request may give up: counted as a pool timeout.
            with contextlib.suppress(sa_exc.TimeoutError):
                await self.db.run(self.unit)
            await anyio.sleep(0.01)

    async def burst(self) -> None:
        await anyio.sleep(BURST[0] - self.now())
        while self.now() < BURST[1]:
            try:
                async with self.db.engine.connect() as conn:
                    await conn.execute(text("SELECT SLEEP(0.2)"))
            except sa_exc.TimeoutError:
                pass  # counted in asyncgone_pool_timeouts_total

    async def kill(self, url: str) -> None:
        await anyio.sleep(KILL_AT - self.now())
        # A separate engine, as an administrator's session would be.
        admin = asyncgone.create_engine(url)
        try:
            async with admin.connect() as conn:
                rows = await conn.execute(text("SELECT ID FROM information_schema.PROCESSLIST"))
                for thread in set(rows.scalars()) & self.threads:
                    await conn.execute(text(f"KILL CONNECTION {int(thread)}"))
        finally:
            await admin.dispose()

    async def scrape(self) -> None:
        while (t := self.now()) < END + STEP:
            scrape: Scrape = {}
            for family in self.registry.collect():
                for sample in family.samples:
                    labels = tuple(
                        sorted((k, v) for k, v in sample.labels.items() if k != "engine")
                    )
                    scrape[sample.name, labels] = sample.value
            self.scrapes.append((t, scrape))
            await anyio.sleep(STEP)


def value(scrape: Scrape, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def rate(run: Run, name: str, **labels: str) -> tuple[list[float], list[float]]:
    """Per-second increase of a counter over each window."""
    times, rates = [], []
    for (t0, a), (t1, b) in zip(run.scrapes, run.scrapes[WINDOW:], strict=False):
        times.append(t1)
        rates.append((value(b, name, **labels) - value(a, name, **labels)) / (t1 - t0))
    return times, rates


def quantile(run: Run, histogram: str, q: float) -> tuple[list[float], list[float | None]]:
    """The q-quantile of a histogram's observations in each window, in milliseconds,
    interpolated within a bucket as histogram_quantile() does (None: nothing observed)."""
    bounds = sorted(
        {
            float(dict(labels)["le"])
            for (n, labels) in run.scrapes[-1][1]
            if n == f"{histogram}_bucket"
        }
    )
    le = [_le(bound) for bound in bounds]
    times: list[float] = []
    found: list[float | None] = []
    for (_, a), (t1, b) in zip(run.scrapes, run.scrapes[WINDOW:], strict=False):
        counts = [
            value(b, f"{histogram}_bucket", le=x) - value(a, f"{histogram}_bucket", le=x)
            for x in le
        ]
        times.append(t1)
        total = counts[-1]
        if total <= 0:
            found.append(None)
            continue
        rank, below, lower = q * total, 0.0, 0.0
        answer = bounds[-2]  # the largest finite bound, as Prometheus answers for +Inf
        for bound, count in zip(bounds, counts, strict=True):
            if count >= rank and bound != float("inf"):
                answer = lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
                break
            below, lower = count, bound
        found.append(answer * 1000)
    return times, found


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def draw(run: Run, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
    fig.suptitle(title, fontsize=13)
    scrape_times = [t for t, _ in run.scrapes]

    def gauge(name: str) -> list[float]:
        return [value(s, name) for _, s in run.scrapes]

    def throughput(ax: plt.Axes) -> None:
        ax.plot(*rate(run, "asyncgone_checkouts_total"), label="checkouts/s", color="tab:blue")
        ax2 = ax.twinx()
        for name, label, color in (
            ("asyncgone_replays_total", "replays/s (run())", "tab:green"),
            ("asyncgone_pool_timeouts_total", "pool timeouts/s", "tab:red"),
        ):
            ax2.plot(*rate(run, name), label=label, color=color)
        ax2.set_ylabel("per second")
        ax2.set_ylim(bottom=0)
        ax.legend(loc="center left", fontsize=8)
        ax2.legend(loc="center right", fontsize=8)

    def connections(ax: plt.Axes) -> None:
        for name, label in (
            ("asyncgone_pool_checked_out", "used"),
            ("asyncgone_pool_idle", "idle"),
            ("asyncgone_pool_idle_dead", "idle, known dead"),
            ("asyncgone_pool_pending_requests", "pending requests"),
        ):
            ax.step(scrape_times, gauge(name), where="post", label=label)
        ax.axhline(
            value(run.scrapes[-1][1], "asyncgone_pool_max"), color="grey", ls=":", label="max"
        )
        ax.legend(loc="upper left", fontsize=8, ncol=2)

    def timing(histogram: str) -> Callable[[plt.Axes], None]:
        def panel(ax: plt.Axes) -> None:
            for q, style in ((0.5, "-"), (0.99, "--")):
                ax.plot(*quantile(run, histogram, q), ls=style, label=f"p{int(q * 100)}")
            ax.set_yscale("log")
            ax.legend(loc="upper left", fontsize=8)

        return panel

    def replaced(ax: plt.Axes) -> None:
        reasons = sorted(
            {
                dict(labels)["reason"]
                for _, scrape in run.scrapes
                for (name, labels) in scrape
                if name == "asyncgone_connections_replaced_total"
            }
        )
        for reason in reasons:
            ax.plot(*rate(run, "asyncgone_connections_replaced_total", reason=reason), label=reason)
        ax.plot(
            *rate(run, "asyncgone_connections_opened_total"), color="black", ls=":", label="opened"
        )
        ax.legend(loc="upper left", fontsize=8)

    def create_time(ax: plt.Axes) -> None:
        count = rate(run, "asyncgone_connection_create_seconds_count")
        total = rate(run, "asyncgone_connection_create_seconds_sum")
        points = [
            (t, s / n * 1000) for t, n, s in zip(count[0], count[1], total[1], strict=True) if n
        ]
        ax.plot(*zip(*points, strict=True), "o", markersize=4, label="create time")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", fontsize=8)

    panels: list[tuple[str, str, Callable[[plt.Axes], None]]] = [
        ("Throughput", "checkouts per second", throughput),
        ("Pool connections", "connections", connections),
        ("Wait for a connection", "ms (log)", timing("asyncgone_connection_wait_seconds")),
        (
            "Connection use (checkout to return)",
            "ms (log)",
            timing("asyncgone_connection_use_seconds"),
        ),
        ("Connections replaced, by reason", "per second", replaced),
        ("Connection create time (mean per second)", "ms", create_time),
    ]
    for ax, (name, unit, fill) in zip(axes.flat, panels, strict=True):
        fill(ax)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(unit)
        ax.axvline(KILL_AT, color="red", alpha=0.5)
        ax.axvspan(*BURST, color="orange", alpha=0.12)
        ax.axvspan(*IDLE, color="grey", alpha=0.15)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    top = axes[0][0]
    for x, label in ((KILL_AT, "KILL"), (BURST[0], "burst"), (IDLE[0], "idle")):
        top.annotate(
            label,
            (x, 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            xytext=(2, -10),
            textcoords="offset points",
        )
    fig.tight_layout()
    fig.savefig(out, dpi=90)


async def main(args: argparse.Namespace) -> None:
    url = make_url(args.url).set(drivername=f"mysql+{args.driver}")
    registry = CollectorRegistry()
    db = asyncgone.Database(
        url,
        keepalive=False,
        pool_size=4,
        max_overflow=2,
        pool_timeout=0.5,
        connect_args={"init_command": "SET SESSION wait_timeout=4"},
    )
    async with db:
        asyncgone.prometheus.register(db, name="main", registry=registry)
        run = Run(db, registry)
        async with anyio.create_task_group() as tg:
            tg.start_soon(run.scrape)
            for _ in range(STEADY):
                tg.start_soon(run.steady)
            for _ in range(BURSTING):
                tg.start_soon(run.burst)
            tg.start_soon(run.kill, url.render_as_string(hide_password=False))
    title = f"asyncgone metrics over one run ({args.driver}, pool_size=4, max_overflow=2)"
    draw(run, args.out, title)
    last = run.scrapes[-1][1]
    totals = {name: v for (name, labels), v in last.items() if name.endswith("_total") and v}
    print(f"wrote {args.out} ({len(run.scrapes)} scrapes); totals: {totals}")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="mysql://root@127.0.0.1:3306/test")
    parser.add_argument("--driver", default="asyncmy", choices=["asyncmy", "aiomysql"])
    parser.add_argument("--out", default="docs/images/dashboard.png")
    return parser.parse_args(argv)


if __name__ == "__main__":
    anyio.run(main, parse(sys.argv[1:]))
