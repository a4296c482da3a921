"""The frame codec: encoding, decoding, limits and resynchronisation markers."""

from __future__ import annotations

import itertools
import json

import pytest

from guest_agent.protocol.errors import FrameTooLarge, ProtocolError
from guest_agent.protocol.frames import (
    ACK_MAGIC,
    HEADER_SIZE,
    RESET_MARKER,
    SYNC_MAGIC,
    Frame,
    FrameDecoder,
    FrameType,
    Marker,
    decode_json,
    encode_frame,
    encode_header,
    encode_json,
)


def test_round_trip_byte_by_byte() -> None:
    """Frames cut at every byte boundary come out whole and in order."""
    wire = encode_frame(FrameType.DATA, 7, b"hello", 2) + encode_frame(FrameType.EOF, 7, b"", 2)
    decoder = FrameDecoder(1024)
    out = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        while (item := decoder.next()) is not None:
            out.append(item)
    assert out == [Frame(FrameType.DATA, 7, b"hello", 2), Frame(FrameType.EOF, 7, b"", 2)]


def test_oversized_frame_rejected_before_payload() -> None:
    decoder = FrameDecoder(100)
    decoder.feed(encode_frame(FrameType.DATA, 1, b"x" * 101)[:HEADER_SIZE])
    with pytest.raises(FrameTooLarge, match="101 bytes exceeds the limit of 100"):
        decoder.next()


def test_corrupt_header_detected() -> None:
    wire = bytearray(encode_frame(FrameType.REQUEST, 1, b"{}"))
    wire[9] ^= 0x40  # flip a bit of the length
    decoder = FrameDecoder(1 << 20)
    decoder.feed(bytes(wire))
    with pytest.raises(ProtocolError, match="corrupt frame header"):
        decoder.next()


def test_garbage_at_boundary_detected_early() -> None:
    decoder = FrameDecoder(1024)
    decoder.feed(b"\x13")
    with pytest.raises(ProtocolError, match="out of step"):
        decoder.next()


def test_unknown_frame_type() -> None:
    import struct
    import zlib

    header = struct.pack("!2sBBII", b"\xa5\x5a", 99, 0, 1, 0)
    decoder = FrameDecoder(1024)
    decoder.feed(header + struct.pack("!I", zlib.crc32(header)))
    with pytest.raises(ProtocolError, match="unknown frame type 99"):
        decoder.next()


def test_markers_between_frames() -> None:
    decoder = FrameDecoder(1024)
    nonce = b"n" * 16
    decoder.feed(RESET_MARKER + ACK_MAGIC + nonce + encode_frame(FrameType.HELLO, 0, b"{}"))
    assert decoder.next() == Marker(RESET_MARKER)
    assert decoder.next() == Marker(ACK_MAGIC, nonce)
    assert decoder.next() == Frame(FrameType.HELLO, 0, b"{}")


def test_hunt_skips_stale_bytes_and_other_nonces() -> None:
    decoder = FrameDecoder(1024)
    mine = b"m" * 16
    decoder.feed(b"stale frames" + ACK_MAGIC + b"o" * 16 + ACK_MAGIC + mine[:5])
    assert decoder.hunt(ACK_MAGIC, mine) is None
    decoder.feed(mine[5:] + b"after")
    assert decoder.hunt(ACK_MAGIC, mine) == mine
    decoder.feed(b"")
    with pytest.raises(ProtocolError):
        decoder.next()  # "after" is not a frame


def test_hunt_keeps_memory_bounded() -> None:
    decoder = FrameDecoder(1024)
    for _ in range(100):
        decoder.feed(b"z" * 10000)
        assert decoder.hunt(SYNC_MAGIC) is None
    assert len(decoder._buffer) < 64


@pytest.mark.parametrize(
    "value",
    ["text", "\u00e9t\u00e9 \U0001f600", 0, -7, 2.5, None, True, [], {},
     {"op": "ping", "args": {"a": [1, None, "x"]}}],
)
def test_json_round_trip(value: object) -> None:
    encoded = encode_json(value)
    assert encoded == json.dumps(value, separators=(",", ":")).encode()
    assert decode_json(encoded) == value


