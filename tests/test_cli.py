"""The ``asyncgone`` command line: doctor and demo, run as users run them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyncgone import create_engine, keepalive
from asyncgone._server import auto_idle_limit
from tests._support import Server

FAULTS = (
    "idle past wait_timeout",
    "KILL CONNECTION",
    "connections reset (restart)",
    "network blackhole (LB forgot the flow)",
)
# What plain SQLAlchemy shows for each fault: the server's or the driver's disconnect code
# (2006 or 2013, depending on the driver), and a hang where pool_pre_ping waits on a
# blackholed connection.
PLAIN_FAILS = {
    "idle past wait_timeout": r"failed \((2006|2013)\)",
    "KILL CONNECTION": r"failed \((2006|2013)\)",
    "connections reset (restart)": r"failed \((2006|2013)\)",
    "network blackhole (LB forgot the flow)": r"hung; gave up after \d+ s",
}
ASYNCGONE_OK = r"ok in \d+\.\d\d s(, replaced: \w+(, \w+)*)?"
PROGRESS = re.compile(
    r"^  (?P<fault>.+?) \.\.\. SQLAlchemy: (?P<plain>.+?) \| asyncgone: (?P<ours>.+)$"
)


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


async def keepalive_interval(url: str) -> float:
    """The interval asyncgone's keepalive picks for a pool of connections to ``url``."""
    engine = create_engine(url)
    try:
        async with engine.connect():
            pass
        return keepalive(engine).interval
    finally:
        await engine.dispose()


def test_doctor_reports_settings_and_sleeping_connections(disposable: Server) -> None:
    """Text and JSON give this client's and the global timeouts, the net timeouts,
    max_connections, the interval asyncgone's keepalive really uses, and another client's
    idle connection with how long it has slept."""
    url = disposable.url(
        "asyncmy",
        init_command="SET SESSION wait_timeout=30, interactive_timeout=45, "
        "net_read_timeout=17, net_write_timeout=23",
    )
    ((wait_global, interactive_global, max_connections),) = disposable.query(
        "SELECT @@global.wait_timeout, @@global.interactive_timeout, @@global.max_connections"
    )
    interval = round(asyncio.run(keepalive_interval(url)), 1)
    with disposable.admin() as sleeper:
        sleeper.execute("SELECT CONNECTION_ID()")
        sleeper_id = int(sleeper.fetchone()[0])
        time.sleep(2.5)  # the server counts idle time in whole seconds
        as_json = asyncgone("doctor", "--json", url)
        as_text = asyncgone("doctor", url)

    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert {
        name: report["server"][name]
        for name in (
            "wait_timeout_session",
            "wait_timeout_global",
            "interactive_timeout_session",
            "interactive_timeout_global",
            "net_read_timeout",
            "net_write_timeout",
            "max_connections",
        )
    } == {
        "wait_timeout_session": 30,
        "wait_timeout_global": wait_global,
        "interactive_timeout_session": 45,
        "interactive_timeout_global": interactive_global,
        "net_read_timeout": 17,
        "net_write_timeout": 23,
        "max_connections": max_connections,
    }
    assert report["threads_connected"] >= 2  # the sleeper and doctor's own connection
    assert report["derived"]["keepalive_interval_s"] == interval
    (slept,) = [s for s in report["sleeping"] if s["id"] == sleeper_id]
    assert (slept["user"], slept["db"]) == ("root", "test")
    assert 2 <= slept["idle_s"] < 120

    assert as_text.returncode == 0, as_text.stderr
    for pattern in (
        rf"^  wait_timeout +30 s for this client \(global {wait_global} s\)$",
        rf"^  interactive_timeout +45 s for this client \(global {interactive_global} s\)$",
        r"^  net timeouts +read 17 s, write 23 s$",
        rf"^  connections +\d+ of {max_connections}$",
        rf"^  keepalive every +{re.escape(f'{interval:g}')} s \(interval='auto'\)$",
    ):
        assert re.search(pattern, as_text.stdout, re.M), (pattern, as_text.stdout)
    line = re.search(rf"^ +{sleeper_id}  idle +(\d+) s  root@\S+ test$", as_text.stdout, re.M)
    assert line, as_text.stdout
    assert 2 <= int(line[1]) < 120


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


def test_doctor_unknown_database(shared: Server) -> None:
    """A database that does not exist is called that, with how to create it, exit code 5."""
    url = dataclasses.replace(shared, database="asyncgone_no_such_db").url("asyncmy")
    result = asyncgone("doctor", url)
    assert result.returncode == 5, result.stderr
    assert "database 'asyncgone_no_such_db' does not exist on mysql+asyncmy://" in result.stderr
    assert "CREATE DATABASE `asyncgone_no_such_db`" in result.stderr
    assert "cannot reach" not in result.stderr
    assert "Traceback" not in result.stderr
    if shared.password:
        assert shared.password not in result.stderr


def test_doctor_database_without_grant(disposable: Server) -> None:
    """A user who may log in but not use the database is told to grant it, exit code 4."""
    disposable.query("CREATE USER IF NOT EXISTS 'doc'@'%' IDENTIFIED BY 'right-one'")
    result = asyncgone(
        "doctor", f"mysql+asyncmy://doc:right-one@{disposable.host}:{disposable.port}/test"
    )
    assert result.returncode == 4, result.stderr
    assert "access denied to mysql+asyncmy://doc:***@" in result.stderr
    assert "no grant on database 'test'" in result.stderr
    assert "right-one" not in result.stderr


