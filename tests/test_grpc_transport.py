"""Our gRPC layer over purerpc (dt_trio._grpc._transport), driven by a real grpcio client."""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import hpack
import pytest
import trio
import trio.testing
from _harness import Sidecar, wait_until
from durabletask.internal import orchestrator_service_pb2 as spb
from durabletask.internal import orchestrator_service_pb2_grpc as sgrpc
from google.protobuf import empty_pb2
from test_http2 import (
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_WINDOW,
    NO_ERROR,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    Frame,
    frame,
    parse,
    settings,
    u32,
    window_update,
)
from test_security import self_signed

from dt_trio._errors import InstanceNotFound
from dt_trio._grpc._status import status_for
from dt_trio._grpc._transport import (
    UNFINISHED_REQUEST_COST,
    bound_port,
    immediate,
    open_listeners,
    serve_grpc,
    server_ssl_context,
)
from dt_trio._proto import orchestrator_service_grpc as stubs
from dt_trio._proto import orchestrator_service_pb2 as pb

pytestmark = pytest.mark.store_independent


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

    async def StreamInstanceHistory(
        self, request: pb.StreamInstanceHistoryRequest
    ) -> AsyncIterator[pb.HistoryChunk]:
        # One chunk per name given (as the instance id, comma-separated), each in a turn of
        # the event loop of its own.
        for name in request.instanceId.split(","):
            chunk = pb.HistoryChunk()
            chunk.events.add().executionStarted.name = name
            yield chunk
            await trio.lowlevel.checkpoint()

    async def GetWorkItems(self, request: pb.GetWorkItemsRequest) -> AsyncIterator[pb.WorkItem]:
        try:
            yield pb.WorkItem(healthPing=pb.HealthPing(), completionToken="t1")
            self.stream_started.set()
            await trio.sleep_forever()
        finally:
            self.stream_cancelled.set()


async def start_server(
    nursery: trio.Nursery, send_buffer: int | None = None, **options: Any
) -> tuple[Probe, int, trio.CancelScope]:
    """A Probe served on a port of its own (request messages up to 1024 bytes unless
    `options` say otherwise; each connection's socket with a send buffer of `send_buffer`
    bytes if given), until the returned scope is cancelled."""
    probe = Probe()
    scope = trio.CancelScope()
    listeners = await open_listeners("127.0.0.1", 0)
    if send_buffer is not None:  # (accepted sockets inherit it)
        listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    options.setdefault("max_message_bytes", 1024)

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve_grpc(
                [probe], listeners, status_for=status_for, task_status=task_status, **options
            )

    await nursery.start(run)
    return probe, bound_port(listeners), scope


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[tuple[Probe, int, trio.CancelScope]]:
    probe, port, scope = await start_server(nursery)
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
            call: Any = channel.unary_unary("/TaskHubSidecarService/NoSuchRpc")
            return call(b"")

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


# -- what a peer may hold: connections, time, buffered bytes ---------------------------------


