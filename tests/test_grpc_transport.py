"""Our gRPC layer over purerpc (dt_trio._grpc._transport), driven by a real grpcio client."""

from __future__ import annotations

import functools
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import trio
from durabletask.internal import orchestrator_service_pb2 as spb
from durabletask.internal import orchestrator_service_pb2_grpc as sgrpc
from google.protobuf import empty_pb2

from dt_trio._errors import InstanceNotFound
from dt_trio._grpc._status import status_for
from dt_trio._grpc._transport import immediate, serve_grpc
from dt_trio._proto import orchestrator_service_grpc as stubs
from dt_trio._proto import orchestrator_service_pb2 as pb


class Probe(stubs.TaskHubSidecarServiceServicer):  # type: ignore[misc]
    """A servicer that records what happens to its handlers."""

    def __init__(self) -> None:
        self.stream_started = trio.Event()
        self.stream_cancelled = trio.Event()
        self.slow_cancelled = trio.Event()
        self.ran_in: list[str] = []

    async def Hello(self, request: empty_pb2.Empty) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    async def GetInstance(self, request: pb.GetInstanceRequest) -> pb.GetInstanceResponse:
        if request.instanceId == "boom":
            raise ValueError("secret detail that must not leak")
        if request.instanceId == "mapped":
            raise InstanceNotFound("mapped")
        if request.instanceId == "slow":
            try:
                await trio.sleep_forever()
            finally:
                self.slow_cancelled.set()
        response = pb.GetInstanceResponse(exists=True)
        response.orchestrationState.instanceId = request.instanceId
        response.orchestrationState.input.value = "x" * len(request.instanceId)
        return response

    # Immediate handlers (answered in the connection's own task, without a task per call).
    # Each records the task it ran in.

    @immediate
    async def CompleteActivityTask(self, request: pb.ActivityResponse) -> pb.CompleteTaskResponse:
        self.ran_in.append(trio.lowlevel.current_task().name)
        if request.completionToken == "boom":
            raise ValueError("secret detail that must not leak")
        if request.completionToken == "mapped":
            raise InstanceNotFound("mapped")
        return pb.CompleteTaskResponse()

    @immediate
    async def QueryInstances(self, request: pb.QueryInstancesRequest) -> pb.QueryInstancesResponse:
        self.ran_in.append(trio.lowlevel.current_task().name)
        response = pb.QueryInstancesResponse()
        for n in range(request.query.maxInstanceCount):
            response.orchestrationState.add(instanceId=f"{n:06d}").input.value = "x" * 1000
        return response

    @immediate
    async def AbandonTaskActivityWorkItem(
        self, request: pb.AbandonActivityTaskRequest
    ) -> pb.AbandonActivityTaskResponse:
        await trio.lowlevel.checkpoint()  # breaks the promise of `immediate`
        return pb.AbandonActivityTaskResponse()

    async def GetWorkItems(self, request: pb.GetWorkItemsRequest) -> AsyncIterator[pb.WorkItem]:
        try:
            yield pb.WorkItem(healthPing=pb.HealthPing(), completionToken="t1")
            self.stream_started.set()
            await trio.sleep_forever()
        finally:
            self.stream_cancelled.set()


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[tuple[Probe, int, trio.CancelScope]]:
    probe = Probe()
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve_grpc(
                [probe],
                host="127.0.0.1",
                port=0,
                status_for=status_for,
                max_message_bytes=1024,
                task_status=task_status,
            )

    _, port = await nursery.start(run)
    yield probe, port, scope
    scope.cancel()


async def call(port: int, fn: Callable[[sgrpc.TaskHubSidecarServiceStub], Any], **opts: Any) -> Any:
    def blocking() -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{port}", **opts) as channel:
            return fn(sgrpc.TaskHubSidecarServiceStub(channel))

    return await trio.to_thread.run_sync(blocking)


