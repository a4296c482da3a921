"""
The driver configurations the conformance suite runs on.

A :class:`DriverConfiguration` says how to get a driver (by its entry point, as users do),
how to make a :class:`~hypervisors.interface.VMSpec` for it, and what the suite needs beyond
the interface to prove effects: a :class:`DiskProbe` (write a marker onto a VM's disk, read it
back), a way to make the hypervisor unavailable, a way to hold a VM's lock. Where one of those
is impossible the configuration says why, and the checks that need it are skipped with that
reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from hypervisors import installed_drivers
from hypervisors.interface import Capability, IHypervisorDriver, VMSpec
from vmcontroller.machine import connect_vm_agent

#: The marker's name on the disk (a file in the guest, a key of the fake's disk).
MARKER = "vmc-conformance-marker"


@dataclass(frozen=True)
class DiskProbe:
    """
    Writes a marker onto a VM's disk and reads it back, proving what a revert restored.

    :ivar write: ``write(driver, vm, data)``; ``data`` is at most 256 bytes.
    :ivar read: ``read(driver, vm)``: the marker, or ``b""`` if there is none.
    """

    write: Callable[[Any, str, bytes], Coroutine[Any, Any, None]]
    read: Callable[[Any, str], Coroutine[Any, Any, bytes]]


@dataclass(frozen=True)
class DriverConfiguration:
    """
    One driver, set up one way, as the conformance suite sees it.

    :ivar id: the test parameter's name.
    :ivar entry_point: the driver's name in the ``vmcontroller.hypervisors`` group.
    :ivar options: ``options(workdir)``: keyword arguments for ``load_driver``.
    :ivar spec: ``spec(name, workdir, image, **overrides)``: a VMSpec this driver can define
        (``image``: the guest image if ``needs_guest_image``, else ``None``).
    :ivar unavailable_options: ``unavailable_options(workdir)``: options that give a driver
        whose hypervisor is missing or not running, or ``None`` (then ``unavailable`` is called).
    :ivar make_unavailable: ``make_unavailable(driver)``: take a started driver's hypervisor
        away, for drivers that have no such option; returns a callable bringing it back.
    :ivar lock: ``lock(driver, vm)``: another program takes the VM's lock; returns a callable
        that releases it. ``None`` with ``no_lock`` saying why.
    :ivar offline_probe: a :class:`DiskProbe` for a shut-off VM; ``None`` with
        ``no_disk_probe`` saying why.
    :ivar online_probe: a :class:`DiskProbe` for a running VM; ``None`` likewise.
    :ivar agent_reachable: an agent answers behind ``agent_endpoint`` (a real guest, the fake).
    :ivar boots: ``boots(driver, vm)`` waits until a started VM's guest has booted (it reacts
        to the power button only then); ``None`` where it reacts at once.
    :ivar needs_guest_image: its specs boot the project's guest image (the session fixture
        ``guest_image`` is passed to ``spec``), and the session's booted guest serves the
        checks that need a live agent.
    :ivar poll_settle: seconds a driver that polls needs to take in the current states (two
        polls and their replies).
    :ivar marks: pytest marks for all its checks (e.g. ``integration``).
    """

    id: str
    entry_point: str
    spec: Callable[..., VMSpec]
    options: Callable[[Path], Mapping[str, Any]] = lambda _workdir: {}
    unavailable_options: Callable[[Path], Mapping[str, Any]] | None = None
    make_unavailable: Callable[[Any], Callable[[], None]] | None = None
    no_unavailable: str = ""
    lock: Callable[[Any, str], Awaitable[Callable[[], Awaitable[None]]]] | None = None
    no_lock: str = ""
    offline_probe: DiskProbe | None = None
    online_probe: DiskProbe | None = None
    no_disk_probe: str = ""
    agent_reachable: bool = False
    boots: Callable[[Any, str], Coroutine[Any, Any, None]] | None = None
    needs_guest_image: bool = False
    poll_settle: float = 0.0
    marks: tuple[pytest.MarkDecorator, ...] = field(default_factory=tuple)


# -- the in-memory fake, installed as a package of its own (tests/thirdparty_driver) -----------


def _fake_spec(name: str, workdir: Path, image: Any, **overrides: Any) -> VMSpec:
    return VMSpec(name=name, disk=str(workdir / "base.qcow2"), **overrides)


async def _fake_write(driver: Any, vm: str, data: bytes) -> None:
    driver.vm(vm).disk[MARKER] = data


async def _fake_read(driver: Any, vm: str) -> bytes:
    data: bytes = driver.vm(vm).disk.get(MARKER, b"")
    return data


async def _fake_lock(driver: Any, vm: str) -> Callable[[], Awaitable[None]]:
    driver.lock(vm, "the conformance suite")

    async def release() -> None:
        driver.unlock(vm)

    return release


def _fake_unavailable(driver: Any) -> Callable[[], None]:
    driver.available = False

    def restore() -> None:
        driver.available = True

    return restore


def _fake(id: str, capabilities: frozenset[Capability] | None = None) -> DriverConfiguration:
    return DriverConfiguration(
        id=id,
        entry_point="thirdparty",
        spec=_fake_spec,
        options=lambda _workdir: {} if capabilities is None else {"capabilities": capabilities},
        make_unavailable=_fake_unavailable,
        lock=_fake_lock,
        offline_probe=DiskProbe(_fake_write, _fake_read),
        online_probe=DiskProbe(_fake_write, _fake_read),
        agent_reachable=True,
    )


THIRDPARTY = _fake("thirdparty")

#: The fake playing a product with no optional ability but the virtio-serial channel, so that
#: every capability check has a driver that lacks it.
THIRDPARTY_BARE = _fake("thirdparty-bare", frozenset({Capability.VIRTIO_SERIAL}))


# -- libvirt ----------------------------------------------------------------------------------------


def _libvirt_test_spec(name: str, workdir: Path, image: Any, **overrides: Any) -> VMSpec:
    # test:///default runs no emulator, but the driver makes each VM's overlay with qemu-img.
    base = workdir / "base.qcow2"
    if not base.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    return VMSpec(name=name, disk=str(base), **overrides)


#: libvirt's test driver: every call goes through libvirt and the driver, nothing runs.
LIBVIRT_TEST = DriverConfiguration(
    id="libvirt-test",
    entry_point="libvirt",
    spec=_libvirt_test_spec,
    options=lambda workdir: {"uri": "test:///default", "state_dir": workdir},
    unavailable_options=lambda workdir: {"uri": f"test://{workdir}/no-such-definitions.xml"},
    no_lock="libvirt has no session locks to hold: libvirtd queues jobs on a domain itself",
    no_disk_probe="test:///default emulates no disk: a revert there changes only libvirt's records",
)


def _guest_spec(name: str, workdir: Path, image: Any, **overrides: Any) -> VMSpec:
    spec: VMSpec = image.vm_spec(name, **{"memory_mib": 384, **overrides})
    return spec


async def _guest_client(driver: Any, vm: str) -> Any:
    # Generous: a TCG guest on a busy host (other VMs booting) can take minutes to boot.
    return await connect_vm_agent(reactor, driver, vm, timeout=600)


async def _guest_boots(driver: Any, vm: str) -> None:
    (await _guest_client(driver, vm)).close()


#: The marker's file in the guest: on its root disk (not a tmpfs).
_GUEST_MARKER = f"/var/lib/{MARKER}"


async def _guest_write(driver: Any, vm: str, data: bytes) -> None:
    client = await _guest_client(driver, vm)
    try:
        await client.run(["sh", "-c", f"cat > {_GUEST_MARKER} && sync"], stdin=data, check=True)
    finally:
        client.close()


async def _guest_read(driver: Any, vm: str) -> bytes:
    client = await _guest_client(driver, vm)
    try:
        # Dropping the page cache makes cat read the disk.
        result = await client.run(
            ["sh", "-c", f"sync; echo 3 > /proc/sys/vm/drop_caches; cat {_GUEST_MARKER} 2>/dev/null || true"],
            check=True,
        )
        data: bytes = result.stdout
        return data
    finally:
        client.close()


async def _qemu_tool(*argv: str) -> str:
    out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=dict(os.environ))
    if code != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({code}): {err.decode(errors='replace')}")
    return str(out.decode())


async def _libvirt_disk(driver: Any, vm: str) -> tuple[str, int]:
    """The file holding the VM's current disk, and where on it the marker goes (its last MiB)."""
    listing = await _qemu_tool("/usr/bin/virsh", "-c", driver.uri, "domblklist", "--details", vm)
    (path,) = [line.split()[3] for line in listing.splitlines() if line.split()[1:3] == ["disk", "vda"]]
    size = json.loads(await _qemu_tool("/usr/bin/qemu-img", "info", "-U", "--output=json", path))[
        "virtual-size"
    ]
    return path, size - (1 << 20)