def test_doctor_wrong_password(disposable: Server) -> None:
    """Access denied has its own exit code and message."""
    disposable.query("CREATE USER IF NOT EXISTS 'doc'@'%' IDENTIFIED BY 'right-one'")
    result = asyncgone(
        "doctor", f"mysql+asyncmy://doc:wrong-one@{disposable.host}:{disposable.port}/test"
    )
    assert result.returncode == 4
    assert "access denied" in result.stderr
    assert "wrong-one" not in result.stderr


def summary(stdout: str) -> dict[str, tuple[str, str]]:
    """The demo's closing table: fault -> (plain SQLAlchemy cell, asyncgone cell), cut at the
    header's column positions."""
    lines = stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("fault "))
    plain_at = lines[header].index("plain SQLAlchemy")
    ours_at = lines[header].index("asyncgone")
    assert set(lines[header + 1]) == {"-", " "}
    rows = {}
    for line in lines[header + 2 :]:
        rows[line[:plain_at].strip()] = (line[plain_at:ours_at].strip(), line[ours_at:].strip())
    return rows


def check_demo(stdout: str) -> None:
    """Per fault: a progress line while it runs, then a table row, both with plain
    SQLAlchemy failing in its column and asyncgone succeeding in its own."""
    progress = {
        m["fault"]: (m["plain"], m["ours"]) for m in map(PROGRESS.match, stdout.splitlines()) if m
    }
    table = summary(stdout)
    assert list(table) == list(FAULTS), stdout
    assert progress == table, stdout
    for fault, (plain, ours) in table.items():
        assert re.fullmatch(PLAIN_FAILS[fault], plain), (fault, plain)
        assert re.fullmatch(ASYNCGONE_OK, ours), (fault, ours)


def test_demo_shows_plain_sqlalchemy_failing_and_asyncgone_surviving(shared: Server) -> None:
    """The demo runs in well under a minute, prints each fault's outcome as it goes and ends
    with a table: every fault breaks plain SQLAlchemy (an error or a hang) and none breaks
    asyncgone."""
    started = time.monotonic()
    result = asyncgone("demo", shared.url("asyncmy"))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 45
    check_demo(result.stdout)


def test_demo_falls_back_to_a_disposable_server() -> None:
    """With the default database unreachable, the demo starts its own MariaDB and runs there."""
    result = asyncgone("demo", env={"DATABASE_URL": "mysql+asyncmy://root@127.0.0.1:1/test"})
    assert result.returncode == 0, result.stderr
    assert (
        "cannot reach mysql+asyncmy://root@127.0.0.1:1/test: starting a disposable MariaDB"
        in result.stdout
    )
    assert re.search(
        r"^asyncgone demo against mysql\+asyncmy://root@127\.0\.0\.1:\d+/test$", result.stdout, re.M
    )
    check_demo(result.stdout)


@pytest.fixture
def broken_server(tmp_path: Path) -> dict[str, str]:
    """An environment whose ``mariadbd`` exits at once with an error, as a server that cannot
    start does (a bad option, a full disk), and whose temporary files go to an empty
    directory of their own."""
    bin_dir, tmp_dir = tmp_path / "bin", tmp_path / "tmp"
    bin_dir.mkdir()
    tmp_dir.mkdir()
    fake = bin_dir / "mariadbd"
    fake.write_text("#!/bin/sh\necho '[ERROR] Aborting' >&2\nexit 1\n")
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_dir)}


def test_demo_reports_a_disposable_server_that_does_not_start(
    broken_server: dict[str, str],
) -> None:
    """A disposable server that cannot start ends the demo with a clear message and exit
    code 1, not a traceback, and leaves no data directory behind."""
    result = asyncgone(
        "demo", env={"DATABASE_URL": "mysql+asyncmy://root@127.0.0.1:1/test", **broken_server}
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "asyncgone: cannot reach mysql+asyncmy://root@127.0.0.1:1/test, and a disposable "
        "MariaDB did not start: " in result.stderr
    )
    assert "pass the URL of a running one" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(Path(broken_server["TMPDIR"]).iterdir()) == []


def documented_doctor_sample() -> list[str]:
    """The output lines of the `asyncgone doctor` console sample on the observability page."""
    page = (Path(__file__).parents[1] / "docs" / "observability.md").read_text()
    match = re.search(r"```console\n\$ asyncgone doctor \S+\n(.*?)```", page, re.DOTALL)
    assert match is not None, "the observability page lost its doctor sample"
    return match.group(1).splitlines()


def test_documented_doctor_sample_matches_the_console_script(shared: Server) -> None:
    """The installed `asyncgone` command prints what the observability page shows: the same
    labels, sections and value shapes, line by line (values differ from server to server)."""
    url = shared.url("asyncmy")
    with shared.admin():  # one sleeping connection, so that section is printed too
        time.sleep(1.1)
        script = Path(sys.executable).with_name("asyncgone")
        result = subprocess.run(
            [str(script), "doctor", url], capture_output=True, text=True, timeout=60, check=False
        )
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    assert printed[0] == f"asyncgone doctor: {url}"
    digits = re.compile(r"\d+(\.\d+)?")
    for line in documented_doctor_sample()[1:]:
        if line.strip() in ("...", "") or line.startswith("        "):
            continue  # elided lines and the rows of the sleeping-connections table
        label = re.split(r" {2,}|(?<=:)$", line.rstrip(), maxsplit=1)[0]
        if line.lstrip().startswith("- "):  # advice: the first words of each piece of advice
            indent = line[: len(line) - len(line.lstrip())]
            label = indent + " ".join(line.split()[:5])
        shape = digits.sub("N", line.rstrip().removesuffix(" ..."))
        assert any(p.startswith(label) for p in printed), f"no {label!r} line in:\n{result.stdout}"
        if not line.rstrip().endswith("..."):
            assert any(digits.sub("N", p) == shape for p in printed), (
                f"the page shows {line!r}, the command prints nothing shaped like it"
            )
