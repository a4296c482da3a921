"""
The host client's request bookkeeping under failure: every way a session ends fails what is
in flight with the right error and frees its slot; what each operation asks the agent.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from guest_agent.protocol.connection import AgentConnection, Limits
from guest_agent.protocol.errors import (
    ConnectionLost,
    FrameTooLarge,
    PathNotFound,
    ProtocolError,
    UnsupportedProtocolVersion,
)
from guest_agent.protocol.frames import RESET_MARKER, Channel, FrameType, encode_frame
from guest_agent.session import OperationContext
from vmcontroller._exec import ExecResult
from vmcontroller.client import GuestClient, _AgentProtocol
from vmcontroller.errors import ProcessFailed
from vmcontroller.testing import InMemoryLink

from .test_client_session import Gate, call, error_of, result_of


class Recorder:
    """Agent operations that record what they were asked and answer ``answers[op]``."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, dict[str, Any]]] = []

    def operations(self) -> dict[str, Any]:
        return {op: self._operation(op) for op in self.answers}

    def _operation(self, op: str) -> Any:
        def operation(ctx: OperationContext) -> Any:
            self.asked.append((op, ctx.args))
            answer = self.answers[op]
            if isinstance(answer, Exception):
                raise answer
            return answer

        return operation


#: Well-formed results (vmcontroller/_results.py refuses any other shape).
PING = {"time": 1.5, "version": "1"}
STAT = {
    "path": "/s",
    "type": "file",
    "size": 1,
    "mode": 0o644,
    "mtime": 2.5,
    "uid": 0,
    "gid": 0,
    "target": None,
}


def test_each_operation_asks_the_agent_what_it_should() -> None:
    recorder = Recorder(
        {
            "ping": PING,
            "info": {"h": "g"},
            "mkdir": None,
            "list": [],
            "stat": STAT,
            "remove": None,
            "shutdown": None,
            "reboot": None,
        }
    )
    link = InMemoryLink(recorder.operations())
    client = link.client
    calls: list[Deferred[Any]] = [
        client.ping(),
        client.info(),
        client.mkdir("/d"),
        client.mkdir("/e", parents=True, mode=0o700),
        client.list("/l"),
        client.stat("/s"),
        client.remove("/r"),
        client.remove("/t", recursive=True),
        client.shutdown(),
        client.reboot(),
    ]
    link.flush()
    assert [result_of(d) for d in calls] == [
        PING,
        {"h": "g"},
        None,
        None,
        [],
        STAT,
        None,
        None,
        None,
        None,
    ]
    assert recorder.asked == [
        ("ping", {}),
        ("info", {}),
        ("mkdir", {"path": "/d", "parents": False, "mode": 0o755}),
        ("mkdir", {"path": "/e", "parents": True, "mode": 0o700}),
        ("list", {"path": "/l"}),
        ("stat", {"path": "/s"}),
        ("remove", {"path": "/r", "recursive": False}),
        ("remove", {"path": "/t", "recursive": True}),
        ("shutdown", {}),
        ("reboot", {}),
    ]
    assert client.agent_hello["software"] == "in-memory" and client.agent_hello["version"] == 2


async def exec_op(ctx: OperationContext) -> dict[str, Any]:
    await ctx.io.send(Channel.STDERR, b"e" * 600 + b" the end ")
    ctx.io.send_eof(Channel.STDERR)
    await ctx.io.send(Channel.STDOUT, b"out")
    ctx.io.send_eof(Channel.STDOUT)
    code = ctx.args["env"]["CODE"]
    return {"exit_code": int(code) if code else None, "signal": ctx.args["env"].get("SIG")}


def test_run_passes_its_arguments_and_check_fails_a_nonzero_status() -> None:
    seen: list[dict[str, Any]] = []

    async def recording(ctx: OperationContext) -> dict[str, Any]:
        seen.append(dict(ctx.args))
        return await exec_op(ctx)

    link = InMemoryLink({"exec": recording})
    ok = link.client.run(["prog", "a"], env={"CODE": "0"}, cwd="/w", stdin=b"in", timeout=7.5, check=True)
    link.flush()
    assert result_of(ok) == ExecResult(("prog", "a"), 0, None, b"out", b"e" * 600 + b" the end ")
    assert seen[0] == {
        "argv": ["prog", "a"],
        "env": {"CODE": "0"},
        "cwd": "/w",
        "stdin": "stream",
        "timeout": 7.5,
    }
    failed = link.client.run(["prog"], env={"CODE": "3"}, check=True)
    link.flush()
    error = error_of(failed)
    assert isinstance(error, ProcessFailed)
    assert str(error) == "['prog'] exited with status 3 in the guest: " + "e" * 491 + " the end"
    assert seen[1]["stdin"] == "none" and seen[1]["cwd"] is None and seen[1]["timeout"] is None
    unchecked = link.client.run(["prog"], env={"CODE": "3"})
    link.flush()
    result = result_of(unchecked)
    assert result.exit_code == 3 and not result.succeeded
    killed = link.client.run(["prog"], env={"CODE": "", "SIG": "SIGKILL"})
    link.flush()
    with pytest.raises(ProcessFailed, match=r"\['prog'\] was killed by SIGKILL in the guest"):
        result_of(killed).check()


