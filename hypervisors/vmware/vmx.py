"""
The ``.vmx`` file: a VM's configuration as VMware reads it, written from a
:class:`~hypervisors.interface.VMSpec`, and read back for the state the VM keeps in it.

Pure functions, no I/O. A ``.vmx`` is a list of ``key = "value"`` lines whose keys VMware
compares case-insensitively (so :func:`parse_vmx` lowercases them, as packer's ``ParseVMX``
does in ``builder/vmware/common/vmx.go`` of hashicorp/packer-plugin-vmware).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from hypervisors.interface import VMSpec
from vmcontroller.errors import HypervisorError

__all__ = [
    "GUESTINFO_PREFIX",
    "MAX_SOCKET_PATH",
    "guestinfo_entries",
    "is_suspended",
    "parse_vmx",
    "render_vmx",
    "serial_socket_name",
    "vmx_entries",
]

#: The prefix VMware gives the variables a guest reads with
#: ``vmware-rpctool "info-get guestinfo.<key>"`` (or ``vmtoolsd --cmd``).
GUESTINFO_PREFIX = "guestinfo."

#: The longest unix socket path the kernel takes (``sun_path`` holds 108 bytes with the NUL).
MAX_SOCKET_PATH = 107

#: The guest OS type VMware sizes its virtual hardware for (Workstation's "Other Linux 5.x
#: kernel 64-bit"): the guest is the project's Debian image.
GUEST_OS = "other5xlinux-64"

#: Virtual hardware version 19 (Workstation 16.2, Fusion 12.2, Player 16.2): new enough for
#: any current product, old enough not to lock out the volunteers' older installs.
VIRTUAL_HW_VERSION = "19"


def serial_socket_name(port: str) -> str:
    """The file name, in the VM's directory, of the unix socket of serial port ``port``."""
    return f"serial-{port}.sock"


def _check_value(key: str, value: str) -> str:
    # A value sits between double quotes on one line; VMware escapes other bytes with its own
    # "|XX" scheme, which we never need: refuse what would need it instead of guessing.
    bad = [c for c in value if c in '"|\\' or not c.isprintable() or not c.isascii()]
    if bad:
        raise ValueError(
            f"cannot write {key} = {value!r} to a .vmx: {bad[0]!r} is not allowed (printable ASCII "
            "without '\"', '|' and '\\'); encode the value, e.g. in base64"
        )
    return value


def guestinfo_entries(values: Mapping[str, str]) -> dict[str, str]:
    """
    The ``.vmx`` lines for guest variables: ``{"token": "abc"}`` becomes
    ``guestinfo.token = "abc"``, which a program in the guest reads with
    ``vmware-rpctool "info-get guestinfo.token"``. Every user of the guest can read them.

    :param values: variable names (letters, digits, ``.``, ``_``, ``-``; without the
        ``guestinfo.`` prefix) and their values (printable ASCII without ``"``, ``|``, ``\\``).
    :raises ValueError: a name or value cannot be written.
    """
    entries = {}
    for key, value in values.items():
        if not key or not all(c.isascii() and (c.isalnum() or c in "._-") for c in key):
            raise ValueError(
                f"invalid guestinfo variable name {key!r}: use letters, digits, '.', '_' and '-' "
                "(without the 'guestinfo.' prefix)"
            )
        entries[f"{GUESTINFO_PREFIX}{key}"] = _check_value(f"{GUESTINFO_PREFIX}{key}", value)
    return entries


