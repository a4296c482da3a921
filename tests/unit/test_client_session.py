"""The host client and the agent session joined in memory: a Clock, no reactor."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from guest_agent.protocol.connection import Limits
from guest_agent.protocol.errors import (
    ConnectionLost,
    FrameTooLarge,
    InternalError,
    OperationTimeout,
    ProtocolError,
    UnknownOperation,
    UnsupportedProtocolVersion,
)
from guest_agent.protocol.frames import SYNC_MAGIC, Channel, FrameType, encode_frame
from guest_agent.session import OperationContext
from vmcontroller.client import SYNC_RETRY_INTERVAL, ClientLimits, GuestClient, _AgentProtocol, connect
from vmcontroller.errors import AuthenticationFailed, CredentialsUnavailable
from vmcontroller.testing import InMemoryLink, paired_authenticators


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


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired successfully."""
    results: list[Any] = []
    d.addCallback(results.append)
    assert results, f"{d!r} has not fired"
    return results[0]


def error_of(d: Deferred[Any]) -> BaseException:
    """The exception of a Deferred that has failed (the failure is handled)."""
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, f"{d!r} has not failed"
    error = failures[0].value
    assert error is not None
    return error


def call(link: InMemoryLink, op: str, args: dict[str, Any] | None = None) -> Deferred[Any]:
    d = Deferred.fromCoroutine(link.client.call(op, args))
    link.flush()
    return d


def test_sync_repeats_until_answered() -> None:
    clock = Clock()
    client = GuestClient(clock, authenticator=None)
    transport = StringTransport()
    client._transport_connected(transport)
    assert transport.value().count(SYNC_MAGIC) == 1
    clock.advance(SYNC_RETRY_INTERVAL)
    clock.advance(SYNC_RETRY_INTERVAL)
    assert transport.value().count(SYNC_MAGIC) == 3


def test_call_and_errors() -> None:
    link = InMemoryLink({"echo": echo, "broken": broken})
    assert result_of(call(link, "echo", {"x": [1, 2]})) == {"x": [1, 2]}
    unknown = error_of(call(link, "nope"))
    assert isinstance(unknown, UnknownOperation) and "'echo'" in str(unknown)
    d = call(link, "broken")
    bug = error_of(d)
    assert isinstance(bug, InternalError) and "journal" in str(bug)
    assert result_of(call(link, "echo", {})) == {}  # the agent still serves


def test_unsupported_version_fails_the_connection() -> None:
    link = InMemoryLink({"echo": echo}, versions=(99,))
    d = Deferred.fromCoroutine(link.client.wait_ready())
    link.flush()
    assert isinstance(error_of(d), UnsupportedProtocolVersion)


def test_agent_restart_fails_in_flight_and_resyncs() -> None:
    gate = Gate()
    link = InMemoryLink({"wait": gate, "echo": echo})
    pending = call(link, "wait")
    assert len(gate.waiting) == 1
    # A new agent process announces itself on the same channel.
    link.client._data_received(b"\xffVMC-RESET")
    link.flush()
    lost = error_of(pending)
    assert isinstance(lost, ConnectionLost) and "retry" in str(lost)
    assert gate.cancelled  # the agent's session was reset by the new SYNC too
    assert result_of(call(link, "echo", {"after": True})) == {"after": True}


def test_oversized_frame_from_agent_fails_pending_and_disconnects() -> None:
    gate = Gate()
    # Hand-made plaintext frames: development mode (inside TLS, see test_authentication.py).
    link = InMemoryLink({"wait": gate, "echo": echo}, client_limits=Limits(max_frame=4096), development=True)
    pending = call(link, "wait")
    with capturedLogs() as logs:
        link.client._data_received(encode_frame(FrameType.NOTIFY, 0, b"x" * 5000))
    assert isinstance(error_of(pending), FrameTooLarge)
    link.flush()
    assert link.client._transport is None  # the agent was disconnected
    assert any("Disconnecting the agent" in event["log_format"] and "4096" in str(event["error"])
               for event in logs)
    assert isinstance(error_of(call(link, "echo", {"ok": 1})), FrameTooLarge)


def test_cancel_reaches_the_operation() -> None:
    gate = Gate()
    link = InMemoryLink({"wait": gate})
    pending = call(link, "wait")
    pending.cancel()
    link.flush()
    assert gate.cancelled == [{"reason": "cancelled by the host"}]
    failures: list[Failure] = []
    pending.addErrback(failures.append)
    assert failures and failures[0].check(CancelledError)


def test_requests_queue_under_the_agents_limit() -> None:
    gate = Gate()
    link = InMemoryLink({"wait": gate}, agent_limits=Limits(max_inflight=2))
    calls = [call(link, "wait") for _ in range(5)]
    assert len(gate.waiting) == 2
    while gate.waiting:
        gate.waiting.pop(0).callback(None)
        link.flush()
    assert [result_of(d) for d in calls] == ["opened"] * 5


