"""
The libvirt driver's pure parts: domain XML, accelerator choice, error translation, snapshot
and channel parsing; also driver loading and the not-started error. No reactor, no libvirtd.
"""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt
import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from hypervisors import installed_drivers, load_driver
from hypervisors.interface import Capability, IHypervisorDriver, VMSpec, VMState
from hypervisors.libvirt import LibvirtDriver
from hypervisors.libvirt.driver import (
    capabilities_for,
    qemu_owner,
    translate_error,
    uri_is_remote,
    write_qemu_credentials,
)
from hypervisors.libvirt.host import kvm_device_problem, kvm_in_capabilities, kvm_usable, select_accel
from hypervisors.libvirt.xml import (
    METADATA_NS,
    agent_transport,
    channel_socket_path,
    channel_state,
    domain_xml,
    nat_netdev,
    parse_snapshot_xml,
    serial_port_names,
    serial_port_socket_path,
)
from vmcontroller.errors import (
    DriverNotFound,
    HypervisorError,
    SnapshotNotFound,
    VMNotFound,
    VMStateError,
)

INTEL = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae mce vmx sse2\n"
AMD = "processor\t: 0\nflags\t\t: fpu vme svm sse2\n"
NO_VIRT = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae mce sse2 hypervisor\n"


def spec(**overrides: Any) -> VMSpec:
    fields: dict[str, Any] = {
        "name": "vm1",
        "disk": "/var/lib/vmcontroller/images/x/root.qcow2",
        "kernel": "/var/lib/vmcontroller/images/x/vmlinuz",
        "initrd": "/var/lib/vmcontroller/images/x/initrd.img",
        "cmdline": "root=/dev/vda rw console=ttyS0",
    }
    fields.update(overrides)
    return VMSpec(**fields)


def render(s: VMSpec, accel: Any = "tcg") -> ET.Element:
    return ET.fromstring(
        domain_xml(
            s,
            accel=accel,
            disk_path="/var/lib/vmcontroller/vms/vm1/disk.qcow2",
            console_log="/var/lib/vmcontroller/vms/vm1/console.log",
        )
    )


# -- domain XML -------------------------------------------------------------------------------


def test_tcg_domain() -> None:
    root = render(spec(memory_mib=768, vcpus=2))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "vm1"
    assert (root.find("memory").get("unit"), root.findtext("memory")) == ("MiB", "768")  # type: ignore[union-attr]
    assert root.findtext("vcpu") == "2"
    assert root.find("cpu") is None
    os_type = root.find("os/type")
    assert os_type is not None
    assert (os_type.get("arch"), os_type.get("machine"), os_type.text) == ("x86_64", "pc", "hvm")
    assert root.findtext("os/kernel") == "/var/lib/vmcontroller/images/x/vmlinuz"
    assert root.findtext("os/initrd") == "/var/lib/vmcontroller/images/x/initrd.img"
    assert root.findtext("os/cmdline") == "root=/dev/vda rw console=ttyS0 norandmaps"
    assert root.find("features/acpi") is not None
    assert root.findtext("on_poweroff") == "destroy"


def test_kvm_domain_passes_the_host_cpu() -> None:
    root = render(spec(), accel="kvm")
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert root.findtext("os/cmdline") == "root=/dev/vda rw console=ttyS0"


def test_tcg_cmdline_is_the_specs_choice() -> None:
    assert render(spec(tcg_cmdline="")).findtext("os/cmdline") == "root=/dev/vda rw console=ttyS0"
    assert render(spec(cmdline="", tcg_cmdline="quiet")).findtext("os/cmdline") == "quiet"


