"""
The engines' defences, each at its exact boundary: which ACK opens a session, the limits a
HELLO may announce, request ids, credit, and what each side may send.  Written so that a
single changed comparison or constant in guest_agent/protocol/ fails one of them.

The engines run in development mode: the tests hand-make plaintext frames, and inside TLS
the same frames go through the same code (the TLS layer's own defences are in
test_authentication.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from guest_agent.protocol.connection import (
    MAX_FRAME,
    MAX_INFLIGHT,
    MAX_WINDOW,
    AgentConnection,
    CancelRequested,
    DataReceived,
    ErrorReceived,
    HandshakeComplete,
    HostConnection,
    Limits,
    NotificationReceived,
    ProtocolFailure,
    RequestReceived,
    SessionReset,
    StreamEnded,
    WindowOpened,
)
from guest_agent.protocol.errors import (
    FrameTooLarge,
    InternalError,
    PathNotFound,
    ProtocolError,
    UnsupportedProtocolVersion,
    error_from_wire,
)
from guest_agent.protocol.frames import (
    ACK_MAGIC,
    NONCE_SIZE,
    RESET_MARKER,
    SYNC_MAGIC,
    Channel,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_header,
    encode_json,
)

HELLO_LIMITS = {"max_frame": 1024, "window": 1024, "max_inflight": 1}
NOT_INTEGERS = "HELLO must give max_frame, window and max_inflight as integers"


def handshake(host: HostConnection, agent: AgentConnection) -> None:
    host.start()
    agent.receive_data(host.data_to_send())
    host.receive_data(agent.data_to_send())
    agent.receive_data(host.data_to_send())
    (done,) = host.receive_data(agent.data_to_send())
    assert isinstance(done, HandshakeComplete)


def opened(
    host_limits: Limits | None = None,
    agent_limits: Limits | None = None,
) -> tuple[HostConnection, AgentConnection]:
    host = HostConnection(host_limits, authenticator=None)
    agent = AgentConnection(agent_limits, authenticator=None)
    handshake(host, agent)
    return host, agent


def frames_in(data: bytes) -> list[Any]:
    decoder = FrameDecoder(1 << 20)
    decoder.feed(data)
    out = []
    while (item := decoder.next()) is not None:
        out.append(item)
    return out


def hello_from_agent(reply: Any) -> HostConnection:
    """A host that has had its ACK and receives ``reply`` as the agent's HELLO."""
    host = HostConnection(authenticator=None)
    host.start()
    nonce = host.data_to_send()[len(SYNC_MAGIC) :]
    host.receive_data(ACK_MAGIC + nonce)
    assert host.data_to_send()  # its HELLO
    host.receive_data(encode_frame(FrameType.HELLO, 0, encode_json(reply)))
    return host


def hello_to_agent(hello: Any, agent: AgentConnection | None = None) -> tuple[AgentConnection, list[Any]]:
    agent = agent or AgentConnection(authenticator=None)
    agent.receive_data(SYNC_MAGIC + bytes(NONCE_SIZE))
    agent.data_to_send()  # the ACK
    events = agent.receive_data(encode_frame(FrameType.HELLO, 0, encode_json(hello)))
    return agent, events


# ---- the handshake -----------------------------------------------------------------------


def test_only_the_latest_syncs_ack_opens_the_session() -> None:
    host = HostConnection(authenticator=None)
    host.start()
    first = host.data_to_send()[len(SYNC_MAGIC) :]
    host.start()  # the retry: a new nonce
    latest = host.data_to_send()[len(SYNC_MAGIC) :]
    assert first != latest and len(latest) == NONCE_SIZE
    # An ACK of the earlier SYNC (or any other nonce) is stale: no HELLO goes out.
    assert host.receive_data(ACK_MAGIC + first) == []
    assert host.receive_data(ACK_MAGIC + bytes(NONCE_SIZE)) == []
    assert host.data_to_send() == b""
    host.receive_data(ACK_MAGIC + latest)
    (hello,) = frames_in(host.data_to_send())
    assert hello.type is FrameType.HELLO and hello.json()["versions"] == [2]


def test_a_host_waits_for_start_before_anything() -> None:
    host = HostConnection(authenticator=None)
    assert host.receive_data(ACK_MAGIC + bytes(NONCE_SIZE) + encode_frame(FrameType.HELLO, 0, b"{}")) == []
    assert host.data_to_send() == b"" and not host.is_open


def test_a_repeated_ack_while_waiting_for_hello_is_ignored() -> None:
    host = HostConnection(authenticator=None)
    host.start()
    nonce = host.data_to_send()[len(SYNC_MAGIC) :]
    host.receive_data(ACK_MAGIC + nonce)
    host.data_to_send()
    hello = encode_frame(FrameType.HELLO, 0, encode_json({"version": 2, **HELLO_LIMITS}))
    (done,) = host.receive_data(ACK_MAGIC + nonce + hello)
    assert isinstance(done, HandshakeComplete) and host.version == 2 and host.is_open


def test_host_refuses_anything_but_hello_or_error_after_its_hello() -> None:
    host = HostConnection(authenticator=None)
    host.start()
    host.receive_data(ACK_MAGIC + host.data_to_send()[len(SYNC_MAGIC) :])
    with pytest.raises(ProtocolError, match="expected HELLO from the agent, got RESPONSE"):
        host.receive_data(encode_frame(FrameType.RESPONSE, 1, b"{}"))


