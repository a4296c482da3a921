"""
Domain XML, built and read without libvirt: :func:`domain_xml` is the one place a
:class:`~hypervisors.interface.VMSpec` becomes a libvirt domain, and the parsers read back what
the driver needs from libvirt's live XML (sockets, channel state, snapshots, our metadata).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Literal

from guest_agent.credentials import FW_CFG_NAME
from hypervisors.interface import DEFAULT_AGENT_CHANNEL, AgentTransport, SnapshotInfo, VMSpec, VMState
from vmcontroller.errors import HypervisorError

__all__ = [
    "CPU_CAP_PERIOD_US",
    "METADATA_NS",
    "agent_channel",
    "agent_transport",
    "channel_socket_path",
    "channel_state",
    "domain_xml",
    "nat_netdev",
    "parse_snapshot_xml",
    "serial_port_names",
    "serial_port_socket_path",
    "serial_socket_name",
]

#: XML namespace of the ``<metadata>`` element that marks a domain as one of ours.
METADATA_NS = "https://vmcontroller.readthedocs.io/xmlns/vm/1"
_METADATA_KEY = "vmcontroller"

ET.register_namespace(_METADATA_KEY, METADATA_NS)

#: The CFS period of ``<cputune>`` for ``VMSpec.cpu_cap_percent``: each vCPU may run
#: ``quota = period * percent / 100`` microseconds of every period.
CPU_CAP_PERIOD_US = 100_000

#: The longest unix socket path the kernel takes (``sun_path`` holds 108 bytes with the NUL).
_MAX_SOCKET_PATH = 107
#: Free host ports forward_port() tries before it gives up.
_FORWARD_ATTEMPTS = 3


def serial_socket_name(port: str) -> str:
    """The file name of the host socket of serial port ``port`` in the VM's directory."""
    return f"serial-{port}.sock"


