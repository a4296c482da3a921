"""
``exec`` end to end on this machine: the real agent operation spawns real processes,
and a real :class:`GuestClient` reaches it over loopback TCP with the real reactor.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.task import deferLater

from guest_agent.ops import exec as agent_exec
from guest_agent.transports import AgentFactory
from vmcontroller._exec import STREAM, Terminal
from vmcontroller.client import GuestClient, connect
from vmcontroller.errors import (
    BadRequest,
    CommandNotFound,
    NotADirectory,
    OperationCancelled,
    OperationTimeout,
    PathNotFound,
    PermissionDenied,
    ProcessFailed,
)
from vmcontroller.testing import minted

MIB = 1024 * 1024


@pytest_twisted.async_yield_fixture()
async def client() -> AsyncIterator[GuestClient]:
    credentials, authenticator = minted()
    factory = AgentFactory(reactor, agent_exec.OPERATIONS, authenticator=authenticator)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    guest = await connect(
        reactor,
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        credentials=credentials,
        timeout=10,
    )
    yield guest
    guest.close()
    await port.stopListening()


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def wait_for(condition: object, what: str) -> None:
    """Poll ``condition`` (a callable) for up to 10 s; the test fails if it never holds."""
    for _ in range(200):
        if condition():  # type: ignore[operator]
            return
        await sleep(0.05)
    raise AssertionError(f"{what} never happened")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); a killed grandchild reparented to init is reaped at once.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest_twisted.ensureDeferred
async def test_output_is_streamed_before_exit(client: GuestClient) -> None:
    seen: list[bytes] = []
    first: Deferred[None] = Deferred()

    def on_stdout(chunk: bytes) -> None:
        seen.append(chunk)
        if not first.called:
            first.callback(None)

    handle = client.exec(["sh", "-c", "echo early; read _; echo late"], stdin=STREAM, on_stdout=on_stdout)
    await first
    assert b"".join(seen) == b"early\n"
    assert not handle.exited.called  # still waiting for its stdin
    await handle.write_stdin(b"go\n")
    handle.close_stdin()
    result = await handle.exited
    assert b"".join(seen) == b"early\nlate\n"
    assert result.stdout == b""  # a callback took it
    assert result.exit_code == 0


@pytest_twisted.ensureDeferred
async def test_ten_mib_while_another_exec_runs(client: GuestClient) -> None:
    slow = client.run(["sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.2; done"])
    script = "head -c 10485760 /dev/urandom > big && sha256sum big && cat big"
    seen: list[bytes] = []
    tmp = os.environ.get("TMPDIR", "/tmp")
    workdir = os.path.join(tmp, f"exec-test-{os.getpid()}")
    os.makedirs(workdir, exist_ok=True)
    big = client.exec(["sh", "-c", script], cwd=workdir, on_stdout=seen.append)
    result = await big.exited
    digest_line, payload = b"".join(seen).split(b"\n", 1)
    os.unlink(os.path.join(workdir, "big"))
    os.rmdir(workdir)
    assert len(payload) == 10 * MIB
    assert hashlib.sha256(payload).hexdigest() == digest_line.split()[0].decode()
    assert result.exit_code == 0
    assert (await slow).stdout == b"tick 1\ntick 2\ntick 3\n"


@pytest_twisted.ensureDeferred
async def test_a_slow_consumer_holds_the_process_back(client: GuestClient) -> None:
    """A callback's Deferred backpressures the guest: nothing is cut, the process waits."""
    seen: list[bytes] = []
    held: list[Deferred[None]] = []

    def on_stdout(chunk: bytes) -> Deferred[None]:
        seen.append(chunk)
        gate: Deferred[None] = Deferred()
        held.append(gate)
        return gate

    handle = client.exec(["sh", "-c", "head -c 20971520 /dev/zero; echo done >&2"], on_stdout=on_stdout)
    await wait_for(lambda: held, "first chunk")
    await sleep(0.5)
    # One chunk is held: the agent has only the window and its own buffer, the rest waits in the pipe.
    assert len(held) == 1 and not handle.exited.called
    while not handle.exited.called:
        if held and not held[-1].called:
            held[-1].callback(None)
        await sleep(0)
    result = await handle.exited
    assert sum(map(len, seen)) == 20 * MIB and set(b"".join(seen)) == {0}
    assert result.stderr == b"done\n"


@pytest_twisted.ensureDeferred
async def test_stdin_bytes_env_cwd_exit_code(client: GuestClient, tmp_path: object) -> None:
    result = await client.run(
        ["sh", "-c", 'cat; echo "$GREETING"; echo "$PATH"; pwd; exit 3'],
        stdin=b"from stdin\n",
        env={"GREETING": "hello"},
        cwd=str(tmp_path),
    )
    assert result.stdout == f"from stdin\nhello\n{agent_exec.DEFAULT_PATH}\n{tmp_path}\n".encode()
    assert result.exit_code == 3 and result.signal is None
    with pytest.raises(ProcessFailed, match="exited with status 3") as failed:
        result.check()
    assert failed.value.result is result


