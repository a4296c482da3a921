"""
The host side of QEMU: whether KVM can be used, which accelerator a VM gets, and whether
``/dev/kvm`` is in the state Debian's packages expect.
"""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Literal

from hypervisors.interface import Accel
from vmcontroller.errors import HypervisorError

__all__ = ["KVM_DEVICE_FIX", "kvm_device_problem", "kvm_in_capabilities", "kvm_usable", "select_accel"]

#: What fixes a ``/dev/kvm`` that QEMU's user cannot open (see :func:`kvm_device_problem`).
KVM_DEVICE_FIX = (
    "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm (as Debian's udev rule does; scripts/setup-host.sh)"
)


def kvm_usable(dev_kvm: str = "/dev/kvm", cpuinfo: str | None = None) -> bool:
    """
    Whether hardware virtualisation can be used: ``/dev/kvm`` exists and the CPU flags show
    ``vmx`` (Intel) or ``svm`` (AMD).

    Both are needed: inside a VM without nested virtualisation ``/dev/kvm`` may exist while
    the guest kernel hangs at boot.

    :param cpuinfo: the text of ``/proc/cpuinfo``; read from the system when ``None``.
    """
    if not os.path.exists(dev_kvm):
        return False
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and {"vmx", "svm"} & set(value.split()):
            return True
    return False


def kvm_in_capabilities(capabilities_xml: str) -> bool:
    """
    :func:`kvm_usable` for a host known only through libvirt (a remote URI), from its
    ``virConnectGetCapabilities`` XML: QEMU there offers KVM for x86_64 guests, and the host CPU
    shows ``vmx`` or ``svm``. libvirt offers KVM wherever ``/dev/kvm`` exists, also inside a VM
    without nested virtualisation, where the CPU flag is missing and a KVM guest would hang.
    """
    root = ET.fromstring(capabilities_xml)
    features = {f.get("name") for f in root.iterfind("host/cpu/feature")}
    offered = any(
        guest.find("arch[@name='x86_64']/domain[@type='kvm']") is not None for guest in root.iterfind("guest")
    )
    return offered and bool({"vmx", "svm"} & features)


def select_accel(
    spec_accel: Accel,
    driver_accel: Accel,
    *,
    environ: Mapping[str, str],
    kvm_available: bool,
) -> Literal["kvm", "tcg"]:
    """
    Decide between KVM and TCG (pure emulation).

    The first choice that is not ``"auto"`` wins, in this order: the VM's spec, the driver's
    ``accel`` argument, the ``VMCONTROLLER_ACCEL`` environment variable. If all say ``auto``,
    KVM is used when it is usable (see :func:`kvm_usable`), else TCG.

    :raises HypervisorError: KVM was asked for but is not usable, or the variable is invalid.
    """
    env_accel = environ.get("VMCONTROLLER_ACCEL", "auto").strip().lower() or "auto"
    if env_accel not in ("auto", "kvm", "tcg"):
        raise HypervisorError(
            f"VMCONTROLLER_ACCEL={env_accel!r} is not valid: set it to 'kvm', 'tcg' or 'auto'"
        )
    for choice, source in (
        (spec_accel, "the VM spec"),
        (driver_accel, "the driver"),
        (env_accel, "VMCONTROLLER_ACCEL"),
    ):
        if choice == "kvm":
            if not kvm_available:
                raise HypervisorError(
                    f"{source} asks for KVM, but this host cannot use it (no /dev/kvm, or no vmx/svm "
                    "CPU flag, e.g. in a VM without nested virtualisation); use accel='tcg' or 'auto'"
                )
            return "kvm"
        if choice == "tcg":
            return "tcg"
    return "kvm" if kvm_available else "tcg"


def kvm_device_problem(device: os.stat_result | None, user_uid: int, user_gids: set[int]) -> bool:
    """
    Whether ``/dev/kvm`` exists but QEMU's user (``libvirt-qemu`` under ``qemu:///system``)
    cannot open it for reading and writing while root can. libvirtd then finds KVM "enabled
    when probing QEMU, but not available now" at every lookup and probes QEMU's capabilities
    again each time, which makes every define take about a minute.

    :param device: ``os.stat("/dev/kvm")``, or ``None`` when it does not exist.
    :param user_uid: the uid QEMU runs as; ``user_gids``: its groups.
    """
    if device is None or not stat.S_ISCHR(device.st_mode):
        return False
    mode = device.st_mode
    if device.st_uid == user_uid:
        wanted = stat.S_IRUSR | stat.S_IWUSR
    elif device.st_gid in user_gids:
        wanted = stat.S_IRGRP | stat.S_IWGRP
    else:
        wanted = stat.S_IROTH | stat.S_IWOTH
    return mode & wanted != wanted
