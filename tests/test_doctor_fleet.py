"""``asyncgone doctor --processes N``: a fleet's connections against the server's limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from asyncgone._fleet import admin_privileged
from asyncgone.testing import MariaDBServer
from tests.test_cli import asyncgone


@pytest.fixture(scope="module")
def server() -> Iterator[MariaDBServer]:
    """max_connections=28; ``app`` without administrative privileges, ``capped`` with
    ``MAX_USER_CONNECTIONS 10``."""
    with MariaDBServer(options=["--max-connections=28"]) as server:
        server.query("CREATE USER IF NOT EXISTS 'app'@'%'")
        server.query("GRANT ALL ON test.* TO 'app'@'%'")
        server.query("CREATE USER IF NOT EXISTS 'capped'@'%' WITH MAX_USER_CONNECTIONS 10")
        server.query("GRANT ALL ON test.* TO 'capped'@'%'")
        yield server


def url(server: MariaDBServer, user: str) -> str:
    return f"mysql+asyncmy://{user}@{server.host}:{server.port}/test"


def doctor_json(*args: str) -> dict[str, Any]:
    result = asyncgone("doctor", *args, "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_a_fleet_whose_overflow_does_not_fit(server: MariaDBServer) -> None:
    """6 x (4 + 2) against max_connections=28: the pools fit, the overflow does not; the
    advice gives the max_overflow that fits and the limit that would take the peak."""
    report = doctor_json(
        url(server, "app"), "--processes", "6", "--pool-size", "4", "--max-overflow", "2"
    )
    fleet = report["fleet"]
    assert fleet["pools"] == 24
    assert fleet["peak"] == 36
    assert fleet["max_connections"] == 28
    assert fleet["available"] == 28 - fleet["others_connected"]
    assert fleet["reserved_for_admins"] == 1
    assert fleet["admin_account"] is False
    (advice,) = [line for line in report["advice"] if "overflow" in line]
    assert "lower max_overflow to 0 or raise the limit to 36" in advice


def test_a_fleet_whose_pools_do_not_fit(server: MariaDBServer) -> None:
    """50 x pool_size 20 cannot be kept open at all: the advice names a pool_size that fits."""
    report = doctor_json(url(server, "app"), "--processes", "50", "--pool-size", "20")
    assert report["fleet"]["pools"] == 1000
    assert any("Lower pool_size to 1" in line for line in report["advice"])


def test_a_fleet_that_fits(server: MariaDBServer) -> None:
    report = doctor_json(
        url(server, "app"), "--processes", "2", "--pool-size", "4", "--max-overflow", "2"
    )
    assert report["fleet"]["peak"] == 12
    assert any(line.startswith("The fleet fits: at most 12") for line in report["advice"])


def test_max_user_connections_limits_the_account(server: MariaDBServer) -> None:
    """An account limited to 10 connections gets 10, whatever max_connections says."""
    report = doctor_json(url(server, "capped"), "--processes", "3", "--pool-size", "4")
    fleet = report["fleet"]
    assert fleet["max_user_connections"] == 10
    assert fleet["available"] == 10
    assert any("max_user_connections=10" in line for line in report["advice"])


def test_an_administrative_account_is_pointed_out(server: MariaDBServer) -> None:
    """root has SUPER: it may take the administrators' connection; the advice says so."""
    report = doctor_json(url(server, "root"), "--processes", "2")
    assert report["fleet"]["admin_account"] is True
    assert any("SUPER or CONNECTION ADMIN" in line for line in report["advice"])


def test_the_text_report_shows_the_fleet(server: MariaDBServer) -> None:
    result = asyncgone(
        "doctor", url(server, "app"), "--processes", "6", "--pool-size", "4", "--max-overflow", "2"
    )
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.strip().startswith("fleet")]
    assert "6 x (pool 4 + overflow 2): 24 kept, up to 36 at a peak" in line
    assert "max_connections 28" in line
    assert "Nothing to change" not in result.stdout


def test_without_processes_there_is_no_fleet(server: MariaDBServer) -> None:
    assert doctor_json(url(server, "app"))["fleet"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--processes", "0"], "--processes must be a whole number of at least 1, got 0"),
        (["--processes", "2", "--pool-size", "0"], "--pool-size must be a whole number"),
        (["--processes", "2", "--max-overflow", "-1"], "--max-overflow must be a whole number"),
    ],
)
def test_bad_fleet_figures_are_refused_before_connecting(args: list[str], message: str) -> None:
    """Exit 2 with the message, against a port nobody listens on: nothing was tried."""
    result = asyncgone("doctor", "mysql+asyncmy://app@127.0.0.1:1/test", *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    ("grants", "admin"),
    [
        (["GRANT ALL PRIVILEGES ON *.* TO `root`@`%` WITH GRANT OPTION"], True),
        (["GRANT SUPER ON *.* TO `ops`@`%`"], True),
        (["GRANT CONNECTION ADMIN, PROCESS ON *.* TO `ops`@`%`"], True),
        (
            ["GRANT USAGE ON *.* TO `app`@`%`", "GRANT ALL PRIVILEGES ON `test`.* TO `app`@`%`"],
            False,
        ),
        (["GRANT SELECT ON `super`.* TO `app`@`%`"], False),
    ],
)
def test_administrative_privileges_are_recognised(grants: list[str], admin: bool) -> None:
    """Only a global SUPER, CONNECTION ADMIN or ALL PRIVILEGES lets an account past the limit."""
    assert admin_privileged(grants) is admin
