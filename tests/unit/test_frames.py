"""The frame codec: encoding, decoding, limits and resynchronisation markers."""

from __future__ import annotations

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
