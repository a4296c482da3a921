"""
A client made by ``connect`` reconnects by itself: in memory, with a ``Clock`` for the
backoff and :class:`InMemoryAgentEndpoint` playing an agent that goes away and comes back.
"""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ProcessDone
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from guest_agent.ops import OPERATIONS
from guest_agent.ops import exec as agent_exec
from guest_agent.ops.commands import CommandRegistry
from guest_agent.ops.files import PartialUploads
from guest_agent.protocol.connection import Limits
from guest_agent.session import OperationContext
from tests.unit.test_exec_ops import FakeProcessReactor, fake_session_spawns, outcome
from vmcontroller import testing
from vmcontroller._files import CHUNK_SIZE, MAX_RESUMES, RESUME_WAIT
from vmcontroller.client import RECONNECT_MAX_DELAY, ClientLimits, GuestClient, connect
from vmcontroller.errors import (
    AgentUnreachable,
    AuthenticationFailed,
    ConnectionLost,
    IncompleteTransfer,
    UnsupportedProtocolVersion,
)
from vmcontroller.testing import InMemoryAgentEndpoint, minted


class Controller:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, spool: Path) -> None:
        self.clock = Clock()
        self.agent_reactor = FakeProcessReactor()
        fake_session_spawns(monkeypatch)
        monkeypatch.setattr(agent_exec, "_kill_group", lambda group: None)
        registry = CommandRegistry(str(spool))
        self.endpoint = InMemoryAgentEndpoint({**OPERATIONS, **registry.operations()},
                                              agent_reactor=self.agent_reactor)

    def connecting(self, **kwargs: object) -> Deferred[GuestClient]:
        """``connect`` with the credentials of the endpoint's agent."""
        return connect(self.clock, self.endpoint, credentials=self.endpoint.credentials, **kwargs)  # type: ignore[arg-type]

    def connect(self, **kwargs: object) -> GuestClient:
        connecting = self.connecting(**kwargs)
        self.endpoint.flush()
        client: GuestClient = outcome(connecting)
        return client

    def wait_out_backoff(self) -> None:
        """Let every retry the backoff allows happen, carrying each connection's bytes."""
        for _ in range(10):
            self.clock.advance(RECONNECT_MAX_DELAY * 1.5)  # backoff jitter stays below this
            self.endpoint.flush()


