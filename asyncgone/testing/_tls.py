"""TLSCertificates: a private certificate authority and a server certificate for test servers.

Production MySQL and MariaDB servers expect TLS (managed services, MariaDB 11.4 and later);
tests that want the same need a server certificate their clients can verify. The
certificates are made when a test asks for them, by trustme, and never stored anywhere but
the disposable server's temporary directory::

    certificates = TLSCertificates.generate()         # a fresh CA; 127.0.0.1, ::1, localhost
    context = certificates.client_context()           # trusts that CA only; host name checked

    with MariaDBServer(tls=True) as server:           # the same, installed in the server
        context = server.tls.client_context()
        engine = asyncgone.create_engine(server.url("aiomysql"), connect_args={"ssl": context})
        asyncmy_url = server.url("asyncmy") + f"?ssl_ca={server.ca_file}"
"""

from __future__ import annotations

import dataclasses
import shutil
import ssl
from pathlib import Path

__all__ = ["DEFAULT_TLS_NAMES", "TLSCertificates", "prepare", "server_flags"]

#: The names a generated certificate holds by default: every way a test reaches a local server.
DEFAULT_TLS_NAMES = ("127.0.0.1", "::1", "localhost")

# File name and mode of each piece: the key is readable by its owner only, as servers insist.
_FILES = (("ca.pem", 0o644), ("server-cert.pem", 0o644), ("server-key.pem", 0o600))


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class TLSCertificates:
    """PEM material for a TLS server and the clients that trust it.

    Parameters:
        ca_pem: the certificate of the authority clients trust.
        cert_pem: the server's certificate chain, its own certificate first.
        key_pem: the server's private key, unencrypted. It never appears in the ``repr``.

    Raises:
        ValueError: a piece is not PEM (bytes holding a ``-----BEGIN`` line).
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def __post_init__(self) -> None:
        for name in ("ca_pem", "cert_pem", "key_pem"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or b"-----BEGIN " not in value:
                raise ValueError(f"{name} must be PEM bytes (with a -----BEGIN line)")

    @classmethod
    def generate(cls, *names: str) -> TLSCertificates:
        """Make a new private CA and a server certificate it signed, valid for ``names``
        (host names or IP addresses; default ``DEFAULT_TLS_NAMES``). Takes milliseconds
        (ECDSA keys).

        Raises:
            ImportError: trustme, which makes them, is not installed
                (``pip install 'asyncgone[testing]'``).
        """
        try:
            import trustme
        except ImportError as exc:
            raise ImportError(
                "TLS certificates for test servers are made by trustme: "
                "pip install 'asyncgone[testing]'"
            ) from exc
        ca = trustme.CA(organization_name="asyncgone tests")
        leaf = ca.issue_cert(*(names or DEFAULT_TLS_NAMES))
        return cls(
            ca_pem=ca.cert_pem.bytes(),
            cert_pem=b"".join(pem.bytes() for pem in leaf.cert_chain_pems),
            key_pem=leaf.private_key_pem.bytes(),
        )

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        """Return a client ``SSLContext`` that trusts this CA and nothing else.

        The chain is always verified (``CERT_REQUIRED``); ``check_hostname=False`` accepts
        any name the CA signed, as clients that connect by an address the certificate
        does not hold must.
        """
        context = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        context.check_hostname = check_hostname
        return context

    def __repr__(self) -> str:
        return "<TLSCertificates: CA, server certificate and key (hidden)>"


def prepare(
    tls: bool | TLSCertificates, host: str, directory: Path, owner: str | None
) -> tuple[TLSCertificates | None, Path | None]:
    """Resolve a server's ``tls`` option and write its files; return the certificates and
    the CA file's path, or ``(None, None)`` without TLS.

    ``True`` makes certificates for ``host`` and ``DEFAULT_TLS_NAMES``. The files go to
    ``directory`` (made if missing), owned by ``owner`` (a user that is also a group, such
    as ``mysql``) when given; ``server_flags(directory)`` then serves them.
    """
    if not tls:
        return None, None
    certificates = tls if isinstance(tls, TLSCertificates) else None
    if certificates is None:
        certificates = TLSCertificates.generate(*dict.fromkeys((host, *DEFAULT_TLS_NAMES)))
    directory.mkdir(parents=True, exist_ok=True)
    pieces = (certificates.ca_pem, certificates.cert_pem, certificates.key_pem)
    for (name, mode), data in zip(_FILES, pieces, strict=True):
        path = directory / name
        path.write_bytes(data)
        path.chmod(mode)
        if owner is not None:
            shutil.chown(path, owner, owner)
    return certificates, directory / _FILES[0][0]


def server_flags(directory: Path) -> list[str]:
    """The mariadbd flags that serve TLS with the files ``install`` wrote to ``directory``."""
    ca, cert, key = (directory / name for name, _ in _FILES)
    return [f"--ssl-ca={ca}", f"--ssl-cert={cert}", f"--ssl-key={key}"]
