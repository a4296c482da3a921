"""
The sans-I/O engine, host and agent ends joined by hand: no reactor, no sockets.

These tests inject hand-made frames, so they run the protocol inside the session in
development mode (no TLS); the same protocol inside TLS, and the authentication itself, are
tested in test_authentication.py.
"""

from __future__ import annotations

import pytest

from guest_agent.protocol.connection import (
    AgentConnection,
    CancelRequested,
    DataReceived,
    ErrorReceived,
    HandshakeComplete,
    HandshakeFailed,
    HostConnection,
    Limits,
    ProtocolFailure,
    RequestReceived,
    ResponseReceived,
    SessionReset,
    StreamEnded,
    WindowOpened,
)
from guest_agent.protocol.errors import (
    FrameTooLarge,
    PathNotFound,
    ProtocolError,
    ResultTooLarge,
    TooManyRequests,
    UnsupportedProtocolVersion,
)
from guest_agent.protocol.frames import ACK_MAGIC, Channel, FrameType, encode_frame


def handshake(host: HostConnection, agent: AgentConnection) -> None:
    host.start()
    agent.receive_data(host.data_to_send())
    host.receive_data(agent.data_to_send())  # ACK -> HELLO
    agent.receive_data(host.data_to_send())
    events = host.receive_data(agent.data_to_send())
    assert [type(e) for e in events] == [HandshakeComplete]
    assert host.is_open and agent.is_open


def opened(
    host_limits: Limits | None = None, agent_limits: Limits | None = None
) -> tuple[HostConnection, AgentConnection]:
    host = HostConnection(host_limits, authenticator=None)
    agent = AgentConnection(agent_limits, authenticator=None)
    handshake(host, agent)
    return host, agent


def test_handshake_discards_stale_bytes_both_ways() -> None:
    host, agent = HostConnection(authenticator=None), AgentConnection(authenticator=None)
    host.start()
    # Leftovers of an earlier session sit in the channel in both directions.
    assert agent.receive_data(encode_frame(FrameType.DATA, 3, b"old") + b"junk" + host.data_to_send()) == []
    stale_reply = encode_frame(FrameType.RESPONSE, 1, b"{}")
    assert host.receive_data(stale_reply + agent.data_to_send()) == []
    events = agent.receive_data(host.data_to_send())
    assert isinstance(events[0], HandshakeComplete) and events[0].version == 2
    (done,) = host.receive_data(agent.data_to_send())
    assert isinstance(done, HandshakeComplete)


def test_repeated_sync_is_acknowledged_and_harmless() -> None:
    host, agent = HostConnection(authenticator=None), AgentConnection(authenticator=None)
    host.start()
    first = host.data_to_send()
    host.start()  # the retry timer fired before the first ACK came back
    agent.receive_data(first + host.data_to_send())
    host.receive_data(agent.data_to_send())
    agent.receive_data(host.data_to_send())
    assert isinstance(host.receive_data(agent.data_to_send())[0], HandshakeComplete)


def test_unknown_version_is_a_clear_error() -> None:
    host, agent = HostConnection(versions=(99,), authenticator=None), AgentConnection(authenticator=None)
    host.start()
    agent.receive_data(host.data_to_send())
    host.receive_data(agent.data_to_send())
    assert agent.receive_data(host.data_to_send()) == []
    (event,) = host.receive_data(agent.data_to_send())
    assert isinstance(event, HandshakeFailed)
    assert isinstance(event.error, UnsupportedProtocolVersion)
    assert "[99]" in str(event.error) and "install a matching vmcontroller agent" in str(event.error)
    # The agent is not stuck: a host that speaks its version gets a session.
    good = HostConnection(authenticator=None)
    good.start()
    agent.receive_data(good.data_to_send())
    good.receive_data(agent.data_to_send())
    agent.receive_data(good.data_to_send())
    assert isinstance(good.receive_data(agent.data_to_send())[0], HandshakeComplete)


def test_request_response_and_streams() -> None:
    host, agent = opened()
    rid = host.send_request("exec", {"argv": ["true"]})
    assert host.send_data(rid, Channel.INPUT, b"stdin") == 5
    host.send_eof(rid, Channel.INPUT)
    events = agent.receive_data(host.data_to_send())
    assert events == [
        RequestReceived(rid, "exec", {"argv": ["true"]}),
        DataReceived(rid, Channel.INPUT, b"stdin"),
        StreamEnded(rid, Channel.INPUT, {}),
    ]
    agent.send_data(rid, Channel.STDOUT, b"out")
    agent.send_eof(rid, Channel.STDOUT, {"bytes": 3})
    agent.send_response(rid, {"exit_code": 0})
    assert host.receive_data(agent.data_to_send()) == [
        DataReceived(rid, Channel.STDOUT, b"out"),
        StreamEnded(rid, Channel.STDOUT, {"bytes": 3}),
        ResponseReceived(rid, {"exit_code": 0}),
    ]
    assert host.open_requests == agent.open_requests == 0


