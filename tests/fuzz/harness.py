"""
A host engine and an agent engine joined by two byte pipes, driven by a script of steps
(honest calls of either side, partial deliveries, and injected frames or junk), checking
after every step what must always hold.

Two modes: development (no authentication, frames in the clear) and TLS (both ends with
real credentials, minted once per process).  In TLS mode a hostile step's frame travels
inside its sender's own TLS session when it has one, sealed validly, because the guest is
hostile and holds its VM's credentials; records no one sealed, flipped bits and a closed
TLS session attack the layer below.

The hypothesis properties (tests/unit/test_engine_properties.py) and the atheris target
(tests/fuzz/fuzz_protocol.py) both drive it: hypothesis draws the steps, atheris decodes
them from its input.  A step that breaks a rule raises :class:`Violation`; any exception
other than that, or than the host's :class:`ProtocolError`, is a bug in an engine.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections import defaultdict
from dataclasses import dataclass, field

from guest_agent.protocol.connection import (
    MAX_WINDOW,
    AgentConnection,
    CancelRequested,
    DataReceived,
    ErrorReceived,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    HostConnection,
    Limits,
    NotificationReceived,
    ProtocolFailure,
    RequestReceived,
    ResponseReceived,
    SessionReset,
    StreamEnded,
    WindowOpened,
    _Connection,
)
from guest_agent.protocol.errors import (
    FrameTooLarge,
    PathNotFound,
    ProtocolError,
    TamperingDetected,
    TooManyRequests,
)
from guest_agent.protocol.frames import (
    ACK_MAGIC,
    HEADER_SIZE,
    MARKER_SIZE,
    NONCE_SIZE,
    SYNC_MAGIC,
    Channel,
    FrameType,
    encode_frame,
)
from guest_agent.protocol.tls import (
    RECORD_CIPHERTEXT_MAX,
    RECORD_HEADER_SIZE,
    Authenticator,
    TLSSession,
)
from vmcontroller.credentials import mint

HOST, AGENT = "host", "agent"


class Violation(AssertionError):
    """An engine broke one of the rules this harness checks."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise Violation(message)


@dataclass
class Step:
    """
    One thing that happens.  ``kind`` is one of :data:`KINDS`; the other fields are used by
    the kinds that need them (a ``slot`` picks one of the requests in flight, modulo their
    number; ``size`` is a byte count; ``side`` is who acts or who receives).
    """

    kind: str
    side: str = HOST
    slot: int = 0
    channel: int = 0
    size: int = 0
    frame_type: int = 1
    flags: int = 0
    request_id: int = 0
    payload: bytes = b""


#: Honest steps: what the engines' users may do.
HONEST_KINDS = (
    "start",
    "deliver",
    "request",
    "send",
    "eof",
    "consume",
    "cancel",
    "respond",
    "error",
    "notify",
)
#: Steps of a broken or hostile peer.
HOSTILE_KINDS = ("inject", "frame", "restart", "idle", "ack", "sync", "record", "flip", "close")
KINDS = HONEST_KINDS + HOSTILE_KINDS


@dataclass
class _Side:
    engine: _Connection
    #: Bytes written by this side that the other has not received yet.
    outbox: bytearray = field(default_factory=bytearray)
    #: Requests in flight as this side's events told them, in order of arrival.
    inflight: list[int] = field(default_factory=list)
    #: Honest bytes sent and received per (request, channel), for the end-to-end check.
    sent: dict[tuple[int, int], bytearray] = field(default_factory=lambda: defaultdict(bytearray))
    received: dict[tuple[int, int], bytearray] = field(default_factory=lambda: defaultdict(bytearray))
    #: Received bytes the application has reported consumed, per (request, channel).
    consumed: dict[tuple[int, int], int] = field(default_factory=lambda: defaultdict(int))
    #: The TLS session this side closed itself (a hostile step): it can seal nothing more.
    closed: TLSSession | None = None

    def forget_all(self) -> None:
        self.inflight.clear()
        for streams in (self.sent, self.received, self.consumed):
            streams.clear()

    def forget(self, request_id: int) -> None:
        self.inflight.remove(request_id)
        for streams in (self.sent, self.received, self.consumed):
            for key in [key for key in streams if key[0] == request_id]:
                del streams[key]


