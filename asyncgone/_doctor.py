"""``asyncgone doctor``: what a server's settings mean for pooled connections, and advice."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import statistics
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from . import _drivers, _statements
from ._config import DEFAULT_MAX_LIFETIME, DEFAULT_NETWORK_IDLE_LIMIT, DEFAULT_PING_AFTER
from ._doctor_hosts import examine_hosts
from ._engine import create_engine
from ._fleet import fleet_budget, read_limits
from ._server import auto_idle_limit
from ._state import state_of
from ._url import mask, resolve_url
from ._waits import bounded

__all__ = ["Report", "asks_for_tls", "examine", "tls_summary"]

_VARIABLES = (
    ("version", "VERSION()"),
    ("version_comment", "@@version_comment"),
    ("wait_timeout_global", "@@global.wait_timeout"),
    ("wait_timeout_session", "@@session.wait_timeout"),
    ("interactive_timeout_global", "@@global.interactive_timeout"),
    ("interactive_timeout_session", "@@session.interactive_timeout"),
    ("net_read_timeout", "@@net_read_timeout"),
    ("net_write_timeout", "@@net_write_timeout"),
    ("max_allowed_packet", "@@max_allowed_packet"),
    ("max_connections", "@@max_connections"),
    ("read_only", "@@global.read_only"),
)
_NOTHING = "Nothing to change: asyncgone's defaults fit this server."
_PINGS = 5
_SLEEPERS = 10
# URL query keys that ask the driver for TLS (SQLAlchemy's MySQL dialects gather them into
# the driver's ``ssl`` argument).
_TLS_KEYS = ("ssl_ca", "ssl_capath", "ssl_cert", "ssl_key", "ssl_cipher", "ssl_check_hostname")


@dataclasses.dataclass(frozen=True)
class Report:
    """Everything ``doctor`` found out, ready for text or JSON.

    ``tls`` is this connection's encryption: ``encrypted``, ``version`` and ``cipher`` as
    the server reports them (``Ssl_version``, ``Ssl_cipher``); ``client_encrypted``, and
    whether the client verified the certificate (``certificate_verified``) and the host
    name in it (``hostname_checked``), from the client's own TLS state (None without TLS).
    ``network`` is the client's socket: ``transport`` (``tcp``, ``unix`` or ``unknown``),
    ``peer`` (the address it talks to) and ``local`` (unix socket or loopback address;
    None when unknown).
    """

    target: str
    server: dict[str, Any]
    round_trip_ms: float
    threads_connected: int
    tls: dict[str, Any]
    network: dict[str, Any]
    sleeping: list[dict[str, Any]]
    derived: dict[str, float]
    advice: list[str]
    hosts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fleet: dict[str, Any] | None = None  # with --processes: see _fleet

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def examine(url: str | URL, timeout: float, fleet: dict[str, int] | None = None) -> Report:
    """Connect once, read the server's limits and the connection's encryption, time a few
    pings, and advise; with ``fleet`` (``processes``, ``pool_size``, ``max_overflow``), also
    on what that fleet may open against the server's connection limits."""
    parsed = resolve_url(url)
    several = "host" in parsed.query
    # A multi-host URL: the first host that answers is examined, whatever its role.
    roles = {"target_role": "any"} if several else {}
    engine = create_engine(
        url, poolclass=NullPool, connect_timeout=timeout, connect_retry=None, **roles
    )
    state = state_of(engine)
    try:
        async with engine.connect() as conn:
            row = (
                await bounded(
                    conn.execute(text("SELECT " + ", ".join(expr for _, expr in _VARIABLES))),
                    timeout,
                )
            ).one()
            server = {name: _plain(value) for (name, _), value in zip(_VARIABLES, row, strict=True)}
            raw = (await conn.get_raw_connection()).driver_connection
            rtts = []
            for _ in range(_PINGS):
                started = time.perf_counter()
                await bounded(_statements.ping(raw), timeout)
                rtts.append((time.perf_counter() - started) * 1000)
            threads = await bounded(
                conn.execute(text("SHOW GLOBAL STATUS LIKE 'Threads_connected'")), timeout
            )
            threads_connected = int(threads.one()[1])
            # The server's view of this very connection: empty values when it is clear text.
            ssl_status = await bounded(
                conn.execute(
                    text("SHOW SESSION STATUS WHERE Variable_name IN ('Ssl_version', 'Ssl_cipher')")
                ),
                timeout,
            )
            tls = _tls(dict(ssl_status.tuples().all()), raw)
            network = _network(raw)
            sleepers = await bounded(
                conn.execute(
                    text(
                        "SELECT ID, USER, HOST, DB, TIME FROM information_schema.PROCESSLIST "
                        "WHERE COMMAND = 'Sleep' AND ID <> CONNECTION_ID() "
                        "ORDER BY TIME DESC LIMIT :n"
                    ),
                    {"n": _SLEEPERS},
                ),
                timeout,
            )
            sleeping = [
                {"id": r.ID, "user": r.USER, "host": r.HOST, "db": r.DB, "idle_s": int(r.TIME)}
                for r in sleepers
            ]
            limits = None if fleet is None else await read_limits(conn, timeout)
        hosts = await examine_hosts(state, timeout) if several and state else []
    finally:
        await engine.dispose()
    wait_timeout = float(server["wait_timeout_session"])
    idle_limit = auto_idle_limit(wait_timeout)
    derived = {
        "idle_limit_s": round(idle_limit, 1),
        "keepalive_interval_s": round(min(idle_limit, DEFAULT_NETWORK_IDLE_LIMIT) / 2, 1),
        "ping_after_s": DEFAULT_PING_AFTER,
        "max_lifetime_s": DEFAULT_MAX_LIFETIME,
    }
    round_trip = statistics.median(rtts)
    figures: dict[str, Any] | None = None
    fleet_advice: list[str] = []
    if fleet is not None and limits is not None:
        figures, fleet_advice = fleet_budget(
            {**server, **limits[0]}, **fleet, others=threads_connected - 1, admin=limits[1]
        )
    return Report(
        target=mask(url),
        server=server,
        round_trip_ms=round(round_trip, 3),
        threads_connected=threads_connected,
        tls=tls,
        network=network,
        sleeping=sleeping,
        derived=derived,
        advice=[
            *_advise_tls(tls, network, asked=asks_for_tls(url)),
            *[
                line
                for line in _advise(server, derived, round_trip, threads_connected, sleeping)
                if not (fleet_advice and line == _NOTHING)
            ],
            *fleet_advice,
        ],
        hosts=hosts,
        fleet=figures,
    )


