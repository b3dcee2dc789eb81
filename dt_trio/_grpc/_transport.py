"""Our gRPC server: HTTP/2 (`_http2`) on trio, dispatching to purerpc `Service` definitions.

purerpc 0.8.0 gives us the service definitions that protoc generates (`Servicer.service`:
method names, cardinality, message types), but its `Server` is not fit to run a sidecar:

(a) it never cancels a handler when the client resets the stream or the connection drops, so an
    idle server stream runs forever. Here every stream runs in its own cancel scope, cancelled on
    RST_STREAM; every connection runs in its own nursery, cancelled on EOF, reset or GOAWAY.
(b) it never closes sockets or the listener. Here each connection's socket is closed when its
    task ends, and the listeners when `serve_grpc` ends (trio.serve_listeners owns them).
(c) it binds every interface with SO_REUSEPORT. Here we bind exactly `host` (SO_REUSEADDR only).
(d) it answers an unexpected exception with CANCELLED and a traceback. Here a handler's exception
    becomes the status `status_for` gives it, else INTERNAL with a short message; the traceback
    goes to the log, and the connection serves on.
(e) a gzip request kills its connection. Here gzip and deflate requests are decompressed; an
    unknown encoding is answered UNIMPLEMENTED on that stream alone.

It also honours `grpc-timeout` (DEADLINE_EXCEEDED) and bounds request messages
(RESOURCE_EXHAUSTED). Only what the Durable Task protocol uses is served: unary and
server-streaming rpcs. A unary handler marked `immediate` (one that never waits: a worker's
completion, say) is run in the turn that read its request, its answer queued there; every other
call runs in a task of its own.
"""

from __future__ import annotations

import gzip
import hmac
import logging
import ssl
import struct
import urllib.parse
import zlib
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from google.protobuf.message import DecodeError
from purerpc.grpclib.status import StatusCode
from purerpc.rpc import Cardinality

from dt_trio._grpc import _http2 as http2

log = logging.getLogger(__name__)
H = TypeVar("H", bound=Callable[..., Any])

StatusFor = Callable[[BaseException], "tuple[StatusCode, str] | None"]

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
TLS_HANDSHAKE_SECONDS = 10.0
# What a cancelled connection had queued (a server stopping: a health watcher's last status) is
# written within this long, if it can be.
LAST_WRITE_SECONDS = 0.5
_READ_SIZE = 65536
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "identity": lambda data: data,
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,
}


_RESPONSE_HEADERS = [
    (":status", "200"),
    ("content-type", "application/grpc"),
    ("grpc-accept-encoding", "identity,gzip,deflate"),
]
_RESPONSE_BLOCK = http2.encode_headers(_RESPONSE_HEADERS)
_MESSAGE_PREFIX = struct.Struct(">?I")


class RpcError(Exception):
    """Raised inside the transport to answer a stream with a status."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def immediate(handler: H) -> H:
    """Mark a unary rpc handler that never suspends (it awaits nothing that waits): its
    connection runs it to its end in the turn of the event loop that read its request, and
    queues the answer there, instead of starting a task for the call and answering in a later
    turn. One that suspends all the same is a bug: its call fails with INTERNAL."""
    handler._dt_trio_immediate = True  # type: ignore[attr-defined]
    return handler


def _run_to_end(coro: Coroutine[Any, Any, Any]) -> Any:
    """What an immediate handler's coroutine returns, run without the event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("an rpc handler marked immediate suspended")


@dataclass
class RequestInfo:
    """What a handler may learn about its call (passed as `request=` to 2-argument methods)."""

    service_name: str
    method_name: str
    timeout: float | None
    custom_metadata: list[tuple[str, str]]


@dataclass
class _Stream:
    stream_id: int
    headers: dict[str, str]
    buffer: bytearray = field(default_factory=bytearray)
    ended: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reset: bool = False
    too_large: bool = False
    # Its method is immediate: answered as its request ends, by the read loop (no task).
    inline: bool = False
    # Response headers went out: the status must follow as trailers, never as a second header
    # block with pseudo-headers.
    headers_sent: bool = False


def _status_message(message: str) -> str:
    # grpc-message is percent-encoded (gRPC over HTTP/2 spec)
    return urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS server context for gRPC: TLS 1.2 or later, HTTP/2 by ALPN."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["h2"])
    return context


