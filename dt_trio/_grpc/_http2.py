"""The server side of HTTP/2 (RFC 9113), as much as gRPC uses, sans-IO.

Bytes in (`receive`), events out; calls that answer streams queue bytes (`data_to_send`). No
sockets and no event loop: `_transport` drives it, the tests feed it frames directly.

Why not the h2 library: profiles of the sidecar under load put h2's generic per-frame and
per-header machinery (stream state machines, header validation and normalisation, event objects)
at more than a quarter of the sidecar's CPU, more than the whole orchestration engine. A gRPC
server needs far less: requests are HEADERS (+ CONTINUATION), DATA and END_STREAM; responses are
three fixed header blocks and DATA frames. HPACK decoding, the one intricate part, stays with the
`hpack` library. Responses are encoded without touching HPACK's dynamic table (literal fields
"without indexing"), so there is no encoder state to keep in step with the peer.

What is enforced: the connection preface; frame sizes and the frame sequence rules (CONTINUATION,
stream-id order, stream 0); flow control in both directions (with WINDOW_UPDATE overflow
checks); SETTINGS validation; the concurrent-stream limit (REFUSED_STREAM). A connection error
queues GOAWAY with its code and raises `ProtocolError`; a stream error resets that stream alone.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

import hpack
import hpack.exceptions

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class FrameType(enum.IntEnum):
    """Frame types (RFC 9113 6); a peer's frame of another type is ignored."""

    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag(enum.IntEnum):
    """Bits of a frame's flags (RFC 9113 6): which apply depends on the frame type; ACK (of
    SETTINGS and PING) is END_STREAM's bit."""

    END_STREAM = 0x1
    ACK = 0x1
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


class ErrorCode(enum.IntEnum):
    """Error codes of RST_STREAM and GOAWAY (RFC 9113 7); a peer may send others."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(enum.IntEnum):
    """SETTINGS parameters (RFC 9113 6.5.2); a peer's unknown ones are ignored."""

    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


# The members the frame loop uses on every request, as module names too (as `re` exports its
# flags): a module name is found faster than an enum's member.
DATA, HEADERS = FrameType.DATA, FrameType.HEADERS
END_STREAM, END_HEADERS, PADDED = Flag.END_STREAM, Flag.END_HEADERS, Flag.PADDED

# At most this many distinct header blocks are remembered per connection, taking at most this
# many bytes (encoded and decoded; see `_decode`).
_DECODED_BLOCKS = 256
_DECODED_BYTES = 256 * 1024
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
MIN_FRAME_SIZE = 16384
MAX_FRAME_SIZE_LIMIT = 2**24 - 1

_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")


class ProtocolError(Exception):
    """A connection error: GOAWAY with `code` is queued; the connection must close."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Request:
    """A new stream's request headers (names lower-case, as HTTP/2 requires)."""

    stream_id: int
    headers: dict[str, str]
    end_stream: bool


