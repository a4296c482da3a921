"""
``vmcontroller`` driven as a user drives it: the installed command in a subprocess (and under a
real pseudo-terminal for the progress bar), against the session's real guest and a VM of its
own that has no agent.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
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
    ready = run("ping", booted_vm.name)
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
