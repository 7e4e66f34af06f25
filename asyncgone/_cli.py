"""The ``asyncgone`` command: ``doctor`` and ``demo`` (also ``python -m asyncgone``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import TYPE_CHECKING, TextIO

from sqlalchemy.engine import URL

from ._config import DEFAULT_CONNECT_TIMEOUT
from ._errors import ConfigurationError, describe, error_code
from ._url import ENV_VAR, mask, resolve_url

if TYPE_CHECKING:
    from .testing import MariaDBServer

__all__ = ["main"]

LOCAL_URL = "mysql://root@127.0.0.1:3306/test"

# Exit codes: argparse itself exits 2 on bad usage, as does a bad URL here.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DENIED = 0, 1, 2, 3, 4
_DENIED = frozenset({1044, 1045, 1698})  # access denied (database, user/password, plugin)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncgone",
        description="Keep async SQLAlchemy on MySQL/MariaDB alive when connections die.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser(
        "doctor",
        help="examine a server's settings and advise",
        description="Examine a MySQL/MariaDB server's timeouts and limits, measure the round "
        "trip, list long-sleeping connections, and say what asyncgone will derive and what "
        "to change.",
    )
    doctor.add_argument("url", nargs="?", help=f"database URL (default: ${ENV_VAR})")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, help="seconds per step"
    )
    demo = commands.add_parser(
        "demo",
        help="plain SQLAlchemy and asyncgone through the same faults, side by side",
        description="Show plain SQLAlchemy failing and asyncgone surviving an idle timeout, a "
        "KILL, a connection reset and a network blackhole, in under a minute.",
    )
    demo.add_argument(
        "url",
        nargs="?",
        help=f"database URL (default: ${ENV_VAR}, else {LOCAL_URL}; if the default does not "
        "answer and MariaDB's server is installed, a disposable one)",
    )
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; return the exit code."""
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    try:
        if args.command == "doctor":
            return asyncio.run(_doctor(args, out))
        return asyncio.run(_demo(args, out))
    except ConfigurationError as exc:
        print(f"asyncgone: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: not an error of ours. Point stdout at devnull
        # so that the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


async def _doctor(args: argparse.Namespace, out: TextIO) -> int:
    from ._doctor import examine

    url = resolve_url(args.url)
    try:
        report = await examine(url, args.timeout)
    except Exception as exc:
        return _connect_failure(url, exc)
    if args.json:
        json.dump(report.as_dict(), out, indent=2, default=str)
        out.write("\n")
        return EXIT_OK
    server = report.server
    print(f"asyncgone doctor: {report.target}", file=out)
    print(f"  server            {server['version']} ({server['version_comment']})", file=out)
    print(f"  round trip        {report.round_trip_ms:.2f} ms (median of 5 pings)", file=out)
    print(
        f"  wait_timeout      {server['wait_timeout_session']} s for this client "
        f"(global {server['wait_timeout_global']} s, "
        f"interactive_timeout {server['interactive_timeout_global']} s)",
        file=out,
    )
    print(
        f"  net timeouts      read {server['net_read_timeout']} s, "
        f"write {server['net_write_timeout']} s",
        file=out,
    )
    print(f"  max_allowed_packet {server['max_allowed_packet']} bytes", file=out)
    print(
        f"  connections       {report.threads_connected} of {server['max_connections']}"
        f"{' (read-only server)' if str(server['read_only']) in ('1', 'ON') else ''}",
        file=out,
    )
    if report.sleeping:
        print("  longest sleeping connections:", file=out)
        for s in report.sleeping:
            print(
                f"    {s['id']:>8}  idle {s['idle_s']:>6} s  {s['user']}@{s['host']} {s['db']}",
                file=out,
            )
    derived = report.derived
    print("asyncgone will use:", file=out)
    print(f"  idle limit        {derived['idle_limit_s']:g} s (recycle='auto')", file=out)
    print(f"  keepalive every   {derived['keepalive_interval_s']:g} s (interval='auto')", file=out)
    print(
        f"  ping after        {derived['ping_after_s']:g} s idle; max lifetime "
        f"{derived['max_lifetime_s']:g} s",
        file=out,
    )
    print("advice:", file=out)
    for line in report.advice:
        print(f"  - {line}", file=out)
    return EXIT_OK


def _connect_failure(url: URL, exc: Exception) -> int:
    code = error_code(exc)
    target = mask(url)
    if code in _DENIED:
        print(
            f"asyncgone: access denied to {target}: {describe(exc)}. Check the user name and "
            "password in the URL, and the user's grants.",
            file=sys.stderr,
        )
        return EXIT_DENIED
    print(
        f"asyncgone: cannot reach {target}: {describe(exc)}. Check the host and port, that the "
        "server runs, and that nothing blocks the way.",
        file=sys.stderr,
    )
    return EXIT_UNREACHABLE if code in (2002, 2003, 2005, 2013) or code is None else EXIT_ERROR


async def _demo(args: argparse.Namespace, out: TextIO) -> int:
    from ._demo import run_demo, table
    from ._doctor import examine

    # A URL on the command line must work; the defaults ($DATABASE_URL, then the local
    # server) may be replaced by a disposable server.
    url = resolve_url(args.url or os.environ.get(ENV_VAR) or LOCAL_URL)
    server = None
    try:
        await examine(url, 3.0)
    except Exception as exc:
        if args.url:
            return _connect_failure(url, exc)
        server = _disposable_server(out, url)
        if server is None:
            return _connect_failure(url, exc)
        url = resolve_url(server.url(url.drivername.partition("+")[2]))
    try:
        print(f"asyncgone demo against {mask(url)}", file=out)
        outcomes = await run_demo(url, out)
        print("", file=out)
        print(table(outcomes), file=out)
    finally:
        if server is not None:
            server.close()
    return EXIT_OK


def _disposable_server(out: TextIO, url: URL) -> MariaDBServer | None:
    """Start a disposable MariaDB for the demo, or return None if that is not possible."""
    try:
        from .testing import MariaDBServer, ServerBinaryNotFound

        print(f"no server answers at {mask(url)}: starting a disposable MariaDB", file=out)
        return MariaDBServer().start()
    except ServerBinaryNotFound:
        return None
    except ImportError:
        print(
            "asyncgone: a disposable server needs pip install 'asyncgone[testing]'", file=sys.stderr
        )
        return None