def asks_for_tls(url: str | URL) -> bool:
    """Whether the URL's query holds TLS settings (``ssl_ca=`` and the like)."""
    return any(key in make_url(url).query for key in _TLS_KEYS)


def _tls(status: dict[str, str], raw: Any) -> dict[str, Any]:
    """This connection's encryption, as the server reports it and as the client holds it."""
    version, cipher = status.get("Ssl_version") or None, status.get("Ssl_cipher") or None
    # The transport's ssl.SSLObject (asyncio's and uvloop's TLS transports both expose it)
    # knows what the client checked. _drivers owns the drivers' private attributes; the
    # transport is all that is taken from it.
    transport = _drivers.transport(raw)
    ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
    verified = hostname = None
    if ssl_object is not None:
        # getpeercert() is empty unless the chain was verified; check_hostname is what the
        # handshake enforced on top of that.
        verified = bool(ssl_object.getpeercert())
        hostname = verified and bool(ssl_object.context.check_hostname)
    return {
        "encrypted": cipher is not None,
        "version": version,
        "cipher": cipher,
        "client_encrypted": ssl_object is not None,
        "certificate_verified": verified,
        "hostname_checked": hostname,
    }


def _network(raw: Any) -> dict[str, Any]:
    """Where the client's socket leads: a unix socket, a loopback address or the network."""
    sock = _drivers.transport_socket(raw)
    family = getattr(sock, "family", None)
    if family == getattr(socket, "AF_UNIX", object()):
        return {"transport": "unix", "peer": None, "local": True}
    if not _drivers.is_tcp(sock):
        return {"transport": "unknown", "peer": None, "local": None}
    try:
        peer = str(sock.getpeername()[0])
        address = ipaddress.ip_address(peer.partition("%")[0])  # drop an IPv6 zone
    except (OSError, ValueError):
        return {"transport": "tcp", "peer": None, "local": None}
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return {"transport": "tcp", "peer": peer, "local": address.is_loopback}


def _advise_tls(tls: dict[str, Any], network: dict[str, Any], *, asked: bool) -> list[str]:
    """Advice on encryption: clear text across a network first, then weak verification."""
    if not tls["client_encrypted"]:
        advice = []
        if asked:
            advice.append(
                "The URL asks for TLS (ssl_...), yet this connection is not encrypted: the "
                "server offers no TLS, and aiomysql then goes on in clear text without a word "
                "(asyncmy refuses). Configure TLS on the server (ssl_cert, ssl_key)."
            )
        if network["local"] is False:
            advice.append(
                f"This connection crosses the network to {network['peer']} in clear text: "
                f"anyone on the path can read every query and result, and the login exchange, "
                f"open to offline password guessing. Use TLS: connect_args={{'ssl': "
                f"ssl.create_default_context(cafile=CA_FILE)}} with either driver, or "
                f"?ssl_ca=CA_FILE in the URL (see the TLS page of the documentation)."
            )
        return advice
    if not tls["certificate_verified"]:
        return [
            "The connection is encrypted, but this client did not verify the server's "
            "certificate: whatever answers on the way can pose as the server and read "
            "everything. Give the client the CA that signed it (cafile= in "
            "ssl.create_default_context(), or ssl_ca= in the URL)."
        ]
    if not tls["hostname_checked"]:
        return [
            "The server's certificate was verified, but not the host name in it: any "
            "certificate from that CA passes. Keep check_hostname on (as "
            "ssl.create_default_context() does) and connect by a name the certificate holds."
        ]
    return []


