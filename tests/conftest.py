"""
Fixtures shared by the test suites that drive a real hypervisor (libvirt + QEMU): the
integration tests and the conformance suite's ``libvirt-qemu`` configuration.

One guest is built (or taken from the image cache) and booted for the whole session:
``booted_vm`` yields it as ``BootedVM(driver, name, image)``. Tests that take it down must
bring it back; destructive lifecycle tests use VMs of their own. The fixtures do nothing until
a test asks for them: the unit tests boot nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from hypervisors.interface import VMState
from hypervisors.libvirt import LibvirtDriver
from vmcontroller.errors import VMControllerError
from vmcontroller.images import GuestImage, build_image

#: Prefix of the VMs the test session defines; leftovers of a crashed session are removed.
TEST_VM_PREFIX = "vmc-test-"


class BootedVM(NamedTuple):
    """The session's guest: unpack it as ``driver, name, image`` or use the attributes."""

    driver: LibvirtDriver
    name: str
    image: GuestImage


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest image for the current recipe, built on first use (about a minute)."""
    return pytest_twisted.blockon(
        Deferred.fromCoroutine(build_image(reactor, log=lambda line: print(f"image: {line}")))
    )


@pytest.fixture(scope="session")
def hypervisor() -> Iterator[LibvirtDriver]:
    """A started libvirt driver; removes VMs left by earlier test sessions that died."""
    driver = LibvirtDriver(reactor)
    driver.startService()
    for name in pytest_twisted.blockon(driver.list_vms()):
        rest = name.removeprefix(TEST_VM_PREFIX)
        pid = rest.split("-")[-1]
        if name.startswith(TEST_VM_PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
            pytest_twisted.blockon(driver.undefine(name))
    yield driver
    pytest_twisted.blockon(driver.stopService())


def boot_vm(hypervisor: LibvirtDriver, image: GuestImage, name: str) -> Iterator[BootedVM]:
    """Define and start ``name`` from ``image`` and yield it; undefine it afterwards."""
    pytest_twisted.blockon(hypervisor.define(image.vm_spec(name)))
    try:
        pytest_twisted.blockon(hypervisor.start(name))
        yield BootedVM(hypervisor, name, image)
    finally:
        teardown_vm(hypervisor, name)


@pytest.fixture(scope="session")
def booted_vm(hypervisor: LibvirtDriver, guest_image: GuestImage) -> Iterator[BootedVM]:
    """
    The session's guest, defined and started once (not waited for: the agent's clients wait for
    the agent), undefined at the end of the session.
    """
    yield from boot_vm(hypervisor, guest_image, f"{TEST_VM_PREFIX}shared-{os.getpid()}")


def teardown_vm(driver: LibvirtDriver, name: str) -> None:
    """Undefine ``name`` (stopping it first), keeping its console log's tail in the test output."""
    log = driver.console_log_path(name)
    try:
        state = pytest_twisted.blockon(driver.state(name))
    except VMControllerError:
        return
    if state is not VMState.SHUTOFF and log.exists():
        tail = log.read_bytes()[-2000:].decode("utf-8", "replace")
        print(f"--- last console output of {name} ---\n{tail}")
    pytest_twisted.blockon(driver.undefine(name))
