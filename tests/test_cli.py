"""The ``asyncgone`` command line: doctor and demo, run as users run them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncgone import __version__, create_engine, keepalive
from asyncgone._server import auto_idle_limit
from asyncgone._url import mask
from asyncgone.testing import FaultProxy, MariaDBServer, TLSCertificates
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
# A fault's line: its name, for a long wait what it waits for and a dot per second, then
# both outcomes.
PROGRESS = re.compile(
    r"^  (?P<fault>.+?) \.\.\.(?P<waiting> waiting up to \d+ s \(.+?\) \.+)? "
    r"SQLAlchemy: (?P<plain>.+?) \| asyncgone: (?P<ours>.+)$"
)
LEGEND = (
    "'ok in N s' is how long that first query after the fault took, from asking the pool "
    "for a connection to the result"
)
APP_USER, APP_PASSWORD = "app", "tls-only-secret"


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
    """The human report names the server, its encryption, its timeouts, the round trip, and
    advice."""
    result = asyncgone("doctor", shared.url("asyncmy"))
    assert result.returncode == 0, result.stderr
    for expected in (
        "server",
        "tls",
        "round trip",
        "wait_timeout",
        "max_allowed_packet",
        "advice:",
        "idle limit",
    ):
        assert expected in result.stdout


def test_version_is_printed_by_both_flags() -> None:
    """``--version`` and ``-V`` print the package's version and exit 0."""
    for flag in ("--version", "-V"):
        result = asyncgone(flag)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"asyncgone {__version__}\n"


def test_no_command_prints_the_help() -> None:
    """Without a command, the whole help goes to stderr with exit code 2 (bad usage), not
    argparse's error about a missing argument."""
    result = asyncgone()
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == asyncgone("--help").stdout
    for expected in ("usage: asyncgone", "doctor", "demo", "--version"):
        assert expected in result.stderr
    assert "required" not in result.stderr


def advice_paragraphs(lines: list[str]) -> list[str]:
    """The advice of doctor's text report, each piece unwrapped to one line."""
    paragraphs: list[str] = []
    for line in lines[lines.index("advice:") + 1 :]:
        if line.startswith("  - "):
            paragraphs.append(line[4:])
        elif line.startswith("    ") and paragraphs:
            paragraphs[-1] += " " + line.strip()
    return paragraphs


def test_doctor_wraps_its_advice_to_the_terminal(shared: Server) -> None:
    """On a narrow terminal every advice line fits, continuations are indented under their
    piece, and the JSON keeps each piece on one line."""
    url = shared.url("asyncmy", init_command="SET SESSION wait_timeout=30")
    as_text = asyncgone("doctor", url, env={"COLUMNS": "60"})
    as_json = asyncgone("doctor", "--json", url, env={"COLUMNS": "60"})
    assert as_text.returncode == 0, as_text.stderr
    lines = as_text.stdout.splitlines()
    advice = lines[lines.index("advice:") + 1 :]
    assert len(advice) > len(json.loads(as_json.stdout)["advice"])  # something was wrapped
    assert all(len(line) <= 60 for line in advice), advice
    assert all(line.startswith(("  - ", "    ")) for line in advice), advice
    assert advice_paragraphs(lines) == json.loads(as_json.stdout)["advice"]


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
    """Access denied has its own exit code and message; with --json it is also printed as
    JSON on stdout, and an unusable URL likewise, never with the password."""
    disposable.query("CREATE USER IF NOT EXISTS 'doc'@'%' IDENTIFIED BY 'right-one'")
    url = f"mysql+asyncmy://doc:wrong-one@{disposable.host}:{disposable.port}/test"
    result = asyncgone("doctor", url)
    assert result.returncode == 4
    assert "access denied" in result.stderr
    assert "wrong-one" not in result.stderr
    as_json = asyncgone("doctor", "--json", url)
    assert as_json.returncode == 4
    failure = json.loads(as_json.stdout)
    assert (failure["ok"], failure["exit_code"]) == (False, 4)
    assert failure["error"].startswith("access denied to mysql+asyncmy://doc:***@")
    unusable = asyncgone("doctor", "--json", url.replace(f":{disposable.port}", ":99999"))
    assert unusable.returncode == 2
    assert "port 99999 in the URL is out of range" in json.loads(unusable.stdout)["detail"]
    for printed in (as_json, unusable):
        assert "wrong-one" not in printed.stdout + printed.stderr


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
    """The demo first says what its times measure. Per fault: a progress line while it
    runs (for the blackhole, what it waits for, then a dot per second of waiting), then a
    table row, both with plain SQLAlchemy failing in its column and asyncgone succeeding in
    its own."""
    assert LEGEND in " ".join(stdout.split()), stdout
    matches = [m for m in map(PROGRESS.match, stdout.splitlines()) if m]
    progress = {m["fault"]: (m["plain"], m["ours"]) for m in matches}
    waiting = [m["fault"] for m in matches if m["waiting"]]
    assert waiting == ["network blackhole (LB forgot the flow)"], stdout
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