class RawPeer:
    """An HTTP/2 client written frame by frame (the helpers of test_http2), for what no real
    client does: stall, hold streams half sent, never begin."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.pending = b""
        self.seen: list[Frame] = []

    @classmethod
    async def connect(cls, port: int, *, begin: bool = True) -> RawPeer:
        peer = cls(await trio.open_tcp_stream("127.0.0.1", port))
        if begin:
            await peer.send(PREFACE + settings())
            await peer.next_frame(lambda f: f.kind == SETTINGS)  # the server serves it
        return peer

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(self, stream_id: int, path: str, body: bytes, *, end: bool) -> None:
        """HEADERS of a gRPC call, then its body (all of it or not) in DATA frames of 16 KiB
        (the largest the server takes)."""
        fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        chunks = [body[at : at + 16384] for at in range(0, len(body), 16384)] or [b""]
        await self.send(
            frame(HEADERS, END_HEADERS, stream_id, self.encoder.encode(fields))
            + b"".join(frame(DATA, 0, stream_id, chunk) for chunk in chunks[:-1])
            + frame(DATA, END_STREAM if end else 0, stream_id, chunks[-1])
        )

    async def next_frame(self, wanted: Callable[[Frame], bool]) -> Frame:
        """The next frame from the server that is `wanted`; AssertionError at EOF."""
        while True:
            while len(self.pending) >= 9:
                length = int.from_bytes(self.pending[:3], "big")
                if len(self.pending) < 9 + length:
                    break
                [got] = parse(self.pending[: 9 + length])
                self.pending = self.pending[9 + length :]
                self.seen.append(got)
                if wanted(got):
                    return got
            data = await self.stream.receive_some(65536)
            assert data, f"the server closed the connection; it sent {self.seen}"
            self.pending += data

    async def trailers(self, stream_id: int) -> dict[str, str]:
        got = await self.next_frame(lambda f: f.kind == HEADERS and f.stream_id == stream_id)
        return dict(self.decoder.decode(got.payload))

    async def answers(self, stream_ids: set[int]) -> dict[int, bytes]:
        """The bodies of the answers on `stream_ids` (each must end with status OK)."""
        bodies = dict.fromkeys(stream_ids, b"")
        ended: set[int] = set()
        while ended != stream_ids:
            got = await self.next_frame(lambda f: f.kind in (DATA, HEADERS))
            if got.kind == DATA:
                bodies[got.stream_id] += got.payload
                continue
            fields = dict(self.decoder.decode(got.payload))  # every block, in order (HPACK)
            if got.flags & END_STREAM:
                assert fields["grpc-status"] == "0", fields
                ended.add(got.stream_id)
        return bodies

    async def closed(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        rest = self.pending
        while data := await self.stream.receive_some(65536):
            rest += data
        return rest


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


GET_INSTANCE = "/TaskHubSidecarService/GetInstance"
QUERY_INSTANCES = "/TaskHubSidecarService/QueryInstances"
COMPLETE_ACTIVITY = "/TaskHubSidecarService/CompleteActivityTask"
STREAM_HISTORY = "/TaskHubSidecarService/StreamInstanceHistory"


async def test_answers_the_socket_takes_only_in_part_arrive_whole_and_the_connection_serves_on(
    nursery: trio.Nursery,
) -> None:
    """A 1 MB answer meets small socket buffers and a peer that reads late: the write at the
    turn's end leaves most of it to the writer task; an answer queued while the writer holds
    it follows it whole; then the connection writes at the turn's end again."""
    _, port, _ = await start_server(nursery, send_buffer=4096)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    peer = RawPeer(trio.SocketStream(sock))
    await peer.send(
        PREFACE + settings((INITIAL_WINDOW_SIZE, MAX_WINDOW)) + window_update(0, MAX_WINDOW // 2)
    )
    await peer.next_frame(lambda f: f.kind == SETTINGS)
    query = spb.QueryInstancesRequest()
    query.query.maxInstanceCount = 1000
    await peer.request(1, QUERY_INSTANCES, grpc_message(query.SerializeToString()), end=True)
    await trio.testing.wait_all_tasks_blocked()  # the server's writer waits for the peer
    complete = grpc_message(spb.ActivityResponse(completionToken="t1").SerializeToString())
    await peer.request(3, COMPLETE_ACTIVITY, complete, end=True)
    await trio.testing.wait_all_tasks_blocked()
    with trio.fail_after(10):
        answers = await peer.answers({1, 3})
        big = answers[1]
        assert big[0] == 0 and int.from_bytes(big[1:5], "big") == len(big) - 5
        response = spb.QueryInstancesResponse.FromString(big[5:])
        assert [s.instanceId for s in response.orchestrationState] == [
            f"{n:06d}" for n in range(1000)
        ]
        assert answers[3] == grpc_message(b"")  # an empty CompleteTaskResponse
        await peer.request(5, COMPLETE_ACTIVITY, complete, end=True)
        assert await peer.answers({5}) == {5: grpc_message(b"")}


async def test_while_the_event_loop_is_busy_what_two_turns_queue_goes_out_in_one_write(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write at a turn's end is put off by one turn while other tasks are ready: two
    messages of a stream, queued in two turns in a row, share one send."""
    _, port, _ = await start_server(nursery)
    peer = await RawPeer.connect(port)
    writes: list[bytes] = []
    write = os.write

    def counted(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return write(fd, data)

    monkeypatch.setattr(os, "write", counted)
    done = False

    async def busy() -> None:  # another task ready at every turn's end
        while not done:
            await trio.lowlevel.checkpoint()

    nursery.start_soon(busy)
    try:
        request = spb.StreamInstanceHistoryRequest(instanceId="first-chunk,second-chunk")
        await peer.request(1, STREAM_HISTORY, grpc_message(request.SerializeToString()), end=True)
        with trio.fail_after(10):
            body = (await peer.answers({1}))[1]
    finally:
        done = True
    assert b"first-chunk" in body and b"second-chunk" in body
    [both] = [data for data in writes if b"first-chunk" in data]
    assert b"second-chunk" in both


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_a_connection_that_never_begins_is_closed_after_the_handshake_timeout(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    tls_files: tuple[pathlib.Path, pathlib.Path],
    tls: bool,
) -> None:
    context = server_ssl_context(*map(str, tls_files)) if tls else None
    _, port, _ = await start_server(nursery, handshake_timeout=0.2, ssl_context=context)
    silent = await RawPeer.connect(port, begin=False)
    halfway = await RawPeer.connect(port, begin=False)
    await halfway.send(PREFACE[:10] if not tls else b"\x16\x03\x01\x00")  # a TLS record begun
    with trio.fail_after(5):
        for peer in (silent, halfway):
            sent = await peer.closed()
            # plaintext: our SETTINGS (and connection window), then nothing; TLS: nothing
            assert [f.kind for f in parse(sent)] == ([] if tls else [SETTINGS, WINDOW_UPDATE])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    if not tls:  # a client that begins in time is served as ever
        assert (await call(port, lambda s: s.Hello(empty_pb2.Empty()))) == empty_pb2.Empty()


async def test_an_idle_connection_gets_goaway_and_a_client_calls_on_through_a_new_one(
    nursery: trio.Nursery,
) -> None:
    _, port, _ = await start_server(nursery, idle_timeout=0.3)
    idle = await RawPeer.connect(port)
    with trio.fail_after(5):
        goaway = await idle.next_frame(lambda f: f.kind == GOAWAY)
        assert goaway.payload[4:8] == u32(NO_ERROR)
        await idle.closed()

    def hello_then_hello_after_an_idle_while(stub: sgrpc.TaskHubSidecarServiceStub) -> Any:
        stub.Hello(empty_pb2.Empty(), timeout=5)
        time.sleep(0.8)  # the server closes the idle connection meanwhile
        return stub.Hello(empty_pb2.Empty(), timeout=5)

    assert await call(port, hello_then_hello_after_an_idle_while) == empty_pb2.Empty()


async def test_a_connection_with_an_open_stream_is_never_idle(nursery: trio.Nursery) -> None:
    # An SDK worker's GetWorkItems stream is quiet but for health pings (every 30 s by
    # default): its connection must stay, however long the idle timeout has passed.
    probe, port, _ = await start_server(nursery, idle_timeout=0.2)
    received: list[str] = []
    done = threading.Event()

    def read_stream(stub: sgrpc.TaskHubSidecarServiceStub) -> None:
        stream = stub.GetWorkItems(spb.GetWorkItemsRequest())
        received.append(next(stream).completionToken)
        done.wait(10)
        stream.cancel()

    async with trio.open_nursery() as inner:
        inner.start_soon(call, port, read_stream)
        with trio.fail_after(10):
            await probe.stream_started.wait()
        await trio.sleep(1.0)  # five idle timeouts
        assert not probe.stream_cancelled.is_set()
        done.set()
    assert received == ["t1"]


async def test_connections_beyond_the_limit_are_refused_with_goaway_until_some_close(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dt_trio")
    _, port, _ = await start_server(nursery, max_connections=2)
    first, second = await RawPeer.connect(port), await RawPeer.connect(port)
    for _ in range(3):
        refused = await RawPeer.connect(port, begin=False)
        with trio.fail_after(5):
            frames = parse(await refused.closed())
        assert [f.kind for f in frames][-1] == GOAWAY
        assert frames[-1].payload[4:8] == u32(ENHANCE_YOUR_CALM)
        assert b"too many connections" in frames[-1].payload
    await first.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()  # the server has seen it go
    assert (await call(port, lambda s: s.Hello(empty_pb2.Empty()))) == empty_pb2.Empty()
    await second.stream.aclose()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("dt_trio")]
    assert [m for m in messages if "are refused" in m] == [
        "2 connections are open, the limit (--max-connections): new ones are refused until "
        "some close"
    ]
    assert "accepting connections again (3 refused at the limit)" in messages


async def test_request_bytes_held_across_connections_are_bounded(nursery: trio.Nursery) -> None:
    # Calls whose requests never finish: each holds what it sent, on whichever connection.
    _, port, _ = await start_server(nursery, max_message_bytes=100_000, max_buffered_bytes=150_000)
    unfinished = grpc_message(bytes(90_000))[:80_000]
    holder, pusher = await RawPeer.connect(port), await RawPeer.connect(port)
    await holder.request(1, GET_INSTANCE, unfinished, end=False)
    await trio.testing.wait_all_tasks_blocked()
    await pusher.request(1, GET_INSTANCE, unfinished, end=False)
    with trio.fail_after(5):
        refused = await pusher.trailers(1)
    assert refused["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    assert "150000" in urllib.parse.unquote(refused["grpc-message"])

    def get(size: int) -> Callable[[sgrpc.TaskHubSidecarServiceStub], Any]:
        return lambda s: s.GetInstance(spb.GetInstanceRequest(instanceId="i" * size))

    # within what is left, calls go through; beyond it, they get the status
    assert (await call(port, get(50_000))).orchestrationState.instanceId == "i" * 50_000
    error = await rpc_error(port, get(80_000))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request bytes" in error.details()
    # what an unfinished call held is given back when its connection goes
    await holder.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert (await call(port, get(80_000))).orchestrationState.instanceId == "i" * 80_000
    await pusher.stream.aclose()


class FewFiles(Sidecar):
    """The sidecar command with a limit of 32 open files (it uses 9 when idle)."""

    def command(self, port: int) -> list[str]:
        limited = (
            "import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))\n"
            "from dt_trio._cli import main\n"
            "raise SystemExit(main(sys.argv[1:]))\n"
        )
        return [sys.executable, "-c", limited, *super().command(port)[3:]]


def test_running_out_of_file_descriptors_is_said_once_and_serving_resumes(
    tmp_path: pathlib.Path,
) -> None:
    sidecar = FewFiles("", tmp_path / "log.txt").start()
    held: list[socket.socket] = []
    try:
        held += [socket.create_connection(("127.0.0.1", sidecar.port)) for _ in range(40)]
        wait_until(lambda: "cannot accept connections" in sidecar.log_text(), what="the line")
        with grpc.insecure_channel(sidecar.address) as channel:
            stub = sgrpc.TaskHubSidecarServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:  # waits among the unaccepted
                stub.Hello(empty_pb2.Empty(), timeout=1.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for held_socket in held:
                held_socket.close()
            assert stub.Hello(empty_pb2.Empty(), timeout=10) == empty_pb2.Empty()
    finally:
        for held_socket in held:
            held_socket.close()
        assert sidecar.stop() == 0
    log = sidecar.log_text()
    assert log.count("cannot accept connections: Too many open files (EMFILE;") == 1, log
    assert "open-file limit 32" in log
    assert "accepting connections again" in log
    assert "Traceback" not in log


def test_the_connection_limits_are_flags_of_the_command(tmp_path: pathlib.Path) -> None:
    sidecar = Sidecar(
        "",
        tmp_path / "log.txt",
        *("--handshake-timeout", "0.5", "--idle-timeout", "0.5", "--max-connections", "2"),
    ).start()
    try:
        silent = socket.create_connection(("127.0.0.1", sidecar.port), timeout=5)
        begun = socket.create_connection(("127.0.0.1", sidecar.port), timeout=5)
        begun.sendall(PREFACE + settings())

        def until_closed(sock: socket.socket) -> bytes:
            got = b""
            while data := sock.recv(4096):
                got += data
            sock.close()
            return got

        third = socket.create_connection(("127.0.0.1", sidecar.port), timeout=5)
        assert b"too many connections" in until_closed(third)
        # the server closes both others: one for its handshake, one for being idle
        kinds = [[f.kind for f in parse(until_closed(sock))] for sock in (silent, begun)]
        assert kinds[0] == [SETTINGS, WINDOW_UPDATE]
        assert kinds[1][-1] == GOAWAY
    finally:
        assert sidecar.stop() == 0
    for flags, problem in (
        (["--idle-timeout", "0"], "--idle-timeout must be a positive number of seconds, not 0.0"),
        (
            ["--max-message-bytes", "2048", "--max-buffered-bytes", "4096"],
            "--max-buffered-bytes must be at least 6149",
        ),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "dt_trio", *flags, "--db", ""],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 2
        assert problem in out.stderr, out.stderr


async def test_calls_waiting_for_their_request_count_against_the_same_bound(
    nursery: trio.Nursery,
) -> None:
    # A call whose request never comes holds a task and its state, though no bytes: each
    # counts as UNFINISHED_REQUEST_COST, so stalled calls cannot pile up without end either.
    limit = 10 * UNFINISHED_REQUEST_COST
    _, port, _ = await start_server(nursery, max_buffered_bytes=limit)
    stalling = await RawPeer.connect(port)
    for n in range(10):
        await stalling.request(2 * n + 1, GET_INSTANCE, b"", end=False)
    await stalling.request(21, GET_INSTANCE, b"", end=False)
    with trio.fail_after(5):
        refused = await stalling.trailers(21)
    assert refused["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    error = await rpc_error(port, lambda s: s.Hello(empty_pb2.Empty()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # what they held is given back when they go
    await stalling.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert (await call(port, lambda s: s.Hello(empty_pb2.Empty()))) == empty_pb2.Empty()