def _parse_timeout(value: str) -> float:
    try:
        amount, unit = int(value[:-1]), value[-1]
        return amount * _TIMEOUT_UNITS[unit]
    except (ValueError, KeyError, IndexError) as exc:
        raise RpcError(StatusCode.INVALID_ARGUMENT, f"malformed grpc-timeout {value!r}") from exc


class _Connection:
    """One HTTP/2 connection: reads frames, runs one task per stream, writes responses."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        methods: dict[str, Any],
        immediate: frozenset[str],
        status_for: StatusFor,
        max_message_bytes: int,
        token: str | None,
        open_paths: frozenset[str] = frozenset(),
    ) -> None:
        self._transport = transport
        self._expected_authorization = f"Bearer {token}".encode() if token else None
        self._open_paths = open_paths  # methods of servicers that need no token
        self._methods = methods
        self._immediate = immediate  # the paths of immediate unary methods
        self._status_for = status_for
        self._max_message_bytes = max_message_bytes
        self._http = http2.ServerConnection()
        self._streams: dict[int, _Stream] = {}
        self._window_changed = trio.Event()
        # Writes: the bytes the HTTP/2 layer queues go out through one writer task (see `_flush`).
        self._write_wanted = trio.Event()
        self._write_done = trio.Event()
        self._requested = 0
        self._written = 0
        # Frames taken from the HTTP/2 layer are written whole, shielded (see `_send`); once
        # the connection is cancelled, for LAST_WRITE_SECONDS at most.
        self._sending = False
        self._send_scope: trio.CancelScope | None = None
        self._last_write_by: float | None = None

    async def run(self) -> None:
        self._http.initiate()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                try:
                    await self._flush()
                    await self._read_loop(nursery)
                finally:
                    # The peer is gone or misbehaved: nothing it started may outlive it.
                    nursery.cancel_scope.cancel()
                    self._last_write_by = trio.current_time() + LAST_WRITE_SECONDS
                    if self._send_scope is not None:
                        self._send_scope.deadline = self._last_write_by
        finally:
            # What was queued after the writer's last send (a server stopping: a health
            # watcher's last status), unless that send was cut.
            if not self._sending and self._http.has_data_to_send():
                await self._send(self._http.data_to_send())

    async def _send(self, data: bytes) -> bool:
        """Write frames taken from the HTTP/2 layer whole (cut, they would garble the
        connection): shielded, so that a cancelled connection still gets them, but for
        LAST_WRITE_SECONDS at most once it is. False if the peer is gone or the send was cut."""
        self._sending = True
        scope = self._send_scope = trio.CancelScope(shield=True)
        if self._last_write_by is not None:
            scope.deadline = self._last_write_by
        with scope:
            try:
                await self._transport.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        self._send_scope = None
        if scope.cancelled_caught:
            return False  # cut: nothing more may be written
        self._sending = False
        return True

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                data = await self._transport.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                events = self._http.receive(data)
            except http2.ProtocolError as exc:
                log.info("closing a connection after an HTTP/2 protocol error: %s", exc)
                await self._flush(wait=True)  # the GOAWAY, before the connection closes
                return
            for event in events:
                if not self._on_event(event, nursery):
                    await self._flush(wait=True)
                    return
            await self._flush()

    def _on_event(self, event: http2.Event, nursery: trio.Nursery) -> bool:
        if isinstance(event, http2.Data):
            found = self._streams.get(event.stream_id)
            if found is not None and not found.ended.is_set():
                if len(found.buffer) + len(event.data) > self._max_message_bytes + 5:
                    found.too_large = True  # stop buffering; the handler answers the status
                    found.ended.set()
                else:
                    found.buffer += event.data
                    if event.end_stream:
                        found.ended.set()
                if found.inline and found.ended.is_set():
                    self._answer_inline(found, nursery)
        elif isinstance(event, http2.Request):
            stream = _Stream(event.stream_id, event.headers)
            self._streams[event.stream_id] = stream
            if event.end_stream:
                stream.ended.set()
            if event.headers.get(":path") in self._immediate:
                stream.inline = True
                if event.end_stream:
                    self._answer_inline(stream, nursery)
            else:
                nursery.start_soon(self._serve_stream, stream)
        elif isinstance(event, http2.WindowOpened):
            self._wake_senders()
        elif isinstance(event, http2.Reset):
            found = self._streams.pop(event.stream_id, None)
            if found is not None:
                found.reset = True
                found.scope.cancel()
                found.ended.set()
            self._wake_senders()
        elif isinstance(event, http2.GoAway):
            return False
        return True

    def _wake_senders(self) -> None:
        self._window_changed.set()
        self._window_changed = trio.Event()

    async def _flush(self, wait: bool = False) -> None:
        """Have everything the HTTP/2 layer has queued so far written; with `wait`, until it is.

        Only the writer task touches the socket. Once bytes are queued (frames of several
        streams, a frame split across sends) they must reach the peer whole, so a
        stream whose deadline or reset cancels it mid-write must not own the write: cancelling
        this wait is harmless, the writer carries on. Not waiting lets the frames of every
        stream that answers in the same turn of the event loop go out in one send; HTTP/2 flow
        control windows bound what can pile up.
        """
        if self._http.has_data_to_send():
            # (Most reads queue nothing, window updates going out by the half window: then
            # the writer is not woken for nothing.)
            self._requested += 1
            self._write_wanted.set()
        wanted = self._requested
        while wait and self._written < wanted:
            await self._write_done.wait()

    async def _writer(self) -> None:
        while True:
            await self._write_wanted.wait()
            self._write_wanted = trio.Event()
            batch = self._requested
            data = self._http.data_to_send()
            if data and not await self._send(data):
                # The read loop sees the end of the connection and cleans up; flushes from
                # now on return at once.
                self._written = 1 << 62
                self._write_done.set()
                return
            self._written = batch
            self._write_done.set()
            self._write_done = trio.Event()

    # -- one stream --------------------------------------------------------------------------

    async def _serve_stream(self, stream: _Stream) -> None:
        path = stream.headers.get(":path", "")
        code, message = StatusCode.OK, ""
        try:
            with stream.scope:
                try:
                    await self._call(stream, path)
                except Exception as exc:  # a handler's error: answer it, keep serving
                    code, message = self._status_of(exc, path)
            if stream.reset:
                return
            await self._finish(stream, code, message)
        finally:
            self._streams.pop(stream.stream_id, None)

    def _answer_inline(self, stream: _Stream, nursery: trio.Nursery) -> None:
        """Answer a whole request for an immediate method now, in the read loop's turn (see
        `immediate`); the read loop's flush sends the answer with whatever else it read."""
        path = stream.headers[":path"]
        try:
            method, decode, info = self._prepare(stream.headers, path)
            request = self._parse(
                path, method.signature.request_type, self._one_message(stream, decode)
            )
            response = _run_to_end(method.method_fn(request, request=info))
        except Exception as exc:
            self._streams.pop(stream.stream_id, None)
            self._queue_trailers(stream, *self._status_of(exc, path))
            return
        rest = self._queue_message(stream, response)
        if rest:
            # No room in the flow-control windows for all of it yet: a task sends the rest
            # as they open (the stream stays registered, so a reset reaches it).
            nursery.start_soon(self._send_rest_and_finish, stream, rest)
            return
        self._streams.pop(stream.stream_id, None)
        self._queue_trailers(stream, StatusCode.OK, "")

    async def _send_rest_and_finish(self, stream: _Stream, rest: memoryview) -> None:
        try:
            with stream.scope:
                await self._send_rest(stream, rest)
            if not stream.reset:
                await self._finish(stream, StatusCode.OK, "")
        finally:
            self._streams.pop(stream.stream_id, None)

    def _status_of(self, exc: Exception, path: str) -> tuple[StatusCode, str]:
        """The status that answers a call whose handler raised `exc`."""
        if isinstance(exc, RpcError):
            return exc.code, exc.message
        mapped = self._status_for(exc)
        if mapped is None:
            log.error("unexpected error in %s", path, exc_info=exc)
            return StatusCode.INTERNAL, f"internal error in {path}: {type(exc).__name__}"
        return mapped

    async def _call(self, stream: _Stream, path: str) -> None:
        """Run the handler, sending its responses."""
        method, decode, info = self._prepare(stream.headers, path)
        if info.timeout is None:  # no cancel scope of its own: most calls come without a deadline
            await self._run_method(stream, path, method, decode, info)
            return
        with trio.move_on_after(info.timeout):
            await self._run_method(stream, path, method, decode, info)
            return
        raise RpcError(StatusCode.DEADLINE_EXCEEDED, f"{path}: deadline exceeded")

    def _prepare(
        self, headers: dict[str, str], path: str
    ) -> tuple[Any, Callable[[bytes], bytes], RequestInfo]:
        """The call's method, request decoder and `RequestInfo`; RpcError if it cannot run."""
        if self._expected_authorization is not None and path not in self._open_paths:
            given = headers.get("authorization", "").encode()
            # compare_digest: the time taken does not tell how much of the token matched
            if not hmac.compare_digest(given, self._expected_authorization):
                raise RpcError(
                    StatusCode.UNAUTHENTICATED,
                    "this sidecar needs the metadata 'authorization: Bearer <token>'",
                )
        method = self._methods.get(path)
        if method is None:
            raise RpcError(StatusCode.UNIMPLEMENTED, f"method {path} is not implemented")
        if not headers.get("content-type", "").startswith("application/grpc"):
            raise RpcError(StatusCode.INTERNAL, "content-type must be application/grpc")
        encoding = headers.get("grpc-encoding", "identity")
        decode = _DECODERS.get(encoding)
        if decode is None:
            raise RpcError(
                StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {encoding!r} is not supported (use identity, gzip or deflate)",
            )
        timeout = _parse_timeout(headers["grpc-timeout"]) if "grpc-timeout" in headers else None
        signature = method.signature
        if signature.cardinality not in (Cardinality.UNARY_UNARY, Cardinality.UNARY_STREAM):
            raise RpcError(StatusCode.UNIMPLEMENTED, f"{path}: client streaming is not served")
        service_name, _, method_name = path.lstrip("/").partition("/")
        info = RequestInfo(
            service_name,
            method_name,
            timeout,
            [(k, v) for k, v in headers.items() if not k.startswith(":")],
        )
        return method, decode, info

    async def _run_method(
        self,
        stream: _Stream,
        path: str,
        method: Any,
        decode: Callable[[bytes], bytes],
        info: RequestInfo,
    ) -> None:
        signature = method.signature
        if not stream.ended.is_set():  # a unary request usually came whole: no extra turn
            await stream.ended.wait()
        request = self._parse(path, signature.request_type, self._one_message(stream, decode))
        if signature.cardinality == Cardinality.UNARY_UNARY:
            response = await method.method_fn(request, request=info)
            await self._send_message(stream, response, flush=False)
            return
        async for response in method.method_fn(request, request=info):
            await self._send_message(stream, response)

    @staticmethod
    def _parse(path: str, request_type: Any, data: bytes) -> Any:
        try:
            return request_type.FromString(data)
        except DecodeError as exc:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"{path}: the request is not a valid {request_type.DESCRIPTOR.name} ({exc})",
            ) from None

    def _one_message(self, stream: _Stream, decode: Callable[[bytes], bytes]) -> bytes:
        if stream.too_large:
            raise RpcError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"request message exceeds the limit of {self._max_message_bytes} bytes",
            )
        data = bytes(stream.buffer)
        if len(data) < 5:
            raise RpcError(StatusCode.INTERNAL, "the request carries no message")
        compressed, length = struct.unpack(">?I", data[:5])
        if length > self._max_message_bytes:
            raise RpcError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"request message of {length} bytes exceeds the limit of "
                f"{self._max_message_bytes} bytes",
            )
        if len(data) != 5 + length:
            raise RpcError(StatusCode.UNIMPLEMENTED, "exactly one request message is expected")
        payload = data[5:]
        if compressed:
            try:
                payload = decode(payload)
            except (OSError, zlib.error, EOFError) as exc:
                raise RpcError(
                    StatusCode.INTERNAL, f"cannot decompress the request: {exc}"
                ) from exc
            if len(payload) > self._max_message_bytes:
                raise RpcError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    "decompressed request message exceeds the limit of "
                    f"{self._max_message_bytes} bytes",
                )
        return payload

    async def _send_message(self, stream: _Stream, message: Any, *, flush: bool = True) -> None:
        """Queue a response message; `flush=False` leaves it to go out with the trailers (one
        write per unary response instead of two)."""
        if stream.reset:
            await trio.lowlevel.checkpoint()  # the stream's scope is cancelled: raise here
        await self._send_rest(stream, self._queue_message(stream, message))
        if flush:
            await self._flush()

    def _queue_message(self, stream: _Stream, message: Any) -> memoryview:
        """Queue as much of a response message as the flow-control windows take; returns the
        rest."""
        if not stream.headers_sent:
            stream.headers_sent = True
            self._http.send_headers(stream.stream_id, _RESPONSE_BLOCK)
        body = message.SerializeToString()
        data = memoryview(_MESSAGE_PREFIX.pack(False, len(body)) + body)
        return data[self._http.send_data(stream.stream_id, data) :]

    async def _send_rest(self, stream: _Stream, data: memoryview) -> None:
        """Queue the rest of a message as the peer opens the flow-control windows."""
        while data:
            await self._flush()  # what is queued goes out; the peer opens windows as it reads
            if stream.reset:
                await trio.lowlevel.checkpoint()  # the stream's scope is cancelled: raise here
            taken = self._http.send_data(stream.stream_id, data)
            if not taken:
                await self._window_changed.wait()
            data = data[taken:]

    def _queue_trailers(self, stream: _Stream, code: StatusCode, message: str) -> None:
        trailers = [("grpc-status", str(code.value))]
        if message:
            trailers.append(("grpc-message", _status_message(message)))
        if not stream.headers_sent:  # trailers-only response
            trailers = [*_RESPONSE_HEADERS[:2], *trailers]
        self._http.send_headers(stream.stream_id, http2.encode_headers(trailers), end_stream=True)

    async def _finish(self, stream: _Stream, code: StatusCode, message: str) -> None:
        self._queue_trailers(stream, code, message)
        await self._flush()