@pytest.mark.parametrize(
    "payload",
    [b' {"a": 1}\n', b'{"a":1}', '{"a":"\u00e9"}'.encode("utf-16")],
    ids=["spaces", "bare", "utf-16"],
)
def test_json_decodes_what_json_loads_decodes(payload: bytes) -> None:
    assert decode_json(payload) == json.loads(payload)


@pytest.mark.parametrize("payload", [b'{"a":1}x', b"\xff", b"", b'{"a":', b"[1,]"])
def test_json_refuses_what_json_loads_refuses(payload: bytes) -> None:
    with pytest.raises(ValueError) as expected:
        json.loads(payload)
    with pytest.raises(ValueError) as got:
        decode_json(payload)
    assert str(got.value) == str(expected.value)


def test_malformed_json_in_a_frame_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="REQUEST frame carries malformed JSON"):
        Frame(FrameType.REQUEST, 1, b'{"op":').json()


def test_buffered_counts_what_is_not_yet_a_whole_frame() -> None:
    wire = encode_frame(FrameType.DATA, 1, b"x" * 100)
    decoder = FrameDecoder(1024)
    decoder.feed(wire + wire[:50])
    assert decoder.next() == Frame(FrameType.DATA, 1, b"x" * 100)
    assert decoder.next() is None
    assert decoder.buffered == 50


@pytest.mark.parametrize("piece", [1000, 16384, 65536, 100_000])
def test_large_frames_in_pieces_come_out_whole_with_what_follows(piece: int) -> None:
    """A frame larger than a piece is put together apart; the bytes after it are kept."""
    first = bytes(range(256)) * 1024  # 256 KiB
    second = b"y" * 40_000
    wire = (
        encode_frame(FrameType.DATA, 1, first, 1)
        + encode_frame(FrameType.EOF, 1, b"", 1)
        + encode_frame(FrameType.DATA, 2, second)
        + SYNC_MAGIC
        + b"n" * 16
    )
    decoder = FrameDecoder(1 << 20)
    out: list[Frame | Marker] = []
    view = memoryview(bytearray(wire))  # a reused read buffer: the decoder must copy what it keeps
    for at in range(0, len(wire), piece):
        decoder.feed(view[at : at + piece])
        while (item := decoder.next()) is not None:
            out.append(item)
        view[at : at + piece] = b"\0" * len(view[at : at + piece])
    assert out == [
        Frame(FrameType.DATA, 1, first, 1),
        Frame(FrameType.EOF, 1, b"", 1),
        Frame(FrameType.DATA, 2, second),
        Marker(SYNC_MAGIC, b"n" * 16),
    ]
    # Each payload is the frame's own (compared above after every later feed): no view of
    # a buffer the decoder reuses.
    assert all(type(item.payload) in (bytes, bytearray) for item in out if isinstance(item, Frame))
    assert decoder.buffered == 0


def test_a_large_partial_frame_counts_the_bytes_received_not_the_size_announced() -> None:
    decoder = FrameDecoder(1 << 20)
    decoder.feed(encode_frame(FrameType.DATA, 1, b"z" * 500_000)[:30_000])
    assert decoder.next() is None
    assert decoder.buffered == 30_000
    decoder.clear()
    assert decoder.buffered == 0 and decoder.next() is None


def test_hunt_finds_a_marker_inside_a_large_frame_being_put_together() -> None:
    """A frame begun by a host that went away is stale: the next host's SYNC is in it."""
    decoder = FrameDecoder(1 << 20)
    nonce = b"k" * 16
    # (A request id above 255 and flags: the stale part is searched with its header.)
    decoder.feed(encode_frame(FrameType.DATA, 70_000, b"z" * 100_000, 2)[:30_000])
    assert decoder.next() is None  # now being put together apart
    decoder.feed(SYNC_MAGIC + nonce + encode_frame(FrameType.HELLO, 0, b"{}"))
    assert decoder.hunt(SYNC_MAGIC) == nonce
    assert decoder.next() == Frame(FrameType.HELLO, 0, b"{}")