def test_host_refuses_a_sync_from_the_agent() -> None:
    host, _ = opened()
    with pytest.raises(ProtocolError, match="only the host may send"):
        host.receive_data(SYNC_MAGIC + bytes(NONCE_SIZE))


@pytest.mark.parametrize("version", [1, None, "2", [2]])
def test_host_refuses_a_version_it_did_not_offer(version: object) -> None:
    with pytest.raises(ProtocolError, match="version the host did not offer"):
        hello_from_agent({"version": version, **HELLO_LIMITS})


def test_host_refuses_a_hello_that_is_not_an_object() -> None:
    with pytest.raises(ProtocolError, match="version the host did not offer"):
        hello_from_agent([2])


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("max_frame", 1023, False),
        ("max_frame", 1024, True),
        ("window", 1023, False),
        ("window", 1024, True),
        ("window", MAX_WINDOW, True),
        ("window", MAX_WINDOW + 1, False),
        ("max_inflight", 0, False),
        ("max_inflight", 1, True),
    ],
)
def test_hello_limits_at_their_bounds(field: str, value: int, accepted: bool) -> None:
    limits = {**HELLO_LIMITS, field: value}
    # The host checks the agent's HELLO...
    if accepted:
        host = hello_from_agent({"version": 2, **limits})
        assert host.is_open and host.peer_limits == Limits(**limits)
    else:
        with pytest.raises(ProtocolError, match="unusable limits"):
            hello_from_agent({"version": 2, **limits})
    # ... and the agent the host's, telling it why and hunting for the next SYNC.
    agent, events = hello_to_agent({"versions": [2], **limits})
    if accepted:
        assert isinstance(events[0], HandshakeComplete) and agent.peer_limits == Limits(**limits)
    else:
        (failure,) = events
        assert isinstance(failure, ProtocolFailure) and "unusable limits" in str(failure.error)
        assert not agent.is_open
        (told,) = frames_in(agent.data_to_send())
        assert told.type is FrameType.ERROR and told.request_id == 0


@pytest.mark.parametrize("missing", ["max_frame", "window", "max_inflight"])
def test_hello_without_a_limit_is_refused(missing: str) -> None:
    limits = {k: v for k, v in HELLO_LIMITS.items() if k != missing}
    with pytest.raises(ProtocolError, match=f"^{NOT_INTEGERS}$"):
        hello_from_agent({"version": 2, **limits})
    _, (failure,) = hello_to_agent({"versions": [2], **limits, missing: "many"})
    assert isinstance(failure, ProtocolFailure) and str(failure.error) == NOT_INTEGERS


@pytest.mark.parametrize("value", [True, 4096.0, "4096", None])
def test_hello_limits_must_be_plain_integers(value: object) -> None:
    """bool is an int to Python and int() takes "4096" or 4096.0: none of them is a limit."""
    limits = {**HELLO_LIMITS, "window": value}
    with pytest.raises(ProtocolError, match=f"^{NOT_INTEGERS}$"):
        hello_from_agent({"version": 2, **limits})
    _, (failure,) = hello_to_agent({"versions": [2], **limits})
    assert isinstance(failure, ProtocolFailure) and str(failure.error) == NOT_INTEGERS


def test_agent_picks_the_highest_common_version_and_says_so() -> None:
    offered = {"versions": [1, 2, 3], **HELLO_LIMITS}
    agent, events = hello_to_agent(offered, AgentConnection(versions=(1, 2), authenticator=None))
    (complete,) = events
    assert isinstance(complete, HandshakeComplete) and complete.version == 2 == agent.version
    (reply,) = frames_in(agent.data_to_send())
    assert reply.type is FrameType.HELLO and reply.json()["version"] == 2


@pytest.mark.parametrize("hello", [{"versions": 1}, {"versions": ["1"]}, [], {"max_frame": 1024}])
def test_agent_refuses_a_hello_without_a_list_of_versions(hello: object) -> None:
    _, (failure,) = hello_to_agent(hello)
    assert isinstance(failure, ProtocolFailure) and "versions" in str(failure.error)


def test_agent_without_a_common_version_waits_for_a_new_sync() -> None:
    agent, events = hello_to_agent({"versions": [7, 5], **HELLO_LIMITS})
    assert events == [] and not agent.is_open
    (told,) = frames_in(agent.data_to_send())
    error = error_from_wire(**{k: told.json()[k] for k in ("code", "message", "details")})
    assert isinstance(error, UnsupportedProtocolVersion) and "[5, 7]" in str(error)
    # A HELLO again without a SYNC is stale bytes: ignored until the host resynchronises.
    assert (
        agent.receive_data(encode_frame(FrameType.HELLO, 0, encode_json({"versions": [2], **HELLO_LIMITS})))
        == []
    )
    assert agent.data_to_send() == b""


def test_agent_refuses_requests_before_hello() -> None:
    agent = AgentConnection(authenticator=None)
    agent.receive_data(SYNC_MAGIC + bytes(NONCE_SIZE))
    agent.data_to_send()
    (failure,) = agent.receive_data(encode_frame(FrameType.REQUEST, 1, b'{"op":"ping"}'))
    assert isinstance(failure, ProtocolFailure) and "expected HELLO from the host, got REQUEST" in str(
        failure.error
    )


