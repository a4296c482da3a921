"""
Mutual authentication in the sans-I/O engines: TLS 1.3 through memory BIOs, the host's and
the agent's ends joined by hand, no reactor and no sockets.

Every way in without this VM's credentials is refused with our own exception and a message
that says why, and the agent then serves its real host as before.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
from typing import Any, cast

import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from guest_agent.protocol.connection import (
    TLS_FRAME_MAX,
    AgentConnection,
    DataReceived,
    ErrorReceived,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    HostConnection,
    ProtocolFailure,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
)
from guest_agent.protocol.errors import (
    AuthenticationFailed,
    FrameTooLarge,
    ProtocolError,
    TamperingDetected,
    UnsupportedProtocolVersion,
)
from guest_agent.protocol.frames import (
    ACK_MAGIC,
    HEADER_SIZE,
    SYNC_MAGIC,
    Channel,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_header,
    encode_json,
)
from guest_agent.protocol.tls import (
    RECORD_CIPHERTEXT_MAX,
    RECORD_PLAINTEXT_MAX,
    Authenticator,
    Credentials,
    _RecordCounter,
)
from vmcontroller.client import host_authenticator
from vmcontroller.credentials import mint
from vmcontroller.errors import CredentialsUnavailable

HOST_CREDENTIALS, AGENT_CREDENTIALS = mint()
HOST = Authenticator.from_credentials(HOST_CREDENTIALS, server_side=False)
AGENT = Authenticator.from_credentials(AGENT_CREDENTIALS, server_side=True)
OTHER_HOST_CREDENTIALS, OTHER_AGENT_CREDENTIALS = mint()  # another VM's


def exchange(host: HostConnection, agent: AgentConnection) -> tuple[list[Event], list[Event]]:
    """Move bytes both ways until both ends are quiet; the events each end produced."""
    host_events: list[Event] = []
    agent_events: list[Event] = []
    for _ in range(20):
        to_agent = host.data_to_send()
        agent_events += agent.receive_data(to_agent)
        to_host = agent.data_to_send()
        host_events += host.receive_data(to_host)
        if not to_agent and not to_host:
            return host_events, agent_events
    raise AssertionError("the ends never stopped talking")


def connected(host: HostConnection | None = None, agent: AgentConnection | None = None) -> tuple[
    HostConnection, AgentConnection
]:
    host = host or HostConnection(authenticator=HOST)
    agent = agent or AgentConnection(authenticator=AGENT)
    host.start()
    host_events, agent_events = exchange(host, agent)
    assert [type(e) for e in host_events] == [HandshakeComplete]
    assert [type(e) for e in agent_events] == [HandshakeComplete]
    assert host.authenticated and agent.authenticated
    return host, agent


def assert_serves_its_host(agent: AgentConnection) -> None:
    """The real host gets a session and a round trip, whatever came before."""
    host, agent = connected(agent=agent)
    rid = host.send_request("ping")
    (request,) = agent.receive_data(host.data_to_send())
    assert request == RequestReceived(rid, "ping", {})
    agent.send_response(rid, {"pong": True})
    assert host.receive_data(agent.data_to_send()) == [ResponseReceived(rid, {"pong": True})]


def refused_by_agent(agent_events: list[Event]) -> ProtocolError:
    (failure,) = [e for e in agent_events if isinstance(e, ProtocolFailure)]
    return failure.error


def test_session_runs_inside_tls() -> None:
    host, agent = connected()
    secret = b"the same bytes would be visible on a plaintext channel"
    rid = host.send_request("push", {"path": "/x"})
    host.send_data(rid, Channel.INPUT, secret)
    host.send_eof(rid, Channel.INPUT, {"size": len(secret)})
    wire = host.data_to_send()
    assert secret not in wire and b"push" not in wire
    # On the wire: TLS frames only.
    decoder = FrameDecoder(1 << 20)
    decoder.feed(wire)
    frames = []
    while (item := decoder.next()) is not None:
        frames.append(item)
    assert {getattr(f, "type", None) for f in frames} == {FrameType.TLS}
    assert agent.receive_data(wire) == [
        RequestReceived(rid, "push", {"path": "/x"}),
        DataReceived(rid, Channel.INPUT, secret),
        StreamEnded(rid, Channel.INPUT, {"size": len(secret)}),
    ]


def test_large_data_crosses_in_tls_frames_under_the_limit() -> None:
    host, agent = connected()
    rid = host.send_request("push", {})
    data = bytes(range(256)) * 4096  # 1 MiB
    assert host.send_data(rid, Channel.INPUT, data) == len(data)
    events = agent.receive_data(host.data_to_send())
    received = b"".join(e.data for e in events if isinstance(e, DataReceived))
    assert received == data


def tls_records(wire: bytes) -> list[tuple[int, int]]:
    """(TLS frame payload size, record ciphertext size) for every record in ``wire``."""
    decoder = FrameDecoder(1 << 20)
    decoder.feed(wire)
    records = []
    while (frame := decoder.next()) is not None:
        assert isinstance(frame, Frame) and frame.type is FrameType.TLS
        at = 0
        while at < len(frame.payload):
            length = int.from_bytes(frame.payload[at + 3 : at + 5], "big")
            records.append((len(frame.payload), length))
            at += 5 + length
        assert at == len(frame.payload)  # a frame holds whole records
    return records


class _CountingReads:
    """Stands in for a session's ``SSLObject``: counts the reads that found nothing."""

    def __init__(self, real: ssl.SSLObject) -> None:
        self.real = real
        self.empty_reads = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def read(self, *args: object) -> object:
        try:
            return self.real.read(*args)  # type: ignore[arg-type]
        except ssl.SSLWantReadError:
            self.empty_reads += 1
            raise


