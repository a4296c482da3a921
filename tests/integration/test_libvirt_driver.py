"""
Every operation of the libvirt driver on real libvirt and QEMU (TCG unless KVM is usable).

The non-destructive tests use the session's shared guest; shutdown, power off and undefine run
on short-lived VMs of their own, so the shared guest stays up for the agent tests.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from hypervisors.interface import IHypervisorDriver, SnapshotInfo, VMState
from hypervisors.libvirt import LibvirtDriver
from hypervisors.libvirt.driver import FW_CFG_FILE
from tests.integration.conftest import TEST_VM_PREFIX, BootedVM
from vmcontroller.client import connect
from vmcontroller.errors import (
    AuthenticationFailed,
    HypervisorError,
    SnapshotNotFound,
    VMAlreadyExists,
    VMNotFound,
    VMStateError,
)
from vmcontroller.images import GuestImage
from vmcontroller.machine import connect_vm_agent

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 300.0


async def wait_for_console(
    driver: LibvirtDriver, name: str, text: str, timeout: float = BOOT_TIMEOUT, after: int = 0
) -> None:
    """
    Wait until the VM's console log shows ``text`` (e.g. systemd reaching a target) past the
    first ``after`` bytes.
    """
    log = driver.console_log_path(name)
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        if log.exists() and text.encode() in log.read_bytes()[after:]:
            return
        await deferLater(reactor, 0.5, lambda: None)
    tail = log.read_bytes()[-3000:].decode("utf-8", "replace") if log.exists() else "(no console log)"
    raise AssertionError(f"{name} did not print {text!r} within {timeout} s; console:\n{tail}")


@pytest_twisted.async_yield_fixture()
async def own_vm(hypervisor: LibvirtDriver, guest_image: GuestImage) -> AsyncIterator[str]:
    """A defined, not yet started VM of the test's own, undefined afterwards."""
    name = f"{TEST_VM_PREFIX}own-{os.getpid()}"
    await hypervisor.define(guest_image.vm_spec(name, memory_mib=384))
    try:
        yield name
    finally:
        with contextlib.suppress(VMNotFound):  # The test may have undefined it.
            await hypervisor.undefine(name)


def test_provides_the_interface(booted_vm: BootedVM) -> None:
    assert verifyObject(IHypervisorDriver, booted_vm.driver)


@pytest_twisted.ensureDeferred
async def test_defined_and_running(booted_vm: BootedVM) -> None:
    driver, name, _ = booted_vm
    assert name in await driver.list_vms()
    await driver.wait_for_state(name, VMState.RUNNING, timeout=60)
    assert await driver.state(name) is VMState.RUNNING


@pytest_twisted.ensureDeferred
async def test_define_taken_name(booted_vm: BootedVM) -> None:
    driver, name, image = booted_vm
    with pytest.raises(VMAlreadyExists):
        await driver.define(image.vm_spec(name))


@pytest_twisted.ensureDeferred
async def test_unknown_vm(booted_vm: BootedVM) -> None:
    driver = booted_vm.driver
    with pytest.raises(VMNotFound):
        await driver.state("vmc-no-such-vm")
    with pytest.raises(VMNotFound):
        await driver.pause("vmc-no-such-vm")


@pytest_twisted.ensureDeferred
async def test_agent_endpoint_is_the_virtio_serial_socket(booted_vm: BootedVM) -> None:
    driver, name, _ = booted_vm
    path = await driver.agent_socket_path(name)
    assert path.endswith("org.vmcontroller.agent.0")
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    for transport in ("auto", "virtio-serial"):
        endpoint = await driver.agent_endpoint(name, transport)
        assert isinstance(endpoint, UNIXClientEndpoint)
        assert endpoint._path == path
    with pytest.raises(HypervisorError, match="no serial port for the agent"):
        await driver.agent_endpoint(name, "serial")
    with pytest.raises(HypervisorError, match="no NAT network card"):
        await driver.agent_endpoint(name, "tcp")


@pytest_twisted.ensureDeferred
async def test_boots_to_multi_user_with_the_agent_unit(booted_vm: BootedVM) -> None:
    driver, name, _ = booted_vm
    await wait_for_console(driver, name, "Reached target")
    await wait_for_console(driver, name, "multi-user.target")
    log = driver.console_log_path(name).read_bytes()
    assert b"vmcontroller guest agent" in log