def test_first_sync_is_no_reset_and_a_second_one_is() -> None:
    agent = AgentConnection(authenticator=None)
    assert agent.receive_data(SYNC_MAGIC + bytes(NONCE_SIZE)) == []
    assert agent.data_to_send() == ACK_MAGIC + bytes(NONCE_SIZE)
    # A SYNC again before HELLO: nothing was open, so nothing is reset.
    assert agent.receive_data(SYNC_MAGIC + b"\x01" * NONCE_SIZE) == []
    assert agent.data_to_send() == ACK_MAGIC + b"\x01" * NONCE_SIZE
    host, agent = opened()
    host.start()
    (reset,) = agent.receive_data(host.data_to_send())
    assert isinstance(reset, SessionReset) and not agent.is_open and agent.version == 0


def test_agent_refuses_an_ack_or_reset_from_the_host() -> None:
    _, agent = opened()
    (failure,) = agent.receive_data(ACK_MAGIC + bytes(NONCE_SIZE))
    assert isinstance(failure, ProtocolFailure) and "only the agent may send" in str(failure.error)


def test_host_disconnect_forgets_everything_buffered() -> None:
    host, agent = opened()
    host.send_request("op")
    agent.receive_data(host.data_to_send()[:5])
    agent.send_notification("n")
    agent.host_disconnected()
    assert agent.data_to_send() == b"" and not agent.holds_partial_frame
    assert not agent.is_open and agent.open_requests == 0
    # Hunting again: a frame is not taken for a SYNC.
    assert agent.receive_data(encode_frame(FrameType.REQUEST, 1, b"{}")) == []
    assert agent.data_to_send() == b""


# ---- request ids -------------------------------------------------------------------------


def test_agent_refuses_request_id_zero() -> None:
    _, agent = opened()
    (failure,) = agent.receive_data(encode_frame(FrameType.REQUEST, 0, b'{"op":"ping"}'))
    assert isinstance(failure, ProtocolFailure) and "request id 0 is zero or already in flight" in str(
        failure.error
    )
    assert not agent.is_open


def test_agent_refuses_a_duplicate_request_id() -> None:
    _, agent = opened()
    (first,) = agent.receive_data(encode_frame(FrameType.REQUEST, 7, b'{"op":"a","args":{"x":1}}'))
    assert first == RequestReceived(7, "a", {"x": 1})
    (failure,) = agent.receive_data(encode_frame(FrameType.REQUEST, 7, b'{"op":"b"}'))
    assert isinstance(failure, ProtocolFailure) and "request id 7" in str(failure.error)
    assert agent.open_requests == 0 and not agent.is_open
    # Once answered, an id may be used again.
    _, agent = opened()
    agent.receive_data(encode_frame(FrameType.REQUEST, 7, b'{"op":"a"}'))
    agent.send_response(7, None)
    assert agent.receive_data(encode_frame(FrameType.REQUEST, 7, b'{"op":"b"}')) == [
        RequestReceived(7, "b", {})
    ]


@pytest.mark.parametrize("body", [b'{"op":1}', b'{"args":{}}', b'{"op":"a","args":[]}', b'"op"'])
def test_agent_answers_a_malformed_request_with_bad_request(body: bytes) -> None:
    _host, agent = opened()
    assert agent.receive_data(encode_frame(FrameType.REQUEST, 3, body)) == []
    (answer,) = frames_in(agent.data_to_send())
    assert answer.type is FrameType.ERROR and answer.request_id == 3
    assert answer.json()["code"] == "bad-request" and agent.open_requests == 0 and agent.is_open


def test_agent_refuses_requests_past_its_limit_exactly() -> None:
    _, agent = opened(agent_limits=Limits(max_inflight=2))
    for rid in (1, 2):
        assert agent.receive_data(encode_frame(FrameType.REQUEST, rid, b'{"op":"a"}')) == [
            RequestReceived(rid, "a", {})
        ]
    assert agent.data_to_send() == b""
    assert agent.receive_data(encode_frame(FrameType.REQUEST, 3, b'{"op":"a"}')) == []
    (refused,) = frames_in(agent.data_to_send())
    assert refused.request_id == 3 and refused.json()["code"] == "too-many-requests"
    assert "2 operations are in flight, the agent's limit is 2" in refused.json()["message"]
    assert agent.open_requests == 2


def test_request_ids_wrap_around_and_skip_zero() -> None:
    host, _ = opened()
    first = host.send_request("a")
    assert first == 1
    host._next_id = 0xFFFFFFFF  # four billion requests later
    assert host.send_request("b") == 0xFFFFFFFF
    assert host.send_request("c") == 2  # 1 is still in flight... and the counter wrapped past 0
    assert host.open_requests == 3


def test_host_in_flight_limit_is_exact() -> None:
    host, _ = opened(agent_limits=Limits(max_inflight=2))
    host.send_request("a")
    host.send_request("b")
    with pytest.raises(Exception, match="2 operations are in flight, the agent's limit is 2"):
        host.send_request("c")
    assert host.open_requests == 2


