"""Scenario: a fleet of six processes through a server crash (issue #14, fleets).

Six real processes, each a ``Database(pool_size=4, max_overflow=2)`` running units of work
through ``run()`` against a disposable server whose ``max_connections`` (28) covers the
pools but not every overflow; the server is killed with SIGKILL and started again under load
(``benchmarks/fleet.py`` runs it, and prints the figures with and without the cap).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# Several minutes of six processes each: with the topologies (tox env ``topology``).
pytestmark = pytest.mark.topology

FLEET = Path(__file__).parents[2] / "benchmarks" / "fleet.py"


def run_fleet(driver: str, mode: str, *options: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(FLEET), "--driver", driver, "--mode", mode, "--json", *options],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def test_a_fleet_rides_out_a_crash_without_a_storm(driver: str) -> None:
    """Every unit completes (each row is there exactly once; a COMMIT lost in the crash is
    checked and completed, as the docs advise), no process gives up, and the server
    refuses few connections: the fleet waits for capacity instead of hammering."""
    figures = run_fleet(driver, "cap")
    assert figures["processes_gave_up"] == 0
    assert figures["exit_codes"] == [0] * figures["processes"]
    assert figures["units_failed"] == 0, figures["failures"]
    assert figures["units_done"] > 0
    assert figures["rows"] == figures["units_done"]
    # Without the cap the same fleet hammers the restarting server: 71 to 97 refused
    # attempts in its worst second (docs/fleets.md has the figures); with it, each process
    # probes the refusing server one attempt at a time, backing off from 0.05-0.1 s, so at
    # most about 5 refusals a second each. (All attempts, refused or not, would not tell:
    # they include the pools' own churn of overflow connections, 35 to 68 a second in
    # steady state, and the 36 connects the fleet needs again after the crash.)
    assert figures["peak_refused_per_s_after_crash"] <= figures["processes"] * 6, figures
    assert figures["server_refused_after_crash"] <= 2 * figures["max_connections"], figures


def test_a_late_process_gets_its_pool_from_the_running_processes_overflow(driver: str) -> None:
    """Staggered (one process a second), against ``max_connections=24``: the pools (6 x 4) fit,
    every overflow does not, and each process starts its load as soon as it has started. The
    running processes give their overflow back when the server refuses the late ones, and
    every process starts and completes every unit of work. Without asyncgone's fleet
    measures 2 of 6 processes gave up (docs/fleets.md has the figures)."""
    figures = run_fleet(driver, "cap", "--staggered", "--max-connections", "24")
    assert figures["overflow_given_back"] > 0, figures
    assert figures["processes_gave_up"] == 0, figures
    assert figures["units_failed"] == 0, figures["failures"]
    assert figures["rows"] == figures["units_done"] > 0