@pytest.fixture(scope="module")
def tls_server() -> Iterator[MariaDBServer]:
    """A disposable MariaDB serving TLS, with an account that may only log in over TLS."""
    with MariaDBServer(tls=True) as server:
        server.create_user(APP_USER, APP_PASSWORD, require_tls=True)
        yield server


def app_url(server: MariaDBServer, driver: str = "asyncmy", port: int | None = None) -> str:
    """The TLS-only account's URL (through ``port`` when given), without TLS settings."""
    return Server(server.host, port or server.port, APP_USER, APP_PASSWORD).url(driver)


def test_documented_doctor_sample_matches_the_console_script(tls_server: MariaDBServer) -> None:
    """The installed `asyncgone` command prints what the observability page shows for a
    verified TLS connection: the same labels, sections and value shapes, line by line
    (values differ from server to server), and the same advice as an 80-column terminal
    wraps it."""
    url = f"{app_url(tls_server)}?ssl_ca={tls_server.ca_file}"
    # One sleeping connection, so that section is printed too.
    with Server(tls_server.host, tls_server.port).admin():
        time.sleep(1.1)
        script = Path(sys.executable).with_name("asyncgone")
        result = subprocess.run(
            [str(script), "doctor", url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "COLUMNS": "80"},
        )
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    assert printed[0] == f"asyncgone doctor: {mask(url)}"
    assert APP_PASSWORD not in result.stdout
    digits = re.compile(r"\d+(\.\d+)?")
    sample = documented_doctor_sample()
    for line in sample[1 : sample.index("advice:") + 1]:
        if line.strip() in ("...", "") or line.startswith("        "):
            continue  # elided lines and the rows of the sleeping-connections table
        label = re.split(r" {2,}|(?<=:)$", line.rstrip(), maxsplit=1)[0]
        shape = digits.sub("N", line.rstrip().removesuffix(" ..."))
        assert any(p.startswith(label) for p in printed), f"no {label!r} line in:\n{result.stdout}"
        if not line.rstrip().endswith("..."):
            assert any(digits.sub("N", p) == shape for p in printed), (
                f"the page shows {line!r}, the command prints nothing shaped like it"
            )
    # Advice, wrapped as on an 80-column terminal; each documented piece (or its start, when
    # it ends with "...") is printed.
    documented_advice = sample[sample.index("advice:") :]
    assert all(len(line) <= 80 for line in documented_advice), "advice wider than 80 columns"
    printed_advice = [digits.sub("N", p) for p in advice_paragraphs(printed)]
    for piece in advice_paragraphs(sample):
        start = digits.sub("N", piece.removesuffix(" ...").removesuffix("..."))
        assert any(p.startswith(start) for p in printed_advice), (piece, result.stdout)


def test_doctor_reports_a_verified_tls_connection(tls_server: MariaDBServer) -> None:
    """Over verified TLS, text and JSON give the version, cipher and checks the server and
    client report, and no advice about encryption."""
    url = f"{app_url(tls_server)}?ssl_ca={tls_server.ca_file}"
    as_text, as_json = asyncgone("doctor", url), asyncgone("doctor", "--json", url)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    tls = report["tls"]
    assert tls == {
        "encrypted": True,
        "version": "TLSv1.3",
        "cipher": tls["cipher"],
        "client_encrypted": True,
        "certificate_verified": True,
        "hostname_checked": True,
    }
    assert tls["cipher"].startswith("TLS_")
    assert report["network"] == {"transport": "tcp", "peer": "127.0.0.1", "local": True}
    assert not any("TLS" in advice or "clear text" in advice for advice in report["advice"])
    assert as_text.returncode == 0, as_text.stderr
    expected = (
        f"  tls                 TLSv1.3, {tls['cipher']}; certificate verified, host name checked"
    )
    assert expected in as_text.stdout.splitlines()
    assert APP_PASSWORD not in as_text.stdout + as_json.stdout