def test_error_maps_to_our_exception() -> None:
    host, agent = opened()
    rid = host.send_request("pull", {"path": "/nope"})
    agent.receive_data(host.data_to_send())
    agent.send_error(rid, PathNotFound("no such file: /nope", {"path": "/nope"}))
    (event,) = host.receive_data(agent.data_to_send())
    assert isinstance(event, ErrorReceived) and isinstance(event.error, PathNotFound)
    assert event.error.details == {"path": "/nope"}


def test_flow_control_window_and_credit() -> None:
    window = 64 * 1024
    host, agent = opened(agent_limits=Limits(max_frame=16 * 1024, window=window))
    rid = host.send_request("push", {})
    assert host.send_data(rid, Channel.INPUT, b"a" * (window + 10)) == window
    assert host.send_data(rid, Channel.INPUT, b"a") == 0
    events = agent.receive_data(host.data_to_send())
    chunks = [e for e in events if isinstance(e, DataReceived)]
    assert sum(len(c.data) for c in chunks) == window
    assert max(len(c.data) for c in chunks) == 16 * 1024  # split to the agent's frame limit
    agent.consumed(rid, Channel.INPUT, window // 8)
    assert agent.data_to_send() == b""  # credit goes back in batches
    agent.consumed(rid, Channel.INPUT, window // 8)
    assert host.receive_data(agent.data_to_send()) == [WindowOpened(rid, Channel.INPUT)]
    assert host.send_data(rid, Channel.INPUT, b"b" * window) == window // 4


def test_sending_past_the_window_breaks_the_protocol() -> None:
    host, agent = opened(agent_limits=Limits(window=4096))
    rid = host.send_request("push", {})
    agent.receive_data(host.data_to_send())
    flood = encode_frame(FrameType.DATA, rid, b"x" * 4097, Channel.INPUT)
    (event,) = agent.receive_data(flood)
    assert isinstance(event, ProtocolFailure) and "window" in str(event.error)
    # The agent told the host why before dropping the session.
    (told,) = host.receive_data(agent.data_to_send())
    assert isinstance(told, ErrorReceived) and told.request_id == 0 and isinstance(told.error, ProtocolError)


def test_oversized_frame_from_host_gets_a_clear_error_and_agent_recovers() -> None:
    host, agent = opened(agent_limits=Limits(max_frame=4096))
    (event,) = agent.receive_data(encode_frame(FrameType.REQUEST, 1, b"x" * 5000))
    assert isinstance(event, ProtocolFailure) and isinstance(event.error, FrameTooLarge)
    (told,) = host.receive_data(agent.data_to_send())
    assert isinstance(told, ErrorReceived) and isinstance(told.error, FrameTooLarge)
    # Resynchronising gives a working session again: nothing is wedged.
    host.start()
    agent.receive_data(host.data_to_send())
    host.receive_data(agent.data_to_send())
    agent.receive_data(host.data_to_send())
    assert isinstance(host.receive_data(agent.data_to_send())[0], HandshakeComplete)


def test_oversized_frame_from_agent_raises_on_host() -> None:
    host, _agent = opened(host_limits=Limits(max_frame=4096))
    with pytest.raises(FrameTooLarge):
        host.receive_data(encode_frame(FrameType.NOTIFY, 0, b"x" * 5000))


def test_in_flight_limit_checked_on_both_sides() -> None:
    host, agent = opened(agent_limits=Limits(max_inflight=2))
    host.send_request("a")
    host.send_request("b")
    with pytest.raises(TooManyRequests):
        host.send_request("c")
    agent.receive_data(host.data_to_send())
    # A host that ignores the limit is refused by the agent.
    agent.receive_data(encode_frame(FrameType.REQUEST, 99, b'{"op":"c","args":{}}'))
    assert b"too-many-requests" in agent.data_to_send()


def test_unknown_channel_is_a_violation() -> None:
    host, agent = opened()
    rid = host.send_request("exec")
    agent.receive_data(host.data_to_send())
    with pytest.raises(ProtocolError, match="unknown channel 9"):
        host.receive_data(encode_frame(FrameType.DATA, rid, b"x", 9))


def test_late_data_for_a_finished_request_is_dropped() -> None:
    host, agent = opened()
    rid = host.send_request("push")
    agent.receive_data(host.data_to_send())
    agent.send_error(rid, PathNotFound("missing"))
    host.send_data(rid, Channel.INPUT, b"still sending")
    assert agent.receive_data(host.data_to_send()) == []


def test_agent_restart_resets_host_session() -> None:
    host, _agent = opened()
    host.send_request("exec")
    restarted = AgentConnection(authenticator=None)
    restarted.announce_restart()
    (event,) = host.receive_data(restarted.data_to_send())
    assert isinstance(event, SessionReset) and not host.is_open and host.open_requests == 0
    # Nothing more is read until the host starts a new session.
    assert host.receive_data(ACK_MAGIC + b"n" * 16 + encode_frame(FrameType.HELLO, 0, b"{}")) == []


def test_new_sync_mid_session_resets_agent() -> None:
    host, agent = opened()
    rid = host.send_request("exec")
    agent.receive_data(host.data_to_send())
    host.start()
    events = agent.receive_data(host.data_to_send())
    assert [type(e) for e in events] == [SessionReset]
    assert agent.open_requests == 0
    agent.send_response(rid, {})  # the old operation's late answer goes nowhere
    assert host.receive_data(agent.data_to_send()) == []


def test_cancel_reaches_agent() -> None:
    host, agent = opened()
    rid = host.send_request("exec")
    host.send_cancel(rid, {"signal": "KILL"})
    events = agent.receive_data(host.data_to_send())
    assert events[-1] == CancelRequested(rid, {"signal": "KILL"})


def test_bad_json_request_is_refused_not_fatal() -> None:
    _host, agent = opened()
    assert agent.receive_data(encode_frame(FrameType.REQUEST, 5, b'["not", "an object"]')) == []
    assert b"bad-request" in agent.data_to_send()
    assert agent.is_open


def test_result_too_large_for_a_frame_becomes_an_error() -> None:
    host, agent = opened(host_limits=Limits(max_frame=4096))
    rid = host.send_request("list", {"path": "/huge"})
    agent.receive_data(host.data_to_send())
    agent.send_response(rid, ["entry"] * 2000)
    (event,) = host.receive_data(agent.data_to_send())
    assert isinstance(event, ErrorReceived) and isinstance(event.error, ResultTooLarge)
    assert "4096" in str(event.error)


def test_request_too_large_for_a_frame_is_refused_locally() -> None:
    host, _agent = opened(agent_limits=Limits(max_frame=4096))
    with pytest.raises(FrameTooLarge, match="stream large data"):
        host.send_request("exec", {"argv": ["x" * 5000]})


def test_queued_data_is_what_was_sent_even_if_the_caller_reuses_its_buffer() -> None:
    host, agent = opened(agent_limits=Limits(max_frame=1024))
    rid = host.send_request("push", {})
    agent.receive_data(host.data_to_send())
    buffer = bytearray(b"x" * 3000)
    assert host.send_data(rid, Channel.INPUT, memoryview(buffer)) == 3000
    immutable = b"y" * 2000
    assert host.send_data(rid, Channel.INPUT, memoryview(immutable)[500:]) == 1500
    buffer[:] = b"z" * 3000  # reused before the transport wrote it
    pieces = host.pieces_to_send()
    assert host.pieces_to_send() == []
    # Fed in small, unaligned pieces (as memoryviews, like the device reader hands them).
    wire = memoryview(b"".join(pieces))
    events = []
    for start in range(0, len(wire), 700):
        events += agent.receive_data(wire[start : start + 700])
    data = b"".join(e.data for e in events if isinstance(e, DataReceived))
    assert data == b"x" * 3000 + b"y" * 1500
    assert all(len(e.data) <= 1024 for e in events if isinstance(e, DataReceived))


def test_partial_frame_is_dropped_when_the_line_goes_idle() -> None:
    """A host left in the middle of a frame (a serial tty does not say so); the next one gets a session."""
    old, agent = opened()
    rid = old.send_request("push", {})
    agent.receive_data(old.data_to_send())
    old.send_data(rid, Channel.INPUT, b"x" * 1000)
    agent.receive_data(old.data_to_send()[:300])
    assert agent.holds_partial_frame
    new = HostConnection(authenticator=None)
    new.start()
    assert agent.receive_data(new.data_to_send()) == []  # the SYNC is taken for payload
    assert agent.data_to_send() == b""
    (event,) = agent.line_idle()
    assert isinstance(event, ProtocolFailure) and "middle of a frame" in str(event.error)
    assert not agent.is_open and agent.open_requests == 0 and not agent.holds_partial_frame
    # The ERROR reaches a host still listening; a new host skips it as stale bytes.
    (told,) = old.receive_data(agent.data_to_send())
    assert isinstance(told, ErrorReceived) and told.request_id == 0 and isinstance(told.error, ProtocolError)
    handshake(new, agent)  # the new host's next SYNC is found


def test_idle_line_between_whole_frames_changes_nothing() -> None:
    host, agent = opened()
    rid = host.send_request("push", {})
    host.send_data(rid, Channel.INPUT, b"x" * 1000)
    agent.receive_data(host.data_to_send())
    assert not agent.holds_partial_frame
    assert agent.line_idle() == []
    assert agent.data_to_send() == b""
    assert agent.is_open and agent.open_requests == 1
    agent.send_response(rid, {})
    assert host.receive_data(agent.data_to_send()) == [ResponseReceived(rid, {})]


def test_idle_line_while_hunting_changes_nothing() -> None:
    host, agent = HostConnection(authenticator=None), AgentConnection(authenticator=None)
    host.start()
    sync = host.data_to_send()
    agent.receive_data(b"stale bytes" + sync[:5])  # junk and the start of a SYNC
    assert not agent.holds_partial_frame
    assert agent.line_idle() == []
    assert agent.data_to_send() == b""
    agent.receive_data(sync[5:])
    host.receive_data(agent.data_to_send())  # the ACK: the SYNC was found
    agent.receive_data(host.data_to_send())
    assert isinstance(host.receive_data(agent.data_to_send())[0], HandshakeComplete)