def test_calls_before_the_handshake_are_refused() -> None:
    host = HostConnection(authenticator=None)
    for call in (
        lambda: host.send_request("a"),
        lambda: host.send_data(1, 0, b"x"),
        lambda: host.send_eof(1, 0),
        lambda: host.send_cancel(1),
    ):
        with pytest.raises(ProtocolError, match="no session: the handshake has not completed"):
            call()


def test_a_request_too_large_takes_no_slot() -> None:
    host, _ = opened(agent_limits=Limits(max_frame=1024, max_inflight=1))
    with pytest.raises(FrameTooLarge):
        host.send_request("a", {"x": "y" * 2000})
    assert host.open_requests == 0 and host.data_to_send() == b""
    assert host.send_request("a") == 1


# ---- streams and credit ------------------------------------------------------------------


def test_credit_up_to_the_window_cap_and_not_a_byte_more() -> None:
    host, agent = opened(agent_limits=Limits(window=4096))
    rid = host.send_request("push")
    agent.receive_data(host.data_to_send())
    assert host.send_credit_available(rid, Channel.INPUT) == 4096
    grant = (MAX_WINDOW - 4096).to_bytes(4, "big")
    assert host.receive_data(encode_frame(FrameType.CREDIT, rid, grant, Channel.INPUT)) == [
        WindowOpened(rid, Channel.INPUT)
    ]
    assert host.send_credit_available(rid, Channel.INPUT) == MAX_WINDOW
    with pytest.raises(ProtocolError, match="more credit than any window allows"):
        host.receive_data(encode_frame(FrameType.CREDIT, rid, (1).to_bytes(4, "big"), Channel.INPUT))


def test_credit_overflow_is_refused_by_the_agent_too() -> None:
    host, agent = opened()
    rid = host.send_request("exec")
    agent.receive_data(host.data_to_send())
    (failure,) = agent.receive_data(encode_frame(FrameType.CREDIT, rid, b"\xff\xff\xff\xff", Channel.STDOUT))
    assert isinstance(failure, ProtocolFailure) and "more credit" in str(failure.error)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"])
def test_credit_must_be_four_bytes(payload: bytes) -> None:
    host, _agent = opened()
    rid = host.send_request("push")
    with pytest.raises(ProtocolError, match="4-byte count"):
        host.receive_data(encode_frame(FrameType.CREDIT, rid, payload, Channel.INPUT))


def test_credit_for_an_unknown_request_is_a_violation() -> None:
    host, _ = opened()
    with pytest.raises(ProtocolError, match=r"^peer sent CREDIT for request 9, which is not in flight$"):
        host.receive_data(encode_frame(FrameType.CREDIT, 9, b"\x00\x00\x10\x00", Channel.INPUT))
    assert host.send_credit_available(9, Channel.INPUT) == 0


def test_credit_goes_back_at_a_quarter_window_exactly() -> None:
    host, agent = opened(agent_limits=Limits(window=4096))
    rid = host.send_request("push")
    assert host.send_data(rid, Channel.INPUT, b"x" * 4096) == 4096
    assert host.send_credit_available(rid, Channel.INPUT) == 0
    agent.receive_data(host.data_to_send())
    agent.consumed(rid, Channel.INPUT, 1023)
    assert agent.data_to_send() == b""
    agent.consumed(rid, Channel.INPUT, 1)
    (credit,) = frames_in(agent.data_to_send())
    assert credit.type is FrameType.CREDIT and credit.flags == Channel.INPUT
    assert int.from_bytes(credit.payload, "big") == 1024
    assert host.receive_data(credit_wire(credit)) == [WindowOpened(rid, Channel.INPUT)]
    assert host.send_credit_available(rid, Channel.INPUT) == 1024
    # The agent's window was given back: 1024 more bytes fit, not 1025.
    assert host.send_data(rid, Channel.INPUT, b"y" * 2000) == 1024
    events: list[Any] = agent.receive_data(host.data_to_send())
    assert sum(len(e.data) for e in events) == 1024


def credit_wire(frame: Any) -> bytes:
    return encode_frame(frame.type, frame.request_id, frame.payload, frame.flags)


def test_consumed_for_unknown_streams_sends_nothing() -> None:
    host, agent = opened(agent_limits=Limits(window=4096))
    rid = host.send_request("push")
    agent.receive_data(host.data_to_send())
    agent.consumed(rid, Channel.INPUT, 4096)  # nothing was received on it yet
    agent.consumed(rid + 1, Channel.INPUT, 4096)
    assert agent.data_to_send() == b""


def test_data_past_the_window_by_one_byte_is_refused() -> None:
    host, agent = opened(agent_limits=Limits(window=4096))
    rid = host.send_request("push")
    agent.receive_data(host.data_to_send())
    (data,) = agent.receive_data(encode_frame(FrameType.DATA, rid, b"x" * 4095, Channel.INPUT))
    assert isinstance(data, DataReceived) and len(data.data) == 4095
    assert len(agent.receive_data(encode_frame(FrameType.DATA, rid, b"x", Channel.INPUT))) == 1
    (failure,) = agent.receive_data(encode_frame(FrameType.DATA, rid, b"x", Channel.INPUT))
    assert isinstance(failure, ProtocolFailure)
    assert "peer sent 1 bytes on request 1 channel 0 with only 0 bytes of window left" in str(failure.error)


