"""The sans-IO HTTP/2 server layer (dt_trio._grpc._http2), fed client frames built here.

The tests speak the wire format of RFC 9113 with their own constants and frame helpers, and
decode response header blocks with `hpack`, so a mistake in the module's own encoding cannot
hide behind a test that shares it.
"""

from __future__ import annotations

import struct
import tracemalloc
from dataclasses import dataclass

import hpack
import hpack.exceptions
import pytest

from dt_trio._grpc._http2 import (
    Data,
    Event,
    GoAway,
    ProtocolError,
    Request,
    Reset,
    ServerConnection,
    WindowOpened,
    encode_headers,
)

pytestmark = pytest.mark.store_independent

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9113 section 6 (frame types and flags), section 7 (error codes), section 6.5.2 (settings)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0x0, 0x1, 0x3, 0x5
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

MAX_WINDOW = 2**31 - 1

REQUEST = (
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/TaskHubSidecarService/Hello"),
    (":authority", "localhost:4001"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
)
OK_HEADERS = encode_headers([(":status", "200"), ("content-type", "application/grpc")])


@dataclass(frozen=True)
class Frame:
    """One frame the server queued."""

    kind: int
    flags: int
    stream_id: int
    payload: bytes = b""


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, u32(increment))


def data_frames(stream_id: int, total: int, size: int) -> bytes:
    """DATA frames of `size` bytes (the last one shorter) carrying `total` bytes."""
    return b"".join(
        frame(DATA, 0, stream_id, bytes(min(size, total - start)))
        for start in range(0, total, size)
    )


def parse(raw: bytes) -> list[Frame]:
    frames = []
    pos = 0
    while pos < len(raw):
        assert len(raw) - pos >= 9, "a truncated frame header"
        length = int.from_bytes(raw[pos : pos + 3], "big")
        stream_id = int.from_bytes(raw[pos + 5 : pos + 9], "big") & MAX_WINDOW
        payload = raw[pos + 9 : pos + 9 + length]
        assert len(payload) == length, "a truncated frame payload"
        frames.append(Frame(raw[pos + 3], raw[pos + 4], stream_id, payload))
        pos += 9 + length
    return frames


def sent(conn: ServerConnection) -> list[Frame]:
    return parse(conn.data_to_send())


def rst(stream_id: int, code: int) -> Frame:
    return Frame(RST_STREAM, 0, stream_id, u32(code))


def wu(stream_id: int, increment: int) -> Frame:
    return Frame(WINDOW_UPDATE, 0, stream_id, u32(increment))


def settings_values(payload: bytes) -> dict[int, int]:
    return dict(struct.iter_unpack(">HI", payload))


