"""
The seam between vmcontroller and a hypervisor: :class:`IHypervisorDriver` and its data types.

Every driver method returns a :class:`~twisted.internet.defer.Deferred`; drivers that wrap a
blocking library run it in a private thread pool, so callers never block the reactor.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import Attribute, Interface

from guest_agent.protocol.tls import Credentials

__all__ = [
    "DEFAULT_AGENT_CHANNEL",
    "DEFAULT_AGENT_TCP_PORT",
    "MAX_SERIAL_PORTS",
    "NAT_GATEWAY",
    "NAT_GUEST_ADDRESS",
    "Accel",
    "AgentTransport",
    "Capability",
    "IHypervisorDriver",
    "ISubscription",
    "SnapshotInfo",
    "VMEvent",
    "VMEventType",
    "VMSpec",
    "VMState",
]

#: The virtio-serial port name the guest agent listens on (``/dev/virtio-ports/<name>``).
DEFAULT_AGENT_CHANNEL = "org.vmcontroller.agent.0"

#: How many extra serial ports a VM can have (``VMSpec.serial_ports``): a PC has four UARTs,
#: ttyS0 to ttyS3, and ttyS0 is the console.
MAX_SERIAL_PORTS = 3

#: The guest's address and gateway on a NAT network card (``VMSpec.nat_network``): the
#: defaults of both QEMU's user-mode network and VirtualBox's NAT, on 10.0.2.0/24.
NAT_GUEST_ADDRESS = "10.0.2.15"
NAT_GATEWAY = "10.0.2.2"

#: The TCP port the guest agent listens on when its channel is a network card
#: (``python3 -m guest_agent run --listen tcp:9000``); ``agent_endpoint(..., "tcp")`` forwards it.
DEFAULT_AGENT_TCP_PORT = 9000

#: CPU acceleration: hardware virtualisation, pure emulation, or decided by the driver.
Accel = Literal["auto", "kvm", "tcg"]

#: How the host reaches the guest agent: a virtio-serial port (``VMSpec.agent_channel``), a
#: serial port (the first of ``VMSpec.serial_ports``), or a TCP port forwarded from the host's
#: loopback to the VM's NAT card (``VMSpec.nat_network``). ``"auto"`` takes the first of
#: those the VM has and the driver supports, in that order.
AgentTransport = Literal["auto", "virtio-serial", "serial", "tcp"]


class VMState(enum.Enum):
    """
    The run state of a VM.

    The values follow libvirt's ``virDomainState`` so that drivers for other hypervisors have a
    common vocabulary; :meth:`from_libvirt` maps libvirt's integers.
    """

    NOSTATE = "nostate"
    RUNNING = "running"
    #: Blocked on a resource (libvirt's BLOCKED); a running VM that is momentarily idle.
    BLOCKED = "blocked"
    PAUSED = "paused"
    #: Shutting down: the guest is processing a shutdown request.
    SHUTDOWN = "shutdown"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    #: Suspended by guest power management (S3/S4).
    PMSUSPENDED = "pmsuspended"
    #: Checkpointed to disk by :meth:`IHypervisorDriver.save_state`: no emulator runs, and
    #: :meth:`IHypervisorDriver.start` resumes the VM where it was (memory, processes).
    SAVED = "saved"

    @classmethod
    def from_libvirt(cls, value: int) -> VMState:
        """
        Map a libvirt ``VIR_DOMAIN_*`` state number to a :class:`VMState`.

        :param value: the first element of ``virDomain.state()``.
        """
        return _LIBVIRT_STATES.get(value, cls.NOSTATE)

    @property
    def is_active(self) -> bool:
        """Whether the VM has a running emulator process (it may be paused)."""
        return self not in (VMState.SHUTOFF, VMState.NOSTATE, VMState.CRASHED, VMState.SAVED)


# libvirt's numbering (VIR_DOMAIN_NOSTATE = 0 ... VIR_DOMAIN_PMSUSPENDED = 7); spelled out so this
# module does not need libvirt installed.
_LIBVIRT_STATES: dict[int, VMState] = {
    0: VMState.NOSTATE,
    1: VMState.RUNNING,
    2: VMState.BLOCKED,
    3: VMState.PAUSED,
    4: VMState.SHUTDOWN,
    5: VMState.SHUTOFF,
    6: VMState.CRASHED,
    7: VMState.PMSUSPENDED,
}


class VMEventType(enum.Enum):
    """What happened to a VM (:class:`VMEvent`)."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    #: Started again from a saved state (:meth:`IHypervisorDriver.save_state`) or a snapshot.
    RESTORED = "restored"
    PAUSED = "paused"
    RESUMED = "resumed"
    #: Stopped by the host: powered off, or a completed shutdown the host asked for.
    SHUTOFF = "shutoff"
    #: The emulator process died or the guest crashed.
    CRASHED = "crashed"
    #: Checkpointed to disk (:attr:`VMState.SAVED`).
    SAVED = "saved"
    #: The guest powered itself off (``poweroff`` inside), not asked by the host.
    GUEST_SHUTDOWN = "guest-shutdown"
    #: The guest rebooted itself; the VM keeps running.
    GUEST_REBOOT = "guest-reboot"
    #: Hard reset by the host (:meth:`IHypervisorDriver.reset`).
    RESET = "reset"