_SECTOR = 512


async def _qemu_io_write(driver: Any, vm: str, data: bytes) -> None:
    path, offset = await _libvirt_disk(driver, vm)
    with tempfile.NamedTemporaryFile() as marker:
        marker.write(data.ljust(_SECTOR, b"\0"))
        marker.flush()
        await _qemu_tool(
            "/usr/bin/qemu-io", "-f", "qcow2", "-c", f"write -q -s {marker.name} {offset} {_SECTOR}", path
        )


async def _qemu_io_read(driver: Any, vm: str) -> bytes:
    path, offset = await _libvirt_disk(driver, vm)
    dump = await _qemu_tool(
        "/usr/bin/qemu-io", "-f", "qcow2", "-r", "-c", f"read -v {offset} {_SECTOR}", path
    )
    # Lines of "<offset>:  <16 hex bytes>  <ascii>".
    data = bytearray()
    for line in dump.splitlines():
        head, sep, rest = line.partition(":  ")
        if sep and all(c in "0123456789abcdef" for c in head):
            data += bytes.fromhex(rest[: 16 * 3])
    return bytes(data).rstrip(b"\0")


#: libvirt and QEMU with the project's guest (TCG): the one configuration on a real hypervisor.
LIBVIRT_QEMU = DriverConfiguration(
    id="libvirt-qemu",
    entry_point="libvirt",
    spec=_guest_spec,
    unavailable_options=lambda workdir: {"uri": f"qemu+unix:///system?socket={workdir}/no-libvirtd-here"},
    no_lock="libvirt has no session locks to hold: libvirtd queues jobs on a domain itself",
    # Offline from the host with qemu-io on the VM's disk file; online inside the guest.
    offline_probe=DiskProbe(_qemu_io_write, _qemu_io_read),
    online_probe=DiskProbe(_guest_write, _guest_read),
    agent_reachable=True,
    boots=_guest_boots,
    needs_guest_image=True,
    marks=(pytest.mark.integration,),
)


