"""
``vmcontroller`` driven as a user drives it: the installed command in a subprocess (and under a
real pseudo-terminal for the progress bar and the shell), against the session's real guest and
a VM of its own that has no agent.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

VMCONTROLLER = str(Path(sys.executable).with_name("vmcontroller"))


def run(*args: str, stdin: bytes = b"", timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [VMCONTROLLER, *args], input=stdin, capture_output=True, timeout=timeout, check=False
    )


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmcontroller: error: "), result.stderr
    assert b"Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def vm(booted_vm: Any) -> str:
    ready = run("ping", booted_vm.name, "--timeout", "900", timeout=1000)
    assert ready.returncode == 0, ready.stderr
    return str(booted_vm.name)


def test_exec_streams_output_and_exits_with_the_guests_status(vm: str) -> None:
    result = run("exec", vm, "uname", "-a")  # no "--" needed before the command's options
    assert result.returncode == 0 and result.stdout.startswith(b"Linux "), result.stderr
    assert run("exec", vm, "sh", "-c", "echo out; echo err >&2; exit 7").returncode == 7
    failed = run("exec", vm, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (failed.stdout, failed.stderr) == (b"out\n", b"err\n")
    killed = run("exec", vm, "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + 15


def test_exec_forwards_stdin(vm: str) -> None:
    data = os.urandom(300_000)
    result = run("exec", vm, "sha256sum", stdin=data)
    assert result.returncode == 0
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_a_missing_program_exits_127_like_a_shell(vm: str) -> None:
    result = run("exec", vm, "no-such-program-here")
    assert result.returncode == 127
    assert "no-such-program-here" in result.stderr.decode()


def test_cp_both_ways_with_directories(vm: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(70_000), "sub/b.txt": b"hello\n", "sub/empty": b""}
    for name, data in files.items():
        (tree / name).write_bytes(data)
    pushed = run("cp", "--json", str(tree), f"{vm}:/root/cli-tree")
    assert pushed.returncode == 0, pushed.stderr
    assert {Path(c["from"]).relative_to(tree).as_posix() for c in json.loads(pushed.stdout)} == set(files)
    assert pushed.stderr == b""  # not a terminal: no progress bar
    back = tmp_path / "back"
    pulled = run("cp", f"{vm}:/root/cli-tree", str(back))
    assert pulled.returncode == 0, pulled.stderr
    assert {p.relative_to(back).as_posix(): p.read_bytes() for p in back.rglob("*") if p.is_file()} == files


def test_cp_shows_progress_on_a_terminal(vm: str, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(8 << 20))
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(VMCONTROLLER, [VMCONTROLLER, "cp", str(source), f"{vm}:/root/big.bin"])
    output = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 300)
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "big.bin" in text and "/s" in text  # the bar's label and its transfer rate
    assert "copied 1 file(s), 8388608 bytes" in text


def test_read_commands_speak_json(vm: str) -> None:
    listed = run("list", "--json")
    assert {"name": vm, "state": "running"} in json.loads(listed.stdout)
    info = json.loads(run("info", vm, "--json").stdout)
    assert info["state"] == "running" and info["agent"]["kernel"].startswith("Linux")
    assert json.loads(run("ping", "--json", vm).stdout)["round_trip_ms"] > 0


def test_an_unknown_vm(vm: str) -> None:
    result = run("exec", "no-such-vm", "true")
    assert result.returncode == 3
    assert "no-such-vm" in one_line_error(result)


def test_a_missing_host_file(vm: str, tmp_path: Path) -> None:
    result = run("cp", str(tmp_path / "missing"), f"{vm}:/root/x")
    assert result.returncode == 6
    assert "missing" in one_line_error(result)


@pytest.fixture
def agentless_vm(booted_vm: Any, tmp_path: Path) -> Iterator[str]:
    """A VM of the session's image whose agent channel has another name: the agent never answers."""
    name = f"vmc-test-cli-noagent-{os.getpid()}"
    image = booted_vm.image
    spec = {
        "disk": image.root_disk,
        "kernel": image.kernel,
        "initrd": image.initrd,
        "cmdline": image.cmdline,
        "agent_channel": "org.vmcontroller.nobody.0",
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    defined = run("define", name, "--spec", str(tmp_path / "spec.json"))
    assert defined.returncode == 0, defined.stderr
    yield name
    run("undefine", "--force", name)  # the test removes it itself when it gets that far


def test_a_stopped_vm_then_a_vm_without_an_agent(agentless_vm: str) -> None:
    stopped = run("exec", agentless_vm, "true")
    assert stopped.returncode == 4
    assert f"vmcontroller start {agentless_vm}" in one_line_error(stopped)
    started = run("start", agentless_vm)
    assert started.returncode == 0 and b"started" in started.stdout
    silent = run("ping", agentless_vm, "--timeout", "15")
    assert silent.returncode == 5
    assert "did not answer within 15 s" in one_line_error(silent)
    refused = run("undefine", agentless_vm)
    assert refused.returncode == 4 and "--force" in one_line_error(refused)
    assert run("undefine", "--force", agentless_vm).returncode == 0
    assert agentless_vm not in run("list").stdout.decode()


def test_snapshots_print_states_by_name(vm: str) -> None:
    assert run("snapshot", "create", vm, "cli-snap").returncode == 0
    try:
        listed = run("snapshot", "list", vm).stdout.decode()
        assert "cli-snap" in listed and "running" in listed and "VMState" not in listed
    finally:
        assert run("snapshot", "delete", vm, "cli-snap").returncode == 0


# -- shell, under a real pseudo-terminal -------------------------------------------------------


def _take_controlling_terminal() -> None:
    # In the child, a session leader already (start_new_session): its stdin, the pty, becomes
    # its controlling terminal, as a terminal window's shell has one (SIGWINCH comes through it).
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _winsize(rows: int, cols: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)


class OnATerminal:
    """``vmcontroller`` started on a new pseudo-terminal of ``rows`` x ``cols``, as from a terminal window."""

    def __init__(self, *args: str, rows: int = 24, cols: int = 80) -> None:
        self.master, terminal = os.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, _winsize(rows, cols))
        self.terminal_name = os.ttyname(terminal)
        self.process = subprocess.Popen(
            [VMCONTROLLER, *args], stdin=terminal, stdout=terminal, stderr=terminal,
            start_new_session=True, preexec_fn=_take_controlling_terminal,
        )
        os.close(terminal)  # the master reads end-of-file (EIO) once the command has gone
        self.output = b""

    def _read(self, timeout: float) -> bool:
        """Read what is there within ``timeout``; False at end of file."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: no process has the terminal open any more
            return False
        self.output += chunk
        return bool(chunk)

    def expect(self, wanted: bytes, start: int = 0, timeout: float = 240) -> int:
        """Where ``wanted`` appears after ``start``; the test fails if it does not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (at := self.output.find(wanted, start)) < 0:
            if time.monotonic() > deadline or not self._read(1):
                raise AssertionError(f"{wanted!r} never showed; the terminal shows {self.output!r}")
        return at + len(wanted)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def resize(self, rows: int, cols: int) -> None:
        """Resize the terminal, as a window does: the kernel sends the command SIGWINCH."""
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, _winsize(rows, cols))

    def exit_status(self, timeout: float = 120) -> int:
        """Read the terminal to its end, then the command's exit status."""
        deadline = time.monotonic() + timeout
        while self._read(1):
            assert time.monotonic() < deadline, f"the command never ended; the terminal shows {self.output!r}"
        return self.process.wait(timeout)

    def settings(self) -> list[Any]:
        """The terminal's settings, as the command left them."""
        fd = os.open(self.terminal_name, os.O_RDWR | os.O_NOCTTY)
        try:
            return termios.tcgetattr(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[Callable[..., OnATerminal]]:
    started: list[OnATerminal] = []

    def start(*args: str, **size: int) -> OnATerminal:
        started.append(OnATerminal(*args, **size))
        return started[-1]

    yield start
    for session in started:
        session.close()


def assert_cooked(settings: list[Any]) -> None:
    """The terminal is back as a shell wants it: line editing, echo, signals from keys."""
    lflag = settings[3]
    assert lflag & termios.ICANON and lflag & termios.ECHO and lflag & termios.ISIG, settings


def test_shell_on_a_terminal(vm: str, terminal: Callable[..., OnATerminal]) -> None:
    session = terminal("shell", vm, rows=30, cols=100)
    seen = session.expect(b"# ")  # root's prompt
    session.type(b"stty size\r")
    # (bash may end the typed line with "\x1b[?2004l\r", its bracketed paste off, not "\r\n")
    seen = session.expect(b"30 100\r\n", seen)
    session.resize(41, 123)
    for _ in range(60):  # SIGWINCH here, a resize request, SIGWINCH there: not at once
        session.type(b"stty size\r")
        seen = session.expect(b"# ", session.expect(b"\r\n", seen))
        if b"41 123" in session.output:
            break
        time.sleep(1)
    assert b"41 123\r\n" in session.output
    session.type(b"sleep 1000\r")
    seen = session.expect(b"sleep 1000\r\n", seen)
    time.sleep(1)
    session.type(b"\x03")  # Ctrl-C: to the guest, whose terminal interrupts the job
    seen = session.expect(b"# ", seen)
    session.type(b"tty; echo $((6*7)); exit 3\r")
    assert session.exit_status() == 3
    tail = session.output[seen:]
    assert b"/dev/pts/" in tail and b"\r\n42\r\n" in tail, session.output
    assert_cooked(session.settings())


def test_shell_ends_on_sigterm_and_restores_the_terminal(
    vm: str, terminal: Callable[..., OnATerminal]
) -> None:
    sleeper = f"{os.getpid()}7"
    session = terminal("shell", vm, "--command", f"echo ready $$; exec sleep {sleeper}")
    start = session.expect(b"ready ")
    pid = session.output[start : session.expect(b"\r\n", start) - 2].decode()
    assert session.settings()[3] & termios.ICANON == 0  # raw meanwhile
    session.process.send_signal(signal.SIGTERM)
    assert session.exit_status() == 128 + signal.SIGTERM
    assert_cooked(session.settings())
    # Its process group in the guest was killed.  (Only now: while the shell runs it holds the
    # VM's agent channel, a virtio-serial port that takes one host at a time.)
    for _ in range(30):
        if run("exec", vm, "cat", f"/proc/{pid}/cmdline").stdout != f"sleep\0{sleeper}\0".encode():
            break
        time.sleep(1)
    assert run("exec", vm, "cat", f"/proc/{pid}/cmdline").returncode == 1


def test_shell_bad_input(vm: str, terminal: Callable[..., OnATerminal]) -> None:
    piped = run("shell", vm)  # stdin is a pipe
    assert piped.returncode == 2
    error = one_line_error(piped)
    assert "needs a terminal on stdin" in error and f"vmcontroller exec {vm}" in error
    unknown = terminal("shell", "no-such-vm")
    assert unknown.exit_status() == 3
    lines = unknown.output.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmcontroller: error: ") and "no-such-vm" in lines[0]
    assert_cooked(unknown.settings())
    missing = terminal("shell", vm, "--command", "exec /no/such/program")
    assert missing.exit_status() == 127


def test_exec_tty(vm: str, terminal: Callable[..., OnATerminal]) -> None:
    session = terminal("exec", "-t", vm, "sh", "-c", "tty; stty size; exit 4", rows=20, cols=60)
    assert session.exit_status() == 4
    assert b"/dev/pts/" in session.output and b"\r\n20 60\r\n" in session.output
    assert run("exec", "-t", vm, "true").returncode == 2