@pytest_twisted.ensureDeferred
async def test_streamed_stdin_of_many_mebibytes(client: GuestClient) -> None:
    handle = client.exec(["sha256sum"], stdin=STREAM)
    digest = hashlib.sha256()
    block = os.urandom(MIB)
    for i in range(12):
        chunk = bytes([i]) + block[1:]
        digest.update(chunk)
        await handle.write_stdin(chunk)
    handle.close_stdin()
    result = await handle.result(check=True)
    assert result.stdout.split()[0].decode() == digest.hexdigest()


@pytest_twisted.ensureDeferred
async def test_killed_by_a_signal(client: GuestClient) -> None:
    result = await client.run(["sh", "-c", "echo bye; kill -TERM $$"])
    assert (result.exit_code, result.signal, result.stdout) == (None, "SIGTERM", b"bye\n")
    with pytest.raises(ProcessFailed, match="killed by SIGKILL"):
        await client.run(["sh", "-c", "kill -KILL $$"], check=True)


async def _assert_timeout_kills_grandchild(client: GuestClient, tmp_path: object, script: str) -> None:
    """Run ``script`` (which writes its background child's pid to $PID_FILE) into a timeout."""
    pid_file = f"{tmp_path}/child.pid"
    with pytest.raises(OperationTimeout, match=r"timeout of 0\.5 s"):
        await client.run(["sh", "-c", script.replace("$PID_FILE", pid_file)], timeout=0.5)
    with open(pid_file) as f:
        grandchild = int(f.read())
    await wait_for(lambda: not alive(grandchild), "the grandchild's death")


@pytest.mark.parametrize("launcher", ["setsid", "python"])
@pytest_twisted.ensureDeferred
async def test_timeout_kills_the_process_group(
    client: GuestClient, tmp_path: object, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    if launcher == "python":
        # The shim a guest without setsid(1) gets.
        monkeypatch.setattr(
            agent_exec, "_launcher", lambda: (sys.executable, "-I", "-S", "-c", agent_exec._SETSID_SHIM)
        )
    await _assert_timeout_kills_grandchild(client, tmp_path, "sleep 300 & echo $! > $PID_FILE; sleep 300")


@pytest_twisted.ensureDeferred
async def test_timeout_when_a_background_child_keeps_the_pipes(client: GuestClient, tmp_path: object) -> None:
    """The shell exits at once; its child holds stdout open, so the exec runs until the timeout."""
    await _assert_timeout_kills_grandchild(client, tmp_path, "sleep 300 & echo $! > $PID_FILE")


@pytest_twisted.ensureDeferred
async def test_cancel_kills_the_process_group(client: GuestClient, tmp_path: object) -> None:
    pid_file = f"{tmp_path}/child.pid"
    started: Deferred[None] = Deferred()
    handle = client.exec(
        ["sh", "-c", f"sleep 300 & echo $! > {pid_file}; echo started; sleep 300"],
        on_stdout=lambda chunk: None if started.called else started.callback(None),
    )
    await started
    with open(pid_file) as f:
        grandchild = int(f.read())
    handle.cancel()
    with pytest.raises(OperationCancelled):
        await handle.result()
    await wait_for(lambda: not alive(grandchild), "the grandchild's death")
    assert (await client.run(["true"])).exit_code == 0


@pytest_twisted.ensureDeferred
async def test_host_gone_kills_the_process_group(client: GuestClient, tmp_path: object) -> None:
    pid_file = f"{tmp_path}/child.pid"
    started: Deferred[None] = Deferred()
    handle = client.exec(
        ["sh", "-c", f"sleep 300 & echo $! > {pid_file}; echo started; sleep 300"],
        on_stdout=lambda chunk: None if started.called else started.callback(None),
    )
    await started
    with open(pid_file) as f:
        grandchild = int(f.read())
    client.close()
    with pytest.raises(Exception, match="closed"):
        await handle.result()
    await wait_for(lambda: not alive(grandchild), "the grandchild's death")


@pytest.mark.parametrize("in_tmp", [False, True], ids=["posix_spawn", "setsid(1) with cwd"])
@pytest_twisted.ensureDeferred
async def test_the_program_leads_a_session_and_inherits_nothing_else(
    client: GuestClient, tmp_path: object, in_tmp: bool
) -> None:
    """Its own session and group, only fds 0-2, default signal handling: as a forked child had."""
    leaked = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leaked, True)
    ignored = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # and Python ignores SIGPIPE itself
    try:
        cwd = str(tmp_path) if in_tmp else None
        stat = await client.run(["cat", "/proc/self/stat", "/proc/self/status"], cwd=cwd, check=True)
        fds = await client.run(["ls", "/proc/self/fd"], cwd=cwd, check=True)
    finally:
        signal.signal(signal.SIGUSR1, ignored)
        os.close(leaked)
    fields = stat.stdout.split(b")", 1)[1].split()
    pid, pgrp, session = stat.stdout.split()[0], fields[2], fields[3]
    assert pid == pgrp == session
    ignored_mask = int(stat.stdout.split(b"SigIgn:")[1].split()[0], 16)
    # glibc's posix_spawn leaves its internal signals 32 and 33 ignored (below SIGRTMIN, unusable).
    assert ignored_mask & ~(1 << 31 | 1 << 32) == 0, f"signals ignored: {ignored_mask:#x}"
    assert set(fds.stdout.split()) == {b"0", b"1", b"2", b"3"}  # 3: the directory ls reads


