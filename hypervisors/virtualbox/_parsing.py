"""
Pure helpers of the VirtualBox driver: VirtualBox's machine states, and the parsers of
VBoxManage's output. Every format here is VBoxManage's own; the source that prints it is named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from hypervisors.interface import VMState
from vmcontroller.errors import (
    HypervisorError,
    HypervisorUnavailable,
    SnapshotNotFound,
    VMAlreadyExists,
    VMLocked,
    VMNotFound,
    VMStateError,
)

__all__ = [
    "MACHINE_STATE_NAMES",
    "PortForward",
    "SnapshotRecord",
    "VBoxManageError",
    "parse_list_vms",
    "parse_machinereadable",
    "parse_port_forward",
    "parse_snapshot_list",
    "parse_vboxmanage_error",
    "timestamp",
    "translate_error",
    "vm_state",
]

#: ``MachineState`` values (VirtualBox.xidl) by the short names ``showvminfo --machinereadable``
#: prints as ``VMState`` (VBoxManageInfo.cpp, ``machineStateToName(state, fShort=true)``).
MACHINE_STATE_NAMES: dict[int, str] = {
    1: "poweroff",
    2: "saved",
    3: "teleported",
    4: "aborted",
    5: "running",
    6: "paused",
    7: "gurumeditation",
    8: "teleporting",
    9: "livesnapshotting",
    10: "starting",
    11: "stopping",
    12: "saving",
    13: "restoring",
    14: "teleportingpausedvm",
    15: "teleportingin",
    16: "deletingsnapshotlive",
    17: "deletingsnapshotlivepaused",
    18: "onlinesnapshotting",
    19: "restoringsnapshot",
    20: "deletingsnapshot",
    21: "settingup",
    22: "snapshotting",
}

# How each VirtualBox state reads in our vocabulary. The transient online states of a running
# VM (snapshotting, deleting a snapshot while it runs, starting) count as running, as BOINC's
# vboxwrapper counts them "online" (vbox_vboxmanage.cpp, VBOX_VM::poll); a Stuck VM (guru
# meditation) and an Aborted one (its process died) as crashed.
_STATES: dict[str, VMState] = {
    "poweroff": VMState.SHUTOFF,
    "saved": VMState.SAVED,
    "teleported": VMState.SHUTOFF,
    "aborted": VMState.CRASHED,
    "running": VMState.RUNNING,
    "paused": VMState.PAUSED,
    "gurumeditation": VMState.CRASHED,
    "teleporting": VMState.RUNNING,
    "livesnapshotting": VMState.RUNNING,
    "starting": VMState.RUNNING,
    "stopping": VMState.SHUTDOWN,
    "saving": VMState.PAUSED,
    "restoring": VMState.RUNNING,
    "teleportingpausedvm": VMState.PAUSED,
    "teleportingin": VMState.RUNNING,
    "deletingsnapshotlive": VMState.RUNNING,
    "deletingsnapshotlivepaused": VMState.PAUSED,
    "onlinesnapshotting": VMState.RUNNING,
    "restoringsnapshot": VMState.SHUTOFF,
    "deletingsnapshot": VMState.SHUTOFF,
    "settingup": VMState.SHUTOFF,
    "snapshotting": VMState.SHUTOFF,
}


def vm_state(name: str) -> VMState:
    """Our :class:`VMState` for VirtualBox's short state name (``NOSTATE`` if unknown)."""
    return _STATES.get(name, VMState.NOSTATE)


_MACHINEREADABLE_LINE = re.compile(r'^(?:"((?:[^"\\]|\\.)*)"|([^=]+))=(?:"((?:[^"\\]|\\.)*)"|(.*))$')


def _unescape(text: str) -> str:
    # outputMachineReadableString (VBoxManageInfo.cpp) escapes '"' and '\' with '\'.
    return re.sub(r"\\(.)", r"\1", text)


def parse_machinereadable(text: str) -> dict[str, str]:
    """
    ``key=value`` lines of ``showvminfo --machinereadable`` or ``snapshot list
    --machinereadable``: keys may be quoted (``"SATA-0-0"="..."``), string values are quoted
    with ``"`` and ``\\`` escaped, numbers are bare (VBoxManageInfo.cpp's output rules).
    Lines of another shape are skipped.
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = _MACHINEREADABLE_LINE.match(line.rstrip("\r"))
        if match is None:
            continue
        quoted_key, key, quoted_value, value = match.groups()
        values[_unescape(quoted_key) if quoted_key is not None else key] = (
            _unescape(quoted_value) if quoted_value is not None else value
        )
    return values


_LIST_VMS_LINE = re.compile(r'^"(.*)" \{([0-9a-fA-F-]+)\}$')


def parse_list_vms(text: str) -> dict[str, str]:
    """``VBoxManage list vms``: one ``"name" {uuid}`` line per VM (VBoxManageInfo.cpp,
    ``VMINFO_COMPACT``); returns uuid by name."""
    vms: dict[str, str] = {}
    for line in text.splitlines():
        match = _LIST_VMS_LINE.match(line.strip())
        if match:
            vms[match.group(1)] = match.group(2)
    return vms


@dataclass(frozen=True)
class SnapshotRecord:
    """A snapshot as a backend reads it: VirtualBox's own fields."""

    id: str
    name: str
    description: str
    parent_id: str | None
    current: bool
    #: When it was taken and whether the VM ran (``ISnapshot::timeStamp``/``online``), or
    #: ``None`` where the backend cannot read them (VBoxManage prints neither).
    created: datetime | None = None
    online: bool | None = None