def test_a_round_trip_is_one_record_each_way_and_no_read_comes_back_empty() -> None:
    host, agent = connected()
    counters = []
    for end in (host, agent):
        assert end._tls is not None
        counter = _CountingReads(end._tls._tls)
        end._tls._tls = counter  # type: ignore[assignment]
        counters.append(counter)
    for _ in range(3):
        rid = host.send_request("ping")
        request = host.data_to_send()
        assert len(tls_records(request)) == 1
        assert agent.receive_data(request) == [RequestReceived(rid, "ping", {})]
        agent.send_response(rid, {"pong": True})
        response = agent.data_to_send()
        assert len(tls_records(response)) == 1
        assert host.receive_data(response) == [ResponseReceived(rid, {"pong": True})]
    assert [c.empty_reads for c in counters] == [0, 0]


def test_frames_queued_together_share_records_and_large_data_fills_them() -> None:
    host, _ = connected()
    rids = [host.send_request("ping") for _ in range(10)]
    assert len(tls_records(host.data_to_send())) == 1  # ten small frames, one record
    rid = rids[0]
    data = bytes(range(256)) * 4096  # 1 MiB: DATA frames of 256 KiB and their headers
    host.send_data(rid, Channel.INPUT, data)
    host.send_eof(rid, Channel.INPUT)
    records = tls_records(host.data_to_send())
    assert all(frame <= TLS_FRAME_MAX for frame, _ in records)
    # Every record full (16 KiB, its content type and tag), the headers between the
    # payloads included, but the last: 4 x (16-byte header + 256 KiB) + EOF's 16 bytes.
    plaintext = 4 * (16 + 262144) + 16
    assert [record for _, record in records] == [16384 + 17] * (plaintext // 16384) + [plaintext % 16384 + 17]


@pytest.mark.parametrize("longest", [1, 7])
def test_records_cut_across_tls_frames_anywhere_arrive_whole(longest: int) -> None:
    host, agent = connected()
    rid = host.send_request("push", {})
    data = bytes(range(256)) * 160  # 40 KiB: three records
    host.send_data(rid, Channel.INPUT, data)
    host.send_eof(rid, Channel.INPUT)
    decoder = FrameDecoder(1 << 20)
    decoder.feed(host.data_to_send())
    stream = b"".join(frame.payload for frame in iter(decoder.next, None) if isinstance(frame, Frame))
    # A peer may cut its records anywhere between TLS frames (the handshake's are cut at
    # the frame limit): here into frames of 1, 2, ... ``longest`` bytes, headers cut too.
    events: list[Event] = []
    at, step = 0, 1
    while at < len(stream):
        events += agent.receive_data(encode_frame(FrameType.TLS, 0, stream[at : at + step]))
        at += step
        step = step % longest + 1
    assert events[0] == RequestReceived(rid, "push", {})
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == data
    assert events[-1] == StreamEnded(rid, Channel.INPUT, {})


def test_a_record_header_announcing_too_much_is_refused_at_once() -> None:
    _, agent = connected()
    # An application-data record header claiming 64 KiB: TLS allows 16 KiB and 256 bytes.
    # The agent must refuse it now, not hold the channel waiting for the rest.
    events = agent.receive_data(encode_frame(FrameType.TLS, 0, b"\x17\x03\x03\xff\xff" + b"x" * 100))
    error = refused_by_agent(events)
    assert isinstance(error, TamperingDetected)
    assert agent.partial_frame_bytes == 0
    assert_serves_its_host(agent)


@pytest.mark.parametrize("closer", ["agent", "host"])
def test_a_peer_that_closes_its_tls_session_ends_ours_and_is_not_buffered(closer: str) -> None:
    """
    A hostile guest holds valid credentials: it can end its TLS session properly (a sealed
    close_notify) and write on.  The other end must drop the session at once, not keep
    every later record unread in its buffer for as long as the peer writes.
    """
    host, agent = connected()
    sender, receiver = (agent, host) if closer == "agent" else (host, agent)
    assert sender._tls is not None
    with pytest.raises(ssl.SSLWantReadError):
        sender._tls._tls.unwrap()  # sends close_notify, then would wait for the peer's
    close_notify = encode_frame(FrameType.TLS, 0, sender._tls.ciphertext())
    junk = encode_frame(FrameType.TLS, 0, b"\x17\x03\x03\x40\x00" + bytes(16384))
    closed = (
        "the peer closed its TLS session in the middle of ours (neither end of vmcontroller ever does): "
        "dropped the session"
    )
    if receiver is host:
        with pytest.raises(TamperingDetected) as raised:
            host.receive_data(close_notify + junk)
        assert str(raised.value) == closed
    else:
        error = refused_by_agent(agent.receive_data(close_notify + junk))
        assert isinstance(error, TamperingDetected) and str(error) == closed
        assert agent.buffered == 0 and agent._tls is None  # nothing of the peer's kept
        assert_serves_its_host(agent)


def test_host_without_credentials_is_refused() -> None:
    """A TLS client with no certificate at all: what anyone on the channel could try."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=AGENT_CREDENTIALS.certificate)
    anonymous = HostConnection(authenticator=Authenticator(context, AGENT_CREDENTIALS.certificate, False))
    agent = AgentConnection(authenticator=AGENT)
    anonymous.start()
    host_events, agent_events = exchange(anonymous, agent)
    error = refused_by_agent(agent_events)
    assert isinstance(error, AuthenticationFailed)
    assert str(error) == (
        "TLS handshake with the host failed: the host has no credentials for this VM "
        "(PEER_DID_NOT_RETURN_A_CERTIFICATE)"
    )
    assert not agent.is_open
    # The intruder learns it was refused, with the same error class.
    (failed,) = host_events
    assert isinstance(failed, HandshakeFailed) and str(failed.error) == (
        "TLS handshake with the agent failed: the agent requires a certificate and this end sent none "
        "(TLSV13_ALERT_CERTIFICATE_REQUIRED)"
    )
    assert_serves_its_host(agent)


def test_host_with_another_vms_credentials_is_refused() -> None:
    # Even pinning this VM's agent correctly, its own certificate is not this VM's host's.
    other = Credentials(
        OTHER_HOST_CREDENTIALS.private_key, OTHER_HOST_CREDENTIALS.certificate, AGENT_CREDENTIALS.certificate
    )
    stranger = HostConnection(authenticator=Authenticator.from_credentials(other, server_side=False))
    agent = AgentConnection(authenticator=AGENT)
    stranger.start()
    host_events, agent_events = exchange(stranger, agent)
    error = refused_by_agent(agent_events)
    assert isinstance(error, AuthenticationFailed) and str(error) == (
        "the host presented a certificate that is not the one pinned for this VM (self-signed certificate): "
        "it is another VM's, stale, or not ours"
    )
    (failed,) = host_events
    assert isinstance(failed, HandshakeFailed) and str(failed.error) == (
        "TLS handshake with the agent failed: the agent does not accept this end's certificate (credentials "
        "of another VM, or stale ones: rotate them) (TLSV1_ALERT_UNKNOWN_CA)"
    )
    assert_serves_its_host(agent)


def test_agent_of_another_vm_is_refused_by_the_host() -> None:
    host = HostConnection(authenticator=HOST)
    other = Authenticator.from_credentials(OTHER_AGENT_CREDENTIALS, server_side=True)
    impostor = AgentConnection(authenticator=other)
    host.start()
    host_events, agent_events = exchange(host, impostor)
    (failed,) = host_events
    assert isinstance(failed, HandshakeFailed) and isinstance(failed.error, AuthenticationFailed)
    assert str(failed.error) == (
        "the agent presented a certificate that is not the one pinned for this VM (self-signed certificate): "
        "it is another VM's, stale, or not ours"
    )
    assert not host.authenticated and host.tls_cipher is None and not host.is_open
    assert str(refused_by_agent(agent_events)) == (
        "TLS handshake with the host failed: the host does not accept this end's certificate (credentials "
        "of another VM, or stale ones: rotate them) (TLSV1_ALERT_UNKNOWN_CA)"
    )
    assert not host.is_open


def test_replayed_handshake_is_refused() -> None:
    """Everything a host once sent, replayed to the agent: TLS's fresh randoms make it fail."""
    host, agent = HostConnection(authenticator=HOST), AgentConnection(authenticator=AGENT)
    host.start()
    recorded = b""
    for _ in range(10):
        sent = host.data_to_send()
        recorded += sent
        agent.receive_data(sent)
        host.receive_data(agent.data_to_send())
    assert host.is_open
    replaying = AgentConnection(authenticator=AGENT)
    events = replaying.receive_data(recorded)
    error = refused_by_agent(events)
    assert isinstance(error, AuthenticationFailed)
    assert str(error) == (
        "TLS handshake with the host failed: a handshake message did not verify: a replayed or altered "
        "handshake (DECRYPTION_FAILED_OR_BAD_RECORD_MAC)"
    )
    assert not replaying.is_open
    assert_serves_its_host(replaying)


def test_tampered_frame_mid_session_ends_the_session_and_the_next_works() -> None:
    host, agent = connected()
    rid = host.send_request("exec", {"argv": ["true"]})
    wire = bytearray(host.data_to_send())
    wire[-3] ^= 0x01  # a bit of the record's ciphertext; the frame header's CRC still holds
    events = agent.receive_data(bytes(wire))
    error = refused_by_agent(events)
    tampered = (
        "a record from the peer failed TLS's integrity check (DECRYPTION_FAILED_OR_BAD_RECORD_MAC): the "
        "channel was tampered with, or bytes were lost"
    )
    assert isinstance(error, TamperingDetected) and str(error) == tampered
    assert not any(isinstance(e, RequestReceived) for e in events)  # nothing was acted on
    # The host hears why (outside TLS, which is broken) and starts over.
    (told,) = host.receive_data(agent.data_to_send())
    assert isinstance(told, ErrorReceived) and told.request_id == 0
    assert isinstance(told.error, TamperingDetected) and str(told.error) == tampered
    assert rid and host.open_requests == 1  # the client fails it and resynchronises
    assert_serves_its_host(agent)


def test_tampered_frame_from_the_agent_is_our_error_on_the_host() -> None:
    host, agent = connected()
    rid = host.send_request("ping")
    agent.receive_data(host.data_to_send())
    agent.send_response(rid, {"ok": 1})
    wire = bytearray(agent.data_to_send())
    wire[-1] ^= 0x80
    with pytest.raises(TamperingDetected):
        host.receive_data(bytes(wire))


def test_plaintext_frame_injected_into_an_authenticated_session_is_refused() -> None:
    host, agent = connected()
    events = agent.receive_data(encode_frame(FrameType.REQUEST, 7, b'{"op":"exec","args":{"argv":["sh"]}}'))
    error = refused_by_agent(events)
    assert str(error) == (
        "the host sent a REQUEST frame outside TLS on an authenticated channel: dropped the session "
        "(something other than the host may be writing to the channel)"
    )
    assert not any(isinstance(e, RequestReceived) for e in events)
    with pytest.raises(ProtocolError) as raised:
        host.receive_data(encode_frame(FrameType.RESPONSE, 1, b"{}"))
    assert str(raised.value) == (
        "the agent sent a RESPONSE frame outside TLS on an authenticated channel: dropped the session "
        "(something other than the agent may be writing to the channel)"
    )


def with_request_id(wire: bytes, request_id: int) -> bytes:
    """The first frame of ``wire`` (a TLS frame) sent under ``request_id`` instead of 0."""
    length = int.from_bytes(wire[8:12], "big")
    return encode_header(FrameType.TLS, request_id, length) + wire[HEADER_SIZE:]


def test_a_tls_frame_with_a_request_id_is_refused_at_either_end() -> None:
    """TLS frames belong to the connection: one that names a request is not read."""
    host, agent = connected()
    host.send_request("ping")
    events = agent.receive_data(with_request_id(host.data_to_send(), 7))
    assert str(refused_by_agent(events)) == (
        "a TLS frame carries request id 7: TLS frames belong to the connection (id 0); dropped the session"
    )
    assert not any(isinstance(e, RequestReceived) for e in events)
    assert_serves_its_host(agent)
    host, agent = connected()
    rid = host.send_request("ping")
    agent.receive_data(host.data_to_send())
    agent.send_response(rid, {"ok": 1})
    with pytest.raises(ProtocolError) as raised:
        host.receive_data(with_request_id(agent.data_to_send(), rid))
    assert str(raised.value) == (
        f"a TLS frame carries request id {rid}: TLS frames belong to the connection (id 0); "
        "dropped the session"
    )


def test_plaintext_frames_before_the_handshake_are_refused_as_such() -> None:
    """Before TLS, a plaintext frame that is not HELLO is not taken for a HELLO (either end)."""
    agent = AgentConnection(authenticator=AGENT)
    agent.receive_data(SYNC_MAGIC + b"n" * 16)
    events = agent.receive_data(encode_frame(FrameType.REQUEST, 1, b'{"op":"ping","args":{}}'))
    assert str(refused_by_agent(events)) == (
        "the host sent a REQUEST frame outside TLS on an authenticated channel: dropped the session "
        "(something other than the host may be writing to the channel)"
    )
    assert_serves_its_host(agent)
    host = HostConnection(authenticator=HOST)
    host.start()
    nonce = host.data_to_send()[-16:]
    with pytest.raises(ProtocolError) as raised:
        host.receive_data(ACK_MAGIC + nonce + encode_frame(FrameType.RESPONSE, 1, b"{}"))
    assert str(raised.value) == (
        "the agent sent a RESPONSE frame outside TLS on an authenticated channel: dropped the session "
        "(something other than the agent may be writing to the channel)"
    )


@pytest.mark.parametrize(
    ("hello", "refusal"),
    [
        (
            b'{"versions":[2],"max_frame":262144,"window":4194304,"max_inflight":64}',
            "the host sent an unauthenticated HELLO and this agent requires authentication: the host "
            "runs in development mode, or something else is impersonating it",
        ),
        (
            b'{"versions":[1],"max_frame":262144,"window":4194304,"max_inflight":64}',
            "the host offered protocol versions [1] without authentication; this agent speaks [2], "
            "mutually authenticated only: upgrade vmcontroller on the host",
        ),
        (b'{"versions":[]}', "the host offered protocol versions [] without authentication; this agent "
         "speaks [2], mutually authenticated only: upgrade vmcontroller on the host"),
        (b'{"versions":2}', "the host offered protocol versions 2 without authentication; this agent "
         "speaks [2], mutually authenticated only: upgrade vmcontroller on the host"),
        (b"[2]", "the host offered protocol versions None without authentication; this agent speaks "
         "[2], mutually authenticated only: upgrade vmcontroller on the host"),
    ],
    ids=["current", "old", "none", "not-a-list", "not-an-object"],
)
def test_a_plaintext_hello_is_refused_saying_what_the_host_should_do(hello: bytes, refusal: str) -> None:
    agent = AgentConnection(authenticator=AGENT)
    agent.receive_data(SYNC_MAGIC + b"n" * 16)
    error = refused_by_agent(agent.receive_data(encode_frame(FrameType.HELLO, 0, hello)))
    assert str(error) == refusal
    assert_serves_its_host(agent)


def test_a_marker_sealed_inside_tls_is_refused() -> None:
    host, agent = connected()
    assert host._tls is not None
    (records,) = host._tls.seal([SYNC_MAGIC + b"n" * 16])
    error = refused_by_agent(agent.receive_data(encode_frame(FrameType.TLS, 0, records)))
    assert str(error) == "a marker inside the TLS session: only frames may travel there"


def test_a_handshake_flight_cut_across_tls_frames_completes_before_hello() -> None:
    """The host says HELLO once its handshake is complete, not at the first piece of the flight."""
    host, agent = HostConnection(authenticator=HOST), AgentConnection(authenticator=AGENT)
    host.start()
    agent.receive_data(host.data_to_send())
    assert host.receive_data(agent.data_to_send()) == []  # the ACK: the host starts TLS
    agent.receive_data(host.data_to_send())  # its ClientHello
    decoder = FrameDecoder(1 << 20)
    decoder.feed(agent.data_to_send())  # the agent's flight, up to its Finished
    flight = []
    while (item := decoder.next()) is not None:
        assert isinstance(item, Frame) and item.type is FrameType.TLS
        flight.append(bytes(item.payload))
    ciphertext = b"".join(flight)
    agent_events = []
    for start in range(0, len(ciphertext), 100):
        piece = ciphertext[start : start + 100]
        events = host.receive_data(encode_frame(FrameType.TLS, 0, piece))
        assert events == []  # nothing to say until the agent's HELLO
        assert host._tls is not None
        sent = host.data_to_send()
        if not host._tls.established:
            assert sent == b""  # neither a HELLO nor anything else before the handshake ends
        else:
            agent_events += agent.receive_data(sent)
    host_events, more = exchange(host, agent)
    agent_events += more
    assert [type(e) for e in host_events] == [HandshakeComplete]
    assert HandshakeComplete in [type(e) for e in agent_events]


def test_downgrade_to_no_authentication_is_refused_by_the_agent() -> None:
    """A host (or a meddler) that skips TLS and sends HELLO in the clear."""
    dev_host = HostConnection(authenticator=None)
    agent = AgentConnection(authenticator=AGENT)
    dev_host.start()
    host_events, agent_events = exchange(dev_host, agent)
    assert isinstance(refused_by_agent(agent_events), AuthenticationFailed)
    (failed,) = host_events
    assert isinstance(failed, HandshakeFailed) and isinstance(failed.error, AuthenticationFailed)
    assert str(failed.error) == (  # the agent's refusal, as the host hears it
        "the host sent an unauthenticated HELLO and this agent requires authentication: the host runs "
        "in development mode, or something else is impersonating it"
    )
    assert_serves_its_host(agent)


def test_downgrade_to_no_authentication_is_refused_by_the_host() -> None:
    """An agent that answers in the clear (development mode, or something in its place)."""
    host = HostConnection(authenticator=HOST)
    dev_agent = AgentConnection(authenticator=None)
    host.start()
    host_events, agent_events = exchange(host, dev_agent)
    (failed,) = host_events
    assert isinstance(failed, HandshakeFailed) and isinstance(failed.error, AuthenticationFailed)
    assert str(failed.error) == (  # the agent's refusal, as the host hears it
        "the host wants to authenticate and this agent runs in development mode, without credentials: "
        "give the agent its credentials (or run the host in development mode too, for development only)"
    )
    assert isinstance(refused_by_agent(agent_events), AuthenticationFailed)


def test_meddler_answering_a_plaintext_hello_for_the_agent_is_refused() -> None:
    host = HostConnection(authenticator=HOST)
    host.start()
    nonce = host.data_to_send()[-16:]
    hello = {"version": 2, "max_frame": 262144, "window": 4194304, "max_inflight": 64}
    (failed,) = host.receive_data(ACK_MAGIC + nonce + encode_frame(FrameType.HELLO, 0, encode_json(hello)))
    assert isinstance(failed, HandshakeFailed) and isinstance(failed.error, AuthenticationFailed)
    assert str(failed.error) == (
        "the agent answered without authentication: it runs in development mode, or something else "
        "answers in its place. Refused; give the agent its credentials (or run both ends in "
        "development mode, for development only)"
    )
    assert not host.is_open


def test_old_host_without_authentication_gets_unsupported_version() -> None:
    old_host = HostConnection(versions=(1,), authenticator=None)
    agent = AgentConnection(authenticator=AGENT)
    old_host.start()
    host_events, _ = exchange(old_host, agent)
    (failed,) = host_events
    assert isinstance(failed, HandshakeFailed) and isinstance(failed.error, UnsupportedProtocolVersion)
    assert "upgrade vmcontroller on the host" in str(failed.error)
    assert_serves_its_host(agent)


def test_the_refusal_of_an_old_host_names_the_versions_the_agent_speaks_on_the_wire() -> None:
    """docs/protocol.md: ERROR (id 0) unsupported-version with details.supported."""
    old_host = HostConnection(versions=(1,), authenticator=None)
    agent = AgentConnection(authenticator=AGENT)
    old_host.start()
    agent.receive_data(old_host.data_to_send())
    old_host.receive_data(agent.data_to_send())  # the ACK: the old host sends its plaintext HELLO
    agent.receive_data(old_host.data_to_send())
    decoder = FrameDecoder(1 << 20)
    decoder.feed(agent.data_to_send())
    (refusal,) = [item for item in iter(decoder.next, None) if isinstance(item, Frame)]
    assert refusal.type is FrameType.ERROR and refusal.request_id == 0
    body = refusal.json()
    assert body["code"] == "unsupported-version" and body["details"] == {"supported": [2]}
    assert_serves_its_host(agent)


def test_old_agent_that_does_not_know_tls_frames_gets_a_clear_error() -> None:
    """What a protocol-1 agent answers to a TLS frame, a type it does not know."""
    host = HostConnection(authenticator=HOST)
    host.start()
    nonce = host.data_to_send()[-16:]
    assert host.receive_data(ACK_MAGIC + nonce) == []
    refusal = encode_json({"code": "protocol-violation", "message": "unknown frame type 10", "details": {}})
    (failed,) = host.receive_data(encode_frame(FrameType.ERROR, 0, refusal))
    assert isinstance(failed, HandshakeFailed) and isinstance(failed.error, UnsupportedProtocolVersion)
    assert "Install the current vmcontroller agent" in str(failed.error)


def test_tls_older_than_1_3_is_refused() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=AGENT_CREDENTIALS.certificate)
    old = HostConnection(authenticator=Authenticator(context, AGENT_CREDENTIALS.certificate, False))
    agent = AgentConnection(authenticator=AGENT)
    old.start()
    host_events, agent_events = exchange(old, agent)
    error = refused_by_agent(agent_events)
    assert isinstance(error, AuthenticationFailed)
    assert str(error) == (
        "TLS handshake with the host failed: the host offered no TLS 1.3 (UNSUPPORTED_PROTOCOL)"
    )
    (failed,) = host_events
    assert isinstance(failed, HandshakeFailed) and str(failed.error) == (
        "TLS handshake with the agent failed: the agent refused our TLS version (only 1.3) "
        "(TLSV1_ALERT_PROTOCOL_VERSION)"
    )
    assert_serves_its_host(agent)