@dataclass(frozen=True)
class VMEvent:
    """
    A state change of a VM, as the hypervisor reported it.

    :ivar vm: the VM's name.
    :ivar type: what happened.
    :ivar state: the VM's state right after it.
    :ivar detail: the hypervisor's own words for it (for logs; not parsed).
    """

    vm: str
    type: VMEventType
    state: VMState
    detail: str = ""


class Capability(enum.Enum):
    """
    Optional abilities; a driver lists those it has in :attr:`IHypervisorDriver.capabilities`.
    Calling an operation the driver lacks fails with
    :class:`~vmcontroller.errors.CapabilityUnsupported`, which names the driver and the reason.
    """

    #: Snapshots of a shut-off VM (disk only).
    SNAPSHOTS = "snapshots"
    #: Snapshots of a running VM, with its memory.
    LIVE_SNAPSHOTS = "live-snapshots"
    #: :meth:`IHypervisorDriver.save_state`.
    SAVE_STATE = "save-state"
    #: The hypervisor pushes state changes: :meth:`IHypervisorDriver.subscribe` and
    #: ``wait_for_state`` make no periodic hypervisor calls. Without it the driver polls.
    PUSHED_EVENTS = "pushed-events"
    #: A virtio-serial agent channel (``VMSpec.agent_channel``).
    VIRTIO_SERIAL = "virtio-serial"
    #: Serial ports for the agent (``VMSpec.serial_ports``).
    SERIAL_PORTS = "serial-ports"
    #: A NAT card with host-to-guest TCP forwards (``VMSpec.nat_network``, ``forward_port``).
    PORT_FORWARD = "port-forward"
    #: A cap on the VM's CPU use (``VMSpec.cpu_cap_percent`` below 100).
    CPU_CAP = "cpu-cap"
    #: :meth:`IHypervisorDriver.pause` and :meth:`IHypervisorDriver.resume` (VMware
    #: Workstation Player cannot).
    PAUSE = "pause"


