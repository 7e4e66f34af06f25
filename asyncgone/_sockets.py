"""TCP keepalive and TCP_USER_TIMEOUT on a driver's socket: dead-peer detection in the kernel.

aiomysql and asyncmy turn on ``SO_KEEPALIVE`` but leave the kernel's timings, so Linux waits
two hours before the first probe and about fifteen minutes of retransmissions before giving
up on unacknowledged data. A load balancer that silently forgets a flow therefore hangs a
query for that long. Shorter timings make the kernel close such a socket within seconds, and
the driver then raises a normal "lost connection" error. A live server's kernel answers the
probes however long its query runs, so these settings never cut legitimate work.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from ._config import TCPKeepalive
from ._drivers import is_tcp

__all__ = ["apply_tcp_keepalive"]

log = logging.getLogger("asyncgone")

# (socket option, TCPKeepalive field) pairs, only for options this platform defines.
# macOS calls TCP_KEEPIDLE TCP_KEEPALIVE; Windows and some BSDs lack TCP_USER_TIMEOUT.
_OPTIONS: tuple[tuple[int, str], ...] = tuple(
    (getattr(socket, name), field)
    for name, field in (
        ("TCP_KEEPIDLE", "idle"),
        ("TCP_KEEPALIVE", "idle"),
        ("TCP_KEEPINTVL", "interval"),
        ("TCP_KEEPCNT", "count"),
        ("TCP_USER_TIMEOUT", "user_timeout"),
    )
    if hasattr(socket, name) and not (name == "TCP_KEEPALIVE" and hasattr(socket, "TCP_KEEPIDLE"))
)


def apply_tcp_keepalive(sock: Any, settings: TCPKeepalive) -> bool:
    """Apply ``settings`` to a TCP socket; return False for a non-TCP socket (nothing done).

    An option the kernel refuses is logged at DEBUG and skipped: the connection works
    without it, only with slower dead-peer detection.
    """
    if sock is None or not is_tcp(sock):
        return False
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, field in _OPTIONS:
        value = getattr(settings, field)
        if field == "user_timeout":
            value = int(value * 1000)  # the kernel counts milliseconds
            if value == 0:
                continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError as exc:
            log.debug("could not set TCP option %s=%s: %s", field, value, exc)
    return True
