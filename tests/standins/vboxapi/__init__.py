"""
A stand-in for VirtualBox's ``vboxapi`` Python bindings, for running the real pyvbox library
(``virtualbox`` on PyPI) where VirtualBox cannot be installed. Put ``tests/standins`` on
``sys.path`` and call :func:`use_home` first.

What it reproduces: the ``VirtualBoxManager`` entry points pyvbox calls
(``virtualbox/__init__.py``: ``getVirtualBox``, ``getSessionObject``, ``queryInterface``,
``getBinDir``; VirtualBox's ``src/VBox/Installer/common/vboxapi/__init__.py``), and COM objects
named after the interfaces of ``src/VBox/Main/idl/VirtualBox.xidl``, serving attributes and
methods under their XIDL names, which is what pyvbox's generated ``library.py`` asks for
(``self._get_attr("memorySize")``, ``self._call("lockMachine", in_p=[...])``). A failing
call raises the XPCOM exception pyvbox decodes (``library_base.Interface._call_method`` reads
``errno`` and ``msg``): ``errno`` is the nsresult as XPCOM's Python binding gives it, a signed
32-bit number. ``tests/unit/test_virtualbox_standins.py`` checks that every attribute and
method served here exists in pyvbox's ``library.py`` with the same number of arguments.

The machines, media and rules live in :mod:`tests.standins.vbox_model`, shared with the
``VBoxManage`` stand-in.
"""

from __future__ import annotations

import builtins
import os
import queue
import threading
from pathlib import Path
from typing import Any

from tests.standins import vbox_model as model
from tests.standins.vbox_model import VBoxError

_home: Path | None = None
_listeners: list[IEventListener] = []
_listeners_lock = threading.Lock()

# Enumerations by value (VirtualBox.xidl).
_LOCK_WRITE, _LOCK_SHARED = 2, 1
_SESSION_UNLOCKED, _SESSION_LOCKED = 1, 2
_SESSION_TYPE = {"WriteLock": 1, "Shared": 3}
_PORT_MODE = {0: "disconnected", 1: "hostpipe"}
_PORT_MODE_VALUE = {v: k for k, v in _PORT_MODE.items()}
_ATTACHMENT = {0: "null", 1: "nat"}
_ATTACHMENT_VALUE = {v: k for k, v in _ATTACHMENT.items()}
_MEDIUM_TYPE = {0: "normal", 1: "immutable", 5: "multiattach"}
_MEDIUM_TYPE_VALUE = {v: k for k, v in _MEDIUM_TYPE.items()}
_EVENT_MACHINE_STATE_CHANGED, _EVENT_MACHINE_REGISTERED = 32, 37


def use_home(home: str | os.PathLike[str]) -> None:
    """Serve the VirtualBox whose registry is in ``home`` (its ``VBOX_USER_HOME``)."""
    global _home
    _home = Path(home)


class Exception(builtins.Exception):
    """XPCOM's ``xpcom.Exception``: ``errno`` (a signed nsresult) and ``msg``."""

    def __init__(self, errno: int, msg: str) -> None:
        super().__init__(errno, msg)
        self.errno = errno - (1 << 32) if errno >= 1 << 31 else errno
        self.msg = msg


def _com(call: Any) -> Any:
    """Run ``call`` and turn the registry's errors into COM exceptions."""
    try:
        return call()
    except VBoxError as e:
        raise Exception(e.code, e.text) from None


_gate: threading.Event | None = None


def hold_calls() -> Any:
    """
    Make every COM call block (as a slow VBoxSVC does) until the returned function is called:
    for showing that a call in flight does not block the reactor.
    """
    global _gate
    gate = _gate = threading.Event()

    def release() -> None:
        global _gate
        _gate = None
        gate.set()

    return release


def _transaction() -> Any:
    gate = _gate
    if gate is not None:
        gate.wait(60)
    if _home is None:
        raise Exception(0x80004005, "VBoxSVC is not running (call vboxapi.use_home first)")
    return model.transaction(_home)


# -- events ------------------------------------------------------------------------------


