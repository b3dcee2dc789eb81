"""Our gRPC server: HTTP/2 (`_http2`) on trio, dispatching to purerpc `Service` definitions.

purerpc 0.8.0 gives us the service definitions that protoc generates (`Servicer.service`:
method names, cardinality, message types), but its `Server` is not fit to run a sidecar:

(a) it never cancels a handler when the client resets the stream or the connection drops, so an
    idle server stream runs forever. Here every stream runs in its own cancel scope, cancelled on
    RST_STREAM; every connection runs in its own nursery, cancelled on EOF, reset or GOAWAY.
(b) it never closes sockets or the listener. Here each connection's socket is closed when its
    task ends, and the listeners when `serve_grpc` ends.
(c) it binds every interface with SO_REUSEPORT. Here we bind exactly `host` (SO_REUSEADDR only).
(d) it answers an unexpected exception with CANCELLED and a traceback. Here a handler's exception
    becomes the status `status_for` gives it, else INTERNAL with a short message; the traceback
    goes to the log, and the connection serves on.
(e) a gzip request kills its connection. Here gzip and deflate requests are decompressed; an
    unknown encoding is answered UNIMPLEMENTED on that stream alone.

(f) it holds whatever a peer sends or leaves open. Here a connection that has not begun HTTP/2
    (and TLS) within the handshake timeout is closed, and one without a call for the idle
    timeout gets GOAWAY; at most `max_connections` are served at once, those beyond are
    refused with GOAWAY; the request bytes buffered across all connections are bounded
    (RESOURCE_EXHAUSTED beyond); and when accept fails for want of descriptors or memory, the
    server says so once, backs off and serves on.

It also honours `grpc-timeout` (DEADLINE_EXCEEDED) and bounds request messages
(RESOURCE_EXHAUSTED). Only what the Durable Task protocol uses is served: unary and
server-streaming rpcs. A unary handler marked `immediate` (one that never waits: a worker's
completion, say) is run in the turn that read its request, its answer queued there; every other
call runs in a task of its own.
"""

from __future__ import annotations

import errno
import gzip
import hmac
import math
import os
import resource
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
from dt_trio._log import get_logger
from dt_trio._turns import at_turn_end

log = get_logger(__name__)
H = TypeVar("H", bound=Callable[..., Any])

StatusFor = Callable[[BaseException], "tuple[StatusCode, str] | None"]

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024  # (or 4 x max_message_bytes, if more)
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 300.0
# What a cancelled connection had queued (a server stopping: a health watcher's last status) is
# written within this long, if it can be.
LAST_WRITE_SECONDS = 0.5
# After our GOAWAY, how long the peer has to read it and close its side.
_CLOSE_GRACE = 1.0
# accept(2) failing for want of descriptors or memory: retried after this many seconds,
# doubled up to the second number while it goes on.
_ACCEPT_RETRY = (0.05, 1.0)
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# What a call holds while its request is unfinished, besides the request's bytes (its task and
# state), counted against the bound on buffered request bytes: calls whose request never
# comes cannot pile up without end either.
UNFINISHED_REQUEST_COST = 4096


def min_buffered_bytes(max_message_bytes: int) -> int:
    """The least bound on buffered request bytes that holds one request of the largest size."""
    return max_message_bytes + 5 + UNFINISHED_REQUEST_COST


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
    # Its request could not be buffered (too large, or over the server's budget): the status
    # it is answered with.
    refusal: RpcError | None = None
    held: int = 0  # charged to the budget: the request's bytes, and the cost of waiting for them
    # Its method is immediate: answered as its request ends, by the read loop (no task).
    inline: bool = False
    # Response headers went out: the status must follow as trailers, never as a second header
    # block with pseudo-headers.
    headers_sent: bool = False


