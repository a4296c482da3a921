"""
``connect()`` with a Clock and a scripted endpoint: its retries, its deadline and its error,
without a reactor; the agent authenticates with freshly minted credentials, as by default.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from guest_agent.protocol.connection import AgentConnection, Limits, RequestReceived
from vmcontroller.client import CONNECT_RETRY_INTERVAL, RECONNECT_MAX_DELAY, GuestClient, connect
from vmcontroller.errors import AgentUnreachable, UnsupportedProtocolVersion, VMStateError
from vmcontroller.testing import minted

from .test_client_session import error_of, result_of


class ScriptedEndpoint:
    """Each connect takes the next outcome: an exception, "hang", or "connect"."""

    def __init__(self, clock: Clock, outcomes: list[Any]) -> None:
        self.clock = clock
        self.outcomes = outcomes
        self.attempts: list[float] = []
        self.transports: list[StringTransport] = []
        self.protocols: list[Any] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.attempts.append(self.clock.seconds())
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            return fail(outcome)
        if outcome == "hang":
            return Deferred()
        protocol = factory.buildProtocol(None)  # type: ignore[arg-type]
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return succeed(protocol)


HOST_END, AGENT_END = minted()


def agent(**kwargs: Any) -> AgentConnection:
    """The agent's engine, holding the agent's end of ``HOST_END``'s VM."""
    return AgentConnection(authenticator=AGENT_END, **kwargs)


def answer_handshake(endpoint: ScriptedEndpoint, agent: AgentConnection) -> None:
    """Play the agent's side of the handshake (SYNC, TLS, HELLO) on the last connection."""
    transport, protocol = endpoint.transports[-1], endpoint.protocols[-1]
    while transport.value():
        agent.receive_data(transport.value())
        transport.clear()
        protocol.dataReceived(agent.data_to_send())


def test_connect_retries_refusals_then_returns_a_ready_client() -> None:
    clock = Clock()
    clock.advance(1000)
    endpoint = ScriptedEndpoint(clock, [ConnectionRefusedError(), ConnectionRefusedError(), "connect"])
    limits = Limits(max_frame=8192, window=65536, max_inflight=3)
    d = connect(clock, endpoint, credentials=HOST_END, timeout=10, limits=limits)  # type: ignore[arg-type]
    while len(endpoint.attempts) < 3:
        clock.advance(0.05)
    # At once, then after a backoff of at least the first interval each time.
    assert endpoint.attempts[0] == 1000
    assert all(
        b - a >= CONNECT_RETRY_INTERVAL
        for a, b in zip(endpoint.attempts, endpoint.attempts[1:], strict=False)
    )
    answer_handshake(endpoint, agent())
    client = result_of(d)
    assert isinstance(client, GuestClient) and client._connection.is_open
    assert client._connection.limits == limits
    assert client.agent_hello["version"] == 2
    assert client.authenticated


def test_connect_gives_up_at_its_deadline_naming_the_last_error() -> None:
    clock = Clock()
    endpoint = ScriptedEndpoint(clock, [ConnectionRefusedError("nobody listens")])
    d = connect(clock, endpoint, credentials=HOST_END, timeout=5)  # type: ignore[arg-type]
    clock.pump([0.05] * 120)
    error = error_of(d)
    assert isinstance(error, AgentUnreachable)
    assert str(error).startswith("no agent answered within 5 s (last error: Connection was refused")
    assert "nobody listens" in str(error) and "journalctl -u vmcontroller-agent" in str(error)
    # Tried again with backoff until the deadline, and not after it.
    assert len(endpoint.attempts) >= 3 and max(endpoint.attempts) < 5
    assert all(
        b - a >= CONNECT_RETRY_INTERVAL
        for a, b in zip(endpoint.attempts, endpoint.attempts[1:], strict=False)
    )


def test_a_long_outage_is_retried_at_most_the_maximum_delay_apart() -> None:
    """A guest that takes minutes to come back is found within RECONNECT_MAX_DELAY (plus the
    backoff's jitter, under a second) of its return."""
    clock = Clock()
    endpoint = ScriptedEndpoint(clock, [ConnectionRefusedError("nobody listens")])
    d = connect(clock, endpoint, credentials=HOST_END, timeout=300)  # type: ignore[arg-type]
    step = 0.25  # an attempt is seen up to a step late
    clock.pump([step] * 1200)
    assert isinstance(error_of(d), AgentUnreachable)
    gaps = [b - a for a, b in zip(endpoint.attempts, endpoint.attempts[1:], strict=False)]
    assert gaps[0] <= CONNECT_RETRY_INTERVAL + 1 + step
    assert RECONNECT_MAX_DELAY <= max(gaps) <= RECONNECT_MAX_DELAY + 1 + step