# -- stand-ins: a marker in the file that holds the VM's current disk --------------------------

#: The stand-ins' disk files are whatever the driver made; the marker is a block appended to
#: the file, found by this prefix, so the rest stays as the driver wrote it.
_BLOCK_MAGIC = b"VMC-CONFORMANCE:"
_BLOCK = 512


def _file_probe(disk_file: Callable[[Any, str], Path]) -> DiskProbe:
    """A :class:`DiskProbe` on the file ``disk_file(driver, vm)`` (a stand-in's current disk)."""

    async def write(driver: Any, vm: str, data: bytes) -> None:
        path = disk_file(driver, vm)
        content = path.read_bytes()
        if content[-_BLOCK:].startswith(_BLOCK_MAGIC):
            content = content[:-_BLOCK]
        path.write_bytes(content + (_BLOCK_MAGIC + data).ljust(_BLOCK, b"\0"))

    async def read(driver: Any, vm: str) -> bytes:
        block = disk_file(driver, vm).read_bytes()[-_BLOCK:]
        return block[len(_BLOCK_MAGIC) :].rstrip(b"\0") if block.startswith(_BLOCK_MAGIC) else b""

    return DiskProbe(write, read)


def _vmware_spec(name: str, workdir: Path, image: Any, **overrides: Any) -> VMSpec:
    from tests.standins import vmware

    spec: VMSpec = vmware.vm_spec(name, vmware.base_image(workdir), **overrides)
    return spec