@pytest_twisted.ensureDeferred
async def test_a_script_without_an_interpreter_line_runs_with_sh(
    client: GuestClient, tmp_path: object
) -> None:
    script = f"{tmp_path}/script"
    with open(script, "w") as f:
        f.write('echo "from sh: $1"\n')
    os.chmod(script, 0o755)
    result = await client.run([script, "arg"], check=True)
    assert result.stdout == b"from sh: arg\n"


@pytest_twisted.ensureDeferred
async def test_an_interpreter_missing_or_not_executable(client: GuestClient, tmp_path: object) -> None:
    """The file is there and executable, the exec fails: an error naming it, not an exit status."""
    for name, interpreter in (("missing", "/no/such/interpreter"), ("denied", "/etc/passwd")):
        with open(f"{tmp_path}/{name}", "w") as f:
            f.write(f"#!{interpreter}\n")
        os.chmod(f"{tmp_path}/{name}", 0o755)
    with pytest.raises(CommandNotFound, match="missing"):
        await client.run([f"{tmp_path}/missing"])
    with pytest.raises(PermissionDenied, match="denied"):
        await client.run([f"{tmp_path}/denied"])
    assert (await client.run(["true"])).exit_code == 0


@pytest_twisted.ensureDeferred
async def test_missing_program_or_directory(client: GuestClient, tmp_path: object) -> None:
    with pytest.raises(CommandNotFound, match="no-such-program"):
        await client.run(["no-such-program", "--flag"])
    with pytest.raises(CommandNotFound, match="not an executable file"):
        await client.run([f"{tmp_path}"])
    with pytest.raises(CommandNotFound, match="not-here"):
        await client.run(["./not-here"], cwd=str(tmp_path))
    with pytest.raises(CommandNotFound, match="PATH"):
        await client.run(["sh", "-c", "true"], env={"PATH": str(tmp_path)})
    with pytest.raises(PathNotFound, match="/no/such/dir"):
        await client.run(["true"], cwd="/no/such/dir")
    with pytest.raises(NotADirectory, match="not a directory"):
        await client.run(["true"], cwd="/etc/passwd")
    assert (await client.run(["true"])).exit_code == 0  # nothing lost: the agent serves on


@pytest_twisted.ensureDeferred
async def test_many_at_once(client: GuestClient) -> None:
    results = await gatherResults(
        [client.run(["sh", "-c", f"echo out {i}; echo err {i} >&2; exit {i % 7}"]) for i in range(100)]
    )
    for i, result in enumerate(results):
        expected = (f"out {i}\n".encode(), f"err {i}\n".encode(), i % 7)
        assert (result.stdout, result.stderr, result.exit_code) == expected


# -- on a pty ----------------------------------------------------------------------------------


class Screen:
    """What a pty exec's terminal shows, and a way to wait for something to appear on it."""

    def __init__(self) -> None:
        self.text = b""

    def show(self, chunk: bytes) -> None:
        self.text += chunk

    async def wait_for(self, wanted: bytes, start: int = 0) -> int:
        """Where ``wanted`` ends, after ``start``, once it shows (within 10 s, or the test fails)."""
        await wait_for(lambda: wanted in self.text[start:], f"{wanted!r} on the terminal")
        return self.text.index(wanted, start) + len(wanted)