def _status_message(message: str) -> str:
    # grpc-message is percent-encoded (gRPC over HTTP/2 spec)
    return urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # (without a password callback OpenSSL would prompt for one on the terminal)
    raise _EncryptedKey


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS server context for gRPC: TLS 1.2 or later, HTTP/2 by ALPN.

    ValueError, naming the file and what is wrong with it, if the files cannot serve."""
    for what, path in (("certificate chain", cert_file), ("private key", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except _EncryptedKey:
        raise ValueError(
            f"the private key {key_file} is encrypted: give it without a passphrase "
            f"(openssl pkey -in {key_file} -out KEY)"
        ) from None
    except ssl.SSLError as exc:
        raise ValueError(_tls_files_problem(cert_file, key_file, exc)) from None
    context.set_alpn_protocols(["h2"])
    return context


def _tls_files_problem(cert_file: str, key_file: str, exc: ssl.SSLError) -> str:
    """What is wrong with a certificate chain and key that OpenSSL refused as `exc`."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_file)
    except ssl.SSLError:
        return (
            f"{cert_file} is not a PEM certificate chain "
            "(it should hold -----BEGIN CERTIFICATE----- blocks)"
        )
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"the private key {key_file} does not match the certificate {cert_file}"
    return (
        f"{key_file} is not a PEM private key "
        "(it should hold a -----BEGIN ...PRIVATE KEY----- block)"
    )


def _parse_timeout(value: str) -> float:
    try:
        amount, unit = int(value[:-1]), value[-1]
        return amount * _TIMEOUT_UNITS[unit]
    except (ValueError, KeyError, IndexError) as exc:
        raise RpcError(StatusCode.INVALID_ARGUMENT, f"malformed grpc-timeout {value!r}") from exc


