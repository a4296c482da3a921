"""
The VMware driver over the ``vmrun`` stand-in (``tests/standins/vmrun``), for the driver's
tests and the conformance suite.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypervisors.interface import VMSpec
from hypervisors.vmware import VMwareDriver
from hypervisors.vmware._vmrun import Product
from hypervisors.vmware.vmx import parse_vmx

__all__ = [
    "STANDIN",
    "base_image",
    "disk_content_path",
    "hold_vm_lock",
    "install_vmrun",
    "started_driver",
    "vm_spec",
]

#: The stand-in executable.
STANDIN = Path(__file__).with_name("vmrun")


def install_vmrun(directory: Path, *, delay: float = 0.0, revert_suspends: bool = False) -> Path:
    """
    Write ``directory/bin/vmrun``, which runs the stand-in with its state in
    ``directory/vmrun-state`` (and sleeps ``delay`` seconds before each command), and return it.

    :param revert_suspends: a revert to a running VM's snapshot leaves it suspended.
    """
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "vmrun"
    state = directory / "vmrun-state"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"VMRUN_STANDIN_STATE={shlex.quote(str(state))} VMRUN_STANDIN_DELAY={delay} "
        f"VMRUN_STANDIN_REVERT_SUSPENDS={int(revert_suspends)} "
        # -S: the stand-in needs the standard library only, and starts faster without site.
        f'exec {shlex.quote(sys.executable)} -S {shlex.quote(str(STANDIN))} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def base_image(directory: Path) -> Path:
    """A small empty qcow2 base image in ``directory``, made with qemu-img."""
    path = directory / "base.qcow2"
    if not path.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def vm_spec(name: str, disk: Path, **overrides: Any) -> VMSpec:
    """A spec VMware can define: it boots from the disk, and its agent uses a serial port."""
    options: dict[str, Any] = {"serial_ports": ("agent",), "agent_transport": "serial"} | overrides
    return VMSpec(name=name, disk=str(disk), **options)


def started_driver(
    reactor: Any,
    directory: Path,
    *,
    product: Product = "ws",
    delay: float = 0.0,
    revert_suspends: bool = False,
    **options: Any,
) -> VMwareDriver:
    """
    A started :class:`VMwareDriver` over the stand-in: VM directories under
    ``directory/vms``, stand-in state under ``directory``. Stop it with ``stopService()``.

    :param options: more keyword arguments for the driver (``poll_interval``, ...).
    """
    # A short path: the VMs' serial sockets live in their directories.
    driver = VMwareDriver(
        reactor,
        product=product,
        vmrun=str(install_vmrun(directory, delay=delay, revert_suspends=revert_suspends)),
        state_dir=directory / "vms",
        **options,
    )
    driver.startService()
    return driver


def disk_content_path(driver: VMwareDriver, name: str) -> Path:
    """
    The file holding VM ``name``'s current disk content in the stand-in: the disk its .vmx
    names. Write to it as the guest would; snapshots copy it, reverts restore it.
    """
    vmx = driver.vmx_path(name)
    entries = parse_vmx(vmx.read_text())
    return vmx.parent / entries["scsi0:0.filename"]


def hold_vm_lock(driver: VMwareDriver, name: str) -> Path:
    """
    Lock VM ``name`` as another VMware program holding it would (a ``<vm>.vmx.lck``
    directory with a lock file in it): the stand-in then refuses to change the VM. Remove the
    returned directory to let go.
    """
    lock_dir = Path(f"{driver.vmx_path(name)}.lck")
    lock_dir.mkdir()
    (lock_dir / "M00001.lck").write_text("held by another VMware program\n")
    return lock_dir
