"""The ``asyncgone`` command: ``doctor`` and ``demo`` (also ``python -m asyncgone``).

``asyncgone --version`` (``-V``) prints the version. ``asyncgone`` without a command prints
the help on stderr and exits 2, as argparse does for any other incomplete command line: a
script that forgot its command must not pass for one that ran.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import sys
import textwrap
from typing import TYPE_CHECKING, Any, TextIO

from sqlalchemy.engine import URL

from . import __version__
from ._config import DEFAULT_CONNECT_TIMEOUT
from ._errors import ConfigurationError, describe, error_code
from ._fleet import add_fleet_arguments, fleet_of
from ._url import ENV_VAR, mask, resolve_url

if TYPE_CHECKING:
    from .testing import MariaDBServer

__all__ = ["main"]

LOCAL_URL = "mysql://root@127.0.0.1:3306/test"
_EXAMPLE = "mysql+asyncmy://user:password@host:3306/database"

# Exit codes: argparse itself exits 2 on bad usage, as does a bad URL here.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DENIED, EXIT_NO_DATABASE = 0, 1, 2, 3, 4, 5
_EXIT_CODES = (
    "exit codes: 0 done; 1 any other failure; 2 bad usage or unusable URL; 3 server "
    "unreachable or silent; 4 access denied; 5 database does not exist"
)

# Client errors that mean the server could not be reached or hung up during the handshake.
_UNREACHABLE = frozenset({2002, 2003, 2005, 2006, 2013, 2055})

# What a refused connection means, by MySQL error code: exit code, headline, what to do.
# {target} is the masked URL, {database} the database the server named.
_REFUSALS: dict[int, tuple[int, str, str]] = {
    1045: (
        EXIT_DENIED,
        "access denied to {target}",
        "Check the user name and password in the URL.",
    ),
    1698: (
        EXIT_DENIED,
        "access denied to {target}",
        "The account logs in some other way than by password, such as unix_socket over the "
        "server's local socket (as Debian's root does): connect as a user with a password.",
    ),
    1130: (
        EXIT_DENIED,
        "access denied to {target}",
        "The server has no account for this user at this client's address: create one "
        "(for example 'user'@'%') or connect from an address it knows.",
    ),
    # A user without privileges on a database gets 1044 whether it exists or not: the server
    # does not tell such users which databases exist.
    1044: (
        EXIT_DENIED,
        "access denied to {target}",
        "The user may log in but has no grant on database {database!r} (or it does not "
        "exist): GRANT the user privileges on it, or name another database in the URL.",
    ),
    1049: (
        EXIT_NO_DATABASE,
        "database {database!r} does not exist on {target}",
        "Create it (CREATE DATABASE `{database}`) or name an existing database in the URL "
        "(SHOW DATABASES lists them).",
    ),
    1040: (
        EXIT_ERROR,
        "{target} refused the connection",
        "The server has no connection to spare: close idle clients, shrink their pools, or "
        "raise max_connections.",
    ),
    1203: (
        EXIT_ERROR,
        "{target} refused the connection",
        "This user has as many connections as max_user_connections allows: close some, or "
        "raise the limit.",
    ),
    1226: (
        EXIT_ERROR,
        "{target} refused the connection",
        "This account has used up a resource limit of its own (such as MAX_USER_CONNECTIONS "
        "in its grants): close some of its connections, or raise the limit.",
    ),
    1129: (
        EXIT_ERROR,
        "{target} refused the connection",
        "The server blocks this host after too many failed connection attempts: run FLUSH "
        "HOSTS (mariadb-admin flush-hosts) on it, and raise max_connect_errors.",
    ),
}
_QUOTED_DATABASE = re.compile(r"database '([^']*)'")

# Why a TLS handshake failed, by the OpenSSL reason Python's ssl module puts in brackets
# ("[SSL: CERTIFICATE_VERIFY_FAILED] ..."), and what to do.
_TLS_FAILURES = {
    "CERTIFICATE_VERIFY_FAILED": "The server's certificate is not signed by a CA this client "
    "trusts, or does not hold the host name of the URL: give the CA that signed it (ssl_ca= "
    "in the URL, cafile= in ssl.create_default_context()) and connect by a name the "
    "certificate holds.",
    "WRONG_VERSION_NUMBER": "The server did not answer in TLS: it has no TLS configured "
    "(SHOW VARIABLES LIKE 'have_ssl' says DISABLED; set ssl_cert and ssl_key), or this port "
    "is not a MySQL server's.",
}
_TLS_REASON = re.compile(r"\[SSL(?:: (\w+))?\]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncgone",
        description="Keep async SQLAlchemy on MySQL/MariaDB alive when connections die.",
        epilog="'asyncgone COMMAND --help' describes a command. Start with: asyncgone demo",
    )
    parser.add_argument("-V", "--version", action="version", version=f"asyncgone {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands")
    doctor = commands.add_parser(
        "doctor",
        help="examine a server's settings and advise",
        description="Examine a MySQL/MariaDB server's timeouts and limits, measure the round "
        "trip, list long-sleeping connections, and say what asyncgone will derive and what "
        "to change.",
        epilog=_EXIT_CODES,
    )
    doctor.add_argument("url", nargs="?", help=f"database URL (default: ${ENV_VAR})")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, help="seconds per step"
    )
    add_fleet_arguments(doctor)
    demo = commands.add_parser(
        "demo",
        help="plain SQLAlchemy and asyncgone through the same faults, side by side",
        description="Show plain SQLAlchemy failing and asyncgone surviving an idle timeout, a "
        "KILL, a connection reset and a network blackhole, in under a minute.",
        epilog=_EXIT_CODES,
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
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "doctor":
            return asyncio.run(_doctor(args, out))
        return asyncio.run(_demo(args, out))
    except ConfigurationError as exc:
        print(f"asyncgone: {exc}", file=sys.stderr)
        _json_failure(args, out, EXIT_USAGE, "unusable URL or option", str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: not an error of ours. Point stdout at devnull
        # so that the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _quiet_handshake_failures() -> None:
    """Keep the running loop from logging failed TLS handshakes with a traceback.

    Python 3.10's asyncio logs one that fails with something other than an ``OSError`` at
    ERROR; the connect that started it fails with the same error, which the command
    explains on one line.
    """
    loop = asyncio.get_running_loop()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("SSL handshake failed"):
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


async def _doctor(args: argparse.Namespace, out: TextIO) -> int:
    from ._doctor import examine, tls_summary
    from ._fleet import fleet_summary

    _quiet_handshake_failures()
    url = resolve_url(args.url)
    try:
        report = await examine(url, args.timeout, fleet_of(args))
    except ConfigurationError:
        raise
    except Exception as exc:
        exit_code, headline, explanation = _connect_failure(url, exc, args.timeout)
        _json_failure(args, out, exit_code, headline, explanation)
        return exit_code
    if args.json:
        json.dump(report.as_dict(), out, indent=2, default=str)
        out.write("\n")
        return EXIT_OK
    server = report.server

    def show(label: str, value: str) -> None:
        print(f"  {label:<20}{value}", file=out)

    print(f"asyncgone doctor: {report.target}", file=out)
    show("server", f"{server['version']} ({server['version_comment']})")
    show("tls", tls_summary(report.tls, report.network))
    show("round trip", f"{report.round_trip_ms:.2f} ms (median of 5 pings)")
    show(
        "wait_timeout",
        f"{server['wait_timeout_session']} s for this client "
        f"(global {server['wait_timeout_global']} s)",
    )
    show(
        "interactive_timeout",
        f"{server['interactive_timeout_session']} s for this client "
        f"(global {server['interactive_timeout_global']} s)",
    )
    show(
        "net timeouts",
        f"read {server['net_read_timeout']} s, write {server['net_write_timeout']} s",
    )
    show("max_allowed_packet", f"{server['max_allowed_packet']} bytes")
    read_only = " (read-only server)" if str(server["read_only"]) in ("1", "ON") else ""
    show("connections", f"{report.threads_connected} of {server['max_connections']}{read_only}")
    if report.sleeping:
        print("  longest sleeping connections:", file=out)
        for s in report.sleeping:
            print(
                f"    {s['id']:>8}  idle {s['idle_s']:>6} s  {s['user']}@{s['host']} {s['db']}",
                file=out,
            )
    if report.hosts:
        from ._doctor_hosts import host_lines

        print("hosts:", file=out)
        for line in host_lines(report.hosts):
            print(line, file=out)
    derived = report.derived
    print("asyncgone will use:", file=out)
    show("idle limit", f"{derived['idle_limit_s']:g} s (recycle='auto')")
    show("keepalive every", f"{derived['keepalive_interval_s']:g} s (interval='auto')")
    show(
        "ping after",
        f"{derived['ping_after_s']:g} s idle; max lifetime {derived['max_lifetime_s']:g} s",
    )
    if report.fleet is not None:
        show("fleet", fleet_summary(report.fleet))
    print("advice:", file=out)
    # Wrapped as argparse wraps help (two columns short of the terminal, 80 when not a
    # terminal); a long token such as a URL stays whole. The JSON keeps each one line.
    width = max(shutil.get_terminal_size().columns - 2, 40)
    for line in report.advice:
        print(
            textwrap.fill(
                line,
                width,
                initial_indent="  - ",
                subsequent_indent="    ",
                break_long_words=False,
                break_on_hyphens=False,
            ),
            file=out,
        )
    return EXIT_OK


def _diagnose(url: URL, exc: Exception, timeout: float) -> tuple[int, str, str]:
    """Say why ``url`` could not be used: exit code, headline, and the details and remedy."""
    from ._doctor import asks_for_tls

    target = mask(url)
    detail = describe(exc)
    code = error_code(exc)
    if code in _REFUSALS:
        exit_code, headline, remedy = _REFUSALS[code]
        # The server names the database it refused: an init command may have asked for
        # another one than the URL.
        named = _QUOTED_DATABASE.search(detail)
        database = named.group(1) if named else (url.database or "")
        if code == 1045 and not asks_for_tls(url):
            # MariaDB and MySQL refuse a REQUIRE SSL account over clear text with the very
            # same error as a wrong password.
            remedy += (
                " An account that requires TLS (REQUIRE SSL) is refused the same way over "
                "clear text: add ssl_ca=CA_FILE to the URL."
            )
        return (
            exit_code,
            headline.format(target=target, database=database),
            f"{detail}. {remedy.format(database=database)}",
        )
    tls = _TLS_REASON.search(detail)
    if tls:
        return (
            EXIT_ERROR,
            f"TLS with {target} failed",
            f"{detail}. "
            + _TLS_FAILURES.get(
                tls.group(1) or "",
                "Check the TLS settings (CA, client certificate and key, ciphers) against "
                "the server's.",
            ),
        )
    if isinstance(exc, TimeoutError):  # a step of ours, bounded by the timeout, overran
        return (
            EXIT_UNREACHABLE,
            f"no answer from {target} within {timeout:g} s",
            "Check that the server runs and is not overloaded, and that nothing on the way "
            "drops packets.",
        )
    if code in _UNREACHABLE or (code is None and isinstance(exc, OSError)):
        return (
            EXIT_UNREACHABLE,
            f"cannot reach {target}",
            f"{detail}. Check the host and port, that the server runs, and that nothing blocks "
            "the way.",
        )
    if code is not None and not 2000 <= code < 3000:  # the server refused (2xxx: the client)
        return EXIT_ERROR, f"{target} refused the connection", f"{detail}."
    return EXIT_ERROR, f"could not use {target}", f"{detail}."


def _connect_failure(url: URL, exc: Exception, timeout: float) -> tuple[int, str, str]:
    """Explain on stderr why ``url`` could not be used; return the exit code, headline and
    explanation."""
    if isinstance(exc, ConfigurationError):
        raise exc  # an option in the URL that asyncgone rejects: main() reports it as usage
    exit_code, headline, explanation = _diagnose(url, exc, timeout)
    print(f"asyncgone: {headline}: {explanation}", file=sys.stderr)
    return exit_code, headline, explanation


def _json_failure(
    args: argparse.Namespace, out: TextIO, exit_code: int, headline: str, explanation: str
) -> None:
    """With ``doctor --json``, the failure as JSON on stdout too, for scripts."""
    if getattr(args, "json", False):
        failure = {"ok": False, "exit_code": exit_code, "error": headline, "detail": explanation}
        json.dump(failure, out, indent=2)
        out.write("\n")


async def _demo(args: argparse.Namespace, out: TextIO) -> int:
    from ._demo import run_demo, table
    from ._doctor import examine

    _quiet_handshake_failures()

    # A URL on the command line must work; the defaults ($DATABASE_URL, then the local
    # server) may be replaced by a disposable server.
    url = resolve_url(args.url or os.environ.get(ENV_VAR) or LOCAL_URL)
    probe_timeout = 3.0
    server = None
    try:
        await examine(url, probe_timeout)
    except Exception as exc:
        if args.url or isinstance(exc, ConfigurationError):
            return _connect_failure(url, exc, probe_timeout)[0]
        started = _disposable_server(out, url, exc, probe_timeout)
        if isinstance(started, int):
            return started
        server = started
        url = resolve_url(server.url(url.drivername.partition("+")[2]))
    try:
        print(f"asyncgone demo against {mask(url)}", file=out)
        outcomes = await run_demo(url, out)
        print("", file=out)
        print(table(outcomes), file=out)
    except Exception as exc:
        # The demo breaks connections on purpose and survives that; this is the server itself
        # going away (or a disposable one dying just after its port opened).
        print(
            f"\nasyncgone: the demo against {mask(url)} stopped: {describe(exc)}", file=sys.stderr
        )
        return EXIT_ERROR
    finally:
        if server is not None:
            server.close()
    return EXIT_OK


def _disposable_server(
    out: TextIO, url: URL, exc: Exception, timeout: float
) -> MariaDBServer | int:
    """Start a disposable MariaDB for the demo, as ``url`` failed with ``exc``.

    Returns the running server, or reports why there is none and returns the exit code.
    """
    from .testing import MariaDBServer, ServerBinaryNotFound

    _, headline, _ = _diagnose(url, exc, timeout)
    if importlib.util.find_spec("mirakuru") is None:  # MariaDBServer starts servers with it
        print(
            "asyncgone: a disposable server needs pip install 'asyncgone[testing]'", file=sys.stderr
        )
        return _connect_failure(url, exc, timeout)[0]
    try:
        server = MariaDBServer()
    except ServerBinaryNotFound:
        return _connect_failure(url, exc, timeout)[0]  # none possible here: say why the URL failed
    except Exception as failure:  # e.g. no writable temporary directory
        return _disposable_failed(headline, failure)
    print(f"{headline}: starting a disposable MariaDB", file=out)
    try:
        return server.start()
    except BaseException as failure:
        # Whatever stopped it (a server that would not start or answer in time, Ctrl-C), its
        # process and data directory must not outlive the command.
        server.close()
        if not isinstance(failure, Exception):
            raise
        return _disposable_failed(headline, failure)


def _disposable_failed(headline: str, failure: Exception) -> int:
    print(
        f"asyncgone: {headline}, and a disposable MariaDB did not start: {describe(failure)}\n"
        f"Start a server, or pass the URL of a running one: asyncgone demo {_EXAMPLE}",
        file=sys.stderr,
    )
    return EXIT_ERROR