def test_a_new_session_is_a_new_handshake() -> None:
    host, agent = connected()
    host.start()  # resynchronise: the old TLS session is gone with the old protocol session
    host_events, agent_events = exchange(host, agent)
    assert [type(e) for e in host_events] == [HandshakeComplete]
    assert HandshakeComplete in [type(e) for e in agent_events]


def test_credentials_round_trip_and_never_show_the_key() -> None:
    again = Credentials.from_json(AGENT_CREDENTIALS.to_json())
    assert again == AGENT_CREDENTIALS
    assert len(AGENT_CREDENTIALS.to_json()) < 1024  # fits a VirtualBox guest property
    text = repr(AGENT_CREDENTIALS)
    assert AGENT_CREDENTIALS.private_key.hex() not in text and "key" not in text.lower()
    fingerprint = hashlib.sha256(AGENT_CREDENTIALS.certificate).hexdigest()
    assert text == f"<Credentials certificate sha256 {fingerprint[:16]}...>"
    assert b" " not in AGENT_CREDENTIALS.to_json()  # compact: a guest property holds 1 KiB at most


def _damaged(change: dict[str, Any]) -> bytes:
    fields = {**json.loads(AGENT_CREDENTIALS.to_json()), **change}
    return json.dumps({name: value for name, value in fields.items() if value is not None}).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[1, 2]",
        b"[" * 100_000,  # nested deeper than Python's stack
        _damaged({"format": 2}),
        _damaged({"format": None}),
        _damaged({"key": None}),
        _damaged({"certificate": None}),
        _damaged({"peer_certificate": None}),
        _damaged({"key": "!!" + json.loads(AGENT_CREDENTIALS.to_json())["key"]}),
        _damaged({"certificate": "QUJD!"}),
        _damaged({"peer_certificate": "QUJD!"}),
        _damaged({"key": 7}),
    ],
    ids=lambda data: data[:40].decode(errors="replace"),
)
def test_damaged_credentials_are_a_clear_error_that_never_quotes_them(data: bytes) -> None:
    with pytest.raises(ValueError) as raised:
        Credentials.from_json(data)
    assert str(raised.value) == (
        "not vmcontroller credentials of format 1 (JSON with key, certificate and peer_certificate in base64)"
    )


