"""
The VMware driver's pure parts: the .vmx it writes and reads, vmrun's output and errors, the
state decision, and the vmrun runner over an in-memory process (no real process, no reactor).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from hypervisors.interface import VMEvent, VMEventType, VMSpec, VMState
from hypervisors.vmware._vmrun import Vmrun, parse_list, parse_snapshot_tree, translate_error
from hypervisors.vmware.driver import VMwareDriver, suspended_on_disk, vm_state
from hypervisors.vmware.vmx import (
    guestinfo_entries,
    is_suspended,
    parse_vmx,
    render_vmx,
    vmx_entries,
)
from vmcontroller.errors import (
    HypervisorError,
    HypervisorUnavailable,
    SnapshotNotFound,
    VMLocked,
    VMNotFound,
    VMStateError,
)


def spec(**overrides: Any) -> VMSpec:
    return VMSpec(name="vm1", disk="/images/base.qcow2", **overrides)


# -- .vmx ---------------------------------------------------------------------------------------


def test_vmx_has_the_specs_memory_cpus_disk_and_console() -> None:
    entries = parse_vmx(
        render_vmx(vmx_entries(spec(memory_mib=768, vcpus=2), vm_dir="/s/vm1", disk_file="vm1.vmdk"))
    )
    assert entries["memsize"] == "768"
    assert entries["numvcpus"] == "2"
    assert entries["scsi0:0.filename"] == "vm1.vmdk"
    assert entries["scsi0:0.present"] == "TRUE"
    assert entries["serial0.filetype"] == "file"
    assert entries["serial0.filename"] == "/s/vm1/console.log"
    assert entries["checkpoint.vmstate"] == ""
    assert "ethernet0.present" not in entries
    assert "serial1.present" not in entries


def test_each_serial_port_is_a_server_pipe_in_the_vm_directory_from_ttyS1_on() -> None:
    entries = parse_vmx(
        render_vmx(vmx_entries(spec(serial_ports=("agent", "log")), vm_dir="/s/vm1", disk_file="vm1.vmdk"))
    )
    for index, port in ((1, "agent"), (2, "log")):
        assert entries[f"serial{index}.filetype"] == "pipe"
        assert entries[f"serial{index}.pipe.endpoint"] == "server"
        assert entries[f"serial{index}.filename"] == f"/s/vm1/serial-{port}.sock"
    assert "serial3.present" not in entries


def test_nat_network_gives_a_nat_card() -> None:
    entries = parse_vmx(render_vmx(vmx_entries(spec(nat_network=True), vm_dir="/s", disk_file="d.vmdk")))
    assert entries["ethernet0.connectiontype"] == "nat"
    assert entries["ethernet0.present"] == "TRUE"


def test_guestinfo_variables_are_written_with_their_prefix() -> None:
    text = render_vmx(
        vmx_entries(
            spec(),
            vm_dir="/s",
            disk_file="d.vmdk",
            guestinfo={"vmcontroller.token": "c2VjcmV0", "x-y_z": "1"},
        )
    )
    assert 'guestinfo.vmcontroller.token = "c2VjcmV0"' in text.splitlines()
    assert parse_vmx(text)["guestinfo.x-y_z"] == "1"


@pytest.mark.parametrize("value", ['a"b', "a|b", "a\\b", "line\nbreak", "ünï"])
def test_a_guestinfo_value_that_would_need_escaping_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"not allowed .*encode the value"):
        guestinfo_entries({"token": value})


@pytest.mark.parametrize("key", ["", "has space", 'q"', "a=b", "guest/info"])
def test_a_bad_guestinfo_name_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match="invalid guestinfo variable name"):
        guestinfo_entries({key: "v"})


def test_a_serial_socket_path_too_long_for_a_unix_socket_is_refused() -> None:
    with pytest.raises(HypervisorError, match="longer than a unix socket path may be"):
        vmx_entries(spec(serial_ports=("agent",)), vm_dir="/" + "d" * 100, disk_file="d.vmdk")


def test_parse_vmx_lowercases_keys_skips_comments_and_keeps_the_last_line() -> None:
    text = '.encoding = "UTF-8"\n# comment\n\nMemSize = "256"\nmemsize = "512"\nbare = TRUE\n'
    assert parse_vmx(text) == {".encoding": "UTF-8", "memsize": "512", "bare": "TRUE"}


def test_suspended_is_read_from_checkpoint_vmstate() -> None:
    assert is_suspended({"checkpoint.vmstate": "vm1.vmss"})
    assert not is_suspended({"checkpoint.vmstate": ""})
    assert not is_suspended({})


# -- state ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listed", "paused", "suspended", "expected"),
    [
        (True, False, False, VMState.RUNNING),
        (True, True, False, VMState.PAUSED),
        # Listed wins: VMware may still be removing the suspended state while it resumes.
        (True, False, True, VMState.RUNNING),
        (False, False, True, VMState.SAVED),
        (False, False, False, VMState.SHUTOFF),
        # A VM that stopped while the driver thought it paused is shut off, not paused.
        (False, True, False, VMState.SHUTOFF),
    ],
)
def test_state_from_vmrun_list_and_the_vms_files(
    listed: bool, paused: bool, suspended: bool, expected: VMState
) -> None:
    assert vm_state(listed=listed, paused=paused, suspended=suspended) is expected


def test_a_suspended_state_is_seen_in_the_vmx_or_as_a_vmss_file(tmp_path: Any) -> None:
    vmx = tmp_path / "vm1.vmx"
    vmx.write_text('checkpoint.vmState = ""\n')
    assert not suspended_on_disk(vmx)
    (tmp_path / "vm1.vmss").write_bytes(b"")
    assert suspended_on_disk(vmx)
    (tmp_path / "vm1.vmss").unlink()
    vmx.write_text('checkpoint.vmState = "vm1.vmss"\n')
    assert suspended_on_disk(vmx)


# -- vmrun output -------------------------------------------------------------------------------


def test_parse_list() -> None:
    assert parse_list("Total running VMs: 0\n") == []
    assert parse_list("Total running VMs: 2\r\n/a/a.vmx\n/b c/b c.vmx\n") == ["/a/a.vmx", "/b c/b c.vmx"]


def test_parse_snapshot_tree_gives_each_snapshots_parent() -> None:
    output = "Total snapshots: 5\nroot\n\tchild\n\t\tgrandchild\n\tsecond\nother-root\n"
    assert parse_snapshot_tree(output) == [
        ("root", None),
        ("child", "root"),
        ("grandchild", "child"),
        ("second", "root"),
        ("other-root", None),
    ]
    assert parse_snapshot_tree("Total snapshots: 0\n") == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("Cannot open VM: /s/vm1/vm1.vmx, The virtual machine cannot be found", VMNotFound),
        ("The virtual machine is not powered on: /s/vm1/vm1.vmx", VMStateError),
        ("The virtual machine should not be powered on. It appears to be running already.", VMStateError),
        ("Invalid snapshot name 's9'", SnapshotNotFound),
        ("The file is already in use", VMLocked),
        ("The name does not uniquely identify one snapshot", HypervisorError),
        ("The operation is not supported for the specified parameters", HypervisorError),
        ("Unknown error", HypervisorError),
    ],
)
def test_vmrun_errors_become_ours(text: str, error: type[HypervisorError]) -> None:
    translated = translate_error(text, action="start", vm="vm1", snapshot="s9")
    assert type(translated) is error
    assert text in str(translated)


# -- the runner, over an in-memory process ---------------------------------------------------------


class _Process:
    def __init__(self) -> None:
        self.signals: list[str] = []

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)


class ProcessReactor(Clock):
    """A clock that records spawned processes; the test plays each process's part."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, str, list[str], _Process]] = []

    def spawnProcess(
        self, protocol: Any, executable: str, args: list[str], env: Any = None, **kw: Any
    ) -> _Process:
        process = _Process()
        self.spawned.append((protocol, executable, args, process))
        return process


