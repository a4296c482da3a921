"""
``exec`` without a reactor or real processes: the agent operation spawns into a fake
process reactor, the host's :class:`ExecHandle` talks to it through :class:`InMemoryLink`.
"""

from __future__ import annotations

import errno
import os
import random
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessProtocol, IProcessTransport, IPushProducer, IReactorProcess
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from guest_agent.ops import exec as agent_exec
from guest_agent.ops.commands import CommandRegistry
from guest_agent.protocol.connection import Limits
from vmcontroller._exec import STREAM, ExecHandle, ExecResult, Terminal
from vmcontroller.errors import (
    AgentOSError,
    BadRequest,
    CommandNotFound,
    NotADirectory,
    OperationCancelled,
    OperationTimeout,
    PathNotFound,
    PermissionDenied,
    ProcessFailed,
    UnknownOperation,
)
from vmcontroller.testing import InMemoryLink

PID = 4242


@implementer(IProcessTransport)
class FakeProcess:
    """A spawned process the test plays: it records what the agent does to it."""

    def __init__(self, protocol: IProcessProtocol, executable: str, args: list[str], env: dict[str, str],
                 path: str | None, session: bool) -> None:
        self.protocol = protocol
        self.executable = executable
        self.args = args
        self.env = env
        self.path = path
        #: Spawned by posix_spawn in a new session, rather than by spawnProcess.
        self.session = session
        self.pid: int | None = PID
        self.signals: list[str | int] = []
        self.stdin = bytearray()
        self.stdin_closed = False
        self.paused = False
        self.producer: IPushProducer | None = None
        self.lost = False

    # IProcessTransport
    def closeStdin(self) -> None:
        self.stdin_closed = True

    def closeStdout(self) -> None:
        raise NotImplementedError

    def closeStderr(self) -> None:
        raise NotImplementedError

    def closeChildFD(self, descriptor: int) -> None:
        raise NotImplementedError

    def writeToChild(self, childFD: int, data: bytes) -> None:
        raise NotImplementedError

    def loseConnection(self) -> None:
        self.lost = True

    def signalProcess(self, signalID: str | int) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(signalID)

    def write(self, data: bytes) -> None:
        self.stdin += data

    def writeSequence(self, data: Any) -> None:
        raise NotImplementedError

    def getPeer(self) -> Any:
        raise NotImplementedError

    def getHost(self) -> Any:
        raise NotImplementedError

    # What twisted.internet.process.Process adds
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    # The test plays the process with these
    def output(self, fd: int, data: bytes) -> None:
        self.protocol.childDataReceived(fd, data)

    def end(self, reason: Exception) -> None:
        """Exit and close both pipes, as a process without children does."""
        self.pid = None
        self.protocol.processExited(Failure(reason))
        self.protocol.childConnectionLost(1)
        self.protocol.childConnectionLost(2)
        self.protocol.processEnded(Failure(reason))


@implementer(IReactorProcess)
class FakeProcessReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        #: Raised by the next spawn in a session, as posix_spawn raises a failed exec.
        self.spawn_error: OSError | None = None

    def spawnProcess(self, processProtocol: IProcessProtocol, executable: Any, args: Any, env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: bool = False,
                     childFDs: Any = None) -> FakeProcess:
        return self._spawned(FakeProcess(processProtocol, executable, list(args), env, path, session=False))

    def spawn_in_session(self, protocol: IProcessProtocol, executable: str, argv: list[str],
                         env: dict[str, str]) -> FakeProcess:
        """What the agent's ``_spawn_in_session`` does with a real reactor."""
        if self.spawn_error is not None:
            raise self.spawn_error
        return self._spawned(FakeProcess(protocol, executable, list(argv), env, None, session=True))

    def _spawned(self, process: FakeProcess) -> FakeProcess:
        self.processes.append(process)
        process.protocol.makeConnection(process)
        return process


def fake_session_spawns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send the agent's posix_spawn path to the fake reactor too."""
    monkeypatch.setattr(agent_exec, "_spawn_in_session",
                        lambda reactor, protocol, executable, argv, env:
                        reactor.spawn_in_session(protocol, executable, argv, env))