@dataclass(slots=True)
class Data:
    """Request body bytes; `end_stream` once the client has sent everything (trailers from a
    client, which gRPC never sends, also end the stream: they arrive as empty Data)."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True)
class Reset:
    """The client reset the stream, or a stream error made us reset it (`code`: an ErrorCode,
    or another code the client sent)."""

    stream_id: int
    code: int


@dataclass(slots=True)
class WindowOpened:
    """Flow-control room grew (WINDOW_UPDATE, a SETTINGS change): blocked senders may go on."""


@dataclass(slots=True)
class GoAway:
    """The client is going away (`code`: an ErrorCode, or another code it sent)."""

    code: int


Event = Request | Data | Reset | WindowOpened | GoAway


@dataclass(slots=True)
class _Stream:
    send_window: int
    recv_window: int
    remote_closed: bool = False
    unacked: int = 0  # received bytes not yet given back by WINDOW_UPDATE


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        _U32.pack(len(payload) << 8 | kind)
        + bytes((flags,))
        + _U32.pack(stream_id & MAX_WINDOW)
        + payload
    )


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1: an integer with an N-bit prefix; `first` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_literal(name: str, value: str) -> bytes:
    """One header field as "literal without indexing, new name" (RFC 7541 6.2.2), no Huffman:
    decodable by any HPACK decoder whatever its dynamic table holds."""
    raw_name, raw_value = name.encode(), value.encode()
    return (
        b"\x00"
        + _hpack_int(len(raw_name), 7, 0)
        + raw_name
        + _hpack_int(len(raw_value), 7, 0)
        + raw_value
    )


# A dynamic table size update to 0 (RFC 7541 6.3): we keep no dynamic table.
_TABLE_SIZE_ZERO = _hpack_int(0, 5, 0x20)


def encode_headers(fields: list[tuple[str, str]]) -> bytes:
    out = []
    for name, value in fields:
        if name == ":status" and value == "200":
            out.append(b"\x88")  # static table entry 8
        else:
            out.append(encode_literal(name, value))
    return b"".join(out)


class ServerConnection:
    """One HTTP/2 connection, server side."""

    def __init__(
        self,
        *,
        max_concurrent_streams: int = 1000,
        stream_window: int = 1 << 20,
        connection_window: int = 16 << 20,
        max_frame_size: int = MIN_FRAME_SIZE,
        max_header_block: int = 1 << 16,
    ) -> None:
        # A peer's unfinished frame and header block are held until they are whole: the
        # defaults keep what one connection can hold small (grpc-core sends frames of 16 KiB
        # too; a header block larger than hpack's limit on a decoded header list, 64 KiB,
        # would fail to decode).
        self._out = bytearray()
        self._in = bytearray()
        self._preface_seen = False
        self._settings_seen = False
        self._decoder = hpack.Decoder()
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0
        self._max_streams = max_concurrent_streams
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._max_frame_size = max_frame_size
        self._max_header_block = max_header_block
        self._recv_window = DEFAULT_WINDOW
        self._unacked = 0
        # what the peer allows us
        self._send_window = DEFAULT_WINDOW
        self._peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame_size = MIN_FRAME_SIZE
        # a header block in progress: (stream id, end_stream, fragments)
        self._block: tuple[int, bool, bytearray] | None = None
        self.closed = False
        self._table_update = False
        self._decoded: dict[bytes, dict[str, str]] = {}  # see `_decode`
        self._decoded_bytes = 0
        self._handlers: dict[int, Callable[[int, int, bytes, list[Event]], None]] = {
            FrameType.DATA: self._on_data,
            FrameType.HEADERS: self._on_headers,
            FrameType.PRIORITY: self._on_priority,
            FrameType.RST_STREAM: self._on_rst_stream,
            FrameType.SETTINGS: self._on_settings,
            FrameType.PUSH_PROMISE: self._on_push_promise,
            FrameType.PING: self._on_ping,
            FrameType.GOAWAY: self._on_goaway,
            FrameType.WINDOW_UPDATE: self._on_window_update,
            FrameType.CONTINUATION: self._on_continuation,
        }

    # -- output --------------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue our SETTINGS and open the connection's receive window."""
        settings = b"".join(
            _SETTING.pack(k, v)
            for k, v in (
                (Setting.MAX_CONCURRENT_STREAMS, self._max_streams),
                (Setting.INITIAL_WINDOW_SIZE, self._stream_window),
                (Setting.MAX_FRAME_SIZE, self._max_frame_size),
                (Setting.MAX_HEADER_LIST_SIZE, self._decoder.max_header_list_size),
            )
        )
        self._out += _frame(FrameType.SETTINGS, 0, 0, settings)
        grow = self._connection_window - DEFAULT_WINDOW
        if grow > 0:
            self._out += _frame(FrameType.WINDOW_UPDATE, 0, 0, _U32.pack(grow))
            self._recv_window += grow

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def has_data_to_send(self) -> bool:
        return bool(self._out)

    @property
    def handshake_done(self) -> bool:
        """The client's connection preface and first SETTINGS have arrived."""
        return self._settings_seen

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def send_room(self, stream_id: int) -> int:
        """How many DATA bytes may go out on the stream now (0: wait for WindowOpened)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return max(0, min(self._send_window, stream.send_window))

    def send_headers(self, stream_id: int, block: bytes, end_stream: bool = False) -> None:
        """Queue an encoded header block (see `encode_headers`); with `end_stream` the stream
        is done on our side."""
        if stream_id not in self._streams:
            return
        if self._table_update:
            self._table_update = False
            block = _TABLE_SIZE_ZERO + block
        size = self.peer_max_frame_size
        first, rest = block[:size], block[size:]
        flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
        self._out += _frame(HEADERS, flags, stream_id, first)
        while rest:
            chunk, rest = rest[:size], rest[size:]
            self._out += _frame(
                FrameType.CONTINUATION, 0 if rest else END_HEADERS, stream_id, chunk
            )
        if end_stream:
            self._close_local(stream_id)

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of `data` as flow control and the frame size allow; returns how many
        bytes were taken."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        room = min(self._send_window, stream.send_window, len(data))
        taken = 0
        while taken < room:
            chunk = bytes(data[taken : min(room, taken + self.peer_max_frame_size)])
            self._out += _frame(DATA, 0, stream_id, chunk)
            taken += len(chunk)
        self._send_window -= taken
        stream.send_window -= taken
        return taken

    def reset(self, stream_id: int, code: ErrorCode) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._out += _frame(FrameType.RST_STREAM, 0, stream_id, _U32.pack(code))

    def _close_local(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id)
        if not stream.remote_closed:
            # We answered before the whole request arrived (too large, say): tell the client
            # to stop sending (RFC 9113 8.1).
            self._out += _frame(FrameType.RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.NO_ERROR))

    def go_away(self, code: ErrorCode, message: str) -> None:
        """Queue GOAWAY (`message` as its debug data): the connection takes no new stream and
        reads nothing more; streams up to the last one the peer opened were seen (those above
        it, the peer may retry elsewhere)."""
        if not self.closed:
            self.closed = True
            self._out += _frame(
                FrameType.GOAWAY,
                0,
                0,
                _U32.pack(self._last_stream_id) + _U32.pack(code) + message.encode(),
            )

    def _fail(self, code: ErrorCode, message: str) -> ProtocolError:
        self.go_away(code, message)
        return ProtocolError(code, message)

    # -- input ---------------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes from the peer; returns what happened. Raises ProtocolError (GOAWAY
        queued) when the peer broke the protocol."""
        if self.closed:
            return []
        self._in += data
        events: list[Event] = []
        if not self._preface_seen:
            if len(self._in) < len(PREFACE):
                if not PREFACE.startswith(bytes(self._in)):
                    raise self._fail(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return events
            if self._in[: len(PREFACE)] != PREFACE:
                raise self._fail(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            del self._in[: len(PREFACE)]
            self._preface_seen = True
        buf = self._in
        pos = 0
        try:
            while len(buf) - pos >= 9:
                head = _U32.unpack_from(buf, pos)[0]
                length, kind, flags = head >> 8, head & 0xFF, buf[pos + 4]
                stream_id = _U32.unpack_from(buf, pos + 5)[0] & MAX_WINDOW
                if length > self._max_frame_size:
                    raise self._fail(
                        ErrorCode.FRAME_SIZE_ERROR, f"a frame of {length} bytes is too large"
                    )
                if len(buf) - pos - 9 < length:
                    break
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self._frame(kind, flags, stream_id, payload, events)
        finally:
            del buf[:pos]
        self._give_back_window()
        return events

    def _frame(
        self, kind: int, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if not self._settings_seen and kind != FrameType.SETTINGS:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if self._block is not None and (
            kind != FrameType.CONTINUATION or stream_id != self._block[0]
        ):
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "a header block was interrupted")
        handler = self._handlers.get(kind)
        if handler is not None:  # other frame types are ignored (RFC 9113 5.5)
            handler(flags, stream_id, payload, events)

    def _on_continuation(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if self._block is None:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without a header block")
        self._block[2].extend(payload)
        if len(self._block[2]) > self._max_header_block:
            raise self._fail(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            block, self._block = self._block, None
            self._on_header_block(block[0], block[1], bytes(block[2]), events)

    def _on_ping(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "bad PING")
        if len(payload) != 8:
            raise self._fail(ErrorCode.FRAME_SIZE_ERROR, "bad PING")
        if not flags & Flag.ACK:
            self._out += _frame(FrameType.PING, Flag.ACK, 0, payload)

    def _on_rst_stream(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id == 0 or len(payload) != 4:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "bad RST_STREAM")
        if stream_id > self._last_stream_id:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        if self._streams.pop(stream_id, None) is not None:
            events.append(Reset(stream_id, _U32.unpack(payload)[0]))

    def _on_priority(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0 or len(payload) != 5:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "bad PRIORITY")

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0 or len(payload) < 8:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "bad GOAWAY")
        events.append(GoAway(_U32.unpack_from(payload, 4)[0]))

    def _on_push_promise(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        raise self._fail(ErrorCode.PROTOCOL_ERROR, "a client must not send PUSH_PROMISE")

    def _strip_padding(self, flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _on_data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # padding counts against flow control too
        self._recv_window -= size
        self._unacked += size
        if self._recv_window < 0:
            raise self._fail(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        data = self._strip_padding(flags, payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise self._fail(ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream already closed or reset on our side: dropped
        if stream.remote_closed:
            self.reset(stream_id, ErrorCode.STREAM_CLOSED)
            events.append(Reset(stream_id, ErrorCode.STREAM_CLOSED))
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            self.reset(stream_id, ErrorCode.FLOW_CONTROL_ERROR)
            events.append(Reset(stream_id, ErrorCode.FLOW_CONTROL_ERROR))
            return
        end = bool(flags & END_STREAM)
        if end:
            stream.remote_closed = True
        else:
            stream.unacked += size
            if stream.unacked >= self._stream_window // 2:
                self._out += _frame(
                    FrameType.WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.unacked)
                )
                stream.recv_window += stream.unacked
                stream.unacked = 0
        events.append(Data(stream_id, data, end))

    def _give_back_window(self) -> None:
        if self._unacked >= self._connection_window // 2:
            self._out += _frame(FrameType.WINDOW_UPDATE, 0, 0, _U32.pack(self._unacked))
            self._recv_window += self._unacked
            self._unacked = 0

    def _on_headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        fragment = self._strip_padding(flags, payload)
        if flags & Flag.PRIORITY:
            if len(fragment) < 5:
                raise self._fail(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            fragment = fragment[5:]
        end_stream = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self._on_header_block(stream_id, end_stream, fragment, events)
        else:
            self._block = (stream_id, end_stream, bytearray(fragment))

    def _on_header_block(
        self, stream_id: int, end_stream: bool, block: bytes, events: list[Event]
    ) -> None:
        # Decoded whatever becomes of the stream: HPACK state is shared by the connection.
        fields = self._decode(block)
        stream = self._streams.get(stream_id)
        if stream is not None:
            # trailers from the client: they must end the stream
            if stream.remote_closed or not end_stream:
                self.reset(stream_id, ErrorCode.PROTOCOL_ERROR)
                events.append(Reset(stream_id, ErrorCode.PROTOCOL_ERROR))
                return
            stream.remote_closed = True
            events.append(Data(stream_id, b"", True))
            return
        if stream_id <= self._last_stream_id:
            # New requests take ever higher ids (RFC 9113 5.1.1); a gRPC client sends no
            # trailers, so this is a reused or out-of-order id.
            raise self._fail(
                ErrorCode.PROTOCOL_ERROR, f"HEADERS on closed or out-of-order stream {stream_id}"
            )
        self._last_stream_id = stream_id
        headers = dict(fields)
        if not all(k in headers for k in (":method", ":path", ":scheme")):
            # malformed request (RFC 9113 8.1.1): a stream error
            self._out += _frame(
                FrameType.RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.PROTOCOL_ERROR)
            )
            return
        if len(self._streams) >= self._max_streams:
            self._out += _frame(
                FrameType.RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.REFUSED_STREAM)
            )
            return
        self._streams[stream_id] = _Stream(
            self._peer_initial_window, self._stream_window, remote_closed=end_stream
        )
        events.append(Request(stream_id, headers, end_stream))

    def _decode(self, block: bytes) -> dict[str, str]:
        """A header block's fields (the first value of a repeated name).

        A client repeats the same few blocks (after its first requests, every field is an
        index into the dynamic table), and decoding a block that adds nothing to the table
        has no effect on it: such blocks are decoded once and remembered, until a block
        changes the table (and so, perhaps, what the remembered ones mean). What is remembered
        is bounded in bytes too: a peer sending large blocks, each one different, gets them
        decoded every time instead of piling up."""
        known = self._decoded.get(block)
        if known is not None:
            return known
        table = self._decoder.header_table.dynamic_entries
        before = (len(table), table[0] if table else None)
        try:
            fields = self._decoder.decode(block)
        except (hpack.exceptions.HPACKError, UnicodeDecodeError, ValueError) as exc:
            raise self._fail(
                ErrorCode.COMPRESSION_ERROR, f"cannot decode a header block: {exc}"
            ) from exc
        headers: dict[str, str] = {}
        for name, value in fields:
            headers.setdefault(name, value)
        if len(table) != before[0] or (table[0] if table else None) is not before[1]:
            self._decoded.clear()
            self._decoded_bytes = 0
        elif len(self._decoded) < _DECODED_BLOCKS:
            size = len(block) + sum(len(name) + len(value) for name, value in headers.items())
            if self._decoded_bytes + size <= _DECODED_BYTES:
                self._decoded[bytes(block)] = headers
                self._decoded_bytes += size
        return headers

    def _on_settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & Flag.ACK:
            if payload:
                raise self._fail(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise self._fail(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        self._settings_seen = True
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == Setting.ENABLE_PUSH and value > 1:
                raise self._fail(ErrorCode.PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
            elif key == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise self._fail(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise self._fail(ErrorCode.FLOW_CONTROL_ERROR, "a stream window overflowed")
                events.append(WindowOpened())
            elif key == Setting.MAX_FRAME_SIZE:
                if not MIN_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
                    raise self._fail(
                        ErrorCode.PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value} out of range"
                    )
                self.peer_max_frame_size = value
            elif key == Setting.HEADER_TABLE_SIZE:
                # We never use the dynamic table when encoding, but a changed size must be
                # acknowledged at the start of our next header block (RFC 7541 4.2).
                self._table_update = True
        self._out += _frame(FrameType.SETTINGS, Flag.ACK, 0)

    def _on_window_update(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if len(payload) != 4:
            raise self._fail(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE must carry 4 bytes")
        increment = _U32.unpack(payload)[0] & MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise self._fail(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise self._fail(ErrorCode.FLOW_CONTROL_ERROR, "the connection window overflowed")
            events.append(WindowOpened())
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise self._fail(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return  # a closed stream: allowed, and meaningless (RFC 9113 6.9)
        if increment == 0 or stream.send_window + increment > MAX_WINDOW:
            code = ErrorCode.PROTOCOL_ERROR if increment == 0 else ErrorCode.FLOW_CONTROL_ERROR
            self.reset(stream_id, code)
            events.append(Reset(stream_id, code))
            return
        stream.send_window += increment
        events.append(WindowOpened())