def _vmware_options(workdir: Path, product: str = "ws") -> dict[str, Any]:
    from tests.standins import vmware

    return {
        "product": product,
        "vmrun": str(vmware.install_vmrun(workdir)),
        "state_dir": workdir / "vms",
        "poll_interval": 0.5,
    }


def _vmware_disk(driver: Any, vm: str) -> Path:
    from tests.standins import vmware

    path: Path = vmware.disk_content_path(driver, vm)
    return path


#: The VMware driver (Workstation Pro) over the vmrun stand-in.
VMWARE = DriverConfiguration(
    id="vmware",
    entry_point="vmware",
    spec=_vmware_spec,
    options=_vmware_options,
    unavailable_options=lambda workdir: {
        "vmrun": str(workdir / "no-vmrun-here"),
        "state_dir": workdir / "vms",
    },
    no_lock="the vmrun stand-in does not model VMware's .lck files, the only lock vmrun reports",
    offline_probe=_file_probe(_vmware_disk),
    online_probe=_file_probe(_vmware_disk),
    poll_settle=3.0,
)

#: The VMware driver playing Workstation Player, which has neither snapshots nor pause.
VMWARE_PLAYER = replace(
    VMWARE, id="vmware-player", options=lambda workdir: _vmware_options(workdir, "player")
)


def _virtualbox_spec(name: str, workdir: Path, image: Any, **overrides: Any) -> VMSpec:
    # The stand-ins copy no real image: any file is the base a differencing disk grows on.
    base = workdir / "base.img"
    if not base.exists():
        base.write_bytes(b"base image of the conformance suite")
    # The agent on a serial port (VirtualBox has no virtio-serial).
    options: dict[str, Any] = {"serial_ports": ("agent",), "agent_transport": "serial"} | overrides
    return VMSpec(name=name, disk=str(base), **options)


def _virtualbox(backend: str) -> DriverConfiguration:
    from tests.standins import vbox

    probe = _file_probe(vbox.current_disk_file)
    return DriverConfiguration(
        id=f"virtualbox-{backend}",
        entry_point="virtualbox",
        spec=_virtualbox_spec,
        options=lambda workdir: vbox.virtualbox_options(backend, workdir),
        unavailable_options=vbox.unavailable_options,
        lock=vbox.hold_session,
        offline_probe=probe,
        online_probe=probe,
        poll_settle=3.0,
    )


#: The VirtualBox driver's two backends, over their stand-ins.
VIRTUALBOX_PYVBOX = _virtualbox("pyvbox")
VIRTUALBOX_VBOXMANAGE = _virtualbox("vboxmanage")

CONFIGURATIONS: tuple[DriverConfiguration, ...] = (
    LIBVIRT_QEMU,
    LIBVIRT_TEST,
    THIRDPARTY,
    THIRDPARTY_BARE,
    VIRTUALBOX_PYVBOX,
    VIRTUALBOX_VBOXMANAGE,
    VMWARE,
    VMWARE_PLAYER,
)


def configuration_params() -> list[Any]:
    """
    The configurations as pytest parameters, with their marks; only those named in
    ``$VMC_CONFORMANCE_CONFIGURATIONS`` (comma-separated ids) if it is set.
    """
    chosen = os.environ.get("VMC_CONFORMANCE_CONFIGURATIONS")
    wanted = set(chosen.split(",")) if chosen else {c.id for c in CONFIGURATIONS}
    unknown = wanted - {c.id for c in CONFIGURATIONS}
    if unknown:
        raise ValueError(f"VMC_CONFORMANCE_CONFIGURATIONS names unknown configurations: {sorted(unknown)}")
    installed = installed_drivers()
    return [
        pytest.param(
            c,
            id=c.id,
            marks=(
                *c.marks,
                pytest.mark.skipif(
                    c.entry_point not in installed,
                    reason=f"no {c.entry_point!r} driver installed (install its extra)",
                ),
            ),
        )
        for c in CONFIGURATIONS
        if c.id in wanted
    ]


__all__ = ["CONFIGURATIONS", "MARKER", "DiskProbe", "DriverConfiguration", "IHypervisorDriver"]