@pytest.mark.parametrize(
    ("reason", "side", "hint"),
    [
        ("DECRYPT_ERROR", "host", "a handshake message did not verify: a replayed or altered handshake"),
        ("TLSV1_ALERT_DECRYPT_ERROR", "host", "the peer could not verify our handshake"),
        ("SSLV3_ALERT_BAD_CERTIFICATE", "host", "the agent rejected this end's certificate"),
        ("SSLV3_ALERT_BAD_CERTIFICATE", "agent", "the host rejected this end's certificate"),
        ("SOMETHING_NEW", "agent", "the handshake broke"),
    ],
)
def test_handshake_failures_no_honest_peer_causes_are_explained(reason: str, side: str, hint: str) -> None:
    """What OpenSSL reports for a forged signature, a peer's refusal or an unknown reason."""
    session = (HOST if side == "host" else AGENT).session()
    error = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    error.reason = reason
    peer = "agent" if side == "host" else "host"
    assert session._explain(error) == f"TLS handshake with the {peer} failed: {hint} ({reason})"
    unnamed = ssl.SSLError(1, "something went wrong")
    cast(Any, unnamed).reason = None  # OpenSSL named no reason: the error's text stands in
    assert session._explain(unnamed) == (
        f"TLS handshake with the {peer} failed: the handshake broke ({unnamed})"
    )


