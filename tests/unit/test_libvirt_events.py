"""
libvirt's event loop on a reactor (the six virEventRegisterImpl callbacks, driven here the way
libvirt drives them) and the translation of libvirt's lifecycle events. A MemoryReactorClock,
no libvirtd: the end-to-end run is in tests/local/test_libvirt_test_driver.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from hypervisors.interface import VMEvent, VMEventType, VMState
from hypervisors.libvirt.events import LifecycleTranslator, ReactorEventLoop

READABLE = libvirt.VIR_EVENT_HANDLE_READABLE
WRITABLE = libvirt.VIR_EVENT_HANDLE_WRITABLE
HANGUP = libvirt.VIR_EVENT_HANDLE_HANGUP


class Reactor(MemoryReactorClock):
    """A memory reactor whose callFromThread queues the call for the next iteration, as a real one."""

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.callLater(0, f, *args, **kwargs)


class Libvirt:
    """What libvirt passes: callbacks that record their calls, and the free function."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.freed: list[Any] = []

    def handle(self, watch: int, fd: int, events: int, opaque: Any) -> None:
        self.calls.append(("handle", watch, fd, events, opaque))

    def timer(self, timer: int, opaque: Any) -> None:
        self.calls.append(("timer", timer, opaque))


def make(reactor: Reactor | None = None) -> tuple[ReactorEventLoop, Reactor, Libvirt]:
    lib = Libvirt()
    loop = ReactorEventLoop(free=lib.freed.append)
    reactor = reactor or Reactor()
    loop.attach(reactor)
    return loop, reactor, lib


def fds(descriptors: Any) -> set[int]:
    """The libvirt fds behind the reactor's descriptors."""
    return {d.fd for d in descriptors}