def test_devices() -> None:
    root = render(spec(extra_channels=("org.example.extra",)))
    disk = root.find("devices/disk")
    assert disk is not None
    assert disk.find("source").get("file") == "/var/lib/vmcontroller/vms/vm1/disk.qcow2"  # type: ignore[union-attr]
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    # The shared base image is named, and libvirt must not chown it.
    backing = disk.find("backingStore/source")
    assert backing is not None and backing.get("file") == "/var/lib/vmcontroller/images/x/root.qcow2"
    assert backing.find("seclabel").attrib == {"model": "dac", "relabel": "no"}  # type: ignore[union-attr]
    assert root.find("devices/controller[@type='virtio-serial']") is not None
    channels = root.findall("devices/channel")
    assert [c.find("target").get("name") for c in channels] == [  # type: ignore[union-attr]
        "org.vmcontroller.agent.0",
        "org.example.extra",
    ]
    for channel in channels:
        assert channel.get("type") == "unix"
        # No path: libvirt picks one per running domain.
        assert channel.find("source").attrib == {"mode": "bind"}  # type: ignore[union-attr]
        assert channel.find("target").get("type") == "virtio"  # type: ignore[union-attr]
    log = root.find("devices/serial/log")
    assert log is not None and log.get("file") == "/var/lib/vmcontroller/vms/vm1/console.log"
    assert root.find("devices/console/target").get("type") == "serial"  # type: ignore[union-attr]
    assert root.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]
    assert root.find("devices/interface") is None
    assert root.find(f"metadata/{{{METADATA_NS}}}vm/{{{METADATA_NS}}}agent-channel").text == (  # type: ignore[union-attr]
        "org.vmcontroller.agent.0"
    )


def test_serial_ports() -> None:
    xml = domain_xml(
        spec(serial_ports=("agent-serial", "other")),
        accel="tcg",
        disk_path="/var/lib/vmcontroller/vms/vm1/disk.qcow2",
        console_log="/var/lib/vmcontroller/vms/vm1/console.log",
    )
    root = ET.fromstring(xml)
    serials = root.findall("devices/serial")
    # ttyS0 stays the logged console; the named ports follow as ttyS1, ttyS2.
    assert [(s.get("type"), s.find("target").get("port")) for s in serials] == [  # type: ignore[union-attr]
        ("pty", "0"),
        ("unix", "1"),
        ("unix", "2"),
    ]
    assert serials[0].find("log") is not None
    assert serials[1].find("source").attrib == {  # type: ignore[union-attr]
        "mode": "bind",
        "path": "/var/lib/vmcontroller/vms/vm1/serial-agent-serial.sock",
    }
    assert root.find("devices/console/target").attrib == {"type": "serial", "port": "0"}  # type: ignore[union-attr]
    ports = root.findall(f"metadata/{{{METADATA_NS}}}vm/{{{METADATA_NS}}}serial-port")
    assert [p.attrib for p in ports] == [
        {"name": "agent-serial", "port": "1"},
        {"name": "other", "port": "2"},
    ]
    # Read back by name, as from the live XML.
    assert serial_port_socket_path(xml, "other") == "/var/lib/vmcontroller/vms/vm1/serial-other.sock"
    assert serial_port_socket_path(xml, "missing") is None
    assert serial_port_socket_path(ET.tostring(render(spec()), encoding="unicode"), "agent-serial") is None


def test_serial_ports_in_another_directory() -> None:
    xml = domain_xml(
        spec(serial_ports=("a",)),
        accel="tcg",
        disk_path="/d/disk.qcow2",
        console_log="/d/console.log",
        serial_dir="/run/vmc/vm1",
    )
    assert serial_port_socket_path(xml, "a") == "/run/vmc/vm1/serial-a.sock"


def test_no_serial_ports_by_default() -> None:
    root = render(spec())
    assert len(root.findall("devices/serial")) == 1
    assert root.find(f"metadata/{{{METADATA_NS}}}vm/{{{METADATA_NS}}}serial-port") is None


def test_serial_socket_path_too_long() -> None:
    with pytest.raises(HypervisorError, match="longer than a unix socket path"):
        domain_xml(
            spec(serial_ports=("p" * 80,)),
            accel="tcg",
            disk_path="/var/lib/vmcontroller/vms/vm1/disk.qcow2",
            console_log="/var/lib/vmcontroller/vms/vm1/console.log",
        )