def test_sending_uses_the_peers_frame_size_and_copies_mutable_buffers() -> None:
    host, _agent = opened(agent_limits=Limits(max_frame=1024, window=8192))
    rid = host.send_request("push")
    buffer = bytearray(b"a" * 2500)
    assert host.send_data(rid, Channel.STDERR, memoryview(buffer)) == 2500
    pieces = host.pieces_to_send()
    assert all(isinstance(piece, bytes) for piece in pieces)
    sizes = [len(f.payload) for f in frames_in(b"".join(pieces)) if f.type is FrameType.DATA]
    assert sizes == [1024, 1024, 452]


def test_eof_carries_its_trailer_and_must_be_an_object() -> None:
    host, agent = opened()
    rid = host.send_request("exec")
    agent.receive_data(host.data_to_send())
    agent.send_eof(rid, Channel.STDOUT)
    assert host.receive_data(agent.data_to_send()) == [StreamEnded(rid, Channel.STDOUT, {})]
    with pytest.raises(ProtocolError, match="EOF trailer must be a JSON object"):
        host.receive_data(encode_frame(FrameType.EOF, rid, b"[1]", Channel.STDERR))


@pytest.mark.parametrize(("frame_type", "payload"), [(FrameType.DATA, b"late"), (FrameType.EOF, b"{}")])
def test_stream_frames_for_unknown_requests(frame_type: FrameType, payload: bytes) -> None:
    # The agent only answers: a frame for a request it never had, or one it answered, is a lie.
    host, agent = opened()
    with pytest.raises(
        ProtocolError, match=rf"^peer sent {frame_type.name} for request 5, which is not in flight$"
    ):
        host.receive_data(encode_frame(frame_type, 5, payload, Channel.STDOUT))
    # The host may still be sending when the agent's answer ends a request: the agent drops it.
    assert agent.receive_data(encode_frame(frame_type, 5, payload, Channel.INPUT)) == []
    assert agent.is_open and agent.data_to_send() == b""


@pytest.mark.parametrize("frame_type", [FrameType.DATA, FrameType.EOF, FrameType.CREDIT])
def test_stream_frames_name_a_known_channel(frame_type: FrameType) -> None:
    host, _ = opened()
    rid = host.send_request("exec")
    with pytest.raises(ProtocolError, match=f"{frame_type.name} frame names unknown channel 3"):
        host.receive_data(encode_frame(frame_type, rid, b"\x00\x00\x00\x01", 3))


# ---- what each side may send -------------------------------------------------------------


@pytest.mark.parametrize("frame_type", [FrameType.HELLO, FrameType.REQUEST, FrameType.CANCEL])
def test_host_refuses_frames_only_the_host_sends(frame_type: FrameType) -> None:
    host, _ = opened()
    with pytest.raises(ProtocolError, match=f"the agent may not send {frame_type.name}"):
        host.receive_data(encode_frame(frame_type, 1, b"{}"))


@pytest.mark.parametrize(
    "frame_type", [FrameType.HELLO, FrameType.RESPONSE, FrameType.ERROR, FrameType.NOTIFY]
)
def test_agent_refuses_frames_only_the_agent_sends(frame_type: FrameType) -> None:
    _, agent = opened()
    (failure,) = agent.receive_data(encode_frame(frame_type, 1, b"{}"))
    assert isinstance(failure, ProtocolFailure)
    assert f"the host may not send {frame_type.name} in a session" in str(failure.error)


def test_notifications() -> None:
    host, agent = opened()
    agent.send_notification("event", {"a": 1})
    agent.send_notification("bare")
    wire = agent.data_to_send()
    sizes = [len(frame.payload) for frame in frames_in(wire)]
    assert host.receive_data(wire) == [
        NotificationReceived("event", {"a": 1}, sizes[0]),
        NotificationReceived("bare", {}, sizes[1]),
    ]
    # The size is what decoding cost, whatever the body holds: the client's limit is on it.
    (padded,) = host.receive_data(encode_frame(FrameType.NOTIFY, 0, b'{"name":"bare"}' + b" " * 100))
    assert padded == NotificationReceived("bare", {}, 115)
    for body in (b'{"name":1}', b'["n"]', b'{"body":{}}'):
        with pytest.raises(ProtocolError, match="NOTIFY must carry a JSON object with a name"):
            host.receive_data(encode_frame(FrameType.NOTIFY, 0, body))
    # Without a session the agent has nobody to tell.
    idle = AgentConnection(authenticator=None)
    idle.send_notification("event")
    assert idle.data_to_send() == b""