async def serve_grpc(
    servicers: Sequence[Any],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    status_for: StatusFor = lambda exc: None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ssl_context: ssl.SSLContext | None = None,
    token: str | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the purerpc `servicers` on exactly `host`:`port` until cancelled.

    With `ssl_context` every connection is TLS (HTTP/2 negotiated by ALPN); with `token` every
    call must carry the metadata `authorization: Bearer <token>` (else UNAUTHENTICATED), except
    calls of a servicer whose `needs_token` is False (health checks: probes send no metadata).

    Reports `(host, bound_port)` once listening. Cancellation closes the listeners, cancels
    every handler and closes every connection.
    """
    methods: dict[str, Any] = {}
    immediate: set[str] = set()
    open_paths: set[str] = set()
    for servicer in servicers:
        service = servicer.service
        for name, method in service.methods.items():
            path = f"/{service.name}/{name}"
            methods[path] = method
            if not getattr(servicer, "needs_token", True):
                open_paths.add(path)
            # (purerpc wraps the handler: the mark is on the servicer's own method)
            if method.signature.cardinality == Cardinality.UNARY_UNARY and getattr(
                getattr(servicer, name, None), "_dt_trio_immediate", False
            ):
                immediate.add(path)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    if port == 0:
        # With port 0 each address family would get its own random port; serve one.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    bound_port = listeners[0].socket.getsockname()[1]

    async def handle(transport: trio.SocketStream) -> None:
        stream: trio.abc.Stream = transport
        async with transport:
            try:
                if ssl_context is not None:
                    stream = trio.SSLStream(transport, ssl_context, server_side=True)
                    with trio.move_on_after(TLS_HANDSHAKE_SECONDS):
                        await stream.do_handshake()
                    if stream.selected_alpn_protocol() != "h2":  # also a timed-out handshake
                        return
                connection = _Connection(
                    stream,
                    methods,
                    frozenset(immediate),
                    status_for,
                    max_message_bytes,
                    token,
                    frozenset(open_paths),
                )
                await connection.run()
            except trio.BrokenResourceError:
                pass  # e.g. a client that does not speak TLS
            except Exception:
                # One broken connection must not take the server down with it.
                log.exception("a gRPC connection failed; closing it")

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started((host, bound_port))
