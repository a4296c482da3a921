"""The VirtualBox driver's pure parts: VBoxManage's output formats, errors, the backend choice."""

from __future__ import annotations

import pytest

from hypervisors.interface import VMState
from hypervisors.virtualbox._parsing import (
    MACHINE_STATE_NAMES,
    PortForward,
    parse_list_vms,
    parse_machinereadable,
    parse_port_forward,
    parse_snapshot_list,
    parse_vboxmanage_error,
    translate_error,
    vm_state,
)
from hypervisors.virtualbox.driver import BACKEND_ENV, choose_backend
from vmcontroller.errors import (
    HypervisorError,
    HypervisorUnavailable,
    SnapshotNotFound,
    VMAlreadyExists,
    VMLocked,
    VMNotFound,
    VMStateError,
)

# Shaped as VBoxManageInfo.cpp prints them (outputMachineReadableString, SHOW_ULONG_PROP...).
SHOWVMINFO = r"""name="vm \"one\""
groups="/vmcontroller"
memory=512
VMState="running"
"SATA-0-0"="/vms/vm/Snapshots/{1}.vdi"
Forwarding(0)="r1,tcp,127.0.0.1,4000,,9000"
uartmode2="server,C:\\pipe"
garbage line
"""


def test_machinereadable():
    values = parse_machinereadable(SHOWVMINFO)
    assert values["name"] == 'vm "one"'
    assert values["memory"] == "512"
    assert values["SATA-0-0"] == "/vms/vm/Snapshots/{1}.vdi"
    assert values["Forwarding(0)"] == "r1,tcp,127.0.0.1,4000,,9000"
    assert values["uartmode2"] == "server,C:\\pipe"
    assert "garbage line" not in values


def test_snapshot_tree():
    # VBoxManageInfo.cpp, showSnapshots: "-N" per level of the tree.
    text = "\n".join(
        [
            'SnapshotName="a"',
            'SnapshotUUID="1"',
            'SnapshotName-1="b"',
            'SnapshotUUID-1="2"',
            'SnapshotDescription-1="about b"',
            'SnapshotName-1-1="c"',
            'SnapshotUUID-1-1="3"',
            'CurrentSnapshotName="c"',
            'CurrentSnapshotUUID="3"',
            'CurrentSnapshotNode="SnapshotName-1-1"',
            'SnapshotName-2="d"',
            'SnapshotUUID-2="4"',
        ]
    )
    records = parse_snapshot_list(text)
    assert [(r.name, r.id, r.parent_id, r.current) for r in records] == [
        ("a", "1", None, False),
        ("b", "2", "1", False),
        ("c", "3", "2", True),
        ("d", "4", "1", False),
    ]
    assert records[1].description == "about b"


def test_port_forwards():
    # INATEngine::redirects gives the protocol as a number, showvminfo as a word.
    assert parse_port_forward("agent,1,127.0.0.1,4000,10.0.2.15,9000") == PortForward(
        "agent", "127.0.0.1", 4000, "10.0.2.15", 9000
    )
    assert parse_port_forward("agent,tcp,,4000,,9000") == PortForward("agent", "", 4000, "", 9000)
    assert parse_port_forward("dns,udp,,53,,53") is None
    assert parse_port_forward("broken") is None


def test_list_vms():
    assert parse_list_vms('"a b" {0a-1}\n"c" {ff}\nnoise\n') == {"a b": "0a-1", "c": "ff"}


def test_error_lines():
    # As BOINC's vbox_vboxmanage.cpp quotes VBoxManage's errors.
    error = parse_vboxmanage_error(
        "VBoxManage: error: Could not find a registered machine named 'x'\n"
        "VBoxManage: error: Details: code VBOX_E_OBJECT_NOT_FOUND (0x80bb0001), component VirtualBoxWrap, "
        "interface IVirtualBox, callee nsISupports\n"
        'VBoxManage: error: Context: "FindMachine(...)" at line 2621 of file VBoxManageInfo.cpp\n'
    )
    assert (error.message, error.code) == (
        "Could not find a registered machine named 'x'",
        "VBOX_E_OBJECT_NOT_FOUND",
    )
    assert parse_vboxmanage_error("VBoxManage: error: Machine 'x' is not currently running\n").code is None


@pytest.mark.parametrize(
    ("code", "message", "snapshot", "error"),
    [
        ("VBOX_E_OBJECT_NOT_FOUND", "Could not find a registered machine named 'vm'", None, VMNotFound),
        ("VBOX_E_OBJECT_NOT_FOUND", "Could not find a snapshot named 's'", "s", SnapshotNotFound),
        ("VBOX_E_INVALID_OBJECT_STATE", "The machine 'vm' is already locked for a session", None, VMLocked),
        ("VBOX_E_INVALID_VM_STATE", "Invalid machine state: poweroff", None, VMStateError),
        ("VBOX_E_FILE_ERROR", "Machine settings file '/x' already exists", None, VMAlreadyExists),
        ("VBOX_E_FILE_ERROR", "Could not open the medium", None, HypervisorError),
        ("CO_E_SERVER_EXEC_FAILURE", "Failed to create the VirtualBox object", None, HypervisorUnavailable),
    ],
)
def test_errors_become_ours(code, message, snapshot, error):
    raised = translate_error(code, message, action="act on", vm="vm", snapshot=snapshot)
    assert type(raised) is error
    assert message in str(raised) and "'vm'" in str(raised)


def test_every_machine_state_has_a_meaning():
    assert all(vm_state(name) is not VMState.NOSTATE for name in MACHINE_STATE_NAMES.values())
    assert vm_state("aborted") is VMState.CRASHED and vm_state("saved") is VMState.SAVED
    assert vm_state("something new") is VMState.NOSTATE


@pytest.mark.parametrize(
    ("requested", "environ", "pyvbox_ok", "vboxmanage", "chosen"),
    [
        ("auto", {}, True, "/usr/bin/VBoxManage", "pyvbox"),
        ("auto", {}, False, "/usr/bin/VBoxManage", "vboxmanage"),
        ("auto", {}, False, None, None),
        ("auto", {BACKEND_ENV: "vboxmanage"}, True, "/usr/bin/VBoxManage", "vboxmanage"),
        ("pyvbox", {BACKEND_ENV: "vboxmanage"}, False, None, "pyvbox"),
    ],
)
def test_backend_choice(requested, environ, pyvbox_ok, vboxmanage, chosen):
    assert choose_backend(requested, environ=environ, pyvbox_ok=pyvbox_ok, vboxmanage=vboxmanage)[0] == chosen


def test_unknown_backend():
    with pytest.raises(ValueError, match=BACKEND_ENV):
        choose_backend("auto", environ={BACKEND_ENV: "vmware"}, pyvbox_ok=True, vboxmanage=None)
