"""
Properties of both protocol engines (hypothesis), through tests/fuzz/harness.py: random
interleavings of honest calls, partial deliveries and hostile frames never raise anything
but the host's ProtocolError (the agent raises nothing), and keep the in-flight counts,
credit windows and buffered bytes within their limits.  Each example runs in development
mode or, drawn as often, inside mutually authenticated TLS, where hostile frames are
sealed in the sender's own session and records are forged below it.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from guest_agent.protocol.connection import Limits
from guest_agent.protocol.frames import ACK_MAGIC, RESET_MARKER, SYNC_MAGIC, FrameType, encode_json
from tests.fuzz.harness import AGENT, HONEST_KINDS, HOST, KINDS, Duel, Step

limits = st.builds(
    Limits,
    max_frame=st.integers(1024, 4096),
    window=st.integers(1024, 16 * 1024),
    max_inflight=st.integers(1, 4),
)

# Payloads a hostile peer might send: JSON that is nearly right, junk, and pieces of markers.
hostile_json = st.sampled_from(
    [
        {"version": 1, "max_frame": 1024, "window": 1024, "max_inflight": 1},
        {"version": 1, "max_frame": 10**30, "window": 10**30, "max_inflight": 0},
        {"versions": [1], "max_frame": 4096, "window": 4096, "max_inflight": 2},
        {"versions": [[1]], "max_frame": 1024, "window": 1024, "max_inflight": 1},
        {"versions": ["x", 7], "max_frame": 1024, "window": 1024, "max_inflight": 1},
        {"versions": [1], "max_frame": "big", "window": None, "max_inflight": 1},
        # The current version (both ends in development mode speak it in the clear): its
        # limits at, just under and far over their bounds, and of the wrong types.
        {"version": 2, "max_frame": 1024, "window": 1024, "max_inflight": 1},
        {"version": 2, "max_frame": 1023, "window": 1024, "max_inflight": 1},
        {"version": 2, "max_frame": 2**24, "window": 2**26, "max_inflight": 4096},
        {"version": 2, "max_frame": 2**24 + 1, "window": 2**26 + 1, "max_inflight": 4097},
        {"version": 2, "max_frame": 10**30, "window": 10**30, "max_inflight": 0},
        {"version": 2, "max_frame": True, "window": 1024, "max_inflight": 1},
        {"version": 2, "max_frame": 1024.0, "window": 1024, "max_inflight": 1},
        {"versions": [2, 1], "max_frame": 4096, "window": 4096, "max_inflight": 2},
        {"versions": [3, 2], "max_frame": 4096, "window": 4096, "max_inflight": 2},
        {"version": 2},
        {"op": "ping", "args": {}},
        {"op": 3},
        {"op": "x", "args": []},
        {"code": "path-not-found", "message": "m", "details": []},
        {"code": 5},
        {"name": "n", "body": {}},
        {"name": 1},
        {"sha256": "0", "size": 1},
        [],
        "text",
        1.5,
        None,
    ]
).map(encode_json)
payloads = st.one_of(
    hostile_json,
    st.sampled_from(
        [
            b"",
            b"{",
            b"1e999999",
            b"[" * 5000,
            b'{"version":1e400}',
            b"\x00\xff",
            b'{"versions":[1],"max_frame":1e400,"window":1024,"max_inflight":1}',
            b'{"version":1,"max_frame":NaN,"window":1024,"max_inflight":1}',
        ]
    ),
    st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),
    st.binary(max_size=64),
)
junk = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([SYNC_MAGIC, ACK_MAGIC, RESET_MARKER, SYNC_MAGIC[:5], b"\xa5\x5a", b"\xff"]),
)


def steps(kinds: tuple[str, ...]) -> st.SearchStrategy[Step]:
    return st.builds(
        Step,
        # Deliveries and requests more often: most damage needs a session with work in flight.
        kind=st.sampled_from(kinds + ("deliver",) * 4 + ("request",) * 2),
        side=st.sampled_from([HOST, AGENT]),
        slot=st.integers(0, 7),
        channel=st.integers(0, 2),
        size=st.one_of(st.integers(0, 64), st.integers(0, 40_000)),
        frame_type=st.sampled_from([int(t) for t in FrameType]),
        flags=st.sampled_from([0, 1, 2, 3, 255]),
        request_id=st.sampled_from([0, 0, 0, 1, 2, 0xFFFFFFFF]),
        payload=st.one_of(payloads, junk),
    )


@given(limits, limits, st.lists(steps(KINDS), max_size=40), st.booleans())
def test_engines_survive_any_interleaving(
    host_limits: Limits, agent_limits: Limits, script: list[Step], tls: bool
) -> None:
    duel = Duel.opened(host_limits, agent_limits, tls=tls)
    duel.run(script)
    duel.settle()


@given(
    limits,
    limits,
    st.lists(steps(tuple(k for k in HONEST_KINDS if k != "start")), max_size=60),
    st.booleans(),
)
def test_honest_traffic_arrives_whole_and_in_order(
    host_limits: Limits, agent_limits: Limits, script: list[Step], tls: bool
) -> None:
    duel = Duel.opened(host_limits, agent_limits, tls=tls)
    duel.run(script)
    duel.settle()
    # Without a hostile step, no session broke and every stream carried exactly what was sent.
    assert duel.host_errors == 0 and duel.host_engine.is_open and duel.agent_engine.is_open
    for sender, receiver in ((duel.host, duel.agent), (duel.agent, duel.host)):
        for key in set(receiver.received) & set(sender.sent):
            assert receiver.received[key] == sender.sent[key]


@given(limits, limits, st.lists(steps(KINDS), max_size=30), st.booleans())
def test_a_new_session_always_opens_after_any_damage(
    host_limits: Limits, agent_limits: Limits, script: list[Step], tls: bool
) -> None:
    duel = Duel.opened(host_limits, agent_limits, tls=tls)
    duel.run(script)
    # Whatever happened, the host's next SYNC gives a working session with its agent.
    duel.agent_engine.host_disconnected()
    duel.agent.forget_all()
    duel.host.outbox.clear()
    duel.agent.outbox.clear()
    duel.run([Step("start")])
    duel.settle()
    assert duel.host_engine.is_open and duel.agent_engine.is_open
    assert duel.host_engine.authenticated == duel.agent_engine.authenticated == tls


first_frames = st.one_of(st.just(int(FrameType.HELLO)), st.sampled_from([int(t) for t in FrameType]))
hello_payloads = st.one_of(hostile_json, payloads)


@given(limits, hello_payloads, first_frames)
def test_the_agent_survives_any_first_frame(agent_limits: Limits, payload: bytes, frame_type: int) -> None:
    """Between SYNC and HELLO the agent parses the host's limits: anything there is refused cleanly."""
    duel = Duel(Limits(), agent_limits)
    duel.run([Step("sync"), Step("frame", side=AGENT, frame_type=frame_type, payload=payload)])


@given(limits, hello_payloads, first_frames)
def test_the_host_survives_any_answer_to_its_hello(
    host_limits: Limits, payload: bytes, frame_type: int
) -> None:
    """After the ACK the host parses the agent's HELLO: anything there is our ProtocolError at worst."""
    duel = Duel(host_limits, Limits())
    duel.run([Step("start"), Step("ack"), Step("frame", side=HOST, frame_type=frame_type, payload=payload)])