@pytest_twisted.ensureDeferred
async def test_guest_opens_the_agent_port(booted_vm: BootedVM) -> None:
    """
    The guest side of the channel works: virtio_console is loaded, the agent's unit runs and
    opens /dev/virtio-ports/org.vmcontroller.agent.0 (QEMU reports the port as connected).
    """
    driver, name, _ = booted_vm
    deadline = reactor.seconds() + BOOT_TIMEOUT
    while not await driver.guest_port_open(name):
        assert reactor.seconds() < deadline, "the guest never opened the agent's port"
        await deferLater(reactor, 0.5, lambda: None)


@pytest_twisted.ensureDeferred
async def test_pause_resume(booted_vm: BootedVM) -> None:
    driver, name, _ = booted_vm
    await driver.pause(name)
    assert await driver.state(name) is VMState.PAUSED
    await driver.pause(name)  # libvirt takes pausing a paused VM as done.
    assert await driver.state(name) is VMState.PAUSED
    await driver.resume(name)
    assert await driver.state(name) is VMState.RUNNING
    with pytest.raises(VMStateError):
        await driver.resume(name)


@pytest_twisted.ensureDeferred
async def test_reset(booted_vm: BootedVM) -> None:
    driver, name, _ = booted_vm
    await wait_for_console(driver, name, "multi-user.target")
    # The log is not truncated by a reset (same QEMU process): look only at what follows.
    before = driver.console_log_path(name).stat().st_size
    await driver.reset(name)
    assert await driver.state(name) is VMState.RUNNING
    await wait_for_console(driver, name, "multi-user.target", after=before)


@pytest_twisted.ensureDeferred
async def test_snapshots_of_a_running_vm(booted_vm: BootedVM) -> None:
    driver, name, _ = booted_vm
    first = await driver.snapshot_create(name, "first", "taken while running")
    assert isinstance(first, SnapshotInfo)
    assert (first.name, first.description, first.state, first.has_memory) == (
        "first",
        "taken while running",
        VMState.RUNNING,
        True,
    )
    await driver.pause(name)
    second = await driver.snapshot_create(name, "second")
    assert second.state is VMState.PAUSED
    assert second.parent == "first"

    listed = await driver.snapshot_list(name)
    assert [s.name for s in listed] == ["first", "second"]
    assert [s.current for s in listed] == [False, True]

    with pytest.raises(HypervisorError, match="already"):
        await driver.snapshot_create(name, "first")

    # Back to the running checkpoint: memory included, so the VM runs again.
    await driver.snapshot_revert(name, "first")
    assert await driver.state(name) is VMState.RUNNING
    assert [s.name for s in await driver.snapshot_list(name) if s.current] == ["first"]
    await driver.snapshot_revert(name, "second")
    assert await driver.state(name) is VMState.PAUSED
    await driver.resume(name)

    with pytest.raises(SnapshotNotFound):
        await driver.snapshot_revert(name, "no-such-snapshot")
    with pytest.raises(SnapshotNotFound):
        await driver.snapshot_delete(name, "no-such-snapshot")

    await driver.snapshot_delete(name, "first")
    assert [s.name for s in await driver.snapshot_list(name)] == ["second"]
    await driver.snapshot_delete(name, "second")
    assert await driver.snapshot_list(name) == []
    assert await driver.state(name) is VMState.RUNNING


@pytest_twisted.ensureDeferred
async def test_concurrent_calls(booted_vm: BootedVM, own_vm: str) -> None:
    """
    Many read-only calls at once, interleaved with state-changing ones on two VMs: the driver
    queues the state changes per VM, so none hits libvirt's job lock.
    """
    driver, name, _ = booted_vm
    calls: list[Deferred[Any]] = []
    for i in range(50):
        calls.append(driver.state(name) if i % 2 else driver.snapshot_list(name))
        if i % 10 == 0:
            calls.append(driver.list_vms())
            calls.append(driver.state(own_vm))
    mixed: list[Deferred[Any]] = [
        driver.pause(name),
        driver.snapshot_create(name, "busy-1"),
        driver.resume(name),
        driver.snapshot_create(name, "busy-2"),
        driver.snapshot_create(own_vm, "offline-1"),
        driver.snapshot_delete(name, "busy-1"),
        driver.snapshot_delete(own_vm, "offline-1"),
        driver.snapshot_delete(name, "busy-2"),
    ]
    results = await gatherResults(calls + mixed, consumeErrors=True)
    assert len(results) == len(calls) + len(mixed)
    assert await driver.state(name) is VMState.RUNNING
    assert await driver.snapshot_list(name) == []
    assert await driver.snapshot_list(own_vm) == []


