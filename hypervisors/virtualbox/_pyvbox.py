"""
The pyvbox backend: VirtualBox's COM API through pyvbox (``virtualbox`` on PyPI) over
VirtualBox's own ``vboxapi`` bindings.

COM objects belong to the thread that made them (XPCOM), so every pyvbox call runs on one
dedicated thread (``ThreadPool(1, 1)``) that creates the manager; a call there never blocks
the reactor. Sessions follow VirtualBox's rules (``IMachine::lockMachine`` in VirtualBox.xidl):
a write lock to change settings, a shared lock to drive a running VM, and the session always
unlocked in ``finally``. A progress object is waited on in short slices on that thread, so
other calls (and the event pump) go between slices.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from hypervisors.interface import VMSpec, VMState
from hypervisors.virtualbox._backend import CONTROLLER, GROUP, SPEC_KEY, ConsoleAction, MachineInfo
from hypervisors.virtualbox._parsing import (
    MACHINE_STATE_NAMES,
    PortForward,
    SnapshotRecord,
    parse_port_forward,
    timestamp,
    translate_error,
    vm_state,
)
from vmcontroller.errors import HypervisorError, HypervisorUnavailable

T = TypeVar("T")

#: How long one wait on a progress object or for an event holds the thread (ms).
_SLICE_MS = 100


def vboxapi_importable() -> bool:
    """Whether pyvbox is installed and finds VirtualBox's ``vboxapi`` (pyvbox's own search)."""
    try:
        import virtualbox
    except ImportError:
        return False
    try:
        with virtualbox.import_vboxapi():
            return True
    except ImportError:
        return False


class PyvboxBackend:
    name = "pyvbox"
    pushes_events = True
    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="vmcontroller-pyvbox")
        self._vbox: Any = None
        self._manager: Any = None
        self._lib: Any = None
        self._trigger: Any = None
        # Our machines' names by id: an unregistered machine can no longer be looked up.
        self._ours: dict[str, str] = {}

    # -- plumbing -------------------------------------------------------------------------

    def _on_thread(
        self, fn: Callable[[], T], *, action: str, vm: str | None = None, snapshot: str | None = None
    ) -> Deferred[T]:
        lib = self._lib

        def work() -> T:
            try:
                return fn()
            except HypervisorError:
                raise
            except Exception as e:
                if lib is not None and isinstance(e, lib.VBoxError):
                    code = getattr(e, "name", None)
                    raise translate_error(
                        code if code != "undef" else f"0x{e.value:08x}",
                        str(e.msg),
                        action=action,
                        vm=vm,
                        snapshot=snapshot,
                    ) from e
                raise

        return deferToThreadPool(self._reactor, self._pool, work)

    async def start(self) -> None:
        self._pool.start()
        # Stop the COM thread if the reactor stops first, so that the process can exit.
        self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self.stop_pool)

        def connect() -> None:
            import virtualbox
            from virtualbox import library

            try:
                self._manager = virtualbox.Manager()
                self._vbox = virtualbox.VirtualBox(manager=self._manager)
                self._vbox.version  # noqa: B018 -- VBoxSVC answers or this fails
            except ImportError as e:
                raise HypervisorUnavailable(
                    f"pyvbox cannot import VirtualBox's vboxapi bindings ({e}); install VirtualBox "
                    "(its SDK's vboxapi), or use backend='vboxmanage'"
                ) from e
            except Exception as e:
                raise HypervisorUnavailable(
                    f"cannot reach VirtualBox (VBoxSVC) through pyvbox: {e}; check that VirtualBox is "
                    "installed and `VBoxManage list vms` works for this user"
                ) from e
            self._lib = library

        await self._on_thread(connect, action="connect to VirtualBox")

    def stop_pool(self) -> None:
        if self._pool.started:
            self._pool.stop()

    async def stop(self) -> None:
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        # ThreadPool.stop() joins the COM thread, which may be in a call: off the reactor thread.
        done: Deferred[None] = Deferred()

        def stop() -> None:
            self.stop_pool()
            self._reactor.callFromThread(done.callback, None)

        threading.Thread(target=stop, name="vmcontroller-pyvbox-stop", daemon=True).start()
        await done

    @contextlib.contextmanager
    def _session(self, machine: Any, write: bool) -> Iterator[Any]:
        lib = self._lib
        import virtualbox

        session = virtualbox.Session(manager=self._manager)
        machine.lock_machine(session, lib.LockType.write if write else lib.LockType.shared)
        try:
            yield session
        finally:
            session.unlock_machine()

    async def _wait(self, progress: Any, *, action: str, vm: str, snapshot: str | None = None) -> None:
        # A slice at a time on the COM thread: the reactor never waits, and queued calls run
        # between slices.
        while True:

            def poll() -> bool:
                progress.wait_for_completion(_SLICE_MS)
                return bool(progress.completed)

            if await self._on_thread(poll, action=action, vm=vm):
                break

        def outcome() -> None:
            if int(progress.result_code) != 0:
                info = progress.error_info
                code = int(progress.result_code) & 0xFFFFFFFF
                from virtualbox import library_base

                name = library_base.vbox_error.get(code)
                raise translate_error(
                    name.name if name is not None else f"0x{code:08x}",
                    str(info.text) if info is not None else "no error text",
                    action=action,
                    vm=vm,
                    snapshot=snapshot,
                )

        await self._on_thread(outcome, action=action, vm=vm)

    def _info(self, machine: Any) -> MachineInfo:
        state = MACHINE_STATE_NAMES.get(int(machine.state), "unknown")
        info = MachineInfo(
            name=machine.name,
            id=machine.id_p,
            state=vm_state(state),
            raw_state=state,
            ours=GROUP in list(machine.groups),
        )
        if info.ours:
            self._ours[info.id] = info.name
        return info

    # -- Backend --------------------------------------------------------------------------

    async def machine(self, name: str) -> MachineInfo:
        return await self._on_thread(
            lambda: self._info(self._vbox.find_machine(name)), action="look up", vm=name
        )

    async def machines(self) -> list[MachineInfo]:
        return await self._on_thread(
            lambda: [self._info(m) for m in self._vbox.machines], action="list the VMs"
        )

    async def extra_data(self, name: str, key: str) -> str:
        return await self._on_thread(
            lambda: str(self._vbox.find_machine(name).get_extra_data(key)),
            action="read the settings of",
            vm=name,
        )

    async def set_extra_data(self, name: str, key: str, value: str) -> None:
        await self._on_thread(
            lambda: self._vbox.find_machine(name).set_extra_data(key, value),
            action="change the settings of",
            vm=name,
        )

    async def create(self, spec: VMSpec, base_folder: str, serial_paths: list[str], spec_json: str) -> None:
        lib = self._lib

        def create() -> None:
            vbox = self._vbox
            # Group "/" in the file name: the machine's folder is <base_folder>/<name>.
            settings = vbox.compose_machine_filename(spec.name, "/", "", base_folder)
            machine = vbox.create_machine(settings, spec.name, [GROUP], "Linux_64", "")
            machine.save_settings()
            vbox.register_machine(machine)
            base = vbox.open_medium(spec.disk, lib.DeviceType.hard_disk, lib.AccessMode.read_only, False)
            if base.type_p != lib.MediumType.multi_attach:
                base.type_p = lib.MediumType.multi_attach
            with self._session(machine, write=True) as session:
                mutable = session.machine
                mutable.memory_size = spec.memory_mib
                mutable.cpu_count = spec.vcpus
                mutable.cpu_execution_cap = spec.cpu_cap_percent
                mutable.add_storage_controller(CONTROLLER, lib.StorageBus.sata)
                # A MultiAttach base: VirtualBox gives this machine a differencing child in its
                # Snapshots folder and never writes the base (as BOINC's vboxwrapper does).
                mutable.attach_device(CONTROLLER, 0, 0, lib.DeviceType.hard_disk, base)
                for slot, path in enumerate(serial_paths, start=1):
                    port = mutable.get_serial_port(slot)
                    port.host_mode = lib.PortMode.host_pipe
                    port.server = True
                    port.path = path
                    port.enabled = True
                if spec.nat_network:
                    nic = mutable.get_network_adapter(0)
                    nic.attachment_type = lib.NetworkAttachmentType.nat
                    nic.enabled = True
                mutable.set_extra_data(SPEC_KEY, spec_json)
                mutable.save_settings()

        await self._on_thread(create, action="define VM", vm=spec.name)

    async def set_guest_property(self, name: str, key: str, value: str, flags: str) -> None:
        def set_property(machine: Any, session: Any) -> None:
            machine.set_guest_property(key, value, flags)
            machine.save_settings()

        await self._in_session(name, False, set_property, "set a guest property of")

    async def launch(self, name: str) -> None:
        import virtualbox

        session: list[Any] = []

        def launch() -> Any:
            machine = self._vbox.find_machine(name)
            session.append(virtualbox.Session(manager=self._manager))
            return machine.launch_vm_process(session[0], "headless", [])

        try:
            progress = await self._on_thread(launch, action="start", vm=name)
            await self._wait(progress, action="start", vm=name)
        finally:
            if session:
                await self._on_thread(lambda: _unlock_quietly(session[0]), action="start", vm=name)

    async def console(self, name: str, action: ConsoleAction) -> None:
        def act(machine: Any, session: Any) -> Any:
            if action == "savestate":
                return machine.save_state()
            console = session.console
            if action == "poweroff":
                return console.power_down()
            {
                "acpipowerbutton": console.power_button,
                "pause": console.pause,
                "resume": console.resume,
                "reset": console.reset,
            }[action]()
            return None

        await self._in_session(name, False, act, action)

    async def _in_session(
        self, name: str, write: bool, fn: Callable[[Any, Any], Any], action: str, snapshot: str | None = None
    ) -> Any:
        # The session stays locked while the progress runs, as VirtualBox requires; unlocked
        # in finally whatever happens.
        import virtualbox

        session: list[Any] = []

        def begin() -> Any:
            machine = self._vbox.find_machine(name)
            session.append(virtualbox.Session(manager=self._manager))
            machine.lock_machine(session[0], self._lib.LockType.write if write else self._lib.LockType.shared)
            return fn(session[0].machine, session[0])

        try:
            result = await self._on_thread(begin, action=action, vm=name, snapshot=snapshot)
            progress = result[0] if isinstance(result, tuple) else result
            if progress is not None:
                await self._wait(progress, action=action, vm=name, snapshot=snapshot)
            return result
        finally:
            if session:
                await self._on_thread(lambda: _unlock_quietly(session[0]), action=action, vm=name)

    async def take_snapshot(self, name: str, snapshot: str, description: str) -> str:
        result = await self._in_session(
            name,
            False,
            lambda m, _: m.take_snapshot(snapshot, description, False),
            f"take snapshot {snapshot!r} of",
        )
        return str(result[1])

    async def snapshots(self, name: str) -> list[SnapshotRecord]:
        def walk() -> list[SnapshotRecord]:
            machine = self._vbox.find_machine(name)
            current = machine.current_snapshot
            current_id = current.id_p if current is not None and current._i is not None else None
            records: list[SnapshotRecord] = []
            if int(machine.snapshot_count) == 0:
                return records
            root = machine.find_snapshot("")
            while root.parent is not None and root.parent._i is not None:
                root = root.parent
            stack = [root]
            while stack:
                snap = stack.pop(0)
                parent = snap.parent
                records.append(
                    SnapshotRecord(
                        id=snap.id_p,
                        name=snap.name,
                        description=snap.description,
                        parent_id=parent.id_p if parent is not None and parent._i is not None else None,
                        current=snap.id_p == current_id,
                        created=timestamp(int(snap.time_stamp)),
                        online=bool(snap.online),
                    )
                )
                stack.extend(snap.children)
            return records

        return await self._on_thread(walk, action="list the snapshots of", vm=name)

    async def restore_snapshot(self, name: str, snapshot_id: str) -> None:
        await self._in_session(
            name,
            True,
            lambda m, _: m.restore_snapshot(m.find_snapshot(snapshot_id)),
            "restore a snapshot of",
            snapshot_id,
        )

    async def delete_snapshot(self, name: str, snapshot_id: str) -> None:
        await self._in_session(
            name, False, lambda m, _: m.delete_snapshot(snapshot_id), "delete a snapshot of", snapshot_id
        )

    async def unregister(self, name: str) -> None:
        def unregister() -> Any:
            machine = self._vbox.find_machine(name)
            media = machine.unregister(self._lib.CleanupMode.detach_all_return_hard_disks_only)
            return machine.delete_config(media)

        progress = await self._on_thread(unregister, action="undefine", vm=name)
        await self._wait(progress, action="undefine", vm=name)

    async def port_forwards(self, name: str) -> list[PortForward]:
        def rules() -> list[PortForward]:
            engine = self._vbox.find_machine(name).get_network_adapter(0).nat_engine
            return [f for f in map(parse_port_forward, engine.redirects) if f is not None]

        return await self._on_thread(rules, action="read the port forwards of", vm=name)

    async def add_port_forward(
        self, name: str, rule: str, host_port: int, guest_ip: str, guest_port: int
    ) -> None:
        lib = self._lib

        def forward() -> None:
            # A running VM's NAT rules change through a shared session, as `VBoxManage
            # controlvm natpf1` does.
            machine = self._vbox.find_machine(name)
            with self._session(machine, write=False) as session:
                engine = session.machine.get_network_adapter(0).nat_engine
                engine.add_redirect(rule, lib.NATProtocol.tcp, "127.0.0.1", host_port, guest_ip, guest_port)

        await self._on_thread(forward, action="forward a port to", vm=name)

    def watch(self, publish: Callable[[str, VMState], None]) -> Callable[[], None]:
        lib = self._lib
        watching = [True]
        listener: list[Any] = []

        def register() -> None:
            source = self._vbox.event_source
            listener.append(source.create_listener())
            source.register_listener(
                listener[0],
                [lib.VBoxEventType.on_machine_state_changed, lib.VBoxEventType.on_machine_registered],
                False,
            )

        def next_events() -> list[tuple[str, VMState | None]]:
            # A passive listener: IEventSource::getEvent waits up to a slice on the COM thread.
            source = self._vbox.event_source
            found: list[tuple[str, VMState | None]] = []
            event = source.get_event(listener[0], _SLICE_MS)
            # pyvbox wraps a null event too (its Interface has no __bool__ on Python 3).
            if event is None or event._i is None:
                return found
            try:
                changed = lib.IMachineEvent(event)
                machine_id = changed.machine_id
                if (
                    event.type_p == lib.VBoxEventType.on_machine_registered
                    and not lib.IMachineRegisteredEvent(event).registered
                ):
                    name = self._ours.pop(machine_id, None)
                    if name is not None:
                        found.append((name, None))
                else:
                    # A state change, or a machine registered: its state now, if it is ours.
                    info = self._info(self._vbox.find_machine(machine_id))
                    if info.ours:
                        found.append((info.name, info.state))
            finally:
                source.event_processed(listener[0], event)
            return found

        async def pump() -> None:
            await self._on_thread(register, action="listen to VirtualBox's events")
            try:
                while watching[0]:
                    for name, state in await self._on_thread(next_events, action="read VirtualBox's events"):
                        publish(name, state if state is not None else VMState.NOSTATE)
            except Exception:
                self.log.failure("VirtualBox event listener stopped")
            finally:
                if listener and self._pool.started:
                    await self._on_thread(
                        lambda: self._vbox.event_source.unregister_listener(listener[0]),
                        action="stop listening",
                    )

        Deferred.fromCoroutine(pump())

        def cancel() -> None:
            watching[0] = False

        return cancel


def _unlock_quietly(session: Any) -> None:
    # A session a failed launch or lock never locked has nothing to unlock.
    with contextlib.suppress(Exception):
        session.unlock_machine()