def test_cpu_cap_is_a_cfs_quota_per_vcpu() -> None:
    root = render(spec(cpu_cap_percent=40, vcpus=2))
    assert root.findtext("cputune/period") == "100000"
    assert root.findtext("cputune/quota") == "40000"
    assert render(spec()).find("cputune") is None


def test_the_agent_transport_and_serial_ports_are_kept_in_the_metadata() -> None:
    xml = ET.tostring(render(spec(serial_ports=("b", "a"), agent_transport="serial")), encoding="unicode")
    assert agent_transport(xml) == "serial"
    assert serial_port_names(xml) == ["b", "a"]
    plain = ET.tostring(render(spec()), encoding="unicode")
    assert (agent_transport(plain), serial_port_names(plain)) == ("auto", [])
    # A domain defined before the transport was recorded, or with a value we do not know.
    assert agent_transport("<domain><name>x</name></domain>") == "auto"
    assert agent_transport(plain.replace(">auto<", ">carrier-pigeon<")) == "auto"


def test_nat_network_card() -> None:
    assert render(spec()).find("devices/interface") is None
    nic = render(spec(nat_network=True)).find("devices/interface")
    assert nic is not None and nic.get("type") == "user"
    assert nic.find("model").get("type") == "virtio"  # type: ignore[union-attr]


def test_nat_netdev_from_the_live_xml() -> None:
    live = """<domain><devices>
      <interface type='network'><alias name='net0'/></interface>
      <interface type='user'>
        <mac address='52:54:00:7e:0d:94'/><model type='virtio'/><alias name='net1'/>
      </interface>
    </devices></domain>"""
    assert nat_netdev(live) == "hostnet1"
    assert nat_netdev("<domain><devices/></domain>") is None


def test_serial_device() -> None:
    s = spec(serial_ports=("agent-serial", "b", "c"))
    assert [s.serial_device(p) for p in s.serial_ports] == ["/dev/ttyS1", "/dev/ttyS2", "/dev/ttyS3"]
    with pytest.raises(KeyError, match="no serial port 'd'"):
        s.serial_device("d")


def test_disk_boot_without_kernel() -> None:
    root = render(spec(kernel=None, initrd=None, cmdline=""))
    assert root.find("os/kernel") is None
    assert root.find("os/boot").get("dev") == "hd"  # type: ignore[union-attr]


