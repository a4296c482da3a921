"""
The sans-I/O protocol engine: bytes in, events out; calls in, bytes to send.

:class:`HostConnection` and :class:`AgentConnection` hold everything both ends must agree
on (the resynchronising handshake, version negotiation, request bookkeeping, per-stream
flow control and the hard limits) and nothing about sockets, processes or files, so both
are tested by feeding one's output into the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, cast

from guest_agent.protocol.errors import (
    AuthenticationFailed,
    ErrorCode,
    FrameTooLarge,
    OperationError,
    ProtocolError,
    TooManyRequests,
    UnsupportedProtocolVersion,
    VMControllerError,
    error_from_wire,
)
from guest_agent.protocol.frames import (
    ACK_MAGIC,
    NONCE_SIZE,
    RESET_MARKER,
    SYNC_MAGIC,
    Channel,
    Frame,
    FrameDecoder,
    FrameType,
    Marker,
    encode_header,
    encode_json,
)
from guest_agent.protocol.tls import Authenticator, TLSSession

#: Protocol versions this code speaks, oldest first.  Version 2 is version 1 inside mutually
#: authenticated TLS; version 1 (no authentication) is refused.
SUPPORTED_VERSIONS = (2,)
DEFAULT_MAX_FRAME = 256 * 1024
DEFAULT_WINDOW = 4 * 1024 * 1024
DEFAULT_MAX_INFLIGHT = 64
#: Received stream bytes the application has not read yet, across all requests of a
#: connection; a peer that sends more is cut off (each stream's window bounds its own).
DEFAULT_MAX_BUFFERED = 64 * 1024 * 1024
#: Hard ceilings on what a peer may ask us to accept, whatever it announces.
MAX_WINDOW = 64 * 1024 * 1024
#: The largest TLS frame (ciphertext) either end sends or accepts: four full TLS records.
TLS_FRAME_MAX = 64 * 1024 + 1024
MAX_FRAME = 16 * 1024 * 1024
MAX_INFLIGHT = 4096
#: How much of an error message is kept when the whole would not fit in the peer's frame.
_ERROR_MESSAGE_CUTS = (512, 128, 32, 0)


# ---- events ------------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeComplete:
    version: int
    peer: dict[str, Any]


@dataclass(frozen=True)
class HandshakeFailed:
    error: VMControllerError


@dataclass(frozen=True)
class SessionReset:
    """The peer started over: every request and stream of the old session is gone."""

    reason: str


@dataclass(frozen=True)
class RequestReceived:
    request_id: int
    op: str
    args: dict[str, Any]


@dataclass(frozen=True)
class ResponseReceived:
    request_id: int
    result: Any


@dataclass(frozen=True)
class ErrorReceived:
    """An operation failed (``request_id`` > 0) or the peer rejected the connection (0)."""

    request_id: int
    error: VMControllerError


@dataclass(frozen=True)
class DataReceived:
    request_id: int
    channel: int
    #: A bytearray when its frame was assembled from pieces: the receiver owns it.
    data: bytes | bytearray


@dataclass(frozen=True)
class StreamEnded:
    request_id: int
    channel: int
    trailer: dict[str, Any]


@dataclass(frozen=True)
class WindowOpened:
    """The peer granted credit: more data may be sent on this stream."""

    request_id: int
    channel: int


@dataclass(frozen=True)
class NotificationReceived:
    name: str
    body: dict[str, Any]
    size: int = 0  # of the frame's payload: what decoding it cost


@dataclass(frozen=True)
class CancelRequested:
    request_id: int
    body: dict[str, Any]


@dataclass(frozen=True)
class ProtocolFailure:
    """
    The agent saw a broken stream (or one cut off in the middle of a frame), told the host
    why and went back to hunting for SYNC.
    """

    error: ProtocolError


Event = (
    HandshakeComplete
    | HandshakeFailed
    | SessionReset
    | RequestReceived
    | ResponseReceived
    | ErrorReceived
    | DataReceived
    | StreamEnded
    | WindowOpened
    | NotificationReceived
    | CancelRequested
    | ProtocolFailure
)


@dataclass
class Limits:
    """
    What this side accepts; the peer learns all but ``max_buffered`` in HELLO.

    :ivar max_frame: the largest frame payload accepted.
    :ivar window: bytes a peer may send on one stream before it is given credit.
    :ivar max_inflight: requests the agent serves at once (the host's own is unused).
    :ivar max_buffered: stream bytes received and not yet read by the application, across
        the connection; exceeding it is a protocol violation.
    """

    max_frame: int = DEFAULT_MAX_FRAME
    window: int = DEFAULT_WINDOW
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_buffered: int = DEFAULT_MAX_BUFFERED

    def to_wire(self) -> dict[str, int]:
        return {"max_frame": self.max_frame, "window": self.window, "max_inflight": self.max_inflight}


@dataclass
class _Stream:
    """Flow-control state of one (request, channel) direction."""

    credit: int  # sending: bytes the peer still accepts; receiving: bytes we still accept
    unacknowledged: int = 0  # receiving: consumed bytes not yet granted back
    held: int = 0  # receiving: bytes received and not yet consumed


@dataclass
class _Request:
    sending: dict[int, _Stream] = field(default_factory=dict)
    receiving: dict[int, _Stream] = field(default_factory=dict)


_CHANNELS = frozenset(Channel)


class _InnerFrames:
    """
    The plaintext of a TLS session, cut into frames that are handled as they complete:
    taken out before TLS reuses its buffer, and a large frame's payload decrypted in place.
    """

    __slots__ = ("_connection", "_decoder", "_events")

    def __init__(self, connection: _Connection, events: list[Event]) -> None:
        self._connection = connection
        self._decoder = connection._inner
        self._events = events

    def room(self) -> memoryview | None:
        return self._decoder.room()

    def filled(self, size: int) -> None:
        self._decoder.filled(size)
        self._handle_frames()

    def received(self, plaintext: memoryview) -> None:
        self._decoder.feed(plaintext)
        self._handle_frames()

    def _handle_frames(self) -> None:
        while (item := self._decoder.next()) is not None:
            if isinstance(item, Marker):
                raise ProtocolError("a marker inside the TLS session: only frames may travel there")
            self._connection._handle_frame(item, self._events)


class _Connection:
    """What both ends share: framing, open requests, streams and their credit."""

    def __init__(self, limits: Limits | None, authenticator: Authenticator | None) -> None:
        self.limits = limits or Limits()
        self._authenticator = authenticator
        # The wire: markers, and frames (TLS records once authenticating).  Inside TLS, the
        # plaintext is a stream of frames of its own, cut by ``_inner``.
        # TLS frames pass through in pieces, straight from the read into TLS's own buffer.
        self._decoder = (
            FrameDecoder(TLS_FRAME_MAX, pass_through=frozenset({FrameType.TLS}))
            if authenticator
            else FrameDecoder(self.limits.max_frame)
        )
        self._inner = FrameDecoder(self.limits.max_frame)
        self._tls: TLSSession | None = None
        # What to write, in order: frame headers and payloads as separate pieces, so that
        # a DATA payload is never copied into a frame (the transport writes the pieces).
        self._outgoing: list[bytes | memoryview] = []
        # Frames of the authenticated session waiting to be encrypted, in one batch, when
        # the transport asks for bytes: TLS records are then few and large.
        self._plain: list[bytes | memoryview] = []
        self._requests: dict[int, _Request] = {}
        self._open = False
        # Sum of every receiving stream's ``held``, checked against limits.max_buffered.
        self._buffered = 0
        # The host knows every id it asked: a frame about any other is a violation.  The
        # agent drops them: the host may still stream to a request the agent has ended.
        self._unknown_ids_are_violations = False
        # Learnt from the peer's HELLO.
        self.version = 0
        self.peer_limits = Limits()

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def tls_cipher(self) -> str | None:
        """The session's TLS cipher suite; None before the handshake or in development mode."""
        return self._tls.cipher if self.authenticated and self._tls is not None else None

    @property
    def authenticated(self) -> bool:
        """The session runs inside TLS with the pinned peer (False in development mode)."""
        return self._tls is not None and self._tls.established

    @property
    def open_requests(self) -> int:
        return len(self._requests)

    @property
    def partial_frame_bytes(self) -> int:
        """Bytes of a frame or marker that has begun and not yet arrived whole."""
        return self._decoder.buffered + self._inner.buffered  # inside TLS: the frame inside

    @property
    def buffered(self) -> int:
        """Stream bytes received and not yet consumed, plus a partial frame's bytes."""
        return self._buffered + self.partial_frame_bytes

    def data_to_send(self) -> bytes:
        """Bytes the transport must write, in order; the buffer is emptied."""
        return b"".join(self.pieces_to_send())

    def pieces_to_send(self) -> list[bytes | memoryview]:
        """
        What :meth:`data_to_send` returns, as the pieces it is made of (for a vectored
        write that spares joining them); the buffer is emptied.
        """
        self._seal()
        pieces, self._outgoing = self._outgoing, []
        return pieces

    def _send(
        self, frame_type: FrameType, request_id: int, payload: bytes | memoryview, flags: int = 0
    ) -> None:
        """Queue a frame: inside TLS once a session is authenticated, on the wire before."""
        length = len(payload)
        if length > self.peer_limits.max_frame:
            raise FrameTooLarge(
                f"a {frame_type.name} of {length} bytes exceeds the peer's frame limit of "
                f"{self.peer_limits.max_frame} bytes: stream large data instead"
            )
        queue = self._plain if self.authenticated else self._outgoing
        queue.append(encode_header(frame_type, request_id, length, flags))
        if length:
            queue.append(payload)

    def _send_plaintext_error(self, error: ProtocolError, details: dict[str, Any] | None = None) -> None:
        """
        A connection-level ERROR on the wire, outside TLS: the peer may have no session (a
        refused handshake) or a broken one (a tampered record) to read it through.
        """
        payload = _error_payload(error.code, str(error), details)
        self._outgoing.append(encode_header(FrameType.ERROR, 0, len(payload)))
        self._outgoing.append(payload)

    def _seal(self) -> None:
        """Encrypt the frames waiting in ``_plain`` into TLS frames on the wire."""
        if self._plain and self._tls is not None:
            plain, self._plain = self._plain, []
            for records in self._tls.seal(plain):
                self._outgoing.append(encode_header(FrameType.TLS, 0, len(records)))
                self._outgoing.append(records)

    def _emit_tls(self) -> None:
        """Put what TLS has to say by itself (handshake messages, alerts) on the wire."""
        if self._tls is None:
            return
        records = self._tls.ciphertext()
        if not records:
            return
        view = memoryview(records)
        for start in range(0, len(records), TLS_FRAME_MAX):
            piece = view[start : start + TLS_FRAME_MAX]
            self._outgoing.append(encode_header(FrameType.TLS, 0, len(piece)))
            self._outgoing.append(piece)

    def _reset_session(self) -> None:
        self._requests.clear()
        self._buffered = 0
        self._open = False
        self.version = 0
        self._tls = None
        self._plain.clear()
        self._inner.clear()

    def _start_tls(self) -> None:
        """A new TLS session for a new protocol session (never resumed: see ``tls.py``)."""
        assert self._authenticator is not None
        self._tls = self._authenticator.session()

    def _open_tls_frame(self, frame: Frame, events: list[Event]) -> bool:
        """
        Decrypt a TLS frame and handle the frames inside it.  True when this completed the
        handshake just now.

        :raises AuthenticationFailed: the handshake failed.
        :raises TamperingDetected: a record did not verify.
        """
        if self._tls is None:
            raise ProtocolError("a TLS frame before the handshake started")
        if frame.request_id:
            raise ProtocolError(
                f"a TLS frame carries request id {frame.request_id}: TLS frames belong to the "
                "connection (id 0); dropped the session"
            )
        was_established = self._tls.established
        self._tls.receive(frame.payload, _InnerFrames(self, events))
        self._emit_tls()
        return self._tls.established and not was_established

    def _handle_frame(self, frame: Frame, events: list[Event]) -> None:
        raise NotImplementedError

    def _require_open(self) -> None:
        if not self._open:
            raise ProtocolError("no session: the handshake has not completed")

    # -- streams ------------------------------------------------------------------

    def send_data(self, request_id: int, channel: int, data: bytes | memoryview) -> int:
        """
        Queue as much of ``data`` as the peer's window allows, in frames no larger than
        its limit.  Returns how many bytes were taken; send the rest after a
        :class:`WindowOpened` for this stream.  Data for a finished request is dropped
        (the peer has stopped listening) and counted as taken.
        """
        self._require_open()
        request = self._requests.get(request_id)
        if request is None:
            return len(data)
        stream = request.sending.get(channel)
        if stream is None:
            stream = request.sending[channel] = _Stream(self.peer_limits.window)
        taken = min(len(data), stream.credit)
        view = memoryview(data)[:taken]
        # Slices of immutable bytes are queued as they are; anything else (a bytearray the
        # caller may reuse) is copied once.
        keep = isinstance(view.obj, bytes)
        step = self.peer_limits.max_frame
        for start in range(0, taken, step):
            piece = view[start : start + step]
            self._send(FrameType.DATA, request_id, piece if keep else bytes(piece), channel)
        stream.credit -= taken
        return taken

    def send_credit_available(self, request_id: int, channel: int) -> int:
        """How many bytes :meth:`send_data` would take now."""
        request = self._requests.get(request_id)
        if request is None:
            return 0
        stream = request.sending.get(channel)
        return self.peer_limits.window if stream is None else stream.credit

    def send_eof(self, request_id: int, channel: int, trailer: dict[str, Any] | None = None) -> None:
        self._require_open()
        if request_id in self._requests:
            self._send(FrameType.EOF, request_id, encode_json(trailer) if trailer else b"", channel)

    def consumed(self, request_id: int, channel: int, count: int) -> None:
        """
        Tell the engine the application has dealt with ``count`` received bytes, so the
        peer may send more.  Credit goes back in batches of a quarter window, to keep
        CREDIT frames rare.
        """
        request = self._requests.get(request_id)
        if request is None or not self._open:
            return
        stream = request.receiving.get(channel)
        if stream is None:
            return
        count = min(count, stream.held)
        stream.held -= count
        self._buffered -= count
        stream.unacknowledged += count
        if stream.unacknowledged >= self.limits.window // 4:
            grant, stream.unacknowledged = stream.unacknowledged, 0
            stream.credit += grant
            self._send(FrameType.CREDIT, request_id, grant.to_bytes(4, "big"), channel)

    def _forget(self, request_id: int) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            self._buffered -= sum(stream.held for stream in request.receiving.values())

    # -- receiving ----------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> list[Event]:
        self._decoder.feed(data)
        events: list[Event] = []
        self._process(events)
        return events

    def _process(self, events: list[Event]) -> None:
        raise NotImplementedError

    def _handle_common(self, frame: Frame, events: list[Event]) -> bool:
        """Stream frames, shared by both roles; False when the frame is not one of them."""
        if frame.type in (FrameType.DATA, FrameType.EOF, FrameType.CREDIT) and frame.flags not in _CHANNELS:
            raise ProtocolError(f"{frame.type.name} frame names unknown channel {frame.flags}")
        if frame.type in (FrameType.DATA, FrameType.EOF, FrameType.CREDIT):
            self._check_known(frame)
        if frame.type is FrameType.DATA:
            request = self._requests.get(frame.request_id)
            if request is None:
                return True  # a late chunk for a request that already ended
            stream = request.receiving.get(frame.flags)
            if stream is None:
                stream = request.receiving[frame.flags] = _Stream(self.limits.window)
            if len(frame.payload) > stream.credit:
                raise ProtocolError(
                    f"peer sent {len(frame.payload)} bytes on request {frame.request_id} "
                    f"channel {frame.flags} with only {stream.credit} bytes of window left"
                )
            if self._buffered + len(frame.payload) > self.limits.max_buffered:
                raise ProtocolError(
                    f"peer sent more than {self.limits.max_buffered} bytes that are not read yet "
                    "across the connection's streams (the limit max_buffered)"
                )
            stream.credit -= len(frame.payload)
            stream.held += len(frame.payload)
            self._buffered += len(frame.payload)
            # Only TLS frames pass through the decoder as views; a DATA payload is its own.
            payload = cast(bytes | bytearray, frame.payload)
            events.append(DataReceived(frame.request_id, frame.flags, payload))
        elif frame.type is FrameType.EOF:
            if frame.request_id in self._requests:
                trailer = frame.json()
                if not isinstance(trailer, dict):
                    raise ProtocolError("EOF trailer must be a JSON object")
                events.append(StreamEnded(frame.request_id, frame.flags, trailer))
        elif frame.type is FrameType.CREDIT:
            if len(frame.payload) != 4:
                raise ProtocolError("CREDIT frame must carry a 4-byte count")
            request = self._requests.get(frame.request_id)
            if request is not None:
                grant = int.from_bytes(frame.payload, "big")
                stream = request.sending.setdefault(frame.flags, _Stream(self.peer_limits.window))
                if stream.credit + grant > MAX_WINDOW:
                    raise ProtocolError("peer granted more credit than any window allows")
                stream.credit += grant
                events.append(WindowOpened(frame.request_id, frame.flags))
        else:
            return False
        return True

    def _check_known(self, frame: Frame) -> None:
        if self._unknown_ids_are_violations and frame.request_id not in self._requests:
            raise ProtocolError(
                f"peer sent {frame.type.name} for request {frame.request_id}, which is not in flight"
            )

    def _accept_peer_limits(self, hello: dict[str, Any]) -> None:
        values = [hello.get(name) for name in ("max_frame", "window", "max_inflight")]
        # bool is an int, and int() would take "5", 1.5 and (with OverflowError) 1e308.
        if not all(type(value) is int for value in values):
            raise ProtocolError("HELLO must give max_frame, window and max_inflight as integers")
        peer = Limits(*cast(list[int], values))
        if not (
            1024 <= peer.max_frame <= MAX_FRAME
            and 1024 <= peer.window <= MAX_WINDOW
            and 1 <= peer.max_inflight <= MAX_INFLIGHT
        ):
            raise ProtocolError(f"HELLO announces unusable limits {peer.to_wire()}")
        self.peer_limits = peer


def _error_payload(
    code: ErrorCode | str, message: str, details: dict[str, Any] | None = None, limit: int | None = None
) -> bytes:
    """
    An ERROR frame's payload; over ``limit`` bytes (a message that quotes a huge argument),
    the details are dropped and the message cut, so that the error still reaches the peer.
    """
    payload = encode_json({"code": str(code), "message": message, "details": details or {}})
    # Escaped non-ASCII takes up to 12 bytes a character: shorter cuts until one fits (the
    # last, without the message, fits any frame limit a HELLO may announce).
    for keep in _ERROR_MESSAGE_CUTS:
        if limit is None or len(payload) <= limit:
            break
        cut = f"{message[:keep]}... ({len(message)} characters, cut to fit a frame)"
        payload = encode_json({"code": str(code), "message": cut, "details": {}})
    return payload


def _unauthenticated(frame: Frame, sender: str) -> ProtocolError:
    return ProtocolError(
        f"the {sender} sent a {frame.type.name} frame outside TLS on an authenticated channel: "
        f"dropped the session (something other than the {sender} may be writing to the channel)"
    )


def _decode_error(frame: Frame) -> VMControllerError:
    body = frame.json()
    if not isinstance(body, dict) or not isinstance(body.get("code"), str):
        raise ProtocolError("ERROR frame must carry a JSON object with a code")
    details = body.get("details")
    return error_from_wire(
        body["code"], str(body.get("message", "")), details if isinstance(details, dict) else {}
    )


class HostConnection(_Connection):
    """
    The host's end: it starts every session with SYNC, offers its versions in HELLO and
    sends requests.

    :param versions: protocol versions to offer (tests offer unsupported ones).
    :param authenticator: the host's end of this VM's credentials; None only in
        development mode, where nothing is authenticated or protected.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        hello_extra: dict[str, Any] | None = None,
        *,
        authenticator: Authenticator | None,
    ) -> None:
        super().__init__(limits, authenticator)
        self._unknown_ids_are_violations = True
        self._versions = versions
        self._hello_extra = hello_extra or {}
        self._nonce: bytes | None = None
        self._handshaking = False  # TLS, between the ACK and HELLO
        self._awaiting_hello = False
        self._next_id = 1

    def start(self) -> None:
        """(Re)start a session: discard all state and ask the agent to resynchronise."""
        self._reset_session()
        self._decoder.clear()
        self._outgoing.clear()
        self._nonce = os.urandom(NONCE_SIZE)
        self._handshaking = self._awaiting_hello = False
        self._outgoing.append(SYNC_MAGIC + self._nonce)

    def _send_hello(self) -> None:
        self._awaiting_hello = True
        hello = {"versions": list(self._versions), **self.limits.to_wire(), **self._hello_extra}
        self._send(FrameType.HELLO, 0, encode_json(hello))

    def _fail_handshake(self, error: VMControllerError, events: list[Event]) -> None:
        """The agent could not be authenticated (or refused us): this session is over."""
        self._emit_tls()  # the alert telling the agent why, if TLS has one
        self._nonce = None
        self._handshaking = self._awaiting_hello = False
        self._tls = None
        self._decoder.clear()
        events.append(HandshakeFailed(error))

    def send_request(self, op: str, args: dict[str, Any] | None = None) -> int:
        """Send a request and return its id, which every later event about it carries."""
        self._require_open()
        if len(self._requests) >= self.peer_limits.max_inflight:
            raise TooManyRequests(
                f"{len(self._requests)} operations are in flight, the agent's limit is "
                f"{self.peer_limits.max_inflight}: wait for some to finish"
            )
        request_id = self._next_id
        while request_id in self._requests:  # wrapped around onto a request still in flight
            request_id = request_id % 0xFFFFFFFF + 1
        # Sent before the request is registered: one too large for the agent's frame
        # limit raises here and must not hold an in-flight slot.
        self._send(FrameType.REQUEST, request_id, encode_json({"op": op, "args": args or {}}))
        self._next_id = request_id % 0xFFFFFFFF + 1
        self._requests[request_id] = _Request()
        return request_id

    def send_cancel(self, request_id: int, body: dict[str, Any] | None = None) -> None:
        self._require_open()
        if request_id in self._requests:
            self._send(FrameType.CANCEL, request_id, encode_json(body or {}))

    def _process(self, events: list[Event]) -> None:
        while True:
            if self._nonce is None:
                self._decoder.clear()  # nothing is expected before start()
                return
            if not (self._open or self._awaiting_hello or self._handshaking):
                if self._decoder.hunt(ACK_MAGIC, self._nonce) is None:
                    return
                if self._authenticator is None:
                    self._send_hello()
                else:
                    self._handshaking = True
                    self._start_tls()
                    assert self._tls is not None
                    self._tls.start()
                    self._emit_tls()
                continue
            item = self._decoder.next()
            if item is None:
                return
            if isinstance(item, Marker):
                if item.magic == ACK_MAGIC:
                    continue  # a repeated ACK for a SYNC sent again while waiting
                if item.magic == RESET_MARKER:
                    self._nonce = None
                    self._reset_session()
                    self._decoder.clear()
                    events.append(SessionReset("the agent restarted"))
                    return
                raise ProtocolError("the agent sent SYNC, which only the host may send")
            if self._authenticator is None:
                self._handle_frame(item, events)
            else:
                self._handle_wire_frame(item, events)

    def _handle_wire_frame(self, frame: Frame, events: list[Event]) -> None:
        """What may come outside TLS when authenticating: TLS records, or a plaintext refusal."""
        if frame.type is FrameType.TLS:
            try:
                if self._open_tls_frame(frame, events) and self._handshaking:
                    self._handshaking = False
                    self._send_hello()
            except AuthenticationFailed as e:
                if not (self._handshaking or self._awaiting_hello):
                    raise
                self._fail_handshake(e, events)
            return
        if frame.type is FrameType.ERROR and frame.request_id == 0:
            error = _decode_error(frame)
            if not self._handshaking:
                events.append(ErrorReceived(0, error))  # e.g. the agent saw a tampered record
            elif type(error) is ProtocolError:
                # What an agent of protocol 1 answers to a TLS frame, a type it does not know.
                self._fail_handshake(
                    UnsupportedProtocolVersion(
                        f"the agent does not speak the authenticated protocol (version "
                        f"{max(self._versions)}): it answered {error}. Install the current "
                        "vmcontroller agent in the guest"
                    ),
                    events,
                )
            else:
                self._fail_handshake(error, events)
            return
        if frame.type is FrameType.HELLO and self._handshaking:
            self._fail_handshake(
                AuthenticationFailed(
                    "the agent answered without authentication: it runs in development mode, or "
                    "something else answers in its place. Refused; give the agent its credentials "
                    "(or run both ends in development mode, for development only)"
                ),
                events,
            )
            return
        raise _unauthenticated(frame, "agent")

    def _handle_frame(self, frame: Frame, events: list[Event]) -> None:
        if self._awaiting_hello:
            if frame.type is FrameType.HELLO:
                hello = frame.json()
                version = hello.get("version") if isinstance(hello, dict) else None
                if type(version) is not int or version not in self._versions:
                    raise ProtocolError(f"agent chose a version the host did not offer: {version!r}")
                self._accept_peer_limits(hello)
                self.version = hello["version"]
                self._awaiting_hello = False
                self._open = True
                events.append(HandshakeComplete(self.version, hello))
            elif frame.type is FrameType.ERROR and frame.request_id == 0:
                self._awaiting_hello = False
                self._nonce = None
                events.append(HandshakeFailed(_decode_error(frame)))
            else:
                raise ProtocolError(f"expected HELLO from the agent, got {frame.type.name}")
            return
        if self._handle_common(frame, events):
            return
        if frame.type is FrameType.RESPONSE:
            self._check_known(frame)
            result = frame.json()
            self._forget(frame.request_id)
            events.append(ResponseReceived(frame.request_id, result))
        elif frame.type is FrameType.ERROR:
            error = _decode_error(frame)
            if frame.request_id == 0:
                events.append(ErrorReceived(0, error))
            else:
                self._check_known(frame)
                self._forget(frame.request_id)
                events.append(ErrorReceived(frame.request_id, error))
        elif frame.type is FrameType.NOTIFY:
            body = frame.json()
            if (
                not isinstance(body, dict)
                or not isinstance(body.get("name"), str)
                or not isinstance(body.get("body", {}), dict)
            ):
                raise ProtocolError("NOTIFY must carry a JSON object with a name and an object body")
            events.append(NotificationReceived(body["name"], body.get("body") or {}, len(frame.payload)))
        else:
            raise ProtocolError(f"the agent may not send {frame.type.name}")


class AgentConnection(_Connection):
    """
    The agent's end: it hunts for the host's SYNC, answers HELLO and serves requests.
    A broken stream never ends it: it reports the error to the host and hunts again; so
    does a failed authentication.

    :param authenticator: the agent's end of this VM's credentials; None only in
        development mode, where any host that reaches the channel is served.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        hello_extra: dict[str, Any] | None = None,
        *,
        authenticator: Authenticator | None,
    ) -> None:
        super().__init__(limits, authenticator)
        self._versions = versions
        self._hello_extra = hello_extra or {}
        self._synced = False

    def announce_restart(self) -> None:
        """Tell a host that may still hold a session with an earlier agent that it is gone."""
        self._outgoing.append(RESET_MARKER)

    def host_disconnected(self) -> None:
        """The transport says the host went away: drop the session, keep nothing buffered."""
        self._reset_session()
        self._synced = False
        self._decoder.clear()
        self._outgoing.clear()

    @property
    def holds_partial_frame(self) -> bool:
        """A frame (or marker) from the host has begun and not yet arrived whole."""
        return self._synced and (self._decoder.buffered > 0 or self._inner.buffered > 0)

    def line_idle(self) -> list[Event]:
        """
        The transport says no byte has arrived for a while.  A host writes each frame
        whole, so a frame begun and not finished means its writer is gone, which a serial
        tty never reports: drop the partial frame, tell the host why and hunt for SYNC, as
        after a broken stream.  Without a partial frame nothing happens.
        """
        events: list[Event] = []
        if self.holds_partial_frame:
            error = ProtocolError(
                f"the host stopped sending in the middle of a frame ({self._decoder.buffered} "
                "bytes of it arrived): dropped it"
            )
            self._resynchronise(error, events)
        return events

    def send_response(self, request_id: int, result: Any = None) -> None:
        """Send the result; one too large for a frame becomes a ``result-too-large`` error."""
        if request_id in self._requests:
            self._forget(request_id)
            try:
                self._send(FrameType.RESPONSE, request_id, encode_json(result))
            except FrameTooLarge as e:
                self._send_error(request_id, ErrorCode.RESULT_TOO_LARGE, str(e))

    def send_error(self, request_id: int, error: OperationError) -> None:
        if request_id in self._requests:
            self._forget(request_id)
            self._send_error(request_id, error.code, error.message, error.details)

    def _send_error(
        self, request_id: int, code: ErrorCode, message: str, details: dict[str, Any] | None = None
    ) -> None:
        payload = _error_payload(code, message, details, self.peer_limits.max_frame)
        self._send(FrameType.ERROR, request_id, payload)

    def send_notification(self, name: str, body: dict[str, Any] | None = None) -> None:
        if self._open:
            self._send(FrameType.NOTIFY, 0, encode_json({"name": name, "body": body or {}}))

    def _process(self, events: list[Event]) -> None:
        while True:
            if not self._synced:
                nonce = self._decoder.hunt(SYNC_MAGIC)
                if nonce is None:
                    return
                self._synced_with(nonce, events)
                continue
            try:
                item = self._decoder.next()
                if item is None:
                    return
                if isinstance(item, Marker):
                    if item.magic != SYNC_MAGIC:
                        raise ProtocolError("the host sent a marker only the agent may send")
                    self._synced_with(item.nonce, events)
                    continue
                if self._authenticator is None:
                    self._handle_frame(item, events)
                else:
                    self._handle_wire_frame(item)
                    self._open_tls_frame(item, events)
            except ProtocolError as e:
                self._resynchronise(e, events)

    def _handle_wire_frame(self, frame: Frame) -> None:
        """Only TLS frames may come outside TLS when authenticating: refuse anything else."""
        if frame.type is FrameType.TLS:
            return
        if frame.type is FrameType.HELLO and not self._open:
            hello = frame.json()
            offered = hello.get("versions") if isinstance(hello, dict) else None
            versions = [v for v in offered if isinstance(v, int)] if isinstance(offered, list) else []
            if max(versions, default=0) < min(self._versions):
                raise UnsupportedProtocolVersion(
                    f"the host offered protocol versions {offered!r} without authentication; this "
                    f"agent speaks {list(self._versions)}, mutually authenticated only: upgrade "
                    "vmcontroller on the host"
                )
            raise AuthenticationFailed(
                "the host sent an unauthenticated HELLO and this agent requires authentication: "
                "the host runs in development mode, or something else is impersonating it"
            )
        raise _unauthenticated(frame, "host")

    def _resynchronise(self, error: ProtocolError, events: list[Event]) -> None:
        """Tell the host why (outside TLS, which may be broken), then hunt for the next SYNC."""
        if self._tls is not None and not self._tls.established:
            self._emit_tls()  # the handshake's alert, which tells a TLS stack why
        self._reset_session()
        unsupported = isinstance(error, UnsupportedProtocolVersion)
        self._send_plaintext_error(error, {"supported": list(self._versions)} if unsupported else None)
        self._synced = False
        self._decoder.clear()
        events.append(ProtocolFailure(error))

    def _synced_with(self, nonce: bytes, events: list[Event]) -> None:
        had_session = self._open  # requests exist only in an open session
        self._reset_session()
        self._synced = True
        self._outgoing.append(ACK_MAGIC + nonce)
        if self._authenticator is not None:
            self._start_tls()  # the host's ClientHello comes next
        if had_session:
            events.append(SessionReset("the host started a new session"))

    def _handle_frame(self, frame: Frame, events: list[Event]) -> None:
        if not self._open:
            if frame.type is FrameType.TLS and self._authenticator is None:
                raise AuthenticationFailed(
                    "the host wants to authenticate and this agent runs in development mode, "
                    "without credentials: give the agent its credentials (or run the host in "
                    "development mode too, for development only)"
                )
            if frame.type is not FrameType.HELLO:
                raise ProtocolError(f"expected HELLO from the host, got {frame.type.name}")
            hello = frame.json()
            offered = hello.get("versions") if isinstance(hello, dict) else None
            if not isinstance(offered, list) or not all(type(v) is int for v in offered):
                raise ProtocolError("HELLO must list the host's versions as integers")
            common = set(offered) & set(self._versions)
            if not common:
                message = (
                    f"the host speaks protocol versions {sorted(offered)} and this agent speaks "
                    f"{list(self._versions)}: install a matching vmcontroller agent in the guest"
                )
                self._send_error(
                    0, ErrorCode.UNSUPPORTED_VERSION, message, {"supported": list(self._versions)}
                )
                self._synced = False  # the host must SYNC again to retry
                return
            self._accept_peer_limits(hello)
            self.version = max(common)
            self._open = True
            reply = {"version": self.version, **self.limits.to_wire(), **self._hello_extra}
            self._send(FrameType.HELLO, 0, encode_json(reply))
            events.append(HandshakeComplete(self.version, hello))
            return
        if frame.type is FrameType.REQUEST:
            self._handle_request(frame, events)
        elif self._handle_common(frame, events):
            return
        elif frame.type is FrameType.CANCEL:
            if frame.request_id in self._requests:
                body = frame.json()
                events.append(CancelRequested(frame.request_id, body if isinstance(body, dict) else {}))
        else:
            raise ProtocolError(f"the host may not send {frame.type.name} in a session")

    def _handle_request(self, frame: Frame, events: list[Event]) -> None:
        if frame.request_id == 0 or frame.request_id in self._requests:
            raise ProtocolError(f"request id {frame.request_id} is zero or already in flight")
        body = frame.json()
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("op"), str)
            or not isinstance(body.get("args", {}), dict)
        ):
            message = "a request must be a JSON object with 'op' and 'args'"
            self._send_error(frame.request_id, ErrorCode.BAD_REQUEST, message)
            return
        if len(self._requests) >= self.limits.max_inflight:
            self._send_error(
                frame.request_id,
                ErrorCode.TOO_MANY_REQUESTS,
                f"{len(self._requests)} operations are in flight, the agent's limit is "
                f"{self.limits.max_inflight}: wait for some to finish",
            )
            return
        self._requests[frame.request_id] = _Request()
        events.append(RequestReceived(frame.request_id, body["op"], body.get("args", {})))


__all__ = [
    "SUPPORTED_VERSIONS",
    "AgentConnection",
    "CancelRequested",
    "DataReceived",
    "ErrorReceived",
    "Event",
    "FrameTooLarge",
    "HandshakeComplete",
    "HandshakeFailed",
    "HostConnection",
    "Limits",
    "NotificationReceived",
    "ProtocolFailure",
    "RequestReceived",
    "ResponseReceived",
    "SessionReset",
    "StreamEnded",
    "UnsupportedProtocolVersion",
    "WindowOpened",
]