def tls_summary(tls: dict[str, Any], network: dict[str, Any]) -> str:
    """The ``tls`` line of doctor's text report."""
    if tls["encrypted"] and tls["client_encrypted"]:
        checks = "certificate NOT verified"
        if tls["certificate_verified"]:
            checks = "certificate verified, host name " + (
                "checked" if tls["hostname_checked"] else "NOT checked"
            )
        return f"{tls['version']}, {tls['cipher']}; {checks}"
    if tls["client_encrypted"]:
        return "TLS to something in between only: the server reports clear text"
    where = {True: "on this machine", False: f"across the network to {network['peer']}"}
    plain = f"none: clear text {where.get(network['local'], 'to an unknown peer')}"
    if tls["encrypted"]:
        return f"{plain}, then {tls['version']} from something in between to the server"
    return plain


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if hasattr(value, "is_integer"):  # Decimal and float from the server: whole when whole
        return int(value) if float(value).is_integer() else float(value)
    return value


def _advise(
    server: dict[str, Any],
    derived: dict[str, float],
    round_trip_ms: float,
    threads_connected: int,
    sleeping: list[dict[str, Any]],
) -> list[str]:
    advice = []
    wait = int(server["wait_timeout_session"])
    if int(server["wait_timeout_global"]) != wait:
        advice.append(
            f"This client gets wait_timeout={wait} s while the global value is "
            f"{server['wait_timeout_global']} s (interactive clients get interactive_timeout, "
            f"and init commands may change it). asyncgone reads each connection's own value."
        )
    if wait < 60:
        advice.append(
            f"wait_timeout is short ({wait} s): the server closes pooled connections after "
            f"{wait} s of silence. asyncgone retires them after {derived['idle_limit_s']:g} s "
            f"idle; keep the keepalive running (Database does by default) so that a burst after "
            f"a pause does not pay a reconnect per connection, or raise wait_timeout."
        )
    if wait > DEFAULT_NETWORK_IDLE_LIMIT:
        advice.append(
            f"Connections may sit idle for up to {wait} s, longer than many load balancers and "
            f"NAT gateways keep a silent flow (4 to 10 minutes). If one sits between the "
            f"application and the server, run the keepalive (interval "
            f"{derived['keepalive_interval_s']:g} s) and keep TCP keepalive on (the default)."
        )
    stale = [s for s in sleeping if s["idle_s"] > 0.9 * wait]
    if stale:
        advice.append(
            f"{len(stale)} connection(s) have been idle for over 90 % of wait_timeout: some "
            f"client pools connections longer than the server keeps them, and its next use of "
            f"them will fail with 2006/2013. asyncgone's recycle='auto' prevents that."
        )
    packet = int(server["max_allowed_packet"])
    if packet < 16 * 1024 * 1024:
        advice.append(
            f"max_allowed_packet is {packet} bytes: a statement larger than that fails with "
            f"1153 and closes its connection."
        )
    if int(server["net_write_timeout"]) < 30 or int(server["net_read_timeout"]) < 30:
        advice.append(
            f"net_read_timeout={server['net_read_timeout']} s / net_write_timeout="
            f"{server['net_write_timeout']} s: a client that pauses while streaming a result "
            f"(or sending a large statement) that long loses its connection with 2013."
        )
    if round_trip_ms > 5:
        advice.append(
            f"A round trip takes {round_trip_ms:.1f} ms: every avoidable one (pool_pre_ping "
            f"pings each checkout) costs that much per request; asyncgone's checks cost none."
        )
    if str(server["read_only"]) in ("1", "ON"):
        advice.append(
            "The server is read-only (a replica, or a primary demoted in a failover): writes "
            "fail with 1290/1836, on which asyncgone invalidates the whole pool."
        )
    if threads_connected > 0.8 * int(server["max_connections"]):
        advice.append(
            f"{threads_connected} of max_connections={server['max_connections']} are in use: "
            f"new connections will soon fail with 1040. Check the pool sizes of every client."
        )
    if not advice:
        advice.append(_NOTHING)
    return advice
