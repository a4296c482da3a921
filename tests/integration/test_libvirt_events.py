"""
The libvirt driver's pushed events and checkpoints on real libvirtd and QEMU: a killed qemu
process reported as crashed, a libvirtd restart survived, a saved state that keeps the guest's
files and processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from hypervisors.interface import VMEvent, VMEventType, VMState
from hypervisors.libvirt import LibvirtDriver
from tests.integration.conftest import TEST_VM_PREFIX, BootedVM, once_libvirtd_answers, restart_libvirtd
from vmcontroller.errors import VMNotFound
from vmcontroller.images import GuestImage
from vmcontroller.machine import connect_vm_agent

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 300.0
#: Where libvirtd keeps each running domain's qemu pid.
QEMU_PID_DIR = Path("/run/libvirt/qemu")


@pytest_twisted.async_yield_fixture()
async def started_vm(hypervisor: LibvirtDriver, guest_image: GuestImage) -> AsyncIterator[str]:
    """A started VM of the test's own (not waited for: the tests need its qemu, not its guest)."""
    name = f"{TEST_VM_PREFIX}events-{os.getpid()}"
    await hypervisor.define(guest_image.vm_spec(name, memory_mib=256))
    try:
        await hypervisor.start(name)
        yield name
    finally:
        with contextlib.suppress(VMNotFound):
            await hypervisor.undefine(name)


def next_event(
    driver: LibvirtDriver, name: str, wanted: VMEventType
) -> tuple[Deferred[VMEvent], list[VMEvent]]:
    """The first event of type ``wanted`` of VM ``name`` from now on, and every event seen."""
    seen: list[VMEvent] = []
    got: Deferred[VMEvent] = Deferred()

    def on_event(event: VMEvent) -> None:
        seen.append(event)
        if event.type is wanted and not got.called:
            subscription.cancel()
            got.callback(event)

    subscription = driver.subscribe(on_event, name)
    got.addTimeout(60, reactor)
    return got, seen


@pytest_twisted.ensureDeferred
async def test_a_killed_qemu_is_reported_crashed_by_an_event(
    hypervisor: LibvirtDriver, started_vm: str
) -> None:
    pid = int((QEMU_PID_DIR / f"{started_vm}.pid").read_text())
    crashed, seen = next_event(hypervisor, started_vm, VMEventType.CRASHED)
    # libvirtd reports the stop once the dead qemu is reaped (its parent is PID 1, whose speed
    # at reaping varies by host): printed next to the event's delay.
    reaped: list[float] = []

    def check_reaped() -> None:
        if not os.path.exists(f"/proc/{pid}"):
            reaped.append(reactor.seconds())
            watch.stop()

    killed_at = reactor.seconds()
    os.kill(pid, signal.SIGKILL)
    watch = LoopingCall(check_reaped)
    watch.start(0.01)
    try:
        event = await crashed
    finally:
        if watch.running:
            watch.stop()
    print(
        f"CRASHED event {reactor.seconds() - killed_at:.3f} s after SIGKILL ({event.detail}); qemu reaped "
        f"after {(reaped[0] - killed_at) if reaped else float('nan'):.3f} s"
    )
    assert event.state is VMState.CRASHED
    # Not reported as a plain shut-off first (the start's own event may come before it).
    assert [e.type for e in seen if e.type is not VMEventType.STARTED] == [VMEventType.CRASHED]
    assert await hypervisor.state(started_vm) is VMState.CRASHED
    # A crashed VM starts again.
    await hypervisor.start(started_vm)
    assert await hypervisor.state(started_vm) is VMState.RUNNING


@pytest_twisted.ensureDeferred
async def test_a_libvirtd_restart_is_survived(hypervisor: LibvirtDriver, started_vm: str) -> None:
    await restart_libvirtd()
    # The next call succeeds: the driver reconnects (when libvirtd listens again).
    assert await once_libvirtd_answers(lambda: hypervisor.state(started_vm)) is VMState.RUNNING
    # And events arrive on the new connection.
    paused, _ = next_event(hypervisor, started_vm, VMEventType.PAUSED)
    await hypervisor.pause(started_vm)
    assert (await paused).state is VMState.PAUSED
    resumed, _ = next_event(hypervisor, started_vm, VMEventType.RESUMED)
    await hypervisor.resume(started_vm)
    await resumed


@pytest_twisted.ensureDeferred
async def test_save_state_keeps_the_guests_files_and_processes(booted_vm: BootedVM) -> None:
    """On the shared guest, which runs again afterwards."""
    driver, name, _ = booted_vm
    client = await connect_vm_agent(reactor, driver, name, timeout=BOOT_TIMEOUT)
    try:
        await client.run(["sh", "-c", "echo kept across the save > /root/saved.txt && sync"], check=True)
        await client.run(["systemd-run", "--unit", "vmc-save-sleeper", "sleep", "100000"], check=True)
        shown = await client.run(
            ["systemctl", "show", "-p", "MainPID", "--value", "vmc-save-sleeper"], check=True
        )
        pid = int(shown.stdout)
        assert pid > 0
    finally:
        client.close()

    saved, _ = next_event(driver, name, VMEventType.SAVED)
    await driver.save_state(name)
    assert (await saved).state is VMState.SAVED
    assert await driver.state(name) is VMState.SAVED

    restored, _ = next_event(driver, name, VMEventType.RESTORED)
    await driver.start(name)
    await restored
    assert await driver.state(name) is VMState.RUNNING
    client = await connect_vm_agent(reactor, driver, name, timeout=BOOT_TIMEOUT)
    try:
        assert (await client.run(["cat", "/root/saved.txt"], check=True)).stdout == b"kept across the save\n"
        cmdline = await client.run(["cat", f"/proc/{pid}/cmdline"], check=True)
        program, argument = cmdline.stdout.split(b"\0")[:2]
        assert (os.path.basename(program), argument) == (b"sleep", b"100000")
        await client.run(["systemctl", "stop", "vmc-save-sleeper"], check=True)
        await client.remove("/root/saved.txt")
    finally:
        client.close()
