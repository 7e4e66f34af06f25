"""MariaDBServer: a disposable MariaDB server for tests that restart, crash or reconfigure one.

Process handling (start and wait for the port, stop with a deadline, kill) is mirakuru's;
this module only knows how to initialise a data directory and which flags make a server
private, fast to start and reachable by ``root`` without a password.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mirakuru import TCPExecutor

__all__ = ["MariaDBServer", "ServerBinaryNotFound"]

_SERVER_BINARIES = ("mariadbd", "mysqld")
_INSTALL_BINARIES = ("mariadb-install-db", "mysql_install_db")
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")

# Runs at every start: lets root in from any address (tests may reach the server through a
# proxy or a network namespace) and provides the conventional `test` database.
_INIT_SQL = """\
CREATE USER IF NOT EXISTS 'root'@'%';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;
CREATE DATABASE IF NOT EXISTS test;
"""


class ServerBinaryNotFound(RuntimeError):
    """No MariaDB server binary could be found to start a disposable server."""


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
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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

        await anyio.to_thread.run_sync(server.restart)  # the same, from async tests

    Parameters:
        host: address to bind and to put in URLs.
        port: TCP port; a free one by default.
        options: extra server flags, e.g. ``["--wait-timeout=5"]``.
        wrapper: a command prefix to run the server under, e.g.
            ``["ip", "netns", "exec", "ns1"]``.
        startup_timeout: seconds to wait for the server to accept connections.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        options: Sequence[str] = (),
        wrapper: Sequence[str] = (),
        startup_timeout: float = 60.0,
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
        self._server_binary = server
        self._install_binary = install
        self.basedir = Path(tempfile.mkdtemp(prefix="asyncgone-mariadb-"))
        self.datadir = self.basedir / "data"
        self._executor: TCPExecutor | None = None
        self._initialised = False

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
        (self.basedir / "init.sql").write_text(_INIT_SQL)
        user = ["--user=mysql"] if self._as_root() else []
        if user:
            # mariadbd refuses to run as root; the mysql account must own its files.
            shutil.chown(self.basedir, "mysql", "mysql")
            shutil.chown(self.datadir, "mysql", "mysql")
        command = [
            self._install_binary,
            "--no-defaults",
            f"--datadir={self.datadir}",
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
            f"--port={self.port}",
            f"--bind-address={self.host}",
            f"--socket={self.basedir / 'mysqld.sock'}",
            f"--pid-file={self.basedir / 'mysqld.pid'}",
            f"--log-error={self.error_log}",
            f"--init-file={self.basedir / 'init.sql'}",
            "--skip-log-bin",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-file-size=16M",
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
                f"{self._log_tail()}"
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

    def close(self) -> None:
        """Stop the server if it runs and delete its data directory."""
        with contextlib.suppress(Exception):
            self.kill()
        shutil.rmtree(self.basedir, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-20:])
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
