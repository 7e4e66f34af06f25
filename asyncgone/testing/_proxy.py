"""FaultProxy: a TCP proxy that breaks database connections on command, for tests."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy.engine import URL, make_url

__all__ = ["FaultProxy"]

_T = TypeVar("_T")
_CHUNK = 65536
_CONTROL_TIMEOUT = 10.0  # bound on each control call; they take milliseconds


class _Link:
    """One proxied connection: the client's socket, the server's, and the pumps between."""

    __slots__ = ("blackholed", "client", "cut_on_reply", "server", "tasks")

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.blackholed = False
        self.cut_on_reply = False  # cut as soon as the server answers (see FaultProxy.cut_on)
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        """Close both sockets with RST (SO_LINGER 0), as a crashed peer or firewall would."""
        for writer in (self.client, self.server):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class FaultProxy:
    """A TCP proxy in front of a database server that can cut, blackhole or slow connections.

    It runs its own event loop in a daemon thread, so it works the same from sync and async
    tests, under any event loop (uvloop included), and never stalls with the code under test.
    Its control methods return once the fault is in effect::

        with FaultProxy.for_url("mysql+asyncmy://root@127.0.0.1:3306/test") as proxy:
            engine = asyncgone.create_engine(proxy.url)   # same URL, through the proxy
            ...
            proxy.cut()                   # RST every open connection, like a crash or a firewall
            proxy.blackhole()             # drop all bytes of open connections, like a load
                                          # balancer that forgot the flows; new ones still work
            proxy.blackhole(include_new=True)   # ... and of every later connection too
            proxy.cut_on(b"COMMIT")       # cut the connection that next sends COMMIT, before
                                          # the server gets it (it never executes)
            proxy.cut_on(b"COMMIT", deliver=True)   # ... after the server got it: it runs,
                                          # but its answer is lost with the connection
            proxy.send_to_clients(FaultProxy.error_packet(4031, "..."))   # unsolicited bytes
                                          # from the "server", connections left open
            proxy.set_latency(0.2)        # delay every chunk, both directions, by 200 ms
            proxy.reject()                # stop listening: new connections are refused
            proxy.restore()               # undo reject, latency and blackhole for new connections

    A blackholed connection stays dead after ``restore()``: bytes dropped mid-stream cannot
    be delivered later. Note that the proxy's own kernel still acknowledges TCP segments, so
    kernel-level keepalive on the client cannot see this blackhole; it tests application-level
    bounds (ping timeouts), which is what a dropped flow behind a proxy looks like too.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if not isinstance(upstream_port, int) or not 0 < upstream_port < 65536:
            raise ValueError(f"upstream_port must be a TCP port number, got {upstream_port!r}")
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._blackhole_new = False
        self._latency = 0.0
        self._target_url: URL | None = None
        self._closing = False
        self._trigger: tuple[re.Pattern[bytes], bool] | None = None
        self.accepted = 0  #: connections accepted since start
        self.tripped = 0  #: connections cut by a cut_on() trigger

    @classmethod
    def for_url(cls, url: str | URL, **kwargs: Any) -> FaultProxy:
        """Create a proxy in front of the host and port a database URL names."""
        parsed = make_url(url)
        proxy = cls(parsed.host or "127.0.0.1", parsed.port or 3306, **kwargs)
        proxy._target_url = parsed
        return proxy

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Start listening; return self. The port is chosen by the OS unless given."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy is already started")
        # Always asyncio's selector loop, whatever policy the application installed: the
        # proxy's behaviour must not depend on the loop under test.
        loop = asyncio.SelectorEventLoop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="asyncgone-fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(_CONTROL_TIMEOUT)
        try:
            self._call(self._listen(self._requested_port))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close every connection and stop the proxy's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_CONTROL_TIMEOUT)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> FaultProxy:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    @property
    def url(self) -> URL:
        """The URL given to ``for_url()``, pointed at the proxy."""
        if self._target_url is None:
            raise RuntimeError("FaultProxy.url needs a proxy made with FaultProxy.for_url()")
        return self.route(self._target_url)

    def route(self, url: str | URL) -> URL:
        """Return ``url`` with its host and port replaced by the proxy's."""
        return make_url(url).set(host=self.host, port=self.port)

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._links)

    # -- faults ------------------------------------------------------------------------------

    def cut(self) -> int:
        """Reset (RST) every open connection on both sides; return how many were cut."""
        return self._call(self._cut())

    def blackhole(self, *, include_new: bool = False) -> int:
        """Silently drop every byte of open connections, keeping their sockets open.

        With ``include_new``, connections opened later are accepted but blackholed too.
        Returns how many open connections were blackholed.
        """
        return self._call(self._blackhole(include_new))

    def cut_on(self, marker: bytes, *, deliver: bool = False) -> None:
        """Cut (RST) the next connection whose client sends ``marker`` as a whole word.

        A marker that begins or ends with a letter, digit or ``_`` matches only where no
        such character adjoins it: ``b"COMMIT"`` matches ``COMMIT`` but not the
        ``SET AUTOCOMMIT = 0`` a new connection sends. With ``deliver=False`` the chunk
        never reaches the server. With ``deliver=True`` it does, and the connection is cut
        when the server answers, before the answer reaches the client. One-shot:
        ``tripped`` counts the cuts made this way.

        Raises:
            ValueError: ``marker`` is not non-empty bytes.
        """
        if not isinstance(marker, bytes) or not marker:
            raise ValueError(f"marker must be non-empty bytes, got {marker!r}")
        before = rb"(?<![\w])" if re.match(rb"\w", marker[:1]) else b""
        after = rb"(?![\w])" if re.match(rb"\w", marker[-1:]) else b""
        self._call(self._arm(re.compile(before + re.escape(marker) + after), deliver))

    def send_to_clients(self, data: bytes) -> int:
        """Write ``data`` to the client side of every open connection, as if the server had
        sent it unasked, and keep the connections open; return how many got it.

        For example MySQL's 4031 error packet, which MySQL 8.0.24+ sends to a connection
        idle past ``wait_timeout`` (see ``FaultProxy.error_packet``).
        """
        if not isinstance(data, bytes) or not data:
            raise ValueError(f"data must be non-empty bytes, got {data!r}")
        return self._call(self._send_to_clients(data))

    @staticmethod
    def error_packet(code: int, message: str, *, sqlstate: str = "HY000", seq: int = 0) -> bytes:
        """Build a MySQL ERR packet, e.g. ``error_packet(4031, "The client was
        disconnected by the server because of inactivity.")``."""
        payload = b"\xff" + struct.pack("<H", code) + b"#" + sqlstate.encode()[:5]
        payload += message.encode()
        return struct.pack("<I", len(payload))[:3] + bytes([seq & 0xFF]) + payload

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk forwarded in either direction by ``seconds``."""
        if seconds < 0:
            raise ValueError(f"latency must be zero or more seconds, got {seconds!r}")
        self._latency = float(seconds)

    def reject(self) -> None:
        """Stop listening, so new connections are refused as by a server that is down."""
        self._call(self._stop_listening())

    def restore(self) -> None:
        """Listen again, without latency, and forward new connections normally."""
        self._latency = 0.0
        self._blackhole_new = False
        self._call(self._listen(self.port))

    # -- inside the proxy's loop -------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("FaultProxy is not started")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(_CONTROL_TIMEOUT)

    async def _listen(self, port: int) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, self.host, port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        loop = asyncio.get_running_loop()
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
        # Connections accepted in this iteration become transports a few callbacks later;
        # closing the server under them leaks their sockets (asyncio asserts in
        # Server._attach and drops them). Stop accepting first, let those land, then close.
        for _ in range(3):
            await asyncio.sleep(0)
        # Not wait_closed(): since Python 3.12 it also waits for every accepted connection
        # to end, and reject() keeps those open on purpose.
        server.close()

    async def _arm(self, marker: re.Pattern[bytes], deliver: bool) -> None:
        self._trigger = (marker, deliver)

    def _trip(self, link: _Link) -> None:
        self.tripped += 1
        link.reset()
        self._links.discard(link)

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        self._links.clear()
        return len(links)

    async def _send_to_clients(self, data: bytes) -> int:
        links = list(self._links)
        for link in links:
            link.client.write(data)
        for link in links:
            with contextlib.suppress(OSError, RuntimeError):
                await link.client.drain()
        return len(links)

    async def _blackhole(self, include_new: bool) -> int:
        self._blackhole_new = include_new
        for link in self._links:
            link.blackholed = True
        return len(self._links)

    async def _shutdown(self) -> None:
        self._closing = True
        await self._stop_listening()
        # A connection accepted just before the listener closed is still on its way to
        # _accept, through tasks and plain callbacks. Keep cutting until several loop
        # iterations in a row find nothing pending, so no socket outlives the loop.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CONTROL_TIMEOUT
        quiet = 0
        while quiet < 3 and loop.time() < deadline:
            pending = asyncio.all_tasks() - {asyncio.current_task()}
            await self._cut()
            if pending:
                quiet = 0
                await asyncio.wait(pending, timeout=0.1)
            else:
                quiet += 1
                await asyncio.sleep(0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._closing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), _CONTROL_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        link.blackholed = self._blackhole_new
        self._links.add(link)
        link.tasks = [
            asyncio.ensure_future(self._pump(link, reader, up_writer, upstream=True)),
            asyncio.ensure_future(self._pump(link, up_reader, writer, upstream=False)),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        self._links.discard(link)
        for side in (writer, up_writer):
            side.transport.abort()

    async def _pump(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        try:
            while True:
                data = await source.read(_CHUNK)
                if not data:
                    break
                if link.blackholed:
                    continue  # read and discard, so the sender never notices
                if not upstream and link.cut_on_reply:
                    self._trip(link)
                    return
                trigger = self._trigger
                if upstream and trigger is not None and trigger[0].search(data):
                    self._trigger = None
                    if not trigger[1]:
                        self._trip(link)
                        return
                    link.cut_on_reply = True
                if self._latency:
                    await asyncio.sleep(self._latency)
                sink.write(data)
                await sink.drain()
        except (OSError, RuntimeError):
            pass  # the other side is gone; the gather in _accept tears the link down
        # A clean EOF from one side ends the link: MySQL connections never half-close.
        if not link.blackholed:
            for task in link.tasks:
                task.cancel()