def test_errors_from_the_agent() -> None:
    host, agent = opened()
    rid = host.send_request("stat")
    agent.receive_data(host.data_to_send())
    agent.send_error(rid, PathNotFound("gone", {"path": "/x"}))
    (event,) = host.receive_data(agent.data_to_send())
    assert isinstance(event, ErrorReceived) and event.request_id == rid
    assert (
        isinstance(event.error, PathNotFound)
        and event.error.message == "gone"
        and event.error.details == {"path": "/x"}
    )
    assert host.open_requests == 0
    # Details that are not an object, a missing message, an unknown code: still our errors.
    rid = host.send_request("stat")
    (event,) = host.receive_data(encode_frame(FrameType.ERROR, rid, b'{"code":"what","details":[1]}'))
    assert (
        isinstance(event, ErrorReceived)
        and isinstance(event.error, InternalError)
        and event.error.message == ""
        and event.error.details == {}
    )
    with pytest.raises(ProtocolError, match="ERROR frame must carry a JSON object with a code"):
        host.receive_data(encode_frame(FrameType.ERROR, 1, b'{"message":"m"}'))
    # An error for a request not in flight is a violation; one for the connection (0) is reported.
    with pytest.raises(ProtocolError, match=r"^peer sent ERROR for request 99, which is not in flight$"):
        host.receive_data(encode_frame(FrameType.ERROR, 99, b'{"code":"internal"}'))
    (connection_error,) = host.receive_data(
        encode_frame(FrameType.ERROR, 0, b'{"code":"protocol-violation","message":"bad"}')
    )
    assert isinstance(connection_error, ErrorReceived)
    assert connection_error.request_id == 0 and str(connection_error.error) == "bad"
    assert type(connection_error.error) is ProtocolError


def test_an_error_too_long_for_the_hosts_frames_is_cut_to_fit() -> None:
    host, agent = opened(host_limits=Limits(max_frame=1024))
    rid = host.send_request("stat")
    agent.receive_data(host.data_to_send())
    agent.send_error(rid, PathNotFound("/very/long/" + "\u00e9" * 5000, {"path": "p" * 5000}))
    (event,) = host.receive_data(agent.data_to_send())
    assert isinstance(event, ErrorReceived) and isinstance(event.error, PathNotFound)
    assert event.error.message.startswith("/very/long/")
    assert host.open_requests == 0


def test_error_codes_map_to_their_classes() -> None:
    assert type(error_from_wire("frame-too-large", "big")) is FrameTooLarge
    assert str(error_from_wire("frame-too-large", "big")) == "big"
    assert type(error_from_wire("protocol-violation", "v")) is ProtocolError
    assert str(error_from_wire("protocol-violation", "v")) == "v"
    unknown = error_from_wire("no-such-code", "m", {"a": 1})
    assert type(unknown) is InternalError and unknown.message == "m" and unknown.details == {"a": 1}


def test_agent_cancel_reaches_only_requests_in_flight() -> None:
    host, agent = opened()
    rid = host.send_request("exec")
    agent.receive_data(host.data_to_send())
    assert agent.receive_data(encode_frame(FrameType.CANCEL, rid + 1, b"{}")) == []
    (cancel,) = agent.receive_data(encode_frame(FrameType.CANCEL, rid, b"[1]"))
    assert isinstance(cancel, CancelRequested) and cancel.request_id == rid and cancel.body == {}
    host.send_cancel(rid + 5)  # not in flight: nothing goes out
    assert host.data_to_send() == b""


# ---- what each side is told, exactly -----------------------------------------------------


def test_the_agent_tells_the_host_exactly_why_it_dropped_the_session() -> None:
    agent, (failure,) = hello_to_agent({"versions": "1", **HELLO_LIMITS})
    assert isinstance(failure, ProtocolFailure)
    assert str(failure.error) == "HELLO must list the host's versions as integers"
    (told,) = frames_in(agent.data_to_send())
    assert (told.type, told.request_id) == (FrameType.ERROR, 0)
    assert told.json() == {"code": "protocol-violation", "details": {},
                           "message": "HELLO must list the host's versions as integers"}
    _, agent = opened()
    (failure,) = agent.receive_data(ACK_MAGIC + bytes(NONCE_SIZE))
    assert isinstance(failure, ProtocolFailure)
    assert str(failure.error) == "the host sent a marker only the agent may send"


def test_an_agent_without_a_common_version_says_which_it_speaks() -> None:
    agent, _ = hello_to_agent({"versions": [7], **HELLO_LIMITS})
    (told,) = frames_in(agent.data_to_send())
    assert told.json()["details"] == {"supported": [2]}
    assert told.json()["message"] == ("the host speaks protocol versions [7] and this agent speaks [2]: "
                                      "install a matching vmcontroller agent in the guest")


def test_a_malformed_request_is_answered_with_what_a_request_is() -> None:
    _host, agent = opened()
    agent.receive_data(encode_frame(FrameType.REQUEST, 3, b'"op"'))
    (answer,) = frames_in(agent.data_to_send())
    assert answer.json() == {"code": "bad-request", "details": {},
                             "message": "a request must be a JSON object with 'op' and 'args'"}


def test_a_sync_and_hello_in_one_read_mid_session() -> None:
    host, agent = opened()
    host.start()
    agent.receive_data(host.data_to_send())
    host.receive_data(agent.data_to_send())  # the ACK: the host sends its HELLO
    host.start()  # and starts over: SYNC and HELLO arrive in one read
    nonce_sync = host.data_to_send()
    events = agent.receive_data(nonce_sync + encode_frame(FrameType.HELLO, 0, encode_json(
        {"versions": [2], **HELLO_LIMITS})))
    assert [type(event) for event in events] == [HandshakeComplete]
    host2, agent2 = opened()
    host2.start()
    sync = host2.data_to_send()
    hello = encode_frame(FrameType.HELLO, 0, encode_json({"versions": [2], **HELLO_LIMITS}))
    events = agent2.receive_data(sync + hello)
    assert events[0] == SessionReset("the host started a new session")
    assert isinstance(events[1], HandshakeComplete) and agent2.is_open