def _exit(protocol: Any, output: bytes, code: int) -> None:
    protocol.outReceived(output)
    reason = ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code)
    protocol.processEnded(Failure(reason))


@pytest.fixture()
def vmrun_exe(tmp_path: Any) -> str:
    exe = tmp_path / "vmrun"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return str(exe)


def test_runner_passes_the_product_and_returns_the_output(vmrun_exe: str) -> None:
    reactor = ProcessReactor()
    d = Vmrun(reactor, vmrun_exe, "fusion").run(["list"], action="list")
    protocol, executable, args, _ = reactor.spawned[0]
    assert (executable, args) == (vmrun_exe, [vmrun_exe, "-T", "fusion", "list"])
    _exit(protocol, b"Total running VMs: 1\n/a.vmx\n", 0)
    results: list[str] = []
    d.addCallback(results.append)
    assert [parse_list(output) for output in results] == [["/a.vmx"]]


def _failure_of(d: Any) -> BaseException:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the call did not fail"
    value = failures[0].value
    assert isinstance(value, BaseException)
    return value


def test_an_error_line_fails_the_call_even_with_status_0(vmrun_exe: str) -> None:
    reactor = ProcessReactor()
    d = Vmrun(reactor, vmrun_exe, "ws").run(["start", "/s/x.vmx"], action="start", vm="x")
    _exit(reactor.spawned[0][0], b"Error: The virtual machine is not powered on: /s/x.vmx\n", 0)
    assert isinstance(_failure_of(d), VMStateError)