def _notify(home: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    if home != _home:
        return
    events: list[_Event] = []
    old, new = before["machines"], after["machines"]
    for machine_id in sorted(old.keys() | new.keys()):
        was, now = old.get(machine_id), new.get(machine_id)
        was_registered = bool(was and was["registered"])
        is_registered = bool(now and now["registered"])
        if was_registered and is_registered and was["state"] != now["state"]:
            events.append(IMachineStateChangedEvent(machine_id, now["state"]))
        elif was_registered != is_registered:
            events.append(IMachineRegisteredEvent(machine_id, is_registered))
    with _listeners_lock:
        for listener in _listeners:
            for event in events:
                if event.type in listener._interesting or 1 in listener._interesting:
                    listener._queue.put(event)


model.observers.append(_notify)


class IEventListener:
    _interfaces = ("IEventListener",)

    def __init__(self) -> None:
        self._queue: queue.Queue[_Event] = queue.Queue()
        self._interesting: set[int] = set()


class _Event:
    _interfaces: tuple[str, ...] = ()
    #: The interfaces it derives from (VirtualBox.xidl), which QueryInterface also gives.
    _bases = ("IMachineEvent", "IEvent")
    type = 0
    waitable = False

    def __init__(self, machine_id: str) -> None:
        self.machineId = machine_id


class IMachineStateChangedEvent(_Event):
    _interfaces = ("IMachineStateChangedEvent",)
    type = _EVENT_MACHINE_STATE_CHANGED

    def __init__(self, machine_id: str, state: int) -> None:
        super().__init__(machine_id)
        self.state = state


class IMachineRegisteredEvent(_Event):
    _interfaces = ("IMachineRegisteredEvent",)
    type = _EVENT_MACHINE_REGISTERED

    def __init__(self, machine_id: str, registered: bool) -> None:
        super().__init__(machine_id)
        self.registered = registered


class IEventSource:
    _interfaces = ("IEventSource",)

    def createListener(self) -> IEventListener:
        return IEventListener()

    def registerListener(self, listener: IEventListener, interesting: list[int], active: bool) -> None:
        if active:
            raise Exception(model.E_INVALIDARG, "the stand-in has passive listeners only")
        listener._interesting = set(interesting)
        with _listeners_lock:
            _listeners.append(listener)

    def unregisterListener(self, listener: IEventListener) -> None:
        with _listeners_lock:
            if listener in _listeners:
                _listeners.remove(listener)

    def getEvent(self, listener: IEventListener, timeout: int) -> _Event | None:
        with _listeners_lock:
            if listener not in _listeners:
                raise Exception(model.VBOX_E_OBJECT_NOT_FOUND, "Listener was never registered")
        try:
            return listener._queue.get(timeout=max(timeout, 0) / 1000)
        except queue.Empty:
            return None

    def eventProcessed(self, listener: IEventListener, event: _Event) -> None:
        return None


# -- progress ----------------------------------------------------------------------------


class IVirtualBoxErrorInfo:
    _interfaces = ("IVirtualBoxErrorInfo",)

    def __init__(self, code: int, text: str) -> None:
        self.resultCode = code - (1 << 32) if code >= 1 << 31 else code
        self.text = text


class IProgress:
    """
    An operation under way: its effect happens when it completes, which it does the first
    time a caller waits on it (``waitForCompletion``) or asks ``completed`` a second time, so
    a client that does not wait for it sees no effect.
    """

    _interfaces = ("IProgress",)

    def __init__(self, description: str, work: Any) -> None:
        self.description = description
        self._work = work
        self._asked = 0
        self._done = False
        self.resultCode = 0
        self.errorInfo: IVirtualBoxErrorInfo | None = None
        self.percent = 0

    @property
    def completed(self) -> bool:
        self._asked += 1
        if self._asked >= 2:
            self._finish()
        return self._done

    def _finish(self) -> None:
        if self._done:
            return
        try:
            self._work()
        except VBoxError as e:
            self.resultCode = e.code - (1 << 32)
            self.errorInfo = IVirtualBoxErrorInfo(e.code, e.text)
        except Exception as e:  # the COM error of a nested call
            self.resultCode = e.errno
            self.errorInfo = IVirtualBoxErrorInfo(e.errno & 0xFFFFFFFF, e.msg)
        self._done = True
        self.percent = 100

    def waitForCompletion(self, timeout: int) -> None:
        self._finish()


# -- media, snapshots, devices -----------------------------------------------------------


class IMedium:
    _interfaces = ("IMedium",)

    def __init__(self, medium_id: str) -> None:
        self.id = medium_id

    def _get(self) -> dict[str, Any]:
        with _transaction() as registry:
            medium = registry.media.get(self.id)
            if medium is None:
                raise Exception(model.VBOX_E_OBJECT_NOT_FOUND, f"Medium {{{self.id}}} is not registered")
            return medium

    @property
    def location(self) -> str:
        return str(self._get()["location"])

    @property
    def parent(self) -> IMedium | None:
        parent = self._get()["parent"]
        return IMedium(parent) if parent else None

    @property
    def type(self) -> int:
        return _MEDIUM_TYPE_VALUE[self._get()["type"]]

    @type.setter
    def type(self, value: int) -> None:
        with _transaction() as registry:
            registry.media[self.id]["type"] = _MEDIUM_TYPE[value]


class ISnapshot:
    _interfaces = ("ISnapshot",)

    def __init__(self, machine_id: str, snapshot_id: str) -> None:
        self._machine_id = machine_id
        self.id = snapshot_id

    def _get(self) -> dict[str, Any]:
        with _transaction() as registry:
            machine = registry.machines.get(self._machine_id)
            if machine is None or self.id not in machine["snapshots"]:
                raise Exception(model.VBOX_E_OBJECT_NOT_FOUND, f"Snapshot {{{self.id}}} does not exist")
            return machine["snapshots"][self.id]

    @property
    def name(self) -> str:
        return str(self._get()["name"])

    @property
    def description(self) -> str:
        return str(self._get()["description"])

    @property
    def timeStamp(self) -> int:
        return int(self._get()["time_stamp"])

    @property
    def online(self) -> bool:
        return bool(self._get()["online"])

    @property
    def parent(self) -> ISnapshot | None:
        parent = self._get()["parent"]
        return ISnapshot(self._machine_id, parent) if parent else None

    @property
    def children(self) -> list[ISnapshot]:
        with _transaction() as registry:
            snapshots = registry.machines[self._machine_id]["snapshots"].values()
            return [ISnapshot(self._machine_id, s["id"]) for s in snapshots if s["parent"] == self.id]


class _Device:
    """A device of a machine: settable only through a write-locked session's machine."""

    def __init__(self, machine: IMachine) -> None:
        self._machine = machine

    def _change(self, change: Any, *, online: bool = False) -> None:
        def go() -> None:
            with _transaction() as registry:
                record = self._machine._record(registry)
                self._machine._require_mutable(record, online=online)
                change(record)

        _com(go)


class ISerialPort(_Device):
    _interfaces = ("ISerialPort",)

    def __init__(self, machine: IMachine, slot: int) -> None:
        super().__init__(machine)
        self.slot = slot
        self.IOBase, self.IRQ = model.UART_RESOURCES[slot]

    def _port(self) -> dict[str, Any]:
        return dict(self._machine._get()["uarts"][self.slot])

    def _set(self, key: str, value: Any) -> None:
        self._change(lambda record: record["uarts"][self.slot].__setitem__(key, value))

    enabled = property(
        lambda self: bool(self._port()["enabled"]), lambda self, v: self._set("enabled", bool(v))
    )
    path = property(lambda self: str(self._port()["path"]), lambda self, v: self._set("path", v))
    server = property(lambda self: bool(self._port()["server"]), lambda self, v: self._set("server", bool(v)))
    hostMode = property(
        lambda self: _PORT_MODE_VALUE[self._port()["mode"]], lambda self, v: self._set("mode", _PORT_MODE[v])
    )


class INATEngine(_Device):
    _interfaces = ("INATEngine",)

    @property
    def redirects(self) -> list[str]:
        return list(self._machine._get()["nic1"]["redirects"])

    def addRedirect(
        self, name: str, proto: int, hostIP: str, hostPort: int, guestIP: str, guestPort: int
    ) -> None:
        # INATEngine::redirects' format: name,protocol id,host-ip,host-port,guest-ip,guest-port.
        rule = f"{name},{proto},{hostIP},{hostPort},{guestIP},{guestPort}"
        # NAT rules may change while the VM runs (NATEngine::addRedirect).
        self._change(lambda record: model.add_redirect(record, rule), online=True)

    def removeRedirect(self, name: str) -> None:
        def remove(record: dict[str, Any]) -> None:
            rules = record["nic1"]["redirects"]
            kept = [r for r in rules if r.split(",", 1)[0] != name]
            if len(kept) == len(rules):
                raise VBoxError(model.E_INVALIDARG, f"A NAT rule named '{name}' does not exist")
            record["nic1"]["redirects"] = kept

        self._change(remove, online=True)


class INetworkAdapter(_Device):
    _interfaces = ("INetworkAdapter",)

    def __init__(self, machine: IMachine, slot: int) -> None:
        super().__init__(machine)
        self.slot = slot

    def _nic(self) -> dict[str, Any]:
        return dict(self._machine._get()["nic1"])

    def _set(self, key: str, value: Any) -> None:
        self._change(lambda record: record["nic1"].__setitem__(key, value))

    enabled = property(
        lambda self: bool(self._nic()["enabled"]), lambda self, v: self._set("enabled", bool(v))
    )
    attachmentType = property(
        lambda self: _ATTACHMENT_VALUE[self._nic()["attachment"]],
        lambda self, v: self._set("attachment", _ATTACHMENT[v]),
    )

    @property
    def NATEngine(self) -> INATEngine:
        return INATEngine(self._machine)


# -- machines and sessions ---------------------------------------------------------------


class IMachine:
    """
    A machine, by id. The one ``IVirtualBox.findMachine`` gives is read-only; the one of a
    write-locked session (``ISession.machine``) is mutable, as in VirtualBox.
    """

    _interfaces = ("IMachine",)

    def __init__(self, machine_id: str, session: ISession | None = None) -> None:
        self.id = machine_id
        self._session = session

    def _record(self, registry: model.Registry) -> dict[str, Any]:
        record = registry.machines.get(self.id)
        if record is None:
            raise VBoxError(
                model.VBOX_E_OBJECT_NOT_FOUND, f"Could not find a registered machine with UUID {{{self.id}}}"
            )
        return record

    def _get(self) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            with _transaction() as registry:
                return self._record(registry)

        return _com(read)

    def _require_mutable(self, record: dict[str, Any], *, online: bool = False) -> None:
        if not record["registered"]:
            return  # a machine just made by createMachine is the caller's to set up
        session = self._session
        if session is None or (session._holder != record["session"] and not (online and session._shared)):
            # Machine::i_checkStateDependency (MachineImpl.cpp).
            raise VBoxError(
                model.VBOX_E_INVALID_VM_STATE,
                f"The machine is not mutable (state is {model.STATE_NAMES.get(record['state'], 'unknown')})",
            )

    def _apply(self, change: Any, *, mutable: bool = True, online: bool = False) -> Any:
        def go() -> Any:
            with _transaction() as registry:
                record = self._record(registry)
                if mutable:
                    self._require_mutable(record, online=online)
                return change(registry, record)

        return _com(go)

    def _setting(key: str) -> Any:  # type: ignore[misc]
        return property(
            lambda self: self._get()[key],
            lambda self, value: self._apply(lambda registry, record: record.__setitem__(key, int(value))),
        )

    memorySize = _setting("memory")
    CPUCount = _setting("cpus")
    CPUExecutionCap = _setting("cpu_cap")
    del _setting

    name = property(lambda self: self._get()["name"])
    groups = property(lambda self: list(self._get()["groups"]))
    state = property(lambda self: self._get()["state"])
    lastStateChange = property(lambda self: self._get()["last_state_change"])
    settingsFilePath = property(lambda self: self._get()["settings_file"])
    stateFilePath = property(lambda self: self._get()["state_file"] or "")
    snapshotCount = property(lambda self: len(self._get()["snapshots"]))
    sessionState = property(
        lambda self: (
            _SESSION_LOCKED
            if self._get()["session"] or self._get()["state"] in model.ONLINE
            else _SESSION_UNLOCKED
        )
    )

    @property
    def currentSnapshot(self) -> ISnapshot | None:
        current = self._get()["current_snapshot"]
        return ISnapshot(self.id, current) if current else None

    def getExtraData(self, key: str) -> str:
        return str(self._get()["extra"].get(key, ""))

    def setExtraData(self, key: str, value: str) -> None:
        # Extra data may be set on any machine, locked or not (IMachine::setExtraData).
        def change(registry: model.Registry, record: dict[str, Any]) -> None:
            if value:
                record["extra"][key] = value
            else:
                record["extra"].pop(key, None)

        self._apply(change, mutable=False)

    def setGuestProperty(self, property: str, value: str, flags: str) -> None:
        # The session's machine (Machine::i_setGuestPropertyToService checks MutableStateDep;
        # a running VM's is handed to its guest property service).
        self._apply(lambda registry, record: registry.set_guest_property(record, property, value, flags),
                    online=True)

    def getGuestProperty(self, name: str) -> tuple[str, int, str]:
        found = self._apply(lambda registry, record: registry.guest_property(record, name), mutable=False)
        if found is None:
            return "", 0, ""
        return found["value"], 0, ",".join(found["flags"])

    def lockMachine(self, session: ISession, lockType: int) -> None:
        def lock(registry: model.Registry, record: dict[str, Any]) -> None:
            if session._machine_id is not None:
                raise VBoxError(model.VBOX_E_INVALID_OBJECT_STATE, "The given session is busy")
            locked = record["session"] is not None or record["state"] in model.ONLINE
            if locked and lockType == _LOCK_WRITE:
                registry.lock(record, session._holder, write=True)  # raises: it is locked
            if locked:
                session._shared = True
            else:
                registry.lock(record, session._holder, write=True)
                session._shared = False
            session._machine_id = self.id

        self._apply(lock, mutable=False)

    def launchVMProcess(self, session: ISession, name: str, environmentChanges: list[str]) -> IProgress:
        if name not in ("headless", "gui", "sdl", "separate", ""):
            raise Exception(model.E_INVALIDARG, f"Invalid frontend name: '{name}'")

        def check(registry: model.Registry, record: dict[str, Any]) -> None:
            registry.require_unlocked(record, "launch")
            registry.require_state(record, (model.POWERED_OFF, model.SAVED, model.ABORTED), "start the VM")

        self._apply(check, mutable=False)
        session._machine_id = self.id
        session._shared = True  # the session is linked to the VM process once it runs
        return IProgress(
            "Starting virtual machine", lambda: self._apply(lambda r, m: r.launch(m), mutable=False)
        )

    def addStorageController(self, name: str, connectionType: int) -> None:
        self._apply(lambda registry, record: record["controllers"].append(name))

    def attachDevice(self, name: str, controllerPort: int, device: int, type: int, medium: IMedium) -> None:
        def attach(registry: model.Registry, record: dict[str, Any]) -> None:
            if name not in record["controllers"]:
                raise VBoxError(
                    model.VBOX_E_OBJECT_NOT_FOUND, f"Could not find a storage controller named '{name}'"
                )
            registry.attach_disk(record, registry.media[medium.id])

        self._apply(attach)

    def getMedium(self, name: str, controllerPort: int, device: int) -> IMedium:
        disk = self._get()["disk"]
        if disk is None:
            raise Exception(
                model.VBOX_E_OBJECT_NOT_FOUND,
                f"No storage device attached to device slot {device} on port {controllerPort} of "
                f"controller '{name}'",
            )
        return IMedium(disk)

    def getSerialPort(self, slot: int) -> ISerialPort:
        return ISerialPort(self, slot)

    def getNetworkAdapter(self, slot: int) -> INetworkAdapter:
        return INetworkAdapter(self, slot)

    def saveSettings(self) -> None:
        # Machine::saveSettings checks MutableOrSavedOrRunningStateDep: the session's machine of a
        # running VM may save too (its guest properties, say).
        self._apply(lambda registry, record: None, online=True)

    def findSnapshot(self, nameOrId: str) -> ISnapshot:
        def find(registry: model.Registry, record: dict[str, Any]) -> str:
            return str(registry.find_snapshot(record, nameOrId)["id"])

        return ISnapshot(self.id, self._apply(find, mutable=False))

    def _session_progress(self, description: str, work: Any) -> IProgress:
        return IProgress(description, lambda: self._apply(work, online=True))

    def takeSnapshot(self, name: str, description: str, pause: bool) -> tuple[IProgress, str]:
        self._apply(lambda registry, record: None, online=True)
        snapshot_id = model.new_id()  # known at once, before the progress completes
        progress = self._session_progress(
            "Taking a snapshot of the virtual machine",
            lambda registry, record: registry.take_snapshot(record, name, description, snapshot_id),
        )
        return progress, snapshot_id

    def restoreSnapshot(self, snapshot: ISnapshot) -> IProgress:
        def check(registry: model.Registry, record: dict[str, Any]) -> None:
            registry.require_state(
                record, (model.POWERED_OFF, model.SAVED, model.ABORTED), "restore a snapshot"
            )
            registry.find_snapshot(record, snapshot.id)

        self._apply(check)
        return self._session_progress(
            "Restoring snapshot",
            lambda registry, record: registry.restore_snapshot(
                record, registry.find_snapshot(record, snapshot.id)
            ),
        )

    def deleteSnapshot(self, id: str) -> IProgress:
        self._apply(lambda registry, record: registry.find_snapshot(record, id), online=True)
        return self._session_progress(
            "Deleting snapshot",
            lambda registry, record: registry.delete_snapshot(record, registry.find_snapshot(record, id)),
        )

    def saveState(self) -> IProgress:
        self._apply(
            lambda registry, record: registry.require_state(record, model.ONLINE, "save the state"),
            online=True,
        )
        return self._session_progress(
            "Saving the execution state of the virtual machine", lambda r, m: r.save_state(m)
        )

    def unregister(self, cleanupMode: int) -> list[IMedium]:
        def go(registry: model.Registry, record: dict[str, Any]) -> list[str]:
            media = registry.unregister(record)
            registry.data.setdefault("unregistered", {})[record["id"]] = record
            return media

        return [IMedium(m) for m in self._apply(go, mutable=False)]

    def deleteConfig(self, media: list[IMedium]) -> IProgress:
        def delete() -> None:
            with _transaction() as registry:
                record = registry.data.get("unregistered", {}).pop(self.id)
                registry.delete_config(record, [m.id for m in media])

        return IProgress("Deleting files", delete)


class IConsole:
    _interfaces = ("IConsole",)

    def __init__(self, session: ISession) -> None:
        # The console is the VM process's: it outlives the client session that found it.
        self._session = session
        self._machine_id = session._machine_id or ""

    @property
    def machine(self) -> IMachine:
        return IMachine(self._machine_id, self._session)

    def _do(self, work: Any) -> Any:
        return self.machine._apply(work, mutable=False)

    def powerDown(self) -> IProgress:
        self._do(lambda registry, record: registry.require_state(record, (*model.ONLINE, 7), "power off"))
        return IProgress(
            "Powering off the virtual machine",
            lambda: self._do(lambda registry, record: registry.set_state(record, model.POWERED_OFF)),
        )

    def powerButton(self) -> None:
        self._do(lambda registry, record: registry.power_button(record))

    def pause(self) -> None:
        def pause(registry: model.Registry, record: dict[str, Any]) -> None:
            registry.require_state(record, (model.RUNNING,), "pause")
            registry.set_state(record, model.PAUSED)

        self._do(pause)

    def resume(self) -> None:
        def resume(registry: model.Registry, record: dict[str, Any]) -> None:
            registry.require_state(record, (model.PAUSED,), "resume")
            registry.set_state(record, model.RUNNING)

        self._do(resume)

    def reset(self) -> None:
        self._do(lambda registry, record: registry.reset(record))


class ISession:
    _interfaces = ("ISession",)
    _count = 0

    def __init__(self) -> None:
        ISession._count += 1
        self._holder = f"session-{os.getpid()}-{ISession._count}"
        self._machine_id: str | None = None
        self._shared = False

    @property
    def state(self) -> int:
        return _SESSION_LOCKED if self._machine_id else _SESSION_UNLOCKED

    @property
    def type(self) -> int:
        if self._machine_id is None:
            return 0
        return _SESSION_TYPE["Shared" if self._shared else "WriteLock"]

    @property
    def machine(self) -> IMachine | None:
        return IMachine(self._machine_id, self) if self._machine_id else None

    @property
    def console(self) -> IConsole | None:
        # Only a session linked to a running VM has a console (ISession::console).
        if self._machine_id is None:
            return None
        with _transaction() as registry:
            record = registry.machines.get(self._machine_id)
            online = record is not None and record["state"] in model.ONLINE
        return IConsole(self) if online else None

    def unlockMachine(self) -> None:
        if self._machine_id is None:
            raise Exception(
                model.VBOX_E_INVALID_OBJECT_STATE, "The session is not locked (session state: Unlocked)"
            )
        machine_id, self._machine_id = self._machine_id, None
        with _transaction() as registry:
            record = registry.machines.get(machine_id)
            if record is not None:
                registry.unlock(record, self._holder)


class IVirtualBox:
    _interfaces = ("IVirtualBox",)
    version = "6.1.50"
    revision = 161033

    def __init__(self) -> None:
        self.eventSource = IEventSource()

    @property
    def machines(self) -> list[IMachine]:
        with _transaction() as registry:
            return [IMachine(m["id"]) for m in registry.machines.values() if m["registered"]]

    def composeMachineFilename(self, name: str, group: str, createFlags: str, baseFolder: str) -> str:
        return os.path.join(baseFolder, name, f"{name}.vbox")

    def createMachine(
        self, settingsFile: str, name: str, groups: list[str], osTypeId: str, flags: str
    ) -> IMachine:
        def create() -> str:
            with _transaction() as registry:
                record = registry.create_machine(settingsFile, name, groups)
                record["registered"] = False
                return str(record["id"])

        return IMachine(_com(create))

    def registerMachine(self, machine: IMachine) -> None:
        machine._apply(lambda registry, record: record.__setitem__("registered", True), mutable=False)

    def findMachine(self, nameOrId: str) -> IMachine:
        def find() -> str:
            with _transaction() as registry:
                return str(registry.find_machine(nameOrId)["id"])

        return IMachine(_com(find))

    def openMedium(self, location: str, deviceType: int, accessMode: int, forceNewUuid: bool) -> IMedium:
        def open_() -> str:
            with _transaction() as registry:
                return str(registry.open_medium(location)["id"])

        return IMedium(_com(open_))


class VirtualBoxManager:
    """``vboxapi.VirtualBoxManager``: the entry points pyvbox's ``Manager`` uses."""

    def __init__(self, style: str | None = None, params: Any = None) -> None:
        self.style = style

    def getVirtualBox(self) -> IVirtualBox:
        if _home is None:
            raise Exception(0x80004005, "VBoxSVC is not running (call vboxapi.use_home first)")
        return IVirtualBox()

    def getSessionObject(self, vbox: Any = None) -> ISession:
        return ISession()

    def queryInterface(self, obj: Any, name: str) -> Any:
        if name in type(obj)._interfaces or name in getattr(type(obj), "_bases", ()):
            return obj
        raise Exception(0x80004002, f"no interface {name} on {type(obj).__name__}")  # E_NOINTERFACE

    def getBinDir(self) -> str:
        return str(Path(__file__).resolve().parent.parent)

    def initPerThread(self) -> None:
        return None

    def deinitPerThread(self) -> None:
        return None
