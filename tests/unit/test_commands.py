"""
Retained commands (``exec`` with an ``exec_id``, ``commands``, ``attach``,
``acknowledge``) without a reactor or real processes: the agent's registry spawns into the
fake process reactor of ``test_exec_ops``, clients reach it through in-memory links, and a
closed link plays a controller that went away.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated

from guest_agent.ops import OPERATIONS
from guest_agent.ops import exec as agent_exec
from guest_agent.ops.commands import CommandRegistry, RetentionLimits
from tests.unit.test_exec_ops import PID, FakeProcess, FakeProcessReactor, fake_session_spawns, outcome
from vmcontroller._exec import STREAM, ExecHandle
from vmcontroller.errors import (
    AlreadyExists,
    BadRequest,
    ConnectionLost,
    OperationCancelled,
    OperationTimeout,
    ProtocolError,
    TooManyCommands,
    UnknownCommand,
)
from vmcontroller.testing import InMemoryLink


class Agent:
    """One agent (its registry lives as long as it does) and the controllers that reach it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, spool: Path, limits: RetentionLimits | None = None):
        self.reactor = FakeProcessReactor()
        fake_session_spawns(monkeypatch)
        self.killed_groups: list[int] = []
        monkeypatch.setattr(agent_exec, "_kill_group", self.killed_groups.append)
        self.spool = spool
        self.registry = CommandRegistry(str(spool), limits)
        self.operations = {**OPERATIONS, **self.registry.operations()}
        self.link = self.controller()

    def controller(self) -> InMemoryLink:
        """A new controller's link to this agent (the agent side is a new session)."""
        link = InMemoryLink(self.operations, agent_reactor=self.reactor)
        link.flush()
        self.link = link
        return link

    def exec(self, argv: list[str], exec_id: str, **kwargs: object) -> ExecHandle:
        handle = self.link.client.exec(argv, exec_id=exec_id, **kwargs)  # type: ignore[arg-type]
        self.link.flush()
        return handle

    def call(self, d: Deferred[Any]) -> Any:
        """What ``d`` fires with once the link has carried everything."""
        self.link.flush()
        return outcome(d)

    @property
    def process(self) -> FakeProcess:
        return self.reactor.processes[-1]


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Agent:
    return Agent(monkeypatch, tmp_path / "spool")


def test_a_retained_exec_streams_then_keeps_its_result_until_acknowledged(agent: Agent) -> None:
    seen: list[bytes] = []
    handle = agent.exec(["cat"], "job-1", on_stdout=seen.append)
    agent.process.output(1, b"hello ")
    agent.link.flush()
    assert seen == [b"hello "]  # streamed live
    agent.process.output(1, b"world")
    agent.process.output(2, b"warn")
    agent.process.end(ProcessTerminated(exitCode=3))
    agent.link.flush()
    result = outcome(handle.result())
    assert (result.exec_id, result.exit_code, result.stderr) == ("job-1", 3, b"warn")
    assert b"".join(seen) == b"hello world" and result.output_complete

    [info] = agent.call(agent.link.client.commands())
    assert (info.exec_id, info.argv, info.running, info.exit_code) == ("job-1", ("cat",), False, 3)
    assert info.sizes == {"stdout": 11, "stderr": 4}
    again = agent.call(agent.link.client.attach("job-1", stdout_offset=6, stderr_offset=4).result())
    assert (again.stdout, again.stderr, again.exit_code, again.argv) == (b"world", b"", 3, ("cat",))

    assert agent.call(agent.link.client.acknowledge("job-1")) is None
    assert agent.call(agent.link.client.commands()) == []
    error = agent.call(agent.link.client.attach("job-1").result())
    assert isinstance(error, UnknownCommand) and "job-1" in str(error)