def test_doctor_warns_about_an_unverified_certificate(tls_server: MariaDBServer) -> None:
    """Encrypted without verification (asyncmy given TLS settings but no CA): the report
    says the certificate was not verified, and the advice says who could pose as the server."""
    result = asyncgone("doctor", f"{app_url(tls_server)}?ssl_check_hostname=false")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^  tls +TLSv1\.\d, \S+; certificate NOT verified$", result.stdout, re.M)
    advice = " ".join(advice_paragraphs(result.stdout.splitlines()))
    assert "this client did not verify the server's certificate" in advice


def non_loopback_address() -> str:
    """An address of this machine that is not a loopback one: the source of its default
    route (connecting a UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))
        except OSError:
            pytest.skip("this machine has no default route, hence no non-loopback address")
        return str(probe.getsockname()[0])


def test_doctor_warns_about_clear_text_across_the_network(tls_server: MariaDBServer) -> None:
    """A clear-text connection to a non-loopback address is reported and warned about; the
    same over TLS, or clear text on this machine, is not."""
    address = non_loopback_address()
    with FaultProxy(tls_server.host, tls_server.port, host=address) as proxy:
        remote = f"mysql+asyncmy://root@{address}:{proxy.port}/test"
        as_text, as_json = asyncgone("doctor", remote), asyncgone("doctor", "--json", remote)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["network"] == {"transport": "tcp", "peer": address, "local": False}
    assert (report["tls"]["encrypted"], report["tls"]["client_encrypted"]) == (False, False)
    warning = f"This connection crosses the network to {address} in clear text"
    assert report["advice"][0].startswith(warning)
    assert as_text.returncode == 0, as_text.stderr
    assert f"  tls                 none: clear text across the network to {address}" in (
        as_text.stdout.splitlines()
    )
    assert warning in " ".join(advice_paragraphs(as_text.stdout.splitlines()))

    local = asyncgone("doctor", tls_server.url("asyncmy"))
    assert local.returncode == 0, local.stderr
    assert "  tls                 none: clear text on this machine" in local.stdout.splitlines()
    assert "in clear text" not in local.stdout


def test_doctor_tls_failures_say_what_to_do(tls_server: MariaDBServer, tmp_path: Path) -> None:
    """A certificate from another CA, a TLS-only account without TLS, and a CA file that is
    not there each get their own message, exit code and remedy, and no password; TLS
    settings in an aiomysql URL work as in an asyncmy one."""
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(TLSCertificates.generate().ca_pem)
    wrong_ca = asyncgone("doctor", f"{app_url(tls_server)}?ssl_ca={other_ca}")
    assert wrong_ca.returncode == 1, wrong_ca.stderr
    assert "asyncgone: TLS with mysql+asyncmy://app:***@" in wrong_ca.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.stderr
    assert "give the CA that signed it" in wrong_ca.stderr

    clear = asyncgone("doctor", app_url(tls_server))
    assert clear.returncode == 4, clear.stderr
    assert "access denied" in clear.stderr
    assert "An account that requires TLS (REQUIRE SSL) is refused the same way" in clear.stderr

    missing = asyncgone("doctor", f"{app_url(tls_server)}?ssl_ca={tmp_path / 'nowhere.pem'}")
    assert missing.returncode == 2, missing.stderr
    assert f"ssl_ca='{tmp_path / 'nowhere.pem'}': no such file" in missing.stderr

    aiomysql_url = asyncgone(
        "doctor", "--json", f"{app_url(tls_server, 'aiomysql')}?ssl_ca={tls_server.ca_file}"
    )
    assert aiomysql_url.returncode == 0, aiomysql_url.stderr
    tls = json.loads(aiomysql_url.stdout)["tls"]
    assert (tls["encrypted"], tls["certificate_verified"], tls["hostname_checked"]) == (
        True,
        True,
        True,
    )
    for result in (wrong_ca, clear, missing, aiomysql_url):
        assert APP_PASSWORD not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr


def test_doctor_notices_a_tls_request_answered_in_clear_text(disposable: Server) -> None:
    """aiomysql given TLS settings by a server without TLS goes on in clear text: doctor
    reports the connection unencrypted and says that the URL asked for TLS."""
    [(have_ssl,)] = disposable.query("SELECT @@have_ssl")
    if have_ssl != "DISABLED":  # MariaDB 11.4 and later make their own certificates
        pytest.skip(f"the disposable server has TLS (have_ssl={have_ssl})")
    # Any TLS setting will do: the server never offers TLS, so aiomysql never uses it.
    url = disposable.url("aiomysql", ssl_check_hostname="false")
    result = asyncgone("doctor", "--json", url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tls"]["encrypted"] is False
    assert report["advice"][0].startswith("The URL asks for TLS (ssl_...), yet this connection")