@pytest.fixture(autouse=True)
def fd7(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """libvirt's socket in these tests: a pipe's read end, known as 7 to libvirt's callbacks."""
    read, write = os.pipe()
    real_dup = os.dup
    monkeypatch.setattr(os, "dup", lambda fd: real_dup(read if fd == 7 else fd))
    yield read
    os.close(read)
    os.close(write)


def test_a_handle_is_watched_on_the_reactor_thread_and_dispatched() -> None:
    loop, reactor, lib = make()
    watch = loop.add_handle(7, READABLE, lib.handle, "conn")
    assert reactor.readers == set()  # not yet: handed to the reactor thread
    reactor.advance(0)
    assert (fds(reactor.readers), reactor.writers) == ({7}, set())
    (descriptor,) = reactor.readers
    descriptor.doRead()
    assert lib.calls == [("handle", watch, 7, READABLE, "conn")]


def test_update_moves_a_handle_between_reading_writing_and_nothing() -> None:
    loop, reactor, lib = make()
    watch = loop.add_handle(7, READABLE, lib.handle, None)
    loop.update_handle(watch, READABLE | WRITABLE)
    reactor.advance(0)
    assert (fds(reactor.readers), fds(reactor.writers)) == ({7}, {7})
    loop.update_handle(watch, WRITABLE)
    reactor.advance(0)
    assert (fds(reactor.readers), fds(reactor.writers)) == (set(), {7})
    loop.update_handle(watch, 0)
    reactor.advance(0)
    assert (reactor.readers, reactor.writers) == (set(), set())
    loop.update_handle(12345, READABLE)  # unknown: ignored


def test_two_handles_on_one_fd_share_the_reactors_descriptor() -> None:
    loop, reactor, lib = make()
    reader = loop.add_handle(7, READABLE, lib.handle, "r")
    writer = loop.add_handle(7, WRITABLE, lib.handle, "w")
    reactor.advance(0)
    ((read_side,), (write_side,)) = (reactor.readers, reactor.writers)
    assert read_side is write_side
    read_side.doRead()
    write_side.doWrite()
    assert lib.calls == [("handle", reader, 7, READABLE, "r"), ("handle", writer, 7, WRITABLE, "w")]
    assert loop.remove_handle(reader) == 0
    reactor.advance(0)
    assert (reactor.readers, fds(reactor.writers)) == (set(), {7})


def test_a_removed_handle_is_unwatched_and_freed_later() -> None:
    loop, reactor, lib = make()
    watch = loop.add_handle(7, READABLE, lib.handle, "opaque")
    reactor.advance(0)
    assert loop.remove_handle(watch) == 0
    # libvirt forbids freeing from within the remove callback.
    assert lib.freed == []
    reactor.advance(0)
    reactor.advance(0)
    assert (reactor.readers, lib.freed) == (set(), ["opaque"])
    assert loop.remove_handle(watch) == -1


def test_the_reactor_watches_a_duplicate_closed_after_libvirt_let_go(fd7: int) -> None:
    """libvirt closes its fd right after removing the handle, before the reactor thread runs."""
    loop, reactor, lib = make()
    watch = loop.add_handle(7, READABLE, lib.handle, None)
    reactor.advance(0)
    (descriptor,) = reactor.readers
    duplicate = descriptor.fileno()
    assert duplicate not in (7, fd7, -1)
    assert os.fstat(duplicate).st_ino == os.fstat(fd7).st_ino
    loop.remove_handle(watch)
    os.fstat(duplicate)  # still open: the reactor has not let go yet
    reactor.advance(0)
    assert reactor.readers == set()
    with pytest.raises(OSError):
        os.fstat(duplicate)
    assert descriptor.fileno() == -1


def test_a_hang_up_reaches_every_handle_of_the_fd() -> None:
    loop, reactor, lib = make()
    watch = loop.add_handle(7, READABLE, lib.handle, None)
    reactor.advance(0)
    (descriptor,) = reactor.readers
    descriptor.connectionLost(Failure(ConnectionError("gone")))
    assert lib.calls == [("handle", watch, 7, HANGUP, None)]


def test_a_timer_repeats_until_disabled() -> None:
    loop, reactor, lib = make()
    timer = loop.add_timeout(500, lib.timer, "t")
    reactor.advance(0)
    reactor.advance(0.499)
    assert lib.calls == []
    reactor.advance(0.001)
    reactor.advance(0.5)
    assert lib.calls == [("timer", timer, "t")] * 2
    loop.update_timeout(timer, -1)
    reactor.advance(0)
    reactor.advance(5)
    assert len(lib.calls) == 2
    assert reactor.getDelayedCalls() == []


def test_update_restarts_a_timer_with_its_new_interval() -> None:
    loop, reactor, lib = make()
    timer = loop.add_timeout(-1, lib.timer, None)
    reactor.advance(0)
    assert reactor.getDelayedCalls() == []
    loop.update_timeout(timer, 1000)
    reactor.advance(0)
    reactor.advance(0.6)
    loop.update_timeout(timer, 1000)  # counted from now again
    reactor.advance(0)
    reactor.advance(0.6)
    assert lib.calls == []
    reactor.advance(0.4)
    assert lib.calls == [("timer", timer, None)]


def test_a_zero_timer_fires_at_each_iteration_and_may_disable_itself() -> None:
    lib = Libvirt()
    loop = ReactorEventLoop(free=lib.freed.append)
    reactor = Reactor()
    loop.attach(reactor)

    def once(timer: int, opaque: Any) -> None:
        lib.calls.append(("timer", timer, opaque))
        loop.update_timeout(timer, -1)

    timer = loop.add_timeout(0, once, None)
    for _ in range(5):
        reactor.advance(0)
    assert lib.calls == [("timer", timer, None)]


def test_a_removed_timer_never_fires_and_is_freed() -> None:
    loop, reactor, lib = make()
    timer = loop.add_timeout(100, lib.timer, "t")
    reactor.advance(0)
    assert loop.remove_timeout(timer) == 0
    for _ in range(3):
        reactor.advance(1)
    assert (lib.calls, lib.freed) == ([], ["t"])
    assert loop.remove_timeout(timer) == -1


def test_a_failing_callback_is_logged_and_the_loop_goes_on() -> None:
    loop, reactor, lib = make()

    def broken(timer: int, opaque: Any) -> None:
        raise RuntimeError("callback bug")

    loop.add_timeout(100, broken, None)
    other = loop.add_timeout(100, lib.timer, None)
    reactor.advance(0)
    reactor.advance(0.1)
    reactor.advance(0.1)
    assert lib.calls == [("timer", other, None)] * 2


def test_the_loop_moves_to_the_reactor_attached_last_and_back() -> None:
    loop, first, lib = make()
    watch = loop.add_handle(7, READABLE, lib.handle, None)
    loop.add_timeout(1000, lib.timer, None)
    first.advance(0)
    second = Reactor()
    loop.attach(second)
    assert (first.readers, first.getDelayedCalls()) == (set(), [])
    assert fds(second.readers) == {7}
    assert len(second.getDelayedCalls()) == 1
    loop.detach(second)
    assert (second.readers, second.getDelayedCalls()) == (set(), [])
    assert fds(first.readers) == {7}
    loop.detach(first)
    assert first.readers == set()
    # Unattached, libvirt's calls are still recorded and taken up by the next reactor.
    assert loop.remove_handle(watch) == 0
    third = Reactor()
    loop.attach(third)
    third.advance(0)
    assert third.readers == set()
    assert lib.freed == [None]


# -- LifecycleTranslator ----------------------------------------------------------------------

E = libvirt


@pytest.mark.parametrize(
    ("event", "detail", "expected"),
    [
        (
            E.VIR_DOMAIN_EVENT_DEFINED,
            E.VIR_DOMAIN_EVENT_DEFINED_ADDED,
            (VMEventType.DEFINED, VMState.SHUTOFF),
        ),
        (E.VIR_DOMAIN_EVENT_DEFINED, E.VIR_DOMAIN_EVENT_DEFINED_UPDATED, None),
        (
            E.VIR_DOMAIN_EVENT_UNDEFINED,
            E.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED,
            (VMEventType.UNDEFINED, VMState.NOSTATE),
        ),
        (
            E.VIR_DOMAIN_EVENT_STARTED,
            E.VIR_DOMAIN_EVENT_STARTED_BOOTED,
            (VMEventType.STARTED, VMState.RUNNING),
        ),
        (
            E.VIR_DOMAIN_EVENT_STARTED,
            E.VIR_DOMAIN_EVENT_STARTED_RESTORED,
            (VMEventType.RESTORED, VMState.RUNNING),
        ),
        (
            E.VIR_DOMAIN_EVENT_STARTED,
            E.VIR_DOMAIN_EVENT_STARTED_FROM_SNAPSHOT,
            (VMEventType.RESTORED, VMState.RUNNING),
        ),
        (
            E.VIR_DOMAIN_EVENT_SUSPENDED,
            E.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED,
            (VMEventType.PAUSED, VMState.PAUSED),
        ),
        (
            E.VIR_DOMAIN_EVENT_SUSPENDED,
            E.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR,
            (VMEventType.PAUSED, VMState.PAUSED),
        ),
        (
            E.VIR_DOMAIN_EVENT_RESUMED,
            E.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED,
            (VMEventType.RESUMED, VMState.RUNNING),
        ),
        (
            E.VIR_DOMAIN_EVENT_STOPPED,
            E.VIR_DOMAIN_EVENT_STOPPED_DESTROYED,
            (VMEventType.SHUTOFF, VMState.SHUTOFF),
        ),
        (
            E.VIR_DOMAIN_EVENT_STOPPED,
            E.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN,
            (VMEventType.SHUTOFF, VMState.SHUTOFF),
        ),
        (
            E.VIR_DOMAIN_EVENT_STOPPED,
            E.VIR_DOMAIN_EVENT_STOPPED_CRASHED,
            (VMEventType.CRASHED, VMState.CRASHED),
        ),
        (
            E.VIR_DOMAIN_EVENT_STOPPED,
            E.VIR_DOMAIN_EVENT_STOPPED_FAILED,
            (VMEventType.CRASHED, VMState.CRASHED),
        ),
        (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_SAVED, (VMEventType.SAVED, VMState.SAVED)),
        (E.VIR_DOMAIN_EVENT_SHUTDOWN, E.VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED, None),
        (
            E.VIR_DOMAIN_EVENT_PMSUSPENDED,
            E.VIR_DOMAIN_EVENT_PMSUSPENDED_MEMORY,
            (VMEventType.PAUSED, VMState.PMSUSPENDED),
        ),
        (E.VIR_DOMAIN_EVENT_PMSUSPENDED, E.VIR_DOMAIN_EVENT_PMSUSPENDED_DISK, None),
        (
            E.VIR_DOMAIN_EVENT_CRASHED,
            E.VIR_DOMAIN_EVENT_CRASHED_PANICKED,
            (VMEventType.CRASHED, VMState.CRASHED),
        ),
    ],
)
def test_lifecycle_mapping(event: int, detail: int, expected: tuple[VMEventType, VMState] | None) -> None:
    got = LifecycleTranslator().lifecycle("vm1", event, detail)
    assert (None if got is None else (got.vm, got.type, got.state)) == (
        None if expected is None else ("vm1", *expected)
    )


def kinds(translator: LifecycleTranslator, *events: tuple[int, int]) -> list[VMEventType]:
    got = [translator.lifecycle("vm1", event, detail) for event, detail in events]
    return [e.type for e in got if e is not None]


GUEST_SHUTDOWN = (E.VIR_DOMAIN_EVENT_SHUTDOWN, E.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST)
STOPPED_SHUTDOWN = (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)


def test_a_shutdown_the_guest_began_is_a_guest_shutdown() -> None:
    translator = LifecycleTranslator()
    assert kinds(translator, GUEST_SHUTDOWN, STOPPED_SHUTDOWN) == [VMEventType.GUEST_SHUTDOWN]
    # Only that once: the next stop is the host's.
    assert kinds(translator, STOPPED_SHUTDOWN) == [VMEventType.SHUTOFF]


def test_a_shutdown_the_host_asked_for_is_a_shutoff() -> None:
    translator = LifecycleTranslator()
    translator.host_shutdown("vm1")
    assert kinds(translator, GUEST_SHUTDOWN, STOPPED_SHUTDOWN) == [VMEventType.SHUTOFF]
    assert kinds(translator, GUEST_SHUTDOWN, STOPPED_SHUTDOWN) == [VMEventType.GUEST_SHUTDOWN]


def test_a_start_after_a_save_is_a_restore_whatever_the_detail() -> None:
    translator = LifecycleTranslator()
    booted = (E.VIR_DOMAIN_EVENT_STARTED, E.VIR_DOMAIN_EVENT_STARTED_BOOTED)
    saved = (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_SAVED)
    assert kinds(translator, saved, booted, booted) == [
        VMEventType.SAVED,
        VMEventType.RESTORED,
        VMEventType.STARTED,
    ]


def test_a_reboot_is_the_guests_unless_the_host_reset() -> None:
    translator = LifecycleTranslator()
    assert translator.reboot("vm1") == VMEvent(
        "vm1", VMEventType.GUEST_REBOOT, VMState.RUNNING, "libvirt reboot event"
    )
    translator.host_reset("vm1")
    assert translator.reboot("vm1").type is VMEventType.RESET
    assert translator.reboot("vm1").type is VMEventType.GUEST_REBOOT
    translator.host_reset("vm1")
    translator.host_reset("vm1", asked=False)  # the reset failed
    assert translator.reboot("vm1").type is VMEventType.GUEST_REBOOT
