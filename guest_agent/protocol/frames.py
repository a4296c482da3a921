"""
The wire codec: frames and the markers that resynchronise a byte stream.

A frame is a 16-byte header and a payload::

    magic  'VM'-like 2 bytes (0xA5 0x5A)
    type   u8     FrameType
    flags  u8     the sub-stream (channel) for DATA, EOF and CREDIT frames
    id     u32    request id; 0 for connection-level frames
    length u32    payload length, checked against the receiver's limit
    crc    u32    CRC-32 of the 12 bytes above

The header CRC lets a receiver tell a real frame from stale or foreign bytes before it
trusts the length and waits for that many bytes.  Between frames a byte 0xFF starts a
marker (SYNC, ACK or RESET), used to resynchronise a stream whose two ends may have been
out of step.  See docs/protocol.md.
"""

from __future__ import annotations

import enum
import json
import json.decoder
import json.encoder
import json.scanner
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from guest_agent.protocol.errors import FrameTooLarge, ProtocolError

FRAME_MAGIC = b"\xa5\x5a"
_HEADER = struct.Struct("!2sBBII")
_CRC = struct.Struct("!I")
HEADER_SIZE = _HEADER.size + _CRC.size

MARKER_LEAD = 0xFF
NONCE_SIZE = 16
#: host -> agent: "forget everything before this; start a session", followed by a nonce.
SYNC_MAGIC = b"\xffVMC-SYNC\x00"
#: agent -> host: "SYNC with this nonce seen", followed by the nonce.
ACK_MAGIC = b"\xffVMC-ACK\x00\x00"
#: agent -> host: "I (re)started and have no session".
RESET_MARKER = b"\xffVMC-RESET"
MARKER_SIZE = len(SYNC_MAGIC)
assert len(ACK_MAGIC) == len(RESET_MARKER) == MARKER_SIZE


class FrameType(enum.IntEnum):
    HELLO = 1
    REQUEST = 2
    RESPONSE = 3
    ERROR = 4
    DATA = 5
    EOF = 6
    CREDIT = 7
    NOTIFY = 8
    CANCEL = 9
    #: TLS records (ciphertext); after the handshake every other frame travels inside them.
    TLS = 10


class Channel(enum.IntEnum):
    """Sub-streams of one request: stdin and file contents use INPUT."""

    INPUT = 0
    STDOUT = 1
    STDERR = 2


# Not frozen: a frozen dataclass pays object.__setattr__ per field, and one Frame is
# built for every frame received.
@dataclass(slots=True)
class Frame:
    type: FrameType
    request_id: int
    #: A bytearray when the frame was assembled from pieces, a memoryview for a piece
    #: passed through (see FrameDecoder).
    payload: bytes | bytearray | memoryview = b""
    flags: int = 0

    def json(self) -> Any:
        """Decode a control frame's JSON payload; malformed JSON breaks the protocol."""
        if not self.payload:
            return {}
        try:
            return decode_json(self.payload)
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than Python's stack
            raise ProtocolError(f"{self.type.name} frame carries malformed JSON: {e}") from None


def encode_header(frame_type: FrameType, request_id: int, length: int, flags: int = 0) -> bytes:
    """The 16-byte header of a frame whose payload is ``length`` bytes (sent after it)."""
    header = _HEADER.pack(FRAME_MAGIC, frame_type, flags, request_id, length)
    return header + _CRC.pack(zlib.crc32(header))


def encode_frame(
    frame_type: FrameType, request_id: int, payload: bytes | bytearray = b"", flags: int = 0
) -> bytes:
    return encode_header(frame_type, request_id, len(payload), flags) + payload


# Every request and response passes through these two, so they call json's C encoder and
# scanner directly: json.dumps and json.loads build or detect per call what is the same
# every time, a fifth of the agent's protocol work for a ping.  The encoder skips the check
# for reference cycles (markers=None): messages are trees built by this code.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))
_c_make_encoder: Callable[..., Callable[[Any, int], list[str]]] | None = getattr(
    json.encoder, "c_make_encoder", None
)
_encode_c = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(
        None, _JSON_ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )
)


