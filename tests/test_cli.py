"""The ``asyncgone`` command line: doctor and demo, run as users run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from asyncgone._server import auto_idle_limit
from tests._support import Server


def asyncgone(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncgone", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_doctor_reports_and_advises(shared: Server) -> None:
    """The human report names the server, its timeouts, the round trip, and advice."""
    result = asyncgone("doctor", shared.url("asyncmy"))
    assert result.returncode == 0, result.stderr
    for expected in (
        "server",
        "round trip",
        "wait_timeout",
        "max_allowed_packet",
        "advice:",
        "idle limit",
    ):
        assert expected in result.stdout


def test_doctor_json_follows_what_this_client_gets(shared: Server) -> None:
    """With an init command shortening this client's wait_timeout, doctor reports and
    derives from the session value, and says why it differs from the global one."""
    url = shared.url("aiomysql") + "?init_command=SET SESSION wait_timeout=30"
    result = asyncgone("doctor", "--json", url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["server"]["wait_timeout_session"] == 30
    assert report["derived"]["idle_limit_s"] == round(auto_idle_limit(30), 1)
    assert report["round_trip_ms"] > 0
    advice = " ".join(report["advice"])
    assert "This client gets wait_timeout=30 s" in advice
    assert "wait_timeout is short (30 s)" in advice


@pytest.mark.parametrize(
    ("url", "code", "message"),
    [
        (
            "mysql+asyncmy://root:hunter2@127.0.0.1:1/test",
            3,
            "cannot reach mysql+asyncmy://root:***@127.0.0.1:1/test",
        ),
        ("postgresql://u:hunter2@h/db", 2, "works with MySQL and MariaDB only"),
        ("not-a-url:hunter2@x", 2, "could not parse database URL"),
    ],
)
def test_doctor_failures_are_clear(url: str, code: int, message: str) -> None:
    """Unreachable host and bad URLs: a clear one-line error, its exit code, no password."""
    result = asyncgone("doctor", url)
    assert result.returncode == code
    assert message in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_doctor_wrong_password(disposable: Server) -> None:
    """Access denied has its own exit code and message."""
    disposable.query("CREATE USER IF NOT EXISTS 'doc'@'%' IDENTIFIED BY 'right-one'")
    result = asyncgone(
        "doctor", f"mysql+asyncmy://doc:wrong-one@{disposable.host}:{disposable.port}/test"
    )
    assert result.returncode == 4
    assert "access denied" in result.stderr
    assert "wrong-one" not in result.stderr


def test_demo_shows_plain_sqlalchemy_failing_and_asyncgone_surviving(shared: Server) -> None:
    """The demo runs in well under a minute and ends with a table: every fault breaks plain
    SQLAlchemy (an error or a hang) and none breaks asyncgone."""
    started = time.monotonic()
    result = asyncgone("demo", shared.url("asyncmy"))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 45
    rows = [
        line
        for line in result.stdout.splitlines()
        if line.startswith(("idle", "KILL", "connections", "network"))
    ]
    table = rows[-4:]
    assert len(table) == 4
    for row in table:
        assert "failed" in row or "hung" in row, row
        assert " ok in " in row, row


def test_demo_falls_back_to_a_disposable_server() -> None:
    """With the default database unreachable, the demo starts its own MariaDB."""
    result = asyncgone("demo", env={"DATABASE_URL": "mysql+asyncmy://root@127.0.0.1:1/test"})
    assert result.returncode == 0, result.stderr
    assert "starting a disposable MariaDB" in result.stdout
    assert result.stdout.count(" ok in ") >= 4
