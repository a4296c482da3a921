"""
Both engines fed what an attacker would send: only our protocol errors come out, limits
hold, and nothing is leaked.  Each test is one class of defect found by trying.
"""

from __future__ import annotations

import pytest

from guest_agent.protocol.connection import (
    AgentConnection,
    DataReceived,
    ErrorReceived,
    HandshakeComplete,
    HostConnection,
    Limits,
    ProtocolFailure,
    RequestReceived,
    ResponseReceived,
)
from guest_agent.protocol.errors import FrameTooLarge, PathNotFound, ProtocolError, TooManyRequests
from guest_agent.protocol.frames import ACK_MAGIC, SYNC_MAGIC, Channel, FrameType, encode_frame, encode_json
from tests.unit.test_connection import opened


def host_awaiting_hello() -> HostConnection:
    """A host that has sent its HELLO and waits for the agent's."""
    host = HostConnection(authenticator=None)
    host.start()
    nonce = host.data_to_send()[len(SYNC_MAGIC):]
    assert host.receive_data(ACK_MAGIC + nonce) == []
    assert host.data_to_send()  # its HELLO
    return host


def agent_awaiting_hello() -> AgentConnection:
    agent = AgentConnection(authenticator=None)
    agent.receive_data(SYNC_MAGIC + b"n" * 16)
    agent.data_to_send()
    return agent


GOOD_AGENT_HELLO = {"version": 2, "max_frame": 4096, "window": 65536, "max_inflight": 4}


@pytest.mark.parametrize("payload", [
    b'{"version":2,"max_frame":1e999,"window":65536,"max_inflight":4}',  # OverflowError in int()
    b'{"version":2,"max_frame":NaN,"window":65536,"max_inflight":4}',
    b'{"version":2,"max_frame":Infinity,"window":65536,"max_inflight":4}',
    encode_json({**GOOD_AGENT_HELLO, "max_frame": "4096"}),  # int() would take it
    encode_json({**GOOD_AGENT_HELLO, "max_frame": 4096.5}),
    encode_json({**GOOD_AGENT_HELLO, "max_inflight": True}),
    encode_json({**GOOD_AGENT_HELLO, "window": [65536]}),  # TypeError in int()
    encode_json({**GOOD_AGENT_HELLO, "max_frame": 2**62}),  # absurd
    encode_json({**GOOD_AGENT_HELLO, "max_inflight": 10**9}),
    encode_json({**GOOD_AGENT_HELLO, "version": True}),  # True == 1, a bool all the same
    encode_json({**GOOD_AGENT_HELLO, "version": 2.0}),
    encode_json({**GOOD_AGENT_HELLO, "version": [2]}),
    b"[" * 100_000,  # RecursionError in the decoder
    b"[]",
])
def test_a_hostile_agent_hello_is_a_protocol_error(payload: bytes) -> None:
    host = host_awaiting_hello()
    with pytest.raises(ProtocolError):
        host.receive_data(encode_frame(FrameType.HELLO, 0, payload))
    assert not host.is_open


def test_the_same_hello_with_good_values_opens_the_session() -> None:
    host = host_awaiting_hello()
    (event,) = host.receive_data(encode_frame(FrameType.HELLO, 0, encode_json(GOOD_AGENT_HELLO)))
    assert isinstance(event, HandshakeComplete) and host.peer_limits.max_inflight == 4


@pytest.mark.parametrize("payload", [
    b'{"versions":[2],"max_frame":1e999,"window":65536,"max_inflight":4}',
    b'{"versions":[NaN],"max_frame":4096,"window":65536,"max_inflight":4}',
    b'{"versions":[[1]],"max_frame":4096,"window":65536,"max_inflight":4}',  # unhashable: TypeError
    b'{"versions":[2,"x"],"max_frame":4096,"window":65536,"max_inflight":4}',  # sorted(): TypeError
    b'{"versions":[2],"max_frame":{},"window":65536,"max_inflight":4}',
    b"{" * 50_000,
])
def test_a_hostile_host_hello_is_refused_and_the_agent_hunts_again(payload: bytes) -> None:
    agent = agent_awaiting_hello()
    events = agent.receive_data(encode_frame(FrameType.HELLO, 0, payload))
    assert [type(e) for e in events] == [ProtocolFailure]
    assert b"protocol-violation" in agent.data_to_send() and not agent.is_open
    # Hunting: what the host sends until its next SYNC is stale, and skipped without a word.
    assert agent.receive_data(encode_frame(FrameType.HELLO, 0, payload)) == []
    assert agent.data_to_send() == b""


def test_deeply_nested_json_in_a_session_is_our_error_on_both_ends() -> None:
    host, agent = opened()
    rid = host.send_request("ping")
    agent.receive_data(host.data_to_send())
    with pytest.raises(ProtocolError, match="nested too deeply"):
        host.receive_data(encode_frame(FrameType.RESPONSE, rid, b"[" * 100_000))
    host, agent = opened()
    events = agent.receive_data(encode_frame(FrameType.REQUEST, 7, b'{"op":"x","args":' + b"[" * 100_000))
    assert [type(e) for e in events] == [ProtocolFailure]