def test_the_streams_of_an_ended_request_say_so() -> None:
    link = InMemoryLink({"echo": echo})
    opened = Deferred.fromCoroutine(link.client.open_request("echo", {"a": 1}))
    link.flush()
    io, result = result_of(opened)
    assert result_of(result) == {"a": 1}
    error = error_of(Deferred.fromCoroutine(io.send(Channel.INPUT, b"late")))
    assert isinstance(error, ConnectionLost) and str(error) == "the request already ended"


def test_a_full_transport_holds_stream_data_back_until_it_drains() -> None:
    client = GuestClient(Clock(), authenticator=None)
    transport = StringTransport()
    _AgentProtocol(client).makeConnection(transport)
    assert transport.producer is not None
    transport.producer.pauseProducing()
    writable = Deferred.fromCoroutine(client._link.writable())
    assert not writable.called
    transport.producer.resumeProducing()
    assert writable.called


def test_transport_loss_fails_everything_clearly() -> None:
    gate = Gate()
    link = InMemoryLink({"wait": gate})
    pending = call(link, "wait")
    closed = link.client.close()
    link.flush()
    assert result_of(closed) is None  # fired: the channel is closed
    assert isinstance(error_of(pending), ConnectionLost)
    assert gate.cancelled == [{"reason": "the host disconnected"}]
    later = Deferred.fromCoroutine(link.client.call("wait"))
    assert isinstance(error_of(later), ConnectionLost)


def test_ended_requests_leave_nothing_behind() -> None:
    """A session may run for days: no request is kept once it is answered, failed, cancelled
    or past its deadline."""
    gate = Gate()
    link = InMemoryLink({"echo": echo, "broken": broken, "wait": gate},
                        host_limits=ClientLimits(call_timeout=10, cancel_grace=1000))
    answered, failed, cancelled = call(link, "echo", {"a": 1}), call(link, "broken"), call(link, "wait")
    cancelled.cancel()
    assert not link.client._link._io  # its streams let go at once, before the agent's answer
    timed_out = call(link, "wait")
    link.clock.advance(10)
    link.flush()
    for waiting in gate.waiting:  # the agent answers the cancelled requests
        waiting.callback(None)
    link.flush()
    link.clock.advance(10)  # the deadlines' timer goes round again
    assert result_of(answered) == {"a": 1}
    assert isinstance(error_of(failed), InternalError)
    assert isinstance(error_of(cancelled), CancelledError)
    assert isinstance(error_of(timed_out), OperationTimeout)
    assert len(gate.cancelled) == 2
    client = link.client
    assert not client._pending and not client._cancelled and not client._link._io
    assert not client._deadlines._due and not client._deadlines._expired


def test_a_request_cancelled_while_the_session_fails_fails_like_the_others() -> None:
    """Cancelling another request from an errback as the session fails (a caller's cleanup)."""
    gate = Gate()
    link = InMemoryLink({"wait": gate})
    first, second = call(link, "wait"), call(link, "wait")

    def clean_up(failure: Failure) -> Failure:
        second.cancel()
        return failure

    first.addErrback(clean_up)
    link.client._drop(ProtocolError("the agent misbehaved"))
    assert isinstance(error_of(first), ProtocolError)
    assert isinstance(error_of(second), CancelledError)


def test_retry_from_an_errback_waits_for_the_new_session() -> None:
    """A caller that retries as soon as its request fails must not be lost in the reset."""
    gate = Gate()
    link = InMemoryLink({"wait": gate, "echo": echo})
    retried: list[Deferred[Any]] = []
    pending = call(link, "wait")
    pending.addErrback(
        lambda _: retried.append(Deferred.fromCoroutine(link.client.call("echo", {"again": 1})))
    )
    link.client._write(encode_frame(FrameType.REQUEST, 4242, b"x" * (16 * 1024 * 1024))[:16])
    link.flush()
    assert result_of(retried[0]) == {"again": 1}


def test_session_is_authenticated_by_default() -> None:
    link = InMemoryLink({"echo": echo})
    assert result_of(call(link, "echo", {"x": 1})) == {"x": 1}
    assert link.client.authenticated and link.client.tls_cipher and link.client.tls_cipher.startswith("TLS_")


def test_agent_of_another_vm_fails_the_connection_with_a_clear_error() -> None:
    host, _ = paired_authenticators()
    _, stranger = paired_authenticators()
    link = InMemoryLink({"echo": echo}, authenticators=(host, stranger))
    d = Deferred.fromCoroutine(link.client.wait_ready())
    link.flush()
    error = error_of(d)
    assert isinstance(error, AuthenticationFailed) and "not the one pinned for this VM" in str(error)


def test_one_end_in_development_mode_is_refused() -> None:
    host, _ = paired_authenticators()
    link = InMemoryLink({"echo": echo}, authenticators=(host, None))
    d = Deferred.fromCoroutine(link.client.wait_ready())
    link.flush()
    assert isinstance(error_of(d), AuthenticationFailed)


def test_connect_without_credentials_touches_nothing() -> None:
    class Untouchable:
        def connect(self, factory: object) -> None:
            raise AssertionError("connect() used the endpoint")

    d = connect(Clock(), Untouchable())  # type: ignore[arg-type]
    error = error_of(d)
    assert isinstance(error, CredentialsUnavailable) and "development=True" in str(error)
