"""MariaDBServer's administration helpers: SQL through the mariadb client, binary logging,
one-shot runs and wiping the data."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from asyncgone.testing import AdminQueryError, MariaDBServer


@pytest.fixture(scope="module")
def server() -> Iterator[MariaDBServer]:
    """One server with a binary log for the module; the tests leave it running."""
    with MariaDBServer(log_bin=True, server_id=7) as server:
        yield server


def test_query_returns_rows_as_text_by_column_name(server: MariaDBServer) -> None:
    """Rows map column names to text; NULL becomes None; tabs and newlines survive."""
    rows = server.query("SELECT @@server_id AS id, NULL AS nothing, 'a\\tb\\nc' AS text")
    assert rows == [{"id": "7", "nothing": None, "text": "a\tb\nc"}]
    assert server.query("DO 1") == []
    assert server.value("SELECT @@log_bin") == "1"


def test_a_failed_statement_carries_its_code_without_the_password(server: MariaDBServer) -> None:
    """The server's error code is in ``errno``; a password in the statement is masked."""
    server.query("CREATE USER IF NOT EXISTS 'masked'@'%' IDENTIFIED BY 'hunter2'")
    with pytest.raises(AdminQueryError) as info:
        server.query("CREATE USER 'masked'@'%' IDENTIFIED BY 'hunter2'")
    assert info.value.errno == 1396
    assert f"{server.port}" in str(info.value)
    assert "hunter2" not in str(info.value)
    assert "IDENTIFIED BY '***'" in str(info.value)


def test_a_slow_statement_is_cut_off_at_the_timeout(server: MariaDBServer) -> None:
    """query() never blocks longer than its timeout."""
    with pytest.raises(AdminQueryError, match="did not answer within 1 s") as info:
        server.query("SELECT SLEEP(10)", timeout=1)
    assert info.value.errno is None


def test_the_start_script_stays_out_of_the_binary_log(server: MariaDBServer) -> None:
    """The init file's users and database leave no GTID: a replica would reject one."""
    before = server.value("SELECT @@gtid_binlog_pos")
    server.restart()
    assert server.value("SELECT @@gtid_binlog_pos") == before


def test_run_once_and_wipe() -> None:
    """run_once() runs the binary to completion and returns its log; wipe() starts afresh."""
    server = MariaDBServer()
    try:
        assert "WSREP: disabled, skipping position recovery" in server.run_once("--wsrep-recover")
        server.start()
        server.query("CREATE TABLE test.kept (id INT)")
        with pytest.raises(RuntimeError, match="stop"):
            server.run_once("--help")
        server.wipe()
        assert not server.running
        server.start()
        assert server.query("SHOW TABLES FROM test") == []
    finally:
        server.close()
    with pytest.raises(AdminQueryError) as info:
        server.query("SELECT 1", timeout=5)
    assert info.value.errno == 2002
