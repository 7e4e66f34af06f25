"""Whether an idle driver connection can no longer be used, told without a round trip.

Each watch answers for one connection: the server closed it (FIN or RST), unsolicited bytes
arrived (e.g. MySQL's 4031 error packet), or the driver closed it itself. What the event
loop already read counts first; then, unless the caller knows the server answered a moment
ago (``_checkout.FRESH``), the kernel is asked, with one ``poll(2)``, what a loop kept busy
since has not read yet. A watch is made once per connection
(``DriverSupport.watch``) with its poll object ready, as the checkout asks it at every
reuse. The descriptor is the connection's for its whole life: once the driver closes the
socket, the attribute checks answer before the kernel is asked. The attributes read are the
drivers' private stream state, listed in ``docs/architecture.md``.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

__all__ = ["WATCHES", "Closed", "Poll", "poll_once", "unknown", "watch_unknown"]

#: A registered ``poll(2)`` call: timeout in milliseconds, the events seen.
Poll = Callable[[int], list[tuple[int, int]]]

#: A watch: ``closed(conn, ask_kernel)`` tells whether ``conn`` can no longer be used, from
#: what the loop and the driver know, and if ``ask_kernel``, from one ``poll(2)`` too.
Closed = Callable[[Any, bool], bool]

# poll(2) rather than select(2), which fails on descriptors above 1023. Readable, hung up or
# in error all mean the same for an idle connection: it cannot be handed out.
_poll = getattr(select, "poll", None)
_POLL_EVENTS = getattr(select, "POLLIN", 1) | getattr(select, "POLLPRI", 2)


def poll_once(transport: Any) -> Poll | None:
    """A poll object for one socket, made once: each call is then one ``poll(2)``. None
    where there is no socket (or no poll)."""
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None or _poll is None:
        return None
    poller = _poll()
    try:
        poller.register(sock.fileno(), _POLL_EVENTS)
    except (OSError, ValueError):
        return None
    poll: Poll = poller.poll
    return poll


def _watch_buffered(poll: Poll | None, transport: Any) -> Closed:
    def closed(conn: Any, ask_kernel: bool) -> bool:
        proto, transport = conn._proto, conn._transport
        if proto is None or transport is None:
            return True  # closed by the driver
        if (
            transport.is_closing()
            or proto.eof
            or proto.exc is not None
            or proto.length > proto.pos  # unsolicited bytes
        ):
            return True
        if not ask_kernel:
            return False
        try:
            return poll is not None and bool(poll(0))
        except (OSError, ValueError):  # the socket is being torn down
            return True

    return closed


def _watch_streams(poll: Poll | None, transport: Any) -> Closed:
    if transport is None:
        return _gone  # closed by the driver already
    is_closing = transport.is_closing

    def closed(conn: Any, ask_kernel: bool) -> bool:
        reader = conn._reader
        if reader is None or conn._writer is None:
            return True  # closed by the driver
        # asyncio's StreamReader: _eof once the peer's FIN was read (an error packet may
        # still be buffered), _buffer unread bytes, _exception a transport error.
        if reader._eof or reader._buffer or reader._exception is not None or is_closing():
            return True
        if not ask_kernel:
            return False
        try:
            return poll is not None and bool(poll(0))
        except (OSError, ValueError):  # the socket is being torn down
            return True

    return closed


def watch_unknown(poll: Poll | None, transport: Any) -> Closed:
    return unknown


def unknown(conn: Any, ask_kernel: bool) -> bool:
    """The watch of a connection whose socket asyncgone cannot see (also before a watch
    is set up): never known to be closed."""
    return False  # nothing can be told without a round trip: the checkout pings instead


def _gone(conn: Any, ask_kernel: bool) -> bool:
    return True


#: The watch for each connection shape (``_drivers.Shape`` values).
WATCHES: dict[str, Callable[[Poll | None, Any], Closed]] = {
    "buffered": _watch_buffered,
    "streams": _watch_streams,
    "unknown": watch_unknown,
}