class _Budget:
    """The request bytes buffered across all connections of a server, against its limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


@dataclass
class _Server:
    """What every connection of one server shares: its methods, its limits, its budget."""

    methods: dict[str, Any]
    immediate: frozenset[str]  # the paths of immediate unary methods
    status_for: StatusFor
    max_message_bytes: int
    budget: _Budget
    token: str | None
    idle_timeout: float
    open_paths: frozenset[str] = frozenset()  # methods of servicers that need no token


class _Connection:
    """One HTTP/2 connection: reads frames, runs one task per stream, writes responses."""

    def __init__(
        self, transport: trio.abc.Stream, server: _Server, handshake_deadline: float
    ) -> None:
        self._transport = transport
        self._token = server.token.encode() if server.token else None
        self._open_paths = server.open_paths
        self._methods = server.methods
        self._immediate = server.immediate
        self._status_for = server.status_for
        self._max_message_bytes = server.max_message_bytes
        self._budget = server.budget
        self._idle_timeout = server.idle_timeout
        self._http = http2.ServerConnection()
        self._streams: dict[int, _Stream] = {}
        # The read loop's deadline: the handshake's until the client's preface and SETTINGS
        # are in, then none while a call is open and the idle timeout's while none is.
        self._timer = trio.CancelScope(deadline=handshake_deadline)
        self._handshaking = True
        self._window_changed = trio.Event()
        # Writes: the bytes the HTTP/2 layer queues go out at once if the socket takes them,
        # else through one writer task (see `_flush`).
        self._socket = transport.socket if isinstance(transport, trio.SocketStream) else None
        self._unsent = b""  # the part of the last write the socket did not take (the writer's)
        self._turn_write = False  # `_write_turn` is due at the end of this turn
        self._put_off = False  # ... of the next turn: it was put off once
        self._closed = False  # run() is over: the socket may be closed, its number reused
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
                    with self._timer:
                        await self._read_loop(nursery)
                    if self._timer.cancelled_caught:
                        await self._timed_out()
                finally:
                    # The peer is gone or misbehaved: nothing it started may outlive it.
                    nursery.cancel_scope.cancel()
                    for stream in list(self._streams.values()):
                        self._forget(stream)
                    self._last_write_by = trio.current_time() + LAST_WRITE_SECONDS
                    if self._send_scope is not None:
                        self._send_scope.deadline = self._last_write_by
        finally:
            # What was queued after the writer's last send (a server stopping: a health
            # watcher's last status), unless that send was cut.
            try:
                if not self._sending and (self._unsent or self._http.has_data_to_send()):
                    await self._send(self._take_unsent())
            finally:
                self._closed = True

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

    async def _timed_out(self) -> None:
        if self._handshaking:
            log.debug("closing a connection that did not begin HTTP/2 in time")
            return
        log.debug("closing a connection idle for %s s", self._idle_timeout)
        self._http.go_away(http2.ErrorCode.NO_ERROR, "idle")
        # Gracefully: the peer reads the GOAWAY before it sees the connection close.
        with trio.move_on_after(_CLOSE_GRACE):
            try:
                await self._flush(wait=True)
                if isinstance(self._transport, trio.abc.HalfCloseableStream):
                    await self._transport.send_eof()
                while await self._transport.receive_some(_READ_SIZE):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _forget(self, stream: _Stream) -> None:
        """The stream is done with: its buffered request bytes go back to the budget; the
        last one to go starts the idle timer."""
        self._release(stream)
        if self._streams.pop(stream.stream_id, None) is not None and not self._streams:
            self._timer.deadline = trio.current_time() + self._idle_timeout

    def _release(self, stream: _Stream) -> None:
        if stream.held:
            self._budget.give(stream.held)
            stream.held = 0
            stream.buffer = bytearray()

    def _over_budget(self) -> RpcError:
        return RpcError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"the server holds as many request bytes as it may ({self._budget.limit} across "
            "all calls in progress, --max-buffered-bytes): retry once some are answered",
        )

    def _refuse(self, stream: _Stream, refusal: RpcError) -> None:
        """Buffer no more of the stream's request: its handler answers `refusal`."""
        stream.refusal = refusal
        self._release(stream)
        stream.ended.set()

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
                if self._handshaking and self._http.handshake_done:
                    self._handshaking = False
                    self._timer.deadline = trio.current_time() + self._idle_timeout
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
                size = len(event.data)
                if len(found.buffer) + size > self._max_message_bytes + 5:
                    self._refuse(
                        found,
                        RpcError(
                            StatusCode.RESOURCE_EXHAUSTED,
                            f"request message exceeds the limit of {self._max_message_bytes} bytes",
                        ),
                    )
                elif not self._budget.take(size):
                    self._refuse(found, self._over_budget())
                else:
                    found.held += size
                    found.buffer += event.data
                    if event.end_stream:
                        found.ended.set()
                if found.inline and found.ended.is_set():
                    self._answer_inline(found, nursery)
        elif isinstance(event, http2.Request):
            stream = _Stream(event.stream_id, event.headers)
            if not self._streams:  # the idle timer runs: stop it
                self._timer.deadline = math.inf
            self._streams[event.stream_id] = stream
            if event.end_stream:
                stream.ended.set()
            elif self._budget.take(UNFINISHED_REQUEST_COST):
                stream.held = UNFINISHED_REQUEST_COST
            else:
                self._refuse(stream, self._over_budget())
            if event.headers.get(":path") in self._immediate:
                stream.inline = True
                if stream.ended.is_set():
                    self._answer_inline(stream, nursery)
            else:
                nursery.start_soon(self._serve_stream, stream)
        elif isinstance(event, http2.WindowOpened):
            self._wake_senders()
        elif isinstance(event, http2.Reset):
            found = self._streams.get(event.stream_id)
            if found is not None:
                found.reset = True
                found.scope.cancel()
                found.ended.set()
                self._forget(found)
            self._wake_senders()
        elif isinstance(event, http2.GoAway):
            return False
        return True

    def _wake_senders(self) -> None:
        self._window_changed.set()
        self._window_changed = trio.Event()

    async def _flush(self, wait: bool = False) -> None:
        """Have everything the HTTP/2 layer has queued so far written; with `wait`, until it is.

        Once bytes are queued (frames of several streams, a frame split across sends) they
        must reach the peer whole, so a stream whose deadline or reset cancels it mid-write
        must not own the write. What the streams queue is written as a turn of the event loop
        ends (`_write_turn`), at once if the socket takes it all: one send for them all,
        nothing waits, nothing can be cut. What it does not take goes to the writer task, the
        only one that waits on the socket (and the one that writes a TLS connection's bytes);
        while it is at work, what is queued is left to it, to go out with its next send, in
        order. Cancelling this wait is harmless, the writing carries on. HTTP/2 flow control
        windows bound what can pile up.
        """
        if self._http.has_data_to_send():
            # (Most reads queue nothing, window updates going out by the half window: then
            # nothing is written for nothing.)
            self._requested += 1
            if self._socket is None or self._sending or self._write_wanted.is_set():
                self._write_wanted.set()
            elif not self._turn_write:
                self._turn_write = True
                at_turn_end(self._write_turn)
        wanted = self._requested
        while wait and self._written < wanted:
            await self._write_done.wait()

    def _write_turn(self) -> None:
        """As the turn ends: write what the streams queued, without waiting. While the event
        loop has more to run, once put off to the end of the next turn, so that what two
        turns queue goes out in one send (as the writer task, woken in one turn and run in
        the next, sent it). What the socket does not take (all of it, if the connection is
        broken) goes to the writer task, which finds out which it is."""
        if self._closed or not self._http.has_data_to_send():
            self._turn_write = self._put_off = False
            return
        if not self._put_off and trio.lowlevel.current_statistics().tasks_runnable:
            self._put_off = True
            at_turn_end(self._write_turn)
            return
        self._turn_write = self._put_off = False
        if self._sending:  # the last write of a connection that ends (see `run`)
            self._write_wanted.set()
            return
        assert self._socket is not None
        data = self._http.data_to_send()
        try:
            sent = os.write(self._socket.fileno(), data)
        except OSError:
            sent = 0
        if sent < len(data):
            self._unsent = data[sent:]
            self._write_wanted.set()
            return
        self._written = self._requested
        self._write_done.set()
        self._write_done = trio.Event()

    def _take_unsent(self) -> bytes:
        """What is to be written next: what the socket did not take, then what is queued."""
        data = self._unsent + self._http.data_to_send()
        self._unsent = b""
        return data

    async def _writer(self) -> None:
        while True:
            await self._write_wanted.wait()
            self._write_wanted = trio.Event()
            batch = self._requested
            data = self._take_unsent()
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
            self._forget(stream)

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
            self._forget(stream)
            self._queue_trailers(stream, *self._status_of(exc, path))
            return
        rest = self._queue_message(stream, response)
        if rest:
            # No room in the flow-control windows for all of it yet: a task sends the rest
            # as they open (the stream stays registered, so a reset reaches it).
            nursery.start_soon(self._send_rest_and_finish, stream, rest)
            return
        self._forget(stream)
        self._queue_trailers(stream, StatusCode.OK, "")

    async def _send_rest_and_finish(self, stream: _Stream, rest: memoryview) -> None:
        try:
            with stream.scope:
                await self._send_rest(stream, rest)
            if not stream.reset:
                await self._finish(stream, StatusCode.OK, "")
        finally:
            self._forget(stream)

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
        if self._token is not None and path not in self._open_paths:
            # The scheme is case-insensitive (RFC 6750 2.1, RFC 9110 11.1).
            scheme, _, given = headers.get("authorization", "").partition(" ")
            # compare_digest: the time taken does not tell how much of the token matched
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.lstrip(" ").encode(), self._token
            ):
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
            [(k, v) for k, v in headers.items() if not k.startswith(":") and k != "authorization"],
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
        if stream.refusal is not None:
            raise stream.refusal
        data = bytes(stream.buffer)
        self._release(stream)
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


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listening sockets on exactly `host`:`port` (one, on a port of its own, for port 0), for
    `serve_grpc`. OSError naming the address if it cannot be bound."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    if port == 0:
        # With port 0 each address family would get its own random port; serve one.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    return listeners