async def rpc_error(
    port: int, fn: Callable[[sgrpc.TaskHubSidecarServiceStub], Any]
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        await call(port, fn)
    return info.value


async def test_unary_round_trip(server: tuple[Probe, int, trio.CancelScope]) -> None:
    _, port, _ = server
    response = await call(port, lambda s: s.GetInstance(spb.GetInstanceRequest(instanceId="abc")))
    assert response.exists and response.orchestrationState.instanceId == "abc"
    assert response.orchestrationState.input.value == "xxx"


async def test_binds_only_the_given_host(server: tuple[Probe, int, trio.CancelScope]) -> None:
    _, port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", port), timeout=2):
        pass


async def test_unknown_method_is_unimplemented_with_its_name(
    server: tuple[Probe, int, trio.CancelScope],
) -> None:
    _, port, _ = server

    def unknown() -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return channel.unary_unary("/TaskHubSidecarService/NoSuchRpc")(b"")

    with pytest.raises(grpc.RpcError) as info:
        await trio.to_thread.run_sync(unknown)
    error = info.value
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/TaskHubSidecarService/NoSuchRpc" in error.details()


# An ordinary Probe handler and one marked immediate, called with an argument that names what
# they raise ("boom", "mapped"; anything else succeeds).
FAILING = {
    "ordinary": lambda s, key: s.GetInstance(spb.GetInstanceRequest(instanceId=key)),
    "immediate": lambda s, key: s.CompleteActivityTask(spb.ActivityResponse(completionToken=key)),
}


@pytest.mark.parametrize("handler", FAILING)
async def test_handler_exception_is_internal_without_traceback_and_server_serves_on(
    server: tuple[Probe, int, trio.CancelScope], handler: str
) -> None:
    _, port, _ = server
    error = await rpc_error(port, lambda s: FAILING[handler](s, "boom"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "ValueError" in error.details()
    assert "secret" not in error.details() and "Traceback" not in error.details()
    assert (await call(port, lambda s: s.Hello(empty_pb2.Empty()))) == empty_pb2.Empty()


@pytest.mark.parametrize("handler", FAILING)
async def test_dt_trio_errors_are_mapped_to_their_status(
    server: tuple[Probe, int, trio.CancelScope], handler: str
) -> None:
    _, port, _ = server
    error = await rpc_error(port, lambda s: FAILING[handler](s, "mapped"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'mapped'" in error.details()


async def test_an_immediate_method_is_answered_in_the_connections_own_task(
    server: tuple[Probe, int, trio.CancelScope],
) -> None:
    probe, port, _ = server
    response = await call(
        port, lambda s: s.CompleteActivityTask(spb.ActivityResponse(completionToken="t"))
    )
    assert response == spb.CompleteTaskResponse()
    [task] = probe.ran_in
    # not a task of the call's own (`_serve_stream`), as an ordinary method runs in
    assert "_serve_stream" not in task and "_Connection" not in task, task


async def test_an_immediate_handler_that_suspends_is_internal_and_the_server_serves_on(
    server: tuple[Probe, int, trio.CancelScope],
) -> None:
    _, port, _ = server
    error = await rpc_error(
        port, lambda s: s.AbandonTaskActivityWorkItem(spb.AbandonActivityTaskRequest())
    )
    assert error.code() == grpc.StatusCode.INTERNAL
    assert (await call(port, lambda s: s.Hello(empty_pb2.Empty()))) == empty_pb2.Empty()


async def test_an_immediate_answer_larger_than_the_flow_control_window_arrives_whole(
    server: tuple[Probe, int, trio.CancelScope],
) -> None:
    """The answer does not fit the client's window (64 KiB): the rest goes out from a task as
    the client reads, and the connection serves on."""
    _, port, _ = server
    request = spb.QueryInstancesRequest()
    request.query.maxInstanceCount = 1000  # about 1 MB

    def twice(s: Any) -> Any:
        return s.QueryInstances(request), s.QueryInstances(request)

    # (without BDP probing, grpcio keeps the window HTTP/2 starts with)
    for response in await call(port, twice, options=[("grpc.http2.bdp_probe", 0)]):
        assert len(response.orchestrationState) == 1000
        assert response.orchestrationState[999].instanceId == "000999"
        assert response.orchestrationState[999].input.value == "x" * 1000


async def test_deadline_cancels_the_handler_and_answers_deadline_exceeded(
    server: tuple[Probe, int, trio.CancelScope],
) -> None:
    probe, port, _ = server
    error = await rpc_error(
        port, lambda s: s.GetInstance(spb.GetInstanceRequest(instanceId="slow"), timeout=0.2)
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with trio.fail_after(5):
        await probe.slow_cancelled.wait()


async def test_a_stream_past_its_deadline_ends_with_trailers_and_the_channel_serves_on(
    server: tuple[Probe, int, trio.CancelScope],
) -> None:
    # Its response headers went out with the first message, so the status must follow as
    # trailers: a second header block would leave the client's HPACK table out of step, and
    # the next call on the connection would fail to parse.
    _, port = server[0], server[1]

    def streams_then_hello(stub: sgrpc.TaskHubSidecarServiceStub) -> list[Any]:
        codes: list[Any] = []
        for _ in range(5):
            received = []
            try:
                for item in stub.GetWorkItems(spb.GetWorkItemsRequest(), timeout=0.3):
                    received.append(item.completionToken)
            except grpc.RpcError as exc:
                codes.append((received, exc.code()))
        stub.Hello(empty_pb2.Empty(), timeout=5)
        return codes

    codes = await call(port, streams_then_hello)
    assert codes == [(["t1"], grpc.StatusCode.DEADLINE_EXCEEDED)] * 5


async def test_client_cancel_of_a_server_stream_cancels_the_handler(
    server: tuple[Probe, int, trio.CancelScope],
) -> None:
    probe, port, _ = server

    def open_then_cancel(stub: sgrpc.TaskHubSidecarServiceStub) -> str:
        stream = stub.GetWorkItems(spb.GetWorkItemsRequest())
        first = next(stream)
        stream.cancel()
        return str(first.completionToken)

    assert await call(port, open_then_cancel) == "t1"
    with trio.fail_after(5):
        await probe.stream_cancelled.wait()


async def test_a_killed_client_process_cancels_its_stream(
    server: tuple[Probe, int, trio.CancelScope],
) -> None:
    probe, port, _ = server
    client = (
        "import grpc, sys\n"
        "from durabletask.internal import orchestrator_service_pb2 as p, "
        "orchestrator_service_pb2_grpc as g\n"
        f"ch = grpc.insecure_channel('127.0.0.1:{port}')\n"
        "s = g.TaskHubSidecarServiceStub(ch).GetWorkItems(p.GetWorkItemsRequest())\n"
        "next(s); print('ready', flush=True); sys.stdin.read()\n"
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", client], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        with trio.fail_after(15):
            await probe.stream_started.wait()
        assert not probe.stream_cancelled.is_set()
        proc.kill()
        with trio.fail_after(5):
            await probe.stream_cancelled.wait()
    finally:
        proc.kill()
        await proc.wait()


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
async def test_compressed_requests_are_decompressed(
    server: tuple[Probe, int, trio.CancelScope], compression: grpc.Compression
) -> None:
    _, port, _ = server
    response = await call(
        port,
        lambda s: s.GetInstance(
            spb.GetInstanceRequest(instanceId="zipped" * 20), compression=compression
        ),
    )
    assert response.orchestrationState.instanceId == "zipped" * 20


@pytest.mark.parametrize("handler", FAILING)
async def test_an_oversized_message_is_resource_exhausted_and_the_connection_survives(
    server: tuple[Probe, int, trio.CancelScope], handler: str
) -> None:
    _, port, _ = server

    def big_then_small(stub: sgrpc.TaskHubSidecarServiceStub) -> tuple[grpc.StatusCode, Any]:
        try:
            FAILING[handler](stub, "y" * 5000)
        except grpc.RpcError as exc:
            code = exc.code()
        return code, stub.Hello(empty_pb2.Empty())

    code, hello = await call(port, big_then_small)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert hello == empty_pb2.Empty()


async def test_stopping_the_server_closes_the_listener_and_the_streams(
    server: tuple[Probe, int, trio.CancelScope],
) -> None:
    probe, port, scope = server
    reader = functools.partial(
        call, port, lambda s: [w.completionToken for w in s.GetWorkItems(spb.GetWorkItemsRequest())]
    )
    async with trio.open_nursery() as nursery:
        outcome: list[BaseException] = []

        async def read() -> None:
            try:
                await reader()
            except grpc.RpcError as exc:
                outcome.append(exc)

        nursery.start_soon(read)
        with trio.fail_after(10):
            await probe.stream_started.wait()
        scope.cancel()
        with trio.fail_after(10):
            await probe.stream_cancelled.wait()
    assert outcome and outcome[0].code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