def test_a_lost_controller_leaves_the_command_running_and_a_new_one_collects_everything(agent: Agent) -> None:
    first = agent.exec(["sh", "-c", "loop"], "long")
    process = agent.process
    process.output(1, b"before ")
    agent.link.flush()
    agent.link.client.close()  # the controller is gone
    agent.link.flush()
    assert isinstance(outcome(first.result()), ConnectionLost)
    assert process.signals == [] and agent.killed_groups == []  # the command runs on
    process.output(1, b"while away ")
    process.output(2, b"err")

    agent.controller()
    [info] = agent.call(agent.link.client.commands())
    assert info.running and info.sizes == {"stdout": 18, "stderr": 3}
    seen: list[bytes] = []
    handle = agent.link.client.attach("long", on_stdout=seen.append)
    agent.link.flush()
    process.output(1, b"after")
    process.end(ProcessDone(0))
    agent.link.flush()
    result = outcome(handle.result())
    assert b"".join(seen) == b"before while away after"
    assert (result.exit_code, result.stderr, result.argv) == (0, b"err", ("sh", "-c", "loop"))


def test_the_same_id_again_reattaches_instead_of_starting_a_second_process(agent: Agent) -> None:
    agent.exec(["cat"], "once")
    agent.process.output(1, b"out")
    agent.link.flush()
    again = agent.exec(["cat"], "once")
    assert len(agent.reactor.processes) == 1
    agent.process.end(ProcessDone(0))
    agent.link.flush()
    assert outcome(again.result()).stdout == b"out"
    other = agent.exec(["ls"], "once")
    error = outcome(other.result())
    assert isinstance(error, AlreadyExists) and "another argv" in str(error)
    assert len(agent.reactor.processes) == 1


