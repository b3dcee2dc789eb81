"""One session with a sidecar: a purerpc connection under trio, its rpcs with the caller's
token, and every failure as a SidecarError (a gRPC status name and a message)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
import anyio.abc
import trio
from google.protobuf.message import Message
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.exceptions import GRPCError, RpcFailedError

from dt_trio._ops._args import Target
from dt_trio._proto import orchestrator_service_grpc as grpc_stubs

T = TypeVar("T")


class SidecarError(Exception):
    """The sidecar answered with an error status, or could not be reached (UNAVAILABLE)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Sidecar:
    """The rpcs of TaskHubSidecarService on one connection, with the target's metadata."""

    def __init__(self, channel: _Channel, target: Target) -> None:
        self._stub = grpc_stubs.TaskHubSidecarServiceStub(channel)
        self._metadata = target.metadata

    async def call(self, rpc: str, request: Message) -> Any:
        """A unary rpc's response; SidecarError for an error status."""
        with _status_as_error():
            return await getattr(self._stub, rpc)(request, metadata=self._metadata)

    async def collect(self, rpc: str, request: Message) -> list[Any]:
        """Every message of a server-streaming rpc; SidecarError for an error status."""
        with _status_as_error():
            return [m async for m in getattr(self._stub, rpc)(request, metadata=self._metadata)]


@contextlib.contextmanager
def _status_as_error() -> Iterator[None]:
    try:
        yield
    except RpcFailedError as exc:
        raise SidecarError(exc.status.status_code.name, exc.status.status_message) from None


def run(target: Target, work: Callable[[Sidecar], Awaitable[T]]) -> T:
    """Connect to the sidecar, run `work` with it under trio, and disconnect."""
    return trio.run(_session, target, work)


async def _session(target: Target, work: Callable[[Sidecar], Awaitable[T]]) -> T:
    lost = False

    def closed_by_peer() -> None:
        nonlocal lost
        lost = True
        scope.cancel()

    try:
        with trio.CancelScope() as scope:
            async with _connect(target, closed_by_peer) as channel:
                return await work(Sidecar(channel, target))
    except BaseException as exc:  # sorted out by _known; anything unknown is raised as it is
        if lost:
            raise _closed(target) from None
        error = _known(exc, target)
        if error is None:
            raise
        raise error from None
    raise _closed(target)  # the scope absorbed its own cancellation: the peer closed the stream


def _closed(target: Target) -> SidecarError:
    return SidecarError(
        "UNAVAILABLE",
        f"the connection to {target.address} was closed by the other side "
        "(the sidecar stopped, or it expects TLS: try --tls)",
    )


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _known(exc: BaseException, target: Target) -> BaseException | None:
    """The failure to report for `exc` (maybe a group from purerpc's task groups), or None
    when it holds nothing we expect (a bug: let its traceback show)."""
    leaves = list(_leaves(exc))
    for leaf in leaves:
        if isinstance(leaf, SidecarError | KeyboardInterrupt):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, RpcFailedError):
            return SidecarError(leaf.status.status_code.name, leaf.status.status_message)
        if isinstance(leaf, OSError | GRPCError | anyio.BrokenResourceError | anyio.EndOfStream):
            reason = str(leaf) or str(leaf.__cause__ or "") or type(leaf).__name__
            return SidecarError("UNAVAILABLE", f"cannot talk to {target.address}: {reason}")
    return None


class _Channel:
    """What purerpc's Client needs of a channel (purerpc 0.8's own, built over our stream)."""

    def __init__(self, grpc_socket: Any, host: str, port: int) -> None:
        self._grpc_socket = grpc_socket
        self._host = host
        self._port = port


class _WatchedStream:
    """A connection's byte stream that reports the peer closing it: purerpc 0.8 ignores that and
    leaves every call on the connection waiting for ever."""

    def __init__(self, stream: anyio.abc.ByteStream, closed_by_peer: Callable[[], None]) -> None:
        self._stream = stream
        self._closed_by_peer = closed_by_peer

    def extra(self, attribute: Any, *default: Any) -> Any:
        return self._stream.extra(attribute, *default)

    async def send(self, data: bytes) -> None:
        try:
            await self._stream.send(data)
        except anyio.BrokenResourceError:
            self._closed_by_peer()
            raise

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            return await self._stream.receive(max_bytes)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            self._closed_by_peer()
            raise


@contextlib.asynccontextmanager
async def _connect(target: Target, closed_by_peer: Callable[[], None]) -> AsyncIterator[_Channel]:
    stream: anyio.abc.ByteStream
    if target.ssl_context is None:
        stream = await anyio.connect_tcp(target.host, target.port)
    else:  # as purerpc's channel: no wait for the peer's close_notify on closing
        stream = await anyio.connect_tcp(
            target.host, target.port, ssl_context=target.ssl_context, tls_standard_compatible=False
        )
    async with stream:
        config = GRPCConfiguration(client_side=True)
        async with GRPCProtoSocket(config, _WatchedStream(stream, closed_by_peer)) as grpc_socket:
            yield _Channel(grpc_socket, target.host, target.port)