def test_connect_stops_waiting_for_an_endpoint_that_hangs() -> None:
    clock = Clock()
    clock.advance(100)
    endpoint = ScriptedEndpoint(clock, ["hang"])
    d = connect(clock, endpoint, credentials=HOST_END)  # type: ignore[arg-type]
    clock.advance(59.9)
    assert not d.called
    clock.advance(0.1)
    error = error_of(d)
    assert str(error).startswith("no agent answered within 60 s: check that the guest has booted")
    assert endpoint.attempts == [100]


def test_connect_closes_a_channel_whose_agent_never_answers() -> None:
    clock = Clock()
    clock.advance(100)
    endpoint = ScriptedEndpoint(clock, ["connect"])
    d = connect(clock, endpoint, credentials=HOST_END, timeout=3)  # type: ignore[arg-type]
    clock.pump([1.0] * 2)
    assert not d.called and not endpoint.transports[0].disconnecting
    clock.advance(1.0)
    assert endpoint.transports[0].disconnecting  # closed, not left open
    # StringTransport reports no loss by itself: the closing client waits for it.
    endpoint.protocols[0].connectionLost(Failure(ConnectionDone()))
    assert isinstance(error_of(d), AgentUnreachable)
    assert endpoint.attempts == [100]


def test_connect_offers_the_versions_it_was_given() -> None:
    clock = Clock()
    endpoint = ScriptedEndpoint(clock, ["connect"])
    d = connect(clock, endpoint, credentials=HOST_END, timeout=3, versions=(99,))  # type: ignore[arg-type]
    answer_handshake(endpoint, agent())
    error = error_of(d)
    assert isinstance(error, UnsupportedProtocolVersion) and "[99]" in str(error)


def test_each_reconnect_asks_for_the_endpoint_again() -> None:
    """
    A VM restored from a saved state runs a new emulator whose channel socket is another
    path; while it is saved the driver has no endpoint to give.  The client reconnects to
    where the agent is now, not to where it was.
    """
    reactor = MemoryReactorClock()
    where: list[Any] = ["/run/libvirt/qemu/channel/domain-1-vm/agent"]
    asked: list[float] = []

    def find() -> Deferred[Any]:
        asked.append(reactor.seconds())
        if isinstance(where[0], Exception):
            return fail(where[0])
        return succeed(UNIXClientEndpoint(reactor, where[0]))

    def accept_last() -> tuple[Any, list[Any], AgentConnection]:
        """
        Complete the last connection attempt the reactor took and the agent's handshake;
        the agent's events on the way (a waiting request goes out right after HELLO).
        """
        factory = reactor.unixClients[-1][1]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        agent_engine = AgentConnection(authenticator=AGENT_END)
        events: list[Any] = []
        while transport.value():
            events.extend(agent_engine.receive_data(transport.value()))
            transport.clear()
            protocol.dataReceived(agent_engine.data_to_send())
        return protocol, events, agent_engine

    connecting = connect(reactor, find, credentials=HOST_END, timeout=10)
    protocol, _, _ = accept_last()
    client = result_of(connecting)
    assert [c[0] for c in reactor.unixClients] == ["/run/libvirt/qemu/channel/domain-1-vm/agent"]

    where[0] = VMStateError("VM 'vm' is saved: it has no agent channel")
    protocol.connectionLost(Failure(ConnectionDone()))
    waiting = client.ping()
    reactor.pump([0.5] * 30)
    assert len(asked) > 2 and not waiting.called  # asked again with backoff, nothing to reach
    assert len(reactor.unixClients) == 1
    assert isinstance(client.last_connect_error, VMStateError)

    where[0] = "/run/libvirt/qemu/channel/domain-2-vm/agent"  # restored: a new emulator
    reactor.advance(RECONNECT_MAX_DELAY * 1.5)
    assert [c[0] for c in reactor.unixClients] == [
        "/run/libvirt/qemu/channel/domain-1-vm/agent", "/run/libvirt/qemu/channel/domain-2-vm/agent"]
    protocol, events, agent = accept_last()
    assert client.connected
    # The ping that waited went out on the new channel.
    [request] = [e for e in events if isinstance(e, RequestReceived)]
    assert request.op == "ping"
    agent.send_response(request.request_id, {"time": 1.0, "version": "restored"})
    protocol.dataReceived(agent.data_to_send())
    assert result_of(waiting)["version"] == "restored"
