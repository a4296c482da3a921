"""
The VMware driver: Workstation, Fusion and Workstation Player through ``vmrun``.

Each VM has a directory ``<state_dir>/<name>/`` with its ``<name>.vmx``, its writable disk
``<name>.vmdk`` (a VMDK delta disk whose parent is a VMDK copy of the shared qcow2 base, made
once per base in ``<state_dir>/.bases/``; the base is never written), its console log, the
unix sockets of its serial ports, and ``vmcontroller.json`` with what vmrun cannot tell
(snapshot descriptions and times, the agent transport). VMware keeps its own files there too
(``.vmss`` suspended state, ``.vmsd``/``.vmsn`` snapshots, ``vmware.log``).

vmrun has no state command. As HashiCorp's vagrant-vmware-desktop does (``read_state`` in
``lib/vagrant-vmware-desktop/driver/base.rb``): a VM listed by ``vmrun list`` runs; one that
is not but has a suspended state (``checkpoint.vmState`` in its ``.vmx``, or a ``.vmss``
file) is :attr:`~hypervisors.interface.VMState.SAVED`; otherwise it is shut off. Paused is
what this driver did (``vmrun pause``), as vmrun cannot tell it either.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet import utils
from twisted.internet.defer import Deferred, DeferredLock, TimeoutError, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from guest_agent.credentials import VMWARE_VARIABLE
from guest_agent.protocol.tls import Credentials
from hypervisors.base import PerVMQueue, StatePoller, require_capability
from hypervisors.interface import (
    NAT_GUEST_ADDRESS,
    AgentTransport,
    Capability,
    IHypervisorDriver,
    ISubscription,
    SnapshotInfo,
    VMEvent,
    VMSpec,
    VMState,
)
from hypervisors.vmware._vmrun import PRODUCTS, Product, Vmrun, find_vmrun, parse_list, parse_snapshot_tree
from hypervisors.vmware.vmx import is_suspended, parse_vmx, render_vmx, serial_socket_name, vmx_entries
from vmcontroller.credentials import CredentialStore
from vmcontroller.errors import (
    CapabilityUnsupported,
    HypervisorError,
    VMAlreadyExists,
    VMNotFound,
    VMStateError,
    VMTimeout,
)

__all__ = ["DEFAULT_STATE_DIR", "VMwareDriver", "suspended_on_disk", "vm_state"]

T = TypeVar("T")

#: The guestinfo variable (without ``guestinfo.``) the agent reads its credentials from.
CREDENTIALS_GUESTINFO = VMWARE_VARIABLE.removeprefix("guestinfo.")

DEFAULT_STATE_DIR = (
    Path("/var/lib/vmcontroller/vmware")
    if os.geteuid() == 0
    else Path.home() / ".local" / "share" / "vmcontroller" / "vmware"
)

_METADATA = "vmcontroller.json"

_NO_PAUSE_ON_PLAYER = (
    "VMware Workstation Player cannot pause or unpause through vmrun (VMware's 'Getting Started "
    "with the VIX API for VMware Player' lists VixVM_Pause and VixVM_Unpause as not supported in "
    "Player); use Workstation Pro or Fusion (product='ws' or 'fusion')"
)
_NO_SNAPSHOTS_ON_PLAYER = (
    "VMware Workstation Player cannot take, revert or delete snapshots through vmrun (VMware's "
    "'Getting Started with the VIX API for VMware Player' lists the snapshot functions as not "
    "supported in Player); use Workstation Pro or Fusion (product='ws' or 'fusion')"
)
_NO_PORT_FORWARD = (
    "VMware's NAT port forwards are host-wide, in the NAT service's nat.conf ([incomingtcp]), "
    "which needs root and a restart of the vmnet services, and vmrun cannot set them per VM "
    "(vagrant-vmware-desktop runs a privileged helper service to edit nat.conf); reach the agent "
    "over a serial port instead (VMSpec.serial_ports, agent_transport='serial')"
)


def vm_state(*, listed: bool, paused: bool, suspended: bool) -> VMState:
    """
    A VM's state from what can be seen of it: whether ``vmrun list`` lists it, whether this
    driver paused it, and whether its files hold a suspended state (:func:`suspended_on_disk`).
    """
    if listed:
        return VMState.PAUSED if paused else VMState.RUNNING
    return VMState.SAVED if suspended else VMState.SHUTOFF


def suspended_on_disk(vmx: Path) -> bool:
    """
    Whether VM ``vmx`` has a suspended state: its ``checkpoint.vmState`` names one, or a
    ``.vmss`` file lies beside it (vagrant-vmware-desktop's test).
    """
    try:
        entries = parse_vmx(vmx.read_text())
    except OSError:
        entries = {}
    return is_suspended(entries) or any(vmx.parent.glob("*.vmss"))


@implementer(IHypervisorDriver)
class VMwareDriver(Service):
    """
    Controls VMware VMs with ``vmrun``, run through ``reactor.spawnProcess``.

    A :class:`~twisted.application.service.Service`: start it before use. It reports events by
    polling (``vmrun list`` and the VMs' files) while anyone subscribes.

    :param reactor: provides process spawning and time.
    :param product: vmrun's ``-T``: ``"ws"`` (Workstation Pro), ``"fusion"`` or ``"player"``
        (Workstation Player, which lacks snapshots and pause).
    :param vmrun: path of vmrun; by default found on PATH or where VMware installs it.
    :param state_dir: where each VM's directory goes.
    :param qemu_img: path of ``qemu-img``, which converts the qcow2 base to a VMDK once and
        makes each VM's delta disk; by default found on PATH.
    :param poll_interval: seconds between state polls while anyone subscribes.
    :param vmrun_timeout: seconds after which a hung vmrun is killed.
    :param credentials_dir: where each VM's credentials are kept (a
        :class:`~vmcontroller.credentials.CredentialStore`, root only); by default
        ``.credentials`` in ``state_dir``.
    """

    name = "vmware"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        product: Product = "ws",
        vmrun: str | None = None,
        state_dir: Path | str = DEFAULT_STATE_DIR,
        qemu_img: str | None = None,
        poll_interval: float = 1.0,
        vmrun_timeout: float = 300.0,
        credentials_dir: Path | str | None = None,
    ) -> None:
        if product not in PRODUCTS:
            raise ValueError(f"product={product!r}: use 'ws' (Workstation Pro), 'fusion' or 'player'")
        self._reactor = reactor
        self.product: Product = product
        self.state_dir = Path(state_dir)
        self.credentials = CredentialStore(credentials_dir or self.state_dir / ".credentials")
        self._qemu_img = qemu_img
        self._vmrun = Vmrun(reactor, vmrun or find_vmrun(), product, vmrun_timeout)
        self._queue = PerVMQueue()
        self._base_locks: dict[str, DeferredLock] = {}
        self._paused: set[str] = set()
        self._poller = StatePoller(reactor, self._all_states, poll_interval)

    @property
    def capabilities(self) -> frozenset[Capability]:
        """What this driver can do with the configured product (no snapshots on Player)."""
        have = {Capability.SAVE_STATE, Capability.SERIAL_PORTS}
        if self.product != "player":
            have |= {Capability.SNAPSHOTS, Capability.LIVE_SNAPSHOTS, Capability.PAUSE}
        return frozenset(have)

    # -- service --------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        self._poller.hub.close()
        super().stopService()
        return succeed(None)

    # -- plumbing -------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        if not self.running:
            coro.close()
            return fail(
                HypervisorError(
                    "the vmware driver is not started; call startService() or add it to a running "
                    "MultiService"
                )
            )
        return Deferred.fromCoroutine(coro)

    async def _exclusive(self, vm: str, body: Callable[[], Coroutine[Any, Any, T]]) -> T:
        # One state-changing vmrun per VM at a time, in call order: VMware locks a VM's files
        # while one operation runs, and a second would fail rather than wait.
        return await self._queue.run(vm, body)

    def _vm_dir(self, name: str) -> Path:
        return self.state_dir / name

    def vmx_path(self, name: str) -> Path:
        """The ``.vmx`` file of VM ``name`` (whether it exists or not)."""
        return self._vm_dir(name) / f"{name}.vmx"

    def _require_vm(self, name: str, action: str) -> Path:
        vmx = self.vmx_path(name)
        if not vmx.is_file():
            raise VMNotFound(
                f"cannot {action} {name!r}: no VM named {name!r} is defined (no {vmx}); see list_vms()"
            )
        return vmx

    async def _vmrun_vm(
        self, command: str, name: str, *extra: str, action: str, snapshot: str | None = None
    ) -> str:
        vmx = self._require_vm(name, action)
        return await self._vmrun.run([command, str(vmx), *extra], action=action, vm=name, snapshot=snapshot)

    def _metadata(self, name: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self._vm_dir(name) / _METADATA).read_text())
        except (OSError, ValueError):
            data = {}
        data.setdefault("snapshots", {})
        return data

    def _write_metadata(self, name: str, data: Mapping[str, Any]) -> None:
        path = self._vm_dir(name) / _METADATA
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        tmp.replace(path)

    async def _running_vmx(self) -> set[str]:
        output = await self._vmrun.run(["list"], action="list the running VMs")
        return {os.path.realpath(p) for p in parse_list(output)}

    async def _observe(self, names: list[str]) -> dict[str, VMState]:
        # Two looks, vmrun list and the VMs' files, that a suspend or resume may fall between
        # (a VM neither listed nor suspended yet would pass for shut off): look at the files
        # before and after the list, and again if they changed meanwhile.
        for _ in range(3):
            before = {name: suspended_on_disk(self.vmx_path(name)) for name in names}
            running = await self._running_vmx()
            after = {name: suspended_on_disk(self.vmx_path(name)) for name in names}
            if before == after:
                break
        states = {}
        for name in names:
            listed = os.path.realpath(self.vmx_path(name)) in running
            if not listed:
                # Whatever stopped it (a guest poweroff, a crash) also ended the pause.
                self._paused.discard(name)
            states[name] = vm_state(listed=listed, paused=name in self._paused, suspended=after[name])
        return states

    async def _state(self, name: str) -> VMState:
        self._require_vm(name, "get the state of")
        return (await self._observe([name]))[name]

    async def _all_states(self) -> dict[str, VMState]:
        return await self._observe(self._names())

    def _names(self) -> list[str]:
        if not self.state_dir.is_dir():
            return []
        return sorted(d.name for d in self.state_dir.iterdir() if (d / f"{d.name}.vmx").is_file())

    async def _expect(self, name: str, action: str, allowed: tuple[VMState, ...], hint: str) -> VMState:
        current = await self._state(name)
        if current not in allowed:
            raise VMStateError(f"cannot {action} VM {name!r}: it is {current.value}; {hint}")
        return current

    # -- define / undefine ------------------------------------------------------------------

    def define(self, spec: VMSpec, guestinfo: Mapping[str, str] | None = None) -> Deferred[str]:
        """
        See :meth:`IHypervisorDriver.define`.

        :param guestinfo: variables for the guest, written to the ``.vmx`` as
            ``guestinfo.<key>`` (see :func:`hypervisors.vmware.vmx.guestinfo_entries`); the
            agent reads them with ``vmware-rpctool "info-get guestinfo.<key>"``. Any user of
            the guest can read them; the ``.vmx`` is readable by its owner only.
        """
        return self._run(self._exclusive(spec.name, lambda: self._define(spec, guestinfo or {})))

    async def _define(self, spec: VMSpec, guestinfo: Mapping[str, str]) -> str:
        vm_dir = self._vm_dir(spec.name)
        if self.vmx_path(spec.name).exists():
            raise VMAlreadyExists(
                f"cannot define VM {spec.name!r}: a VM of that name exists already "
                f"({self.vmx_path(spec.name)}); undefine it first or choose another name"
            )
        if spec.kernel is not None:
            raise HypervisorError(
                f"cannot define VM {spec.name!r}: VMware boots from the disk's boot loader and cannot boot "
                "a kernel file directly; give a disk image that boots by itself and kernel=None"
            )
        if spec.cpu_cap_percent < 100:
            require_capability(
                self,
                Capability.CPU_CAP,
                "VMware Workstation, Fusion and Player have no per-VM CPU cap in the .vmx (only ESXi "
                "has one); give cpu_cap_percent=100 and cap the whole process with the host's tools",
            )
        if not os.path.isfile(spec.disk):
            raise HypervisorError(
                f"cannot define VM {spec.name!r}: its disk {spec.disk} does not exist; build the image first"
            )
        # The agent's end of new credentials, as guestinfo (base64: a .vmx value has no '"');
        # the agent erases it in the guest once read (docs/security.md).
        self.credentials.create(spec.name)
        agent_end = base64.b64encode(self.credentials.agent_credentials(spec.name).to_json()).decode()
        guestinfo = {**guestinfo, CREDENTIALS_GUESTINFO: agent_end}
        try:
            entries = vmx_entries(
                spec, vm_dir=str(vm_dir), disk_file=f"{spec.name}.vmdk", guestinfo=guestinfo
            )
            base = await self._base_vmdk(spec.disk)
        except BaseException:
            self.credentials.remove(spec.name)
            raise
        # Left over from a define that did not finish: no .vmx, so no VM uses it.
        shutil.rmtree(vm_dir, ignore_errors=True)
        try:
            vm_dir.mkdir(parents=True)
            # A delta disk: its descriptor names the base (parentFileNameHint, parentCID), the
            # link VMware's own snapshots and linked clones use; writes go to the delta only.
            await self._run_qemu_img(
                [
                    "create",
                    "-q",
                    "-f",
                    "vmdk",
                    "-o",
                    "adapter_type=lsilogic",
                    "-b",
                    str(base),
                    "-F",
                    "vmdk",
                    str(vm_dir / f"{spec.name}.vmdk"),
                ],
                action=f"create the disk of VM {spec.name!r}",
            )
            vmx = self.vmx_path(spec.name)
            # Owner only: guestinfo may carry the VM's credentials.
            fd = os.open(vmx, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(render_vmx(entries))
            self._write_metadata(
                spec.name,
                {
                    "base_disk": os.path.abspath(spec.disk),
                    "agent_transport": spec.agent_transport,
                    "serial_ports": list(spec.serial_ports),
                    "nat_network": spec.nat_network,
                    "snapshots": {},
                    "current_snapshot": None,
                },
            )
        except OSError as e:
            shutil.rmtree(vm_dir, ignore_errors=True)
            self.credentials.remove(spec.name)
            raise HypervisorError(
                f"cannot define VM {spec.name!r}: {e}; check that {vm_dir} is writable"
            ) from e
        except BaseException:
            shutil.rmtree(vm_dir, ignore_errors=True)
            self.credentials.remove(spec.name)
            raise
        self.log.info(
            "Defined VM {vm} ({memory} MiB, {product})",
            vm=spec.name,
            memory=spec.memory_mib,
            product=self.product,
        )
        return spec.name

    async def _base_vmdk(self, disk: str) -> Path:
        """The VMDK copy of qcow2 base ``disk``, converted on first use and then shared."""
        stat = os.stat(disk)
        key = hashlib.sha256(
            f"{os.path.abspath(disk)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
        ).hexdigest()
        target = self.state_dir / ".bases" / f"{key[:24]}.vmdk"
        lock = self._base_locks.setdefault(key, DeferredLock())
        await lock.acquire()
        try:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".partial")
                await self._run_qemu_img(
                    [
                        "convert",
                        "-f",
                        "qcow2",
                        "-O",
                        "vmdk",
                        "-o",
                        "adapter_type=lsilogic,subformat=monolithicSparse",
                        disk,
                        str(partial),
                    ],
                    action=f"convert base image {disk} to VMDK",
                )
                # Read-only: VMware only reads a delta disk's parent, and nothing may change it
                # under the VMs whose deltas point at it (VMware checks its CID).
                partial.chmod(0o444)
                partial.replace(target)
        finally:
            lock.release()
        return target

    async def _run_qemu_img(self, args: list[str], *, action: str) -> None:
        qemu_img = self._qemu_img or shutil.which("qemu-img")
        if qemu_img is None:
            raise HypervisorError(
                f"cannot {action}: qemu-img is not installed; install qemu-utils (Debian) or qemu (Homebrew)"
            )
        out, err, code = await utils.getProcessOutputAndValue(
            qemu_img, args, env=dict(os.environ), reactor=self._reactor
        )
        if code != 0:
            raise HypervisorError(
                f"cannot {action}: qemu-img failed: {(err or out).decode(errors='replace').strip()}"
            )

    def undefine(self, name: str) -> Deferred[None]:
        async def go() -> None:
            self._require_vm(name, "undefine")
            current = await self._state(name)
            if current.is_active:
                await self._vmrun_vm("stop", name, "hard", action="power off")
            # deleteVM removes VMware's own files (snapshots, suspended state); the directory
            # with ours goes after it.
            await self._vmrun_vm("deleteVM", name, action="undefine")
            shutil.rmtree(self._vm_dir(name), ignore_errors=True)
            self.credentials.remove(name)
            self._paused.discard(name)
            self.log.info("Undefined VM {vm}", vm=name)

        return self._run(self._exclusive(name, go))

    def list_vms(self) -> Deferred[list[str]]:
        return self._run(_value(self._names()))

    def agent_credentials(self, name: str) -> Deferred[Credentials]:
        async def read() -> Credentials:
            self._require_vm(name, "read the credentials of")
            return self.credentials.host_credentials(name)

        return self._run(read())

    # -- power ------------------------------------------------------------------------------

    def start(self, name: str) -> Deferred[None]:
        """See :meth:`IHypervisorDriver.start`; a saved VM resumes (vmrun start resumes it)."""

        async def go() -> None:
            await self._expect(
                name, "start", (VMState.SHUTOFF, VMState.SAVED), "stop it or resume it instead"
            )
            await self._vmrun_vm("start", name, "nogui", action="start")
            self.log.info("Started {vm}", vm=name)

        return self._run(self._exclusive(name, go))

    def shutdown(self, name: str, wait: bool = True, timeout: float = 120.0) -> Deferred[None]:
        """
        See :meth:`IHypervisorDriver.shutdown`: ``vmrun stop <vmx> soft``, which asks the
        guest's VMware Tools (open-vm-tools) to shut it down and returns once it is off.
        """

        async def begin() -> Deferred[str]:
            await self._expect(name, "shut down", (VMState.RUNNING,), "start or resume it first")
            return Deferred.fromCoroutine(self._vmrun_vm("stop", name, "soft", action="shut down"))

        async def go() -> None:
            # The lock covers the state check and the launch only: vmrun blocks until the guest
            # is off, and power_off() must be able to go ahead meanwhile.
            stop = await self._exclusive(name, begin)
            if not wait:
                stop.addErrback(lambda f: self.log.failure("Shutting down {vm} failed", f, vm=name))
                return
            try:
                await stop.addTimeout(timeout, self._reactor)
            except TimeoutError:
                raise VMTimeout(
                    f"VM {name!r} did not shut down within {timeout:g} s (vmrun stop soft was stopped; the "
                    "guest may still be shutting down); give it more time or use power_off(), and check "
                    "that the guest runs VMware Tools (open-vm-tools), which a soft stop needs"
                ) from None
            self.log.info("Shut down {vm}", vm=name)

        return self._run(go())

    def power_off(self, name: str) -> Deferred[None]:
        return self._simple(
            name,
            "power off",
            ("stop", "hard"),
            (VMState.RUNNING, VMState.PAUSED),
            "it is not running",
            pause=False,
        )

    def pause(self, name: str) -> Deferred[None]:
        return self._simple(
            name,
            "pause",
            ("pause",),
            (VMState.RUNNING,),
            "start or resume it first",
            pause=True,
            capability=Capability.PAUSE,
        )

    def resume(self, name: str) -> Deferred[None]:
        return self._simple(
            name,
            "resume",
            ("unpause",),
            (VMState.PAUSED,),
            "only a paused VM resumes",
            pause=False,
            capability=Capability.PAUSE,
        )

    def reset(self, name: str) -> Deferred[None]:
        return self._simple(
            name, "reset", ("reset", "hard"), (VMState.RUNNING, VMState.PAUSED), "start it first"
        )

    def save_state(self, name: str) -> Deferred[None]:
        """See :meth:`IHypervisorDriver.save_state`: ``vmrun suspend <vmx> hard``."""
        return self._simple(
            name,
            "save the state of",
            ("suspend", "hard"),
            (VMState.RUNNING, VMState.PAUSED),
            "start it first",
            pause=False,
        )

    def _simple(
        self,
        name: str,
        action: str,
        command: tuple[str, ...],
        allowed: tuple[VMState, ...],
        hint: str,
        *,
        pause: bool | None = None,
        capability: Capability | None = None,
    ) -> Deferred[None]:
        async def go() -> None:
            if capability is not None:
                require_capability(self, capability, _NO_PAUSE_ON_PLAYER)
            await self._expect(name, action, allowed, hint)
            await self._vmrun_vm(command[0], name, *command[1:], action=action)
            if pause is True:
                self._paused.add(name)
            elif pause is False:
                self._paused.discard(name)
            self.log.info("{action} {vm}: done", action=action, vm=name)

        return self._run(self._exclusive(name, go))

    def state(self, name: str) -> Deferred[VMState]:
        return self._run(self._state(name))

    def subscribe(self, callback: Callable[[VMEvent], object], name: str | None = None) -> ISubscription:
        """See :meth:`IHypervisorDriver.subscribe`; polled every ``poll_interval`` seconds."""
        return self._poller.hub.subscribe(callback, name)

    def wait_for_state(self, name: str, state: VMState, timeout: float = 60.0) -> Deferred[None]:
        return self._run(self._poller.wait_for_state(name, state, timeout, lambda: self._state(name)))

    # -- snapshots ----------------------------------------------------------------------------

    def _require_snapshots(self) -> None:
        require_capability(self, Capability.SNAPSHOTS, _NO_SNAPSHOTS_ON_PLAYER)

    def snapshot_create(self, name: str, snapshot_name: str, description: str = "") -> Deferred[SnapshotInfo]:
        async def go() -> SnapshotInfo:
            self._require_vm(name, "take a snapshot of")
            state = await self._state(name)
            # A running VM's snapshot holds its memory: that is the capability it lacks then.
            live = Capability.LIVE_SNAPSHOTS if state.is_active else Capability.SNAPSHOTS
            require_capability(self, live, _NO_SNAPSHOTS_ON_PLAYER)
            # VMware lets names repeat (then revert fails: "The name does not uniquely identify
            # one snapshot"); our names are unique, as the interface says.
            if snapshot_name in await self._snapshot_names(name):
                raise HypervisorError(
                    f"cannot take snapshot {snapshot_name!r} of VM {name!r}: it has a snapshot of that "
                    "name already; delete it first or choose another name"
                )
            await self._vmrun_vm(
                "snapshot", name, snapshot_name, action=f"take snapshot {snapshot_name!r} of"
            )
            created = datetime.now(UTC)
            data = self._metadata(name)
            data["snapshots"][snapshot_name] = {
                "description": description,
                "created": created.isoformat(),
                "state": state.value,
            }
            data["current_snapshot"] = snapshot_name
            self._write_metadata(name, data)
            self.log.info("Took snapshot {snapshot} of {vm}", snapshot=snapshot_name, vm=name)
            parents = dict(await self._snapshot_tree(name))
            return SnapshotInfo(snapshot_name, description, created, state, parents.get(snapshot_name), True)

        return self._run(self._exclusive(name, go))

    async def _snapshot_tree(self, name: str) -> list[tuple[str, str | None]]:
        output = await self._vmrun_vm("listSnapshots", name, "showTree", action="list the snapshots of")
        return parse_snapshot_tree(output)

    async def _snapshot_names(self, name: str) -> set[str]:
        return {snapshot for snapshot, _ in await self._snapshot_tree(name)}

    def snapshot_list(self, name: str) -> Deferred[list[SnapshotInfo]]:
        async def go() -> list[SnapshotInfo]:
            self._require_snapshots()
            tree = await self._snapshot_tree(name)
            data = self._metadata(name)
            infos = []
            for snapshot, parent in tree:
                # Snapshots taken outside vmcontroller have no record: vmrun tells only names.
                known = data["snapshots"].get(snapshot, {})
                infos.append(
                    SnapshotInfo(
                        name=snapshot,
                        description=known.get("description", ""),
                        created=datetime.fromisoformat(known["created"])
                        if "created" in known
                        else datetime.fromtimestamp(0, UTC),
                        state=VMState(known.get("state", VMState.NOSTATE.value)),
                        parent=parent,
                        current=data.get("current_snapshot") == snapshot,
                    )
                )
            order = {snapshot: index for index, (snapshot, _) in enumerate(tree)}
            return sorted(infos, key=lambda i: (i.created, order[i.name]))

        return self._run(go())

    def snapshot_revert(self, name: str, snapshot_name: str) -> Deferred[None]:
        async def go() -> None:
            self._require_snapshots()
            await self._vmrun_vm(
                "revertToSnapshot",
                name,
                snapshot_name,
                action=f"revert to snapshot {snapshot_name!r}",
                snapshot=snapshot_name,
            )
            self._paused.discard(name)
            data = self._metadata(name)
            data["current_snapshot"] = snapshot_name
            self._write_metadata(name, data)
            # VIX: "The resulting power state reflects the power state when the snapshot was
            # created"; some products leave a VM reverted to a running snapshot suspended, to be
            # resumed by a start, which is what vagrant-vmware-desktop's users run next.
            taken = data["snapshots"].get(snapshot_name, {}).get("state")
            if taken == VMState.RUNNING.value and await self._state(name) is VMState.SAVED:
                await self._vmrun_vm("start", name, "nogui", action="resume after reverting")
            self.log.info("Reverted {vm} to snapshot {snapshot}", vm=name, snapshot=snapshot_name)

        return self._run(self._exclusive(name, go))

    def snapshot_delete(self, name: str, snapshot_name: str) -> Deferred[None]:
        async def go() -> None:
            self._require_snapshots()
            tree = dict(await self._snapshot_tree(name))
            # Without "andDeleteChildren": the children stay, re-attached to the parent.
            await self._vmrun_vm(
                "deleteSnapshot",
                name,
                snapshot_name,
                action=f"delete snapshot {snapshot_name!r} of",
                snapshot=snapshot_name,
            )
            data = self._metadata(name)
            data["snapshots"].pop(snapshot_name, None)
            if data.get("current_snapshot") == snapshot_name:
                data["current_snapshot"] = tree.get(snapshot_name)
            self._write_metadata(name, data)
            self.log.info("Deleted snapshot {snapshot} of {vm}", snapshot=snapshot_name, vm=name)

        return self._run(self._exclusive(name, go))

    # -- agent channel ------------------------------------------------------------------------

    def agent_endpoint(
        self, name: str, transport: AgentTransport = "auto"
    ) -> Deferred[IStreamClientEndpoint]:
        """
        See :meth:`IHypervisorDriver.agent_endpoint`: on VMware the agent's channel is a serial
        port whose host side is a unix socket VMware listens on; virtio-serial and a forwarded
        TCP port are not available.
        """

        async def go() -> IStreamClientEndpoint:
            self._require_vm(name, "reach the agent of")
            data = self._metadata(name)
            ports: list[str] = data.get("serial_ports", [])
            chosen = data.get("agent_transport", "auto") if transport == "auto" else transport
            if chosen == "auto":
                if not ports:
                    raise HypervisorError(
                        f"VM {name!r} has no agent channel VMware can reach: define it with a serial "
                        "port (VMSpec.serial_ports) for the agent"
                    )
                chosen = "serial"
            if chosen == "virtio-serial":
                require_capability(
                    self,
                    Capability.VIRTIO_SERIAL,
                    "VMware has no virtio-serial devices; use a serial port (VMSpec.serial_ports, "
                    "agent_transport='serial')",
                )
            if chosen == "tcp":
                require_capability(self, Capability.PORT_FORWARD, _NO_PORT_FORWARD)
            if not ports:
                raise HypervisorError(
                    f"VM {name!r} has no serial port for the agent; it was defined without one "
                    "(see VMSpec.serial_ports)"
                )
            return UNIXClientEndpoint(self._reactor, await self._serial_socket(name, ports[0]))

        return self._run(go())

    def serial_socket_path(self, name: str, port: str) -> Deferred[str]:
        """The unix socket VMware listens on for serial port ``port`` of a running VM."""
        return self._run(self._serial_socket(name, port))

    async def _serial_socket(self, name: str, port: str) -> str:
        vmx = self._require_vm(name, "find the serial port of")
        path = str(self._vm_dir(name) / serial_socket_name(port))
        if path not in parse_vmx(vmx.read_text()).values():
            raise HypervisorError(
                f"VM {name!r} has no serial port named {port!r}; it was defined without it "
                "(see VMSpec.serial_ports)"
            )
        if not (await self._state(name)).is_active:
            raise VMStateError(
                f"VM {name!r} is not running, so its serial port {port!r} has no socket; start it first"
            )
        return path

    def forward_port(
        self, name: str, guest_port: int, guest_address: str = NAT_GUEST_ADDRESS
    ) -> Deferred[int]:
        """Not available: see :attr:`capabilities` (no ``PORT_FORWARD``)."""

        async def go() -> int:
            raise CapabilityUnsupported(self.name, Capability.PORT_FORWARD.value, _NO_PORT_FORWARD)

        return self._run(go())


async def _value(value: T) -> T:
    return value