def test_an_error_larger_than_the_hosts_frame_limit_still_reaches_it() -> None:
    host, agent = opened(host_limits=Limits(max_frame=4096))
    rid = host.send_request("stat", {"path": "/" + "a" * 3000})
    agent.receive_data(host.data_to_send())
    path = "/" + "a" * 20_000  # a message and details quoting it twice: far over 4096 bytes
    agent.send_error(rid, PathNotFound(f"cannot stat {path}: {path}", {"path": path}))
    (event,) = host.receive_data(agent.data_to_send())
    assert isinstance(event, ErrorReceived) and isinstance(event.error, PathNotFound)
    assert "cut to fit a frame" in str(event.error) and host.open_requests == 0


def test_an_error_of_escaped_characters_is_cut_until_it_fits_the_smallest_frame() -> None:
    host, agent = opened(host_limits=Limits(max_frame=1024))
    rid = host.send_request("stat")
    agent.receive_data(host.data_to_send())
    agent.send_error(rid, PathNotFound("\U0001f600" * 5000))  # 12 bytes each once escaped
    (event,) = host.receive_data(agent.data_to_send())
    assert isinstance(event, ErrorReceived) and isinstance(event.error, PathNotFound)
    assert "(5000 characters, cut to fit a frame)" in str(event.error)


def test_a_request_over_the_agents_frame_limit_holds_no_slot() -> None:
    host, agent = opened(agent_limits=Limits(max_frame=4096, max_inflight=2))
    for _ in range(5):
        with pytest.raises(FrameTooLarge):
            host.send_request("exec", {"argv": ["x" * 5000]})
    assert host.open_requests == 0
    first, second = host.send_request("ping"), host.send_request("ping")
    with pytest.raises(TooManyRequests):
        host.send_request("ping")
    events = agent.receive_data(host.data_to_send())
    assert [e.request_id for e in events if isinstance(e, RequestReceived)] == [first, second] == [1, 2]


@pytest.mark.parametrize("frame_type", [FrameType.RESPONSE, FrameType.ERROR, FrameType.DATA,
                                        FrameType.EOF, FrameType.CREDIT])
def test_frames_for_a_request_never_asked_are_a_violation(frame_type: FrameType) -> None:
    host, _agent = opened()
    host.send_request("ping")
    payload = {FrameType.CREDIT: b"\0\0\0\1", FrameType.DATA: b"x",
               FrameType.ERROR: encode_json({"code": "internal", "message": "x"})}.get(frame_type, b"{}")
    with pytest.raises(ProtocolError, match="request 99, which is not in flight"):
        host.receive_data(encode_frame(frame_type, 99, payload, Channel.STDOUT))


def test_a_duplicate_answer_is_a_violation() -> None:
    host, agent = opened()
    rid = host.send_request("ping")
    agent.receive_data(host.data_to_send())
    agent.send_response(rid, {"time": 1.0, "version": "x"})
    answer = agent.data_to_send()
    (event,) = host.receive_data(answer)
    assert isinstance(event, ResponseReceived)
    with pytest.raises(ProtocolError, match="not in flight"):
        host.receive_data(answer)


def test_unread_stream_bytes_are_bounded_across_the_connection() -> None:
    # Each stream keeps within its window; together they would not fit in max_buffered.
    host, agent = opened(host_limits=Limits(window=64 * 1024, max_buffered=100 * 1024))
    rids = [host.send_request("exec") for _ in range(2)]
    agent.receive_data(host.data_to_send())
    assert agent.send_data(rids[0], Channel.STDOUT, b"o" * 60 * 1024) == 60 * 1024
    assert agent.send_data(rids[0], Channel.INPUT, b"i" * 30 * 1024) == 30 * 1024
    events = host.receive_data(agent.data_to_send())
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 90 * 1024
    assert host.buffered == 90 * 1024
    # What the application reads no longer counts: this much more fits ...
    host.consumed(rids[0], Channel.STDOUT, 20 * 1024)
    agent.send_data(rids[1], Channel.STDERR, b"e" * 30 * 1024)
    host.receive_data(agent.data_to_send())
    assert host.buffered == 100 * 1024
    # ... and one byte more does not.
    agent.send_data(rids[1], Channel.STDERR, b"e")
    with pytest.raises(ProtocolError, match="max_buffered"):
        host.receive_data(agent.data_to_send())


def test_an_answered_request_no_longer_counts_as_buffered() -> None:
    host, agent = opened()
    rid = host.send_request("pull")
    agent.receive_data(host.data_to_send())
    agent.send_data(rid, Channel.INPUT, b"x" * 1000)
    agent.send_response(rid, {})
    host.receive_data(agent.data_to_send())
    assert host.buffered == 0


@pytest.mark.parametrize("body", [b'{"name":"x","body":[1]}', b'{"name":3}', b"[]"])
def test_a_malformed_notification_is_a_violation(body: bytes) -> None:
    host, _agent = opened()
    with pytest.raises(ProtocolError, match="NOTIFY"):
        host.receive_data(encode_frame(FrameType.NOTIFY, 0, body))