def test_output_beyond_memory_is_spilled_to_the_spool_and_removed_on_acknowledge(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    agent = Agent(monkeypatch, tmp_path / "spool", RetentionLimits(memory_per_stream=100))
    agent.exec(["cat"], "big").result().addErrback(lambda _: None)
    agent.link.client.close()
    agent.link.flush()
    data = bytes(range(256)) * 40
    for start in range(0, len(data), 1000):
        agent.process.output(1, data[start : start + 1000])
    agent.process.end(ProcessDone(0))
    spilled = agent.spool / "big.stdout"
    assert spilled.read_bytes() == data[100:]  # only the tail is on disk: the head is in memory
    agent.controller()
    result = agent.call(agent.link.client.attach("big").result())
    assert result.stdout == data and result.output_complete
    agent.call(agent.link.client.acknowledge("big"))
    assert not spilled.exists()


def test_output_beyond_the_disk_limit_is_dropped_and_said_so(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    agent = Agent(monkeypatch, tmp_path / "spool", RetentionLimits(memory_per_stream=10, disk_bytes=20))
    handle = agent.exec(["cat"], "flood")
    agent.process.output(1, b"0123456789abcdefghij")
    agent.process.output(1, b"KLMNOPQRSTUVWXYZ")  # 10 in memory, 10 on disk: the rest does not fit
    agent.process.output(1, b"more")
    agent.process.end(ProcessDone(0))
    agent.link.flush()
    result = outcome(handle.result())
    assert result.stdout == b"0123456789abcdefghij"  # a prefix, never a hole
    assert result.output_dropped == {"stdout": 20, "stderr": 0} and not result.output_complete
    [info] = agent.call(agent.link.client.commands())
    assert info.output_dropped["stdout"] == 20


def test_the_number_of_retained_commands_is_limited(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    agent = Agent(monkeypatch, tmp_path / "spool", RetentionLimits(max_commands=1))
    agent.exec(["true"], "a")
    agent.process.end(ProcessDone(0))
    error = outcome(agent.exec(["true"], "b").result())
    assert isinstance(error, TooManyCommands) and "acknowledge" in str(error)
    assert len(agent.reactor.processes) == 1
    agent.call(agent.link.client.acknowledge("a"))
    agent.exec(["true"], "b")
    assert len(agent.reactor.processes) == 2


def test_a_running_command_cannot_be_acknowledged(agent: Agent) -> None:
    agent.exec(["sleep", "100"], "busy")
    error = agent.call(agent.link.client.acknowledge("busy"))
    assert isinstance(error, BadRequest) and "still running" in str(error)
    assert agent.process.signals == []
    assert [c.exec_id for c in agent.call(agent.link.client.commands())] == ["busy"]


def test_cancelling_an_attached_command_kills_its_group(agent: Agent) -> None:
    agent.exec(["sleep", "100"], "s").result().addErrback(lambda _: None)
    agent.link.client.close()
    agent.link.flush()
    agent.controller()
    handle = agent.link.client.attach("s")
    agent.link.flush()
    handle.cancel()
    agent.link.flush()
    assert agent.process.signals == ["KILL"] and agent.killed_groups == [PID]
    assert isinstance(outcome(handle.result()), OperationCancelled)
    agent.process.end(ProcessTerminated(signal=9))
    [info] = agent.call(agent.link.client.commands())
    assert not info.running and isinstance(info.error, OperationCancelled)


def test_a_timeout_runs_without_a_controller_and_is_the_retained_result(agent: Agent) -> None:
    agent.exec(["sleep", "100"], "t", timeout=5).result().addErrback(lambda _: None)
    agent.link.client.close()
    agent.link.flush()
    agent.reactor.advance(5)
    assert agent.process.signals == ["KILL"]
    agent.process.end(ProcessTerminated(signal=9))
    agent.controller()
    error = agent.call(agent.link.client.attach("t").result())
    assert isinstance(error, OperationTimeout) and "timeout of 5 s" in str(error)


def test_stdin_is_streamed_to_a_retained_command(agent: Agent) -> None:
    handle = agent.exec(["cat"], "in", stdin=STREAM)
    handle.write_stdin(b"abc")
    handle.close_stdin()
    agent.link.flush()
    assert agent.process.stdin == b"abc" and agent.process.stdin_closed


@pytest.mark.parametrize("exec_id", ["", "a/b", "x" * 129, 7])
def test_a_bad_exec_id_is_refused(agent: Agent, exec_id: object) -> None:
    error = outcome(agent.exec(["true"], exec_id).result())  # type: ignore[arg-type]
    assert isinstance(error, BadRequest) and "exec_id" in str(error)
    assert agent.reactor.processes == []


def test_an_exec_without_an_id_is_not_retained(agent: Agent) -> None:
    handle = agent.link.client.exec(["true"])
    agent.link.flush()
    agent.process.end(ProcessDone(0))
    agent.link.flush()
    assert outcome(handle.result()).exit_code == 0
    assert agent.call(agent.link.client.commands()) == []


def test_the_spool_of_an_earlier_agent_is_emptied_at_start(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "old.stdout").write_bytes(b"x")
    CommandRegistry(str(spool))
    assert os.listdir(spool) == [] and (spool.stat().st_mode & 0o777) == 0o700


def test_the_listing_says_how_a_command_ended(agent: Agent) -> None:
    agent.exec(["sleep", "100"], "killed").result().addErrback(lambda _: None)
    agent.process.end(ProcessTerminated(signal=9))
    agent.exec(["sleep", "100"], "late", timeout=5).result().addErrback(lambda _: None)
    agent.reactor.advance(5)
    agent.process.end(ProcessTerminated(signal=9))
    agent.link.flush()
    killed, late = agent.call(agent.link.client.commands())
    assert (killed.exec_id, killed.running, killed.exit_code, killed.signal, killed.error) == (
        "killed", False, None, "SIGKILL", None)
    attached = agent.call(agent.link.client.attach("late").result())
    assert isinstance(late.error, OperationTimeout) and late.error.message == attached.message
    assert "timeout of 5 s" in late.error.message


def test_attach_streams_stderr_to_its_callback(agent: Agent) -> None:
    agent.exec(["sh"], "err").result().addErrback(lambda _: None)
    agent.process.output(2, b"warning")
    agent.process.end(ProcessDone(0))
    agent.link.flush()
    seen: list[bytes] = []
    result = agent.call(agent.link.client.attach("err", on_stderr=seen.append).result())
    assert seen == [b"warning"] and result.stderr == b""


@pytest.mark.parametrize(("reply", "message"), [
    ([], "the agent's command list is malformed: []"),
    ({"commands": [{"exec_id": "x"}]},
     "the agent listed a malformed command {'exec_id': 'x'}: KeyError('argv')"),
])
def test_a_malformed_command_listing_is_a_protocol_error(reply: Any, message: str) -> None:
    async def commands(ctx: object) -> Any:
        return reply

    link = InMemoryLink({"commands": commands})
    d = link.client.commands()
    link.flush()
    error = outcome(d)
    assert isinstance(error, ProtocolError) and str(error) == message
