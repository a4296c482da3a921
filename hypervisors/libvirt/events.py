"""
libvirt's event loop on a Twisted reactor, and libvirt's domain events in our vocabulary.

libvirt delivers events (domain lifecycle, connection keepalive and close) only through an
event loop implementation registered with ``virEventRegisterImpl`` before the first
connection: six callbacks that watch file descriptors and run timers. :class:`ReactorEventLoop`
implements them on the reactor's ``addReader``/``addWriter`` and ``callLater``, after
libvirt-python's own ``libvirtaio.py`` (the same for asyncio), so that every libvirt callback
runs on the reactor thread. :class:`LifecycleTranslator` turns libvirt's event and detail
numbers into :class:`~hypervisors.interface.VMEvent`.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import libvirt
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hypervisors.interface import VMEvent, VMEventType, VMState

__all__ = ["LifecycleTranslator", "ReactorEventLoop", "event_loop"]

_READABLE = libvirt.VIR_EVENT_HANDLE_READABLE
_WRITABLE = libvirt.VIR_EVENT_HANDLE_WRITABLE
_HANGUP = libvirt.VIR_EVENT_HANDLE_HANGUP

HandleCallback = Callable[[int, int, int, Any], object]
TimerCallback = Callable[[int, Any], object]


@dataclass
class _Handle:
    watch: int
    fd: int
    events: int
    callback: HandleCallback
    opaque: Any


@implementer(IReadDescriptor, IWriteDescriptor)
class _Descriptor:
    """
    One file descriptor in the reactor, for every libvirt handle on it: the reactor keys its
    readers and writers by descriptor number, so two handles on one fd must share this.

    The reactor watches a duplicate of libvirt's fd, made while libvirt's is surely open (in
    its add call) and closed once the reactor let go of it: libvirt closes its fd right after
    removing the handle, before the reactor thread can unwatch it, and an epoll reactor cannot
    unwatch a closed fd (or would unwatch whatever socket got its number meanwhile).
    """

    def __init__(self, loop: ReactorEventLoop, fd: int) -> None:
        self._loop = loop
        self.fd = fd
        self.handles: dict[int, _Handle] = {}
        #: What the reactor watches now: a subset of READABLE | WRITABLE.
        self.watching = 0
        self._watched_fd: int | None = os.dup(fd)

    def fileno(self) -> int:
        return -1 if self._watched_fd is None else self._watched_fd

    def close(self) -> None:
        """Close the duplicate (the reactor no longer watches it)."""
        if self._watched_fd is not None:
            os.close(self._watched_fd)
            self._watched_fd = None

    def logPrefix(self) -> str:
        return "libvirt-fd"

    def doRead(self) -> None:
        self._dispatch(_READABLE)

    def doWrite(self) -> None:
        self._dispatch(_WRITABLE)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw a hang-up or error and dropped this descriptor: tell libvirt, which
        # then removes or updates its handles.
        self.watching = 0
        self._dispatch(_HANGUP)

    def _dispatch(self, event: int) -> None:
        for handle in list(self.handles.values()):
            if handle.events & event or event == _HANGUP:
                self._loop.invoke(handle.callback, handle.watch, self.fd, event, handle.opaque)

    @property
    def wanted(self) -> int:
        events = 0
        for handle in self.handles.values():
            events |= handle.events
        return events & (_READABLE | _WRITABLE)


@dataclass
class _Timer:
    timer: int
    #: Milliseconds between calls; 0: at the next reactor iteration; negative: disabled.
    interval: int
    callback: TimerCallback
    opaque: Any
    call: IDelayedCall | None = field(default=None)


class ReactorEventLoop:
    """
    libvirt's event loop on a reactor: the six ``virEventRegisterImpl`` callbacks.

    libvirt calls them from any thread (a worker thread opening a connection registers its
    socket), so they only record what libvirt wants, under a lock, and hand the reactor work to
    the reactor thread with ``callFromThread``. Handles and timers fire on the reactor thread.

    Register one per process, before the first connection, with :func:`event_loop`; it runs on
    one reactor at a time (:meth:`attach`), the reactor of the drivers that use it.

    :param free: libvirt's call that frees a removed handle's or timer's opaque data; libvirt
        forbids calling it from within the remove callback, so it runs on the reactor later.
    """

    log = Logger()

    def __init__(self, free: Callable[[Any], object] = libvirt.virEventInvokeFreeCallback) -> None:
        self._free = free
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._handles: dict[int, _Handle] = {}
        self._descriptors: dict[int, _Descriptor] = {}
        self._timers: dict[int, _Timer] = {}
        self._reactor: Any = None
        #: Reactors of running users, with how many use each; the last one attached is used.
        self._users: list[Any] = []
        self._unfreed: list[Any] = []

    # -- binding to a reactor -----------------------------------------------------------------

    def register(self) -> None:
        """Make this libvirt's event loop implementation (once per process)."""
        libvirt.virEventRegisterImpl(
            self.add_handle,
            self.update_handle,
            self.remove_handle,
            self.add_timeout,
            self.update_timeout,
            self.remove_timeout,
        )

    def attach(self, reactor: Any) -> None:
        """
        Run libvirt's handles and timers on ``reactor`` (call on its thread) until
        :meth:`detach`. Several users may attach; the most recent reactor still attached runs
        them (in a test process, drivers on different reactors one after the other).
        """
        self._users.append(reactor)
        self._move_to(reactor)

    def detach(self, reactor: Any) -> None:
        """Undo one :meth:`attach`; the loop moves to the reactor attached before, if any."""
        self._users.remove(reactor)
        self._move_to(self._users[-1] if self._users else None)

    def _move_to(self, reactor: Any) -> None:
        if reactor is self._reactor:
            return
        with self._lock:
            old, self._reactor = self._reactor, reactor
            descriptors = list(self._descriptors.values())
            timers = list(self._timers.values())
            unfreed, self._unfreed = self._unfreed, []
        for descriptor in descriptors:
            self._watch(old, descriptor, 0)
        for timer in timers:
            if timer.call is not None and timer.call.active():
                timer.call.cancel()
            timer.call = None
        if reactor is None:
            return
        for descriptor in descriptors:
            self._sync_descriptor(descriptor)
        for timer in timers:
            self._sync_timer(timer)
        for opaque in unfreed:
            reactor.callLater(0, self._free, opaque)

    def _on_reactor(self, fn: Callable[..., object], *args: Any) -> bool:
        """Call ``fn`` on the reactor thread; ``False`` when no reactor is attached."""
        with self._lock:
            reactor = self._reactor
        if reactor is None:
            return False
        reactor.callFromThread(fn, *args)
        return True

    def invoke(self, callback: Callable[..., object], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            self.log.failure("libvirt event callback {callback!r} failed", callback=callback)

    # -- handles ------------------------------------------------------------------------------

    def add_handle(self, fd: int, events: int, callback: HandleCallback, opaque: Any) -> int:
        """``virEventAddHandleFunc``: watch ``fd`` for ``events``; returns the watch number."""
        with self._lock:
            watch = next(self._ids)
            handle = self._handles[watch] = _Handle(watch, fd, events, callback, opaque)
            descriptor = self._descriptors.get(fd)
            if descriptor is None:
                descriptor = self._descriptors[fd] = _Descriptor(self, fd)
            descriptor.handles[watch] = handle
        self._on_reactor(self._sync_descriptor, descriptor)
        return watch

    def update_handle(self, watch: int, events: int) -> None:
        """``virEventUpdateHandleFunc``: watch for ``events`` now (0: none for the moment)."""
        with self._lock:
            handle = self._handles.get(watch)
            if handle is None:
                return
            handle.events = events
            descriptor = self._descriptors[handle.fd]
        self._on_reactor(self._sync_descriptor, descriptor)

    def remove_handle(self, watch: int) -> int:
        """``virEventRemoveHandleFunc``: stop watching; -1 for an unknown watch."""
        with self._lock:
            handle = self._handles.pop(watch, None)
            if handle is None:
                return -1
            descriptor = self._descriptors[handle.fd]
            del descriptor.handles[watch]
            if not descriptor.handles:
                del self._descriptors[handle.fd]
        if not self._on_reactor(self._sync_descriptor, descriptor) and not descriptor.handles:
            descriptor.close()  # no reactor watches it
        self._schedule_free(handle.opaque)
        return 0

    def _sync_descriptor(self, descriptor: _Descriptor) -> None:
        # On the reactor thread: make the reactor watch what the handles want now.
        with self._lock:
            reactor = self._reactor
            live = self._descriptors.get(descriptor.fd) is descriptor
        self._watch(reactor, descriptor, descriptor.wanted if live else 0)
        if not live:
            descriptor.close()

    @staticmethod
    def _watch(reactor: Any, descriptor: _Descriptor, wanted: int) -> None:
        if reactor is None:
            descriptor.watching = 0
            return
        for flag, add, remove in (
            (_READABLE, reactor.addReader, reactor.removeReader),
            (_WRITABLE, reactor.addWriter, reactor.removeWriter),
        ):
            if wanted & flag and not descriptor.watching & flag:
                add(descriptor)
            elif descriptor.watching & flag and not wanted & flag:
                remove(descriptor)
        descriptor.watching = wanted

    # -- timers -------------------------------------------------------------------------------

    def add_timeout(self, interval: int, callback: TimerCallback, opaque: Any) -> int:
        """``virEventAddTimeoutFunc``: call ``callback`` every ``interval`` ms (negative: off)."""
        with self._lock:
            timer = next(self._ids)
            record = self._timers[timer] = _Timer(timer, interval, callback, opaque)
        self._on_reactor(self._sync_timer, record)
        return timer

    def update_timeout(self, timer: int, interval: int) -> None:
        """``virEventUpdateTimeoutFunc``: change a timer's interval (negative: off)."""
        with self._lock:
            record = self._timers.get(timer)
            if record is None:
                return
            record.interval = interval
        # Restart it: libvirt counts the new interval from now.
        self._on_reactor(self._sync_timer, record, True)

    def remove_timeout(self, timer: int) -> int:
        """``virEventRemoveTimeoutFunc``: drop a timer; -1 for an unknown one."""
        with self._lock:
            record = self._timers.pop(timer, None)
            if record is None:
                return -1
        self._on_reactor(self._sync_timer, record)
        self._schedule_free(record.opaque)
        return 0

    def _sync_timer(self, record: _Timer, restart: bool = False) -> None:
        with self._lock:
            reactor = self._reactor
            live = self._timers.get(record.timer) is record and record.interval >= 0
        if record.call is not None and record.call.active() and (restart or not live):
            record.call.cancel()
            record.call = None
        if live and reactor is not None and (record.call is None or not record.call.active()):
            record.call = reactor.callLater(record.interval / 1000, self._fire, record)

    def _fire(self, record: _Timer) -> None:
        record.call = None
        with self._lock:
            live = self._timers.get(record.timer) is record and record.interval >= 0
        if not live:
            return
        self.invoke(record.callback, record.timer, record.opaque)
        # Again after the interval, unless the callback changed or removed the timer.
        self._sync_timer(record)

    def _schedule_free(self, opaque: Any) -> None:
        with self._lock:
            reactor = self._reactor
            if reactor is None:
                self._unfreed.append(opaque)
                return
        reactor.callFromThread(reactor.callLater, 0, self._free, opaque)


_registered: ReactorEventLoop | None = None
_registered_lock = threading.Lock()


def event_loop() -> ReactorEventLoop:
    """
    The process's libvirt event loop, registered with libvirt on first use. libvirt takes one
    implementation per process, for good, and only connections opened after it have events:
    call this before the first ``libvirt.open``.
    """
    global _registered
    with _registered_lock:
        if _registered is None:
            loop = ReactorEventLoop()
            loop.register()
            _registered = loop
        return _registered


# -- domain events --------------------------------------------------------------------------

_E = libvirt
#: (event, detail) -> (what happened, the state after); a missing detail uses (event, None).
_LIFECYCLE: dict[tuple[int, int | None], tuple[VMEventType, VMState] | None] = {
    (_E.VIR_DOMAIN_EVENT_DEFINED, _E.VIR_DOMAIN_EVENT_DEFINED_ADDED): (VMEventType.DEFINED, VMState.SHUTOFF),
    (_E.VIR_DOMAIN_EVENT_DEFINED, _E.VIR_DOMAIN_EVENT_DEFINED_RENAMED): (
        VMEventType.DEFINED,
        VMState.SHUTOFF,
    ),
    # A changed definition (also by a snapshot revert) is no state change.
    (_E.VIR_DOMAIN_EVENT_DEFINED, None): None,
    (_E.VIR_DOMAIN_EVENT_UNDEFINED, None): (VMEventType.UNDEFINED, VMState.NOSTATE),
    (_E.VIR_DOMAIN_EVENT_STARTED, _E.VIR_DOMAIN_EVENT_STARTED_RESTORED): (
        VMEventType.RESTORED,
        VMState.RUNNING,
    ),
    (_E.VIR_DOMAIN_EVENT_STARTED, _E.VIR_DOMAIN_EVENT_STARTED_FROM_SNAPSHOT): (
        VMEventType.RESTORED,
        VMState.RUNNING,
    ),
    (_E.VIR_DOMAIN_EVENT_STARTED, _E.VIR_DOMAIN_EVENT_STARTED_WAKEUP): (VMEventType.RESUMED, VMState.RUNNING),
    (_E.VIR_DOMAIN_EVENT_STARTED, None): (VMEventType.STARTED, VMState.RUNNING),
    (_E.VIR_DOMAIN_EVENT_SUSPENDED, None): (VMEventType.PAUSED, VMState.PAUSED),
    (_E.VIR_DOMAIN_EVENT_RESUMED, None): (VMEventType.RESUMED, VMState.RUNNING),
    (_E.VIR_DOMAIN_EVENT_STOPPED, _E.VIR_DOMAIN_EVENT_STOPPED_CRASHED): (
        VMEventType.CRASHED,
        VMState.CRASHED,
    ),
    # The emulator failed: a killed or crashed qemu process.
    (_E.VIR_DOMAIN_EVENT_STOPPED, _E.VIR_DOMAIN_EVENT_STOPPED_FAILED): (VMEventType.CRASHED, VMState.CRASHED),
    (_E.VIR_DOMAIN_EVENT_STOPPED, _E.VIR_DOMAIN_EVENT_STOPPED_SAVED): (VMEventType.SAVED, VMState.SAVED),
    (_E.VIR_DOMAIN_EVENT_STOPPED, None): (VMEventType.SHUTOFF, VMState.SHUTOFF),
    # The guest processes a shutdown; STOPPED follows when it is done (see LifecycleTranslator).
    (_E.VIR_DOMAIN_EVENT_SHUTDOWN, None): None,
    (_E.VIR_DOMAIN_EVENT_PMSUSPENDED, _E.VIR_DOMAIN_EVENT_PMSUSPENDED_MEMORY): (
        VMEventType.PAUSED,
        VMState.PMSUSPENDED,
    ),
    # Suspended to disk: STOPPED follows.
    (_E.VIR_DOMAIN_EVENT_PMSUSPENDED, None): None,
    (_E.VIR_DOMAIN_EVENT_CRASHED, None): (VMEventType.CRASHED, VMState.CRASHED),
}

_EVENT_NAMES = {
    _E.VIR_DOMAIN_EVENT_DEFINED: "defined",
    _E.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    _E.VIR_DOMAIN_EVENT_STARTED: "started",
    _E.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    _E.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    _E.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    _E.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    _E.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    _E.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


class LifecycleTranslator:
    """
    libvirt's lifecycle and reboot events of the VMs, as :class:`VMEvent` (or nothing).

    Two things libvirt does not say directly: whether a shutdown was the guest's own idea (QEMU
    reports an ACPI shutdown the host asked for as guest-initiated too), and whether a reset
    was the host's. The driver says what it asked for (:meth:`host_shutdown`,
    :meth:`host_reset`); what it did not ask for is the guest's.
    """

    def __init__(self) -> None:
        self._guest_shutdown: set[str] = set()
        self._host_shutdown: set[str] = set()
        self._host_reset: set[str] = set()
        self._saved: set[str] = set()

    def host_shutdown(self, vm: str) -> None:
        """The driver asks ``vm`` to shut down: its completion is no guest shutdown."""
        self._host_shutdown.add(vm)

    def host_reset(self, vm: str, asked: bool = True) -> None:
        """The driver resets ``vm`` (``asked=False``: the reset failed, forget it)."""
        if asked:
            self._host_reset.add(vm)
        else:
            self._host_reset.discard(vm)

    def lifecycle(self, vm: str, event: int, detail: int) -> VMEvent | None:
        words = f"libvirt {_EVENT_NAMES.get(event, str(event))} event, detail {detail}"
        if event == _E.VIR_DOMAIN_EVENT_SHUTDOWN:
            if detail == _E.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST and vm not in self._host_shutdown:
                self._guest_shutdown.add(vm)
            return None
        key = (event, detail) if (event, detail) in _LIFECYCLE else (event, None)
        mapped = _LIFECYCLE.get(key)
        if event in (_E.VIR_DOMAIN_EVENT_STOPPED, _E.VIR_DOMAIN_EVENT_UNDEFINED):
            guest = vm in self._guest_shutdown
            self._guest_shutdown.discard(vm)
            self._host_shutdown.discard(vm)
            if guest and detail == _E.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN:
                return VMEvent(vm, VMEventType.GUEST_SHUTDOWN, VMState.SHUTOFF, words)
        if mapped is None:
            return None
        kind, state = mapped
        if event == _E.VIR_DOMAIN_EVENT_STARTED and vm in self._saved:
            # libvirt's test driver says "booted" when it restores a managed save.
            kind = VMEventType.RESTORED
        if event in (_E.VIR_DOMAIN_EVENT_STARTED, _E.VIR_DOMAIN_EVENT_UNDEFINED):
            self._saved.discard(vm)
        elif kind is VMEventType.SAVED:
            self._saved.add(vm)
        return VMEvent(vm, kind, state, words)

    def reboot(self, vm: str) -> VMEvent:
        if vm in self._host_reset:
            self._host_reset.discard(vm)
            return VMEvent(vm, VMEventType.RESET, VMState.RUNNING, "libvirt reboot event after a reset")
        return VMEvent(vm, VMEventType.GUEST_REBOOT, VMState.RUNNING, "libvirt reboot event")
