"""
The VirtualBox server (VBoxSVC) as the stand-ins reproduce it: machines, media, snapshots,
session locks and machine states, kept in ``<VBOX_USER_HOME>/standin-registry.json`` so that
the in-process ``vboxapi`` stand-in and every run of the ``VBoxManage`` stand-in see one
registry, as every VirtualBox client sees one VBoxSVC.

Where the rules come from (VirtualBox's ``src/VBox/Main/idl/VirtualBox.xidl``, as carried into
pyvbox's generated ``virtualbox/library.py``, and ``src/VBox/Main/src-server/MachineImpl.cpp``):

- ``IMachine::lockMachine``: a write lock fails with ``VBOX_E_INVALID_OBJECT_STATE`` while
  another session holds the machine (a running VM's process always does); a shared lock on an
  unlocked machine is a write lock, on a locked one a link to that session.
- ``IMachine::launchVMProcess``: the machine must be unlocked; a Saved machine resumes from its
  state file. ``IConsole::powerDown``/``pause``/``resume``/``reset``/``powerButton`` and
  ``IMachine::saveState`` need a VM process (``VBOX_E_INVALID_VM_STATE`` otherwise).
- Media: a base of type MultiAttach is never written; attaching it gives the machine a
  differencing child in its Snapshots folder (``Machine::attachDevice``, and BOINC's
  ``samples/vboxwrapper/vbox_vboxmanage.cpp``: "each task gets it's own differencing image").
  ``takeSnapshot`` freezes the current child and gives the machine a new child of it;
  ``restoreSnapshot`` (machine not running) drops the current child and starts a new one on
  the snapshot's medium, leaving the machine Saved if the snapshot was online;
  ``deleteSnapshot`` (also on a running VM) merges the snapshot's medium into its children.
- Guest properties (``IMachine::setGuestProperty``, ``MachineImpl.cpp`` and the flags of
  ``include/VBox/HostServices/GuestPropertySvc.h``): the flags are a comma-separated list of
  ``TRANSIENT``, ``RDONLYGUEST``, ``RDONLYHOST``, ``READONLY`` (both) and ``TRANSRESET``
  (which implies TRANSIENT), any other is ``E_INVALIDARG``; an empty value deletes; the host
  may not change a property flagged RDONLYHOST (``E_ACCESSDENIED``). A TRANSIENT property is
  gone when the VM process ends (powered off or aborted; ``Machine::i_saveHardware`` does not
  keep it), a TRANSRESET one also when the VM resets (a reboot from inside is a reset too).
  The guest's side, ``VBoxControl``, is the stand-in of that name.

Simplification, stated once: a medium's file holds the disk's whole content, not a delta over
its parent, so a child starts as a copy of its parent and a merge keeps the child's content;
what a guest sees on each medium is the same as with real deltas.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# VirtualBox's result codes (VirtualBox.xidl <result> elements; pyvbox library.py VBoxError*).
VBOX_E_OBJECT_NOT_FOUND = 0x80BB0001
VBOX_E_INVALID_VM_STATE = 0x80BB0002
VBOX_E_FILE_ERROR = 0x80BB0004
VBOX_E_INVALID_OBJECT_STATE = 0x80BB0007
E_INVALIDARG = 0x80070057
E_ACCESSDENIED = 0x80070005

RESULT_NAMES = {
    VBOX_E_OBJECT_NOT_FOUND: "VBOX_E_OBJECT_NOT_FOUND",
    VBOX_E_INVALID_VM_STATE: "VBOX_E_INVALID_VM_STATE",
    VBOX_E_FILE_ERROR: "VBOX_E_FILE_ERROR",
    VBOX_E_INVALID_OBJECT_STATE: "VBOX_E_INVALID_OBJECT_STATE",
    E_INVALIDARG: "E_INVALIDARG",
    E_ACCESSDENIED: "E_ACCESSDENIED",
}

#: The longest guest property value, in bytes with its terminator (GuestPropertySvc.h,
#: GUEST_PROP_MAX_VALUE_LEN): the guest property service refuses longer ones.
GUEST_PROP_MAX_VALUE_LEN = 1024
#: Guest property flags (GuestPropertySvc.h, GUEST_PROP_F_*), by the names VirtualBox parses.
GUEST_PROPERTY_FLAGS = {
    "TRANSIENT": {"TRANSIENT"},
    "RDONLYGUEST": {"RDONLYGUEST"},
    "RDONLYHOST": {"RDONLYHOST"},
    "READONLY": {"RDONLYGUEST", "RDONLYHOST"},
    "TRANSRESET": {"TRANSRESET", "TRANSIENT"},
}

# MachineState (VirtualBox.xidl enum MachineState).
POWERED_OFF, SAVED, ABORTED, RUNNING, PAUSED = 1, 2, 4, 5, 6
ONLINE = (RUNNING, PAUSED)

REGISTRY = "standin-registry.json"
SERIAL_SLOTS = 4  # ISystemProperties::serialPortCount
#: Where ``IMachine::getSerialPort(slot)`` sits (I/O base, IRQ), as VBoxManage prints it.
UART_RESOURCES = [(0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3)]


class VBoxError(Exception):
    """A failed call: its COM result code and VirtualBox's error text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def iso_time(milliseconds: int) -> str:
    """A time as RTTimeSpecToString prints it (VBoxManageInfo.cpp's VMStateChangeTime)."""
    seconds, millis = divmod(milliseconds, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}000000Z"