@pytest.fixture
def controller(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Controller:
    return Controller(monkeypatch, tmp_path / "spool")


def test_in_flight_operations_fail_at_once_and_later_ones_run_once_the_agent_is_back(
        controller: Controller) -> None:
    client = controller.connect(timeout=10)
    running = client.exec(["sleep", "100"])
    controller.endpoint.flush()
    assert len(controller.agent_reactor.processes) == 1
    controller.endpoint.down = True
    controller.endpoint.drop()
    error = outcome(running.result())  # no clock advanced: it failed at once
    assert isinstance(error, ConnectionLost) and "reconnecting" in str(error)
    assert not client.connected

    later = client.ping()
    controller.wait_out_backoff()
    assert not later.called  # waits for the agent, does not fail
    refused = controller.endpoint.attempts
    assert refused > 2  # retried, with backoff
    controller.endpoint.down = False
    controller.wait_out_backoff()
    assert client.connected and client.authenticated  # a new TLS session, not the old one resumed
    assert outcome(later)["version"]
    assert controller.endpoint.attempts == refused + 1  # one connection once the agent is back


def test_a_reconnection_to_an_agent_with_other_credentials_closes_the_client(controller: Controller) -> None:
    client = controller.connect(timeout=10)
    _, controller.endpoint.agent_authenticator = minted()  # another VM's agent now answers
    controller.endpoint.drop()
    waiting = client.ping()
    controller.wait_out_backoff()
    error = outcome(waiting)
    assert isinstance(error, AuthenticationFailed) and "not the one pinned for this VM" in str(error)
    assert not client.connected and not client.reconnects
    attempts = controller.endpoint.attempts
    controller.wait_out_backoff()
    assert controller.endpoint.attempts == attempts  # given up: it is not the agent it was


def test_a_retained_command_is_collected_over_the_reconnected_client(controller: Controller) -> None:
    client = controller.connect(timeout=10)
    first = client.exec(["cat"], exec_id="job")
    controller.endpoint.flush()
    process = controller.agent_reactor.processes[-1]
    process.output(1, b"one ")
    controller.endpoint.flush()
    controller.endpoint.drop()
    assert isinstance(outcome(first.result()), ConnectionLost)
    process.output(1, b"two")
    process.end(ProcessDone(0))
    controller.wait_out_backoff()
    attached = client.attach("job")
    controller.endpoint.flush()
    result = outcome(attached.result())
    assert (result.stdout, result.exit_code) == (b"one two", 0)


def test_callers_waiting_for_a_slot_keep_their_place_across_a_reconnection(controller: Controller) -> None:
    """One slot (the agent's max_inflight): the caller that waited for it goes before a later one."""
    gates: list[Deferred[None]] = []

    async def wait(ctx: OperationContext) -> Any:
        gate: Deferred[None] = Deferred()
        gates.append(gate)
        await gate
        return ctx.args

    controller.endpoint = InMemoryAgentEndpoint({"wait": wait}, agent_reactor=controller.agent_reactor,
                                                agent_limits=Limits(max_inflight=1))
    client = controller.connect(timeout=10)
    first, second = (Deferred.fromCoroutine(client.call("wait", {"n": n})) for n in (1, 2))
    controller.endpoint.flush()
    assert len(gates) == 1
    controller.endpoint.drop()
    assert isinstance(outcome(first), ConnectionLost)
    controller.wait_out_backoff()
    third = Deferred.fromCoroutine(client.call("wait", {"n": 3}))
    controller.endpoint.flush()
    assert len(gates) == 2 and not third.called  # the second went first; the third waits its turn
    gates[1].callback(None)
    controller.endpoint.flush()
    assert outcome(second) == {"n": 2} and len(gates) == 3
    gates[2].callback(None)
    controller.endpoint.flush()
    assert outcome(third) == {"n": 3}


def test_close_stops_reconnecting_and_fails_what_waits(controller: Controller) -> None:
    client = controller.connect(timeout=10)
    controller.endpoint.down = True
    controller.endpoint.drop()
    waiting = client.ping()
    ready = Deferred.fromCoroutine(client.wait_ready())
    client.close()
    for error in (outcome(waiting), outcome(ready)):
        assert isinstance(error, ConnectionLost) and str(error) == "the client was closed"
    attempts = controller.endpoint.attempts
    controller.endpoint.down = False
    controller.wait_out_backoff()
    assert controller.endpoint.attempts == attempts
    assert isinstance(outcome(client.ping()), ConnectionLost)


def test_connect_gives_up_after_its_timeout_with_the_last_error(controller: Controller) -> None:
    controller.endpoint.down = True
    connecting = controller.connecting(timeout=5)
    controller.clock.advance(5)
    error = outcome(connecting)
    assert isinstance(error, AgentUnreachable)
    assert "within 5 s" in str(error) and "in-memory agent is down" in str(error)
    attempts = controller.endpoint.attempts
    controller.wait_out_backoff()
    assert controller.endpoint.attempts == attempts  # nothing retries after giving up


@implementer(IStreamClientEndpoint)
class SilentPorts:
    """
    An endpoint whose connections are accepted and then say nothing, as a guest's port with
    no agent behind it; the test closes them (an agent that refuses a second host does).
    """

    def __init__(self) -> None:
        self.protocols: list[IProtocol] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
        assert protocol is not None
        transport = StringTransportWithDisconnection()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        return succeed(protocol)


def test_connect_that_gives_up_names_a_channel_closed_before_the_handshake() -> None:
    clock, ports = Clock(), SilentPorts()
    connecting = connect(clock, ports, credentials=minted()[0], timeout=5)
    closed = 0
    for _ in range(60):  # each attempt is closed at once, past the deadline
        for protocol in ports.protocols[closed:]:
            protocol.connectionLost(Failure(ConnectionDone("closed by the guest")))
        closed = len(ports.protocols)
        clock.advance(0.1)
    error = outcome(connecting)
    assert closed >= 2
    assert isinstance(error, AgentUnreachable)
    lost = "the channel to the agent closed: Connection was closed cleanly: closed by the guest."
    assert f"(last error: {lost}" in str(error), error


def test_connect_that_gives_up_on_a_silent_connection_says_so() -> None:
    """Not "the channel closed": connect() closed it, and the agent's silence is what matters."""
    clock, ports = Clock(), SilentPorts()
    connecting = connect(clock, ports, credentials=minted()[0], timeout=5)
    ports.protocols[0].connectionLost(Failure(ConnectionDone("closed by the guest")))
    clock.advance(5)  # the next attempt is accepted and stays silent
    error = outcome(connecting)
    assert len(ports.protocols) == 2
    assert isinstance(error, AgentUnreachable)
    assert str(error).startswith(
        "no agent answered within 5 s (a connection was open, but nothing answered on it; last error: the "
        "channel to the agent closed: Connection was closed cleanly: closed by the guest."), error


def test_connect_in_development_mode_reaches_a_development_agent() -> None:
    endpoint = InMemoryAgentEndpoint({}, development=True)
    connecting = connect(Clock(), endpoint, development=True, timeout=5)
    endpoint.flush()
    client = outcome(connecting)
    assert isinstance(client, GuestClient) and client.connected and not client.authenticated


def test_an_agent_without_a_common_version_is_not_retried(controller: Controller) -> None:
    connecting = controller.connecting(timeout=5, versions=(99,))
    controller.endpoint.flush()
    assert isinstance(outcome(connecting), UnsupportedProtocolVersion)
    controller.wait_out_backoff()
    assert controller.endpoint.attempts == 1


def test_a_push_resumes_from_the_agent_s_verified_offset_after_a_dropped_channel(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    controller = Controller(monkeypatch, tmp_path / "spool")
    requests: list[dict[str, object]] = []
    uploads = PartialUploads()

    async def recording_push(ctx: OperationContext) -> dict[str, object]:
        requests.append(dict(ctx.args))
        return await uploads.push(ctx)

    operations = {**OPERATIONS, **uploads.operations(), "push": recording_push}
    controller.endpoint = InMemoryAgentEndpoint(operations, agent_reactor=controller.agent_reactor)
    client = controller.connect(timeout=10)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(8 * 1024 * 1024 + 17))  # more than the window of 4 MiB
    destination = tmp_path / "pushed.bin"
    progress: list[int] = []
    pushing = client.push(str(source), str(destination), progress=lambda done, total: progress.append(done))
    pump = controller.endpoint.pump
    assert pump is not None
    while not progress or progress[-1] < 5 * 1024 * 1024:  # past the window: the agent has some
        pump.pump()
    controller.endpoint.drop()
    before = len(progress)
    assert not pushing.called and not destination.exists()
    controller.wait_out_backoff()
    result = outcome(pushing)
    assert destination.read_bytes() == source.read_bytes()
    assert result.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    first, resumed = requests
    assert "offset" not in first and resumed["transfer_id"] == first["transfer_id"]
    assert isinstance(resumed["offset"], int) and resumed["offset"] > 0  # not started over
    assert min(progress[before:]) > CHUNK_SIZE  # what was sent after the drop continued the file
    assert list(tmp_path.glob(".pushed.bin.*")) == []


async def hostile_push_offset(ctx: OperationContext) -> Any:
    return ["not", "a", "dict"]


@pytest.mark.parametrize("push_offset", [None, hostile_push_offset])
def test_a_push_whose_held_part_does_not_match_fails_with_a_clear_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, push_offset: Any) -> None:
    """The agent holds something else, or says what it holds in a shape that means nothing."""
    controller = Controller(monkeypatch, tmp_path / "spool")
    uploads = PartialUploads()
    operations = {**OPERATIONS, **uploads.operations()}
    if push_offset is not None:
        operations["push_offset"] = push_offset
    controller.endpoint = InMemoryAgentEndpoint(operations, agent_reactor=controller.agent_reactor)
    client = controller.connect(timeout=10)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(8 * 1024 * 1024))
    progress: list[int] = []
    pushing = client.push(str(source), str(tmp_path / "pushed.bin"),
                          progress=lambda done, _: progress.append(done))
    pump = controller.endpoint.pump
    assert pump is not None
    while not progress or progress[-1] < 5 * 1024 * 1024:  # past the window: the agent has some
        pump.pump()
    controller.endpoint.drop()
    before = len(progress)
    source.write_bytes(b"\0" * len(source.read_bytes()))  # the host file changed meanwhile
    controller.wait_out_backoff()
    error = outcome(pushing)
    assert isinstance(error, ConnectionLost) and "no part of the push" in str(error), error
    assert len(progress) == before  # nothing sent again
    assert not (tmp_path / "pushed.bin").exists() and list(tmp_path.glob(".pushed.bin.*")) == []


