"""
The libvirt/QEMU hypervisor driver.

libvirt's Python binding blocks, so every call runs in the driver's own thread pool (never the
reactor thread, never the reactor's shared pool) and ``libvirtError`` becomes one of our
exceptions inside the worker thread, where libvirt keeps the per-thread error details.

Each VM gets a directory ``/var/lib/vmcontroller/vms/<name>/`` with its qcow2 overlay of the
base image (``disk.qcow2``), its serial console log (``console.log``, written by virtlogd) and
the host sockets of its extra serial ports (``serial-<port>.sock``), so the base image is never
modified and several VMs can share it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import libvirt
import libvirt_qemu
from twisted.application.service import Service
from twisted.internet import utils
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IReactorCore, IReactorProcess, IReactorThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from guest_agent.credentials import FW_CFG_NAME
from guest_agent.protocol.tls import Credentials
from hypervisors.interface import (
    DEFAULT_AGENT_CHANNEL,
    NAT_GUEST_ADDRESS,
    Accel,
    IHypervisorDriver,
    SnapshotInfo,
    VMSpec,
    VMState,
)
from vmcontroller.credentials import CredentialStore
from vmcontroller.errors import (
    HypervisorError,
    SnapshotNotFound,
    VMAlreadyExists,
    VMNotFound,
    VMStateError,
    VMTimeout,
)

__all__ = [
    "DEFAULT_STATE_DIR",
    "METADATA_NS",
    "LibvirtDriver",
    "channel_socket_path",
    "channel_state",
    "domain_xml",
    "kvm_usable",
    "nat_netdev",
    "parse_snapshot_xml",
    "select_accel",
    "serial_port_socket_path",
    "serial_socket_name",
    "translate_error",
]

T = TypeVar("T")

DEFAULT_STATE_DIR = Path("/var/lib/vmcontroller/vms")

#: XML namespace of the ``<metadata>`` element that marks a domain as one of ours.
METADATA_NS = "https://vmcontroller.readthedocs.io/xmlns/vm/1"
_METADATA_KEY = "vmcontroller"

ET.register_namespace(_METADATA_KEY, METADATA_NS)


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    # libvirt's default handler prints every error to stderr, also those we expect and turn
    # into exceptions (an unknown domain, a missing snapshot).
    return None


libvirt.registerErrorHandler(_ignore_libvirt_error, None)

#: How often :meth:`LibvirtDriver.wait_for_state` polls. Polling, not libvirt events: it needs
#: no event loop integration and a state change is seen within this delay.
POLL_INTERVAL = 0.25


# -- pure helpers (unit-tested without libvirt or a reactor) ----------------------------------


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
    The libvirt domain XML for ``spec``.

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
    ET.SubElement(ours, f"{{{METADATA_NS}}}accel").text = accel
    for index, port in enumerate(spec.serial_ports, start=1):
        ET.SubElement(ours, f"{{{METADATA_NS}}}serial-port", name=port, port=str(index))
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    if credentials_file is not None:
        sysinfo = ET.SubElement(domain, "sysinfo", type="fwcfg")
        ET.SubElement(sysinfo, "entry", name=FW_CFG_NAME, file=credentials_file)

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


def translate_error(
    error: libvirt.libvirtError,
    *,
    action: str,
    vm: str | None = None,
    snapshot: str | None = None,
) -> HypervisorError:
    """
    Turn a ``libvirtError`` into the matching :class:`HypervisorError` subclass.

    Must run in the thread that got the error when ``error`` was raised by libvirt, which is
    where the binding reads libvirt's thread-local error details.

    :param action: what was being done, for the message ("pause", "take snapshot s1", ...).
    """
    code = error.get_error_code()
    message = error.get_error_message() or str(error)
    what = f"{action} {vm!r}" if vm else action
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return VMNotFound(
            f"cannot {what}: no VM named {vm!r} is defined ({message}); see list_vms() for the defined VMs"
        )
    if code == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
        return SnapshotNotFound(
            f"cannot {what}: VM {vm!r} has no snapshot {snapshot!r} ({message}); "
            "see snapshot_list() for its snapshots"
        )
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return VMStateError(
            f"cannot {what} in its current state: {message}; check state() and start, resume or "
            "stop the VM first"
        )
    return HypervisorError(
        f"cannot {what}: libvirt says: {message} (error code {code}); check that libvirtd runs "
        "(`virsh -c qemu:///system version`) and read its log and the VM's console.log"
    )


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


#: The file in a VM's directory that QEMU hands the guest as its fw_cfg credentials entry.
FW_CFG_FILE = "agent-credentials.json"


def qemu_owner(capabilities_xml: str, domain_type: str = "qemu") -> tuple[int, int] | None:
    """
    The uid and gid QEMU runs as, from libvirt's host capabilities (the DAC security model's
    base label, ``+64055:+64055``); None when QEMU runs as root or libvirt does not say.
    """
    root = ET.fromstring(capabilities_xml)
    for secmodel in root.iterfind("host/secmodel"):
        if secmodel.findtext("model") != "dac":
            continue
        for label in secmodel.iterfind("baselabel"):
            if label.get("type") == domain_type and label.text:
                uid, _, gid = label.text.partition(":")
                return int(uid.lstrip("+")), int(gid.lstrip("+"))
    return None


def write_qemu_credentials(path: Path, data: bytes, owner: tuple[int, int] | None) -> None:
    """
    The agent's credentials for QEMU to read at start: mode 0600, owned by the user QEMU
    runs as (libvirt does not relabel fw_cfg files, and QEMU opens them itself).
    """
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temp, path)


def _require_running(d: libvirt.virDomain, name: str, consequence: str) -> None:
    """:raises VMStateError: the domain is not running (or paused), so ``consequence``."""
    if not d.isActive():
        raise VMStateError(f"VM {name!r} is not running, so {consequence}; start it first")


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- the driver -------------------------------------------------------------------------------


@implementer(IHypervisorDriver)
class LibvirtDriver(Service):
    """
    Controls QEMU VMs through libvirt.

    A :class:`~twisted.application.service.Service`: ``startService()`` starts its thread pool,
    ``stopService()`` closes the libvirt connection and stops the pool. Cancelling one of its
    Deferreds does not stop a libvirt call already running in the pool.

    :param reactor: the reactor; its clock drives ``wait_for_state`` and it runs ``qemu-img``.
    :param uri: the libvirt URI; ``qemu:///system`` when running as root, else
        ``qemu:///session``.
    :param accel: the default for VMs whose spec says ``accel='auto'`` (see :func:`select_accel`).
    :param state_dir: where each VM's directory (overlay disk, console log) goes; it and its
        parents must be searchable by the user QEMU runs as (``libvirt-qemu``).
    :param disk_cache: QEMU cache mode for the VMs' disks (see :func:`domain_xml`).
    :param max_threads: size of the thread pool, i.e. how many libvirt calls run at once.
    :param credentials_dir: where each VM's credentials are kept (a
        :class:`~vmcontroller.credentials.CredentialStore`, root only); by default
        ``credentials`` beside ``state_dir``.
    """

    name = "libvirt"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        uri: str | None = None,
        accel: Accel = "auto",
        *,
        state_dir: Path | str = DEFAULT_STATE_DIR,
        disk_cache: str = "unsafe",
        max_threads: int = 8,
        credentials_dir: Path | str | None = None,
    ) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel={accel!r}: use 'auto', 'kvm' or 'tcg'")
        self._reactor = reactor
        self.uri = uri or ("qemu:///system" if os.geteuid() == 0 else "qemu:///session")
        self.accel: Accel = accel
        self.state_dir = Path(state_dir)
        self.credentials = CredentialStore(credentials_dir or self.state_dir.parent / "credentials")
        self.disk_cache = disk_cache
        self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="vmcontroller-libvirt")
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()
        self._locks: dict[str, DeferredLock] = {}
        self._shutdown_trigger: Any = None

    # -- service --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._pool.start()
        # Stop the pool's threads if the reactor stops without stopping this service first,
        # so that the process can exit.
        core: IReactorCore = self._reactor
        self._shutdown_trigger = core.addSystemEventTrigger("during", "shutdown", self.stopService)

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        super().stopService()
        if self._shutdown_trigger is not None:
            # Fails with ValueError/KeyError when that very trigger is calling us.
            with contextlib.suppress(ValueError, KeyError):
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        done: Deferred[None] = Deferred()

        def stop() -> None:
            self._close_connection()
            # ThreadPool.stop() joins the workers, which wait for calls in flight: do that
            # here, off the reactor thread.
            self._pool.stop()
            self._reactor.callFromThread(done.callback, None)

        threading.Thread(target=stop, name="vmcontroller-libvirt-stop", daemon=True).start()
        return done

    # -- plumbing -------------------------------------------------------------------------

    def _connection(self) -> libvirt.virConnect:
        # Called in worker threads; a virConnect may be shared by threads.
        with self._conn_lock:
            if self._conn is not None and self._conn.isAlive() != 1:
                # libvirtd restarted: reconnect instead of failing every later call.
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
            if self._conn is None:
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as e:
                    raise HypervisorError(
                        f"cannot connect to libvirt at {self.uri}: {e.get_error_message() or e}; "
                        "start libvirtd (`libvirtd -d`, and `virtlogd -d`) or run scripts/setup-host.sh"
                    ) from e
            return self._conn

    def _close_connection(self) -> None:
        with self._conn_lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    def _in_pool(
        self,
        fn: Callable[[libvirt.virConnect], T],
        *,
        action: str,
        vm: str | None = None,
        snapshot: str | None = None,
    ) -> Deferred[T]:
        if not self.running:
            return fail(
                HypervisorError(
                    f"cannot {action}: the libvirt driver is not started; call startService() or add "
                    "it to a running MultiService"
                )
            )

        def work() -> T:
            try:
                return fn(self._connection())
            except libvirt.libvirtError as e:
                raise translate_error(e, action=action, vm=vm, snapshot=snapshot) from e

        threads: IReactorThreads = self._reactor
        return deferToThreadPool(threads, self._pool, work)

    async def _domain_call(
        self, vm: str, action: str, fn: Callable[[libvirt.virDomain], T], snapshot: str | None = None
    ) -> T:
        return await self._in_pool(
            lambda conn: fn(conn.lookupByName(vm)), action=action, vm=vm, snapshot=snapshot
        )

    async def _exclusive(self, vm: str, body: Callable[[], Coroutine[Any, Any, T]]) -> T:
        # One state-changing job per domain at a time: libvirt's per-domain job lock makes a
        # second concurrent job wait and then fail after 30 s ("cannot acquire state change
        # lock"), so queue ours here instead, in call order.
        lock = self._locks.get(vm)
        if lock is None:
            lock = self._locks[vm] = DeferredLock()
        await lock.acquire()
        try:
            return await body()
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(vm, None)

    def _run(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        return Deferred.fromCoroutine(coro)

    def _vm_dir(self, name: str) -> Path:
        return self.state_dir / name

    def console_log_path(self, name: str) -> Path:
        """
        The file that receives VM ``name``'s serial console (truncated at each start): read it
        to see how the guest boots.
        """
        return self._vm_dir(name) / "console.log"

    # -- IHypervisorDriver ----------------------------------------------------------------

    def define(self, spec: VMSpec) -> Deferred[str]:
        return self._run(self._exclusive(spec.name, lambda: self._define(spec)))

    async def _define(self, spec: VMSpec) -> str:
        vm_dir = self._vm_dir(spec.name)
        overlay = vm_dir / "disk.qcow2"

        def prepare(conn: libvirt.virConnect) -> Literal["kvm", "tcg"]:
            # The agent's credentials, new for every definition (a VM of the same name
            # defined again is another VM to the host).
            try:
                conn.lookupByName(spec.name)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
            else:
                raise VMAlreadyExists(
                    f"cannot define VM {spec.name!r}: a VM of that name exists already; undefine "
                    "it first or choose another name"
                )
            for label, path in (("disk", spec.disk), ("kernel", spec.kernel), ("initrd", spec.initrd)):
                if path is not None and not os.path.isfile(path):
                    raise HypervisorError(
                        f"cannot define VM {spec.name!r}: its {label} {path} does not exist; build the "
                        "image first (python -m vmcontroller.images build)"
                    )
            accel = select_accel(spec.accel, self.accel, environ=os.environ, kvm_available=kvm_usable())
            # Left over from a VM of the same name whose undefine did not finish: not in use,
            # since libvirt knows no such domain.
            shutil.rmtree(vm_dir, ignore_errors=True)
            for d in (self.state_dir.parent, self.state_dir, vm_dir):
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o755)
            self.credentials.create(spec.name)
            self._provision(conn, spec.name)
            return accel

        accel = await self._in_pool(prepare, action="define VM", vm=spec.name)
        try:
            xml = domain_xml(
                spec,
                accel=accel,
                disk_path=str(overlay),
                console_log=str(vm_dir / "console.log"),
                disk_cache=self.disk_cache,
                serial_dir=str(vm_dir),
                credentials_file=str(vm_dir / FW_CFG_FILE),
            )
            await self._create_overlay(spec, overlay)
            await self._in_pool(lambda conn: conn.defineXML(xml), action="define VM", vm=spec.name)
        except BaseException:

            def clean_up(conn: libvirt.virConnect) -> None:
                shutil.rmtree(vm_dir, ignore_errors=True)
                self.credentials.remove(spec.name)

            await self._in_pool(clean_up, action="clean up")
            raise
        self.log.info(
            "Defined VM {vm} ({accel}, {memory} MiB)", vm=spec.name, accel=accel, memory=spec.memory_mib
        )
        return spec.name

    async def _create_overlay(self, spec: VMSpec, overlay: Path) -> None:
        qemu_img = shutil.which("qemu-img", path=os.environ.get("PATH", "") + ":/usr/bin:/usr/local/bin")
        if qemu_img is None:
            raise HypervisorError("qemu-img is not installed: install the Debian package qemu-utils")
        base = os.path.abspath(spec.disk)
        process: IReactorProcess = self._reactor
        out, err, code = await utils.getProcessOutputAndValue(
            qemu_img,
            ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, str(overlay)],
            env=dict(os.environ),
            reactor=process,
        )
        if code != 0:
            raise HypervisorError(
                f"cannot define VM {spec.name!r}: qemu-img could not create the overlay {overlay} on "
                f"{base}: {(err or out).decode(errors='replace').strip()}; check that the base image "
                "is a qcow2 file and that the directory is writable"
            )
        # Readable for libvirt-qemu; libvirt's dynamic ownership hands it to QEMU at start.
        overlay.chmod(0o644)

    def start(self, name: str) -> Deferred[None]:
        return self._run(self._exclusive(name, lambda: self._simple(name, "start", lambda d: d.create())))

    async def _simple(self, name: str, action: str, fn: Callable[[libvirt.virDomain], object]) -> None:
        await self._domain_call(name, action, fn)
        self.log.info("{action} {vm}: done", action=action, vm=name)

    def shutdown(self, name: str, wait: bool = True, timeout: float = 120.0) -> Deferred[None]:
        async def go() -> None:
            await self._exclusive(
                name,
                lambda: self._simple(
                    name,
                    "shut down",
                    lambda d: d.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN),
                ),
            )
            # Waiting outside the lock: other operations (power_off above all) may go ahead.
            if wait:
                await self._wait_for_state(name, VMState.SHUTOFF, timeout, hint="use power_off()")

        return self._run(go())

    def power_off(self, name: str) -> Deferred[None]:
        return self._run(
            self._exclusive(name, lambda: self._simple(name, "power off", lambda d: d.destroy()))
        )

    def pause(self, name: str) -> Deferred[None]:
        return self._run(self._exclusive(name, lambda: self._simple(name, "pause", lambda d: d.suspend())))

    def resume(self, name: str) -> Deferred[None]:
        return self._run(self._exclusive(name, lambda: self._simple(name, "resume", lambda d: d.resume())))

    def reset(self, name: str) -> Deferred[None]:
        return self._run(self._exclusive(name, lambda: self._simple(name, "reset", lambda d: d.reset(0))))

    def state(self, name: str) -> Deferred[VMState]:
        return self._run(self._state(name))

    async def _state(self, name: str) -> VMState:
        return await self._domain_call(name, "get the state of", lambda d: VMState.from_libvirt(d.state()[0]))

    def wait_for_state(self, name: str, state: VMState, timeout: float = 60.0) -> Deferred[None]:
        return self._run(self._wait_for_state(name, state, timeout))

    async def _wait_for_state(self, name: str, state: VMState, timeout: float, hint: str = "") -> None:
        clock: IReactorTime = self._reactor
        deadline = clock.seconds() + timeout
        while True:
            current = await self._state(name)
            if current is state:
                return
            if clock.seconds() >= deadline:
                raise VMTimeout(
                    f"VM {name!r} did not become {state.value} within {timeout:g} s (it is "
                    f"{current.value}); give it more time{', or ' + hint if hint else ''}, and read "
                    f"{self._vm_dir(name) / 'console.log'} to see what the guest is doing"
                )
            await deferLater(clock, POLL_INTERVAL, lambda: None)

    def snapshot_create(self, name: str, snapshot_name: str, description: str = "") -> Deferred[SnapshotInfo]:
        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "name").text = snapshot_name
        ET.SubElement(root, "description").text = description
        xml = ET.tostring(root, encoding="unicode")

        def create(d: libvirt.virDomain) -> SnapshotInfo:
            if snapshot_name in d.snapshotListNames(0):
                raise HypervisorError(
                    f"cannot take snapshot {snapshot_name!r} of VM {name!r}: it has a snapshot of that "
                    "name already; delete it first or choose another name"
                )
            # No flags: an internal qcow2 snapshot, with the memory when the VM runs (a full
            # system checkpoint that reverts to a running VM) and of the disk alone when it is off.
            snap = d.snapshotCreateXML(xml, 0)
            return parse_snapshot_xml(snap.getXMLDesc(0), current=True)

        async def go() -> SnapshotInfo:
            info = await self._domain_call(name, f"take snapshot {snapshot_name!r} of", create, snapshot_name)
            self.log.info("Took snapshot {snapshot} of {vm}", snapshot=snapshot_name, vm=name)
            return info

        return self._run(self._exclusive(name, go))

    def snapshot_list(self, name: str) -> Deferred[list[SnapshotInfo]]:
        def snapshots(d: libvirt.virDomain) -> list[SnapshotInfo]:
            infos = [
                parse_snapshot_xml(s.getXMLDesc(0), current=s.isCurrent(0) == 1)
                for s in d.listAllSnapshots(0)
            ]
            return sorted(infos, key=lambda i: (i.created, i.name))

        return self._run(self._domain_call(name, "list the snapshots of", snapshots))

    def snapshot_revert(self, name: str, snapshot_name: str) -> Deferred[None]:
        def revert(d: libvirt.virDomain) -> None:
            d.revertToSnapshot(d.snapshotLookupByName(snapshot_name, 0), 0)

        return self._run(
            self._exclusive(
                name,
                lambda: self._domain_call(
                    name, f"revert to snapshot {snapshot_name!r}", revert, snapshot_name
                ),
            )
        )

    def snapshot_delete(self, name: str, snapshot_name: str) -> Deferred[None]:
        def delete(d: libvirt.virDomain) -> None:
            d.snapshotLookupByName(snapshot_name, 0).delete(0)

        return self._run(
            self._exclusive(
                name,
                lambda: self._domain_call(
                    name, f"delete snapshot {snapshot_name!r} of", delete, snapshot_name
                ),
            )
        )

    def undefine(self, name: str) -> Deferred[None]:
        vm_dir = self._vm_dir(name)

        def remove(d: libvirt.virDomain) -> None:
            if d.isActive():
                d.destroy()
            # The snapshots' data lives in the overlay deleted below; drop libvirt's records of them.
            d.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            )
            shutil.rmtree(vm_dir, ignore_errors=True)
            self.credentials.remove(name)

        async def go() -> None:
            await self._domain_call(name, "undefine", remove)
            self.log.info("Undefined VM {vm}", vm=name)

        return self._run(self._exclusive(name, go))

    def _provision(self, conn: libvirt.virConnect, name: str) -> None:
        """Put the agent's end where QEMU reads it at start (in a worker thread)."""
        owner = qemu_owner(conn.getCapabilities())
        agent = self.credentials.agent_credentials(name)
        write_qemu_credentials(self._vm_dir(name) / FW_CFG_FILE, agent.to_json(), owner)

    def agent_credentials(self, name: str) -> Deferred[Credentials]:
        return self._in_pool(
            lambda conn: self.credentials.host_credentials(name), action="read the credentials of", vm=name
        )

    def rotate_credentials(self, name: str) -> Deferred[None]:
        """
        Mint new credentials for VM ``name``; the old ones stop working at once. The guest gets
        the new ones when QEMU next starts (start the VM again after a shutdown; a reboot
        inside the guest keeps the old QEMU process and its old fw_cfg entry).
        """

        def rotate(conn: libvirt.virConnect) -> None:
            conn.lookupByName(name)  # a VM we do not know fails here, with a clear error
            self.credentials.rotate(name)
            self._provision(conn, name)

        async def go() -> None:
            await self._in_pool(rotate, action="rotate the credentials of", vm=name)

        return self._run(self._exclusive(name, go))

    def list_vms(self) -> Deferred[list[str]]:
        def ours(conn: libvirt.virConnect) -> list[str]:
            names = []
            for d in conn.listAllDomains(0):
                try:
                    d.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
                except libvirt.libvirtError as e:
                    # Not one of ours (no metadata), or undefined meanwhile.
                    if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
                        continue
                    raise
                names.append(d.name())
            return sorted(names)

        return self._in_pool(ours, action="list the VMs")

    def agent_socket_path(self, name: str, channel: str | None = None) -> Deferred[str]:
        def path(d: libvirt.virDomain) -> str:
            xml = d.XMLDesc(0)
            wanted = channel or _agent_channel(xml)
            _require_running(d, name, f"its channel {wanted!r} has no socket")
            found = channel_socket_path(xml, wanted)
            if found is None:
                raise HypervisorError(
                    f"VM {name!r} has no unix channel named {wanted!r}; it was defined without it "
                    "(see VMSpec.agent_channel and VMSpec.extra_channels)"
                )
            return found

        return self._run(self._domain_call(name, "find the agent socket of", path))

    def forward_port(
        self, name: str, guest_port: int, guest_address: str = NAT_GUEST_ADDRESS
    ) -> Deferred[int]:
        """
        See :meth:`IHypervisorDriver.forward_port`. Done with QEMU's ``hostfwd_add`` monitor
        command, which libvirt passes through (and for which it marks the domain "tainted:
        custom-monitor" in its log): libvirt's own port forwards need the passt backend.

        :raises ValueError: ``guest_port`` is not a TCP port or ``guest_address`` not IPv4.
        """
        if isinstance(guest_port, bool) or not isinstance(guest_port, int) or not 0 < guest_port < 65536:
            raise ValueError(f"guest_port={guest_port!r}: give a TCP port, 1 to 65535")
        try:  # checked, as it goes into a monitor command line
            address = ipaddress.IPv4Address(guest_address)
        except ValueError:
            raise ValueError(
                f"guest_address={guest_address!r}: give an IPv4 address on the VM's NAT network, such as "
                f"{NAT_GUEST_ADDRESS}"
            ) from None

        def forward(d: libvirt.virDomain) -> int:
            _require_running(d, name, "it has no network to forward a port to")
            netdev = nat_netdev(d.XMLDesc(0))
            if netdev is None:
                raise HypervisorError(
                    f"VM {name!r} has no NAT network card to forward a port to; define it with "
                    "VMSpec(nat_network=True)"
                )
            for _ in range(_FORWARD_ATTEMPTS):
                # Another program may take the free port before QEMU binds it: then try another.
                host_port = _free_loopback_port()
                reply = libvirt_qemu.qemuMonitorCommand(
                    d,
                    f"hostfwd_add {netdev} tcp:127.0.0.1:{host_port}-{address}:{guest_port}",
                    libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
                ).strip()
                if not reply:
                    return host_port
            raise HypervisorError(
                f"QEMU could not forward a host port to {address}:{guest_port} of VM {name!r}: {reply}"
            )

        return self._run(self._domain_call(name, f"forward a port to {address}:{guest_port} of", forward))

    def serial_socket_path(self, name: str, port: str) -> Deferred[str]:
        def path(d: libvirt.virDomain) -> str:
            xml = d.XMLDesc(0)
            found = serial_port_socket_path(xml, port)
            if found is None:
                raise HypervisorError(
                    f"VM {name!r} has no serial port named {port!r}; it was defined without it "
                    "(see VMSpec.serial_ports)"
                )
            _require_running(d, name, f"its serial port {port!r} has no socket")
            return found

        return self._run(self._domain_call(name, "find the serial port socket of", path))

    def guest_port_open(self, name: str, channel: str | None = None) -> Deferred[bool]:
        """
        Whether a program in the guest has the agent's port (or ``channel``) open, as QEMU
        sees it: true once the agent runs, false while the guest boots or the agent restarts.
        """

        def is_open(d: libvirt.virDomain) -> bool:
            xml = d.XMLDesc(0)
            return channel_state(xml, channel or _agent_channel(xml)) == "connected"

        return self._run(self._domain_call(name, "read the channel state of", is_open))


def _agent_channel(xml: str) -> str:
    root = ET.fromstring(xml)
    found = root.findtext(f"metadata/{{{METADATA_NS}}}vm/{{{METADATA_NS}}}agent-channel")
    return found or DEFAULT_AGENT_CHANNEL