def new_id() -> str:
    return str(uuid.uuid4())


def now_ms() -> int:
    return int(time.time() * 1000)


class Registry:
    """One transaction's view of the registry (see :func:`transaction`)."""

    def __init__(self, home: Path, data: dict[str, Any]) -> None:
        self.home = home
        self.data = data

    @property
    def machines(self) -> dict[str, dict[str, Any]]:
        return self.data["machines"]

    @property
    def media(self) -> dict[str, dict[str, Any]]:
        return self.data["media"]

    # -- look-ups ------------------------------------------------------------------------

    def find_machine(self, name_or_id: str) -> dict[str, Any]:
        for machine in self.machines.values():
            if machine["registered"] and name_or_id in (machine["name"], machine["id"]):
                return machine
        # Machine::findMachine's text (VirtualBoxImpl.cpp), as BOINC's vboxwrapper sees it.
        raise VBoxError(VBOX_E_OBJECT_NOT_FOUND, f"Could not find a registered machine named '{name_or_id}'")

    def find_snapshot(self, machine: dict[str, Any], name_or_id: str) -> dict[str, Any]:
        # IMachine::findSnapshot: an empty name or id gives the root snapshot.
        if not name_or_id:
            for snapshot in machine["snapshots"].values():
                if snapshot["parent"] is None:
                    return snapshot
        for snapshot in machine["snapshots"].values():
            if name_or_id in (snapshot["name"], snapshot["id"]):
                return snapshot
        raise VBoxError(VBOX_E_OBJECT_NOT_FOUND, f"Could not find a snapshot named '{name_or_id}'")

    def open_medium(self, location: str) -> dict[str, Any]:
        location = os.path.abspath(location)
        for medium in self.media.values():
            if medium["location"] == location:
                return medium
        if not os.path.isfile(location):
            raise VBoxError(
                VBOX_E_FILE_ERROR,
                f"Could not open the medium '{location}'.\nVD: error VERR_FILE_NOT_FOUND opening image "
                f"file '{location}' (VERR_FILE_NOT_FOUND)",
            )
        medium = {"id": new_id(), "location": location, "parent": None, "type": "normal"}
        self.media[medium["id"]] = medium
        return medium

    # -- session locks -------------------------------------------------------------------

    def lock(self, machine: dict[str, Any], holder: str, write: bool) -> str:
        """
        ``IMachine::lockMachine``: returns the session type obtained, ``"WriteLock"`` or
        ``"Shared"``.
        """
        if machine["session"] is None:
            machine["session"] = holder
            return "WriteLock"
        if write:
            raise VBoxError(
                VBOX_E_INVALID_OBJECT_STATE,
                f"The machine '{machine['name']}' is already locked for a session (or being unlocked)",
            )
        return "Shared"

    def unlock(self, machine: dict[str, Any], holder: str) -> None:
        if machine["session"] == holder:
            machine["session"] = None

    def require_unlocked(self, machine: dict[str, Any], what: str) -> None:
        if machine["session"] is not None or machine["state"] in ONLINE:
            raise VBoxError(
                VBOX_E_INVALID_OBJECT_STATE,
                f"The machine '{machine['name']}' is already locked by a session (or being locked or "
                "unlocked)"
                if what == "launch"
                else f"Cannot {what} the machine '{machine['name']}' while it is locked",
            )

    def require_state(self, machine: dict[str, Any], states: tuple[int, ...], what: str) -> None:
        if machine["state"] not in states:
            raise VBoxError(
                VBOX_E_INVALID_VM_STATE,
                f"Invalid machine state: {STATE_NAMES[machine['state']]} (must be "
                f"{' or '.join(STATE_NAMES[s] for s in states)}) to {what}",
            )

    # -- machines ------------------------------------------------------------------------

    def create_machine(self, settings_file: str, name: str, groups: list[str]) -> dict[str, Any]:
        for machine in self.machines.values():
            if machine["name"] == name:
                raise VBoxError(
                    VBOX_E_FILE_ERROR,
                    f"Machine settings file '{machine['settings_file']}' already exists",
                )
        if os.path.exists(settings_file):
            raise VBoxError(VBOX_E_FILE_ERROR, f"Machine settings file '{settings_file}' already exists")
        os.makedirs(os.path.dirname(settings_file), exist_ok=True)
        Path(settings_file).write_text(f"<!-- stand-in settings of {name} -->\n")
        machine = {
            "id": new_id(),
            "name": name,
            "groups": list(groups) or ["/"],
            "settings_file": settings_file,
            "state": POWERED_OFF,
            "last_state_change": now_ms(),
            "memory": 128,
            "cpus": 1,
            "cpu_cap": 100,
            "acpi": True,
            "extra": {},
            "guest_properties": {},
            "uarts": [
                {"enabled": False, "mode": "disconnected", "path": "", "server": False}
                for _ in range(SERIAL_SLOTS)
            ],
            "nic1": {"enabled": False, "attachment": "null", "redirects": []},
            "controllers": [],
            "disk": None,
            "snapshots": {},
            "current_snapshot": None,
            "session": None,
            "state_file": None,
            "guest_ignores_acpi": False,
            "registered": True,
        }
        self.machines[machine["id"]] = machine
        return machine

    def snapshot_folder(self, machine: dict[str, Any]) -> str:
        return os.path.join(os.path.dirname(machine["settings_file"]), "Snapshots")

    def attach_disk(self, machine: dict[str, Any], medium: dict[str, Any]) -> None:
        """``IMachine::attachDevice`` of a hard disk; a MultiAttach base gets a child."""
        if medium["type"] == "multiattach":
            medium = self.create_child(machine, medium)
        machine["disk"] = medium["id"]

    def create_child(self, machine: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
        folder = self.snapshot_folder(machine)
        os.makedirs(folder, exist_ok=True)
        child_id = new_id()
        location = os.path.join(folder, f"{{{child_id}}}.vdi")
        shutil.copyfile(parent["location"], location)
        child = {"id": child_id, "location": location, "parent": parent["id"], "type": "normal"}
        self.media[child_id] = child
        return child

    def drop_medium(self, medium_id: str) -> None:
        medium = self.media.pop(medium_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(medium["location"])

    def set_state(self, machine: dict[str, Any], state: int) -> None:
        machine["state"] = state
        machine["last_state_change"] = now_ms()
        if state in (POWERED_OFF, ABORTED):  # the VM process ended
            self._drop_guest_properties(machine, "TRANSIENT")

    def reset(self, machine: dict[str, Any]) -> None:
        """The VM resets (IConsole::reset, or a reboot inside): TRANSRESET properties go."""
        self.require_state(machine, (RUNNING,), "reset")
        self._drop_guest_properties(machine, "TRANSRESET")

    def _drop_guest_properties(self, machine: dict[str, Any], flag: str) -> None:
        properties = machine.setdefault("guest_properties", {})
        for name in [n for n, p in properties.items() if flag in p["flags"]]:
            del properties[name]

    def set_guest_property(self, machine: dict[str, Any], name: str, value: str, flags: str) -> None:
        """IMachine::setGuestProperty, from the host."""
        parsed: set[str] = set()
        for flag in filter(None, (f.strip().upper() for f in flags.split(","))):
            if flag not in GUEST_PROPERTY_FLAGS:
                raise VBoxError(E_INVALIDARG, f"Invalid guest property flag values: '{flags}'")
            parsed |= GUEST_PROPERTY_FLAGS[flag]
        properties = machine.setdefault("guest_properties", {})
        existing = properties.get(name)
        if existing is not None and "RDONLYHOST" in existing["flags"]:
            raise VBoxError(E_ACCESSDENIED, f"The property '{name}' cannot be changed by the host")
        if len(value.encode()) >= GUEST_PROP_MAX_VALUE_LEN:
            raise VBoxError(E_INVALIDARG, f"The value of guest property '{name}' is too long")
        if value:
            properties[name] = {"value": value, "flags": sorted(parsed)}
        else:
            properties.pop(name, None)

    def guest_property(self, machine: dict[str, Any], name: str) -> dict[str, Any] | None:
        """``{"value": ..., "flags": [...]}``, or None."""
        found: dict[str, Any] | None = machine.setdefault("guest_properties", {}).get(name)
        return found

    def launch(self, machine: dict[str, Any]) -> None:
        self.require_unlocked(machine, "launch")
        self.require_state(machine, (POWERED_OFF, SAVED, ABORTED), "start the VM")
        if machine["state"] == SAVED and machine["state_file"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(machine["state_file"])
            machine["state_file"] = None
        self.set_state(machine, RUNNING)

    def save_state(self, machine: dict[str, Any]) -> None:
        self.require_state(machine, ONLINE, "save the state")
        folder = self.snapshot_folder(machine)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{time.strftime('%Y-%m-%dT%H-%M-%S')}-{new_id()[:8]}.sav")
        Path(path).write_text(f"memory of {machine['name']}\n")
        machine["state_file"] = path
        self.set_state(machine, SAVED)

    def take_snapshot(
        self, machine: dict[str, Any], name: str, description: str, snapshot_id: str | None = None
    ) -> dict[str, Any]:
        self.require_state(machine, (POWERED_OFF, SAVED, ABORTED, RUNNING, PAUSED), "take a snapshot")
        online = machine["state"] in ONLINE or machine["state"] == SAVED
        frozen = self.media[machine["disk"]]
        snapshot = {
            "id": snapshot_id or new_id(),
            "name": name,
            "description": description,
            "time_stamp": now_ms(),
            "online": online,
            "parent": machine["current_snapshot"],
            "medium": frozen["id"],
            "state_file": None,
        }
        if online:
            path = os.path.join(self.snapshot_folder(machine), f"{{{snapshot['id']}}}.sav")
            Path(path).write_text(f"memory of {machine['name']} in snapshot {name}\n")
            snapshot["state_file"] = path
        machine["snapshots"][snapshot["id"]] = snapshot
        machine["current_snapshot"] = snapshot["id"]
        machine["disk"] = self.create_child(machine, frozen)["id"]
        return snapshot

    def restore_snapshot(self, machine: dict[str, Any], snapshot: dict[str, Any]) -> None:
        self.require_state(machine, (POWERED_OFF, SAVED, ABORTED), "restore a snapshot")
        self.drop_medium(machine["disk"])
        machine["disk"] = self.create_child(machine, self.media[snapshot["medium"]])["id"]
        machine["current_snapshot"] = snapshot["id"]
        if machine["state_file"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(machine["state_file"])
            machine["state_file"] = None
        if snapshot["online"]:
            path = os.path.join(self.snapshot_folder(machine), f"restored-{new_id()[:8]}.sav")
            shutil.copyfile(snapshot["state_file"], path)
            machine["state_file"] = path
            self.set_state(machine, SAVED)
        else:
            self.set_state(machine, POWERED_OFF)

    def delete_snapshot(self, machine: dict[str, Any], snapshot: dict[str, Any]) -> None:
        self.require_state(machine, (POWERED_OFF, SAVED, ABORTED, RUNNING, PAUSED), "delete a snapshot")
        children = [s for s in machine["snapshots"].values() if s["parent"] == snapshot["id"]]
        if len(children) > 1:
            # SessionMachine::deleteSnapshot: a snapshot with several children cannot go.
            raise VBoxError(
                VBOX_E_INVALID_OBJECT_STATE,
                f"Snapshot '{snapshot['name']}' of the machine '{machine['name']}' has more than one child "
                f"snapshot ({len(children)})",
            )
        for child in children:
            child["parent"] = snapshot["parent"]
        # Merge: the media based on the snapshot's medium now hang on its parent.
        frozen = self.media[snapshot["medium"]]
        for medium in self.media.values():
            if medium["parent"] == frozen["id"]:
                medium["parent"] = frozen["parent"]
        self.drop_medium(frozen["id"])
        if snapshot["state_file"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(snapshot["state_file"])
        if machine["current_snapshot"] == snapshot["id"]:
            machine["current_snapshot"] = snapshot["parent"]
        del machine["snapshots"][snapshot["id"]]

    def unregister(self, machine: dict[str, Any]) -> list[str]:
        """``IMachine::unregister(DetachAllReturnHardDisksOnly)``: the media to delete."""
        self.require_unlocked(machine, "unregister")
        media = [machine["disk"], *(s["medium"] for s in machine["snapshots"].values())]
        del self.machines[machine["id"]]
        return [m for m in media if m is not None]

    def delete_config(self, machine: dict[str, Any], media: list[str]) -> None:
        """``IMachine::deleteConfig``: the media, state files, settings file and folder."""
        for medium_id in media:
            if medium_id in self.media:
                self.drop_medium(medium_id)
        shutil.rmtree(os.path.dirname(machine["settings_file"]), ignore_errors=True)

    def power_button(self, machine: dict[str, Any]) -> None:
        """``IConsole::powerButton``: a guest with ACPI support shuts down."""
        self.require_state(machine, (RUNNING,), "press the power button")
        if not machine["guest_ignores_acpi"]:
            self.set_state(machine, POWERED_OFF)


def add_redirect(machine: dict[str, Any], rule: str) -> None:
    """``INATEngine::addRedirect`` of ``rule`` (name,protocol id,host-ip,host-port,guest-ip,guest-port)."""
    name = rule.split(",", 1)[0]
    nic = machine["nic1"]
    if any(r.split(",", 1)[0] == name for r in nic["redirects"]):
        # NATEngine::addRedirect's text (NATEngineImpl.cpp).
        raise VBoxError(E_INVALIDARG, "A NAT rule of this name already exists")
    nic["redirects"].append(rule)


#: VBoxManage's short names of the machine states (VBoxManageInfo.cpp, machineStateToName).
STATE_NAMES = {
    0: "null",
    POWERED_OFF: "poweroff",
    SAVED: "saved",
    3: "teleported",
    ABORTED: "aborted",
    RUNNING: "running",
    PAUSED: "paused",
    7: "gurumeditation",
}


#: Called after every transaction that changed something, with the home, the registry before
#: and after: the ``vboxapi`` stand-in turns the differences into events.
observers: list[Callable[[Path, dict[str, Any], dict[str, Any]], None]] = []


@contextlib.contextmanager
def transaction(home: str | os.PathLike[str]) -> Iterator[Registry]:
    """
    Read the registry of ``home`` under an exclusive lock, let the caller change it, write it
    back (unless the body raised) and tell :data:`observers`.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    with open(home / f"{REGISTRY}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = home / REGISTRY
        text = path.read_text() if path.exists() else ""
        before = json.loads(text) if text else {"machines": {}, "media": {}}
        registry = Registry(home, json.loads(json.dumps(before)))
        yield registry
        if registry.data != before:
            path.write_text(json.dumps(registry.data, indent=1))
            for observer in list(observers):
                observer(home, before, registry.data)


# -- helpers for tests: what a test sees of VirtualBox from outside ---------------------------


def current_disk_file(home: str | os.PathLike[str], vm: str) -> Path:
    """The file that holds VM ``vm``'s current disk content (the medium the guest writes)."""
    with transaction(home) as registry:
        machine = registry.find_machine(vm)
        return Path(registry.media[machine["disk"]]["location"])


def medium_files(home: str | os.PathLike[str]) -> dict[str, str]:
    """Every registered medium's file, by medium id."""
    with transaction(home) as registry:
        return {m["id"]: m["location"] for m in registry.media.values()}


def hold_session(home: str | os.PathLike[str], vm: str, holder: str = "another-frontend") -> None:
    """Lock ``vm`` for a session of another program (e.g. the VirtualBox GUI's settings)."""
    with transaction(home) as registry:
        registry.lock(registry.find_machine(vm), holder, write=True)


def release_session(home: str | os.PathLike[str], vm: str, holder: str = "another-frontend") -> None:
    with transaction(home) as registry:
        registry.unlock(registry.find_machine(vm), holder)


def guest_powers_off(home: str | os.PathLike[str], vm: str) -> None:
    """The guest shuts itself down (``poweroff`` inside): the VM process ends, PoweredOff."""
    with transaction(home) as registry:
        machine = registry.find_machine(vm)
        registry.require_state(machine, ONLINE, "power off")
        registry.set_state(machine, POWERED_OFF)


def vm_process_dies(home: str | os.PathLike[str], vm: str) -> None:
    """The VM process is killed: VBoxSVC marks the machine Aborted."""
    with transaction(home) as registry:
        machine = registry.find_machine(vm)
        registry.require_state(machine, ONLINE, "abort")
        registry.set_state(machine, ABORTED)


def guest_reboots(home: str | os.PathLike[str], vm: str) -> None:
    """The guest reboots itself: to VirtualBox a reset of the running VM."""
    with transaction(home) as registry:
        registry.reset(registry.find_machine(vm))


def guest_ignores_acpi(home: str | os.PathLike[str], vm: str, ignores: bool = True) -> None:
    """Make the guest ignore the ACPI power button (no acpid), as a hung guest does."""
    with transaction(home) as registry:
        registry.find_machine(vm)["guest_ignores_acpi"] = ignores