def test_connect_says_exactly_what_to_check_and_passes_on_the_client_limits(controller: Controller) -> None:
    controller.endpoint.down = True
    endpoint = controller.endpoint
    connecting = connect(controller.clock, endpoint, credentials=endpoint.credentials, timeout=5)
    controller.clock.advance(5)
    assert str(outcome(connecting)) == (
        "no agent answered within 5 s (last error: Connection was refused by other side: the in-memory agent "
        "is down.): check that the guest has booted and that the vmcontroller-agent service runs in it "
        "(journalctl -u vmcontroller-agent)")
    controller.endpoint.down = False
    limits = ClientLimits(max_pull=1234)
    assert controller.connect(timeout=10, client_limits=limits).client_limits is limits


SIZE = 8 * 1024 * 1024


class DroppingPush:
    """A resumable agent whose channel the test drops each time the host has sent ``every`` more bytes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                 operations: dict[str, Any] | None = None, size: int = SIZE) -> None:
        # A new connection carries nothing by itself: the test moves its bytes a step at a time.
        connect_quietly = partial(iosim.connect, greet=False)
        monkeypatch.setattr(testing.iosim, "connect", lambda *args, greet: connect_quietly(*args))
        self.controller = Controller(monkeypatch, tmp_path / "spool")
        self.uploads = PartialUploads()
        self.controller.endpoint = InMemoryAgentEndpoint(
            operations or {**OPERATIONS, **self.uploads.operations()},
            agent_reactor=self.controller.agent_reactor)
        self.client = self.controller.connect(timeout=10)
        self.source = tmp_path / "source.bin"
        self.source.write_bytes(os.urandom(size))
        self.destination = tmp_path / "pushed.bin"
        self.progress: list[int] = [0]
        self.pushing = self.client.push(str(self.source), str(self.destination),
                                        progress=lambda done, _: self.progress.append(done))

    def drop_after(self, more: int) -> None:
        """Carry bytes until the host has sent ``more`` than before, then drop the channel."""
        mark = self.progress[-1] + more
        pump = self.controller.endpoint.pump
        assert pump is not None
        for _ in range(10_000):
            if self.progress[-1] >= mark or self.pushing.called:
                break
            pump.pump()
        assert not self.pushing.called, "the push ended before the channel could be dropped"
        self.controller.endpoint.drop()



def test_a_push_resumes_as_often_as_allowed_then_gives_up(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    uploads = PartialUploads()
    pushes: list[dict[str, Any]] = []

    received: list[int] = []

    async def counted_push(ctx: OperationContext) -> dict[str, Any]:
        pushes.append(dict(ctx.args))
        receive = ctx.io.receive

        async def counting(channel: int) -> bytes | bytearray | None:
            chunk = await receive(channel)
            received.append(len(chunk or b""))
            return chunk

        ctx.io.receive = counting  # type: ignore[method-assign]
        return await uploads.push(ctx)

    # A window (4 MiB) crosses at each step of the in-memory channel: one per attempt, and more.
    run = DroppingPush(monkeypatch, tmp_path, {**OPERATIONS, **uploads.operations(), "push": counted_push},
                       size=(MAX_RESUMES + 2) * 4 * 1024 * 1024)
    for attempt in range(1, MAX_RESUMES + 2):
        received.clear()
        while len(pushes) < attempt or not any(received):  # until this attempt's push has sent some
            assert not run.pushing.called
            pump = run.controller.endpoint.pump
            assert pump is not None
            pump.pump()
        run.controller.endpoint.drop()
        run.controller.clock.advance(RECONNECT_MAX_DELAY * 1.5)  # it reconnects, then resumes
    error = outcome(run.pushing)  # at once: no more waiting for the agent
    assert isinstance(error, ConnectionLost) and str(error) == (
        "the channel to the agent closed: Connection was closed cleanly: Connection done.; what was in "
        "flight has an unknown outcome in the guest; reconnecting")
    assert len(pushes) == MAX_RESUMES + 1
    assert all(push["transfer_id"] == pushes[0]["transfer_id"] for push in pushes)
    assert not run.destination.exists() and list(tmp_path.glob(".pushed.bin.*")) == []


def test_a_push_resumes_after_a_single_held_byte_that_matches(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """The smallest part worth resuming from: an agent that says it holds the file's first byte."""
    uploads = PartialUploads()
    pushes: list[dict[str, Any]] = []
    run: DroppingPush | None = None

    async def recording_push(ctx: OperationContext) -> dict[str, Any]:
        pushes.append(dict(ctx.args))
        return await uploads.push(ctx)

    async def one_byte_held(ctx: OperationContext) -> dict[str, Any]:
        assert run is not None
        return {"offset": 1, "sha256": hashlib.sha256(run.source.read_bytes()[:1]).hexdigest()}

    run = DroppingPush(monkeypatch, tmp_path, {**OPERATIONS, **uploads.operations(), "push": recording_push,
                                               "push_offset": one_byte_held})
    run.drop_after(1024 * 1024)
    run.controller.wait_out_backoff()
    first, resumed = pushes
    assert "offset" not in first and resumed["offset"] == 1
    error = outcome(run.pushing)  # the agent holds more than it said: it refuses, and nothing is written
    assert isinstance(error, IncompleteTransfer) and f"push to {run.destination} at byte 1:" in str(error)
    assert not run.destination.exists()


def test_a_push_whose_agent_is_not_back_in_time_says_so(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    run = DroppingPush(monkeypatch, tmp_path)
    run.controller.endpoint.down = True
    run.drop_after(1024 * 1024)
    run.controller.clock.advance(RESUME_WAIT)
    error = outcome(run.pushing)
    assert isinstance(error, ConnectionLost) and str(error).endswith(
        f"; the agent was not back within 30 s to resume the push to {run.destination}, which was not "
        "written: push again")


def test_a_push_to_an_agent_that_cannot_resume_says_so(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    run = DroppingPush(monkeypatch, tmp_path, operations=dict(OPERATIONS))  # no push_offset: an older agent
    run.drop_after(1024 * 1024)
    run.controller.wait_out_backoff()
    error = outcome(run.pushing)
    assert isinstance(error, ConnectionLost) and str(error).endswith(
        f"; the agent holds no part of the push to {run.destination} that matches the host file to resume "
        "from (it restarted, the file changed, or all of it had arrived): the outcome in the guest is "
        "unknown; push again (a push replaces the destination whole)")
    assert not run.destination.exists()