def vmx_entries(
    spec: VMSpec,
    *,
    vm_dir: str,
    disk_file: str,
    guestinfo: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """
    The ``.vmx`` entries of ``spec``, in the order they are written.

    :param vm_dir: the VM's directory; its serial port sockets and console log go there.
    :param disk_file: the VM's writable disk (a ``.vmdk`` whose parent is the shared base),
        relative to ``vm_dir`` as VMware writes it.
    :param guestinfo: guest variables (see :func:`guestinfo_entries`).
    :raises HypervisorError: a serial port's socket path would be too long.
    :raises ValueError: a guest variable cannot be written.
    """
    entries: dict[str, str] = {
        "config.version": "8",
        "virtualHW.version": VIRTUAL_HW_VERSION,
        "displayName": spec.name,
        "guestOS": GUEST_OS,
        "memsize": str(spec.memory_mib),
        "numvcpus": str(spec.vcpus),
        # Written empty, as packer's template does: VMware fills it in at suspend
        # (vmrun suspend) and empties it when the VM resumes.
        "checkpoint.vmState": "",
        # An unattended VM: never wait for an answer to a dialog nobody sees (vagrant-vmware-
        # desktop's driver sets the same key before it starts a VM).
        "msg.autoAnswer": "TRUE",
        "bios.bootOrder": "hdd",
        "scsi0.present": "TRUE",
        "scsi0.virtualDev": "lsilogic",
        "scsi0:0.present": "TRUE",
        "scsi0:0.fileName": disk_file,
        # serial0 is the guest's ttyS0, its console, copied to a file like libvirt's console.log;
        # so the spec's ports are ttyS1 to ttyS3, as VMSpec.serial_device says.
        "serial0.present": "TRUE",
        "serial0.fileType": "file",
        "serial0.fileName": os.path.join(vm_dir, "console.log"),
    }
    for index, port in enumerate(spec.serial_ports, start=1):
        path = os.path.join(vm_dir, serial_socket_name(port))
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise HypervisorError(
                f"cannot define VM {spec.name!r}: the socket of its serial port {port!r} would be "
                f"{path}, longer than a unix socket path may be ({MAX_SOCKET_PATH} bytes); use a "
                "shorter VM name, port name or state directory"
            )
        # A "named pipe" is a unix socket on Linux and macOS; endPoint "server": VMware listens
        # and the host's program (our agent client) connects. tryNoRxLoss "FALSE": the other
        # end is an application, not another VM (packer's serial "PIPE:path,server,app").
        entries |= {
            f"serial{index}.present": "TRUE",
            f"serial{index}.fileType": "pipe",
            f"serial{index}.fileName": path,
            f"serial{index}.pipe.endPoint": "server",
            f"serial{index}.tryNoRxLoss": "FALSE",
            f"serial{index}.startConnected": "TRUE",
        }
    if spec.nat_network:
        # e1000: a card every Linux kernel drives (vmxnet3 needs its own driver).
        entries |= {
            "ethernet0.present": "TRUE",
            "ethernet0.connectionType": "nat",
            "ethernet0.virtualDev": "e1000",
            "ethernet0.addressType": "generated",
        }
    for key, value in entries.items():
        _check_value(key, value)
    entries |= guestinfo_entries(guestinfo or {})
    return entries


def render_vmx(entries: Mapping[str, str]) -> str:
    """The text of a ``.vmx`` file with ``entries``, UTF-8 as its first line declares."""
    lines = ['.encoding = "UTF-8"']
    lines += [f'{key} = "{_check_value(key, value)}"' for key, value in entries.items()]
    return "\n".join(lines) + "\n"


def parse_vmx(text: str) -> dict[str, str]:
    """
    The entries of a ``.vmx`` file, keys lowercased (VMware compares them so); lines that are
    not ``key = value`` (comments, blanks) are skipped and a later line wins.
    """
    entries = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        entries[key.lower()] = value
    return entries


def is_suspended(entries: Mapping[str, str]) -> bool:
    """
    Whether a parsed ``.vmx`` says the VM is suspended: VMware names the suspended state file
    (``<vm>.vmss``) in ``checkpoint.vmState`` and empties it on resume; vagrant-vmware-desktop
    removes the same key when it discards a suspended state (``discard_suspended_state``).
    """
    return bool(entries.get("checkpoint.vmstate", "").strip())
