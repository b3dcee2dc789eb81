"""grpc.health.v1.Health: the standard gRPC health checking protocol, from the hub's `Health`.

Kubernetes' gRPC probes and grpc_health_probe call Check; Watch streams each change of status.
The server as a whole ("") and TaskHubSidecarService are SERVING while the hub is ready (see
`dt_trio._health`), NOT_SERVING otherwise. Probes cannot send a token, so these calls need
none (they tell nothing but the status).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

from purerpc.grpclib.status import StatusCode

from dt_trio._grpc._transport import RpcError, immediate
from dt_trio._health import Health, Readiness
from dt_trio._proto import health_grpc
from dt_trio._proto import health_pb2 as pb

_Status = pb.HealthCheckResponse.ServingStatus


class HealthService(health_grpc.HealthServicer):  # type: ignore[misc]
    """Check and Watch for the server ("") and each of `services` (full service names)."""

    needs_token = False

    def __init__(self, health: Health, services: Iterable[str]) -> None:
        self._health = health
        self._services = frozenset({"", *services})

    def _status(self, service: str, readiness: Readiness) -> _Status:
        if service not in self._services:
            return pb.HealthCheckResponse.SERVICE_UNKNOWN
        if readiness.ready:
            return pb.HealthCheckResponse.SERVING
        return pb.HealthCheckResponse.NOT_SERVING

    @immediate
    async def Check(self, request: pb.HealthCheckRequest) -> pb.HealthCheckResponse:
        if request.service not in self._services:
            known = ", ".join(sorted(repr(s) for s in self._services))
            raise RpcError(
                StatusCode.NOT_FOUND,
                f"unknown service {request.service[:200]!r}; this server reports on {known}",
            )
        return pb.HealthCheckResponse(status=self._status(request.service, self._health.readiness))

    async def Watch(self, request: pb.HealthCheckRequest) -> AsyncIterator[pb.HealthCheckResponse]:
        """The status now, then each time it changes; an unknown service is SERVICE_UNKNOWN
        and the call stays open, as the protocol says. A server that stops ends the call
        (UNAVAILABLE) right after its NOT_SERVING: a client that had not read that message
        when the connection closed would lose it with a call cut off, not with a call ended."""
        sent = None
        async with contextlib.aclosing(self._health.watch()) as changes:
            async for readiness in changes:
                status = self._status(request.service, readiness)
                if status != sent:
                    sent = status
                    yield pb.HealthCheckResponse(status=status)
                if readiness.stopping:
                    raise RpcError(StatusCode.UNAVAILABLE, "the server is stopping")
