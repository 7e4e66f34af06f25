"""MariaDBServer: a private server that starts, stops, crashes and restarts on demand."""

from __future__ import annotations

import os

import pymysql
import pytest

from asyncgone.testing import MariaDBServer, ServerBinaryNotFound, _mariadb


def query(server: MariaDBServer, sql: str) -> object:
    conn = pymysql.connect(host=server.host, port=server.port, user="root", database="test")
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()
    finally:
        conn.close()


def test_lifecycle_keeps_data_until_close() -> None:
    """Stop, crash and restart keep the data directory; close removes it."""
    with MariaDBServer(options=["--wait-timeout=77"]) as server:
        assert server.running
        assert query(server, "SELECT @@global.wait_timeout") == (77,)
        query(server, "CREATE TABLE kept (id INT)")
        server.restart()
        assert query(server, "SELECT COUNT(*) FROM kept") == (0,)
        server.kill()
        assert not server.running
        with pytest.raises(pymysql.err.OperationalError):
            query(server, "SELECT 1")
        server.start()
        assert query(server, "SELECT COUNT(*) FROM kept") == (0,)
        assert server.url("aiomysql") == f"mysql+aiomysql://root@127.0.0.1:{server.port}/test"
        basedir = server.basedir
    assert not basedir.exists()


def test_missing_binaries_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a server binary the error says which package to install."""
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(_mariadb, "_SBIN", ())
    with pytest.raises(ServerBinaryNotFound, match="apt install mariadb-server"):
        MariaDBServer()


def test_failed_start_shows_the_server_log() -> None:
    """A server that cannot start reports why, from its own error log."""
    server = MariaDBServer(options=["--no-such-option"], startup_timeout=20)
    try:
        with pytest.raises(RuntimeError, match="did not start") as info:
            server.start()
        assert "no-such-option" in str(info.value)
    finally:
        server.close()
    assert not os.path.exists(server.basedir)