def parse_snapshot_list(text: str) -> list[SnapshotRecord]:
    """
    ``VBoxManage snapshot <vm> list --machinereadable``: ``SnapshotName<path>``,
    ``SnapshotUUID<path>`` and ``SnapshotDescription<path>`` per snapshot, where the path is
    ``-1-2``... of the snapshot's place in the tree, and ``CurrentSnapshotUUID``
    (VBoxManageInfo.cpp, ``showSnapshots``). Returned in tree order, parents first.
    """
    values = parse_machinereadable(text)
    current = values.get("CurrentSnapshotUUID")
    records: list[SnapshotRecord] = []
    ids: dict[str, str] = {}
    for key, name in values.items():
        if not key.startswith("SnapshotName"):
            continue
        path = key[len("SnapshotName") :]
        snapshot_id = values.get(f"SnapshotUUID{path}", "")
        ids[path] = snapshot_id
        parent_path = path.rsplit("-", 1)[0] if path else None
        records.append(
            SnapshotRecord(
                id=snapshot_id,
                name=name,
                description=values.get(f"SnapshotDescription{path}", ""),
                parent_id=ids.get(parent_path) if parent_path is not None else None,
                current=snapshot_id == current,
            )
        )
    return records


@dataclass(frozen=True)
class VBoxManageError:
    """What a failed VBoxManage run said."""

    #: The first ``VBoxManage: error:`` line's text.
    message: str
    #: The result code's name from the ``Details: code NAME (0x...)`` line, if any.
    code: str | None


_ERROR_PREFIX = re.compile(r"^VBoxManage(?:\.exe)?: error: ?(.*)$")
_DETAILS = re.compile(r"^Details: code (\w+) \((0x[0-9a-fA-F]+)\)")


def parse_vboxmanage_error(output: str) -> VBoxManageError:
    """
    The error of a failed VBoxManage run, from its output. VBoxManage prints each line of an
    error as ``VBoxManage: error: <text>``, then ``Details: code VBOX_E_... (0x80bb00..),
    component ..., interface ...`` and ``Context: ...`` lines (glue/errorprint.cpp; samples
    in BOINC's vbox_vboxmanage.cpp, which looks for the code names the same way).
    """
    messages: list[str] = []
    code = None
    for line in output.splitlines():
        match = _ERROR_PREFIX.match(line.strip())
        if match is None:
            continue
        text = match.group(1)
        details = _DETAILS.match(text)
        if details:
            code = details.group(1)
        elif not text.startswith("Context:") and text:
            messages.append(text)
    message = messages[0] if messages else (output.strip().splitlines() or ["no output"])[-1]
    return VBoxManageError(message, code)


@dataclass(frozen=True)
class PortForward:
    """A NAT port-forwarding rule of a VM's first network card."""

    name: str
    host_ip: str
    host_port: int
    guest_ip: str
    guest_port: int


def parse_port_forward(rule: str) -> PortForward | None:
    """
    A rule as VirtualBox gives it, ``name,protocol,host-ip,host-port,guest-ip,guest-port``:
    the protocol a number in ``INATEngine::redirects`` (1 TCP, VirtualBox.xidl's NATProtocol),
    ``tcp`` in ``showvminfo --machinereadable``'s ``Forwarding(n)`` (VBoxManageInfo.cpp).
    ``None`` for a UDP rule or a line of another shape.
    """
    parts = rule.split(",")
    if len(parts) != 6 or parts[1] not in ("1", "tcp"):
        return None
    name, _, host_ip, host_port, guest_ip, guest_port = parts
    try:
        return PortForward(name, host_ip, int(host_port), guest_ip, int(guest_port))
    except ValueError:
        return None


def timestamp(milliseconds: int) -> datetime:
    """A VirtualBox time stamp (milliseconds since the epoch, UTC) as a datetime."""
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC)


def translate_error(
    code: str | None, message: str, *, action: str, vm: str | None = None, snapshot: str | None = None
) -> HypervisorError:
    """
    Our exception for a VirtualBox error of result code ``code`` (its name, e.g.
    ``VBOX_E_OBJECT_NOT_FOUND``), whichever backend met it.

    :param action: what was being done, for the message ("start", "take snapshot 's1' of").
    """
    what = f"{action} {vm!r}" if vm else action
    said = f"VirtualBox says: {message}" + (f" ({code})" if code else "")
    if code == "VBOX_E_OBJECT_NOT_FOUND":
        if snapshot is not None and "snapshot" in message.lower():
            return SnapshotNotFound(
                f"cannot {what}: VM {vm!r} has no snapshot {snapshot!r}; {said}; see snapshot_list()"
            )
        return VMNotFound(f"cannot {what}: no VM named {vm!r} is registered; {said}; see list_vms()")
    if code == "VBOX_E_INVALID_OBJECT_STATE":
        return VMLocked(
            f"cannot {what}: another program holds the VM's session lock (the VirtualBox Manager, another "
            f"VBoxManage); {said}; try again when it lets go"
        )
    if code == "VBOX_E_INVALID_VM_STATE":
        return VMStateError(f"cannot {what} in its current state; {said}; check state() first")
    if code == "CO_E_SERVER_EXEC_FAILURE":
        # VBoxSVC could not be started or reached (vboxwrapper's vbox_common.cpp retries these).
        return HypervisorUnavailable(
            f"cannot {what}: VirtualBox's service (VBoxSVC) does not answer; {said}; check that VirtualBox "
            "works for this user (`VBoxManage list vms`), or reinstall it"
        )
    if code == "VBOX_E_FILE_ERROR" and "already exists" in message:
        return VMAlreadyExists(f"cannot {what}: a VM of that name exists already; {said}")
    return HypervisorError(f"cannot {what}: {said}")
