"""
Helpers of the tests against a real hypervisor (libvirt + QEMU). Their fixtures (the guest
image, the driver, the session's booted guest) are in ``tests/conftest.py``, which the
conformance suite shares.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor, utils
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from hypervisors.libvirt import LibvirtDriver
from tests.conftest import TEST_VM_PREFIX, BootedVM, boot_vm, teardown_vm
from vmcontroller.client import GuestClient
from vmcontroller.errors import HypervisorError
from vmcontroller.images import GuestImage, build_image

__all__ = [
    "TEST_VM_PREFIX",
    "BootedVM",
    "once_libvirtd_answers",
    "print_journal",
    "restart_libvirtd",
    "sha256",
    "start_second_agent",
    "teardown_vm",
]

#: The system libvirtd's pid file.
LIBVIRTD_PID = Path("/run/libvirtd.pid")
T = TypeVar("T")


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


async def restart_libvirtd() -> None:
    """Stop the system libvirtd and start it again at once, the way the set-up starts it."""
    pid = int(LIBVIRTD_PID.read_text())
    os.kill(pid, signal.SIGTERM)
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await deferLater(reactor, 0.05, lambda: None)
    script = str(Path(__file__).resolve().parents[2] / "scripts" / "start-daemons.sh")
    out, err, code = await utils.getProcessOutputAndValue("/bin/bash", [script], env=dict(os.environ))
    assert code == 0, (out, err)


async def once_libvirtd_answers(call: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """
    The outcome of driver call ``call``, repeated while it fails with a HypervisorError for at
    most ``timeout`` seconds: a restarted libvirtd is started before it listens.
    """
    deadline = reactor.seconds() + timeout
    while True:
        try:
            return await call()
        except HypervisorError:
            if reactor.seconds() > deadline:
                raise
            await deferLater(reactor, 0.2, lambda: None)


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
