"""MariaDBServer: a disposable MariaDB server for tests that restart, crash or reconfigure one.

Process handling (start and wait for the port, stop with a deadline, kill) is mirakuru's;
this module only knows how to initialise a data directory and which flags make a server
private, fast to start and reachable by ``root`` without a password.

Administrative SQL (``MariaDBServer.query``) goes through the ``mariadb`` command-line client
that ships with the server: the toolkit then needs no Python driver of its own (PyMySQL is not
a dependency of asyncgone), and every statement runs in a process that a timeout can kill.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from . import _tls

if TYPE_CHECKING:
    from mirakuru import TCPExecutor

__all__ = ["AdminQueryError", "MariaDBServer", "ServerBinaryNotFound"]

_SERVER_BINARIES = ("mariadbd", "mysqld")
_INSTALL_BINARIES = ("mariadb-install-db", "mysql_install_db")
_CLIENT_BINARIES = ("mariadb", "mysql")
DEFAULT_QUERY_TIMEOUT = 30.0
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")

# Runs at every start: lets root in from any address (tests may reach the server through a
# proxy or a network namespace) and provides the conventional `test` database. It stays out of
# the binary log: on a replica, a local transaction at every start would be a GTID the primary
# never had, which gtid_strict_mode rejects as soon as replication applies the next event.
_INIT_SQL = """\
SET SESSION sql_log_bin=0;
CREATE USER IF NOT EXISTS 'root'@'%';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;
CREATE DATABASE IF NOT EXISTS test;
"""


class ServerBinaryNotFound(RuntimeError):
    """No MariaDB server binary could be found to start a disposable server."""


class AdminQueryError(RuntimeError):
    """An administrative statement (``MariaDBServer.query``) failed or did not finish in time.

    ``errno`` is the server's error code (1290, 1047, ...), or the client's (2002, 2013: no
    connection), or None when the client was killed at the timeout.
    """

    def __init__(self, message: str, *, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


_PASSWORD = re.compile(r"((?:PASSWORD|IDENTIFIED BY)\s*=?\s*)'(?:[^'\\]|\\.)*'", re.IGNORECASE)
_CLIENT_ERROR = re.compile(r"ERROR (\d+)")
_ECHOED_QUERY = re.compile(r"^-{5,}\n.*?^-{5,}\n", re.DOTALL | re.MULTILINE)
_UNESCAPE = {"n": "\n", "t": "\t", "0": "\0", "\\": "\\"}


def _masked(sql: str) -> str:
    """The statement for an error message: passwords hidden, shortened to one line."""
    text = " ".join(_PASSWORD.sub(r"\1'***'", sql).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _unescape(field: str) -> str | None:
    # --batch escapes tab, newline, NUL and backslash, and prints SQL NULL as NULL.
    if field == "NULL":
        return None
    return re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m.group(1), m.group(1)), field)


def _find(names: Sequence[str]) -> str | None:
    for name in names:
        found = shutil.which(name) or next(
            (f"{d}/{name}" for d in _SBIN if os.access(f"{d}/{name}", os.X_OK)), None
        )
        if found:
            return found
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port nobody listens on right now."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct TCP ports nobody listens on right now."""
    # All sockets stay bound until every port is chosen, so the kernel cannot hand out the same
    # ephemeral port twice.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


