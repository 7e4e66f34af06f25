"""TCP options land on the drivers' real sockets, under asyncio and uvloop."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlalchemy import text

import asyncgone
from asyncgone import TCPKeepalive
from asyncgone._drivers import transport_socket
from asyncgone.testing import MariaDBServer

pytestmark = pytest.mark.anyio


async def tcp_options(url: str, **options: object) -> dict[str, int]:
    engine = asyncgone.create_engine(url, **options)
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            sock = transport_socket(raw.driver_connection)
            return {
                "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            }
    finally:
        await engine.dispose()


async def test_defaults_are_applied(url: str) -> None:
    """Every new connection gets the default keepalive timings and TCP_USER_TIMEOUT."""
    assert await tcp_options(url) == {
        "keepalive": 1,
        "idle": 15,
        "interval": 5,
        "count": 3,
        "user_timeout_ms": 30_000,
    }


async def test_custom_settings_are_applied(url: str) -> None:
    """``tcp_keepalive=TCPKeepalive(...)`` reaches the socket as given."""
    custom = TCPKeepalive(idle=60, interval=10, count=6, user_timeout=90)
    options = await tcp_options(url, tcp_keepalive=custom)
    assert (options["idle"], options["interval"], options["count"]) == (60, 10, 6)
    assert options["user_timeout_ms"] == 90_000


async def test_none_leaves_the_kernel_defaults(url: str) -> None:
    """``tcp_keepalive=None`` keeps the kernel's two-hour idle time and no user timeout."""
    options = await tcp_options(url, tcp_keepalive=None)
    # A /proc read answers from memory at once; no need for a thread.
    kernel_default = int(Path("/proc/sys/net/ipv4/tcp_keepalive_time").read_text())  # noqa: ASYNC240
    assert options["idle"] == kernel_default
    assert options["user_timeout_ms"] == 0


async def test_unix_socket_connections_are_left_alone(
    disposable_server: MariaDBServer, driver: str
) -> None:
    """Connections over a unix socket work; TCP options simply do not apply to them."""
    sock = disposable_server.basedir / "mysqld.sock"
    engine = asyncgone.create_engine(f"mysql+{driver}://root@localhost/test?unix_socket={sock}")
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()