def test_a_host_gone_mid_frame_is_told_how_much_arrived() -> None:
    host, agent = opened()
    host.send_request("op")
    agent.receive_data(host.data_to_send()[:5])
    (failure,) = agent.line_idle()
    assert isinstance(failure, ProtocolFailure)
    assert str(failure.error) == (
        "the host stopped sending in the middle of a frame (5 bytes of it arrived): dropped it")


def test_notifications_are_connection_frames() -> None:
    _, agent = opened()
    agent.send_notification("event", {"a": 1})
    (frame,) = frames_in(agent.data_to_send())
    assert (frame.type, frame.request_id) == (FrameType.NOTIFY, 0)


def test_request_ids_count_up_by_one_and_wrap_past_one_in_flight() -> None:
    host, _ = opened()
    assert [host.send_request("a") for _ in range(3)] == [1, 2, 3]
    host._next_id = 0xFFFFFFFF
    assert host.send_request("b") == 0xFFFFFFFF
    host._next_id = 0xFFFFFFFF  # the last id is still in flight: the next free one after it
    assert host.send_request("c") == 4


@pytest.mark.parametrize(("frame", "message"), [
    (encode_frame(FrameType.EOF, 1, b"[]"), "EOF trailer must be a JSON object"),
    (encode_frame(FrameType.CREDIT, 1, b"\x00\x01"), "CREDIT frame must carry a 4-byte count"),
    (encode_frame(FrameType.CREDIT, 1, (MAX_WINDOW).to_bytes(4, "big")),
     "peer granted more credit than any window allows"),
    (encode_frame(FrameType.ERROR, 1, b'{"message":"m"}'),
     "ERROR frame must carry a JSON object with a code"),
    (b"\xffX", "unknown marker: the stream is out of step"),
    (b"\xffVMC-OTHER", "unknown marker: the stream is out of step"),
    (encode_frame(FrameType.ERROR, 1, b'{"code":NaN}'), "ERROR frame carries malformed JSON: NaN is not a "
                                                       "JSON number"),
    (encode_frame(FrameType.NOTIFY, 0, b'{"name":"n","body":{"x":1e999}}'),
     "NOTIFY frame carries malformed JSON: 1e999 is out of a float's range"),
])
def test_the_hosts_protocol_errors_say_exactly_what_was_wrong(frame: bytes, message: str) -> None:
    host, _ = opened()
    host.send_request("op")
    host.data_to_send()
    with pytest.raises(ProtocolError) as raised:
        host.receive_data(frame)
    assert str(raised.value) == message


def test_calls_without_a_session_say_so_exactly() -> None:
    with pytest.raises(ProtocolError) as raised:
        HostConnection(authenticator=None).send_request("op")
    assert str(raised.value) == "no session: the handshake has not completed"


def test_an_error_that_fits_the_frame_exactly_is_not_cut() -> None:
    host, agent = opened(host_limits=Limits(max_frame=1024))
    rid = host.send_request("stat")
    agent.receive_data(host.data_to_send())
    empty = len(encode_json({"code": str(PathNotFound.code), "message": "", "details": {"path": "/x"}}))
    message = "m" * (1024 - empty)
    agent.send_error(rid, PathNotFound(message, {"path": "/x"}))
    (event,) = host.receive_data(agent.data_to_send())
    assert isinstance(event, ErrorReceived) and isinstance(event.error, PathNotFound)
    assert event.error.message == message and event.error.details == {"path": "/x"}


def test_a_frame_without_a_payload() -> None:
    (frame,) = frames_in(encode_frame(FrameType.CANCEL, 5))
    assert (frame.type, frame.request_id, frame.payload, frame.flags) == (FrameType.CANCEL, 5, b"", 0)


# ---- the handshake's details, exactly --------------------------------------------------------


def test_both_ends_report_what_the_handshake_agreed() -> None:
    host, agent = HostConnection(authenticator=None), AgentConnection(authenticator=None)
    assert (agent.is_open, agent.version, agent.buffered) == (False, 0, 0)
    host.start()
    agent.receive_data(host.data_to_send())
    host.receive_data(agent.data_to_send())
    (hello,) = frames_in(host.data_to_send())
    assert (hello.type, hello.request_id, hello.flags) == (FrameType.HELLO, 0, 0)
    (agent_done,) = agent.receive_data(encode_frame(FrameType.HELLO, 0, hello.payload))
    assert agent_done == HandshakeComplete(2, hello.json())
    (reply,) = frames_in(agent.data_to_send())
    assert (reply.type, reply.request_id, reply.flags) == (FrameType.HELLO, 0, 0)
    (host_done,) = host.receive_data(encode_frame(FrameType.HELLO, 0, reply.payload))
    assert host_done == HandshakeComplete(2, reply.json()) and host.version == 2
    agent.host_disconnected()
    assert agent.is_open is False