def test_hunt_searches_the_header_of_a_frame_being_put_together_as_it_came() -> None:
    """Stale bytes are searched as they arrived, a frame's header too: here a SYNC begins in
    its last byte (the CRC's, 0xFF with this request id) and goes on in the payload."""
    nonce = b"k" * 16
    header = next(
        h for i in range(256, 70_000) if (h := encode_header(FrameType.DATA, i, 100_000, 2))[-1] == 0xFF
    )
    decoder = FrameDecoder(1 << 20)
    decoder.feed(header + SYNC_MAGIC[1:] + nonce + b"z" * 20_000)
    assert decoder.next() is None  # now being put together apart
    assert decoder.hunt(SYNC_MAGIC) == nonce


def test_hunt_finds_a_marker_kept_after_a_frame_being_put_together() -> None:
    """Fed again before draining: the frame's end and a SYNC after it were kept; all but the
    SYNC is stale."""
    decoder = FrameDecoder(1 << 20)
    nonce = b"k" * 16
    wire = encode_frame(FrameType.DATA, 3, b"z" * 100_000)
    decoder.feed(wire[:30_000])
    assert decoder.next() is None  # now being put together apart
    decoder.feed(wire[30_000:] + SYNC_MAGIC + nonce)
    decoder.feed(encode_frame(FrameType.HELLO, 0, b"{}"))
    assert decoder.hunt(SYNC_MAGIC) == nonce
    assert decoder.next() == Frame(FrameType.HELLO, 0, b"{}") and decoder.next() is None


def test_tls_frames_pass_through_as_views_of_the_bytes_read() -> None:
    """No copy of a TLS frame's payload: the TLS session buffers it (one copy) by itself."""
    records = bytes(range(256)) * 100
    read = bytearray(encode_frame(FrameType.TLS, 0, records) + encode_frame(FrameType.TLS, 0, b"next"))
    decoder = FrameDecoder(1 << 20, pass_through=frozenset({FrameType.TLS}))
    decoder.feed(memoryview(read)[:10_000])
    first = decoder.next()
    assert isinstance(first, Frame) and isinstance(first.payload, memoryview)
    assert first.payload.obj is read and bytes(first.payload) == records[: 10_000 - HEADER_SIZE]
    assert decoder.next() is None
    # The received part counts until the frame is whole: a serial line drops a frame cut off.
    assert decoder.buffered == 10_000
    decoder.feed(memoryview(read)[10_000:])
    rest, after = decoder.next(), decoder.next()
    assert isinstance(rest, Frame) and bytes(rest.payload) == records[10_000 - HEADER_SIZE :]
    assert after == Frame(FrameType.TLS, 0, b"next") and decoder.next() is None
    assert decoder.buffered == 0


def test_a_large_frame_offers_its_payload_for_writing_in_place() -> None:
    payload = b"p" * 100_000
    wire = encode_frame(FrameType.DATA, 3, payload, 1)
    decoder = FrameDecoder(1 << 20)
    assert decoder.room() is None  # nothing begun
    decoder.feed(wire[:20_000])
    assert decoder.next() is None
    room = decoder.room()
    assert room is not None and len(room) == len(payload) - (20_000 - HEADER_SIZE)
    room[:50_000] = wire[20_000:70_000]
    decoder.filled(50_000)
    assert decoder.next() is None and decoder.buffered == 70_000
    decoder.feed(wire[70_000:] + encode_frame(FrameType.EOF, 3, b"", 1))
    assert decoder.room() is None  # bytes are pending: they come first
    frame = decoder.next()
    assert frame == Frame(FrameType.DATA, 3, payload, 1) and room.obj is frame.payload
    assert decoder.next() == Frame(FrameType.EOF, 3, b"", 1)


TLS_PASSES = frozenset({FrameType.TLS})
LARGE = bytes(range(256)) * 80  # 20480 bytes: put together in a buffer of its own
STREAM = (
    encode_frame(FrameType.DATA, 1, b"small", 1)
    + encode_frame(FrameType.DATA, 2, LARGE, 2)
    + encode_frame(FrameType.TLS, 0, LARGE, 4)
    + encode_frame(FrameType.TLS, 0, b"", 4)
    + SYNC_MAGIC
    + b"n" * 16
    + encode_frame(FrameType.EOF, 2, b"", 2)
)
EXPECTED: list[Frame | Marker] = [
    Frame(FrameType.DATA, 1, b"small", 1),
    Frame(FrameType.DATA, 2, LARGE, 2),
    Frame(FrameType.TLS, 0, LARGE, 4),
    Frame(FrameType.TLS, 0, b"", 4),
    Marker(SYNC_MAGIC, b"n" * 16),
    Frame(FrameType.EOF, 2, b"", 2),
]


