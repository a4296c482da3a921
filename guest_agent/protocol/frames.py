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
    #: A bytearray when the frame was assembled from pieces (see FrameDecoder).
    payload: bytes | bytearray = b""
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


def decode_json(payload: bytes | bytearray) -> Any:
    """
    ``json.loads`` for a UTF-8 payload.

    :raises ValueError: not one JSON value (``json.loads`` says why), NaN or Infinity, or
        nested deeper than the interpreter's recursion limit.
    """
    try:
        try:
            text = payload.decode()
            value, end = _scan(text, 0)
            if end == len(text):
                return value
        except (StopIteration, ValueError):  # UnicodeDecodeError is a ValueError
            pass
        # Whitespace around the value, another encoding, or an error for json.loads to explain.
        return json.loads(payload, parse_constant=_reject_constant, parse_float=_finite_float)
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


class FrameDecoder:
    """
    Cuts a byte stream into frames and markers.

    :param max_payload: the largest payload this side accepts; a header announcing more
        raises :class:`FrameTooLarge` before any of the payload is buffered.
    """

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        # A large frame that arrives in pieces is put together in a buffer of its size:
        # appending each piece to ``_buffer`` would copy all of it again whenever the
        # bytearray grows, many times per frame (memory copies are slow under emulation).
        self._header: tuple[FrameType, int, int] | None = None  # type, request id, flags
        self._payload = bytearray()
        self._filled = 0

    def feed(self, data: bytes | memoryview) -> None:
        if self._header is not None:
            take = min(len(data), len(self._payload) - self._filled)
            with memoryview(self._payload) as payload:
                payload[self._filled : self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
        if data:
            self._buffer += data

    def clear(self) -> None:
        self._buffer.clear()
        self._header = None
        self._payload = bytearray()

    @property
    def buffered(self) -> int:
        """
        How many bytes are held; once :meth:`next` returned None, those of a frame or
        marker that has begun and not yet arrived whole.
        """
        if self._header is None:
            return len(self._buffer)
        return HEADER_SIZE + self._filled + len(self._buffer)

    def next(self) -> Frame | Marker | None:
        """
        The next complete frame or marker, or None until more bytes arrive.

        :raises ProtocolError: the bytes at a frame boundary are neither a frame nor a
            marker; the caller must resynchronise.
        """
        if self._header is not None:
            if self._filled < len(self._payload):
                return None
            assembled, request_id, flags = self._header
            # The buffer itself is the payload (a bytes copy would cost as much as the
            # assembly): the decoder lets go of it here and starts a new one next time.
            frame = Frame(assembled, request_id, self._payload, flags)
            self._header = None
            self._payload = bytearray()
            return frame
        buf = self._buffer
        if not buf:
            return None
        if buf[0] == MARKER_LEAD:
            return self._next_marker()
        if len(buf) < HEADER_SIZE:
            if not FRAME_MAGIC.startswith(bytes(buf[:2])):
                raise ProtocolError(f"expected a frame, got byte 0x{buf[0]:02x}: the stream is out of step")
            return None
        magic, frame_type, flags, request_id, length = _HEADER.unpack_from(buf)
        (crc,) = _CRC.unpack_from(buf, _HEADER.size)
        with memoryview(buf) as view:
            header_crc = zlib.crc32(view[: _HEADER.size])
        if magic != FRAME_MAGIC or crc != header_crc:
            raise ProtocolError("corrupt frame header: the stream is out of step")
        if length > self.max_payload:
            raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self.max_payload} bytes")
        kind = _FRAME_TYPES.get(frame_type)
        if kind is None:
            raise ProtocolError(f"unknown frame type {frame_type}")
        end = HEADER_SIZE + length
        if len(buf) < end:
            if length >= _ASSEMBLE_ABOVE:
                # Allocated before the payload arrives: at most max_payload, checked above.
                self._header = (kind, request_id, flags)
                self._payload = bytearray(length)
                self._filled = len(buf) - HEADER_SIZE
                self._payload[: self._filled] = buf[HEADER_SIZE:]
                buf.clear()
            return None
        # One copy, straight out of the buffer (slicing the bytearray first would copy twice);
        # deleting the head of a bytearray only moves its start, it does not shift the rest.
        with memoryview(buf) as view:
            payload = bytes(view[HEADER_SIZE:end])
        del buf[:end]
        return Frame(kind, request_id, payload, flags)

    def _next_marker(self) -> Marker | None:
        buf = self._buffer
        head = bytes(buf[:MARKER_SIZE])
        if len(head) < MARKER_SIZE:
            if not any(m.startswith(head) for m in (SYNC_MAGIC, ACK_MAGIC, RESET_MARKER)):
                raise ProtocolError("unknown marker: the stream is out of step")
            return None
        if head == RESET_MARKER:
            del buf[:MARKER_SIZE]
            return Marker(head)
        if head not in (SYNC_MAGIC, ACK_MAGIC):
            raise ProtocolError("unknown marker: the stream is out of step")
        if len(buf) < MARKER_SIZE + NONCE_SIZE:
            return None
        nonce = bytes(buf[MARKER_SIZE : MARKER_SIZE + NONCE_SIZE])
        del buf[: MARKER_SIZE + NONCE_SIZE]
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