@pytest_twisted.ensureDeferred
async def test_lifecycle(hypervisor: LibvirtDriver, own_vm: str) -> None:
    """On a VM of its own: start, ACPI shutdown, disk-only snapshot, power off, undefine."""
    driver, name = hypervisor, own_vm
    assert await driver.state(name) is VMState.SHUTOFF
    with pytest.raises(VMStateError):
        await driver.agent_endpoint(name)
    with pytest.raises(VMStateError):
        await driver.power_off(name)

    await driver.start(name)
    with pytest.raises(VMStateError):
        await driver.start(name)
    # The power button is handled by systemd-logind: wait until the guest is up to press it.
    await wait_for_console(driver, name, "multi-user.target")
    await driver.shutdown(name, wait=True, timeout=BOOT_TIMEOUT)
    assert await driver.state(name) is VMState.SHUTOFF
    assert b"Power down" in driver.console_log_path(name).read_bytes()

    offline = await driver.snapshot_create(name, "offline", "disk only")
    assert (offline.state, offline.has_memory) == (VMState.SHUTOFF, False)

    await driver.start(name)
    await driver.power_off(name)
    assert await driver.state(name) is VMState.SHUTOFF
    await driver.snapshot_revert(name, "offline")
    assert await driver.state(name) is VMState.SHUTOFF

    # undefine stops a running VM and deletes its snapshots, its overlay and its credentials.
    await driver.start(name)
    vm_dir = Path(driver.state_dir) / name
    assert (vm_dir / "disk.qcow2").exists()
    assert driver.credentials.exists(name) and (vm_dir / FW_CFG_FILE).exists()
    await driver.undefine(name)
    assert name not in await driver.list_vms()
    assert not vm_dir.exists()
    assert not driver.credentials.exists(name) and not (driver.credentials.directory / name).exists()
    with pytest.raises(VMNotFound):
        await driver.state(name)
    with pytest.raises(VMNotFound):
        await driver.agent_credentials(name)


async def inactive_xml(driver: LibvirtDriver, name: str) -> str:
    """The domain's definition (not its running state), through a connection of the test's own."""

    def read() -> str:
        conn = libvirt.open(driver.uri)
        try:
            return str(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        finally:
            conn.close()

    return await threads.deferToThread(read)


@pytest_twisted.ensureDeferred
async def test_rotated_credentials_reach_the_guest_at_its_next_start(
        hypervisor: LibvirtDriver, own_vm: str, guest_image: GuestImage) -> None:
    """New credentials need no new image: QEMU hands the guest the new fw_cfg entry at start."""
    driver, name = hypervisor, own_vm
    image = Path(guest_image.root_disk).stat()
    xml_before = await inactive_xml(driver, name)
    await driver.start(name)
    old = await driver.agent_credentials(name)
    client = await connect_vm_agent(reactor, driver, name, timeout=BOOT_TIMEOUT)
    await client.close()
    await driver.rotate_credentials(name)
    new = await driver.agent_credentials(name)
    assert new.certificate != old.certificate and new.peer_certificate != old.peer_certificate
    await driver.power_off(name)
    await driver.start(name)
    endpoint = UNIXClientEndpoint(reactor, await driver.agent_socket_path(name))
    client = await connect(reactor, endpoint, credentials=new, timeout=BOOT_TIMEOUT)
    try:
        assert (await client.ping())["version"] and client.authenticated
    finally:
        await client.close()
    with pytest.raises(AuthenticationFailed):
        await connect(reactor, endpoint, credentials=old, timeout=60)
    # The same image and the same domain: only the fw_cfg file's content changed.
    after = Path(guest_image.root_disk).stat()
    assert (after.st_size, after.st_mtime_ns) == (image.st_size, image.st_mtime_ns)
    assert await inactive_xml(driver, name) == xml_before