def test_a_request_too_large_frees_its_slot() -> None:
    gate = Gate()
    link = InMemoryLink(
        {"wait": gate, "echo": lambda ctx: ctx.args}, agent_limits=Limits(max_frame=1024, max_inflight=1)
    )
    assert isinstance(error_of(call(link, "echo", {"x": "y" * 2000})), FrameTooLarge)
    assert result_of(call(link, "echo", {"x": 1})) == {"x": 1}


class StoppingGate(Gate):
    """A gate whose operation ends when cancelled, as the agent's own operations do."""

    async def __call__(self, ctx: OperationContext) -> Any:
        ctx.on_cancel(lambda reason: self.waiting[-1].errback(PathNotFound("stopped")))
        return await super().__call__(ctx)


def test_a_cancelled_request_frees_its_slot_and_tells_the_agent() -> None:
    gate = StoppingGate()
    link = InMemoryLink({"wait": gate}, agent_limits=Limits(max_inflight=1))
    first = call(link, "wait")
    first.cancel()
    link.flush()
    assert isinstance(error_of(first), CancelledError)
    assert gate.cancelled == [{"reason": "cancelled by the host"}]
    # The agent answered the cancel: the slot is free.  (A call queued behind the cancelled
    # one before that answer fails with TooManyRequests today: issue 7's slot handling.)
    second = call(link, "wait")
    assert len(gate.waiting) == 2
    gate.waiting[1].callback(None)
    link.flush()
    assert result_of(second) == "opened"


def test_streams_of_an_ended_request_fail_clearly() -> None:
    async def answer_then_stream(ctx: OperationContext) -> Any:
        return "done"

    link = InMemoryLink({"op": answer_then_stream})
    opened: list[Any] = []
    d = Deferred.fromCoroutine(link.client.open_request("op"))
    d.addCallback(opened.append)
    link.flush()
    io, result = opened[0]
    assert result_of(result) == "done"
    error = error_of(Deferred.fromCoroutine(io.receive(Channel.STDOUT)))
    assert isinstance(error, ConnectionLost) and "already ended" in str(error)


def test_an_agent_error_fails_the_request_and_its_streams() -> None:
    async def failing(ctx: OperationContext) -> Any:
        raise PathNotFound("no such thing", {"path": "/x"})

    link = InMemoryLink({"op": failing})
    opened: list[Any] = []
    Deferred.fromCoroutine(link.client.open_request("op")).addCallback(opened.append)
    link.flush()
    io, result = opened[0]
    error = error_of(result)
    assert isinstance(error, PathNotFound) and error.details == {"path": "/x"}
    assert error_of(Deferred.fromCoroutine(io.receive(Channel.STDOUT))) is error


def test_a_protocol_violation_fails_what_is_in_flight_and_disconnects_the_agent() -> None:
    gate = Gate()
    # A hand-made plaintext frame: development mode (inside TLS, see test_authentication.py).
    link = InMemoryLink({"wait": gate, "echo": lambda ctx: ctx.args}, development=True)
    pending = call(link, "wait")
    with capturedLogs() as events:
        link.client._data_received(encode_frame(FrameType.REQUEST, 1, b"{}"))  # only hosts send these
    link.flush()
    error = error_of(pending)
    assert isinstance(error, ProtocolError) and "the agent may not send REQUEST" in str(error)
    assert any("Disconnecting the agent" in e["log_format"] and e["error"] is error for e in events)
    # A violating agent is not trusted again: the channel is closed, later calls fail with why.
    assert link.client._transport is None
    assert error_of(call(link, "echo", {"again": 1})) is error


