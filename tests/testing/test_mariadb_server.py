"""MariaDBServer: a private server that starts, stops, crashes and restarts on demand, with
TLS when asked."""

from __future__ import annotations

import os
import ssl
from typing import Any

import pymysql
import pytest
from cryptography import x509

from asyncgone.testing import MariaDBServer, ServerBinaryNotFound, TLSCertificates, _mariadb


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


def connect(server: MariaDBServer, **options: Any) -> Any:
    """A PyMySQL connection to ``server`` (as root unless ``options`` say otherwise)."""
    return pymysql.connect(
        host=server.host,
        port=server.port,
        database="test",
        connect_timeout=5,
        **{"user": "root", **options},
    )


def ssl_version(conn: Any) -> str:
    with conn.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
        return str(cur.fetchone()[1])


def test_tls_server_is_verified_and_can_require_tls() -> None:
    """``tls=True`` serves TLS that the server's own client context verifies and another
    CA's rejects; an account made with ``require_tls`` is refused in clear text (1045)."""
    with MariaDBServer(tls=True) as server:
        assert server.tls is not None
        assert server.ca_file is not None
        assert server.ca_file.read_bytes() == server.tls.ca_pem
        conn = connect(server, ssl=server.tls.client_context())
        assert ssl_version(conn).startswith("TLSv1.")
        conn.close()
        with pytest.raises(pymysql.err.OperationalError, match="CERTIFICATE_VERIFY_FAILED"):
            connect(server, ssl=TLSCertificates.generate().client_context())

        password = "it's a \\ secret"  # quotes and backslashes reach the server intact
        server.create_user("app", password, require_tls=True)
        with pytest.raises(pymysql.err.OperationalError) as refused:
            connect(server, user="app", password=password, ssl_disabled=True)
        assert refused.value.args[0] == 1045
        conn = connect(server, user="app", password=password, ssl=server.tls.client_context())
        assert ssl_version(conn).startswith("TLSv1.")
        conn.close()


def test_tls_server_with_own_certificates_and_tls_required_for_all() -> None:
    """A server given its certificates serves exactly those, and ``query()`` still works
    when the server refuses every clear-text connection (require_secure_transport)."""
    certificates = TLSCertificates.generate("127.0.0.1")
    with MariaDBServer(tls=certificates, options=["--require-secure-transport=ON"]) as server:
        assert server.tls is certificates
        assert server.value("SELECT @@require_secure_transport") == "1"
        conn = connect(server, ssl=certificates.client_context())
        assert ssl_version(conn).startswith("TLSv1.")
        conn.close()
        with pytest.raises(pymysql.err.OperationalError):
            connect(server, ssl_disabled=True)


def test_tls_certificates_hold_their_names_and_hide_their_key() -> None:
    """Generated certificates name what they were made for; client contexts always verify
    the chain; the repr shows no key material; what is not PEM is refused at once."""
    certificates = TLSCertificates.generate("db.test", "10.0.0.7")
    leaf = x509.load_pem_x509_certificate(certificates.cert_pem)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["db.test"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    relaxed = certificates.client_context(check_hostname=False)
    assert (relaxed.check_hostname, relaxed.verify_mode) == (False, ssl.CERT_REQUIRED)
    assert "PRIVATE" not in repr(certificates)
    assert certificates.key_pem.decode() not in repr(certificates)
    with pytest.raises(ValueError, match="key_pem must be PEM bytes"):
        TLSCertificates(ca_pem=certificates.ca_pem, cert_pem=certificates.cert_pem, key_pem=b"")
