"""
The VBoxManage backend: VirtualBox driven through its command-line tool, as BOINC's
vboxwrapper does on Linux and macOS (``samples/vboxwrapper/vbox_vboxmanage.cpp``). Every run
goes through Twisted's process API; its output is parsed by :mod:`._parsing`, and a failure
becomes our exception from VBoxManage's ``error:`` lines and result-code name.

VBoxManage takes and drops the machine's session lock itself at each run, so this backend holds
no lock between runs (vbox_common.cpp explains the same of vboxwrapper). It cannot wait for
VirtualBox's events: the driver polls its states.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.internet import utils
from twisted.logger import Logger

from hypervisors.interface import VMSpec, VMState
from hypervisors.virtualbox._backend import CONTROLLER, GROUP, SPEC_KEY, ConsoleAction, MachineInfo
from hypervisors.virtualbox._parsing import (
    PortForward,
    SnapshotRecord,
    parse_list_vms,
    parse_machinereadable,
    parse_port_forward,
    parse_snapshot_list,
    parse_vboxmanage_error,
    timestamp,
    translate_error,
    vm_state,
)
from vmcontroller.errors import HypervisorError, HypervisorUnavailable

#: Where VirtualBox installs VBoxManage when it is not on PATH.
_KNOWN_PATHS = (
    "/usr/bin/VBoxManage",
    "/usr/local/bin/VBoxManage",
    "/Applications/VirtualBox.app/Contents/MacOS/VBoxManage",
)
#: Extra-data key prefix of what VBoxManage cannot tell about a snapshot (its time, whether
#: the VM ran): ``snapshot list --machinereadable`` prints names, UUIDs and descriptions only.
SNAPSHOT_KEY = "vmcontroller/snapshot/"


def find_vboxmanage(path: str | None = None) -> str | None:
    """``path`` if given, else VBoxManage on PATH or where VirtualBox installs it."""
    if path is not None:
        return path if os.access(path, os.X_OK) else None
    found = shutil.which("VBoxManage")
    if found:
        return found
    return next((p for p in _KNOWN_PATHS if os.access(p, os.X_OK)), None)


class VBoxManageBackend:
    name = "vboxmanage"
    pushes_events = False
    log = Logger()

    def __init__(self, reactor: Any, executable: str, vbox_user_home: str | None = None) -> None:
        self._reactor = reactor
        self.executable = executable
        self._env = dict(os.environ)
        if vbox_user_home is not None:
            self._env["VBOX_USER_HOME"] = vbox_user_home

    async def _run(
        self, args: list[str], *, action: str, vm: str | None = None, snapshot: str | None = None
    ) -> str:
        try:
            out, err, code = await utils.getProcessOutputAndValue(
                self.executable, args, env=self._env, reactor=self._reactor
            )
        except OSError as e:
            raise HypervisorUnavailable(f"cannot run {self.executable}: {e}; install VirtualBox") from e
        text = out.decode(errors="replace")
        if code != 0:
            error = parse_vboxmanage_error(err.decode(errors="replace") + "\n" + text)
            if "is not currently running" in error.message:
                # VBoxManageControlVM.cpp says so, with no result code, when a VM has no console.
                raise translate_error("VBOX_E_INVALID_VM_STATE", error.message, action=action, vm=vm)
            if text.startswith("This machine does not have any snapshots"):
                return text
            raise translate_error(error.code, error.message, action=action, vm=vm, snapshot=snapshot)
        return text

    async def start(self) -> None:
        version = await self._run(["--version"], action="ask VBoxManage its version")
        self.log.info("VBoxManage {path} is version {version}", path=self.executable, version=version.strip())

    async def stop(self) -> None:
        return None

    async def _showvminfo(self, name: str) -> dict[str, str]:
        return parse_machinereadable(
            await self._run(["showvminfo", name, "--machinereadable"], action="look up", vm=name)
        )

    @staticmethod
    def _info(values: dict[str, str]) -> MachineInfo:
        return MachineInfo(
            name=values.get("name", ""),
            id=values.get("UUID", ""),
            state=vm_state(values.get("VMState", "")),
            raw_state=values.get("VMState", "unknown"),
            ours=GROUP in values.get("groups", "").split(","),
        )

    async def machine(self, name: str) -> MachineInfo:
        return self._info(await self._showvminfo(name))

    async def machines(self) -> list[MachineInfo]:
        listed = parse_list_vms(await self._run(["list", "vms"], action="list the VMs"))
        infos = []
        for uuid in listed.values():
            try:
                infos.append(self._info(await self._showvminfo(uuid)))
            except HypervisorError:
                continue  # unregistered meanwhile
        return infos

    async def extra_data(self, name: str, key: str) -> str:
        text = await self._run(["getextradata", name, key], action="read the settings of", vm=name)
        # VBoxManageMisc.cpp, handleGetExtraData: "Value: <value>" or "No value set!".
        return text.split("Value: ", 1)[1].rstrip("\n") if text.startswith("Value: ") else ""

    async def set_extra_data(self, name: str, key: str, value: str) -> None:
        await self._run(["setextradata", name, key, value], action="change the settings of", vm=name)

    async def create(self, spec: VMSpec, base_folder: str, serial_paths: list[str], spec_json: str) -> None:
        name = spec.name
        action = "define VM"
        # The sequence of vbox_vboxmanage.cpp's VBOX_VM::create_vm.
        await self._run(
            [
                "createvm",
                "--name",
                name,
                "--groups",
                GROUP,
                "--basefolder",
                base_folder,
                "--ostype",
                "Linux_64",
                "--register",
            ],
            action=action,
            vm=name,
        )
        modify = ["modifyvm", name, "--memory", str(spec.memory_mib), "--cpus", str(spec.vcpus)]
        modify += ["--cpuexecutioncap", str(spec.cpu_cap_percent), "--acpi", "on", "--ioapic", "on"]
        for slot, path in enumerate(serial_paths, start=2):  # --uart1 is ttyS0, the console
            io_base, irq = _UARTS[slot - 1]
            modify += [f"--uart{slot}", io_base, irq, f"--uartmode{slot}", "server", path]
        if spec.nat_network:
            modify += ["--nic1", "nat"]
        await self._run(modify, action=action, vm=name)
        await self._run(
            ["storagectl", name, "--name", CONTROLLER, "--add", "sata", "--controller", "IntelAhci"],
            action=action,
            vm=name,
        )
        # A multiattach base: VirtualBox gives the VM a differencing child in its Snapshots
        # folder and never writes the base (vboxwrapper's "storage attach (fixed disk -
        # multiattach mode)").
        await self._run(
            [
                "storageattach",
                name,
                "--storagectl",
                CONTROLLER,
                "--port",
                "0",
                "--device",
                "0",
                "--type",
                "hdd",
                "--mtype",
                "multiattach",
                "--medium",
                os.path.abspath(spec.disk),
            ],
            action=action,
            vm=name,
        )
        await self.set_extra_data(name, SPEC_KEY, spec_json)

    async def set_guest_property(self, name: str, key: str, value: str, flags: str) -> None:
        # The value is on VBoxManage's command line for the call (docs/security.md says what
        # that means for credentials); VBoxManage has no other way to take it.
        await self._run(["guestproperty", "set", name, key, value, "--flags", flags],
                        action="set a guest property of", vm=name)

    async def launch(self, name: str) -> None:
        await self._run(["startvm", name, "--type", "headless"], action="start", vm=name)

    async def console(self, name: str, action: ConsoleAction) -> None:
        await self._run(["controlvm", name, action], action=action, vm=name)

    async def take_snapshot(self, name: str, snapshot: str, description: str) -> str:
        state = (await self.machine(name)).state
        what = f"take snapshot {snapshot!r} of"
        args = ["snapshot", name, "take", snapshot]
        if description:
            args += ["--description", description]
        if state in (VMState.RUNNING, VMState.PAUSED):
            args.append("--live")  # no pause while the VM's memory is saved
        text = await self._run(args, action=what, vm=name)
        # VBoxManageSnapshot.cpp: "Snapshot taken. UUID: <uuid>".
        snapshot_id = text.rsplit("UUID: ", 1)[-1].strip() if "UUID: " in text else ""
        if not snapshot_id:
            raise HypervisorError(
                f"cannot {what} {name!r}: VBoxManage printed no snapshot UUID: {text.strip()!r}"
            )
        facts = {
            "created": datetime.now(tz=UTC).timestamp(),
            "online": state in (VMState.RUNNING, VMState.PAUSED, VMState.SAVED),
        }
        await self.set_extra_data(name, SNAPSHOT_KEY + snapshot_id, json.dumps(facts))
        return snapshot_id

    async def snapshots(self, name: str) -> list[SnapshotRecord]:
        text = await self._run(
            ["snapshot", name, "list", "--machinereadable"], action="list the snapshots of", vm=name
        )
        records = []
        for record in parse_snapshot_list(text):
            facts = json.loads(await self.extra_data(name, SNAPSHOT_KEY + record.id) or "{}")
            records.append(
                SnapshotRecord(
                    id=record.id,
                    name=record.name,
                    description=record.description,
                    parent_id=record.parent_id,
                    current=record.current,
                    created=timestamp(int(facts["created"] * 1000)) if "created" in facts else None,
                    online=facts.get("online"),
                )
            )
        return records

    async def restore_snapshot(self, name: str, snapshot_id: str) -> None:
        await self._run(
            ["snapshot", name, "restore", snapshot_id],
            action="restore a snapshot of",
            vm=name,
            snapshot=snapshot_id,
        )

    async def delete_snapshot(self, name: str, snapshot_id: str) -> None:
        await self._run(
            ["snapshot", name, "delete", snapshot_id],
            action="delete a snapshot of",
            vm=name,
            snapshot=snapshot_id,
        )
        await self.set_extra_data(name, SNAPSHOT_KEY + snapshot_id, "")

    async def unregister(self, name: str) -> None:
        await self._run(["unregistervm", name, "--delete"], action="undefine", vm=name)

    async def port_forwards(self, name: str) -> list[PortForward]:
        values = await self._showvminfo(name)
        rules = (v for k, v in values.items() if k.startswith("Forwarding("))
        return [f for f in map(parse_port_forward, rules) if f is not None]

    async def add_port_forward(
        self, name: str, rule: str, host_port: int, guest_ip: str, guest_port: int
    ) -> None:
        # A running VM's rules change with controlvm (modifyvm needs the VM off): the rule's
        # format is modifyvm --natpf's, name,proto,host-ip,host-port,guest-ip,guest-port.
        await self._run(
            ["controlvm", name, "natpf1", f"{rule},tcp,127.0.0.1,{host_port},{guest_ip},{guest_port}"],
            action="forward a port to",
            vm=name,
        )

    def watch(self, publish: Callable[[str, VMState], None]) -> Callable[[], None]:
        raise NotImplementedError("VBoxManage pushes no events: the driver polls")


#: The standard PC serial ports' I/O base and IRQ, COM1 to COM4 (VBoxManage modifyvm --uartN).
_UARTS = [("0x3F8", "4"), ("0x2F8", "3"), ("0x3E8", "4"), ("0x2E8", "3")]