def bound_port(listeners: Sequence[trio.SocketListener]) -> int:
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def serve_grpc(
    servicers: Sequence[Any],
    listeners: Sequence[trio.SocketListener],
    *,
    status_for: StatusFor = lambda exc: None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_buffered_bytes: int | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    token: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the purerpc `servicers` on `listeners` (see `open_listeners`) until cancelled.

    With `ssl_context` every connection is TLS (HTTP/2 negotiated by ALPN); with `token` every
    call must carry the metadata `authorization: Bearer <token>` (else UNAUTHENTICATED), except
    calls of a servicer whose `needs_token` is False (health checks: probes send no metadata).
    The limits: a request message of at most `max_message_bytes`; at most `max_buffered_bytes`
    (default 64 MiB, or 4 x `max_message_bytes` if more; ValueError if it cannot hold one
    request of that size) of requests held across all connections, a call still waiting for
    its request counting UNFINISHED_REQUEST_COST; at most
    `max_connections` connections; `handshake_timeout` seconds from accepting a connection
    to its HTTP/2 preface (TLS included), `idle_timeout` seconds for a connection without
    calls.

    Reports once accepting. Cancellation closes the listeners, cancels every handler and
    closes every connection.
    """
    if max_buffered_bytes is None:
        budget = max(DEFAULT_MAX_BUFFERED_BYTES, 4 * max_message_bytes)
    elif max_buffered_bytes < min_buffered_bytes(max_message_bytes):
        raise ValueError(
            f"max_buffered_bytes must be at least {min_buffered_bytes(max_message_bytes)} "
            f"(one request of max_message_bytes and its call), not {max_buffered_bytes}"
        )
    else:
        budget = max_buffered_bytes
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
    server = _Server(
        methods,
        frozenset(immediate),
        status_for,
        max_message_bytes,
        _Budget(budget),
        token,
        idle_timeout,
        frozenset(open_paths),
    )
    acceptor = _Acceptor(server, ssl_context, max_connections, handshake_timeout)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(acceptor.accept, listener, nursery)
            task_status.started()
    finally:
        for listener in listeners:
            listener.socket.close()


class _Acceptor:
    """Accepts connections and serves each in a task of its own, within the limits."""

    def __init__(
        self,
        server: _Server,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        handshake_timeout: float,
    ) -> None:
        self._server = server
        self._ssl_context = ssl_context
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout
        self._open = 0
        self._refused = 0  # since the limit was reached (0: not at the limit)
        self._failed = 0  # accepts failed in a row for want of resources

    async def accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        try:
            while True:
                try:
                    transport = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _CAPACITY_ERRNOS:
                        raise
                    await self._back_off(exc)
                    continue
                if self._failed:
                    log.warning("accepting connections again (%d attempts failed)", self._failed)
                    self._failed = 0
                if self._open >= self._max_connections:
                    await self._refuse(transport)
                else:
                    self._open += 1
                    nursery.start_soon(self._serve, transport)
        finally:
            # A server stopping refuses new connections at once, not once the connections it
            # has are through with their last writes.
            listener.socket.close()

    async def _back_off(self, exc: OSError) -> None:
        """Wait for descriptors or memory to free up; said once, not at every attempt."""
        if not self._failed:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.error(
                "cannot accept connections: %s (%s; %d connections open, open-file limit %d); "
                "new clients wait until it clears: raise the limit (ulimit -n) or lower "
                "--max-connections",
                os.strerror(exc.errno or 0),
                errno.errorcode.get(exc.errno or 0, "?"),
                self._open,
                soft,
            )
        self._failed += 1
        first, most = _ACCEPT_RETRY
        await trio.sleep(min(most, first * 2 ** min(self._failed - 1, 10)))

    async def _refuse(self, transport: trio.SocketStream) -> None:
        """Close a connection beyond the limit at once; a plaintext one hears why (GOAWAY)."""
        if not self._refused:
            log.warning(
                "%d connections are open, the limit (--max-connections): new ones are "
                "refused until some close",
                self._open,
            )
        self._refused += 1
        if self._ssl_context is None:
            goodbye = http2.ServerConnection()
            goodbye.initiate()
            goodbye.go_away(
                http2.ErrorCode.ENHANCE_YOUR_CALM,
                f"too many connections: this server serves at most {self._max_connections}",
            )
            with trio.move_on_after(_CLOSE_GRACE):
                try:
                    await transport.send_all(goodbye.data_to_send())
                    await transport.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        await trio.aclose_forcefully(transport)

    async def _serve(self, transport: trio.SocketStream) -> None:
        deadline = trio.current_time() + self._handshake_timeout
        try:
            stream: trio.abc.Stream = transport
            async with transport:
                try:
                    if self._ssl_context is not None:
                        stream = trio.SSLStream(transport, self._ssl_context, server_side=True)
                        with trio.CancelScope(deadline=deadline) as handshake:
                            await stream.do_handshake()
                        if handshake.cancelled_caught or stream.selected_alpn_protocol() != "h2":
                            return
                    await _Connection(stream, self._server, deadline).run()
                except trio.BrokenResourceError:
                    pass  # e.g. a client that does not speak TLS
                except Exception:
                    # One broken connection must not take the server down with it.
                    log.exception("a gRPC connection failed; closing it")
        finally:
            self._open -= 1
            if self._refused and self._open < self._max_connections:
                log.info("accepting connections again (%d refused at the limit)", self._refused)
                self._refused = 0