def domain_xml(
    spec: VMSpec,
    *,
    accel: Literal["kvm", "tcg"],
    disk_path: str,
    console_log: str,
    disk_cache: str = "unsafe",
    serial_dir: str | None = None,
    credentials_file: str | None = None,
) -> str:
    """
    The libvirt domain XML for ``spec``: everything a VM is made of goes through here.

    :param accel: ``kvm`` gives ``<domain type='kvm'>`` with the host CPU passed through,
        ``tcg`` gives ``<domain type='qemu'>``.
    :param disk_path: the VM's writable qcow2 overlay.
    :param console_log: file the serial console is copied to (by virtlogd).
    :param disk_cache: QEMU cache mode of the disk. ``unsafe`` (the default) ignores the
        guest's flushes: the overlay is a throwaway copy-on-write layer, so a host crash costs
        only the VM, while fsync-heavy guest work (dpkg, databases) runs much faster,
        especially under TCG. Use ``writeback`` for VMs whose disks must survive host crashes.
    :param serial_dir: where the host sockets of ``spec.serial_ports`` go (named by
        :func:`serial_socket_name`); by default the console log's directory.
    :param credentials_file: the agent's credentials, handed to the guest as the QEMU fw_cfg
        entry ``opt/org.vmcontroller/credentials`` (QEMU reads the file when it starts, so the
        secret is in neither the XML nor the kernel command line).
    :raises HypervisorError: a serial socket path is too long for a unix socket.
    """
    domain = ET.Element("domain", type="kvm" if accel == "kvm" else "qemu")
    ET.SubElement(domain, "name").text = spec.name
    metadata = ET.SubElement(domain, "metadata")
    ours = ET.SubElement(metadata, f"{{{METADATA_NS}}}vm")
    ET.SubElement(ours, f"{{{METADATA_NS}}}base-disk").text = spec.disk
    ET.SubElement(ours, f"{{{METADATA_NS}}}agent-channel").text = spec.agent_channel
    ET.SubElement(ours, f"{{{METADATA_NS}}}agent-transport").text = spec.agent_transport
    ET.SubElement(ours, f"{{{METADATA_NS}}}accel").text = accel
    for index, port in enumerate(spec.serial_ports, start=1):
        ET.SubElement(ours, f"{{{METADATA_NS}}}serial-port", name=port, port=str(index))
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    if credentials_file is not None:
        sysinfo = ET.SubElement(domain, "sysinfo", type="fwcfg")
        ET.SubElement(sysinfo, "entry", name=FW_CFG_NAME, file=credentials_file)
    if spec.cpu_cap_percent < 100:
        # CFS bandwidth per vCPU thread, as VirtualBox's execution cap is per vCPU.
        cputune = ET.SubElement(domain, "cputune")
        ET.SubElement(cputune, "period").text = str(CPU_CAP_PERIOD_US)
        ET.SubElement(cputune, "quota").text = str(CPU_CAP_PERIOD_US * spec.cpu_cap_percent // 100)

    os_ = ET.SubElement(domain, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    if spec.kernel:
        ET.SubElement(os_, "kernel").text = spec.kernel
        if spec.initrd:
            ET.SubElement(os_, "initrd").text = spec.initrd
        cmdline = f"{spec.cmdline} {spec.tcg_cmdline}" if accel == "tcg" else spec.cmdline
        if cmdline.strip():
            ET.SubElement(os_, "cmdline").text = cmdline.strip()
    else:
        ET.SubElement(os_, "boot", dev="hd")

    # ACPI is what lets the guest see the power button that shutdown() presses.
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if accel == "kvm":
        ET.SubElement(domain, "cpu", mode="host-passthrough")
    ET.SubElement(domain, "clock", offset="utc")
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    ET.SubElement(domain, "on_crash").text = "destroy"

    devices = ET.SubElement(domain, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache=disk_cache, discard="unmap")
    ET.SubElement(disk, "source", file=disk_path)
    # The base image, spelled out so that libvirt leaves its owner alone: by default its DAC
    # driver chowns the whole backing chain to libvirt-qemu (and does not always give it back),
    # which would let QEMU write to the shared, cached image. Read-only access as root:root
    # 0644 is all QEMU needs for a backing file.
    backing = ET.SubElement(disk, "backingStore", type="file")
    ET.SubElement(backing, "format", type="qcow2")
    backing_source = ET.SubElement(backing, "source", file=spec.disk)
    ET.SubElement(backing_source, "seclabel", model="dac", relabel="no")
    ET.SubElement(backing, "backingStore")
    ET.SubElement(disk, "target", dev="vda", bus="virtio")

    # No USB: libvirt adds a controller by default that only costs boot time.
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "controller", type="virtio-serial", index="0")
    for name in (spec.agent_channel, *spec.extra_channels):
        channel = ET.SubElement(devices, "channel", type="unix")
        # No path: libvirt makes one per running domain (under /var/lib/libvirt/qemu/channel/),
        # and agent_socket_path() reads it back from the live XML.
        ET.SubElement(channel, "source", mode="bind")
        ET.SubElement(channel, "target", type="virtio", name=name)

    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=console_log, append="off")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    # The extra serial ports: ttyS1, ttyS2, ... in the guest (port 0, ttyS0, is the console
    # above, which libvirt aliases to serial0), each a listening unix socket on the host that
    # libvirtd creates and hands to QEMU; their names are in the metadata.
    directory = serial_dir if serial_dir is not None else os.path.dirname(console_log)
    for index, port in enumerate(spec.serial_ports, start=1):
        path = os.path.join(directory, serial_socket_name(port))
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise HypervisorError(
                f"cannot define VM {spec.name!r}: the socket of its serial port {port!r} would be "
                f"{path}, longer than a unix socket path may be ({_MAX_SOCKET_PATH} bytes); use a "
                "shorter VM name, port name or state directory"
            )
        extra = ET.SubElement(devices, "serial", type="unix")
        ET.SubElement(extra, "source", mode="bind", path=path)
        ET.SubElement(extra, "target", port=str(index))

    if spec.nat_network:
        # QEMU's user-mode network (slirp): NAT through the host's sockets, no bridge, no
        # privileges; forward_port() adds ways in.
        nic = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(nic, "model", type="virtio")

    # Seeds the guest's entropy pool at once, so nothing in early boot waits for randomness.
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def _snapshot_state(text: str | None) -> VMState:
    # libvirt's snapshot <state> uses the domain state names, plus "disk-snapshot" for an
    # external disk-only snapshot of a running VM (no memory saved).
    if not text or text == "disk-snapshot":
        return VMState.SHUTOFF
    try:
        return VMState(text)
    except ValueError:
        return VMState.NOSTATE


