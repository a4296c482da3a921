"""What the VirtualBox driver needs of a backend (pyvbox or VBoxManage)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from hypervisors.interface import VMSpec, VMState
from hypervisors.virtualbox._parsing import PortForward, SnapshotRecord

#: The VirtualBox group our machines are created in: how list_vms() tells ours from others.
GROUP = "/vmcontroller"
#: The machine's extra-data key that holds its VMSpec (JSON).
SPEC_KEY = "vmcontroller/spec"
#: The storage controller the disk hangs on.
CONTROLLER = "SATA"

ConsoleAction = Literal["poweroff", "acpipowerbutton", "pause", "resume", "reset", "savestate"]


@dataclass(frozen=True)
class MachineInfo:
    """A machine as the driver needs to see it."""

    name: str
    id: str
    state: VMState
    #: VirtualBox's own state name (``poweroff``, ``running``...), for messages.
    raw_state: str
    ours: bool


class Backend(Protocol):
    """
    One way to reach VirtualBox. Every method is asynchronous and raises our own exceptions
    (:func:`hypervisors.virtualbox._parsing.translate_error`).
    """

    name: str
    #: Whether :meth:`watch` pushes VirtualBox's events (else the driver polls).
    pushes_events: bool

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def machine(self, name: str) -> MachineInfo: ...

    async def machines(self) -> list[MachineInfo]: ...

    async def extra_data(self, name: str, key: str) -> str: ...

    async def set_extra_data(self, name: str, key: str, value: str) -> None: ...

    async def create(
        self, spec: VMSpec, base_folder: str, serial_paths: list[str], spec_json: str
    ) -> None: ...

    async def set_guest_property(self, name: str, key: str, value: str, flags: str) -> None:
        """Set (``value`` empty: delete) a guest property, running or not, under a shared lock."""
        ...

    async def launch(self, name: str) -> None: ...

    async def console(self, name: str, action: ConsoleAction) -> None: ...

    async def take_snapshot(self, name: str, snapshot: str, description: str) -> str: ...

    async def snapshots(self, name: str) -> list[SnapshotRecord]: ...

    async def restore_snapshot(self, name: str, snapshot_id: str) -> None: ...

    async def delete_snapshot(self, name: str, snapshot_id: str) -> None: ...

    async def unregister(self, name: str) -> None: ...

    async def port_forwards(self, name: str) -> list[PortForward]: ...

    async def add_port_forward(
        self, name: str, rule: str, host_port: int, guest_ip: str, guest_port: int
    ) -> None: ...

    def watch(self, publish: Callable[[str, VMState], None]) -> Callable[[], None]:
        """Call ``publish(vm, state)`` on the reactor thread at each state change pushed by
        VirtualBox, until the returned function is called."""
        ...
