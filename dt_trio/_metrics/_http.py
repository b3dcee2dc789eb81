"""/metrics, /healthz and /readyz over HTTP: on the dashboard's port, or on a port of their own.

None of them asks for the sidecar's token: Prometheus scrapers and the kubelet's probes send
none, and what they show holds no payload (names of orchestrations and activities, counts,
times, and why the hub is not ready). Where they listen follows the dashboard's rules: TLS or
--insecure off loopback, and on loopback only requests that name loopback in their Host.

    /metrics   the hub's metrics in Prometheus' text format (or OpenMetrics, if asked for)
    /healthz   200 while the process serves at all
    /readyz    200 while the hub is ready (`Readiness`, as the gRPC health service reports
               it), else 503 with the reason
"""

from __future__ import annotations

import socket
import ssl

import trio
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from dt_trio._dashboard._address import is_loopback
from dt_trio._dashboard._security import Guard, GuardMiddleware
from dt_trio._dashboard._server import serve_app
from dt_trio._health import Health
from dt_trio._metrics._collector import HubView, hub_registry


class Probes:
    """The three endpoints of one hub."""

    def __init__(self, hub: HubView) -> None:
        self.registry: CollectorRegistry = hub_registry(hub)
        self.health: Health = hub.signals.health

    def routes(self) -> list[Route]:
        return [
            Route("/metrics", self.metrics),
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
        ]

    async def metrics(self, request: Request) -> Response:
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(self.registry), headers={"content-type": content_type})

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(self, request: Request) -> Response:
        problem = self.health.readiness.problem
        if problem is None:
            return PlainTextResponse("ready\n")
        return PlainTextResponse(f"not ready: {problem}\n", status_code=503)


async def serve_probes(
    probes: Probes,
    sock: socket.socket,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics, /healthz and /readyz alone on `sock` (see `listen_dashboard`; closed
    when this ends) until cancelled. Reports the server's URL through `task_status`."""
    guard = Guard(
        token=None,
        read_only=True,
        loopback=is_loopback(sock.getsockname()[0]),
        tls=ssl_context is not None,
    )
    app = GuardMiddleware(Starlette(routes=probes.routes()), guard)
    await serve_app(app, sock, "metrics", ssl_context=ssl_context, task_status=task_status)
