"""
Properties of the wire codec (hypothesis): frames survive any cutting of the stream, any
bytes at all decode to frames and markers or to our ProtocolError, and a stream of junk
gives way to the next SYNC.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from guest_agent.protocol.errors import FrameTooLarge, ProtocolError
from guest_agent.protocol.frames import (
    ACK_MAGIC,
    HEADER_SIZE,
    MARKER_SIZE,
    NONCE_SIZE,
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

MAX_PAYLOAD = 4096

frames = st.builds(
    Frame,
    type=st.sampled_from(FrameType),
    request_id=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=300),
    flags=st.integers(0, 0xFF),
)
markers = st.one_of(
    st.builds(
        Marker, st.sampled_from([SYNC_MAGIC, ACK_MAGIC]), st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE)
    ),
    st.just(Marker(RESET_MARKER)),
)


def wire_of(item: Frame | Marker) -> bytes:
    if isinstance(item, Marker):
        return item.magic + item.nonce
    return encode_frame(item.type, item.request_id, bytes(item.payload), item.flags)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at ``points`` (positions taken modulo its length)."""
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def drain(decoder: FrameDecoder) -> list[Frame | Marker]:
    out = []
    while (item := decoder.next()) is not None:
        out.append(item)
    return out


@given(st.lists(st.one_of(frames, markers), max_size=12), st.lists(st.integers(0, 10**6), max_size=20))
def test_frames_and_markers_survive_any_cutting(items: list[Frame | Marker], points: list[int]) -> None:
    wire = b"".join(wire_of(item) for item in items)
    decoder = FrameDecoder(MAX_PAYLOAD)
    out = []
    for piece in cut(wire, points):
        decoder.feed(piece)
        out += drain(decoder)
    assert out == items
    assert decoder.buffered == 0


# Large payloads too: they are put together apart (or passed through), not in the buffer.
mixed_frames = st.builds(
    Frame,
    type=st.sampled_from(FrameType),
    request_id=st.integers(0, 0xFFFFFFFF),
    payload=st.one_of(st.binary(max_size=300), st.binary(min_size=16_000, max_size=40_000)),
    flags=st.integers(0, 0xFF),
)
PASSED = frozenset({FrameType.TLS})


def owned(items: list[Frame | Marker]) -> list[Frame | Marker]:
    """Each payload copied: a passed-through piece is valid only until the next feed."""
    return [
        Frame(item.type, item.request_id, bytes(item.payload), item.flags)
        if isinstance(item, Frame)
        else item
        for item in items
    ]


def joined_pieces(out: list[Frame | Marker], items: list[Frame | Marker]) -> list[Frame | Marker]:
    """``out`` with the pieces of each passed-through payload joined, as ``items`` cut them."""
    joined: list[Frame | Marker] = []
    pieces = iter(out)
    for item in items:
        if isinstance(item, Frame) and item.type in PASSED:
            payload = b""
            while True:
                piece = next(pieces)
                assert isinstance(piece, Frame) and (piece.type, piece.request_id, piece.flags) == (
                    item.type, item.request_id, item.flags)
                payload += piece.payload
                if len(payload) >= len(item.payload):
                    break
            joined.append(Frame(item.type, item.request_id, payload, item.flags))
        else:
            joined.append(next(pieces))
    assert next(pieces, None) is None
    return joined


@given(
    st.lists(st.one_of(mixed_frames, markers), max_size=8),
    st.lists(st.integers(0, 10**6), max_size=30),
    st.booleans(),
)
def test_a_reused_read_buffer_and_payloads_written_in_place(
    items: list[Frame | Marker], points: list[int], in_place: bool
) -> None:
    """
    What the agent does: each read lands in the same buffer, which is overwritten once the
    decoder has given every frame out; TLS passes through in pieces; a large frame's
    payload is (with ``in_place``) written straight into the decoder's room, as TLS does.
    """
    wire = b"".join(wire_of(item) for item in items)
    decoder = FrameDecoder(1 << 20, pass_through=PASSED)
    read_buffer = bytearray(len(wire))
    out: list[Frame | Marker] = []
    for piece in cut(wire, points):
        view = memoryview(read_buffer)[: len(piece)]
        while piece:
            room = decoder.room() if in_place else None
            if room is not None:
                size = min(len(room), len(piece))
                room[:size] = piece[:size]
                decoder.filled(size)
            else:
                size = len(piece)
                view[:size] = piece
                decoder.feed(view[:size])
            piece = piece[size:]
            out += owned(drain(decoder))
            view[:] = b"\0" * len(view)  # the next read
    assert joined_pieces(out, items) == items
    assert decoder.buffered == 0