def test_an_ack_and_the_agents_hello_in_one_read_open_the_session() -> None:
    host, agent = HostConnection(authenticator=None), AgentConnection(authenticator=None)
    host.start()
    agent.receive_data(host.data_to_send())
    ack = agent.data_to_send()
    reply = encode_frame(FrameType.HELLO, 0, encode_json({"version": 2, **HELLO_LIMITS}))
    assert [type(event) for event in host.receive_data(ack + reply)] == [HandshakeComplete]


def test_a_frame_other_than_hello_or_error_while_waiting_for_hello() -> None:
    host = HostConnection(authenticator=None)
    host.start()
    nonce = host.data_to_send()[len(SYNC_MAGIC):]
    host.receive_data(ACK_MAGIC + nonce)
    with pytest.raises(ProtocolError) as raised:
        host.receive_data(encode_frame(FrameType.NOTIFY, 0, b'{"name":"n"}'))
    assert str(raised.value) == "expected HELLO from the agent, got NOTIFY"


@pytest.mark.parametrize(("field", "value"), [("max_frame", MAX_FRAME), ("max_inflight", MAX_INFLIGHT)])
def test_hello_limits_at_their_ceilings_are_taken(field: str, value: int) -> None:
    host = hello_from_agent({"version": 2, **HELLO_LIMITS, field: value})
    assert host.is_open and getattr(host.peer_limits, field) == value


@pytest.mark.parametrize(("data", "message"), [
    (SYNC_MAGIC + bytes(NONCE_SIZE), "the agent sent SYNC, which only the host may send"),
    (encode_frame(FrameType.NOTIFY, 0, b'{"name":1}'),
     "NOTIFY must carry a JSON object with a name and an object body"),
    (b"\xa5\x5a" + bytes(14), "corrupt frame header: the stream is out of step"),
    (encode_frame(FrameType.NOTIFY, 0, b"[" * 100_000),
     "NOTIFY frame carries malformed JSON: nested too deeply"),
])
def test_more_of_the_hosts_protocol_errors_exactly(data: bytes, message: str) -> None:
    host, _ = opened(host_limits=Limits(max_frame=1 << 20))
    with pytest.raises(ProtocolError) as raised:
        host.receive_data(data)
    assert str(raised.value) == message


def test_an_agent_restart_is_reported_as_such() -> None:
    host, _ = opened()
    assert host.receive_data(RESET_MARKER) == [SessionReset("the agent restarted")]


def test_unread_bytes_past_the_limit_are_refused_with_the_limits_name() -> None:
    host, agent = opened(host_limits=Limits(max_buffered=1024, window=4096))
    rid = host.send_request("pull")
    agent.receive_data(host.data_to_send())
    agent.send_data(rid, Channel.INPUT, b"x" * 1025)
    with pytest.raises(ProtocolError) as raised:
        host.receive_data(agent.data_to_send())
    assert str(raised.value) == ("peer sent more than 1024 bytes that are not read yet across the "
                                 "connection's streams (the limit max_buffered)")


def test_consuming_more_than_was_received_frees_nothing_more() -> None:
    host, agent = opened()
    rid = host.send_request("pull")
    agent.receive_data(host.data_to_send())
    agent.send_data(rid, Channel.INPUT, b"x" * 10)
    host.receive_data(agent.data_to_send())
    assert host.buffered == 10
    host.consumed(rid, Channel.INPUT, 10)
    host.consumed(rid, Channel.INPUT, 10)
    assert host.buffered == 0


def test_credit_goes_back_at_a_quarter_of_an_odd_window_and_in_whole_quarters() -> None:
    host, agent = opened(host_limits=Limits(window=1025))
    rid = host.send_request("pull")
    agent.receive_data(host.data_to_send())
    agent.send_data(rid, Channel.INPUT, b"x" * 512)
    host.receive_data(agent.data_to_send())
    host.data_to_send()
    host.consumed(rid, Channel.INPUT, 256)  # 1025 // 4
    host.consumed(rid, Channel.INPUT, 256)
    grants = [int.from_bytes(frame.payload, "big") for frame in frames_in(host.data_to_send())]
    assert grants == [256, 256]


def test_the_agent_answers_each_of_two_syncs_in_one_read() -> None:
    agent = AgentConnection(authenticator=None)
    agent.receive_data(SYNC_MAGIC + b"\x01" * NONCE_SIZE + SYNC_MAGIC + b"\x02" * NONCE_SIZE)
    assert agent.data_to_send() == ACK_MAGIC + b"\x01" * NONCE_SIZE + ACK_MAGIC + b"\x02" * NONCE_SIZE


def test_an_ack_split_after_its_second_to_last_byte_is_still_found() -> None:
    host = HostConnection(authenticator=None)
    host.start()
    nonce = host.data_to_send()[len(SYNC_MAGIC):]
    ack = ACK_MAGIC + nonce
    host.receive_data(b"\x00" * 100 + ack[:-1])  # stale bytes, then all of the ACK but its last byte
    assert host.data_to_send() == b""
    host.receive_data(ack[-1:])
    (hello,) = frames_in(host.data_to_send())
    assert hello.type is FrameType.HELLO


def test_a_header_without_flags() -> None:
    (frame,) = frames_in(encode_header(FrameType.CANCEL, 5, 0))
    assert (frame.type, frame.request_id, frame.flags) == (FrameType.CANCEL, 5, 0)