class Exec:
    """The agent's exec operation on a fake reactor, reached by a real client in memory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, host_limits: Limits | None = None) -> None:
        self.reactor = FakeProcessReactor()
        fake_session_spawns(monkeypatch)
        self.killed_groups: list[int] = []
        monkeypatch.setattr(agent_exec, "_kill_group", self.killed_groups.append)
        self.link = InMemoryLink(agent_exec.OPERATIONS, agent_reactor=self.reactor,
                                 client_limits=host_limits)
        self.link.flush()

    def start(self, argv: list[str], **kwargs: Any) -> ExecHandle:
        handle = self.link.client.exec(argv, **kwargs)
        self.link.flush()
        return handle

    @property
    def process(self) -> FakeProcess:
        return self.reactor.processes[-1]


@pytest.fixture
def exec_(monkeypatch: pytest.MonkeyPatch) -> Exec:
    return Exec(monkeypatch)


def outcome(d: Deferred[Any]) -> Any:
    """What ``d`` fired with (a Failure's exception), or the test fails."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    result = results[0]
    return result.value if isinstance(result, Failure) else result


def test_fake_reactor_and_transport_provide_their_interfaces(exec_: Exec) -> None:
    verifyObject(IReactorProcess, exec_.reactor)
    exec_.start(["true"])
    verifyObject(IProcessTransport, exec_.process)


def test_spawns_the_resolved_program_in_a_session_with_the_given_env(exec_: Exec) -> None:
    exec_.start(["sh", "-c", "x"], env={"A": "1"})
    process = exec_.process
    assert process.session and process.path is None
    assert process.args == ["sh", "-c", "x"]  # argv[0] as given; no launcher in between
    assert os.path.isabs(process.executable) and os.path.basename(process.executable) == "sh"
    assert process.env == {"PATH": agent_exec.DEFAULT_PATH, "A": "1"}
    assert process.stdin_closed  # stdin "none": the program reads end-of-file


def test_a_relative_program_is_spawned_by_its_absolute_path(exec_: Exec) -> None:
    relative = os.path.relpath(agent_exec.shutil.which("true") or "/bin/true")
    exec_.start([relative])
    assert exec_.process.session and exec_.process.executable == os.path.abspath(relative)
    assert exec_.process.args == [relative]


def test_spawns_through_setsid_with_the_given_env_and_cwd(exec_: Exec, tmp_path: Any) -> None:
    exec_.start(["sh", "-c", "x"], env={"A": "1"}, cwd=str(tmp_path))
    process = exec_.process
    assert not process.session  # posix_spawn cannot change directory
    assert process.args == [*agent_exec._launcher(), "sh", "-c", "x"]
    assert process.executable == process.args[0]
    assert process.env == {"PATH": agent_exec.DEFAULT_PATH, "A": "1"}
    assert process.path == str(tmp_path)
    assert process.stdin_closed  # stdin "none": the program reads end-of-file


def test_a_file_the_kernel_cannot_exec_goes_through_setsid(exec_: Exec) -> None:
    exec_.reactor.spawn_error = OSError(errno.ENOEXEC, "Exec format error")
    exec_.start(["sh", "-c", "x"])
    process = exec_.process
    assert not process.session and process.path is None
    assert process.args == [*agent_exec._launcher(), "sh", "-c", "x"]  # execvp runs it with /bin/sh


@pytest.mark.parametrize(("number", "error", "message"), [
    (errno.ENOENT, CommandNotFound, "could not run"),
    (errno.EACCES, PermissionDenied, "may not run"),
    (errno.EAGAIN, AgentOSError, "could not start"),
])
def test_a_failed_spawn_is_an_error_naming_the_program(
        exec_: Exec, number: int, error: type[Exception], message: str) -> None:
    exec_.reactor.spawn_error = OSError(number, os.strerror(number))
    failure = outcome(exec_.start(["true"]).exited)
    assert isinstance(failure, error) and message in str(failure)
    assert failure.details["errno"] == number  # type: ignore[attr-defined]
    assert exec_.reactor.processes == []
    exec_.reactor.spawn_error = None
    exec_.start(["true"])
    assert len(exec_.reactor.processes) == 1  # the agent serves on


def test_output_reaches_callbacks_before_exit_then_the_result(exec_: Exec) -> None:
    out: list[bytes] = []
    err: list[bytes] = []
    handle = exec_.start(["cat"], on_stdout=out.append, on_stderr=err.append)
    exec_.process.output(1, b"one")
    exec_.process.output(2, b"oops")
    exec_.link.flush()
    assert (out, err) == ([b"one"], [b"oops"])
    exited = handle.exited
    assert not exited.called
    exec_.process.output(1, b"two")
    exec_.process.end(ProcessTerminated(exitCode=2))
    exec_.link.flush()
    assert outcome(exited) == ExecResult(("cat",), 2, None, b"", b"")
    assert out == [b"one", b"two"]


def test_collected_output_and_signal_name(exec_: Exec) -> None:
    handle = exec_.start(["cat"])
    exec_.process.output(1, b"a")
    exec_.process.output(1, b"b")
    exec_.process.output(2, b"c")
    exec_.process.end(ProcessTerminated(signal=9))
    exec_.link.flush()
    result = outcome(handle.result())
    assert (result.stdout, result.stderr, result.exit_code, result.signal) == (b"ab", b"c", None, "SIGKILL")
    failure = outcome(handle.result(check=True))
    assert isinstance(failure, ProcessFailed) and "killed by SIGKILL" in str(failure)
    assert failure.result == result


def test_check_passes_a_zero_status(exec_: Exec) -> None:
    handle = exec_.start(["true"])
    exec_.process.end(ProcessDone(0))
    exec_.link.flush()
    assert outcome(handle.result(check=True)).exit_code == 0


def test_a_held_callback_pauses_the_pipes_and_nothing_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    window = 64 * 1024
    exec_ = Exec(monkeypatch, Limits(window=window))
    seen: list[bytes] = []
    held: list[Deferred[None]] = []

    def on_stdout(chunk: bytes) -> Deferred[None]:
        seen.append(chunk)
        held.append(Deferred())
        return held[-1]

    handle = exec_.start(["cat"], on_stdout=on_stdout)
    process = exec_.process
    sent = bytearray()
    block = 16 * 1024
    # The process writes until the agent stops reading its pipes.
    while not process.paused:
        data = bytes([len(sent) // block % 251]) * block
        sent += data
        process.output(1, data)
        exec_.link.flush()
        # The host's window, the chunk it took and the agent's buffer: then the pipes wait.
        assert len(sent) <= window + window // 4 + agent_exec.HIGH_WATER + block, "the agent never paused"
    assert len(held) == 1  # the host holds the first chunk, so it grants no more credit
    for _ in range(1000):  # release the held chunks until the agent reads again
        if not process.paused:
            break
        held[-1].callback(None)
        exec_.link.flush()
    assert not process.paused
    process.end(ProcessDone(0))
    exec_.link.flush()
    for _ in range(1000):
        if handle.exited.called:
            break
        if not held[-1].called:
            held[-1].callback(None)
        exec_.link.flush()
    assert b"".join(seen) == sent


def test_timeout_kills_the_group_and_fails(exec_: Exec) -> None:
    handle = exec_.start(["sleep", "100"], timeout=5)
    process = exec_.process
    exec_.reactor.advance(4.9)
    assert process.signals == []
    exec_.reactor.advance(0.1)
    assert process.signals == ["KILL"] and exec_.killed_groups == [PID]
    result = handle.result()
    assert not result.called  # the error waits until the process has gone
    process.end(ProcessTerminated(signal=9))
    exec_.link.flush()
    error = outcome(result)
    assert isinstance(error, OperationTimeout) and "timeout of 5 s" in str(error) and "SIGKILL" in str(error)


def test_timeout_stops_waiting_for_pipes_a_grandchild_holds(exec_: Exec) -> None:
    handle = exec_.start(["sh", "-c", "sleep 100 &"], timeout=1)
    process = exec_.process
    process.pid = None
    process.protocol.processExited(Failure(ProcessDone(0)))  # the shell is gone, its child holds stdout
    exec_.reactor.advance(1)
    assert exec_.killed_groups == [PID]  # the group outlives its leader
    assert process.lost  # the agent closed its ends of the pipes
    process.protocol.childConnectionLost(1)
    process.protocol.childConnectionLost(2)
    process.protocol.processEnded(Failure(ProcessDone(0)))
    exec_.link.flush()
    assert isinstance(outcome(handle.result()), OperationTimeout)


def test_cancel_kills_the_group(exec_: Exec) -> None:
    handle = exec_.start(["sleep", "100"])
    process = exec_.process
    handle.cancel()
    exec_.link.flush()
    assert process.signals == ["KILL"] and exec_.killed_groups == [PID]
    assert isinstance(outcome(handle.result()), OperationCancelled)
    process.end(ProcessTerminated(signal=9))
    exec_.link.flush()


def test_cancelling_a_result_deferred_cancels_the_exec(exec_: Exec) -> None:
    handle = exec_.start(["sleep", "100"])
    result = handle.result()
    result.cancel()
    exec_.link.flush()
    assert exec_.process.signals == ["KILL"]
    assert isinstance(outcome(result), OperationCancelled)
    assert isinstance(outcome(handle.exited), OperationCancelled)


def one_request_slot(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeProcessReactor, InMemoryLink]:
    """An agent that runs one request at a time (max_inflight=1), its session open."""
    reactor = FakeProcessReactor()
    fake_session_spawns(monkeypatch)
    link = InMemoryLink(agent_exec.OPERATIONS, agent_reactor=reactor, agent_limits=Limits(max_inflight=1))
    link.flush()
    return reactor, link


def test_cancel_while_waiting_for_a_request_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    reactor, link = one_request_slot(monkeypatch)
    first = link.client.exec(["true"])
    queued = link.client.exec(["sleep", "100"], stdin=STREAM)
    write = queued.write_stdin(b"never sent")
    link.flush()
    assert len(reactor.processes) == 1
    queued.cancel()
    assert isinstance(outcome(queued.exited), OperationCancelled)
    assert isinstance(outcome(write), OperationCancelled)
    reactor.processes[0].end(ProcessDone(0))
    link.flush()
    assert outcome(first.exited).exit_code == 0
    assert len(reactor.processes) == 1  # the cancelled exec never reached the agent


def test_stdin_written_while_waiting_for_a_request_slot_reaches_the_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reactor, link = one_request_slot(monkeypatch)
    first = link.client.exec(["true"])
    queued = link.client.exec(["cat"], stdin=STREAM)
    write = queued.write_stdin(b"written while queued")
    queued.close_stdin()
    link.flush()
    assert len(reactor.processes) == 1
    reactor.processes[0].end(ProcessDone(0))
    link.flush()
    assert outcome(first.exited).exit_code == 0
    process = reactor.processes[1]
    assert outcome(write) is None
    assert process.stdin == b"written while queued" and process.stdin_closed


def test_host_gone_kills_the_group(exec_: Exec) -> None:
    exec_.start(["sleep", "100"]).exited.addErrback(lambda f: None)
    exec_.link.client.close()
    exec_.link.flush()
    assert exec_.process.signals == ["KILL"] and exec_.killed_groups == [PID]


def test_a_failing_callback_cancels_the_exec_with_its_error(exec_: Exec) -> None:
    def on_stdout(chunk: bytes) -> None:
        raise ValueError("cannot parse")

    handle = exec_.start(["cat"], on_stdout=on_stdout)
    exec_.process.output(1, b"x")
    exec_.link.flush()
    assert exec_.process.signals == ["KILL"]
    error = outcome(handle.exited)
    assert isinstance(error, ValueError) and "cannot parse" in str(error)


def test_streamed_stdin_in_order_then_closed(exec_: Exec) -> None:
    handle = exec_.start(["cat"], stdin=STREAM)
    process = exec_.process
    assert not process.stdin_closed and process.producer is not None
    writes = [handle.write_stdin(b"a"), handle.write_stdin(b"b")]
    handle.close_stdin()
    exec_.link.flush()
    assert [outcome(w) for w in writes] == [None, None]
    assert process.stdin == b"ab" and process.stdin_closed


def test_stdin_waits_while_the_pipe_is_full(exec_: Exec) -> None:
    handle = exec_.start(["cat"], stdin=STREAM)
    process = exec_.process
    assert process.producer is not None
    process.producer.pauseProducing()
    for data in (b"a", b"b"):
        handle.write_stdin(data)
    exec_.link.flush()
    assert process.stdin == b"a"  # taken, then the agent waits for the pipe
    process.producer.resumeProducing()
    exec_.link.flush()
    assert process.stdin == b"ab"


def test_stdin_bytes_are_fed_and_closed(exec_: Exec) -> None:
    exec_.start(["cat"], stdin=b"input")
    assert exec_.process.stdin == b"input" and exec_.process.stdin_closed


def test_write_stdin_needs_stream(exec_: Exec) -> None:
    handle = exec_.start(["cat"], stdin=b"x")
    with pytest.raises(BadRequest, match="stdin=STREAM"):
        handle.write_stdin(b"more")
    streamed = exec_.start(["cat"], stdin=STREAM)
    streamed.close_stdin()
    with pytest.raises(BadRequest, match="closed"):
        streamed.write_stdin(b"late")


@pytest.mark.parametrize(("argv", "kwargs", "error", "message"), [
    (["no-such-program"], {}, CommandNotFound, "no-such-program"),
    (["sh"], {"env": {"PATH": "/nonexistent"}}, CommandNotFound, "/nonexistent"),
    (["/etc/passwd"], {}, CommandNotFound, "not an executable file"),
    (["true"], {"cwd": "/no/such/dir"}, PathNotFound, "/no/such/dir"),
    (["true"], {"cwd": "/etc/passwd"}, NotADirectory, "/etc/passwd"),
])
def test_missing_program_or_directory_fails_before_spawning(
        exec_: Exec, argv: list[str], kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    handle = exec_.start(argv, **kwargs)
    failure = outcome(handle.exited)
    assert isinstance(failure, error) and message in str(failure)
    assert exec_.reactor.processes == []
    exec_.start(["true"])
    assert len(exec_.reactor.processes) == 1  # the agent serves on


@pytest.mark.parametrize("args", [
    {},
    {"argv": []},
    {"argv": ["a\0b"]},
    {"argv": ["true"], "env": {"A=B": "c"}},
    {"argv": ["true"], "env": {"A": 1}},
    {"argv": ["true"], "cwd": 3},
    {"argv": ["true"], "stdin": "file"},
    {"argv": ["true"], "timeout": 0},
    {"argv": ["true"], "timeout": True},
])
def test_bad_arguments(exec_: Exec, args: dict[str, Any]) -> None:
    d = Deferred.fromCoroutine(exec_.link.client.call("exec", args))
    exec_.link.flush()
    assert isinstance(outcome(d), BadRequest)


def test_host_rejects_a_bad_argv(exec_: Exec) -> None:
    with pytest.raises(BadRequest, match="non-empty list"):
        exec_.start([])


def test_many_at_once(exec_: Exec) -> None:
    handles = [exec_.start(["echo", str(i)]) for i in range(20)]
    for i, process in enumerate(exec_.reactor.processes):
        process.output(1, f"out {i}".encode())
    for process in reversed(exec_.reactor.processes):
        process.end(ProcessDone(0))
    exec_.link.flush()
    assert [outcome(h.exited).stdout for h in handles] == [f"out {i}".encode() for i in range(20)]


def test_launcher_without_setsid_is_the_python_shim(monkeypatch: pytest.MonkeyPatch) -> None:
    agent_exec._launcher.cache_clear()
    monkeypatch.setattr(agent_exec.shutil, "which", lambda name, path=None: None)
    try:
        launcher = agent_exec._launcher()
    finally:
        agent_exec._launcher.cache_clear()
    assert launcher[-2:] == ("-c", agent_exec._SETSID_SHIM)



def _child_fds(actions: list[tuple[int, ...]], open_fds: dict[int, bool]) -> dict[int, int]:
    """
    Play ``posix_spawn``'s file actions on the parent's fd table, then the exec's closing of
    close-on-exec fds: the child's fds, each to the parent fd whose file it holds.
    """
    table = {fd: (fd, not inheritable) for fd, inheritable in open_fds.items()}  # fd: (file, cloexec)
    for action in actions:
        if action[0] == os.POSIX_SPAWN_DUP2:
            _, source, target = action
            assert source in table, f"dup2 from {source}, which is not open"
            assert source != target, "dup2(fd, fd) leaves close-on-exec as it is"
            table[target] = (table[source][0], False)
        else:
            assert action[0] == os.POSIX_SPAWN_CLOSE
            assert action[1] in table, f"close of {action[1]}, which is not open"
            del table[action[1]]
    return {fd: file for fd, (file, cloexec) in table.items() if not cloexec}


@pytest.mark.parametrize(("fdmap", "open_fds"), [
    # Twisted's usual case: three close-on-exec pipe ends onto 0, 1, 2, which are open.
    ({0: 5, 1: 6, 2: 8}, {0: True, 1: True, 2: True, 5: False, 6: False, 8: False, 7: False}),
    # An agent started with 0-2 closed: its pipes got those numbers.
    ({0: 1, 1: 2, 2: 0}, {0: False, 1: False, 2: False, 3: False, 4: False, 5: False}),
    ({0: 0, 1: 1, 2: 2}, {0: False, 1: True, 2: False}),  # in place, close-on-exec or not
    ({0: 1, 1: 0}, {0: False, 1: False}),  # a swap
    ({1: 4, 2: 4, 3: 1}, {1: True, 4: False, 9: True}),  # 2>&1 and a later fd
])
def test_file_actions_give_the_child_exactly_its_fds(fdmap: dict[int, int],
                                                     open_fds: dict[int, bool]) -> None:
    assert _child_fds(agent_exec._file_actions(fdmap, open_fds), open_fds) == fdmap


def test_file_actions_on_random_maps() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        fdmap = {child: rng.randrange(8) for child in rng.sample(range(8), rng.randint(1, 5))}
        open_fds = {fd: rng.random() < 0.5 for fd in rng.sample(range(12), rng.randint(0, 10))}
        open_fds.update({parent: rng.random() < 0.3 for parent in fdmap.values()})
        assert _child_fds(agent_exec._file_actions(fdmap, open_fds), open_fds) == fdmap, (fdmap, open_fds)


# -- on a pty ----------------------------------------------------------------------------------


class FakePtyProcess(FakeProcess):
    """A process on a pty, as Twisted's ``PTYProcess`` is one: one fd, no pipes to close."""

    connected = 1

    def __init__(self, protocol: IProcessProtocol, executable: str, request: agent_exec.ExecRequest,
                 env: dict[str, str]) -> None:
        super().__init__(protocol, executable, request.argv, env, request.cwd, session=True)
        self.pty = request.pty
        #: What the terminal still holds when the program exits.
        self.remains: list[bytes] = []

    def fileno(self) -> int:
        return 99

    def loseConnection(self) -> None:
        super().loseConnection()
        self.connected = 0

    def end(self, reason: Exception) -> None:
        """The program exits; the terminal closes once the agent hangs it up (or every holder left)."""
        self.pid = None
        self.protocol.processExited(Failure(reason))
        self.connected = 0
        self.protocol.processEnded(Failure(reason))


class PtyExec(Exec):
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(monkeypatch)
        #: (fd, rows, cols) of each TIOCSWINSZ.
        self.sizes: list[tuple[int, int, int]] = []
        monkeypatch.setattr(agent_exec, "_spawn_on_pty", self._spawn)
        monkeypatch.setattr(agent_exec, "set_window_size",
                            lambda fd, rows, cols: self.sizes.append((fd, rows, cols)))
        monkeypatch.setattr(agent_exec, "read_terminal_remains",
                            lambda fd: self.pty_process.remains if fd == 99 else [])

    def _spawn(self, reactor: FakeProcessReactor, protocol: IProcessProtocol, executable: str,
               request: agent_exec.ExecRequest, environment: dict[str, str]) -> FakePtyProcess:
        process = FakePtyProcess(protocol, executable, request, environment)
        reactor._spawned(process)
        return process

    @property
    def pty_process(self) -> FakePtyProcess:
        process = self.process
        assert isinstance(process, FakePtyProcess)
        return process

    def resize(self, handle: ExecHandle, rows: int, cols: int) -> Any:
        d = handle.resize(rows, cols)
        self.link.flush()
        return outcome(d)

    def call(self, op: str, args: dict[str, Any]) -> Any:
        d = Deferred.fromCoroutine(self.link.client.call(op, args))
        self.link.flush()
        return outcome(d)


@pytest.fixture
def pty_exec(monkeypatch: pytest.MonkeyPatch) -> PtyExec:
    return PtyExec(monkeypatch)


def test_a_pty_exec_runs_on_a_terminal_of_its_size_and_type(pty_exec: PtyExec) -> None:
    shown: list[bytes] = []
    handle = pty_exec.start(["sh"], pty=Terminal(30, 100, "xterm-256color"), stdin=STREAM,
                            on_stdout=shown.append)
    process = pty_exec.process
    assert isinstance(process, FakePtyProcess)
    assert process.pty == agent_exec.PtyRequest(30, 100, "xterm-256color")
    assert process.env["TERM"] == "xterm-256color" and process.env["PATH"] == os.environ["PATH"]
    process.output(1, b"$ ")
    handle.write_stdin(b"sleep 9\r\x03exit 3\r")  # keys, Ctrl-C among them, reach the terminal as typed
    pty_exec.link.flush()
    assert process.stdin == b"sleep 9\r\x03exit 3\r"
    process.remains = [b"exit 3\r\n", b"logout\r\n"]  # still in the terminal when the shell exits
    process.end(ProcessTerminated(3))
    pty_exec.link.flush()
    result = outcome(handle.exited)
    assert b"".join(shown) == b"$ exit 3\r\nlogout\r\n"
    assert (result.exit_code, result.stderr) == (3, b"")
    assert process.lost  # the agent hung the terminal up: what is left on it cannot hold the exec open


@pytest.mark.parametrize(("rows", "cols", "term"), [(0, 80, "vt100"), (24, 4097, "vt100"), (24, 80, "")])
def test_the_host_checks_a_terminal_as_the_agent_does(rows: int, cols: int, term: str) -> None:
    with pytest.raises(BadRequest, match="'pty'"):
        Terminal(rows, cols, term)


def test_the_pty_term_is_the_terminals_over_a_given_env(pty_exec: PtyExec) -> None:
    pty_exec.start(["true"], env={"TERM": "dumb", "A": "1"}, pty=Terminal())
    assert pty_exec.process.env == {"PATH": agent_exec.DEFAULT_PATH, "A": "1", "TERM": "vt100"}


def test_resize_reaches_the_terminal_until_the_program_ends(pty_exec: PtyExec) -> None:
    handle = pty_exec.start(["sh"], pty=Terminal(), stdin=STREAM)
    assert pty_exec.resize(handle, 50, 132) is None
    assert pty_exec.sizes == [(99, 50, 132)]
    request_id = handle._io.request_id if handle._io is not None else 0
    pty_exec.process.end(ProcessDone(0))
    pty_exec.link.flush()
    assert outcome(handle.exited).exit_code == 0
    assert pty_exec.resize(handle, 10, 10) is None  # it ended: nothing to do, no error
    refused = pty_exec.call("resize", {"request": request_id, "rows": 10, "cols": 10})
    assert isinstance(refused, BadRequest) and refused.details == {"request": request_id}
    assert pty_exec.sizes == [(99, 50, 132)]


@pytest.mark.parametrize(("rows", "refusal"), [(50, None), (0, "'rows'")])
def test_a_resize_that_crosses_the_programs_end(pty_exec: PtyExec, rows: int, refusal: str | None) -> None:
    """
    The agent refuses a resize for an exec that is over; once the exec's answer is in, that
    refusal is no error, but one of the size itself still is.
    """
    handle = pty_exec.start(["sh"], pty=Terminal(), stdin=STREAM)
    resizing = handle.resize(rows, 132)  # on its way to the agent ...
    pty_exec.process.end(ProcessDone(0))  # ... which the program's end overtakes
    pty_exec.link.flush()
    assert outcome(handle.exited).exit_code == 0
    resized = outcome(resizing)
    if refusal is None:
        assert resized is None
    else:
        assert isinstance(resized, BadRequest) and refusal in str(resized)
    assert pty_exec.sizes == []


def test_a_closed_terminal_is_not_resized(pty_exec: PtyExec) -> None:
    """Between the terminal closing and the exec's answer, its fd number may be another file's."""
    handle = pty_exec.start(["sh"], pty=Terminal(), stdin=STREAM)
    pty_exec.pty_process.connected = 0
    assert isinstance(pty_exec.resize(handle, 50, 132), BadRequest)
    assert pty_exec.sizes == []


def test_an_exec_without_a_pty_has_nothing_to_resize(pty_exec: PtyExec) -> None:
    handle = pty_exec.start(["sleep", "9"])
    with pytest.raises(BadRequest, match="not started with a pty"):
        handle.resize(24, 80)
    assert handle._io is not None
    refused = pty_exec.call("resize", {"request": handle._io.request_id, "rows": 24, "cols": 80})
    assert isinstance(refused, BadRequest) and "pty exec in flight" in str(refused)
    assert pty_exec.sizes == []


@pytest.mark.parametrize("pty", [
    {"rows": 0, "cols": 80},
    {"rows": 24, "cols": 4097},
    {"rows": -1, "cols": 80},
    {"rows": "24", "cols": 80},
    {"rows": True, "cols": 80},
    {"rows": 24.0, "cols": 80},
    {"rows": 24},
    {"rows": 24, "cols": 80, "term": ""},
    {"rows": 24, "cols": 80, "term": "xterm; rm -rf /"},
    {"rows": 24, "cols": 80, "term": "x" * 65},
    {"rows": 24, "cols": 80, "term": 7},
    {"rows": 24, "cols": 80, "colour": True},
    [24, 80],
    "xterm",
])
def test_bad_pty_arguments_spawn_nothing(pty_exec: PtyExec, pty: Any) -> None:
    refused = pty_exec.call("exec", {"argv": ["true"], "pty": pty})
    assert isinstance(refused, BadRequest) and "'pty'" in str(refused)
    assert pty_exec.reactor.processes == []
    pty_exec.start(["true"], pty=Terminal(4096, 1))  # the agent serves on; the extremes are sizes
    assert pty_exec.pty_process.pty == agent_exec.PtyRequest(4096, 1, "vt100")


@pytest.mark.parametrize(("rows", "cols"), [(0, 80), (24, 4097), (True, 80), (24, None), ("24", "80")])
def test_bad_sizes_leave_the_terminal_as_it_was(pty_exec: PtyExec, rows: Any, cols: Any) -> None:
    handle = pty_exec.start(["sh"], pty=Terminal(), stdin=STREAM)
    assert isinstance(pty_exec.resize(handle, rows, cols), BadRequest)
    assert pty_exec.sizes == [] and not handle.exited.called
    assert pty_exec.resize(handle, 25, 81) is None and pty_exec.sizes == [(99, 25, 81)]


def test_resize_of_a_request_that_is_no_pty_exec(pty_exec: PtyExec) -> None:
    for target in (12345, "1", None, 0):
        refused = pty_exec.call("resize", {"request": target, "rows": 24, "cols": 80})
        assert isinstance(refused, BadRequest) and "'request'" in str(refused)


def test_cancelling_a_pty_exec_kills_its_group(pty_exec: PtyExec) -> None:
    handle = pty_exec.start(["sh"], pty=Terminal(), stdin=STREAM)
    handle.cancel()
    pty_exec.link.flush()
    assert pty_exec.process.signals == ["KILL"] and pty_exec.killed_groups == [PID]
    pty_exec.process.end(ProcessTerminated(signal=9))
    pty_exec.link.flush()
    assert isinstance(outcome(handle.exited), OperationCancelled)


def test_the_agent_announces_pty_and_an_agent_without_it_is_refused(pty_exec: PtyExec) -> None:
    assert pty_exec.link.client.agent_hello["features"] == ["pty"]
    older = InMemoryLink({"exec": agent_exec.run_exec}, agent_reactor=pty_exec.reactor)
    older.flush()
    assert older.client.agent_hello["features"] == []
    handle = older.client.exec(["sh"], pty=Terminal())
    older.flush()
    refused = outcome(handle.exited)
    software = older.client.agent_hello["software"]
    assert isinstance(refused, UnknownOperation) and str(refused) == (
        f"the agent in the guest ({software}) cannot run a program on a pty: install this vmcontroller's "
        "agent in the guest")
    # Older still: a HELLO without features, nor the software's name.
    del older.client.agent_hello["features"], older.client.agent_hello["software"]
    handle = older.client.exec(["sh"], pty=Terminal())
    older.flush()
    refused = outcome(handle.exited)
    assert isinstance(refused, UnknownOperation) and str(refused) == (
        "the agent in the guest (unknown) cannot run a program on a pty: install this vmcontroller's "
        "agent in the guest")
    assert pty_exec.reactor.processes == []


def test_a_pty_exec_is_not_retained(pty_exec: PtyExec, tmp_path: Any) -> None:
    with pytest.raises(BadRequest) as refused_on_the_host:
        pty_exec.link.client.exec(["sh"], exec_id="s1", pty=Terminal())
    message = "a command on a pty cannot be retained: give exec_id or pty, not both"
    assert str(refused_on_the_host.value) == message
    registry = CommandRegistry(str(tmp_path / "spool"))
    link = InMemoryLink(registry.operations(), agent_reactor=pty_exec.reactor)
    link.flush()
    d = Deferred.fromCoroutine(link.client.call("exec", {"argv": ["sh"], "exec_id": "s1",
                                                         "pty": {"rows": 24, "cols": 80}}))
    link.flush()
    refused = outcome(d)
    assert isinstance(refused, BadRequest) and "cannot be retained" in str(refused)
    assert pty_exec.reactor.processes == [] and registry.list(None)["commands"] == []  # type: ignore[arg-type]


# A real pseudo-terminal, without a reactor or a process.


def test_set_window_size_sets_what_the_terminal_reports() -> None:
    master, terminal = os.openpty()
    try:
        agent_exec.set_window_size(master, 33, 77)
        size = os.get_terminal_size(terminal)
        assert (size.lines, size.columns) == (33, 77)
    finally:
        os.close(master)
        os.close(terminal)


def test_read_terminal_remains_reads_what_was_written_up_to_its_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    master, terminal = os.openpty()
    os.set_blocking(master, False)
    try:
        written = bytes(random.randrange(32, 127) for _ in range(3000))
        os.write(terminal, written)
        # Read at once: what the kernel still moves from the terminal to the master comes too.
        assert b"".join(agent_exec.read_terminal_remains(master)) == written
        assert agent_exec.read_terminal_remains(master) == []  # nothing more now (EAGAIN)
        monkeypatch.setattr(agent_exec, "TERMINAL_REMAINS", 1)
        os.write(terminal, b"a")
        first = agent_exec.read_terminal_remains(master)
        os.write(terminal, b"b")
        assert first == [b"a"] and agent_exec.read_terminal_remains(master) == [b"b"]
        os.close(terminal)
        terminal = -1
        assert agent_exec.read_terminal_remains(master) == []  # EIO: nobody holds the terminal
    finally:
        os.close(master)
        if terminal >= 0:
            os.close(terminal)