@pytest.mark.parametrize(
    "credentials",
    [
        Credentials(
            HOST_CREDENTIALS.private_key, AGENT_CREDENTIALS.certificate, HOST_CREDENTIALS.certificate
        ),
        Credentials(HOST_CREDENTIALS.private_key, HOST_CREDENTIALS.certificate, b"not a certificate"),
    ],
    ids=["key-of-another-certificate", "damaged-peer-certificate"],
)
def test_credentials_that_do_not_load_say_how_to_get_new_ones(credentials: Credentials) -> None:
    for server_side in (False, True):
        with pytest.raises(AuthenticationFailed) as raised:
            Authenticator.from_credentials(credentials, server_side=server_side)
        # OpenSSL's own words in the parentheses vary with its version.
        assert re.fullmatch(
            r"these credentials do not load \(.+\): mint new ones for the VM "
            r"\(vmcontroller\.credentials\.CredentialStore\.rotate\)",
            str(raised.value),
        )


def record(length: int, body: bytes | None = None) -> bytes:
    """A TLS application-data record's header announcing ``length``, and that many bytes."""
    return b"\x17\x03\x03" + length.to_bytes(2, "big") + (b"r" * length if body is None else body)


def test_records_are_counted_whole_however_the_stream_is_cut() -> None:
    stream = record(1) + record(300) + record(RECORD_CIPHERTEXT_MAX) + record(7)
    for piece in (1, 2, 3, 5, 6, 7, 301, 313, len(stream)):  # headers cut at every offset too
        counter = _RecordCounter()
        counts = [counter.count(stream[at : at + piece]) for at in range(0, len(stream), piece)]
        # Each record is counted in the piece that completes it, never before.
        ends = [6, 6 + 305, 6 + 305 + 5 + RECORD_CIPHERTEXT_MAX, len(stream)]
        completing = [index for index, count in enumerate(counts) for _ in range(count)]
        assert completing == [(end - 1) // piece for end in ends], piece


def test_a_record_header_that_waits_for_nothing_counts_at_once() -> None:
    # Empty and oversized records: OpenSSL acts on them as soon as it reads the header, so
    # the counter must not wait for a body (an oversized one would hold every later record).
    counter = _RecordCounter()
    assert counter.count(record(2) + record(0, b"") + record(RECORD_CIPHERTEXT_MAX + 1, b"") + record(3)) == 4
    assert counter.count(record(RECORD_CIPHERTEXT_MAX + 1, b"") + record(1)) == 2
    assert counter.count(record(4)[:7]) == 0
    assert counter.count(b"rr") == 1



def test_records_that_arrive_with_the_end_of_the_handshake_are_all_read() -> None:
    # TLS 1.3: the client's last handshake flight and its first requests leave together, so
    # the server's session completes and has whole application records in the same bytes.
    host, agent = HOST.session(), AGENT.session()
    received: list[bytes] = []

    class Keep:
        def room(self) -> None:
            return None

        def filled(self, size: int) -> None:
            raise AssertionError("no room was offered")

        def received(self, plaintext: memoryview) -> None:
            received.append(bytes(plaintext))

    keep = Keep()
    host.start()
    agent.receive(host.ciphertext(), keep)
    host.receive(agent.ciphertext(), keep)
    assert host.established and not agent.established
    first, second = b"f" * 300, b"s" * (RECORD_CIPHERTEXT_MAX - 1000)
    records = b"".join(host.seal([first])) + b"".join(host.seal([second]))
    agent.receive(host.ciphertext() + records, keep)
    assert agent.established
    assert b"".join(received) == first + second


class _Rooms:
    """Offers rooms of ``size`` bytes, every third time none (plaintext then comes to ``received``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.asked = 0
        self.in_place = 0
        self.plaintext = bytearray()
        self._room = bytearray()

    def room(self) -> memoryview | None:
        self.asked += 1
        if self.asked % 3 == 0:
            return None
        self._room = bytearray(b"?" * self.size)
        return memoryview(self._room)

    def filled(self, size: int) -> None:
        assert 0 < size <= self.size
        self.in_place += size
        self.plaintext += self._room[:size]

    def received(self, plaintext: memoryview) -> None:
        self.plaintext += plaintext


@pytest.mark.parametrize("room_size", [1, 16, 5000, RECORD_PLAINTEXT_MAX, 40_000])
def test_plaintext_goes_into_the_rooms_offered_whatever_their_size(room_size: int) -> None:
    """A record larger than a room is read in parts, the rest waiting in OpenSSL for the next."""
    host, agent = HOST.session(), AGENT.session()
    rooms = _Rooms(room_size)
    host.start()
    agent.receive(host.ciphertext(), rooms)
    host.receive(agent.ciphertext(), rooms)
    agent.receive(host.ciphertext(), rooms)
    assert agent.established and host.established
    data = bytes(range(256)) * 400  # six records and a part
    ciphertext = b"".join(host.seal([data]))
    agent.receive(ciphertext[:30_000], rooms)  # one record whole, the second cut
    agent.receive(ciphertext[30_000:], rooms)
    assert bytes(rooms.plaintext) == data
    assert rooms.in_place >= min(room_size, len(data))  # the rooms offered were used


def test_the_host_runs_without_credentials_only_when_asked_and_says_so_loudly() -> None:
    with capturedLogs() as logs:
        assert host_authenticator(None, development=True) is None
    assert [(event["log_level"], formatEvent(event)) for event in logs] == [(
        LogLevel.warn,
        "DEVELOPMENT MODE: the channel to the agent is neither authenticated nor protected; anyone who "
        "can reach it runs commands as root in the guest. Never use it on a volunteer's machine",
    )]
    with pytest.raises(CredentialsUnavailable) as raised:
        host_authenticator(None, development=False)
    assert str(raised.value) == (
        "no credentials for the agent: pass the VM's (driver.agent_credentials(name), or "
        "vmcontroller.machine.connect_vm_agent, which does), or development=True for an "
        "unauthenticated development setup"
    )
    with capturedLogs() as logs:
        authenticator = host_authenticator(HOST_CREDENTIALS, development=False)
    assert logs == []
    assert authenticator is not None and not authenticator.server_side
    assert authenticator.pinned == AGENT_CREDENTIALS.certificate


def test_tls_frames_larger_than_four_records_are_refused_before_their_payload() -> None:
    """Outside TLS only TLS frames travel, and none larger than TLS_FRAME_MAX, on both ends."""
    host, agent = connected()
    too_large = encode_header(FrameType.TLS, 0, TLS_FRAME_MAX + 1)
    error = refused_by_agent(agent.receive_data(too_large))
    assert isinstance(error, FrameTooLarge) and str(error) == (
        f"frame of {TLS_FRAME_MAX + 1} bytes exceeds the limit of {TLS_FRAME_MAX} bytes"
    )
    with pytest.raises(FrameTooLarge):
        host.receive_data(too_large)


def test_the_agent_s_cipher_order_decides_and_no_session_is_resumable() -> None:
    # The server's order decides, which prefer_chacha_without_aes (guest_agent/__main__.py)
    # relies on in a guest without AES instructions; no ticket, so every session proves both keys.
    agent = Authenticator.from_credentials(AGENT_CREDENTIALS, server_side=True)
    host = Authenticator.from_credentials(HOST_CREDENTIALS, server_side=False)
    assert agent.context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert agent.context.num_tickets == 0
    for end in (host, agent):
        assert end.context.options & ssl.OP_NO_TICKET