class Client:
    """The peer's side of HPACK: one encoder for the connection, as a real client keeps."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    def block(self, fields: tuple[tuple[str, str], ...] = REQUEST) -> bytes:
        return bytes(self.encoder.encode(fields))

    def headers(
        self,
        stream_id: int,
        fields: tuple[tuple[str, str], ...] = REQUEST,
        *,
        end_stream: bool = False,
    ) -> bytes:
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        return frame(HEADERS, flags, stream_id, self.block(fields))


def connect(*client_settings: tuple[int, int], **options: int) -> ServerConnection:
    """A server past the handshake (its own SETTINGS and the ACK already taken)."""
    conn = ServerConnection(**options)
    conn.initiate()
    events = conn.receive(PREFACE + settings(*client_settings))
    assert all(isinstance(e, WindowOpened) for e in events)  # INITIAL_WINDOW_SIZE says so
    conn.data_to_send()
    return conn


def expect_connection_error(conn: ServerConnection, raw: bytes, code: int) -> None:
    with pytest.raises(ProtocolError) as caught:
        conn.receive(raw)
    assert caught.value.code == code
    goaway = sent(conn)[-1]
    assert (goaway.kind, goaway.stream_id) == (GOAWAY, 0)
    assert goaway.payload[4:8] == u32(code)
    assert conn.closed
    assert conn.receive(frame(PING, 0, 0, bytes(8))) == []


# -- the connection preface ----------------------------------------------------------------------


def test_initiate_queues_settings_then_a_connection_window_update() -> None:
    conn = ServerConnection(max_concurrent_streams=7, stream_window=1000, connection_window=100_000)
    conn.initiate()
    first, second = sent(conn)
    assert (first.kind, first.flags, first.stream_id) == (SETTINGS, 0, 0)
    assert settings_values(first.payload) == {
        MAX_CONCURRENT_STREAMS: 7,
        INITIAL_WINDOW_SIZE: 1000,
        MAX_FRAME_SIZE: 16384,
        MAX_HEADER_LIST_SIZE: hpack.Decoder().max_header_list_size,
    }
    assert second == wu(0, 100_000 - 65535)


def test_initiate_sends_no_window_update_for_the_default_connection_window() -> None:
    conn = ServerConnection(connection_window=65535)
    conn.initiate()
    assert [f.kind for f in sent(conn)] == [SETTINGS]


def test_client_preface_and_settings_are_acked() -> None:
    conn = ServerConnection()
    conn.initiate()
    conn.data_to_send()
    assert conn.receive(PREFACE + settings((ENABLE_PUSH, 0))) == []
    assert sent(conn) == [Frame(SETTINGS, ACK, 0)]


def test_bad_preface_is_a_protocol_error_with_goaway() -> None:
    conn = ServerConnection()
    conn.initiate()
    conn.data_to_send()
    expect_connection_error(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", PROTOCOL_ERROR)


def test_first_frame_other_than_settings_is_a_protocol_error() -> None:
    conn = ServerConnection()
    conn.initiate()
    conn.data_to_send()
    expect_connection_error(conn, PREFACE + frame(PING, 0, 0, bytes(8)), PROTOCOL_ERROR)


# -- requests ------------------------------------------------------------------------------------


def test_request_headers_then_data_with_end_stream() -> None:
    conn, client = connect(), Client()
    assert conn.receive(client.headers(1)) == [Request(1, dict(REQUEST), False)]
    body = b"\x00\x00\x00\x00\x05hello"
    assert conn.receive(frame(DATA, END_STREAM, 1, body)) == [Data(1, body, True)]


def test_header_block_split_over_headers_and_continuation_is_decoded() -> None:
    conn, client = connect(), Client()
    block = client.block()
    assert conn.receive(frame(HEADERS, END_STREAM, 1, block[:5])) == []
    assert conn.receive(frame(CONTINUATION, 0, 1, block[5:12])) == []
    events = conn.receive(frame(CONTINUATION, END_HEADERS, 1, block[12:]))
    assert events == [Request(1, dict(REQUEST), True)]


@pytest.mark.parametrize(
    "interruption",
    [
        frame(PING, 0, 0, bytes(8)),
        frame(CONTINUATION, END_HEADERS, 3, b""),
        frame(HEADERS, END_HEADERS, 3, b""),
    ],
    ids=["ping", "continuation-on-another-stream", "headers"],
)
def test_header_block_interrupted_by_another_frame_is_a_protocol_error(
    interruption: bytes,
) -> None:
    conn, client = connect(), Client()
    block = client.block()
    conn.receive(frame(HEADERS, 0, 1, block[:5]))
    expect_connection_error(conn, interruption, PROTOCOL_ERROR)


def test_continuation_without_a_header_block_is_a_protocol_error() -> None:
    conn = connect()
    expect_connection_error(conn, frame(CONTINUATION, END_HEADERS, 1, b""), PROTOCOL_ERROR)


def test_padded_data_is_stripped() -> None:
    conn, client = connect(), Client()
    conn.receive(client.headers(1))
    padded = bytes((4,)) + b"hello" + bytes(4)
    assert conn.receive(frame(DATA, PADDED | END_STREAM, 1, padded)) == [Data(1, b"hello", True)]


def test_padded_headers_with_priority_are_stripped() -> None:
    conn, client = connect(), Client()
    priority = struct.pack(">IB", 0x8000_0000, 15)  # exclusive, on stream 0, weight 16
    payload = bytes((3,)) + priority + client.block() + bytes(3)
    flags = END_HEADERS | END_STREAM | PADDED | PRIORITY_FLAG
    assert conn.receive(frame(HEADERS, flags, 1, payload)) == [Request(1, dict(REQUEST), True)]


@pytest.mark.parametrize(
    ("kind", "flags"), [(DATA, PADDED), (HEADERS, PADDED | END_HEADERS)], ids=["data", "headers"]
)
def test_padding_longer_than_the_frame_is_a_protocol_error(kind: int, flags: int) -> None:
    conn, client = connect(), Client()
    conn.receive(client.headers(1))
    payload = bytes((4,)) + b"abc"  # 4 bytes of padding in a 4-byte payload
    expect_connection_error(conn, frame(kind, flags, 1, payload), PROTOCOL_ERROR)


def test_client_trailers_end_the_stream_as_empty_data() -> None:
    conn, client = connect(), Client()
    conn.receive(client.headers(1))
    trailers = client.headers(1, (("x-checksum", "abc"),), end_stream=True)
    assert conn.receive(trailers) == [Data(1, b"", True)]


@pytest.mark.parametrize("missing", [":path", ":method", ":scheme"])
def test_request_missing_a_pseudo_header_is_reset_alone_and_hpack_stays_in_step(
    missing: str,
) -> None:
    conn, client = connect(), Client()
    extra = (("x-trace", "t-1"),)
    malformed = tuple(f for f in REQUEST if f[0] != missing) + extra
    assert conn.receive(client.headers(1, malformed, end_stream=True)) == []
    assert sent(conn) == [rst(1, PROTOCOL_ERROR)]
    assert not conn.is_open(1)

    block = client.block(REQUEST + extra)
    with pytest.raises(hpack.exceptions.HPACKError):
        hpack.Decoder().decode(block)  # the block leans on entries the first one added
    events = conn.receive(frame(HEADERS, END_HEADERS | END_STREAM, 3, block))
    assert events == [Request(3, dict(REQUEST + extra), True)]


def test_a_repeated_header_block_means_what_the_table_says_now() -> None:
    # The same bytes, sent again after the dynamic table changed, name other fields: a
    # remembered decoding must not outlive the table it was made with.
    conn, client, reference = connect(), Client(), hpack.Decoder()
    other = (*REQUEST[:2], (":path", "/TaskHubSidecarService/GetInstance"), *REQUEST[3:])
    first = client.block()  # every field enters the table
    repeated = client.block()  # all indexed now: decoding it changes nothing
    shifting = client.block(other)  # adds an entry: the indices shift
    for stream_id, block in zip(
        (1, 3, 5, 7, 9), (first, repeated, repeated, shifting, repeated), strict=True
    ):
        events = conn.receive(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block))
        (request,) = [e for e in events if isinstance(e, Request)]
        expected: dict[str, str] = {}
        for name, value in reference.decode(block):
            expected.setdefault(name, value)
        assert request.headers == expected
    assert expected != dict(REQUEST)  # the last one really meant something else


def test_stream_beyond_the_concurrent_limit_is_refused_and_its_headers_still_decoded() -> None:
    conn, client = connect(max_concurrent_streams=1), Client()
    second = (*REQUEST, ("x-request-id", "second"))
    assert conn.receive(client.headers(1, end_stream=True)) == [Request(1, dict(REQUEST), True)]
    assert conn.receive(client.headers(3, second, end_stream=True)) == []
    assert sent(conn) == [rst(3, REFUSED_STREAM)]
    assert not conn.is_open(3)

    conn.send_headers(1, OK_HEADERS, end_stream=True)
    assert not conn.is_open(1)
    events = conn.receive(client.headers(5, second, end_stream=True))
    assert events == [Request(5, dict(second), True)]


# -- PING ----------------------------------------------------------------------------------------


def test_ping_is_answered_with_ack_and_the_same_payload() -> None:
    conn = connect()
    assert conn.receive(frame(PING, 0, 0, b"8 bytes!")) == []
    assert sent(conn) == [Frame(PING, ACK, 0, b"8 bytes!")]


def test_ping_ack_is_not_answered() -> None:
    conn = connect()
    assert conn.receive(frame(PING, ACK, 0, b"8 bytes!")) == []
    assert sent(conn) == []


def test_ping_of_the_wrong_length_is_a_frame_size_error() -> None:
    conn = connect()
    expect_connection_error(conn, frame(PING, 0, 0, b"7 bytes"), FRAME_SIZE_ERROR)


# -- flow control: sending -----------------------------------------------------------------------


def open_stream(conn: ServerConnection, client: Client, stream_id: int = 1) -> None:
    """A request that has ended, answered with response headers: ready for DATA."""
    conn.receive(client.headers(stream_id, end_stream=True))
    conn.send_headers(stream_id, OK_HEADERS)
    conn.data_to_send()


def test_send_data_stops_at_the_connection_window_in_frames_of_the_peer_size() -> None:
    conn = connect((INITIAL_WINDOW_SIZE, 1 << 20))
    open_stream(conn, Client())
    assert conn.send_data(1, bytes(100_000)) == 65535
    assert [len(f.payload) for f in sent(conn)] == [16384, 16384, 16384, 16383]
    assert conn.send_room(1) == 0
    assert conn.send_data(1, b"more") == 0
    assert sent(conn) == []

    assert conn.receive(window_update(0, 1000)) == [WindowOpened()]
    assert conn.send_room(1) == 1000
    assert conn.send_data(1, bytes(5000)) == 1000


def test_send_data_stops_at_the_stream_window() -> None:
    conn = connect((INITIAL_WINDOW_SIZE, 100))
    open_stream(conn, Client())
    assert conn.send_data(1, bytes(1000)) == 100
    assert sent(conn) == [Frame(DATA, 0, 1, bytes(100))]

    assert conn.receive(window_update(1, 50)) == [WindowOpened()]
    assert conn.send_data(1, bytes(1000)) == 50


def test_send_data_splits_frames_at_the_peers_max_frame_size() -> None:
    conn = connect((MAX_FRAME_SIZE, 20_000))
    open_stream(conn, Client())
    assert conn.send_data(1, bytes(45_000)) == 45_000
    frames = sent(conn)
    assert {(f.kind, f.stream_id) for f in frames} == {(DATA, 1)}
    assert [len(f.payload) for f in frames] == [20_000, 20_000, 5000]


def test_initial_window_size_setting_adjusts_open_streams() -> None:
    conn = connect((INITIAL_WINDOW_SIZE, 100))
    open_stream(conn, Client())
    assert conn.send_data(1, bytes(60)) == 60

    assert conn.receive(settings((INITIAL_WINDOW_SIZE, 1000))) == [WindowOpened()]
    assert sent(conn)[-1] == Frame(SETTINGS, ACK, 0)
    assert conn.send_room(1) == 1000 - 60

    conn.receive(settings((INITIAL_WINDOW_SIZE, 10)))  # the stream's window goes to -50
    assert conn.send_room(1) == 0
    assert conn.send_data(1, b"x") == 0


def test_connection_window_update_beyond_the_maximum_is_a_flow_control_error() -> None:
    conn = connect()
    assert conn.receive(window_update(0, MAX_WINDOW - 65535)) == [WindowOpened()]
    expect_connection_error(conn, window_update(0, 1), FLOW_CONTROL_ERROR)


def test_connection_window_update_of_zero_is_a_protocol_error() -> None:
    conn = connect()
    expect_connection_error(conn, window_update(0, 0), PROTOCOL_ERROR)


def test_stream_window_update_of_zero_resets_that_stream() -> None:
    conn = connect()
    client = Client()
    open_stream(conn, client)
    open_stream(conn, client, 3)
    assert conn.receive(window_update(1, 0)) == [Reset(1, PROTOCOL_ERROR)]
    assert sent(conn) == [rst(1, PROTOCOL_ERROR)]
    assert not conn.is_open(1)
    assert conn.is_open(3)


def test_stream_window_update_beyond_the_maximum_resets_that_stream() -> None:
    conn = connect()
    open_stream(conn, Client())
    events = conn.receive(window_update(1, MAX_WINDOW - 65535 + 1))
    assert sent(conn) == [rst(1, FLOW_CONTROL_ERROR)]
    # Reset.code here says PROTOCOL_ERROR, not what went on the wire: only the wire is pinned.
    assert len(events) == 1
    assert isinstance(events[0], Reset)
    assert events[0].stream_id == 1
    assert not conn.is_open(1)


def test_window_update_on_a_closed_stream_is_ignored() -> None:
    conn = connect()
    open_stream(conn, Client())
    conn.send_headers(1, OK_HEADERS, end_stream=True)
    conn.data_to_send()
    assert conn.receive(window_update(1, 100)) == []
    assert sent(conn) == []


def test_window_update_on_an_idle_stream_is_a_protocol_error() -> None:
    conn = connect()
    expect_connection_error(conn, window_update(5, 100), PROTOCOL_ERROR)


# -- flow control: receiving ---------------------------------------------------------------------


def test_data_filling_the_connection_window_exactly_is_accepted() -> None:
    conn, client = connect(connection_window=65535, stream_window=100), Client()
    conn.receive(client.headers(1))
    events = conn.receive(data_frames(1, 65535, 100))
    assert all(isinstance(e, Data) for e in events)
    assert sum(len(e.data) for e in events if isinstance(e, Data)) == 65535
    assert not conn.closed


def test_data_beyond_the_connection_window_is_a_flow_control_error() -> None:
    # The client keeps to the 100-byte stream window (the server reopens it after every
    # frame) but ignores the connection window, never reopened inside one receive().
    conn, client = connect(connection_window=65535, stream_window=100), Client()
    conn.receive(client.headers(1))
    expect_connection_error(conn, data_frames(1, 65536, 100), FLOW_CONTROL_ERROR)


def test_data_beyond_a_stream_window_resets_that_stream() -> None:
    conn, client = connect(stream_window=100), Client()
    conn.receive(client.headers(1))
    assert conn.receive(frame(DATA, 0, 1, bytes(101))) == [Reset(1, FLOW_CONTROL_ERROR)]
    assert sent(conn) == [rst(1, FLOW_CONTROL_ERROR)]
    assert conn.receive(client.headers(3, end_stream=True)) == [Request(3, dict(REQUEST), True)]


def test_received_data_is_given_back_once_half_a_window_is_consumed() -> None:
    conn, client = connect(connection_window=65535, stream_window=65535), Client()
    conn.receive(client.headers(1))
    conn.receive(data_frames(1, 32766, 16384))
    assert sent(conn) == []
    conn.receive(frame(DATA, 0, 1, b"x"))
    assert sent(conn) == [wu(1, 32767), wu(0, 32767)]


# -- SETTINGS ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "code"),
    [
        (MAX_FRAME_SIZE, 16383, PROTOCOL_ERROR),
        (MAX_FRAME_SIZE, 2**24, PROTOCOL_ERROR),
        (ENABLE_PUSH, 2, PROTOCOL_ERROR),
        (INITIAL_WINDOW_SIZE, 2**31, FLOW_CONTROL_ERROR),
    ],
    ids=["max-frame-size-too-small", "max-frame-size-too-large", "enable-push-2", "window"],
)
def test_settings_value_out_of_range_is_a_connection_error(
    setting: int, value: int, code: int
) -> None:
    conn = connect()
    expect_connection_error(conn, settings((setting, value)), code)


def test_settings_at_the_edges_of_their_ranges_are_accepted() -> None:
    conn = connect()
    edges = settings(
        (MAX_FRAME_SIZE, 2**24 - 1),
        (ENABLE_PUSH, 1),
        (INITIAL_WINDOW_SIZE, MAX_WINDOW),
        (HEADER_TABLE_SIZE, 0),
        (0xABCD, 7),  # unknown settings are ignored
    )
    assert conn.receive(edges) == [WindowOpened()]
    assert sent(conn) == [Frame(SETTINGS, ACK, 0)]
    assert conn.peer_max_frame_size == 2**24 - 1
    assert conn.receive(settings((MAX_FRAME_SIZE, 16384))) == []
    assert conn.peer_max_frame_size == 16384


def test_settings_length_not_a_multiple_of_6_is_a_frame_size_error() -> None:
    conn = connect()
    expect_connection_error(conn, frame(SETTINGS, 0, 0, bytes(7)), FRAME_SIZE_ERROR)


def test_settings_ack_with_a_payload_is_a_frame_size_error() -> None:
    conn = connect()
    expect_connection_error(conn, frame(SETTINGS, ACK, 0, bytes(6)), FRAME_SIZE_ERROR)


# -- frame rules ---------------------------------------------------------------------------------


def test_frame_larger_than_our_max_frame_size_is_a_frame_size_error() -> None:
    conn, client = connect(max_frame_size=16384), Client()
    conn.receive(client.headers(1))
    assert conn.receive(frame(DATA, 0, 1, bytes(16384))) == [Data(1, bytes(16384), False)]
    expect_connection_error(conn, frame(DATA, 0, 1, bytes(16385)), FRAME_SIZE_ERROR)


def test_push_promise_from_a_client_is_a_protocol_error() -> None:
    conn = connect()
    expect_connection_error(conn, frame(PUSH_PROMISE, END_HEADERS, 1, u32(2)), PROTOCOL_ERROR)


def test_unknown_frame_types_are_ignored() -> None:
    conn, client = connect(), Client()
    assert conn.receive(frame(0xFA, 0xFF, 1, b"extension")) == []
    assert sent(conn) == []
    assert conn.receive(client.headers(1)) == [Request(1, dict(REQUEST), False)]


def test_headers_on_an_even_stream_id_is_a_protocol_error() -> None:
    conn, client = connect(), Client()
    expect_connection_error(conn, client.headers(2), PROTOCOL_ERROR)


def test_headers_on_a_stream_id_lower_than_an_opened_one_is_a_protocol_error() -> None:
    conn, client = connect(), Client()
    conn.receive(client.headers(5, end_stream=True))
    expect_connection_error(conn, client.headers(3, end_stream=True), PROTOCOL_ERROR)


def test_undecodable_header_block_is_a_compression_error() -> None:
    conn = connect()
    bad_index = b"\xfe"  # indexed field 126: beyond the static table, and the dynamic is empty
    expect_connection_error(conn, frame(HEADERS, END_HEADERS, 1, bad_index), COMPRESSION_ERROR)


def test_header_block_over_the_limit_is_enhance_your_calm() -> None:
    conn = connect(max_header_block=100)
    conn.receive(frame(HEADERS, 0, 1, bytes(60)))
    expect_connection_error(conn, frame(CONTINUATION, 0, 1, bytes(60)), ENHANCE_YOUR_CALM)


# -- what one connection may make the server hold --------------------------------------------


def test_by_default_a_peer_can_leave_at_most_a_small_frame_or_header_block_unfinished() -> None:
    # A frame is held until it is whole, a header block until its last CONTINUATION: with
    # many connections, each one's share must stay small (RFC 9113's minimum frame size; a
    # header block no larger than the decoded header list hpack accepts).
    conn = ServerConnection()
    conn.initiate()
    assert settings_values(sent(conn)[0].payload)[MAX_FRAME_SIZE] == 16384
    conn.receive(PREFACE + settings())
    header = (16385).to_bytes(3, "big") + bytes((DATA, 0)) + u32(1)
    expect_connection_error(conn, header, FRAME_SIZE_ERROR)

    conn = connect()
    conn.receive(frame(HEADERS, 0, 1, bytes(16384)))
    for _ in range(3):
        conn.receive(frame(CONTINUATION, 0, 1, bytes(16384)))
    expect_connection_error(conn, frame(CONTINUATION, 0, 1, bytes(1)), ENHANCE_YOUR_CALM)


def test_remembered_header_blocks_take_little_memory_whatever_the_peer_sends() -> None:
    # Blocks that leave the dynamic table alone are remembered (see _decode); large ones,
    # each one different, must not pile up.
    conn = connect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(256):
            pad = ("x-pad", f"{n:05d}" + "a" * 16000)
            block = hpack.Encoder().encode((*REQUEST, pad), huffman=False)
            for offset in range(0, len(block), 16384):
                kind = HEADERS if offset == 0 else CONTINUATION
                last = offset + 16384 >= len(block)
                chunk = block[offset : offset + 16384]
                conn.receive(frame(kind, END_HEADERS if last else 0, 2 * n + 1, chunk))
            conn.send_headers(2 * n + 1, OK_HEADERS, end_stream=True)
            conn.data_to_send()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 1_000_000, held


# -- stream life ---------------------------------------------------------------------------------


def test_rst_stream_from_the_client_yields_reset() -> None:
    conn, client = connect(), Client()
    conn.receive(client.headers(1))
    assert conn.receive(frame(RST_STREAM, 0, 1, u32(CANCEL))) == [Reset(1, CANCEL)]
    assert not conn.is_open(1)
    assert sent(conn) == []


def test_data_after_the_clients_end_stream_resets_with_stream_closed() -> None:
    conn, client = connect(), Client()
    conn.receive(client.headers(1, end_stream=True))
    assert conn.receive(frame(DATA, 0, 1, b"late")) == [Reset(1, STREAM_CLOSED)]
    assert sent(conn) == [rst(1, STREAM_CLOSED)]


def test_data_on_a_stream_the_server_closed_is_dropped_silently() -> None:
    conn, client = connect(), Client()
    conn.receive(client.headers(1))
    conn.send_headers(1, OK_HEADERS, end_stream=True)
    conn.data_to_send()
    assert conn.receive(frame(DATA, END_STREAM, 1, b"late")) == []
    assert sent(conn) == []


def test_data_on_an_idle_stream_is_a_protocol_error() -> None:
    conn = connect()
    expect_connection_error(conn, frame(DATA, 0, 1, b"early"), PROTOCOL_ERROR)


def test_goaway_from_the_client_yields_goaway_with_its_code() -> None:
    conn = connect()
    goaway = frame(GOAWAY, 0, 0, u32(0) + u32(ENHANCE_YOUR_CALM) + b"calm down")
    assert conn.receive(goaway) == [GoAway(ENHANCE_YOUR_CALM)]


# -- responses -----------------------------------------------------------------------------------


def test_send_headers_with_end_stream_closes_the_stream() -> None:
    conn, client = connect(), Client()
    conn.receive(client.headers(1, end_stream=True))
    conn.send_headers(1, OK_HEADERS, end_stream=True)
    assert sent(conn) == [Frame(HEADERS, END_HEADERS | END_STREAM, 1, OK_HEADERS)]
    assert not conn.is_open(1)
    assert conn.send_data(1, b"after") == 0
    assert sent(conn) == []


def test_answering_before_the_request_ended_resets_with_no_error() -> None:
    conn, client = connect(), Client()
    conn.receive(client.headers(1))
    conn.send_headers(1, OK_HEADERS, end_stream=True)
    assert sent(conn) == [
        Frame(HEADERS, END_HEADERS | END_STREAM, 1, OK_HEADERS),
        rst(1, NO_ERROR),
    ]


def test_encode_headers_decodes_to_the_same_fields_without_the_dynamic_table() -> None:
    fields = [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", "0"),
        ("grpc-message", "m" * 126),
        ("x-127", "v" * 127),
        ("x-" + "n" * 200, "w" * 300),
        ("x-huge", "h" * 20_000),
    ]
    block = encode_headers(fields)
    assert block[:1] == b"\x88"  # :status 200 as static table index 8
    decoder = hpack.Decoder()
    assert decoder.decode(block) == fields
    assert decoder.decode(encode_headers([(":status", "404")])) == [(":status", "404")]
    assert not decoder.header_table.dynamic_entries


def test_a_changed_header_table_size_is_acknowledged_in_the_next_header_block() -> None:
    conn = connect((HEADER_TABLE_SIZE, 0))
    client = Client()
    conn.receive(client.headers(1, end_stream=True) + client.headers(3, end_stream=True))
    sent(conn)
    conn.send_headers(1, encode_headers([(":status", "200")]), end_stream=True)
    conn.send_headers(3, encode_headers([(":status", "200")]), end_stream=True)
    first, second = (f.payload for f in sent(conn) if f.kind == HEADERS)
    assert first == b"\x20\x88"  # size update to 0, once, then :status 200
    assert second == b"\x88"
    decoder = hpack.Decoder()
    decoder.max_allowed_table_size = 0
    assert decoder.decode(first) == [(":status", "200")]


def test_large_header_block_is_split_into_headers_and_continuation() -> None:
    conn, client = connect(), Client()
    conn.receive(client.headers(1, end_stream=True))
    fields = [(":status", "200"), ("x-big", "b" * 40_000)]
    conn.send_headers(1, encode_headers(fields), end_stream=True)
    frames = sent(conn)
    assert [(f.kind, f.flags, f.stream_id) for f in frames] == [
        (HEADERS, END_STREAM, 1),
        (CONTINUATION, 0, 1),
        (CONTINUATION, END_HEADERS, 1),
    ]
    assert [len(f.payload) for f in frames[:2]] == [16384, 16384]
    assert hpack.Decoder().decode(b"".join(f.payload for f in frames)) == fields


# -- byte boundaries -----------------------------------------------------------------------------


def test_receive_split_at_every_byte_gives_the_same_events() -> None:
    client = Client()
    block = client.block()
    conversation = b"".join(
        [
            PREFACE,
            settings((INITIAL_WINDOW_SIZE, 1 << 20)),
            frame(HEADERS, 0, 1, block[:10]),
            frame(CONTINUATION, END_HEADERS, 1, block[10:]),
            frame(DATA, PADDED, 1, bytes((3,)) + b"hello" + bytes(3)),
            frame(PING, 0, 0, b"pingpong"),
            window_update(0, 1000),
            frame(DATA, END_STREAM, 1, b"world"),
            client.headers(3),
            frame(RST_STREAM, 0, 3, u32(CANCEL)),
            frame(GOAWAY, 0, 0, u32(0) + u32(NO_ERROR)),
        ]
    )
    expected: list[Event] = [
        WindowOpened(),
        Request(1, dict(REQUEST), False),
        Data(1, b"hello", False),
        WindowOpened(),
        Data(1, b"world", True),
        Request(3, dict(REQUEST), False),
        Reset(3, CANCEL),
        GoAway(NO_ERROR),
    ]
    whole = ServerConnection()
    whole.initiate()
    assert whole.receive(conversation) == expected

    bytewise = ServerConnection()
    bytewise.initiate()
    events: list[Event] = []
    for i in range(len(conversation)):
        events += bytewise.receive(conversation[i : i + 1])
    assert events == expected
    assert bytewise.data_to_send() == whole.data_to_send()