@pytest_twisted.ensureDeferred
async def test_a_pty_exec_runs_on_a_terminal_of_the_requested_size(client: GuestClient) -> None:
    screen = Screen()
    handle = client.exec(["sh", "-c", 'tty; stty size; echo "TERM=$TERM"; ps -o tty= -p $$; exit 3'],
                         pty=Terminal(31, 101, "xterm-256color"), on_stdout=screen.show)
    result = await handle.exited
    lines = screen.text.split(b"\r\n")  # the terminal's line endings (onlcr)
    assert lines[0].startswith(b"/dev/pts/")
    assert lines[1:3] == [b"31 101", b"TERM=xterm-256color"]
    assert lines[3].strip() == lines[0].removeprefix(b"/dev/").strip()  # its controlling terminal
    assert (result.exit_code, result.stderr) == (3, b"")


@pytest_twisted.ensureDeferred
async def test_a_resize_reaches_the_foreground_job(client: GuestClient) -> None:
    screen = Screen()
    script = 'trap \'echo "winch $(stty size)"\' WINCH; echo ready; while :; do sleep 0.05; done'
    handle = client.exec(["sh", "-c", script], pty=Terminal(24, 80), stdin=STREAM, on_stdout=screen.show)
    seen = await screen.wait_for(b"ready")
    await handle.resize(50, 132)
    await screen.wait_for(b"winch 50 132", seen)
    handle.cancel()
    with pytest.raises(OperationCancelled):
        await handle.exited
    await handle.resize(10, 10)  # the process has ended: nothing to do, no error


@pytest_twisted.ensureDeferred
async def test_a_ctrl_c_byte_interrupts_the_foreground_job(client: GuestClient, tmp_path: object) -> None:
    screen = Screen()
    pid_file = f"{tmp_path}/sleep.pid"
    # An interactive shell runs its job in a process group of its own, the terminal's foreground.
    handle = client.exec(["sh", "-i"], env={"PS1": "$ "}, pty=Terminal(), stdin=STREAM, on_stdout=screen.show)
    await handle.write_stdin(f"sleep 300 & echo $! > {pid_file}\n".encode())
    await wait_for(lambda: os.path.exists(pid_file) and os.path.getsize(pid_file), "the pid file")
    with open(pid_file) as f:
        sleeper = int(f.read())
    await handle.write_stdin(b"sleep 301\n")
    await wait_for(lambda: b"sleep 301\r\n" in screen.text, "the echo of the command")
    await sleep(0.5)  # the shell has forked it, with the terminal's foreground group
    await handle.write_stdin(b"\x03")
    await handle.write_stdin(b"echo after $((6*7)); exit 5\n")
    result = await handle.exited
    assert b"after 42" in screen.text and result.exit_code == 5
    # A background job, not in the foreground group: the interrupt spared it, and though it
    # holds the terminal the exec ended with the shell.
    assert alive(sleeper)
    os.kill(sleeper, signal.SIGKILL)


@pytest_twisted.ensureDeferred
async def test_a_pty_exec_ends_with_its_program_and_its_output_whole(
    client: GuestClient, tmp_path: object
) -> None:
    """A background job that holds the terminal neither keeps the exec open nor loses output."""
    pid_file = f"{tmp_path}/job.pid"
    screen = Screen()
    handle = client.exec(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; seq 1 30000"],
                         pty=Terminal(), on_stdout=screen.show)
    result = await handle.exited
    with open(pid_file) as f:
        job = int(f.read())
    os.kill(job, signal.SIGKILL)
    assert result.exit_code == 0
    assert screen.text.split(b"\r\n") == [str(n).encode() for n in range(1, 30001)] + [b""]


@pytest_twisted.ensureDeferred
async def test_cancelling_a_pty_exec_kills_its_process_group(client: GuestClient, tmp_path: object) -> None:
    pid_file = f"{tmp_path}/child.pid"
    screen = Screen()
    handle = client.exec(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; echo started; wait"],
                         pty=Terminal(), on_stdout=screen.show)
    await screen.wait_for(b"started")
    with open(pid_file) as f:
        child = int(f.read())
    handle.cancel()
    with pytest.raises(OperationCancelled):
        await handle.exited
    await wait_for(lambda: not alive(child), "the background child's death")


@pytest_twisted.ensureDeferred
async def test_bad_terminal_sizes_are_refused_and_the_agent_serves_on(client: GuestClient) -> None:
    for pty in ({"rows": 0, "cols": 80}, {"rows": 24, "cols": 4097}, {"rows": 24, "cols": 80, "term": "x y"}):
        with pytest.raises(BadRequest, match="pty"):
            await client.call("exec", {"argv": ["true"], "pty": pty})
    screen = Screen()
    handle = client.exec(["sh", "-c", "echo ready; read _"], pty=Terminal(), stdin=STREAM,
                         on_stdout=screen.show)
    await screen.wait_for(b"ready")
    with pytest.raises(BadRequest, match="'rows' must be an integer from 1 to 4096"):
        await handle.resize(-1, 80)
    await handle.write_stdin(b"\n")
    assert (await handle.exited).exit_code == 0
