"""
The VirtualBox hypervisor driver: one driver over two backends, pyvbox (VirtualBox's COM API,
pushed events) where VirtualBox's ``vboxapi`` bindings can be imported, else VBoxManage (as
BOINC's vboxwrapper drives VirtualBox on Linux and macOS, states polled).

Each VM lives in ``<state_dir>/<name>/``: its settings file, its differencing disk over the
shared base (in ``Snapshots/``), and the host sockets of its serial ports
(``serial-<port>.sock``, VirtualBox's host-pipe mode, a unix socket on Linux and macOS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from guest_agent.credentials import VBOX_PROPERTY
from guest_agent.protocol.tls import Credentials
from hypervisors.base import EventHub, PerVMQueue, StatePoller, event_for_transition, require_capability
from hypervisors.interface import (
    DEFAULT_AGENT_TCP_PORT,
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
from hypervisors.virtualbox._backend import SPEC_KEY, Backend, ConsoleAction, MachineInfo
from hypervisors.virtualbox._parsing import SnapshotRecord
from hypervisors.virtualbox._pyvbox import PyvboxBackend, vboxapi_importable
from hypervisors.virtualbox._vboxmanage import VBoxManageBackend, find_vboxmanage
from vmcontroller.credentials import CredentialStore
from vmcontroller.errors import (
    HypervisorError,
    HypervisorUnavailable,
    SnapshotNotFound,
    VMAlreadyExists,
    VMNotFound,
    VMStateError,
)

__all__ = ["BACKEND_ENV", "DEFAULT_STATE_DIR", "VirtualBoxDriver", "choose_backend"]

T = TypeVar("T")
BackendName = Literal["auto", "pyvbox", "vboxmanage"]

DEFAULT_STATE_DIR = Path("~/.local/share/vmcontroller/virtualbox").expanduser()
#: Overrides the constructor's ``backend="auto"``.
BACKEND_ENV = "VMCONTROLLER_VBOX_BACKEND"
_MAX_SOCKET_PATH = 107
#: How the agent's credentials are set as a guest property (GuestPropertySvc.h): the guest
#: may erase it (no RDONLYGUEST), and it is gone at power off and at reset (TRANSRESET, which
#: implies TRANSIENT: never written to the machine's settings file).
CREDENTIALS_PROPERTY_FLAGS = "TRANSRESET"
_ACTIVE = (VMState.RUNNING, VMState.PAUSED, VMState.BLOCKED, VMState.SHUTDOWN)
_INSTALL_HINT = (
    "install VirtualBox (https://www.virtualbox.org/wiki/Downloads), which brings VBoxManage and the "
    "vboxapi bindings pyvbox needs, or give the path of VBoxManage (vboxmanage=...)"
)


def choose_backend(
    requested: str, *, environ: dict[str, str] | os._Environ[str], pyvbox_ok: bool, vboxmanage: str | None
) -> tuple[Literal["pyvbox", "vboxmanage"] | None, str]:
    """
    Decide the backend: ``requested`` unless it is ``"auto"``, then the
    :data:`BACKEND_ENV` variable, then pyvbox if ``vboxapi`` imports, else VBoxManage if found.

    :return: the backend (``None`` if VirtualBox is missing) and why, for the log.
    :raises ValueError: an unknown backend name.
    """
    source = "the constructor"
    if requested == "auto":
        requested, source = environ.get(BACKEND_ENV, "auto").strip().lower() or "auto", BACKEND_ENV
    if requested not in ("auto", "pyvbox", "vboxmanage"):
        raise ValueError(f"backend={requested!r} (from {source}): use 'auto', 'pyvbox' or 'vboxmanage'")
    if requested == "pyvbox":
        return "pyvbox", f"asked by {source}"
    if requested == "vboxmanage":
        return "vboxmanage", f"asked by {source}"
    if pyvbox_ok:
        return "pyvbox", "VirtualBox's vboxapi bindings import"
    if vboxmanage is not None:
        return "vboxmanage", f"vboxapi cannot be imported; {vboxmanage} found"
    return None, "neither vboxapi nor VBoxManage found"


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@implementer(IHypervisorDriver)
class VirtualBoxDriver(Service):
    """
    Controls VirtualBox VMs.

    :param reactor: the reactor (threads, time and processes).
    :param backend: ``"pyvbox"``, ``"vboxmanage"`` or ``"auto"`` (see :func:`choose_backend`);
        the choice is logged when the driver starts.
    :param vboxmanage: the VBoxManage executable (default: on PATH or where VirtualBox puts it).
    :param vbox_user_home: VirtualBox's home for VBoxManage (``VBOX_USER_HOME``); by default the
        user's.
    :param state_dir: where each VM's folder goes.
    :param poll_interval: seconds between state polls of the VBoxManage backend.
    """

    name = "virtualbox"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        backend: BackendName = "auto",
        *,
        vboxmanage: str | None = None,
        vbox_user_home: str | None = None,
        state_dir: Path | str = DEFAULT_STATE_DIR,
        poll_interval: float = 1.0,
        credentials_dir: Path | str | None = None,
    ) -> None:
        self._reactor = reactor
        self.state_dir = Path(state_dir)
        # Minted at define, removed at undefine; the agent's end goes into the guest property
        # the agent reads (guest_agent.credentials.VBOX_PROPERTY) before each boot.
        self.credentials = CredentialStore(credentials_dir or self.state_dir / ".credentials")
        executable = find_vboxmanage(vboxmanage)
        chosen, self.backend_reason = choose_backend(
            backend,
            environ=os.environ,
            pyvbox_ok=backend in ("auto", "pyvbox") and vboxapi_importable(),
            vboxmanage=executable,
        )
        self._backend: Backend | None
        if chosen == "pyvbox":
            self._backend = PyvboxBackend(reactor)
        elif chosen == "vboxmanage" and executable is not None:
            self._backend = VBoxManageBackend(reactor, executable, vbox_user_home)
        else:
            if chosen == "vboxmanage":
                chosen, self.backend_reason = None, f"VBoxManage not found ({vboxmanage or 'not on PATH'})"
            self._backend = None
        self.backend_name = chosen
        capabilities = {
            Capability.SNAPSHOTS,
            Capability.LIVE_SNAPSHOTS,
            Capability.SAVE_STATE,
            Capability.SERIAL_PORTS,
            Capability.PORT_FORWARD,
            Capability.CPU_CAP,
            Capability.PAUSE,
        }
        if self._backend is not None and self._backend.pushes_events:
            capabilities.add(Capability.PUSHED_EVENTS)
            self._hub = EventHub(self._watch, self._unwatch)
            self._poller: StatePoller | None = None
        else:
            self._poller = StatePoller(reactor, self._poll_states, poll_interval)
            self._hub = self._poller.hub
        self.capabilities = frozenset(capabilities)
        self._queue = PerVMQueue()
        self._known: dict[str, VMState] = {}
        self._host_stopping: set[str] = set()
        self._stop_watching: Callable[[], None] | None = None
        self._started: Deferred[Any] | None = None

    # -- service --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "VirtualBox driver: {backend} backend ({reason})",
            backend=self.backend_name or "no",
            reason=self.backend_reason,
        )
        if self._backend is not None:
            # A failure here is raised by every operation (see _ready); keep it as a value.
            self._started = Deferred.fromCoroutine(self._backend.start())
            self._started.addErrback(self._start_failed)

    def _start_failed(self, failure: Failure) -> BaseException:
        self.log.failure(
            "VirtualBox driver: the {backend} backend did not start", failure, backend=self.backend_name
        )
        value = failure.value
        assert value is not None
        return value

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._hub.close()

        async def stop() -> None:
            if self._backend is not None:
                await self._backend.stop()

        return Deferred.fromCoroutine(stop())

    # -- plumbing -------------------------------------------------------------------------

    async def _ready(self, action: str) -> Backend:
        if not self.running:
            raise HypervisorError(
                f"cannot {action}: the virtualbox driver is not started; call startService() or add it "
                "to a running MultiService"
            )
        if self._backend is None:
            raise HypervisorUnavailable(
                f"cannot {action}: VirtualBox is not installed here ({self.backend_reason}); {_INSTALL_HINT}"
            )
        assert self._started is not None
        # A fresh Deferred per waiter, chained on the start: each sees its outcome.
        outcome: Deferred[Exception | None] = Deferred()

        def relay(result: Exception | None) -> Exception | None:
            outcome.callback(result)
            return result

        self._started.addCallback(relay)
        failure = await outcome
        if failure is not None:
            raise failure
        return self._backend

    def _run(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        return Deferred.fromCoroutine(coro)

    async def _exclusive(self, vm: str, body: Callable[[], Coroutine[Any, Any, T]]) -> T:
        # One state change per VM at a time, in call order: VirtualBox fails a second session
        # lock instead of queueing it.
        return await self._queue.run(vm, body)

    async def _ours(self, name: str, action: str) -> tuple[Backend, MachineInfo]:
        backend = await self._ready(f"{action} {name!r}")
        info = await backend.machine(name)
        if not info.ours:
            raise VMNotFound(
                f"cannot {action} {name!r}: VirtualBox has a VM of that name, but vmcontroller did not "
                "define "
                "it; see list_vms() for the VMs of this driver"
            )
        return backend, info

    @staticmethod
    def _require(info: MachineInfo, states: tuple[VMState, ...], action: str, hint: str) -> None:
        if info.state not in states:
            raise VMStateError(
                f"cannot {action} VM {info.name!r}: it is {info.state.value} (VirtualBox: "
                f"{info.raw_state}); {hint}"
            )

    def _spec_from(self, text: str, name: str) -> VMSpec:
        try:
            fields = json.loads(text)
            fields["serial_ports"] = tuple(fields.get("serial_ports", ()))
            fields["extra_channels"] = tuple(fields.get("extra_channels", ()))
            return VMSpec(**fields)
        except (ValueError, TypeError) as e:
            raise HypervisorError(
                f"VM {name!r} has an unreadable {SPEC_KEY} extra-data entry ({e}); undefine it"
            ) from e

    def _serial_path(self, name: str, port: str) -> str:
        # In the machine's folder, which VirtualBox makes at define (<state_dir>/<name>).
        return str(self.state_dir / name / f"serial-{port}.sock")

    # -- IHypervisorDriver ----------------------------------------------------------------

    def define(self, spec: VMSpec) -> Deferred[str]:
        return self._run(self._exclusive(spec.name, lambda: self._define(spec)))

    async def _define(self, spec: VMSpec) -> str:
        backend = await self._ready(f"define VM {spec.name!r}")
        try:
            await backend.machine(spec.name)
        except VMNotFound:
            pass
        else:
            raise VMAlreadyExists(
                f"cannot define VM {spec.name!r}: VirtualBox has a VM of that name already; undefine it "
                "first or "
                "choose another name"
            )
        if not os.path.isfile(spec.disk):
            raise HypervisorError(
                f"cannot define VM {spec.name!r}: its disk {spec.disk} does not exist; build the image first"
            )
        if spec.kernel is not None:
            self.log.warn(
                "VM {vm}: VirtualBox has no direct kernel boot; it boots from its disk, kernel and "
                "cmdline are ignored",
                vm=spec.name,
            )
        serial_paths = [self._serial_path(spec.name, port) for port in spec.serial_ports]
        for path in serial_paths:
            if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
                raise HypervisorError(
                    f"cannot define VM {spec.name!r}: its serial socket {path} is longer than a unix "
                    "socket path may "
                    f"be ({_MAX_SOCKET_PATH} bytes); use a shorter VM name, port name or state directory"
                )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        spec_json = json.dumps(dataclasses.asdict(spec))
        try:
            self.credentials.create(spec.name)
            await backend.create(spec, str(self.state_dir), serial_paths, spec_json)
        except BaseException:
            # Half made: leave nothing behind that would take the name.
            with contextlib.suppress(HypervisorError):
                await backend.unregister(spec.name)
            self.credentials.remove(spec.name)
            raise
        self.log.info(
            "Defined VM {vm} ({backend}, {memory} MiB)",
            vm=spec.name,
            backend=backend.name,
            memory=spec.memory_mib,
        )
        return spec.name

    def start(self, name: str) -> Deferred[None]:
        async def go() -> None:
            backend, info = await self._ours(name, "start")
            self._require(info, (VMState.SHUTOFF, VMState.SAVED, VMState.CRASHED), "start", "it runs already")
            if info.state is not VMState.SAVED:  # a restored guest's agent holds them already
                await self._provision(backend, name)
            await backend.launch(name)
            self.log.info("Started {vm}", vm=name)

        return self._run(self._exclusive(name, go))

    def _console(
        self,
        name: str,
        action: ConsoleAction,
        states: tuple[VMState, ...],
        what: str,
        hint: str,
        capability: Capability | None = None,
        then: Callable[[Backend, str], Awaitable[None]] | None = None,
    ) -> Deferred[None]:
        async def go() -> None:
            if capability is not None:
                require_capability(self, capability, f"this VirtualBox cannot {what} a VM")
            backend, info = await self._ours(name, what)
            self._require(info, states, what, hint)
            if action in ("poweroff", "acpipowerbutton"):
                self._host_stopping.add(name)
            await backend.console(name, action)
            if then is not None:
                await then(backend, name)
            self.log.info("{action} {vm}: done", action=what, vm=name)

        return self._run(self._exclusive(name, go))

    def shutdown(self, name: str, wait: bool = True, timeout: float = 120.0) -> Deferred[None]:
        async def go() -> None:
            await self._console(
                name, "acpipowerbutton", (VMState.RUNNING,), "shut down", "start or resume it first"
            )
            if wait:
                await self._wait_for_state(
                    name, VMState.SHUTOFF, timeout, "the guest may ignore ACPI: use power_off()"
                )

        return self._run(go())

    def power_off(self, name: str) -> Deferred[None]:
        return self._console(name, "poweroff", _ACTIVE, "power off", "it is not running")

    def pause(self, name: str) -> Deferred[None]:
        return self._console(
            name, "pause", (VMState.RUNNING,), "pause", "only a running VM pauses", Capability.PAUSE
        )

    def resume(self, name: str) -> Deferred[None]:
        return self._console(
            name, "resume", (VMState.PAUSED,), "resume", "only a paused VM resumes", Capability.PAUSE
        )

    def reset(self, name: str) -> Deferred[None]:
        # The reset takes the property away (TRANSRESET), and the agent's copy in /run with the
        # guest's memory: the guest that boots again reads it anew.
        return self._console(
            name, "reset", (VMState.RUNNING,), "reset", "start or resume it first", then=self._provision
        )

    async def _provision(self, backend: Backend, name: str) -> None:
        """
        Put the agent's end in the guest property the agent reads, with the flags that let the
        guest erase it (no RDONLYGUEST) and that keep it out of the machine's settings file and
        take it away at power off or reset (TRANSRESET, which implies TRANSIENT).
        """
        agent_end = self.credentials.agent_credentials(name).to_json().decode()
        await backend.set_guest_property(name, VBOX_PROPERTY, agent_end, CREDENTIALS_PROPERTY_FLAGS)

    def save_state(self, name: str) -> Deferred[None]:
        return self._console(
            name, "savestate", (VMState.RUNNING, VMState.PAUSED), "save the state of", "start it first"
        )

    def state(self, name: str) -> Deferred[VMState]:
        return self._run(self._state(name))

    async def _state(self, name: str) -> VMState:
        return (await self._ours(name, "get the state of"))[1].state

    def subscribe(self, callback: Callable[[VMEvent], object], name: str | None = None) -> ISubscription:
        return self._hub.subscribe(callback, name)

    def wait_for_state(self, name: str, state: VMState, timeout: float = 60.0) -> Deferred[None]:
        return self._run(self._wait_for_state(name, state, timeout))

    async def _wait_for_state(self, name: str, state: VMState, timeout: float, hint: str = "") -> None:
        if self._poller is not None:
            await self._poller.wait_for_state(name, state, timeout, lambda: self._state(name), hint)
        else:
            await self._hub.wait_for_state(
                self._reactor, name, state, timeout, lambda: self._state(name), hint
            )

    # -- events -----------------------------------------------------------------------------

    async def _poll_states(self) -> dict[str, VMState]:
        backend = await self._ready("poll the VMs' states")
        return {info.name: info.state for info in await backend.machines() if info.ours}

    def _watch(self) -> None:
        if self._backend is None or not self.running:
            return

        async def begin() -> None:
            backend = await self._ready("listen to VirtualBox's events")
            self._known = {i.name: i.state for i in await backend.machines() if i.ours}
            self._stop_watching = backend.watch(self._pushed)

        Deferred.fromCoroutine(begin()).addErrback(
            lambda f: self.log.failure("Cannot listen to VirtualBox's events", f)
        )

    def _unwatch(self) -> None:
        if self._stop_watching is not None:
            self._stop_watching()
            self._stop_watching = None

    def _pushed(self, vm: str, state: VMState) -> None:
        before = self._known.get(vm)
        after = None if state is VMState.NOSTATE else state
        if after is None:
            self._known.pop(vm, None)
        else:
            self._known[vm] = after
        kind = event_for_transition(before, after)
        if before is None and after not in (None, VMState.SHUTOFF):
            # Defined and started before its first event reached us (the listener comes up
            # after the subscription): report both, not a VM that was born running.
            self._hub.publish(VMEvent(vm, VMEventType.DEFINED, VMState.SHUTOFF, "VirtualBox event"))
            kind = event_for_transition(VMState.SHUTOFF, after)
        if kind is VMEventType.SHUTOFF and vm not in self._host_stopping:
            kind = VMEventType.GUEST_SHUTDOWN
        if after in (VMState.SHUTOFF, VMState.CRASHED, VMState.SAVED, None):
            self._host_stopping.discard(vm)
        if kind is not None:
            self._hub.publish(VMEvent(vm, kind, state, "VirtualBox event"))

    # -- snapshots --------------------------------------------------------------------------

    def _snapshot_info(self, record: SnapshotRecord, names: dict[str, str]) -> SnapshotInfo:
        return SnapshotInfo(
            name=record.name,
            description=record.description,
            created=record.created or datetime.fromtimestamp(0, tz=UTC),
            state=VMState.RUNNING if record.online else VMState.SHUTOFF,
            parent=names.get(record.parent_id) if record.parent_id else None,
            current=record.current,
        )

    async def _snapshots(self, backend: Backend, name: str) -> list[SnapshotInfo]:
        records = await backend.snapshots(name)
        names = {r.id: r.name for r in records}
        infos = [self._snapshot_info(r, names) for r in records]
        return sorted(infos, key=lambda i: (i.created, i.name))

    async def _find_snapshot(self, backend: Backend, name: str, snapshot: str, action: str) -> SnapshotRecord:
        for record in await backend.snapshots(name):
            if record.name == snapshot:
                return record
        raise SnapshotNotFound(
            f"cannot {action}: VM {name!r} has no snapshot {snapshot!r}; see snapshot_list()"
        )

    def snapshot_create(self, name: str, snapshot_name: str, description: str = "") -> Deferred[SnapshotInfo]:
        async def go() -> SnapshotInfo:
            action = f"take snapshot {snapshot_name!r} of"
            backend, info = await self._ours(name, action)
            require_capability(
                self, Capability.LIVE_SNAPSHOTS if info.state in _ACTIVE else Capability.SNAPSHOTS, ""
            )
            if any(r.name == snapshot_name for r in await backend.snapshots(name)):
                raise HypervisorError(
                    f"cannot {action} VM {name!r}: it has a snapshot of that name already; delete it "
                    "first or choose "
                    "another name"
                )
            snapshot_id = await backend.take_snapshot(name, snapshot_name, description)
            self.log.info("Took snapshot {snapshot} of {vm}", snapshot=snapshot_name, vm=name)
            for snapshot in await self._snapshots(backend, name):
                if snapshot.name == snapshot_name:
                    return snapshot
            raise HypervisorError(
                f"snapshot {snapshot_name!r} ({snapshot_id}) of VM {name!r} vanished as it was taken"
            )

        return self._run(self._exclusive(name, go))

    def snapshot_list(self, name: str) -> Deferred[list[SnapshotInfo]]:
        async def go() -> list[SnapshotInfo]:
            backend, _ = await self._ours(name, "list the snapshots of")
            return await self._snapshots(backend, name)

        return self._run(go())

    def snapshot_revert(self, name: str, snapshot_name: str) -> Deferred[None]:
        async def go() -> None:
            action = f"revert to snapshot {snapshot_name!r} of"
            backend, info = await self._ours(name, action)
            record = await self._find_snapshot(backend, name, snapshot_name, f"{action} {name!r}")
            # VirtualBox restores only a VM that does not run (IMachine::restoreSnapshot).
            if info.state in _ACTIVE:
                self._host_stopping.add(name)
                await backend.console(name, "poweroff")
            await backend.restore_snapshot(name, record.id)
            # An online snapshot leaves the VM Saved: start it to be where the snapshot was.
            if record.online:
                await backend.launch(name)
            self.log.info("Reverted {vm} to {snapshot}", vm=name, snapshot=snapshot_name)

        return self._run(self._exclusive(name, go))

    def snapshot_delete(self, name: str, snapshot_name: str) -> Deferred[None]:
        async def go() -> None:
            action = f"delete snapshot {snapshot_name!r} of"
            backend, _ = await self._ours(name, action)
            records = await backend.snapshots(name)
            record = await self._find_snapshot(backend, name, snapshot_name, f"{action} {name!r}")
            children = [r.name for r in records if r.parent_id == record.id]
            if len(children) > 1:
                # VirtualBox merges a snapshot into its one child; with more it refuses.
                raise HypervisorError(
                    f"cannot {action} {name!r}: VirtualBox deletes only a snapshot with at most one child, "
                    f"and it has {len(children)} ({', '.join(children)}); delete all but one of them first"
                )
            await backend.delete_snapshot(name, record.id)
            self.log.info("Deleted snapshot {snapshot} of {vm}", snapshot=snapshot_name, vm=name)

        return self._run(self._exclusive(name, go))

    def undefine(self, name: str) -> Deferred[None]:
        async def go() -> None:
            backend, info = await self._ours(name, "undefine")
            if info.state in _ACTIVE:
                self._host_stopping.add(name)
                await backend.console(name, "poweroff")
            await backend.unregister(name)
            self.credentials.remove(name)
            self.log.info("Undefined VM {vm}", vm=name)

        return self._run(self._exclusive(name, go))

    def agent_credentials(self, name: str) -> Deferred[Credentials]:
        async def go() -> Credentials:
            await self._ours(name, "read the credentials of")
            return self.credentials.host_credentials(name)

        return self._run(go())

    def rotate_credentials(self, name: str) -> Deferred[None]:
        """
        Mint new credentials for VM ``name``; the old ones stop working at once. The guest gets
        the new ones at its next start or :meth:`reset` (no image to rebuild: they come in
        through the guest property).
        """

        async def go() -> None:
            await self._ours(name, "rotate the credentials of")
            self.credentials.rotate(name)
            self.log.info("Rotated the credentials of {vm}", vm=name)

        return self._run(self._exclusive(name, go))

    def list_vms(self) -> Deferred[list[str]]:
        async def go() -> list[str]:
            backend = await self._ready("list the VMs")
            return sorted(info.name for info in await backend.machines() if info.ours)

        return self._run(go())

    # -- the agent's channels ---------------------------------------------------------------

    async def _running_spec(self, name: str, consequence: str) -> tuple[Backend, MachineInfo, VMSpec]:
        backend, info = await self._ours(name, "reach")
        if info.state not in _ACTIVE:
            raise VMStateError(f"VM {name!r} is not running, so {consequence}; start it first")
        return backend, info, self._spec_from(await backend.extra_data(name, SPEC_KEY), name)

    def serial_socket_path(self, name: str, port: str) -> Deferred[str]:
        """The host socket (VirtualBox's host pipe) of serial port ``port`` of a running VM."""

        async def go() -> str:
            _, _, spec = await self._running_spec(name, f"its serial port {port!r} has no socket")
            if port not in spec.serial_ports:
                raise HypervisorError(
                    f"VM {name!r} has no serial port named {port!r} (it has {spec.serial_ports!r})"
                )
            return self._serial_path(name, port)

        return self._run(go())

    def forward_port(
        self, name: str, guest_port: int, guest_address: str = NAT_GUEST_ADDRESS
    ) -> Deferred[int]:
        if isinstance(guest_port, bool) or not isinstance(guest_port, int) or not 0 < guest_port < 65536:
            raise ValueError(f"guest_port={guest_port!r}: give a TCP port, 1 to 65535")

        async def go() -> int:
            backend, _, spec = await self._running_spec(name, "it has no network to forward a port to")
            if not spec.nat_network:
                raise HypervisorError(
                    f"VM {name!r} has no NAT network card to forward a port to; define it with "
                    "VMSpec(nat_network=True)"
                )
            host_port = _free_loopback_port()
            await backend.add_port_forward(
                name, f"vmc-{guest_port}-{host_port}", host_port, guest_address, guest_port
            )
            return host_port

        return self._run(self._exclusive(name, go))

    def agent_endpoint(
        self, name: str, transport: AgentTransport = "auto"
    ) -> Deferred[IStreamClientEndpoint]:
        async def go() -> IStreamClientEndpoint:
            backend, _, spec = await self._running_spec(name, "its agent has no channel")
            chosen = spec.agent_transport if transport == "auto" else transport
            if chosen == "auto":
                chosen = "serial" if spec.serial_ports else "tcp" if spec.nat_network else "virtio-serial"
            if chosen == "virtio-serial":
                require_capability(
                    self,
                    Capability.VIRTIO_SERIAL,
                    "VirtualBox has no virtio-serial ports; use a serial port (VMSpec.serial_ports) or "
                    "TCP (nat_network)",
                )
            if chosen == "serial":
                if not spec.serial_ports:
                    raise HypervisorError(
                        f"VM {name!r} has no serial port for the agent; define it with VMSpec.serial_ports"
                    )
                return UNIXClientEndpoint(self._reactor, self._serial_path(name, spec.serial_ports[0]))
            # NAT rules stay in the VM's settings: reuse the agent's rule rather than add one per call.
            existing = [
                f
                for f in await backend.port_forwards(name)
                if f.guest_port == DEFAULT_AGENT_TCP_PORT and f.guest_ip in ("", NAT_GUEST_ADDRESS)
            ]
            port = (
                existing[0].host_port if existing else await self.forward_port(name, DEFAULT_AGENT_TCP_PORT)
            )
            return TCP4ClientEndpoint(self._reactor, "127.0.0.1", port)

        return self._run(go())
