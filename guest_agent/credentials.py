"""
Where the agent finds its credentials: handed in by the hypervisor, out of band, never in
the shared image nor on the kernel command line (which every guest user reads).

Tried in this order at start:

1. QEMU ``fw_cfg`` (the libvirt driver): ``/sys/firmware/qemu_fw_cfg/by_name/opt/
   org.vmcontroller/credentials/raw``, which only root reads.  It cannot be erased; it
   changes only when the VM boots again.
2. A VirtualBox guest property, read with ``VBoxControl`` (Guest Additions).
3. A VMware ``guestinfo`` variable, read with ``vmware-rpctool`` (open-vm-tools).
4. The agent's own copy in ``/run`` (a tmpfs, root only), left by an earlier start in this
   boot: 2 and 3 are erased once read, so an agent restarted by systemd needs it.

Any guest process may read guest properties and ``guestinfo``, so after reading one of
them the agent keeps the value in its ``/run`` copy and erases it there, before it serves
any host (and so before any job can run).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

from guest_agent.protocol.errors import CredentialsUnavailable
from guest_agent.protocol.tls import Credentials

FW_CFG_PATH = "/sys/firmware/qemu_fw_cfg/by_name/opt/org.vmcontroller/credentials/raw"
#: The name the libvirt driver gives the fw_cfg entry (``opt/`` names are free for users).
FW_CFG_NAME = "opt/org.vmcontroller/credentials"
VBOX_PROPERTY = "/VMController/Credentials"
VMWARE_VARIABLE = "guestinfo.vmcontroller.credentials"
RUN_COPY = "/run/vmcontroller-agent/credentials"

log = Logger()


def _parse(value: bytes, source: str) -> Credentials:
    """JSON as minted, or that JSON in base64 (as ``guestinfo`` values usually are)."""
    value = value.strip()
    if not value.startswith(b"{"):
        with contextlib.suppress(binascii.Error, ValueError):
            value = base64.b64decode(value, validate=True)
    try:
        return Credentials.from_json(value)
    except ValueError as e:
        raise CredentialsUnavailable(f"the credentials in {source} are damaged: {e}") from None


def read_credentials_file(path: str) -> Credentials:
    """
    Credentials from a file of the guest's own provisioning (``run --credentials``), which
    must be the owner's alone: never a file of the shared image.

    :raises CredentialsUnavailable: missing, readable by others, or damaged.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise CredentialsUnavailable(f"cannot open the credentials file {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        if os.fstat(fd).st_mode & 0o077:
            raise CredentialsUnavailable(
                f"the credentials file {path} may be read by other users: chmod 600 it"
            )
        return _parse(file.read(), path)


def _keep_copy(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


async def _tool(reactor: Any, argv: Sequence[str]) -> tuple[bytes, int] | None:
    """Run a hypervisor tool; None when it is not installed."""
    executable = shutil.which(argv[0])
    if executable is None:
        return None
    out, _err, code = await getProcessOutputAndValue(
        executable, list(argv[1:]), env=dict(os.environ), reactor=reactor
    )
    return out, code


async def _from_virtualbox(reactor: Any, tool: str) -> bytes | None:
    # VBoxControl prints "Value: <value>" or "No value set!" (VBoxControl.cpp,
    # getGuestProperty); setting a property with no value deletes it (setGuestProperty).
    got = await _tool(reactor, [tool, "--nologo", "guestproperty", "get", VBOX_PROPERTY])
    if got is None:
        return None
    out, code = got
    if code != 0 or not out.startswith(b"Value: "):
        return None
    erased = await _tool(reactor, [tool, "--nologo", "guestproperty", "set", VBOX_PROPERTY])
    if erased is None or erased[1] != 0:
        raise CredentialsUnavailable(
            f"could not erase guest property {VBOX_PROPERTY} after reading it: any guest process "
            "could read the credentials. Set it from the host without the RDONLYGUEST flag"
        )
    return out[len(b"Value: ") :].rstrip(b"\n")


async def _from_vmware(reactor: Any, tool: str) -> bytes | None:
    # vmware-rpctool prints the value and exits 0, or says "No value found" and exits 1
    # (open-vm-tools, rpctool.c and the VMX's info-get); info-set from the guest overrides
    # the value for the rest of the VM's run.
    got = await _tool(reactor, [tool, f"info-get {VMWARE_VARIABLE}"])
    if got is None:
        return None
    out, code = got
    if code != 0 or not out.strip():
        return None
    erased = await _tool(reactor, [tool, f"info-set {VMWARE_VARIABLE} "])
    if erased is None or erased[1] != 0:
        raise CredentialsUnavailable(
            f"could not erase {VMWARE_VARIABLE} after reading it: any guest process could read "
            "the credentials"
        )
    return out.rstrip(b"\n")


async def load_credentials(
    reactor: Any,
    *,
    fw_cfg: str = FW_CFG_PATH,
    vboxcontrol: str = "VBoxControl",
    rpctool: str = "vmware-rpctool",
    run_copy: str = RUN_COPY,
) -> Credentials:
    """
    Find this VM's credentials (see the module's documentation for where and in what order).
    Never logs their content.

    :raises CredentialsUnavailable: none anywhere, or damaged; the message says where it looked.
    """
    try:
        data = Path(fw_cfg).read_bytes()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CredentialsUnavailable(
            f"cannot read {fw_cfg} ({e.strerror}): the agent must run as root"
        ) from None
    else:
        log.info("Credentials from QEMU fw_cfg ({path})", path=fw_cfg)
        return _parse(data, fw_cfg)
    for name, reader, tool in (
        (f"VirtualBox guest property {VBOX_PROPERTY}", _from_virtualbox, vboxcontrol),
        (f"VMware {VMWARE_VARIABLE}", _from_vmware, rpctool),
    ):
        value = await reader(reactor, tool)
        if value is not None:
            credentials = _parse(value, name)
            _keep_copy(run_copy, credentials.to_json())
            log.info("Credentials from the {name}, erased there and kept in {copy}", name=name, copy=run_copy)
            return credentials
    try:
        data = Path(run_copy).read_bytes()
    except FileNotFoundError:
        raise CredentialsUnavailable(
            f"no credentials: none in QEMU fw_cfg ({fw_cfg}), in the VirtualBox guest property "
            f"{VBOX_PROPERTY}, in VMware's {VMWARE_VARIABLE}, nor in {run_copy}. The VM was not "
            "defined by vmcontroller (or its driver did not provision them); for development "
            "only, run the agent with --development"
        ) from None
    log.info("Credentials from this boot's copy in {copy}", copy=run_copy)
    return _parse(data, run_copy)


__all__ = ["FW_CFG_NAME", "FW_CFG_PATH", "RUN_COPY", "VBOX_PROPERTY", "VMWARE_VARIABLE", "load_credentials"]