def _reject_constant(name: str) -> Any:
    # JSON has no NaN or Infinity; Python's json accepts them, and int(inf) raises OverflowError.
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError(f"{text} is out of a float's range")
    return value


_DECODER = json.decoder.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(cast(Any, _DECODER))


def encode_json(value: Any) -> bytes:
    if _encode_c is None:
        return _JSON_ENCODER.encode(value).encode()
    return "".join(_encode_c(value, 0)).encode()


def decode_json(payload: bytes | bytearray | memoryview) -> Any:
    """
    ``json.loads`` for a UTF-8 payload.

    :raises ValueError: not one JSON value (``json.loads`` says why), NaN or Infinity, or
        nested deeper than the interpreter's recursion limit.
    """
    try:
        try:
            text = bytes(payload).decode()  # no copy of bytes; JSON frames are small
            value, end = _scan(text, 0)
            if end == len(text):
                return value
        except (StopIteration, ValueError):  # UnicodeDecodeError is a ValueError
            pass
        # Whitespace around the value, another encoding, or an error for json.loads to explain.
        return json.loads(bytes(payload), parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


@dataclass(frozen=True)
class Marker:
    """A resynchronisation marker found between frames."""

    magic: bytes
    nonce: bytes = b""


_FRAME_TYPES = {kind.value: kind for kind in FrameType}
#: A frame at least this large that has not arrived whole is assembled in a buffer of its own.
_ASSEMBLE_ABOVE = 16 * 1024
_NOTHING = memoryview(b"")


class FrameDecoder:
    """
    Cuts a byte stream into frames and markers.

    What :meth:`feed` is given is read in place, not copied, until :meth:`next` returns
    None or :meth:`hunt` or :meth:`clear` is called: only the start of a frame or marker
    that has not arrived whole is then kept.  So the caller may reuse its read buffer as
    soon as it has taken every frame out, and a payload is copied once at most.

    :param max_payload: the largest payload this side accepts; a header announcing more
        raises :class:`FrameTooLarge` before any of the payload is buffered.
    :param pass_through: frame types whose payloads are handed out as they arrive, in
        pieces (a :class:`Frame` of that type for each), instead of being put together:
        TLS records, which the TLS session buffers by itself.  A piece may be a view of
        the fed bytes, valid until the next call.
    """

    def __init__(self, max_payload: int, pass_through: frozenset[FrameType] = frozenset()) -> None:
        self.max_payload = max_payload
        self._pass_through = pass_through
        # The start of a frame or marker that did not arrive whole in one feed.
        self._buffer = bytearray()
        # What the latest feed brought and nothing has taken yet.
        self._pending = _NOTHING
        # A large frame that arrives in pieces is put together in a buffer of its size:
        # appending each piece to ``_buffer`` would copy all of it again whenever the
        # bytearray grows, many times per frame (memory copies are slow under emulation).
        self._header: tuple[FrameType, int, int] | None = None  # type, request id, flags
        self._payload = bytearray()
        self._filled = 0
        # The frame whose payload is being passed through, its length and how much of it
        # is still to come (both read only while there is one).
        self._passing: tuple[FrameType, int, int] | None = None
        self._passing_length = 0
        self._passing_left = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending:
            self._keep_pending()  # fed again before everything was taken out
        self._pending = memoryview(data)

    def room(self) -> memoryview | None:
        """
        Where the next bytes of the stream belong when they can be written there in place:
        the rest of the payload of a large frame being put together, when nothing else is
        held before it.  Say with :meth:`filled` how much was written.
        """
        if self._header is None or self._pending:
            return None
        return memoryview(self._payload)[self._filled :]

    def filled(self, size: int) -> None:
        """``size`` bytes of the stream were written to the start of the last :meth:`room`."""
        self._filled += size

    def _keep_pending(self) -> None:
        """Copy what is pending into the decoder's own buffers: the caller may reuse it."""
        if self._header is not None:
            self._fill_payload()
        if self._pending:
            self._buffer += self._pending
            self._pending = _NOTHING

    def clear(self) -> None:
        self._buffer.clear()
        self._pending = _NOTHING
        self._header = None
        self._payload = bytearray()
        self._passing = None

    @property
    def buffered(self) -> int:
        """
        How many bytes are held; once :meth:`next` returned None, those of a frame or
        marker that has begun and not yet arrived whole (counting the pieces of a payload
        passed through so far: their receiver holds them until the rest comes).
        """
        held = len(self._buffer) + len(self._pending)
        if self._header is not None:
            held += HEADER_SIZE + self._filled
        elif self._passing is not None:
            held += HEADER_SIZE + self._passing_length - self._passing_left
        return held

    def next(self) -> Frame | Marker | None:
        """
        The next complete frame or marker (or piece of a passed-through payload), or None
        until more bytes arrive.

        :raises ProtocolError: the bytes at a frame boundary are neither a frame nor a
            marker; the caller must resynchronise.
        """
        if self._header is not None:
            return self._assembled()
        if self._passing is not None:
            return self._passed_piece()
        if self._buffer:
            self._top_up()
        source: bytearray | memoryview = self._buffer or self._pending
        if not source:
            return None
        if source[0] == MARKER_LEAD:
            return self._next_marker(source)
        if len(source) < HEADER_SIZE:
            if not FRAME_MAGIC.startswith(bytes(source[:2])):
                raise ProtocolError(
                    f"expected a frame, got byte 0x{source[0]:02x}: the stream is out of step"
                )
            self._keep_partial(source)
            return None
        magic, frame_type, flags, request_id, length = _HEADER.unpack_from(source)
        (crc,) = _CRC.unpack_from(source, _HEADER.size)
        with memoryview(source) as view:
            header_crc = zlib.crc32(view[: _HEADER.size])
        if magic != FRAME_MAGIC or crc != header_crc:
            raise ProtocolError("corrupt frame header: the stream is out of step")
        if length > self.max_payload:
            raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self.max_payload} bytes")
        kind = _FRAME_TYPES.get(frame_type)
        if kind is None:
            raise ProtocolError(f"unknown frame type {frame_type}")
        end = HEADER_SIZE + length
        if kind in self._pass_through:
            self._passing = (kind, request_id, flags)
            self._passing_length = self._passing_left = length
            self._consume(source, HEADER_SIZE)
            if length:
                return self._passed_piece()
            self._passing = None
            return Frame(kind, request_id, b"", flags)
        if len(source) < end:
            if length < _ASSEMBLE_ABOVE:
                self._keep_partial(source)
                return None
            # Allocated before the payload arrives: at most max_payload, checked above.
            self._header = (kind, request_id, flags)
            self._payload = bytearray(length)
            self._filled = len(source) - HEADER_SIZE
            self._payload[: self._filled] = source[HEADER_SIZE:]
            self._consume(source, len(source))
            return self._assembled()
        # One copy, straight out of the bytes received.
        with memoryview(source) as view:
            payload = bytes(view[HEADER_SIZE:end])
        self._consume(source, end)
        return Frame(kind, request_id, payload, flags)

    def _consume(self, source: bytearray | memoryview, size: int) -> None:
        if source is self._buffer:
            # Deleting the head of a bytearray only moves its start.
            del self._buffer[:size]
        else:
            self._take_pending(size)

    def _take_pending(self, size: int) -> None:
        # Once all is taken, no view of the caller's buffer is left: the caller may resize it.
        self._pending = self._pending[size:] if size < len(self._pending) else _NOTHING

    def _keep_partial(self, source: bytearray | memoryview) -> None:
        """The rest of the stream is the start of one frame or marker: keep it for later."""
        if source is not self._buffer:
            self._buffer += source
            self._pending = _NOTHING

    def _top_up(self) -> None:
        """
        Complete the start of a frame or marker kept in ``_buffer`` from what is pending,
        taking no more than it needs: a small frame whole, a large one's header.
        """
        buffer = self._buffer
        if buffer[0] == MARKER_LEAD:
            self._take_into_buffer(MARKER_SIZE + NONCE_SIZE)
            return
        self._take_into_buffer(HEADER_SIZE)
        if len(buffer) >= HEADER_SIZE:
            # Not checked yet (next() does that): a wrong length costs at most one copy.
            _, kind, _, _, length = _HEADER.unpack_from(buffer)
            if length < _ASSEMBLE_ABOVE and kind not in self._pass_through:
                self._take_into_buffer(HEADER_SIZE + length)

    def _take_into_buffer(self, wanted: int) -> None:
        take = wanted - len(self._buffer)
        if take > 0 and self._pending:
            self._buffer += self._pending[:take]
            self._take_pending(take)

    def _fill_payload(self) -> None:
        """Move what is pending, up to the frame's end, into the frame being put together."""
        take = min(len(self._pending), len(self._payload) - self._filled)
        if take:
            with memoryview(self._payload) as payload:
                payload[self._filled : self._filled + take] = self._pending[:take]
            self._filled += take
            self._take_pending(take)

    def _assembled(self) -> Frame | None:
        self._fill_payload()
        if self._filled < len(self._payload):
            return None
        assert self._header is not None
        assembled, request_id, flags = self._header
        # The buffer itself is the payload (a bytes copy would cost as much as the
        # assembly): the decoder lets go of it here and starts a new one next time.
        frame = Frame(assembled, request_id, self._payload, flags)
        self._header = None
        self._payload = bytearray()
        return frame

    def _passed_piece(self) -> Frame | None:
        assert self._passing is not None
        piece: bytes | memoryview
        if self._buffer:  # kept by a feed that came before everything was taken out
            piece = bytes(self._buffer[: self._passing_left])
            del self._buffer[: len(piece)]
        elif self._pending:
            piece = self._pending[: self._passing_left]
            self._take_pending(len(piece))
        else:
            return None
        kind, request_id, flags = self._passing
        self._passing_left -= len(piece)
        if not self._passing_left:
            self._passing = None
        return Frame(kind, request_id, piece, flags)

    def _next_marker(self, source: bytearray | memoryview) -> Marker | None:
        head = bytes(source[:MARKER_SIZE])
        if len(head) < MARKER_SIZE:
            if not any(m.startswith(head) for m in (SYNC_MAGIC, ACK_MAGIC, RESET_MARKER)):
                raise ProtocolError("unknown marker: the stream is out of step")
            self._keep_partial(source)
            return None
        if head == RESET_MARKER:
            self._consume(source, MARKER_SIZE)
            return Marker(head)
        if head not in (SYNC_MAGIC, ACK_MAGIC):
            raise ProtocolError("unknown marker: the stream is out of step")
        if len(source) < MARKER_SIZE + NONCE_SIZE:
            self._keep_partial(source)
            return None
        nonce = bytes(source[MARKER_SIZE : MARKER_SIZE + NONCE_SIZE])
        self._consume(source, MARKER_SIZE + NONCE_SIZE)
        return Marker(head, nonce)

    def hunt(self, magic: bytes, nonce: bytes | None = None) -> bytes | None:
        """
        Discard bytes up to and including the first ``magic`` marker (with ``nonce``, when
        given) and return the marker's nonce; None (keeping only a possible partial marker)
        when there is none yet.  Stale bytes from an earlier peer are dropped this way.
        """
        if self._header is not None:
            # The frame being put together is stale bytes too: search them as well.
            kind, request_id, flags = self._header
            self._buffer[:0] = encode_header(kind, request_id, len(self._payload), flags) + self._payload[
                : self._filled
            ]
            self._header = None
            self._payload = bytearray()
        # The rest of a payload being passed through is stale bytes like any others.
        self._passing = None
        self._keep_pending()
        needle = magic if nonce is None else magic + nonce
        at = self._buffer.find(needle)
        if at < 0:
            # Keep a tail that may be the start of the marker.
            keep = MARKER_SIZE + NONCE_SIZE - 1
            if len(self._buffer) > keep:
                del self._buffer[: len(self._buffer) - keep]
            return None
        end = at + MARKER_SIZE + NONCE_SIZE
        if len(self._buffer) < end:
            del self._buffer[:at]
            return None
        found = bytes(self._buffer[at + MARKER_SIZE : end])
        del self._buffer[:end]
        return found