class MariaDBServer:
    """A private MariaDB server on a free port with a temporary data directory.

    ``root`` has no password. Stopping and starting again keeps the data; ``close()``
    deletes it. Every call blocks (starting takes about two seconds); from async code, run
    them in a thread::

        with MariaDBServer() as server:                  # initialise and start
            url = server.url("asyncmy")                  # mysql+asyncmy://root@127.0.0.1:PORT/test
            server.restart()                             # graceful stop (SIGTERM), then start
            server.kill()                                # SIGKILL: a crash, as far as clients see
            server.start()
            server.query("SELECT @@version")             # [{"@@version": "10.11..."}], as root

        await anyio.to_thread.run_sync(server.restart)  # the same, from async tests

    Parameters:
        host: address to bind and to put in URLs.
        port: TCP port; a free one by default.
        options: extra server flags, e.g. ``["--wait-timeout=5"]``; the ``options`` attribute
            may be replaced between stop and start to change them.
        wrapper: a command prefix to run the server under, e.g.
            ``["ip", "netns", "exec", "ns1"]``; ``query()`` runs the client under it too.
        startup_timeout: seconds to wait for the server to accept connections.
        log_bin: write a binary log (``mysql-bin.*`` in the data directory) instead of
            ``--skip-log-bin``; replication needs it.
        server_id: ``--server-id``; replication needs a distinct one per server.
        tls: serve TLS: True with a new private CA's certificate for ``host``, or your own
            ``TLSCertificates``; the ``tls`` and ``ca_file`` attributes then hold them, else None.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        options: Sequence[str] = (),
        wrapper: Sequence[str] = (),
        startup_timeout: float = 60.0,
        log_bin: bool = False,
        server_id: int | None = None,
        tls: bool | _tls.TLSCertificates = False,
    ) -> None:
        server = _find(_SERVER_BINARIES)
        install = _find(_INSTALL_BINARIES)
        if server is None or install is None:
            raise ServerBinaryNotFound(
                "a disposable server needs mariadbd and mariadb-install-db on PATH or in "
                "/usr/sbin; install MariaDB's server package (Debian: apt install mariadb-server)"
            )
        self.host = host
        self.port = port if port is not None else free_port()
        self.options = tuple(options)
        self.wrapper = tuple(wrapper)
        self.startup_timeout = startup_timeout
        self.log_bin = log_bin
        self.server_id = server_id
        self._server_binary = server
        self._install_binary = install
        self.basedir = Path(tempfile.mkdtemp(prefix="asyncgone-mariadb-"))
        self.datadir = self.basedir / "data"
        self._tmpdir = self.basedir / "tmp"
        self._executor: TCPExecutor | None = None
        self._initialised = False
        owner = "mysql" if self._as_root() else None  # the account mariadbd runs as
        self.tls, self.ca_file = _tls.prepare(tls, host, self.basedir / "tls", owner)

    # -- URLs --------------------------------------------------------------------------------

    def url(self, driver: str = "asyncmy", database: str = "test") -> str:
        """Return a SQLAlchemy URL for this server with the given driver."""
        return f"mysql+{driver}://root@{self.host}:{self.port}/{database}"

    @property
    def error_log(self) -> Path:
        """The server's error log, useful when it refuses to start."""
        return self.basedir / "error.log"

    # -- lifecycle ---------------------------------------------------------------------------

    def _as_root(self) -> bool:
        return hasattr(os, "geteuid") and os.geteuid() == 0

    def _initialise(self) -> None:
        if self._initialised:
            return
        self.datadir.mkdir(exist_ok=True)
        self._tmpdir.mkdir(exist_ok=True)
        (self.basedir / "init.sql").write_text(_INIT_SQL)
        user = ["--user=mysql"] if self._as_root() else []
        if user:
            # mariadbd refuses to run as root; the mysql account must own its files.
            for path in (self.basedir, self.datadir, self._tmpdir):
                shutil.chown(path, "mysql", "mysql")
        command = [
            self._install_binary,
            "--no-defaults",
            f"--datadir={self.datadir}",
            # A private temporary directory (passed on to mariadbd): initialisations running
            # side by side have been seen to trip over each other's files in a shared /tmp.
            f"--tmpdir={self._tmpdir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            *user,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"mariadb-install-db failed ({result.returncode}): {result.stderr[-2000:]}"
            )
        self._initialised = True

    def _command(self) -> list[str]:
        user = ["--user=mysql"] if self._as_root() else []
        return [
            *self.wrapper,
            self._server_binary,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--tmpdir={self._tmpdir}",
            f"--port={self.port}",
            f"--bind-address={self.host}",
            f"--socket={self.basedir / 'mysqld.sock'}",
            f"--pid-file={self.basedir / 'mysqld.pid'}",
            f"--log-error={self.error_log}",
            f"--init-file={self.basedir / 'init.sql'}",
            "--log-bin=mysql-bin" if self.log_bin else "--skip-log-bin",
            *([f"--server-id={self.server_id}"] if self.server_id is not None else []),
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-file-size=16M",
            *(_tls.server_flags(self.basedir / "tls") if self.tls else []),
            *user,
            *self.options,
        ]

    @property
    def running(self) -> bool:
        """True while the server process runs."""
        executor = self._executor
        return executor is not None and executor.running()

    def start(self) -> MariaDBServer:
        """Start the server (initialising its data directory the first time); return self."""
        from mirakuru import TCPExecutor
        from mirakuru.exceptions import ProcessExitedWithError, TimeoutExpired

        if self.running:
            return self
        self._initialise()
        executor = TCPExecutor(
            self._command(),
            host=self.host,
            port=self.port,
            timeout=self.startup_timeout,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            executor.start()
        except (ProcessExitedWithError, TimeoutExpired) as exc:
            executor.kill()
            raise RuntimeError(
                f"MariaDB did not start on {self.host}:{self.port}: {exc}; its log ends with:\n"
                f"{self.log_tail()}"
            ) from exc
        self._executor = executor
        return self

    def stop(self) -> None:
        """Shut the server down gracefully (SIGTERM), as an administrator or systemd would."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.stop()

    def kill(self) -> None:
        """Kill the server with SIGKILL: to its clients, a crash."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.kill(sig=signal.SIGKILL)

    def restart(self) -> None:
        """Stop gracefully and start again on the same port with the same data."""
        self.stop()
        self.start()

    def run_once(self, *options: str, timeout: float = 120.0) -> str:
        """Run the server binary to completion, not as a server, with this server's flags plus
        ``options`` (a one-shot mode such as ``--wsrep-recover``); return what it logged.

        Raises:
            RuntimeError: the server runs (stop it first), or the run failed or took longer
                than ``timeout`` seconds.
        """
        if self.running:
            raise RuntimeError(f"stop {self!r} before running it once with {options}")
        self._initialise()
        log = self.basedir / "run-once.log"
        log.unlink(missing_ok=True)
        command = [*self._command(), *options, f"--log-error={log}"]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{options} did not finish within {timeout:g} s") from None
        output = log.read_text(errors="replace") if log.exists() else result.stderr
        if result.returncode != 0:
            raise RuntimeError(f"{options} failed ({result.returncode}): {output[-2000:]}")
        return output

    def wipe(self) -> None:
        """Kill the server if it runs and delete its data; the next ``start()`` begins afresh."""
        self.kill()
        shutil.rmtree(self.datadir, ignore_errors=True)
        self._initialised = False

    # -- administration ----------------------------------------------------------------------

    def query(
        self, sql: str, *, timeout: float = DEFAULT_QUERY_TIMEOUT
    ) -> list[dict[str, str | None]]:
        """Run SQL as ``root`` through the ``mariadb`` client; return the rows it printed.

        Each row maps column names to text (SQL NULL, and the string ``'NULL'``, become None).
        Several statements separated by ``;`` may run; give at most one that returns rows.
        Blocks at most ``timeout`` seconds (connecting included).

        Raises:
            AdminQueryError: the statement failed (``errno`` holds the code), the server was
                unreachable, or the timeout passed; the message names the server and shows the
                statement with passwords masked.
            ServerBinaryNotFound: there is no ``mariadb`` (or ``mysql``) client.
        """
        client = _find(_CLIENT_BINARIES)
        if client is None:
            raise ServerBinaryNotFound(
                "MariaDBServer.query needs the mariadb command-line client; install it "
                "(Debian: apt install mariadb-client)"
            )
        command = [
            *self.wrapper,
            client,
            "--no-defaults",
            "--protocol=TCP",
            f"--host={self.host}",
            f"--port={self.port}",
            "--user=root",
            "--batch",
            f"--connect-timeout={max(1, int(timeout))}",
            *([f"--ssl-ca={self.ca_file}"] if self.ca_file else []),  # require_secure_transport
        ]
        where = f"MariaDB {self.host}:{self.port}"
        try:
            # The statement goes through stdin: unlike arguments, it is invisible to `ps`.
            result = subprocess.run(
                command, input=sql, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise AdminQueryError(
                f"{where} did not answer within {timeout:g} s: {_masked(sql)}", errno=None
            ) from None
        if result.returncode != 0:
            # The client echoes the failed statement between dashed lines; it may hold a
            # password, and the message shows the masked statement anyway.
            message = _ECHOED_QUERY.sub("", result.stderr).strip()
            message = message or f"mariadb client exited with {result.returncode}"
            code = _CLIENT_ERROR.search(message)
            raise AdminQueryError(
                f"{where}: {message} (running: {_masked(sql)})",
                errno=int(code.group(1)) if code else None,
            )
        lines = result.stdout.splitlines()
        if not lines:
            return []
        names = lines[0].split("\t")
        return [
            dict(zip(names, map(_unescape, line.split("\t")), strict=False)) for line in lines[1:]
        ]

    def create_user(self, user: str, password: str, *, require_tls: bool = False) -> None:
        """Create (or replace) ``user``@``%`` with every privilege; ``require_tls`` makes it
        ``REQUIRE SSL``, refused without TLS (1045). Raises ``AdminQueryError`` as ``query()``."""
        account = f"{_literal(user)}@'%'"
        self.query(
            f"CREATE OR REPLACE USER {account} IDENTIFIED BY {_literal(password)}"
            f"{' REQUIRE SSL' if require_tls else ''}; GRANT ALL PRIVILEGES ON *.* TO {account}"
        )

    def value(self, sql: str, *, timeout: float = DEFAULT_QUERY_TIMEOUT) -> str | None:
        """Run a query returning one value (``SELECT @@read_only``) and return it as text.

        Raises:
            AdminQueryError: as ``query()``, or when the query returned no row.
        """
        rows = self.query(sql, timeout=timeout)
        if not rows:
            raise AdminQueryError(
                f"MariaDB {self.host}:{self.port} returned no row for {_masked(sql)}", errno=None
            )
        return next(iter(rows[0].values()))

    def close(self) -> None:
        """Stop the server if it runs and delete its data directory."""
        with contextlib.suppress(Exception):
            self.kill()
        shutil.rmtree(self.basedir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's error log, for error messages."""
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no error log)"

    def __enter__(self) -> MariaDBServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MariaDBServer {self.host}:{self.port} {state}>"
