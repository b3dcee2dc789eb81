"""Serving the dashboard: a listening socket and hypercorn's trio worker."""

from __future__ import annotations

import functools
import socket
import ssl
from typing import TYPE_CHECKING, Any, cast

import trio
from hypercorn.config import Config, Sockets
from hypercorn.logging import Logger
from hypercorn.trio.run import worker_serve
from hypercorn.typing import ASGIFramework
from hypercorn.utils import wrap_app
from starlette.types import ASGIApp

from dt_trio._dashboard._address import is_loopback, parse_address
from dt_trio._dashboard._app import create_app
from dt_trio._dashboard._security import Guard
from dt_trio._engine import HubClient
from dt_trio._log import get_logger

if TYPE_CHECKING:
    from dt_trio._metrics._http import Probes

log = get_logger("dt_trio")


class _Log(Logger):
    """hypercorn's messages in dt-trio's log, its start-up banner ("Running on ...") at
    DEBUG: the hub logs the dashboard's address itself."""

    async def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        await self.debug(message, *args, **kwargs)


class _Config(Config):
    """A hypercorn configuration serving TLS with the sidecar's own context."""

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._context = ssl_context
        self.errorlog = get_logger("dt_trio._dashboard.http")
        self.accesslog = None
        self.logger_class = _Log
        self.graceful_timeout = 1.0

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context


def listen_dashboard(address: str) -> socket.socket:
    """A listening socket at `address` ('HOST:PORT', port 0 for any) for `serve_dashboard`;
    OSError naming the address if it cannot be bound."""
    host, port = parse_address(address)
    try:
        family, kind, proto, _, bound = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(bound)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


async def serve_dashboard(
    client: HubClient,
    sock: socket.socket,
    *,
    read_only: bool = False,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    probes: Probes | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dashboard of `client`'s hub on `sock` (see `listen_dashboard`; closed when
    this ends) until cancelled, with `probes` (/metrics, /healthz, /readyz) beside it.
    Reports its URL through `task_status`."""
    guard = Guard(
        token=token,
        read_only=read_only,
        loopback=is_loopback(sock.getsockname()[0]),
        tls=ssl_context is not None,
    )
    app = create_app(client, guard, probes)
    await serve_app(app, sock, "dashboard", ssl_context=ssl_context, task_status=task_status)


async def serve_app(
    app: ASGIApp,
    sock: socket.socket,
    what: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `sock` (closed when this ends) under hypercorn's trio worker until
    cancelled; logs "`what` at URL" once it serves, and reports the URL through
    `task_status`."""
    bound_host, bound_port = sock.getsockname()[:2]
    config = _Config(ssl_context)
    sockets = Sockets(
        secure_sockets=[sock] if ssl_context is not None else [],
        insecure_sockets=[] if ssl_context is not None else [sock],
        quic_sockets=[],
    )
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"{'https' if ssl_context else 'http'}://{shown}:{bound_port}"
    wrapped = wrap_app(cast(ASGIFramework, app), 0, "asgi")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(worker_serve, wrapped, config, sockets=sockets))
            log.info("%s at %s", what, url)
            task_status.started(url)
    finally:
        sock.close()