def parse_snapshot_xml(xml: str, *, current: bool = False) -> SnapshotInfo:
    """Read a :class:`SnapshotInfo` from libvirt's ``<domainsnapshot>`` XML."""
    root = ET.fromstring(xml)
    created = root.findtext("creationTime")
    return SnapshotInfo(
        name=root.findtext("name") or "",
        description=root.findtext("description") or "",
        created=datetime.fromtimestamp(int(created or 0), tz=UTC),
        state=_snapshot_state(root.findtext("state")),
        parent=root.findtext("parent/name"),
        current=current,
    )


def channel_state(xml: str, channel: str) -> str | None:
    """
    Whether the guest has the virtio-serial port ``channel`` open, from a live domain XML:
    ``"connected"`` or ``"disconnected"`` (QEMU reports it), ``None`` when unknown.
    """
    root = ET.fromstring(xml)
    for element in root.iterfind("devices/channel/target"):
        if element.get("name") == channel:
            return element.get("state")
    return None


def serial_port_socket_path(xml: str, port: str) -> str | None:
    """
    The host socket path of the serial port named ``port`` (see ``VMSpec.serial_ports``) in a
    domain XML, or ``None`` when the domain has no such port.
    """
    root = ET.fromstring(xml)
    number = None
    for element in root.iterfind(f"metadata/{{{METADATA_NS}}}vm/{{{METADATA_NS}}}serial-port"):
        if element.get("name") == port:
            number = element.get("port")
    if number is None:
        return None
    for element in root.iterfind("devices/serial"):
        target = element.find("target")
        source = element.find("source")
        if element.get("type") == "unix" and target is not None and target.get("port") == number:
            return source.get("path") if source is not None else None
    return None


def channel_socket_path(xml: str, channel: str) -> str | None:
    """The host socket path of the unix channel named ``channel`` in a live domain XML."""
    root = ET.fromstring(xml)
    for element in root.iterfind("devices/channel"):
        target = element.find("target")
        source = element.find("source")
        if target is not None and target.get("name") == channel and source is not None:
            return source.get("path")
    return None


def nat_netdev(xml: str) -> str | None:
    """QEMU's id of the user-mode (NAT) network of a live domain XML, or None without one."""
    root = ET.fromstring(xml)
    for element in root.iterfind("devices/interface[@type='user']"):
        alias = element.find("alias")
        if alias is not None and alias.get("name"):
            return f"host{alias.get('name')}"  # libvirt names a NIC's backend host<alias>
    return None



def _metadata_text(xml: str, key: str) -> str | None:
    return ET.fromstring(xml).findtext(f"metadata/{{{METADATA_NS}}}vm/{{{METADATA_NS}}}{key}")


def agent_channel(xml: str) -> str:
    """The agent's virtio-serial port name recorded in a domain XML by :func:`domain_xml`."""
    return _metadata_text(xml, "agent-channel") or DEFAULT_AGENT_CHANNEL


def agent_transport(xml: str) -> AgentTransport:
    """The spec's ``agent_transport`` recorded in a domain XML (``"auto"`` if none or unknown)."""
    found = _metadata_text(xml, "agent-transport")
    if found in ("virtio-serial", "serial", "tcp"):
        return found  # type: ignore[return-value]
    return "auto"


def serial_port_names(xml: str) -> list[str]:
    """The names of a domain's extra serial ports (``VMSpec.serial_ports``), in port order."""
    root = ET.fromstring(xml)
    ports = root.iterfind(f"metadata/{{{METADATA_NS}}}vm/{{{METADATA_NS}}}serial-port")
    return [p.get("name", "") for p in sorted(ports, key=lambda p: int(p.get("port") or 0))]