def joined(items: list[Frame | Marker]) -> list[Frame | Marker]:
    """Consecutive pieces of one TLS payload joined (a TLS frame of this stream is empty or LARGE)."""
    out: list[Frame | Marker] = []
    for item in items:
        previous = out[-1] if out else None
        if (
            isinstance(item, Frame)
            and item.type is FrameType.TLS
            and isinstance(previous, Frame)
            and previous.type is FrameType.TLS
            and 0 < len(previous.payload) < len(LARGE)
        ):
            out[-1] = Frame(FrameType.TLS, 0, bytes(previous.payload) + bytes(item.payload), item.flags)
        else:
            out.append(item)
    return out


def owned(item: Frame | Marker) -> Frame | Marker:
    return (
        Frame(item.type, item.request_id, bytes(item.payload), item.flags)
        if isinstance(item, Frame)
        else item
    )


def owned_frames(decoder: FrameDecoder) -> list[Frame | Marker]:
    """Every frame and marker the decoder gives out now, each with a payload of its own."""
    out = []
    while (item := decoder.next()) is not None:
        out.append(owned(item))
    return out


# Where each item of STREAM starts, and cuts inside each header, payload and marker.
_STARTS = list(
    itertools.accumulate(
        [0]
        + [
            len(HEADER_SIZE * b"-" + item.payload)
            if isinstance(item, Frame)
            else len(item.magic + item.nonce)
            for item in EXPECTED
        ]
    )
)
CUTS = [
    3,  # inside the first header
    _STARTS[1] + 5,  # inside the large frame's header
    _STARTS[1] + 100,  # inside its payload: from here it is put together apart
    _STARTS[1] + 5000,
    _STARTS[1] + 10000,
    _STARTS[2] + 7,  # inside the TLS frame's header
    _STARTS[2] + 3000,  # inside its payload, which passes through
    _STARTS[2] + 9000,
    _STARTS[3] - 50,
    _STARTS[3] + 8,  # inside the empty TLS frame's header
    _STARTS[4] + 2,  # inside the marker
    _STARTS[4] + 20,  # inside its nonce
    _STARTS[5] + 1,
]
PIECES = list(zip([0, *CUTS], [*CUTS, len(STREAM)], strict=True))


def test_no_view_of_a_fed_buffer_is_kept_once_next_returned_none() -> None:
    """The agent's read buffer is free again as soon as the decoder has given out every frame."""
    decoder = FrameDecoder(1 << 20, pass_through=TLS_PASSES)
    out: list[Frame | Marker] = []
    for start, end in PIECES:
        fed = bytearray(STREAM[start:end])
        decoder.feed(fed)
        out += owned_frames(decoder)
        fed.clear()  # BufferError if the decoder still held a view of it
    assert joined(out) == EXPECTED
    assert decoder.buffered == 0


def test_feeding_again_before_draining_copies_what_the_first_feed_left() -> None:
    """A caller may feed again before next() returned None: in every state, nothing is lost."""
    decoder = FrameDecoder(1 << 20, pass_through=TLS_PASSES)
    out: list[Frame | Marker] = []
    # Fed again before draining: the first header's start (piece 0), the large frame's
    # payload being put together (3, 4, then 5 with its end and the next header's start),
    # the TLS payload passing through (7, then 9 with its end and the next header's start),
    # the marker's nonce (11).
    drain_after = {1, 2, 6, 8, 10, 12}
    previous: bytearray | None = None
    for index, (start, end) in enumerate(PIECES):
        piece = bytearray(STREAM[start:end])
        decoder.feed(piece)
        if previous is not None:
            # Reused by the caller, as a read buffer is: the decoder copied what it needed.
            previous[:] = b"\0" * len(previous)
        previous = piece
        if index in drain_after:
            out += owned_frames(decoder)
            previous[:] = b"\0" * len(previous)
            previous = None
    out += owned_frames(decoder)
    assert joined(out) == EXPECTED
    assert decoder.buffered == 0
