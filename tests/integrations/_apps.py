"""Running the example applications: in-process (httpx over ASGI) or behind a real server."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

import asyncgone

APPS = ["starlette_app", "fastapi_app", "quart_app"]


def make_app(name: str, db: asyncgone.Database) -> Any:
    module = importlib.import_module(f"examples.{name}")
    return module.create_app(db)


@contextlib.asynccontextmanager
async def lifespan_of(app: Any) -> AsyncIterator[None]:
    """Run the app's startup and shutdown as a server would."""
    if hasattr(app, "startup") and hasattr(app, "shutdown"):  # Quart
        await app.startup()
        try:
            yield
        finally:
            await app.shutdown()
    else:  # Starlette, FastAPI
        async with app.router.lifespan_context(app):
            yield


@contextlib.asynccontextmanager
async def in_process(app: Any, *, asgi: Any = None) -> AsyncIterator[httpx.AsyncClient]:
    """A client calling the app in this process, with its lifespan running; ``asgi`` is what
    the client calls instead of the app itself (a wrapper watching it), if given."""
    async with lifespan_of(app):
        # Like a server: an unhandled error becomes the framework's 500, not a client error.
        transport = httpx.ASGITransport(app=asgi or app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def served(name: str, app: Any) -> AsyncIterator[str]:
    """Serve the app on loopback with a real ASGI server (uvicorn; hypercorn for Quart) in
    this event loop; yield its base URL."""
    port = free_port()
    if name == "quart_app":
        config = HypercornConfig()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        stop = asyncio.Event()
        task = asyncio.ensure_future(hypercorn_serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        try:
            await _until_listening(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop.set()
            await task
    else:
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        task = asyncio.ensure_future(server.serve())
        try:
            await _until_listening(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task


async def _until_listening(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError(f"the server did not listen on {port}")