@given(
    st.lists(st.one_of(mixed_frames, markers), max_size=8),
    st.lists(st.integers(0, 10**6), max_size=30),
    st.lists(st.booleans(), max_size=30),
)
def test_feeding_again_before_taking_everything_out_loses_nothing(
    items: list[Frame | Marker], points: list[int], drains: list[bool]
) -> None:
    """A caller may feed several times before it calls next(): the decoder keeps what it must."""
    wire = b"".join(wire_of(item) for item in items)
    decoder = FrameDecoder(1 << 20, pass_through=PASSED)
    out: list[Frame | Marker] = []
    kept: bytearray | None = None
    drain_points = itertools.chain(drains, itertools.repeat(False))
    for piece, drain_now in zip(cut(wire, points), drain_points, strict=False):
        fed = bytearray(piece)
        decoder.feed(fed)
        if kept is not None:
            kept[:] = b"\0" * len(kept)  # the decoder kept what it needed of it at this feed
        kept = fed
        if drain_now:
            out += owned(drain(decoder))
            kept[:] = b"\0" * len(kept)
            kept = None
    out += owned(drain(decoder))
    assert joined_pieces(out, items) == items
    assert decoder.buffered == 0


@given(frames, st.integers(1, HEADER_SIZE - 1))
def test_a_partial_frame_waits_for_the_rest(frame: Frame, keep: int) -> None:
    wire = wire_of(frame)
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoder.feed(wire[:keep])
    assert decoder.next() is None
    assert decoder.buffered == keep
    decoder.feed(wire[keep:])
    assert decoder.next() == frame


@given(st.binary(max_size=600), st.integers(16, 2048))
def test_any_bytes_decode_to_frames_or_our_protocol_error(data: bytes, limit: int) -> None:
    decoder = FrameDecoder(limit)
    decoder.feed(data)
    try:
        items = drain(decoder)
    except ProtocolError:
        return
    # Whatever was taken is exactly what encodes back to the bytes consumed.
    consumed = b"".join(wire_of(item) for item in items)
    assert data.startswith(consumed)
    assert decoder.buffered == len(data) - len(consumed)
    for item in items:
        if isinstance(item, Frame):
            assert len(item.payload) <= limit


@given(frames, st.integers(0, MAX_PAYLOAD))
def test_frame_limit_is_exact(frame: Frame, limit: int) -> None:
    decoder = FrameDecoder(limit)
    decoder.feed(wire_of(frame))
    if len(frame.payload) > limit:
        try:
            decoder.next()
        except FrameTooLarge as e:
            assert f"{len(frame.payload)} bytes exceeds the limit of {limit}" in str(e)
        else:
            raise AssertionError("an oversized frame was accepted")
    else:
        assert decoder.next() == frame


@given(
    st.binary(max_size=400),
    st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE),
    st.lists(st.integers(0, 10**6), max_size=10),
)
def test_hunting_finds_the_sync_after_any_junk(junk: bytes, nonce: bytes, points: list[int]) -> None:
    assume(SYNC_MAGIC not in junk + SYNC_MAGIC[:-1])  # the junk holds no earlier SYNC
    decoder = FrameDecoder(MAX_PAYLOAD)
    found = None
    for piece in cut(junk + SYNC_MAGIC + nonce + b"after", points):
        decoder.feed(piece)
        if found is None:
            found = decoder.hunt(SYNC_MAGIC)
            # Bytes kept while hunting never exceed one partial marker.
            assert found is not None or decoder.buffered <= MARKER_SIZE + NONCE_SIZE - 1
    assert found == nonce
    assert decoder.buffered == len(b"after")


@given(
    st.binary(max_size=400),
    st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE),
    st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE),
)
def test_hunting_for_a_nonce_skips_other_acks(junk: bytes, stale: bytes, nonce: bytes) -> None:
    assume(stale != nonce)
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoder.feed(ACK_MAGIC + stale + junk)
    assert decoder.hunt(ACK_MAGIC, nonce) is None
    decoder.feed(ACK_MAGIC + nonce)
    assert decoder.hunt(ACK_MAGIC, nonce) == nonce
    assert decoder.buffered == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_json_round_trip(value: object) -> None:
    assert decode_json(encode_json(value)) == value


@given(
    json_values,
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]),
    st.sampled_from([b"[%s]", b'{"a":%s}', b"%s"]),
)
def test_json_refuses_what_is_not_a_finite_number(value: object, number: bytes, where: bytes) -> None:
    """JSON has no NaN or Infinity (and 1e999 overflows a float): our ProtocolError, not a float."""
    payload = b"[" + encode_json(value) + b"," + where.replace(b"%s", number) + b"]"
    with pytest.raises(ProtocolError, match=r"^NOTIFY frame carries malformed JSON"):
        Frame(FrameType.NOTIFY, 0, payload).json()


@given(st.binary(max_size=200))
def test_json_payload_is_a_value_or_our_protocol_error(payload: bytes) -> None:
    frame = Frame(FrameType.REQUEST, 1, payload)
    try:
        frame.json()
    except ProtocolError as e:
        assert "REQUEST frame carries malformed JSON" in str(e)


@given(st.integers(1, 100_000), st.sampled_from([("[", "]"), ('{"a":', "}")]), st.booleans())
def test_nested_json_is_a_value_or_our_protocol_error(
    depth: int, brackets: tuple[str, str], closed: bool
) -> None:
    """However deep a hostile peer nests its JSON, it is a value or our error (not RecursionError)."""
    opener, closer = brackets
    payload = opener * depth + (closer * depth if closed else "")
    frame = Frame(FrameType.NOTIFY, 0, payload.encode())
    try:
        frame.json()
    except ProtocolError:
        pass
    else:
        assert closed
