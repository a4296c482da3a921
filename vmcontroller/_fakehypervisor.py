"""
An in-memory hypervisor (:class:`FakeHypervisor`): every operation of
:class:`~hypervisors.interface.IHypervisorDriver` with the states, events and errors of a
real driver, and no VM. Exported by :mod:`vmcontroller.testing`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.task import deferLater
from twisted.protocols.loopback import loopbackAsync
from zope.interface import implementer

from guest_agent.protocol.tls import Authenticator, Credentials
from guest_agent.session import Operation, OperationContext
from guest_agent.transports import AgentProtocol
from hypervisors.base import EventHub, PerVMQueue, require_capability
from hypervisors.interface import (
    NAT_GUEST_ADDRESS,
    AgentTransport,
    Capability,
    IHypervisorDriver,
    ISubscription,
    SnapshotInfo,
    VMEvent,
    VMEventType,
    VMSpec,
    VMState,
)
from vmcontroller.credentials import mint
from vmcontroller.errors import (
    HypervisorError,
    HypervisorUnavailable,
    SnapshotNotFound,
    VMAlreadyExists,
    VMLocked,
    VMNotFound,
    VMStateError,
)

__all__ = ["FakeHypervisor", "FakeVM"]

T = TypeVar("T")

#: Everything the fake can do; pass fewer to :class:`FakeHypervisor` to play a lesser product.
ALL_CAPABILITIES = frozenset(Capability)

# The states in which a VM has an emulator that the host can talk to.
_LIVE = (VMState.RUNNING, VMState.PAUSED)


@dataclass
class _Snapshot:
    info: SnapshotInfo
    disk: dict[str, bytes]
    memory: dict[str, bytes] | None


@dataclass
class FakeVM:
    """
    One VM of a :class:`FakeHypervisor`.

    :ivar disk: the content of its disk, file name to bytes: write it as a guest would;
        snapshots keep a copy and reverting brings it back.
    :ivar memory: what its running guest holds (processes, tmpfs), name to bytes: a save or a
        snapshot with memory keeps it, a power off or reset clears it.
    :ivar locked_by: the program holding the VM (see :meth:`FakeHypervisor.lock`), if any.
    :ivar ignores_power_button: the guest does not react to ``shutdown`` (a hung guest).
    :ivar credentials: the host's and the agent's ends, minted at define; its in-memory agent
        holds the agent's end.
    """

    spec: VMSpec
    credentials: tuple[Credentials, Credentials] = field(default_factory=mint)
    state: VMState = VMState.SHUTOFF
    disk: dict[str, bytes] = field(default_factory=dict)
    memory: dict[str, bytes] = field(default_factory=dict)
    saved_memory: dict[str, bytes] | None = None
    snapshots: dict[str, _Snapshot] = field(default_factory=dict)
    current_snapshot: str | None = None
    locked_by: str | None = None
    ignores_power_button: bool = False
    forwards: dict[int, int] = field(default_factory=dict)


@implementer(IStreamClientEndpoint)
class _InMemoryAgentEndpoint:
    """
    Connects a client to a fresh in-memory agent session, joined by a loopback; the agent
    authenticates with the VM's credentials.
    """

    def __init__(
        self, clock: IReactorTime, operations: Mapping[str, Operation], vm: str, credentials: Credentials
    ) -> None:
        self._clock = clock
        self._operations = operations
        self._vm = vm
        self._authenticator = Authenticator.from_credentials(credentials, server_side=True)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        address: IAddress = _FakeAddress(self._vm)
        client = protocolFactory.buildProtocol(address)
        if client is None:
            return fail(HypervisorError("the protocol factory refused the agent connection"))
        agent = AgentProtocol(
            self._clock,
            self._operations,
            None,
            {"software": "fake", "vm": self._vm},
            authenticator=self._authenticator,
        )
        loopbackAsync(agent, client)
        return succeed(client)


@implementer(IAddress)
@dataclass(frozen=True)
class _FakeAddress:
    vm: str


@implementer(IHypervisorDriver)
class FakeHypervisor(Service):
    """
    A hypervisor that lives in memory, for testing code that drives VMs: define, start,
    snapshot and the rest change :class:`FakeVM` objects and publish the
    :class:`~hypervisors.interface.VMEvent` a real hypervisor would; the conformance suite
    (``tests/conformance``) runs against it as against the real drivers, so it behaves as they
    do. Inspect or drive a VM through :meth:`vm` (its disk and memory), :meth:`crash`,
    :meth:`guest_power_off`, :meth:`guest_reboot`, :meth:`lock`; make the hypervisor vanish
    with ``available = False``.

    :param reactor: its clock times ``shutdown`` and ``wait_for_state``.
    :param name: the driver's name (as registered in the entry points).
    :param capabilities: what it can do (default: everything); an operation needing one it
        lacks fails with :class:`~vmcontroller.errors.CapabilityUnsupported`.
    :param latency: seconds each operation takes (0: it completes before the call returns).
    :param agent_operations: the operations of the in-memory agent that
        :meth:`agent_endpoint` reaches (default: ``ping`` only).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        name: str = "fake",
        capabilities: frozenset[Capability] = ALL_CAPABILITIES,
        *,
        latency: float = 0.0,
        agent_operations: Mapping[str, Operation] | None = None,
    ) -> None:
        self.name = name
        self.capabilities = frozenset(capabilities)
        #: Set to ``False`` to play a hypervisor that is not running: every call fails with
        #: :class:`~vmcontroller.errors.HypervisorUnavailable`.
        self.available = True
        self._clock = reactor
        self._latency = latency
        self._agent_operations = agent_operations
        self._vms: dict[str, FakeVM] = {}
        self._queue = PerVMQueue()
        self._hub = EventHub()
        self._ports = itertools.count(20000)

    # -- driving the fake --------------------------------------------------------------

    def vm(self, name: str) -> FakeVM:
        """
        VM ``name``, to read or write its disk and memory.

        :raises VMNotFound: no such VM.
        """
        try:
            return self._vms[name]
        except KeyError:
            raise VMNotFound(f"no VM named {name!r} on the {self.name} hypervisor") from None

    def crash(self, name: str) -> None:
        """The VM's emulator dies: it ends CRASHED, its memory lost."""
        self._stop(self._live(name, "crash"), VMState.CRASHED, VMEventType.CRASHED, "emulator died")

    def guest_power_off(self, name: str) -> None:
        """The guest powers itself off (``poweroff`` inside)."""
        self._stop(self._live(name, "power off from inside"), VMState.SHUTOFF, VMEventType.GUEST_SHUTDOWN)

    def guest_reboot(self, name: str) -> None:
        """The guest reboots itself: its memory is lost, it keeps running."""
        vm = self._live(name, "reboot from inside")
        vm.memory.clear()
        self._publish(vm, VMEventType.GUEST_REBOOT)

    def lock(self, name: str, holder: str = "another program") -> None:
        """Another program takes VM ``name``: state changes fail with VMLocked until :meth:`unlock`."""
        self.vm(name).locked_by = holder

    def unlock(self, name: str) -> None:
        """The other program lets go of VM ``name``."""
        self.vm(name).locked_by = None

    # -- plumbing ----------------------------------------------------------------------

    def _check_available(self) -> None:
        if not self.available:
            raise HypervisorUnavailable(
                f"the {self.name} hypervisor is not running: start it, or check that it is installed"
            )

    def _live(self, name: str, action: str) -> FakeVM:
        vm = self.vm(name)
        if vm.state not in _LIVE:
            raise VMStateError(
                f"cannot {action} VM {name!r}: it is {vm.state.value}, not running; start it first"
            )
        return vm

    def _publish(self, vm: FakeVM, kind: VMEventType, detail: str = "") -> None:
        self._hub.publish(VMEvent(vm.spec.name, kind, vm.state, detail))

    def _stop(self, vm: FakeVM, state: VMState, kind: VMEventType, detail: str = "") -> None:
        vm.state = state
        vm.memory.clear()
        vm.forwards.clear()
        self._publish(vm, kind, detail)

    def _run(self, body: Callable[[], T]) -> Deferred[T]:
        async def run() -> T:
            self._check_available()
            if self._latency:
                await deferLater(self._clock, self._latency, lambda: None)
            return body()

        return Deferred.fromCoroutine(run())

    def _change(self, name: str, action: str, body: Callable[[FakeVM], T]) -> Deferred[T]:
        # One state change per VM at a time, in call order, as the interface promises.
        async def change() -> T:
            return await self._run(lambda: body(self._unlocked(name, action)))

        return Deferred.fromCoroutine(self._queue.run(name, change))

    def _unlocked(self, name: str, action: str) -> FakeVM:
        vm = self.vm(name)
        if vm.locked_by is not None:
            raise VMLocked(f"cannot {action} VM {name!r}: {vm.locked_by} holds it; try again when it lets go")
        return vm

    def _defer(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        return Deferred.fromCoroutine(coro)

    # -- IHypervisorDriver -------------------------------------------------------------

    def define(self, spec: VMSpec) -> Deferred[str]:
        def define() -> str:
            if spec.name in self._vms:
                raise VMAlreadyExists(
                    f"a VM named {spec.name!r} exists already: pick another name or undefine it"
                )
            if spec.cpu_cap_percent < 100:
                require_capability(self, Capability.CPU_CAP, "this fake plays a product without a CPU cap")
            vm = self._vms[spec.name] = FakeVM(spec)
            self._publish(vm, VMEventType.DEFINED)
            return spec.name

        return self._run(define)

    def start(self, name: str) -> Deferred[None]:
        def start(vm: FakeVM) -> None:
            if vm.state in _LIVE:
                raise VMStateError(f"cannot start VM {name!r}: it is {vm.state.value} already")
            restored = vm.state is VMState.SAVED
            vm.state = VMState.RUNNING
            if restored:
                vm.memory, vm.saved_memory = vm.saved_memory or {}, None
                self._publish(vm, VMEventType.RESTORED)
            else:
                self._publish(vm, VMEventType.STARTED)

        return self._change(name, "start", start)

    def shutdown(self, name: str, wait: bool = True, timeout: float = 120.0) -> Deferred[None]:
        def press(vm: FakeVM) -> None:
            self._live(name, "shut down")
            if not vm.ignores_power_button:
                self._stop(vm, VMState.SHUTOFF, VMEventType.SHUTOFF, "ACPI power button")

        async def shutdown() -> None:
            await self._change(name, "shut down", press)
            if wait:
                await self.wait_for_state(name, VMState.SHUTOFF, timeout)

        return self._defer(shutdown())

    def power_off(self, name: str) -> Deferred[None]:
        return self._change(
            name,
            "power off",
            lambda vm: self._stop(self._live(name, "power off"), VMState.SHUTOFF, VMEventType.SHUTOFF),
        )

    def pause(self, name: str) -> Deferred[None]:
        def pause(vm: FakeVM) -> None:
            require_capability(self, Capability.PAUSE, "this fake plays a product that cannot pause a VM")
            if vm.state is not VMState.RUNNING:
                raise VMStateError(f"cannot pause VM {name!r}: it is {vm.state.value}, not running")
            vm.state = VMState.PAUSED
            self._publish(vm, VMEventType.PAUSED)

        return self._change(name, "pause", pause)

    def resume(self, name: str) -> Deferred[None]:
        def resume(vm: FakeVM) -> None:
            require_capability(self, Capability.PAUSE, "this fake plays a product that cannot resume a VM")
            if vm.state is not VMState.PAUSED:
                raise VMStateError(f"cannot resume VM {name!r}: it is {vm.state.value}, not paused")
            vm.state = VMState.RUNNING
            self._publish(vm, VMEventType.RESUMED)

        return self._change(name, "resume", resume)

    def reset(self, name: str) -> Deferred[None]:
        def reset(vm: FakeVM) -> None:
            self._live(name, "reset")
            vm.memory.clear()
            self._publish(vm, VMEventType.RESET)

        return self._change(name, "reset", reset)

    def save_state(self, name: str) -> Deferred[None]:
        def save(vm: FakeVM) -> None:
            require_capability(
                self, Capability.SAVE_STATE, "this fake plays a product that cannot save a VM's state"
            )
            self._live(name, "save the state of")
            vm.saved_memory = dict(vm.memory)
            self._stop(vm, VMState.SAVED, VMEventType.SAVED)

        return self._change(name, "save the state of", save)

    def state(self, name: str) -> Deferred[VMState]:
        return self._run(lambda: self.vm(name).state)

    def subscribe(self, callback: Callable[[VMEvent], object], name: str | None = None) -> ISubscription:
        return self._hub.subscribe(callback, name)

    def wait_for_state(self, name: str, state: VMState, timeout: float = 60.0) -> Deferred[None]:
        return self._defer(
            self._hub.wait_for_state(self._clock, name, state, timeout, lambda: self.state(name))
        )

    def snapshot_create(self, name: str, snapshot_name: str, description: str = "") -> Deferred[SnapshotInfo]:
        def create(vm: FakeVM) -> SnapshotInfo:
            if vm.state in _LIVE:
                require_capability(
                    self,
                    Capability.LIVE_SNAPSHOTS,
                    "this fake plays a product without snapshots of a running VM",
                )
            else:
                require_capability(self, Capability.SNAPSHOTS, "this fake plays a product without snapshots")
            if snapshot_name in vm.snapshots:
                raise HypervisorError(f"VM {name!r} has a snapshot named {snapshot_name!r} already")
            info = SnapshotInfo(
                snapshot_name, description, datetime.now(UTC), vm.state, parent=vm.current_snapshot
            )
            memory = dict(vm.memory) if vm.state in _LIVE else None
            vm.snapshots[snapshot_name] = _Snapshot(info, dict(vm.disk), memory)
            vm.current_snapshot = snapshot_name
            return self._described(vm, snapshot_name)

        return self._change(name, "snapshot", create)

    def _described(self, vm: FakeVM, snapshot_name: str) -> SnapshotInfo:
        return replace(vm.snapshots[snapshot_name].info, current=snapshot_name == vm.current_snapshot)

    def _snapshot(self, vm: FakeVM, snapshot_name: str) -> _Snapshot:
        try:
            return vm.snapshots[snapshot_name]
        except KeyError:
            raise SnapshotNotFound(
                f"VM {vm.spec.name!r} has no snapshot named {snapshot_name!r} (it has {sorted(vm.snapshots)})"
            ) from None

    def snapshot_list(self, name: str) -> Deferred[list[SnapshotInfo]]:
        def snapshots() -> list[SnapshotInfo]:
            vm = self.vm(name)
            return [self._described(vm, s) for s in vm.snapshots]

        return self._run(snapshots)

    def snapshot_revert(self, name: str, snapshot_name: str) -> Deferred[None]:
        def revert(vm: FakeVM) -> None:
            snapshot = self._snapshot(vm, snapshot_name)
            was = vm.state
            vm.disk = dict(snapshot.disk)
            vm.current_snapshot = snapshot_name
            vm.saved_memory = None
            if snapshot.memory is not None:
                vm.memory = dict(snapshot.memory)
                vm.state = snapshot.info.state
                if was not in _LIVE:
                    self._publish(vm, VMEventType.RESTORED, "snapshot")
                elif vm.state is VMState.PAUSED and was is not VMState.PAUSED:
                    self._publish(vm, VMEventType.PAUSED, "snapshot")
            elif was is not VMState.SHUTOFF:
                self._stop(vm, VMState.SHUTOFF, VMEventType.SHUTOFF, "snapshot")

        return self._change(name, "revert", revert)

    def snapshot_delete(self, name: str, snapshot_name: str) -> Deferred[None]:
        def delete(vm: FakeVM) -> None:
            snapshot = self._snapshot(vm, snapshot_name)
            parent = snapshot.info.parent
            del vm.snapshots[snapshot_name]
            # Its children now hang off its parent, as in every hypervisor here.
            for child in vm.snapshots.values():
                if child.info.parent == snapshot_name:
                    child.info = replace(child.info, parent=parent)
            if vm.current_snapshot == snapshot_name:
                vm.current_snapshot = parent

        return self._change(name, "delete a snapshot of", delete)

    def undefine(self, name: str) -> Deferred[None]:
        def undefine(vm: FakeVM) -> None:
            if vm.state in _LIVE:
                self._stop(vm, VMState.SHUTOFF, VMEventType.SHUTOFF, "undefine")
            del self._vms[name]
            self._hub.publish(VMEvent(name, VMEventType.UNDEFINED, VMState.NOSTATE))

        return self._change(name, "undefine", undefine)

    def list_vms(self) -> Deferred[list[str]]:
        return self._run(lambda: sorted(self._vms))

    def agent_credentials(self, name: str) -> Deferred[Credentials]:
        return self._run(lambda: self.vm(name).credentials[0])

    def agent_endpoint(
        self, name: str, transport: AgentTransport = "auto"
    ) -> Deferred[IStreamClientEndpoint]:
        def endpoint() -> IStreamClientEndpoint:
            vm = self._live(name, "reach the agent of")
            spec = vm.spec
            chosen = spec.agent_transport if transport == "auto" else transport
            if chosen == "auto":
                chosen = "virtio-serial"
            needed = {
                "virtio-serial": Capability.VIRTIO_SERIAL,
                "serial": Capability.SERIAL_PORTS,
                "tcp": Capability.PORT_FORWARD,
            }[chosen]
            require_capability(self, needed, f"this fake plays a product without a {chosen} channel")
            if (chosen == "serial" and not spec.serial_ports) or (chosen == "tcp" and not spec.nat_network):
                raise HypervisorError(f"VM {name!r} has no {chosen} channel: add one to its VMSpec")
            operations = self._agent_operations or {"ping": _fake_ping}
            return _InMemoryAgentEndpoint(self._clock, operations, name, vm.credentials[1])

        return self._run(endpoint)

    def forward_port(
        self, name: str, guest_port: int, guest_address: str = NAT_GUEST_ADDRESS
    ) -> Deferred[int]:
        def forward() -> int:
            require_capability(
                self, Capability.PORT_FORWARD, "this fake plays a product without NAT forwards"
            )
            vm = self._live(name, "forward a port to")
            if not vm.spec.nat_network:
                raise HypervisorError(
                    f"VM {name!r} has no NAT network card: set nat_network=True in its VMSpec"
                )
            host_port = next(self._ports)
            vm.forwards[host_port] = guest_port
            return host_port

        return self._run(forward)

    def stopService(self) -> Deferred[None]:
        self._hub.close()
        return super().stopService() or succeed(None)


def _fake_ping(ctx: OperationContext) -> dict[str, Any]:
    return {"time": ctx.reactor.seconds(), "version": "fake"}