@dataclass(frozen=True)
class VMSpec:
    """
    What a VM is made of.

    :ivar name: the VM's name, unique on the hypervisor; letters, digits, ``-``, ``_`` and ``.``.
    :ivar disk: path of the base disk image (qcow2). The driver never writes to it: each VM gets a
        copy-on-write overlay of its own.
    :ivar kernel: path of the kernel for direct kernel boot, or ``None`` to boot from the disk.
    :ivar initrd: path of the initial ramdisk that goes with ``kernel``.
    :ivar cmdline: the kernel command line (direct kernel boot only).
    :ivar tcg_cmdline: appended to ``cmdline`` when the VM runs under TCG (software
        emulation); like ``cmdline``, only for direct kernel boot. The default,
        ``norandmaps``, turns off address-space randomisation in the guest: measured under
        QEMU 7.2's TCG, an exec of ``/bin/true`` takes 29 ms with it and 5 ms without, as TCG
        finds the code it translated for the loader and the C library again only where they
        were mapped before. Give ``""`` to keep randomisation.
    :ivar accel: ``"kvm"``, ``"tcg"``, or ``"auto"`` to let the driver decide (see the driver).
    :ivar agent_channel: name of the virtio-serial port the guest agent uses.
    :ivar extra_channels: more virtio-serial port names, next to the agent channel.
    :ivar serial_ports: names of extra serial ports (UARTs): the first is the guest's
        ``/dev/ttyS1``, the next ``/dev/ttyS2`` and so on (ttyS0 is the console), at most
        :data:`MAX_SERIAL_PORTS`. The host side of each is a unix socket, found by its name
        (``IHypervisorDriver.serial_socket_path``); see :meth:`serial_device` for the guest side.
        Names: letters, digits, ``-``, ``_`` and ``.``.
    :ivar nat_network: give the VM a virtio network card on the hypervisor's NAT: the guest
        (:data:`NAT_GUEST_ADDRESS`, gateway :data:`NAT_GATEWAY`) reaches out through the host,
        and from outside only the ports forwarded with ``IHypervisorDriver.forward_port`` reach
        in, on the host's loopback. The image must configure the card (the default image leaves
        it down).
    :ivar cpu_cap_percent: the share of each host CPU the VM may use, 1 to 100 (VirtualBox's
        CPU execution cap; BOINC's volunteers set it). Below 100 needs
        :attr:`Capability.CPU_CAP`.
    :ivar agent_transport: the channel :meth:`IHypervisorDriver.agent_endpoint` uses by
        default (:data:`AgentTransport`); the guest's agent must listen there.
    """

    name: str
    disk: str
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    tcg_cmdline: str = "norandmaps"
    memory_mib: int = 512
    vcpus: int = 1
    accel: Accel = "auto"
    agent_channel: str = DEFAULT_AGENT_CHANNEL
    #: Extra virtio-serial port names to create next to the agent channel (host side: unix sockets).
    extra_channels: tuple[str, ...] = field(default_factory=tuple)
    serial_ports: tuple[str, ...] = field(default_factory=tuple)
    nat_network: bool = False
    cpu_cap_percent: int = 100
    agent_transport: AgentTransport = "auto"

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name) or self.name[0] == ".":
            raise ValueError(
                f"invalid VM name {self.name!r}: use letters, digits, '-', '_' and '.', not starting with '.'"
            )
        if self.memory_mib < 64:
            raise ValueError(f"memory_mib={self.memory_mib} is too small: give at least 64 MiB")
        if self.vcpus < 1:
            raise ValueError(f"vcpus={self.vcpus}: a VM needs at least one virtual CPU")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel={self.accel!r}: use 'auto', 'kvm' or 'tcg'")
        if not 1 <= self.cpu_cap_percent <= 100:
            raise ValueError(f"cpu_cap_percent={self.cpu_cap_percent}: give a percentage from 1 to 100")
        if self.agent_transport not in ("auto", "virtio-serial", "serial", "tcp"):
            raise ValueError(
                f"agent_transport={self.agent_transport!r}: use 'auto', 'virtio-serial', 'serial' or 'tcp'"
            )
        if self.agent_transport == "serial" and not self.serial_ports:
            raise ValueError("agent_transport='serial' needs a serial port: name one in serial_ports")
        if self.agent_transport == "tcp" and not self.nat_network:
            raise ValueError("agent_transport='tcp' needs a network card: set nat_network=True")
        if self.initrd is not None and self.kernel is None:
            raise ValueError("initrd given without kernel: direct kernel boot needs both")
        if isinstance(self.serial_ports, str):
            raise ValueError(f"serial_ports={self.serial_ports!r}: give a tuple of names, e.g. ('agent',)")
        if len(self.serial_ports) > MAX_SERIAL_PORTS:
            raise ValueError(
                f"serial_ports has {len(self.serial_ports)} names: a VM has at most {MAX_SERIAL_PORTS} "
                "serial ports besides the console (ttyS1 to ttyS3)"
            )
        if len(set(self.serial_ports)) != len(self.serial_ports):
            raise ValueError(f"serial_ports={self.serial_ports!r} names a port twice")
        for port in self.serial_ports:
            if not port or not all(c.isalnum() or c in "-_." for c in port) or port[0] == ".":
                raise ValueError(
                    f"invalid serial port name {port!r}: use letters, digits, '-', '_' and '.', not "
                    "starting with '.'"
                )

    def serial_device(self, port: str) -> str:
        """
        The guest's device node of serial port ``port`` (one of :attr:`serial_ports`),
        e.g. ``/dev/ttyS1`` for the first.

        :raises KeyError: the spec has no serial port of that name.
        """
        try:
            return f"/dev/ttyS{self.serial_ports.index(port) + 1}"
        except ValueError:
            raise KeyError(
                f"VM {self.name!r} has no serial port {port!r} (it has {self.serial_ports!r})"
            ) from None