def test_the_agent_rejecting_the_session_fails_what_is_in_flight() -> None:
    gate = Gate()
    link = InMemoryLink({"wait": gate, "echo": lambda ctx: ctx.args})
    pending = call(link, "wait")
    with capturedLogs() as events:
        link.client._data_received(
            encode_frame(FrameType.ERROR, 0, b'{"code":"protocol-violation","message":"m"}')
        )
    link.flush()
    error = error_of(pending)
    assert str(error) == "m"
    assert [e["error"] for e in events if e["log_format"] == "Agent rejected the session: {error}"] == [error]
    assert result_of(call(link, "echo", {"again": 2})) == {"again": 2}


def test_an_agent_that_restarts_fails_what_is_in_flight_saying_so() -> None:
    gate = Gate()
    link = InMemoryLink({"wait": gate, "echo": lambda ctx: ctx.args})
    pending = call(link, "wait")
    link.client._data_received(RESET_MARKER)
    link.flush()
    error = error_of(pending)
    assert isinstance(error, ConnectionLost) and str(error) == (
        "the agent restarted: operations in flight were abandoned and their outcome in the guest is "
        "unknown; retry them")
    assert result_of(call(link, "echo", {"again": 3})) == {"again": 3}  # in a new session


def test_notifications_reach_every_observer_even_one_that_leaves() -> None:
    link = InMemoryLink({})
    seen: list[tuple[str, str, dict[str, Any]]] = []

    def once(name: str, body: dict[str, Any]) -> None:
        seen.append(("once", name, body))
        link.client.notifications.remove(once)

    link.client.notifications.extend([once, lambda name, body: seen.append(("all", name, body))])
    link.flush()
    session = link.agent.session
    assert session is not None
    session._notify("job", {"n": 1})
    session._notify("job", {"n": 2})
    link.flush()
    assert seen == [("once", "job", {"n": 1}), ("all", "job", {"n": 1}), ("all", "job", {"n": 2})]


def test_a_lost_transport_fails_waiters_and_later_calls_with_the_reason() -> None:
    link = InMemoryLink({"echo": lambda ctx: ctx.args})
    link.flush()
    link.client.close()
    link.flush()
    later = Deferred.fromCoroutine(link.client.wait_ready())
    error = error_of(later)
    assert isinstance(error, ConnectionLost) and str(error).startswith("the channel to the agent closed: ")
    assert link.client._sync_timer is None


def test_a_failed_handshake_closes_the_client_with_its_error() -> None:
    link = InMemoryLink({}, versions=(99,))
    waiting = Deferred.fromCoroutine(link.client.wait_ready())
    link.flush()
    error = error_of(waiting)
    assert isinstance(error, UnsupportedProtocolVersion)
    assert error_of(Deferred.fromCoroutine(link.client.wait_ready())) is error
    assert link.client._sync_timer is None and link.client._transport is None


def waiting_client() -> tuple[GuestClient, StringTransport, Deferred[None]]:
    """A client whose SYNC went out and who waits for a session."""
    client = GuestClient(Clock(), authenticator=None)
    transport = StringTransport()
    _AgentProtocol(client).makeConnection(transport)
    return client, transport, Deferred.fromCoroutine(client.wait_ready())


def test_waiters_fail_when_the_channel_closes_before_the_handshake() -> None:
    client, _transport, waiting = waiting_client()
    protocol = _AgentProtocol(client)
    protocol.connectionLost(None)
    error = error_of(waiting)
    assert isinstance(error, ConnectionLost)
    assert str(error) == ("the channel to the agent closed: closed; what was in flight has an unknown "
                          "outcome in the guest")


def test_waiters_fail_when_the_agent_refuses_the_handshake() -> None:
    client, transport, waiting = waiting_client()
    agent = AgentConnection(versions=(3,), authenticator=None)
    for _ in range(2):
        agent.receive_data(transport.value())
        transport.clear()
        client._data_received(agent.data_to_send())
    assert isinstance(error_of(waiting), UnsupportedProtocolVersion)
    assert transport.disconnecting


def test_check_reports_undecodable_stderr_and_no_stderr() -> None:
    with pytest.raises(ProcessFailed) as raised:
        ExecResult(("x",), 1, None, b"", b"\xff bad byte\n").check()
    assert str(raised.value) == "['x'] exited with status 1 in the guest: \ufffd bad byte"
    with pytest.raises(ProcessFailed) as raised:
        ExecResult(("x",), 2, None, b"out", b"").check()
    assert str(raised.value) == "['x'] exited with status 2 in the guest"
