"""The host client and the agent session joined in memory: a Clock, no reactor."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from guest_agent.protocol.connection import Limits
from guest_agent.protocol.errors import (
    ConnectionLost,
    FrameTooLarge,
    InternalError,
    UnknownOperation,
    UnsupportedProtocolVersion,
)
from guest_agent.protocol.frames import SYNC_MAGIC, FrameType, encode_frame
from guest_agent.session import OperationContext
from vmcontroller.client import SYNC_RETRY_INTERVAL, GuestClient
from vmcontroller.testing import InMemoryLink


async def echo(ctx: OperationContext) -> Any:
    return ctx.args


async def broken(ctx: OperationContext) -> Any:
    raise RuntimeError("bug")


class Gate:
    """An operation that waits until the test opens it; records cancellations."""

    def __init__(self) -> None:
        self.waiting: list[Deferred[None]] = []
        self.cancelled: list[dict[str, Any]] = []

    async def __call__(self, ctx: OperationContext) -> Any:
        gate: Deferred[None] = Deferred()
        self.waiting.append(gate)
        ctx.on_cancel(self.cancelled.append)
        await gate
        return "opened"


def call(link: InMemoryLink, op: str, args: dict[str, Any] | None = None) -> Deferred[Any]:
    d = Deferred.fromCoroutine(link.client.call(op, args))
    link.flush()
    return d


def test_sync_repeats_until_answered() -> None:
    clock = Clock()
    client = GuestClient(clock)
    transport = StringTransport()
    client._transport_connected(transport)
    assert transport.value().count(SYNC_MAGIC) == 1
    clock.advance(SYNC_RETRY_INTERVAL)
    clock.advance(SYNC_RETRY_INTERVAL)
    assert transport.value().count(SYNC_MAGIC) == 3


def test_call_and_errors() -> None:
    link = InMemoryLink({"echo": echo, "broken": broken})
    assert call(link, "echo", {"x": [1, 2]}).result == {"x": [1, 2]}
    failure = call(link, "nope").result
    assert isinstance(failure.value, UnknownOperation) and "'echo'" in str(failure.value)
    failure.cleanFailure()
    d = call(link, "broken")
    assert isinstance(d.result.value, InternalError) and "journal" in str(d.result.value)
    d.addErrback(lambda f: None)
    assert call(link, "echo", {}).result == {}  # the agent still serves


def test_unsupported_version_fails_the_connection() -> None:
    link = InMemoryLink({"echo": echo}, versions=(99,))
    d = Deferred.fromCoroutine(link.client.wait_ready())
    link.flush()
    assert isinstance(d.result.value, UnsupportedProtocolVersion)
    d.addErrback(lambda f: None)


def test_agent_restart_fails_in_flight_and_resyncs() -> None:
    gate = Gate()
    link = InMemoryLink({"wait": gate, "echo": echo})
    pending = call(link, "wait")
    assert len(gate.waiting) == 1
    # A new agent process announces itself on the same channel.
    link.client._data_received(b"\xffVMC-RESET")
    link.flush()
    assert isinstance(pending.result.value, ConnectionLost)
    assert "retry" in str(pending.result.value)
    pending.addErrback(lambda f: None)
    assert gate.cancelled  # the agent's session was reset by the new SYNC too
    assert call(link, "echo", {"after": True}).result == {"after": True}


def test_oversized_frame_from_agent_fails_pending_and_recovers() -> None:
    gate = Gate()
    link = InMemoryLink({"wait": gate, "echo": echo}, client_limits=Limits(max_frame=4096))
    pending = call(link, "wait")
    link.client._data_received(encode_frame(FrameType.NOTIFY, 0, b"x" * 5000))
    assert isinstance(pending.result.value, FrameTooLarge)
    pending.addErrback(lambda f: None)
    link.flush()
    assert call(link, "echo", {"ok": 1}).result == {"ok": 1}


def test_cancel_reaches_the_operation() -> None:
    gate = Gate()
    link = InMemoryLink({"wait": gate})
    pending = call(link, "wait")
    pending.cancel()
    link.flush()
    assert gate.cancelled == [{"reason": "cancelled by the host"}]
    pending.addErrback(lambda f: None)


def test_requests_queue_under_the_agents_limit() -> None:
    gate = Gate()
    link = InMemoryLink({"wait": gate}, agent_limits=Limits(max_inflight=2))
    calls = [call(link, "wait") for _ in range(5)]
    assert len(gate.waiting) == 2
    while gate.waiting:
        gate.waiting.pop(0).callback(None)
        link.flush()
    assert [d.result for d in calls] == ["opened"] * 5


def test_transport_loss_fails_everything_clearly() -> None:
    gate = Gate()
    link = InMemoryLink({"wait": gate})
    pending = call(link, "wait")
    link.client.close()
    link.flush()
    assert isinstance(pending.result.value, ConnectionLost)
    pending.addErrback(lambda f: None)
    assert gate.cancelled == [{"reason": "the host disconnected"}]
    later = Deferred.fromCoroutine(link.client.call("wait"))
    assert isinstance(later.result.value, ConnectionLost)
    later.addErrback(lambda f: None)
