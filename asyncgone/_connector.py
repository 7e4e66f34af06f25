"""Opening driver connections: the whole handshake bounded, errors as the driver's own.

SQLAlchemy's async dialects open a connection through a coroutine function they accept as
``async_creator_fn`` (how ``create_async_engine(async_creator=...)`` works); asyncgone's
``do_connect`` listener hands them the connector below. The drivers' own ``connect_timeout``
covers opening the TCP connection only: a server or proxy that accepts the connection and
never sends its greeting hangs them forever. The connector bounds the whole handshake,
closes the half-open socket on a timeout or a cancellation, and raises the driver's error
2003, as a refused connection would.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ._drivers import DriverSupport, connect_error, new_connection
from ._waits import bounded

if TYPE_CHECKING:
    from ._admission import Admission

__all__ = ["Connector", "connector_for"]

Connector = Callable[..., Awaitable[Any]]


def connector_for(
    driver: DriverSupport, timeout: float, admission: Admission | None = None
) -> Connector | None:
    """Return ``connect(**kwargs)`` for this driver, bounded by ``timeout`` seconds, or None
    for a dialect whose driver asyncgone does not know (its own connect is used then).

    With an ``admission`` (``_admission``), each attempt waits for its turn and refusals are
    retried after a backoff."""
    if not driver.known:
        return None
    name = driver.name
    error = connect_error(name)

    async def connect(*args: Any, **kwargs: Any) -> Any:
        if admission is not None:
            return await admission.connect(lambda: open_one(*args, **kwargs))
        return await open_one(*args, **kwargs)

    async def open_one(*args: Any, **kwargs: Any) -> Any:
        conn, opening = new_connection(name, *args, **kwargs)
        try:
            await bounded(opening, timeout)
        except TimeoutError:
            conn.close()
            host = kwargs.get("host") or kwargs.get("unix_socket") or "localhost"
            raise error(
                2003,
                f"Can't connect to MySQL server on {host!r}: no server greeting within "
                f"{timeout:g} s (connect_timeout)",
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    return connect


async def open_connection(driver: DriverSupport, params: dict[str, Any], timeout: float) -> Any:
    """Open one raw driver connection with ``params``, bounded (for ``KILL QUERY``)."""
    connect = connector_for(driver, timeout)
    if connect is not None:
        return await connect(**params)
    return await driver.open_with_dialect(params, timeout)
