"""Multi-host URLs: the candidate hosts of a URL, the role asked for, and their validation.

A URL names several servers the way libpq and ``make_url()`` allow, with repeated ``host``
query parameters and no host in the authority part::

    mysql+asyncmy://app:secret@/app?host=db1:3306&host=db2:3306&host=db3

SQLAlchemy parses them into a tuple (``url.query["host"]``) but its MySQL dialects cannot
connect with it. asyncgone takes the hosts out, gives SQLAlchemy a URL for the first one
(so the dialect's connect arguments are complete) and lets the host search (``_search``)
pick a host for each new connection, by the role the engine asks for:

- ``"primary"``: a writable server (``@@read_only`` and ``@@innodb_read_only`` both off);
- ``"replica"``: a read-only one;
- ``"any"``: whichever answers first.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Literal

from sqlalchemy.engine import URL

from ._errors import ConfigurationError

__all__ = [
    "DEFAULT_PORT",
    "ROLES",
    "HostAddress",
    "TargetRole",
    "check_target_role",
    "hosts_of",
    "role_fits",
    "without_hosts",
]

TargetRole = Literal["primary", "replica", "any"]

#: The roles an engine may ask its hosts for.
ROLES: tuple[TargetRole, ...] = ("primary", "replica", "any")

#: The port of a host written without one.
DEFAULT_PORT = 3306


@dataclasses.dataclass(frozen=True, slots=True)
class HostAddress:
    """One candidate server of a URL."""

    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def check_target_role(value: object) -> TargetRole:
    """Return ``value`` if it is one of ``ROLES``, else raise ``ConfigurationError``."""
    if value in ROLES:
        return value
    close = difflib.get_close_matches(str(value), ROLES, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigurationError(
        f"target_role must be one of {', '.join(map(repr, ROLES))}, got {value!r}{hint}"
    )


def _address(text: str, shown: str) -> HostAddress:
    if text != text.strip() or any(c.isspace() for c in text):
        raise ConfigurationError(f"host {text!r} in {shown} has spaces; write host=NAME:PORT")
    if "," in text:
        raise ConfigurationError(
            f"host {text!r} in {shown} names several servers: one per host= parameter, "
            f"e.g. ?host=db1:3306&host=db2:3306"
        )
    if text.count(":") > 1 and not text.startswith("["):
        raise ConfigurationError(
            f"host {text!r} in {shown} looks like an IPv6 address: write it in brackets, "
            f"e.g. host=[::1]:3306"
        )
    host, sep, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not sep:
        host, port = text, ""
    host = host.strip("[]")
    if not host:
        raise ConfigurationError(f"empty host in {text!r} in {shown}; write host=NAME:PORT")
    if not port:
        return HostAddress(host)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(
            f"port of host {text!r} in {shown} must be a number from 1 to 65535"
        )
    return HostAddress(host, int(port))


def hosts_of(url: URL) -> tuple[HostAddress, ...]:
    """Return the hosts a URL names in its ``host`` query parameters (empty if it names none).

    Raises:
        ConfigurationError: the URL also names a host or port in its authority part, or a
            host is empty or has an unusable port; the message shows the URL with its
            password masked.
    """
    given = url.query.get("host")
    if given is None:
        return ()
    shown = url.render_as_string(hide_password=True)
    if url.host or url.port:
        raise ConfigurationError(
            f"{shown} names a host both before the path and in ?host=: write every server "
            f"as a host= parameter, e.g. mysql+asyncmy://user:pw@/db?host=db1:3306&host=db2"
        )
    if "port" in url.query:
        raise ConfigurationError(
            f"{shown} gives port= next to host= parameters, where it applies to none: give "
            f"each host its port, e.g. ?host=db1:3307&host=db2:3307"
        )
    values = (given,) if isinstance(given, str) else tuple(given)
    hosts = tuple(_address(value, shown) for value in values)
    if len({(h.host.lower(), h.port) for h in hosts}) != len(hosts):  # names ignore case
        raise ConfigurationError(f"{shown} names the same host twice")
    return hosts


def without_hosts(url: URL, first: HostAddress) -> URL:
    """The URL SQLAlchemy gets: the ``host`` parameters replaced by ``first`` as its host."""
    query = {key: value for key, value in url.query.items() if key != "host"}
    return url.set(host=first.host, port=first.port, query=query)


def role_fits(target: TargetRole, read_only: bool) -> bool:
    """Whether a server that is (or is not) read-only serves ``target``."""
    if target == "primary":
        return not read_only
    if target == "replica":
        return read_only
    return True
