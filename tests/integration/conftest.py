"""
Helpers of the tests against a real hypervisor (libvirt + QEMU). Their fixtures (the guest
image, the driver, the session's booted guest) are in ``tests/conftest.py``, which the
conformance suite shares.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from hypervisors.libvirt import LibvirtDriver
from tests.conftest import TEST_VM_PREFIX, BootedVM, boot_vm, teardown_vm
from vmcontroller.client import GuestClient
from vmcontroller.images import GuestImage, build_image

__all__ = ["TEST_VM_PREFIX", "BootedVM", "print_journal", "sha256", "start_second_agent", "teardown_vm"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def start_second_agent(virtio: GuestClient, unit: str, *channel: str) -> None:
    """Start another agent in the guest, as systemd unit ``unit``, on ``channel`` (its options)."""
    await virtio.run(
        ["systemd-run", "--unit", unit, "/usr/bin/python3", "-m", "guest_agent", "run", *channel], check=True
    )


def print_journal(virtio: GuestClient, unit: str) -> None:
    """Show the journal of the guest's ``unit`` in the test output."""
    journal = pytest_twisted.blockon(virtio.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit]))
    print(f"--- journal of {unit} ---\n{journal.stdout.decode(errors='replace')}")


@pytest.fixture(scope="session")
def bundle_image() -> GuestImage:
    """An image without Debian's Twisted, running the single-file agent (about a minute to build)."""
    return pytest_twisted.blockon(
        Deferred.fromCoroutine(
            build_image(reactor, agent="bundle", log=lambda line: print(f"bundle image: {line}"))
        )
    )


@pytest.fixture(scope="session")
def bundle_vm(hypervisor: LibvirtDriver, bundle_image: GuestImage) -> Iterator[BootedVM]:
    """A guest of :func:`bundle_image`, booted once for the session like ``booted_vm``."""
    yield from boot_vm(hypervisor, bundle_image, f"{TEST_VM_PREFIX}bundle-{os.getpid()}")