def test_a_failure_status_without_an_error_line_fails_the_call(vmrun_exe: str) -> None:
    reactor = ProcessReactor()
    d = Vmrun(reactor, vmrun_exe, "ws").run(["list"], action="list the running VMs")
    _exit(reactor.spawned[0][0], b"something odd\n", 255)
    error = _failure_of(d)
    assert type(error) is HypervisorError
    assert "status 255" in str(error) and "something odd" in str(error)


def test_a_hung_vmrun_is_killed_after_the_timeout(vmrun_exe: str) -> None:
    reactor = ProcessReactor()
    d = Vmrun(reactor, vmrun_exe, "ws", timeout=30).run(["start", "/s/x.vmx"], action="start", vm="x")
    protocol, _, _, process = reactor.spawned[0]
    reactor.advance(29)
    assert process.signals == []
    reactor.advance(1)
    assert process.signals == ["KILL"]
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))
    assert "killed after 30 s" in str(_failure_of(d))


def test_cancelling_a_call_kills_vmrun(vmrun_exe: str) -> None:
    reactor = ProcessReactor()
    d = Vmrun(reactor, vmrun_exe, "ws").run(["start", "/s/x.vmx"], action="start", vm="x")
    protocol, _, _, process = reactor.spawned[0]
    d.cancel()
    assert process.signals == ["KILL"]
    assert isinstance(_failure_of(d), CancelledError)
    # The process's end afterwards changes nothing.
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))
    assert reactor.getDelayedCalls() == []


def test_a_missing_vmrun_says_what_to_install(tmp_path: Any) -> None:
    reactor = ProcessReactor()
    for executable in (None, str(tmp_path / "no-vmrun")):
        error = _failure_of(Vmrun(reactor, executable, "ws").run(["list"], action="list the running VMs"))
        assert isinstance(error, HypervisorUnavailable)
        assert "install VMware Workstation Pro, Fusion or Workstation Player" in str(error)
    assert reactor.spawned == []


# -- events: the poller over the in-memory process reactor -----------------------------------------


def test_events_come_from_vmrun_list_and_the_files_while_someone_subscribes(
    tmp_path: Any, vmrun_exe: str
) -> None:
    reactor = ProcessReactor()
    driver = VMwareDriver(reactor, vmrun=vmrun_exe, state_dir=tmp_path / "vms", poll_interval=2.0)
    driver.startService()
    vmx = tmp_path / "vms" / "vm1" / "vm1.vmx"
    vmx.parent.mkdir(parents=True)
    vmx.write_text('checkpoint.vmState = ""\n')
    events: list[VMEvent] = []

    def vmrun_list_answers(*running: str) -> None:
        protocol, _, args, _ = reactor.spawned[-1]
        assert args[1:] == ["-T", "ws", "list"]
        _exit(
            protocol,
            f"Total running VMs: {len(running)}\n{''.join(p + chr(10) for p in running)}".encode(),
            0,
        )

    assert reactor.spawned == []  # no subscriber, no polling
    subscription = driver.subscribe(events.append, "vm1")
    vmrun_list_answers()  # the first look: what is, not a change
    assert events == []
    reactor.advance(2)
    vmrun_list_answers(str(vmx))
    reactor.advance(2)
    vmrun_list_answers(str(vmx))  # no change, no event
    vmx.write_text('checkpoint.vmState = "vm1.vmss"\n')
    reactor.advance(2)
    vmrun_list_answers()
    vmx.write_text('checkpoint.vmState = ""\n')
    reactor.advance(2)
    vmrun_list_answers()
    assert [(e.vm, e.type, e.state) for e in events] == [
        ("vm1", VMEventType.STARTED, VMState.RUNNING),
        ("vm1", VMEventType.SAVED, VMState.SAVED),
        ("vm1", VMEventType.SHUTOFF, VMState.SHUTOFF),
    ]
    spawned = len(reactor.spawned)
    subscription.cancel()
    reactor.advance(10)
    assert len(reactor.spawned) == spawned  # nobody listens: no more vmrun list
    driver.stopService()