@functools.cache
def authenticators() -> tuple[Authenticator, Authenticator]:
    """The host's and the agent's ends of one VM's credentials, minted once per process."""
    host, agent = mint()
    return (
        Authenticator.from_credentials(host, server_side=False),
        Authenticator.from_credentials(agent, server_side=True),
    )


class Duel:
    """
    A host and an agent engine, both real, and the pipes between them.

    :param tls: both ends authenticate with this process's test credentials; False is
        development mode, where frames travel in the clear.
    """

    def __init__(self, host_limits: Limits, agent_limits: Limits, *, tls: bool = False) -> None:
        host_authenticator, agent_authenticator = authenticators() if tls else (None, None)
        self.host = _Side(HostConnection(host_limits, authenticator=host_authenticator))
        self.agent = _Side(AgentConnection(agent_limits, authenticator=agent_authenticator))
        #: Set once a step injected anything dishonest: end-to-end data checks stop holding.
        self.tampered = False
        self.host_errors = 0

    @classmethod
    def opened(cls, host_limits: Limits, agent_limits: Limits, *, tls: bool = False) -> Duel:
        """A duel whose engines completed the handshake, honestly."""
        duel = cls(host_limits, agent_limits, tls=tls)
        duel.run([Step("start")])
        duel.settle()
        _check(
            duel.host_engine.is_open and duel.agent_engine.is_open,
            "an honest handshake did not open a session",
        )
        _check(
            duel.host_engine.authenticated == duel.agent_engine.authenticated == tls,
            "the session's authentication is not the mode's",
        )
        duel.tampered = False
        return duel

    @property
    def host_engine(self) -> HostConnection:
        assert isinstance(self.host.engine, HostConnection)
        return self.host.engine

    @property
    def agent_engine(self) -> AgentConnection:
        assert isinstance(self.agent.engine, AgentConnection)
        return self.agent.engine

    def side(self, name: str) -> _Side:
        return self.host if name == HOST else self.agent

    def other(self, side: _Side) -> _Side:
        return self.agent if side is self.host else self.host

    # ---- running steps ---------------------------------------------------------------

    def run(self, steps: list[Step]) -> None:
        for step in steps:
            self.apply(step)
            self.collect()
            self.check_invariants()

    def collect(self) -> None:
        for side in (self.host, self.agent):
            try:
                side.outbox += side.engine.data_to_send()
            except TamperingDetected:
                # A side that closed its own TLS session cannot seal: its own doing, its
                # frames lost.  Any other side must always be able to send.
                if side.closed is None or side.engine._tls is not side.closed:
                    raise

    def apply(self, step: Step) -> None:
        getattr(self, f"_step_{step.kind}")(step)

    @staticmethod
    def _channel(step: Step) -> int:
        """Honest calls use the three channels there are; frames injected may name any."""
        return step.channel % len(Channel)

    def _slot(self, side: _Side, slot: int) -> int | None:
        return side.inflight[slot % len(side.inflight)] if side.inflight else None

    def _step_start(self, step: Step) -> None:
        # The old session's bytes may still be in the pipes: the end-to-end check stops.
        self.tampered = True
        self.host_engine.start()
        self.host.forget_all()

    def _step_deliver(self, step: Step) -> None:
        sender = self.side(step.side)
        count = len(sender.outbox) if step.size == 0 else min(step.size, len(sender.outbox))
        data = bytes(sender.outbox[:count])
        del sender.outbox[:count]
        self.receive(self.other(sender), data)

    def _step_request(self, step: Step) -> None:
        if not self.host_engine.is_open:
            return
        try:
            request_id = self.host_engine.send_request("op", {"pad": "x" * step.size})
        except (TooManyRequests, FrameTooLarge):
            return
        _check(
            request_id not in self.host.inflight and request_id != 0,
            f"host reused request id {request_id} while it was in flight",
        )
        self.host.inflight.append(request_id)

    def _step_send(self, step: Step) -> None:
        side = self.side(step.side)
        request_id = self._slot(side, step.slot)
        if request_id is None or not side.engine.is_open:
            return
        data = bytes([step.size % 251]) * step.size
        channel = self._channel(step)
        available = side.engine.send_credit_available(request_id, channel)
        taken = side.engine.send_data(request_id, channel, data)
        _check(
            taken == min(len(data), available),
            f"send_data took {taken} of {len(data)} with {available} of credit",
        )
        side.sent[request_id, channel] += data[:taken]

    def _step_eof(self, step: Step) -> None:
        side = self.side(step.side)
        request_id = self._slot(side, step.slot)
        if request_id is not None and side.engine.is_open:
            side.engine.send_eof(request_id, self._channel(step), {"size": step.size} if step.size else None)

    def _step_consume(self, step: Step) -> None:
        side = self.side(step.side)
        request_id = self._slot(side, step.slot)
        if request_id is None:
            return
        # An honest application reports each byte it received once.
        key = (request_id, self._channel(step))
        count = min(step.size, len(side.received.get(key, b"")) - side.consumed.get(key, 0))
        side.consumed[key] += count
        side.engine.consumed(request_id, key[1], count)

    def _step_cancel(self, step: Step) -> None:
        request_id = self._slot(self.host, step.slot)
        if request_id is not None and self.host_engine.is_open:
            self.host_engine.send_cancel(request_id, {"reason": "test"})

    def _step_respond(self, step: Step) -> None:
        request_id = self._slot(self.agent, step.slot)
        if request_id is not None:
            self.agent_engine.send_response(request_id, {"pad": "y" * step.size})
            self.agent.forget(request_id)

    def _step_error(self, step: Step) -> None:
        request_id = self._slot(self.agent, step.slot)
        if request_id is not None:
            self.agent_engine.send_error(request_id, PathNotFound("z" * step.size, {"path": "/p"}))
            self.agent.forget(request_id)

    def _step_notify(self, step: Step) -> None:
        with contextlib.suppress(FrameTooLarge):  # the agent's own mistake, raised to its caller
            self.agent_engine.send_notification("n", {"pad": "w" * step.size})

    def _step_inject(self, step: Step) -> None:
        self.tampered = True
        self.receive(self.side(step.side), step.payload)

    def _step_frame(self, step: Step) -> None:
        """
        A well-framed frame (its header CRC right) with anything in it: sealed in the
        sender's own TLS session when it has one (a hostile guest holds valid credentials),
        so that it reaches the receiver's decoder of the frames inside TLS; on the wire
        otherwise.
        """
        self.tampered = True
        receiver = self.side(step.side)
        sender = self.other(receiver)
        request_id = self._slot(sender, step.slot) if step.request_id == 0 else step.request_id
        wire = encode_frame(FrameType(step.frame_type), request_id or 0, step.payload, step.flags)
        session = sender.engine._tls
        if session is None or not session.established or session is sender.closed:
            self.receive(receiver, wire)
            return
        # Behind everything the sender wrote before: TLS records are numbered.
        for records in session.seal([wire]):
            sender.outbox += encode_frame(FrameType.TLS, 0, records)
        self._step_deliver(Step("deliver", side=HOST if sender is self.host else AGENT))

    def _step_record(self, step: Step) -> None:
        """
        A TLS frame holding a record no one sealed: a content type TLS knows (20-24) or any
        byte, a length from the step (up to 64 KiB, beyond what TLS allows) or the body's,
        junk for a body; slots 1-4 cut it inside its header.
        """
        self.tampered = True
        content_type = 20 + step.flags % 5 if step.flags < 128 else step.flags
        length = step.request_id & 0xFFFF if step.request_id else len(step.payload)
        record = bytes([content_type]) + b"\x03\x03" + length.to_bytes(2, "big") + step.payload
        if 0 < step.slot < RECORD_HEADER_SIZE:
            record = record[: step.slot]
        self.receive(self.side(step.side), encode_frame(FrameType.TLS, 0, record))

    def _step_flip(self, step: Step) -> None:
        """Bits of a byte the sender wrote and the receiver has not read change on the way."""
        sender = self.other(self.side(step.side))
        if sender.outbox:
            self.tampered = True
            sender.outbox[step.size % len(sender.outbox)] ^= step.flags or 1

    def _step_close(self, step: Step) -> None:
        """The sender ends its TLS session properly (a close_notify, sealed validly) and writes on."""
        sender = self.other(self.side(step.side))
        session = sender.engine._tls
        if session is None or not session.established or session is sender.closed:
            return
        self.tampered = True
        sender.closed = session
        # The close_notify is written first; then OpenSSL reads on for the peer's (not
        # there yet, or junk the step script put in the closer's inbox).
        with contextlib.suppress(ssl.SSLError):
            session._tls.unwrap()
        sender.outbox += encode_frame(FrameType.TLS, 0, session.ciphertext())

    def _step_restart(self, step: Step) -> None:
        """The agent process restarts on the same channel, with the same credentials."""
        self.tampered = True
        engine = self.agent_engine
        self.agent = _Side(AgentConnection(engine.limits, authenticator=engine._authenticator))
        self.agent_engine.announce_restart()

    def _step_idle(self, step: Step) -> None:
        self.handle_agent_events(self.agent_engine.line_idle())

    def _step_ack(self, step: Step) -> None:
        """The ACK for the host's current SYNC, whoever sends it."""
        self.tampered = True
        nonce = self.host_engine._nonce
        self.receive(self.host, ACK_MAGIC + (nonce or bytes(NONCE_SIZE)))

    def _step_sync(self, step: Step) -> None:
        self.tampered = True
        self.receive(self.agent, SYNC_MAGIC + step.payload[:NONCE_SIZE].ljust(NONCE_SIZE, b"\0"))

    # ---- receiving -------------------------------------------------------------------

    def receive(self, receiver: _Side, data: bytes) -> None:
        if receiver is self.host:
            try:
                events = self.host_engine.receive_data(data)
            except ProtocolError:
                # What the client does: a new session (the old one's bytes may still arrive).
                self.host_errors += 1
                self.tampered = True
                self.host_engine.start()
                self.host.forget_all()
                return
            self.handle_host_events(events)
        else:
            self.handle_agent_events(self.agent_engine.receive_data(data))

    def handle_host_events(self, events: list[Event]) -> None:
        side = self.host
        for event in events:
            if isinstance(event, ResponseReceived | ErrorReceived) and event.request_id != 0:
                _check(
                    event.request_id in side.inflight,
                    f"host reported the end of request {event.request_id}, which was not in flight",
                )
                side.forget(event.request_id)
            elif isinstance(event, DataReceived | StreamEnded | WindowOpened):
                _check(
                    event.request_id in side.inflight,
                    f"host reported {type(event).__name__} for request {event.request_id}, not in flight",
                )
                if isinstance(event, DataReceived):
                    side.received[event.request_id, event.channel] += event.data
            elif isinstance(event, SessionReset | HandshakeFailed):
                side.forget_all()
            elif isinstance(event, ErrorReceived | HandshakeComplete | NotificationReceived):
                pass
            else:
                raise Violation(f"the host engine produced {event!r}")

    def handle_agent_events(self, events: list[Event]) -> None:
        side = self.agent
        for event in events:
            if isinstance(event, RequestReceived):
                _check(
                    event.request_id != 0 and event.request_id not in side.inflight,
                    f"agent accepted request id {event.request_id} twice or as zero",
                )
                side.inflight.append(event.request_id)
            elif isinstance(event, DataReceived | StreamEnded | WindowOpened | CancelRequested):
                _check(
                    event.request_id in side.inflight,
                    f"agent reported {type(event).__name__} for request {event.request_id}, not in flight",
                )
                if isinstance(event, DataReceived):
                    side.received[event.request_id, event.channel] += event.data
            elif isinstance(event, SessionReset | ProtocolFailure):
                side.forget_all()
            elif isinstance(event, HandshakeComplete):
                pass
            else:
                raise Violation(f"the agent engine produced {event!r}")

    # ---- what must hold --------------------------------------------------------------

    def check_invariants(self) -> None:
        for side in (self.host, self.agent):
            engine = side.engine
            own = engine.limits
            _check(
                set(engine._requests) == set(side.inflight),
                f"{type(engine).__name__} holds requests {sorted(engine._requests)}, its events said "
                f"{sorted(side.inflight)}",
            )
            if not engine.is_open:
                _check(engine.open_requests == 0, "requests are open without a session")
            limit = engine.peer_limits.max_inflight if side is self.host else own.max_inflight
            _check(engine.open_requests <= limit, f"{engine.open_requests} requests in flight, limit {limit}")
            _check(0 not in engine._requests, "request id 0 is in flight")
            for request in engine._requests.values():
                for stream in request.sending.values():
                    _check(0 <= stream.credit <= MAX_WINDOW, f"sending credit {stream.credit} out of range")
                for stream in request.receiving.values():
                    _check(
                        stream.credit >= 0
                        and stream.unacknowledged >= 0
                        and stream.credit + stream.unacknowledged <= own.window,
                        f"receiving window broken: credit {stream.credit}, unacknowledged "
                        f"{stream.unacknowledged}, window {own.window}",
                    )
            # The bytes held are at most one partial frame or marker on the wire, one partial
            # TLS record, and one partial frame inside TLS.
            wire_limit = engine._decoder.max_payload
            _check(
                engine._decoder.buffered < max(HEADER_SIZE + wire_limit, MARKER_SIZE + NONCE_SIZE),
                f"{engine._decoder.buffered} bytes buffered with a frame limit of {wire_limit}",
            )
            _check(
                engine._inner.buffered < HEADER_SIZE + own.max_frame,
                f"{engine._inner.buffered} bytes of a frame inside TLS with a limit of {own.max_frame}",
            )
            if engine._tls is not None:
                # Every whole record is read as it arrives: ciphertext waits only for the
                # rest of the one record that has begun.
                pending = engine._tls._incoming.pending
                records = engine._tls._records
                within = records._header or records._body_left
                _check(
                    pending < RECORD_HEADER_SIZE + RECORD_CIPHERTEXT_MAX if within else pending == 0,
                    f"{type(engine).__name__} holds {pending} bytes of TLS records it has not read",
                )
            if engine.is_open:
                peer = engine.peer_limits
                _check(
                    peer.max_frame >= 1024 and 1024 <= peer.window <= MAX_WINDOW and peer.max_inflight >= 1,
                    f"session open with unusable peer limits {peer}",
                )
        if not self.tampered:
            for sender in (self.host, self.agent):
                receiver = self.other(sender)
                # A sender that answered forgets its streams before the answer arrives.
                for key in receiver.received.keys() & sender.sent.keys():
                    _check(
                        sender.sent[key].startswith(receiver.received[key]),
                        f"request {key[0]} channel {key[1]} received other bytes than were sent",
                    )

    def settle(self) -> None:
        """Deliver everything both ways until both ends are quiet."""
        for _ in range(8):
            if not (self.host.outbox or self.agent.outbox):
                return
            for side in (self.host, self.agent):
                self.apply(Step("deliver", side=HOST if side is self.host else AGENT))
                self.collect()
                self.check_invariants()


__all__ = ["AGENT", "HONEST_KINDS", "HOST", "HOSTILE_KINDS", "KINDS", "Duel", "Step", "Violation"]