@dataclass(frozen=True)
class SnapshotInfo:
    """
    A snapshot of a VM.

    :ivar name: the snapshot's name, unique per VM.
    :ivar description: free text given when it was taken.
    :ivar created: when it was taken (UTC).
    :ivar state: the VM's state when it was taken; an active state means memory was saved too,
        and reverting resumes the VM where it was.
    :ivar parent: the name of the snapshot it was taken on top of, if any.
    :ivar current: whether the VM's disk currently descends from this snapshot.
    """

    name: str
    description: str
    created: datetime
    state: VMState
    parent: str | None = None
    current: bool = False

    @property
    def has_memory(self) -> bool:
        """Whether the snapshot holds the VM's memory (it was taken while the VM ran)."""
        return self.state.is_active


class ISubscription(Interface):
    """A registration for VM events (:meth:`IHypervisorDriver.subscribe`)."""

    def cancel() -> None:
        """Stop delivering events to this subscriber; calling it again does nothing."""


class IHypervisorDriver(Interface):
    """
    Controls VMs on one hypervisor.

    A driver is also a :class:`twisted.application.service.IService`: start it before use and
    stop it after. Every operation returns a Deferred. Errors are
    :class:`vmcontroller.errors.HypervisorError` subclasses:
    :class:`~vmcontroller.errors.VMNotFound` for an unknown VM,
    :class:`~vmcontroller.errors.VMStateError` when the VM's state forbids the operation,
    :class:`~vmcontroller.errors.SnapshotNotFound` for an unknown snapshot,
    :class:`~vmcontroller.errors.VMAlreadyExists` for a name taken,
    :class:`~vmcontroller.errors.CapabilityUnsupported` for an operation the driver lacks
    (see :attr:`capabilities`), :class:`~vmcontroller.errors.HypervisorUnavailable` when the
    hypervisor is missing or not running, :class:`~vmcontroller.errors.VMLocked` when another
    program holds the VM. State-changing operations on one VM run one at a time, in the order
    they were called. A blocking hypervisor library or tool never runs on the reactor thread.
    """

    name = Attribute("The driver's name, as registered in the ``vmcontroller.hypervisors`` entry points.")
    capabilities = Attribute(
        "The frozenset of :class:`Capability` this driver instance has (it may depend on the "
        "installed product, e.g. VMware Player has no snapshots)."
    )

    def define(spec: VMSpec) -> Deferred[str]:
        """
        Create the VM (its writable disk overlay and its definition) without starting it.

        :return: a Deferred firing with the VM's name; fails with
            :class:`~vmcontroller.errors.VMAlreadyExists` if the name is taken.
        """

    def start(name: str) -> Deferred[None]:
        """
        Boot a defined, shut-off VM, or resume a saved one (:attr:`VMState.SAVED`) where it was.
        """

    def shutdown(name: str, wait: bool = True, timeout: float = 120.0) -> Deferred[None]:
        """
        Ask the guest to power off (ACPI power button).

        :param wait: wait until the VM is shut off.
        :param timeout: seconds to wait; then fail with :class:`~vmcontroller.errors.VMTimeout`
            (the VM keeps running: use :meth:`power_off`).
        """

    def power_off(name: str) -> Deferred[None]:
        """Stop the VM at once, like pulling the plug."""

    def pause(name: str) -> Deferred[None]:
        """Freeze the VM's CPUs; memory stays. Needs :attr:`Capability.PAUSE`."""

    def resume(name: str) -> Deferred[None]:
        """Unfreeze a paused VM. Needs :attr:`Capability.PAUSE`."""

    def reset(name: str) -> Deferred[None]:
        """Hard-reset the VM, like pressing the reset button (no clean guest shutdown)."""

    def save_state(name: str) -> Deferred[None]:
        """
        Checkpoint a running or paused VM to disk and stop its emulator: the VM ends in
        :attr:`VMState.SAVED`, and :meth:`start` resumes it with its memory and processes.
        Needs :attr:`Capability.SAVE_STATE`.
        """

    def state(name: str) -> Deferred[VMState]:
        """The VM's current state."""

    def subscribe(callback: Callable[[VMEvent], object], name: str | None = None) -> ISubscription:
        """
        Call ``callback`` with each :class:`VMEvent` of VM ``name``, or of every VM of this
        driver if ``name`` is ``None``, on the reactor thread, in the order they happened, from
        now until the returned subscription is cancelled or the driver stops. An exception in
        ``callback`` is logged and does not stop the others. With
        :attr:`Capability.PUSHED_EVENTS` the hypervisor pushes them; otherwise the driver polls
        while anyone subscribes.
        """

    def wait_for_state(name: str, state: VMState, timeout: float = 60.0) -> Deferred[None]:
        """
        Fire once the VM is in ``state``: at once if it is, else at the event that brings it
        there (built on :meth:`subscribe`).

        :param timeout: seconds; then fail with :class:`~vmcontroller.errors.VMTimeout`.
        """

    def snapshot_create(name: str, snapshot_name: str, description: str = "") -> Deferred[SnapshotInfo]:
        """
        Take a snapshot: disk and memory if the VM runs (:attr:`Capability.LIVE_SNAPSHOTS`),
        disk only if it is shut off (:attr:`Capability.SNAPSHOTS`).
        """

    def snapshot_list(name: str) -> Deferred[list[SnapshotInfo]]:
        """The VM's snapshots, oldest first."""

    def snapshot_revert(name: str, snapshot_name: str) -> Deferred[None]:
        """
        Return the VM to a snapshot; it ends in the state it had when the snapshot was taken.
        """

    def snapshot_delete(name: str, snapshot_name: str) -> Deferred[None]:
        """Delete one snapshot; its children are kept."""

    def undefine(name: str) -> Deferred[None]:
        """Stop the VM if it runs, then delete it with its snapshots and its disk overlay."""

    def list_vms() -> Deferred[list[str]]:
        """The names of the VMs this driver manages, sorted."""

    def agent_credentials(name: str) -> Deferred[Credentials]:
        """
        The host's end of the VM's credentials, for
        ``vmcontroller.client.connect(..., credentials=...)``: the driver minted them when it
        defined the VM, provisions the agent's end into the guest out of band (QEMU fw_cfg,
        a VirtualBox guest property, VMware guestinfo; never the image or the kernel command
        line) and removes both with the VM. Fail with
        :class:`~vmcontroller.errors.CredentialsUnavailable` for a VM that has none.
        """

    def agent_endpoint(name: str, transport: AgentTransport = "auto") -> Deferred[IStreamClientEndpoint]:
        """
        A Twisted client endpoint that reaches the VM's guest agent over ``transport``
        (by default the spec's ``agent_transport``): connect
        :func:`vmcontroller.client.connect` to it. Callers need not know which channel it is.

        Only a running (or paused) VM has one; otherwise fail with
        :class:`~vmcontroller.errors.VMStateError`. A transport the VM lacks fails with
        :class:`~vmcontroller.errors.HypervisorError`, one the driver lacks with
        :class:`~vmcontroller.errors.CapabilityUnsupported`.
        """

    def forward_port(name: str, guest_port: int, guest_address: str = NAT_GUEST_ADDRESS) -> Deferred[int]:
        """
        Forward a free TCP port on the host's loopback to ``guest_port`` of the VM's NAT
        network card (``VMSpec.nat_network``) and return the host port; connect to
        ``127.0.0.1`` on it. The forward lasts as long as the VM's emulator process: after a
        stop, or a snapshot revert that restarts the VM, forward again.

        Only a running (or paused) VM has one; otherwise fail with
        :class:`~vmcontroller.errors.VMStateError`. A VM without a NAT card fails with
        :class:`~vmcontroller.errors.HypervisorError`. Needs :attr:`Capability.PORT_FORWARD`.
        """