def test_names_are_escaped() -> None:
    root = render(spec(cmdline="a='<b>' & c", tcg_cmdline=""))
    assert root.findtext("os/cmdline") == "a='<b>' & c"


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "bad name"},
        {"name": ""},
        {"name": ".hidden"},
        {"memory_mib": 16},
        {"vcpus": 0},
        {"accel": "hax"},
        {"kernel": None},
        {"serial_ports": ("a", "b", "c", "d")},
        {"serial_ports": ("a", "a")},
        {"serial_ports": ("bad name",)},
        {"serial_ports": ("",)},
        {"serial_ports": (".hidden",)},
        {"serial_ports": "agent"},
    ],
)
def test_invalid_specs(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        spec(**fields)


# -- accelerator ------------------------------------------------------------------------------


def test_kvm_usable_needs_device_and_cpu_flag(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    assert not kvm_usable(str(dev), INTEL)
    dev.touch()
    assert kvm_usable(str(dev), INTEL)
    assert kvm_usable(str(dev), AMD)
    # /dev/kvm without vmx/svm: a VM without nested virtualisation, where KVM guests hang.
    assert not kvm_usable(str(dev), NO_VIRT)


def device(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((stat.S_IFCHR | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


QEMU_UID, KVM_GID = 64055, 107


@pytest.mark.parametrize(
    ("dev", "problem"),
    [
        (device(0o600), True),  # root:root 0600, as found on this machine kind without udev
        (device(0o660, gid=KVM_GID), False),  # root:kvm 0660, Debian's udev rule
        (device(0o600, gid=KVM_GID), True),
        (device(0o666), False),
        (device(0o600, uid=QEMU_UID), False),
        (None, False),  # no KVM at all: TCG, nothing to warn about
        (os.stat_result((stat.S_IFREG | 0o600, 0, 0, 1, 0, 0, 0, 0, 0, 0)), False),
    ],
)
def test_kvm_device_problem(dev: os.stat_result | None, problem: bool) -> None:
    assert kvm_device_problem(dev, QEMU_UID, {QEMU_UID, KVM_GID}) is problem


def test_the_driver_warns_once_at_start_about_an_unopenable_dev_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hypervisors.libvirt.driver._kvm_device_problem", lambda: True)
    with capturedLogs() as logs:
        LibvirtDriver(Clock(), uri="qemu:///system")._check_host()
        LibvirtDriver(Clock(), uri="test:///default")._check_host()
    assert len(logs) == 1
    message = formatEvent(logs[0])
    assert "each define takes about a minute" in message
    assert "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm" in message


def test_capabilities_per_uri() -> None:
    assert capabilities_for("qemu:///system") == set(Capability)
    assert capabilities_for("qemu:///session") == set(Capability)
    simulated = capabilities_for("test:///default")
    assert Capability.PUSHED_EVENTS in simulated and Capability.SAVE_STATE in simulated
    assert not simulated & {Capability.VIRTIO_SERIAL, Capability.SERIAL_PORTS, Capability.PORT_FORWARD}
    for uri in ("qemu+tcp://10.0.0.2/system", "qemu+ssh://root@host/system", "qemu+tls://host/system"):
        remote = capabilities_for(uri)
        # Sockets and ports on the other host are out of reach; the rest is as local.
        assert remote == set(Capability) - {Capability.SERIAL_PORTS, Capability.PORT_FORWARD}, uri


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("qemu:///system", False),
        ("qemu:///session", False),
        ("qemu+unix:///system?socket=/run/x.sock", False),
        ("test:///default", False),
        ("qemu+tcp://10.231.1.2/system", True),
        ("qemu+ssh://root@worker7/system", True),
        ("qemu+tls://worker7.example.org/system", True),
        # Named, even as this host: the URI says the files are wherever that host keeps them.
        ("qemu+tcp://localhost/system", True),
    ],
)
def test_uri_is_remote(uri: str, remote: bool) -> None:
    assert uri_is_remote(uri) is remote
    assert LibvirtDriver(Clock(), uri).remote is remote


CAPABILITIES = """<capabilities>
  <host><cpu><arch>x86_64</arch>{features}</cpu></host>
  <guest><os_type>hvm</os_type>
    <arch name='x86_64'><domain type='qemu'/>{kvm}</arch>
  </guest>
</capabilities>"""


@pytest.mark.parametrize(
    ("features", "kvm", "usable"),
    [
        ("<feature name='vmx'/>", "<domain type='kvm'/>", True),
        ("<feature name='svm'/><feature name='avx'/>", "<domain type='kvm'/>", True),
        # /dev/kvm there but no virtualisation flag: a VM without nested KVM, where guests hang.
        ("<feature name='hypervisor'/>", "<domain type='kvm'/>", False),
        ("<feature name='vmx'/>", "", False),
    ],
)
def test_kvm_in_a_remote_hosts_capabilities(features: str, kvm: str, usable: bool) -> None:
    assert kvm_in_capabilities(CAPABILITIES.format(features=features, kvm=kvm)) is usable


@pytest.mark.parametrize(
    ("spec_accel", "driver_accel", "env", "kvm", "expected"),
    [
        ("auto", "auto", {}, True, "kvm"),
        ("auto", "auto", {}, False, "tcg"),
        ("auto", "auto", {"VMCONTROLLER_ACCEL": "tcg"}, True, "tcg"),
        ("auto", "auto", {"VMCONTROLLER_ACCEL": "kvm"}, True, "kvm"),
        ("auto", "auto", {"VMCONTROLLER_ACCEL": "auto"}, False, "tcg"),
        ("auto", "tcg", {"VMCONTROLLER_ACCEL": "kvm"}, True, "tcg"),
        ("tcg", "kvm", {}, True, "tcg"),
        ("kvm", "tcg", {"VMCONTROLLER_ACCEL": "tcg"}, True, "kvm"),
    ],
)
def test_select_accel(
    spec_accel: Any, driver_accel: Any, env: dict[str, str], kvm: bool, expected: str
) -> None:
    assert select_accel(spec_accel, driver_accel, environ=env, kvm_available=kvm) == expected


@pytest.mark.parametrize(
    ("spec_accel", "env"),
    [("kvm", {}), ("auto", {"VMCONTROLLER_ACCEL": "kvm"})],
)
def test_kvm_asked_for_but_unusable(spec_accel: Any, env: dict[str, str]) -> None:
    with pytest.raises(HypervisorError, match="tcg"):
        select_accel(spec_accel, "auto", environ=env, kvm_available=False)


def test_bad_accel_variable() -> None:
    with pytest.raises(HypervisorError, match="VMCONTROLLER_ACCEL"):
        select_accel("auto", "auto", environ={"VMCONTROLLER_ACCEL": "fast"}, kvm_available=True)


# -- errors -----------------------------------------------------------------------------------


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    error = libvirt.libvirtError(message)
    # The tuple virGetLastError() gives: code, domain, message, level, str1..3, int1, int2.
    error.err = (code, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return error


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (libvirt.VIR_ERR_NO_DOMAIN, VMNotFound),
        (libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT, SnapshotNotFound),
        (libvirt.VIR_ERR_OPERATION_INVALID, VMStateError),
        (libvirt.VIR_ERR_INTERNAL_ERROR, HypervisorError),
    ],
)
def test_translate_error(code: int, cls: type[HypervisorError]) -> None:
    error = translate_error(libvirt_error(code, "libvirt said this"), action="pause", vm="vm1", snapshot="s1")
    assert type(error) is cls
    assert "libvirt said this" in str(error)
    assert "vm1" in str(error)


def test_translated_snapshot_error_names_the_snapshot() -> None:
    error = translate_error(
        libvirt_error(libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT, "no snapshot"),
        action="revert",
        vm="vm1",
        snapshot="s1",
    )
    assert "'s1'" in str(error) and "snapshot_list" in str(error)


# -- parsing ----------------------------------------------------------------------------------


SNAPSHOT_XML = """
<domainsnapshot>
  <name>s2</name>
  <description>after setup</description>
  <state>running</state>
  <parent><name>s1</name></parent>
  <creationTime>1700000000</creationTime>
  <memory snapshot='internal'/>
  <domain type='qemu'><name>vm1</name></domain>
</domainsnapshot>
"""


def test_parse_snapshot() -> None:
    info = parse_snapshot_xml(SNAPSHOT_XML, current=True)
    assert info.name == "s2"
    assert info.description == "after setup"
    assert info.state is VMState.RUNNING and info.has_memory
    assert info.parent == "s1"
    assert info.created == datetime.fromtimestamp(1700000000, tz=UTC)
    assert info.current


def test_parse_offline_snapshot() -> None:
    info = parse_snapshot_xml("<domainsnapshot><name>s</name><state>shutoff</state></domainsnapshot>")
    assert (info.state, info.has_memory, info.parent, info.description) == (VMState.SHUTOFF, False, None, "")


def test_channel_socket_path() -> None:
    xml = """<domain><devices>
      <channel type='unix'><source mode='bind' path='/run/x/other'/>
        <target type='virtio' name='other'/></channel>
      <channel type='unix'><source mode='bind' path='/run/x/agent'/>
        <target type='virtio' name='org.vmcontroller.agent.0' state='connected'/></channel>
    </devices></domain>"""
    assert channel_socket_path(xml, "org.vmcontroller.agent.0") == "/run/x/agent"
    assert channel_socket_path(xml, "missing") is None
    assert channel_state(xml, "org.vmcontroller.agent.0") == "connected"
    assert channel_state(xml, "other") is None


def test_state_mapping() -> None:
    assert VMState.from_libvirt(libvirt.VIR_DOMAIN_RUNNING) is VMState.RUNNING
    assert VMState.from_libvirt(libvirt.VIR_DOMAIN_PAUSED) is VMState.PAUSED
    assert VMState.from_libvirt(libvirt.VIR_DOMAIN_SHUTOFF) is VMState.SHUTOFF
    assert VMState.from_libvirt(libvirt.VIR_DOMAIN_CRASHED) is VMState.CRASHED
    assert VMState.from_libvirt(libvirt.VIR_DOMAIN_PMSUSPENDED) is VMState.PMSUSPENDED
    assert VMState.from_libvirt(99) is VMState.NOSTATE


# -- the driver object ------------------------------------------------------------------------


def test_driver_provides_the_interface() -> None:
    driver = LibvirtDriver(Clock(), uri="test:///default")
    assert verifyObject(IHypervisorDriver, driver)
    assert driver.uri == "test:///default"


def test_calls_before_start_fail_clearly() -> None:
    driver = LibvirtDriver(Clock(), uri="test:///default")
    failures: list[Failure] = []
    driver.state("vm1").addErrback(failures.append)
    driver.list_vms().addErrback(failures.append)
    assert len(failures) == 2
    for f in failures:
        assert f.check(HypervisorError)
        assert "startService" in str(f.value)


@pytest.mark.parametrize(
    ("port", "address", "message"),
    [
        (0, "10.0.2.15", "give a TCP port"),
        (65536, "10.0.2.15", "give a TCP port"),
        (True, "10.0.2.15", "give a TCP port"),
        (22, "10.0.2.15 -x", "give an IPv4 address"),
        (22, "::1", "give an IPv4 address"),
    ],
)
def test_forward_port_checks_its_arguments_before_anything(port: Any, address: str, message: str) -> None:
    driver = LibvirtDriver(Clock(), uri="test:///default")  # not started: nothing reaches libvirt
    with pytest.raises(ValueError, match=message):
        driver.forward_port("vm1", port, address)


def test_load_driver_by_entry_point() -> None:
    assert "libvirt" in installed_drivers()
    driver = load_driver("libvirt", Clock(), uri="test:///default")
    assert isinstance(driver, LibvirtDriver)


def test_load_unknown_driver_lists_the_installed_ones() -> None:
    with pytest.raises(DriverNotFound, match="libvirt"):
        load_driver("hyperv", Clock())


# -- credentials through QEMU fw_cfg ------------------------------------------------------------


def test_credentials_go_in_as_a_fw_cfg_file_never_on_the_command_line() -> None:
    path = "/var/lib/vmcontroller/vms/vm1/agent-credentials.json"
    root = ET.fromstring(
        domain_xml(spec(), accel="tcg", disk_path="/d.qcow2", console_log="/c.log", credentials_file=path)
    )
    (entry,) = root.findall("sysinfo[@type='fwcfg']/entry")
    assert entry.get("name") == "opt/org.vmcontroller/credentials" and entry.get("file") == path
    assert entry.text is None  # the content stays in the file, out of the XML
    assert "credentials" not in (root.findtext("os/cmdline") or "")
    assert render(spec()).find("sysinfo") is None


def test_qemu_owner_from_the_dac_base_label() -> None:
    capabilities = """<capabilities><host>
      <secmodel><model>none</model><doi>0</doi></secmodel>
      <secmodel><model>dac</model><doi>0</doi>
        <baselabel type='kvm'>+64055:+64056</baselabel>
        <baselabel type='qemu'>+64055:+64056</baselabel></secmodel>
    </host></capabilities>"""
    assert qemu_owner(capabilities) == (64055, 64056)
    assert qemu_owner("<capabilities><host/></capabilities>") is None


def test_qemu_credentials_file_is_private_to_its_owner(tmp_path: Path) -> None:
    target = tmp_path / "agent-credentials.json"
    write_qemu_credentials(target, b"{}", (os.getuid(), os.getgid()))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_bytes() == b"{}"
    assert (target.stat().st_uid, target.stat().st_gid) == (os.getuid(), os.getgid())
