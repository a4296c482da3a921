"""
The libvirt/QEMU hypervisor driver.

libvirt's Python binding blocks, so every call runs in the driver's own thread pool (never the
reactor thread, never the reactor's shared pool) and ``libvirtError`` becomes one of our
exceptions inside the worker thread, where libvirt keeps the per-thread error details. libvirt's
events arrive through its event loop on the reactor (:mod:`hypervisors.libvirt.events`).

On a local URI each VM gets a directory ``/var/lib/vmcontroller/vms/<name>/`` with its qcow2
overlay of the base image (``disk.qcow2``), its serial console log (``console.log``, written by
virtlogd) and the host sockets of its extra serial ports (``serial-<port>.sock``), so the base
image is never modified and several VMs can share it; the agent is reached on its channel's
unix socket.

On a remote URI (one that names a host: ``qemu+tcp://``, ``qemu+ssh://``, ``qemu+tls://``) the
files go through libvirt's storage API instead (:mod:`hypervisors.libvirt.storage`): base disk,
kernel and initrd uploaded once into a pool of ours there, each VM's overlay a volume over the
base. The agent is reached through libvirt's own connection, ``virDomainOpenChannel`` on a
stream carried on the reactor (:mod:`hypervisors.libvirt.channel`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import pwd
import shutil
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlparse

import libvirt
import libvirt_qemu
from twisted.application.service import Service
from twisted.internet import utils
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorCore,
    IReactorProcess,
    IReactorThreads,
    IStreamClientEndpoint,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from guest_agent.protocol.tls import Credentials
from hypervisors.base import EventHub, PerVMQueue, event_for_transition, require_capability
from hypervisors.interface import (
    DEFAULT_AGENT_TCP_PORT,
    NAT_GUEST_ADDRESS,
    Accel,
    AgentTransport,
    Capability,
    IHypervisorDriver,
    ISubscription,
    SnapshotInfo,
    VMEvent,
    VMSpec,
    VMState,
)
from hypervisors.libvirt.channel import ChannelAddress, ChannelEndpoint, StreamTransport, VirStream
from hypervisors.libvirt.events import LifecycleTranslator, event_loop
from hypervisors.libvirt.host import (
    KVM_DEVICE_FIX,
    kvm_device_problem,
    kvm_in_capabilities,
    kvm_usable,
    select_accel,
)
from hypervisors.libvirt.storage import DEFAULT_POOL, DEFAULT_POOL_PATH, StoragePool, qcow2_virtual_size
from hypervisors.libvirt.xml import (
    METADATA_NS,
    agent_channel,
    agent_transport,
    channel_socket_path,
    channel_state,
    domain_xml,
    nat_netdev,
    parse_snapshot_xml,
    serial_port_names,
    serial_port_socket_path,
)
from vmcontroller.credentials import CredentialStore
from vmcontroller.errors import (
    ConnectionLost,
    HypervisorError,
    HypervisorUnavailable,
    SnapshotNotFound,
    VMAlreadyExists,
    VMNotFound,
    VMStateError,
)

__all__ = ["DEFAULT_STATE_DIR", "LibvirtDriver", "capabilities_for", "translate_error", "uri_is_remote"]

T = TypeVar("T")

DEFAULT_STATE_DIR = Path("/var/lib/vmcontroller/vms")


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    # libvirt's default handler prints every error to stderr, also those we expect and turn
    # into exceptions (an unknown domain, a missing snapshot).
    return None


libvirt.registerErrorHandler(_ignore_libvirt_error, None)

#: Free host ports forward_port() tries before it gives up.
_FORWARD_ATTEMPTS = 3
#: Seconds between attempts to reconnect to a libvirtd that went away: doubling up to the last.
_RECONNECT_FIRST, _RECONNECT_MAX = 0.5, 10.0
#: libvirt's errors that mean the connection to libvirtd is gone or unusable.
_CONNECTION_ERRORS = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_SYSTEM_ERROR,
    }
)
#: The user QEMU runs as under ``qemu:///system`` (Debian's libvirt-daemon-system).
_QEMU_USER = "libvirt-qemu"

_ALL_CAPABILITIES = frozenset(Capability)
#: libvirt's ``test:///`` driver simulates domains: no emulator, so no sockets, ports or CPU
#: time; its domain events, managed save and snapshots behave like QEMU's.
_TEST_CAPABILITIES = frozenset(
    {
        Capability.SNAPSHOTS,
        Capability.LIVE_SNAPSHOTS,
        Capability.SAVE_STATE,
        Capability.PUSHED_EVENTS,
        Capability.PAUSE,
    }
)


#: On another host, serial ports and forwarded ports are sockets there, out of our reach.
_REMOTE_CAPABILITIES = _ALL_CAPABILITIES - {Capability.SERIAL_PORTS, Capability.PORT_FORWARD}


def uri_is_remote(uri: str) -> bool:
    """
    Whether ``uri`` names a host (``qemu+tcp://host/system``, ``qemu+ssh://user@host/system``):
    then the VMs' files and sockets are there, not here, even when the host is this one.
    """
    return bool(urlparse(uri).netloc)


def capabilities_for(uri: str) -> frozenset[Capability]:
    """What the driver can do on the hypervisor behind ``uri``."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme == "test":
        return _TEST_CAPABILITIES
    return _REMOTE_CAPABILITIES if uri_is_remote(uri) else _ALL_CAPABILITIES


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
    if code in _CONNECTION_ERRORS:
        return HypervisorUnavailable(
            f"cannot {what}: the connection to libvirt failed: {message} (error code {code}); the "
            "driver reconnects by itself: try again, and check that libvirtd runs "
            "(`virsh -c qemu:///system version`)"
        )
    return HypervisorError(
        f"cannot {what}: libvirt says: {message} (error code {code}); check that libvirtd runs "
        "(`virsh -c qemu:///system version`) and read its log and the VM's console.log"
    )


#: The states of a domain whose emulator runs (paused included).
_LIVE_STATES = (VMState.RUNNING, VMState.BLOCKED, VMState.PAUSED, VMState.SHUTDOWN, VMState.PMSUSPENDED)


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


def _with_optional_flag(call: Callable[[int], object], flags: int, optional: int) -> None:
    """
    ``call(flags | optional)``, or ``call(flags)`` where the hypervisor refuses the optional
    flag ("unsupported flags": libvirt's test driver has no checkpoints, no ACPI button).
    """
    try:
        call(flags | optional)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
            raise
        call(flags)


def _domain_state(d: libvirt.virDomain) -> VMState:
    state, reason = d.state()
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        if d.hasManagedSaveImage(0):
            return VMState.SAVED
        # A killed or crashed emulator: libvirt says shut off, for the reason "crashed" (or
        # "failed", when the emulator did not start).
        if reason in (libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, libvirt.VIR_DOMAIN_SHUTOFF_FAILED):
            return VMState.CRASHED
    return VMState.from_libvirt(state)


def _is_ours(d: libvirt.virDomain) -> bool:
    """Whether the domain carries our metadata (defined by a vmcontroller driver)."""
    try:
        d.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return False
        raise
    return True


def _kvm_device_problem() -> bool:
    try:
        device: os.stat_result | None = os.stat("/dev/kvm")
    except OSError:
        device = None
    try:
        user = pwd.getpwnam(_QEMU_USER)
    except KeyError:
        return False
    gids = {user.pw_gid, *os.getgrouplist(_QEMU_USER, user.pw_gid)}
    return kvm_device_problem(device, user.pw_uid, gids)


@implementer(IHypervisorDriver)
class LibvirtDriver(Service):
    """
    Controls QEMU VMs through libvirt.

    A :class:`~twisted.application.service.Service`: ``startService()`` starts its thread pool
    and hooks libvirt's event loop to the reactor, ``stopService()`` closes the libvirt
    connection and stops the pool. Cancelling one of its Deferreds does not stop a libvirt call
    already running in the pool. When libvirtd goes away the driver reconnects by itself (with
    backoff), registers for events again, and reports the state changes it missed.

    :param reactor: the reactor; its clock drives ``wait_for_state``, it runs ``qemu-img`` and
        libvirt's event loop.
    :param uri: the libvirt URI; ``qemu:///system`` when running as root, else
        ``qemu:///session``; ``test:///default`` is libvirt's simulated hypervisor. A URI that
        names a host (``qemu+tcp://host/system``, ``qemu+ssh://root@host/system``,
        ``qemu+tls://host/system``) drives the VMs there: images are uploaded into
        ``storage_pool`` and the agent is reached through libvirt's connection (see
        :meth:`agent_endpoint`); serial ports and port forwards are not available then.
    :param accel: the default for VMs whose spec says ``accel='auto'`` (see :func:`select_accel`).
    :param state_dir: where each VM's directory (overlay disk, console log) goes; it and its
        parents must be searchable by the user QEMU runs as (``libvirt-qemu``).
    :param disk_cache: QEMU cache mode for the VMs' disks (see :func:`domain_xml`).
    :param max_threads: size of the thread pool, i.e. how many libvirt calls run at once.
    :param credentials_dir: where each VM's credentials are kept (a
        :class:`~vmcontroller.credentials.CredentialStore`, root only); by default
        ``credentials`` beside ``state_dir``.
    :param storage_pool: on a remote URI, the directory pool (on that host) the images and
        overlays go to; defined at ``storage_pool_path`` when it does not exist.
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
        storage_pool: str = DEFAULT_POOL,
        storage_pool_path: str = DEFAULT_POOL_PATH,
    ) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel={accel!r}: use 'auto', 'kvm' or 'tcg'")
        self._reactor = reactor
        self.uri = uri or ("qemu:///system" if os.geteuid() == 0 else "qemu:///session")
        self.capabilities = capabilities_for(self.uri)
        #: The URI names a host: files and sockets are there (see the module's description).
        self.remote = uri_is_remote(self.uri)
        self._storage = StoragePool(storage_pool, storage_pool_path)
        self.accel: Accel = accel
        self.state_dir = Path(state_dir)
        self.credentials = CredentialStore(credentials_dir or self.state_dir.parent / "credentials")
        self.disk_cache = disk_cache
        self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="vmcontroller-libvirt")
        self._conn: libvirt.virConnect | None = None
        self._conn_events: list[int] = []
        #: Whether a connection was open before: the next one must catch up on missed events.
        self._connected_before = False
        self._conn_lock = threading.Lock()
        self._queue = PerVMQueue()
        self._shutdown_trigger: Any = None
        # Events: touched on the reactor thread only.
        self._hub = EventHub()
        self._translator = LifecycleTranslator()
        #: Domain UUID -> whether it is one of ours; unknown ones are looked up once.
        self._ours: dict[str, bool] = {}
        #: Events of domains being looked up, in order, with the VM's name.
        self._unsorted: dict[str, list[tuple[str, Callable[[str], VMEvent | None]]]] = {}
        #: Names this driver is defining right now: their events are ours before define returns.
        self._defining: set[str] = set()
        #: The last state each of our VMs was reported in, to report what a reconnect missed.
        self._last_state: dict[str, VMState] = {}
        self._reconnect_call: IDelayedCall | None = None
        #: VM -> (libvirt's domain id, forwarded host port) of its agent's TCP forward.
        self._agent_forwards: dict[str, tuple[int, int]] = {}
        #: Open channel streams (remote URIs), closed when the libvirt connection goes.
        self._channels: set[StreamTransport] = set()

    # -- service --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Before this driver's first connection: libvirt events need the loop registered.
        event_loop().attach(self._reactor)
        self._pool.start()
        # Stop the pool's threads if the reactor stops without stopping this service first,
        # so that the process can exit.
        core: IReactorCore = self._reactor
        self._shutdown_trigger = core.addSystemEventTrigger("during", "shutdown", self.stopService)
        # Connected from the start, so that subscribers get events before any other call.
        self._connect_soon(0)
        self._check_host()

    def _check_host(self) -> None:
        if self.uri.startswith("qemu:///system") and _kvm_device_problem():
            self.log.warn(
                "/dev/kvm exists but {user} (the user QEMU runs as) cannot open it, while libvirtd "
                "can: libvirtd then probes QEMU's capabilities again at every lookup and each define "
                "takes about a minute. Fix: {fix}",
                user=_QEMU_USER,
                fix=KVM_DEVICE_FIX,
            )

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        super().stopService()
        if self._shutdown_trigger is not None:
            # Fails with ValueError/KeyError when that very trigger is calling us.
            with contextlib.suppress(ValueError, KeyError):
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._close_channels("the libvirt driver was stopped")
        self._hub.close()
        done: Deferred[None] = Deferred()

        def stop() -> None:
            self._close_connection()
            # ThreadPool.stop() joins the workers, which wait for calls in flight: do that
            # here, off the reactor thread.
            self._pool.stop()
            self._reactor.callFromThread(done.callback, None)

        threading.Thread(target=stop, name="vmcontroller-libvirt-stop", daemon=True).start()
        done.addCallback(lambda _: event_loop().detach(self._reactor))
        return done

    # -- the connection -------------------------------------------------------------------

    def _connection(self) -> libvirt.virConnect:
        # Called in worker threads; a virConnect may be shared by threads.
        with self._conn_lock:
            if self._conn is not None and self._conn.isAlive() != 1:
                # libvirtd restarted: reconnect instead of failing every later call.
                self._drop_connection()
                self._reactor.callFromThread(
                    self._close_channels, f"the connection to libvirtd at {self.uri} was lost"
                )
            if self._conn is None:
                try:
                    conn = libvirt.open(self.uri)
                except libvirt.libvirtError as e:
                    raise HypervisorUnavailable(
                        f"cannot connect to libvirt at {self.uri}: {e.get_error_message() or e}; "
                        "start libvirtd (`libvirtd -d`, and `virtlogd -d`) or run scripts/setup-host.sh"
                    ) from e
                # Delivered on the reactor thread by the event loop.
                conn.registerCloseCallback(self._on_connection_closed, None)
                self._conn_events = [
                    conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                    ),
                    conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot, None
                    ),
                ]
                self._conn = conn
                if self._connected_before:
                    self._reactor.callFromThread(self._catch_up)
                self._connected_before = True
            return self._conn

    def _drop_connection(self) -> None:
        # With _conn_lock held, in a worker thread.
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            for callback_id in self._conn_events:
                conn.domainEventDeregisterAny(callback_id)
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        self._conn_events = []

    def _close_connection(self) -> None:
        with self._conn_lock:
            self._drop_connection()

    def _on_connection_closed(self, conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        # On the reactor thread. Our own close says CLIENT; anything else lost libvirtd.
        if not self.running or reason == libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT:
            return
        self.log.warn(
            "Lost the connection to libvirt at {uri} (close reason {reason}); reconnecting",
            uri=self.uri,
            reason=reason,
        )
        # Their streams went with it, and libvirt does not tell them.
        self._close_channels(f"the connection to libvirtd at {self.uri} was lost (close reason {reason})")
        self._connect_soon(_RECONNECT_FIRST)

    def _close_channels(self, why: str) -> None:
        for transport in list(self._channels):
            transport.lose(ConnectionLost(f"the agent's channel closed: {why}"))

    def _connect_soon(self, delay: float) -> None:
        """Connect to libvirt in ``delay`` seconds, and again with backoff until it works."""

        def attempt() -> None:
            self._reconnect_call = None
            if not self.running:
                return
            d = self._in_pool(lambda conn: None, action="connect to libvirt")

            def failed(failure: Any) -> None:
                retry = min(max(delay * 2, _RECONNECT_FIRST), _RECONNECT_MAX)
                self.log.warn(
                    "Connecting to libvirt at {uri} failed ({error}); next try in {retry:g} s",
                    uri=self.uri,
                    error=failure.value,
                    retry=retry,
                )
                self._connect_soon(retry)

            d.addErrback(failed)

        if self._reconnect_call is None or not self._reconnect_call.active():
            self._reconnect_call = self._reactor.callLater(delay, attempt)

    def _catch_up(self) -> None:
        """After a reconnect: report the state changes libvirt's events could not tell us."""

        def states(conn: libvirt.virConnect) -> dict[str, VMState]:
            return {d.name(): _domain_state(d) for d in conn.listAllDomains(0) if _is_ours(d)}

        def report(now: dict[str, VMState]) -> None:
            self.log.info("Reconnected to libvirt at {uri}", uri=self.uri)
            # Only the VMs whose state was reported: for the others there is nothing to compare.
            for vm in sorted(self._last_state):
                kind = event_for_transition(self._last_state.get(vm), now.get(vm))
                if kind is not None:
                    self._publish(VMEvent(vm, kind, now.get(vm, VMState.NOSTATE), "seen after reconnecting"))

        self._in_pool(states, action="read the VMs' states after reconnecting").addCallbacks(
            report, lambda f: self.log.failure("Reading the VMs' states after reconnecting failed", f)
        )

    # -- events ---------------------------------------------------------------------------

    def _on_lifecycle(
        self, _conn: libvirt.virConnect, domain: libvirt.virDomain, event: int, detail: int, _opaque: object
    ) -> None:
        self._sort(domain, lambda vm: self._translator.lifecycle(vm, event, detail))

    def _on_reboot(self, _conn: libvirt.virConnect, domain: libvirt.virDomain, _opaque: object) -> None:
        self._sort(domain, self._translator.reboot)

    def _sort(self, domain: libvirt.virDomain, translate: Callable[[str], VMEvent | None]) -> None:
        # On the reactor thread: the UUID and name are in the domain object, no call to libvirtd.
        uuid, vm = domain.UUIDString(), domain.name()
        if vm in self._defining:
            self._ours[uuid] = True
        ours = self._ours.get(uuid)
        if ours is not None:
            if ours:
                self._deliver(vm, translate)
            return
        waiting = self._unsorted.get(uuid)
        if waiting is None:
            waiting = self._unsorted[uuid] = []
            self._look_up(uuid)
        waiting.append((vm, translate))

    def _look_up(self, uuid: str) -> None:
        # Whether an unknown domain is ours: its metadata says, in the pool.
        def check(conn: libvirt.virConnect) -> bool | None:
            try:
                return _is_ours(conn.lookupByUUIDString(uuid))
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None  # gone already: nobody can tell any more
                raise

        def sorted_(ours: bool | None) -> None:
            events = self._unsorted.pop(uuid, [])
            if ours is not None:
                self._ours[uuid] = ours
            if ours:
                for vm, translate in events:
                    self._deliver(vm, translate)

        def failed(failure: Any) -> None:
            self._unsorted.pop(uuid, None)
            self.log.failure("Could not tell whether domain {uuid} is a vmcontroller VM", failure, uuid=uuid)

        self._in_pool(check, action="read a domain's metadata").addCallbacks(sorted_, failed)

    def _deliver(self, vm: str, translate: Callable[[str], VMEvent | None]) -> None:
        event = translate(vm)
        if event is not None:
            self._publish(event)

    def _publish(self, event: VMEvent) -> None:
        if event.state is VMState.NOSTATE:
            self._last_state.pop(event.vm, None)
        else:
            self._last_state[event.vm] = event.state
        self._hub.publish(event)

    # -- plumbing -------------------------------------------------------------------------

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
        return await self._queue.run(vm, body)

    def _run(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        return Deferred.fromCoroutine(coro)

    def _vm_dir(self, name: str) -> Path:
        return self.state_dir / name

    def console_log_path(self, name: str) -> Path:
        """
        The file that receives VM ``name``'s serial console (truncated at each start): read it
        to see how the guest boots. On a remote URI it is on that host, in the storage pool.
        """
        if self.remote:
            return Path(self._storage.volume_path(_console_volume(name)))
        return self._vm_dir(name) / "console.log"

    # -- IHypervisorDriver ----------------------------------------------------------------

    def define(self, spec: VMSpec) -> Deferred[str]:
        try:
            if spec.cpu_cap_percent < 100:
                require_capability(self, Capability.CPU_CAP, f"{self.uri} runs no emulator to cap")
            if spec.serial_ports:
                require_capability(self, Capability.SERIAL_PORTS, f"{self.uri} has no serial port sockets")
            if spec.nat_network:
                require_capability(self, Capability.PORT_FORWARD, f"{self.uri} has no NAT network")
        except HypervisorError:
            return fail()
        return self._run(self._exclusive(spec.name, lambda: self._define(spec)))

    async def _define(self, spec: VMSpec) -> str:
        def prepare(conn: libvirt.virConnect) -> Literal["kvm", "tcg"]:
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
            kvm = kvm_in_capabilities(conn.getCapabilities()) if self.remote else kvm_usable()
            return select_accel(spec.accel, self.accel, environ=os.environ, kvm_available=kvm)

        accel = await self._in_pool(prepare, action="define VM", vm=spec.name)
        self._defining.add(spec.name)
        try:
            if self.remote:
                xml = await self._in_pool(
                    lambda conn: self._place_remote(conn, spec, accel),
                    action="upload the images and make the overlay of",
                    vm=spec.name,
                )
            else:
                xml = await self._place_local(spec, accel)
            # The agent's credentials, new for every definition (a VM of the same name
            # defined again is another VM to the host).
            await self._in_pool(
                lambda conn: self._provision(conn, spec.name, new=True), action="define VM", vm=spec.name
            )
            uuid = await self._in_pool(
                lambda conn: conn.defineXML(xml).UUIDString(), action="define VM", vm=spec.name
            )
            self._ours[uuid] = True
        except BaseException:
            await self._in_pool(lambda conn: self._remove_files(conn, spec.name), action="clean up")
            raise
        finally:
            self._defining.discard(spec.name)
        self.log.info(
            "Defined VM {vm} ({accel}, {memory} MiB)", vm=spec.name, accel=accel, memory=spec.memory_mib
        )
        return spec.name

    async def _place_local(self, spec: VMSpec, accel: Literal["kvm", "tcg"]) -> str:
        """The VM's directory and overlay on this host; its domain XML."""
        vm_dir = self._vm_dir(spec.name)
        overlay = vm_dir / "disk.qcow2"

        def make_dirs(_conn: libvirt.virConnect) -> None:
            # Left over from a VM of the same name whose undefine did not finish: not in use,
            # since libvirt knows no such domain.
            shutil.rmtree(vm_dir, ignore_errors=True)
            for d in (self.state_dir.parent, self.state_dir, vm_dir):
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o755)

        await self._in_pool(make_dirs, action="define VM", vm=spec.name)
        xml = domain_xml(
            spec,
            accel=accel,
            disk_path=str(overlay),
            console_log=str(vm_dir / "console.log"),
            disk_cache=self.disk_cache,
            serial_dir=str(vm_dir),
            credentials_file=self._credentials_path(spec.name),
        )
        await self._create_overlay(spec, overlay)
        return xml

    def _place_remote(self, conn: libvirt.virConnect, spec: VMSpec, accel: Literal["kvm", "tcg"]) -> str:
        """
        In the thread pool: the VM's files as volumes on the libvirt host (the base disk,
        kernel and initrd uploaded unless they are there already, a new overlay); its domain XML.
        """
        capacity = qcow2_virtual_size(Path(spec.disk))  # before anything is uploaded
        base = self._storage.upload(conn, Path(spec.disk), "qcow2")
        kernel = self._storage.upload(conn, Path(spec.kernel)).path() if spec.kernel else None
        initrd = self._storage.upload(conn, Path(spec.initrd)).path() if spec.initrd else None
        overlay = self._storage.overlay(conn, _overlay_volume(spec.name), base, capacity)
        console_log = self._storage.empty(conn, _console_volume(spec.name))
        there = dataclasses.replace(spec, disk=base.path(), kernel=kernel, initrd=initrd)
        return domain_xml(
            there,
            accel=accel,
            disk_path=overlay.path(),
            console_log=console_log.path(),
            disk_cache=self.disk_cache,
            serial_dir=self._storage.path,
            credentials_file=self._credentials_path(spec.name),
        )

    def _remove_files(self, conn: libvirt.virConnect, name: str) -> None:
        """In the thread pool: what the VM had of its own (not the shared base images)."""
        if self.remote:
            volumes = [_overlay_volume(name), _console_volume(name), _credentials_volume(name)]
            self._storage.delete_volumes(conn, volumes)
        else:
            shutil.rmtree(self._vm_dir(name), ignore_errors=True)
        self.credentials.remove(name)

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
        # Root's alone: a snapshot with memory or a saved state inside it holds the guest's RAM,
        # the agent's key included; libvirt's dynamic ownership hands it to QEMU at start.
        overlay.chmod(0o600)

    def start(self, name: str) -> Deferred[None]:
        def start(d: libvirt.virDomain) -> None:
            # Checked here: libvirt's test driver reports a running domain as an internal error.
            if d.isActive():
                raise VMStateError(f"cannot start VM {name!r}: it runs already; see state()")
            # create() resumes the managed save image when the domain has one.
            d.create()

        return self._run(self._exclusive(name, lambda: self._simple(name, "start", start)))

    async def _simple(
        self,
        name: str,
        action: str,
        fn: Callable[[libvirt.virDomain], object],
        allowed: tuple[VMState, ...] | None = None,
    ) -> None:
        def checked(d: libvirt.virDomain) -> object:
            # Checked here, not left to libvirt: its test driver reports a wrong state as an
            # internal error, where QEMU's says "operation invalid".
            if allowed is not None:
                now = _domain_state(d)
                if now not in allowed:
                    raise VMStateError(
                        f"cannot {action} VM {name!r}: it is {now.value}, not "
                        f"{' or '.join(s.value for s in allowed)}; check state() first"
                    )
            return fn(d)

        await self._domain_call(name, action, checked)
        self.log.info("{action} {vm}: done", action=action, vm=name)

    def shutdown(self, name: str, wait: bool = True, timeout: float = 120.0) -> Deferred[None]:
        async def go() -> None:
            self._translator.host_shutdown(name)
            await self._exclusive(
                name,
                lambda: self._simple(
                    name,
                    "shut down",
                    lambda d: _with_optional_flag(
                        d.shutdownFlags, 0, libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
                    ),
                    _LIVE_STATES,
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
        async def go() -> None:
            require_capability(self, Capability.PAUSE, f"{self.uri} cannot pause a VM")
            # Pausing a paused VM is done already, as libvirt takes it.
            await self._simple(
                name, "pause", lambda d: d.suspend(), (VMState.RUNNING, VMState.BLOCKED, VMState.PAUSED)
            )

        return self._run(self._exclusive(name, go))

    def resume(self, name: str) -> Deferred[None]:
        async def go() -> None:
            require_capability(self, Capability.PAUSE, f"{self.uri} cannot resume a VM")
            await self._simple(name, "resume", lambda d: d.resume(), (VMState.PAUSED,))

        return self._run(self._exclusive(name, go))

    def reset(self, name: str) -> Deferred[None]:
        async def go() -> None:
            self._translator.host_reset(name)
            try:
                await self._simple(name, "reset", lambda d: d.reset(0))
            except BaseException:
                self._translator.host_reset(name, asked=False)
                raise

        return self._run(self._exclusive(name, go))

    def save_state(self, name: str) -> Deferred[None]:
        try:
            require_capability(self, Capability.SAVE_STATE, f"{self.uri} cannot save a VM's state")
        except HypervisorError:
            return fail()
        # A managed save: libvirt keeps the image with the domain and start() restores it.
        return self._run(
            self._exclusive(name, lambda: self._simple(name, "save the state of", lambda d: d.managedSave(0)))
        )

    def state(self, name: str) -> Deferred[VMState]:
        return self._run(self._state(name))

    async def _state(self, name: str) -> VMState:
        return await self._domain_call(name, "get the state of", _domain_state)

    def subscribe(self, callback: Callable[[VMEvent], object], name: str | None = None) -> ISubscription:
        return self._hub.subscribe(callback, name)

    def wait_for_state(self, name: str, state: VMState, timeout: float = 60.0) -> Deferred[None]:
        return self._run(self._wait_for_state(name, state, timeout))

    async def _wait_for_state(self, name: str, state: VMState, timeout: float, hint: str = "") -> None:
        console = f"read {self.console_log_path(name)} to see what the guest is doing"
        await self._hub.wait_for_state(
            self._reactor,
            name,
            state,
            timeout,
            lambda: self._state(name),
            hint=f"give it more time, {hint + ', ' if hint else ''}or {console}",
        )

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
            # Taken within one second, a parent still comes before its children.
            parents = {i.name: i.parent for i in infos}

            def depth(info: SnapshotInfo) -> int:
                steps, parent = 0, info.parent
                while parent is not None and steps <= len(parents):
                    steps, parent = steps + 1, parents.get(parent)
                return steps

            return sorted(infos, key=lambda i: (i.created, depth(i), i.name))

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
        def remove(conn: libvirt.virConnect) -> None:
            d = conn.lookupByName(name)
            if d.isActive():
                d.destroy()
            # The snapshots' data lives in the overlay deleted below; drop libvirt's records of them.
            _with_optional_flag(
                d.undefineFlags,
                libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
                libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
            )
            self._remove_files(conn, name)

        async def go() -> None:
            await self._in_pool(remove, action="undefine", vm=name)
            self._agent_forwards.pop(name, None)
            self.log.info("Undefined VM {vm}", vm=name)

        return self._run(self._exclusive(name, go))

    def _provision(self, conn: libvirt.virConnect, name: str, new: bool = False) -> None:
        """
        Put the agent's end where QEMU reads it at start (in a worker thread): a file beside
        the VM's disk, or on a remote URI a volume of the storage pool there, 0600 and owned
        by the user QEMU runs as on that host. ``new``: mint the VM's credentials first.
        """
        if new:
            self.credentials.create(name)
        owner = qemu_owner(conn.getCapabilities())
        agent = self.credentials.agent_credentials(name).to_json()
        if self.remote:
            self._storage.write(conn, _credentials_volume(name), agent, "0600", owner)
        else:
            write_qemu_credentials(self._vm_dir(name) / FW_CFG_FILE, agent, owner)

    def _credentials_path(self, name: str) -> str:
        """Where QEMU reads the agent's credentials of VM ``name`` (see :meth:`_provision`)."""
        if self.remote:
            return self._storage.volume_path(_credentials_volume(name))
        return str(self._vm_dir(name) / FW_CFG_FILE)

    def agent_credentials(self, name: str) -> Deferred[Credentials]:
        return self._in_pool(
            lambda conn: self._host_credentials(conn, name), action="read the credentials of", vm=name
        )

    def _host_credentials(self, conn: libvirt.virConnect, name: str) -> Credentials:
        conn.lookupByName(name)  # a VM we do not know fails here, as VMNotFound
        return self.credentials.host_credentials(name)

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
                    if not _is_ours(d):
                        continue
                except libvirt.libvirtError as e:
                    if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # undefined meanwhile
                    raise
                names.append(d.name())
            return sorted(names)

        return self._in_pool(ours, action="list the VMs")

    def agent_endpoint(
        self, name: str, transport: AgentTransport = "auto"
    ) -> Deferred[IStreamClientEndpoint]:
        """
        See :meth:`IHypervisorDriver.agent_endpoint`. ``"auto"``: the spec's
        ``agent_transport`` (kept in the domain's metadata), else the virtio-serial channel
        every VM of this driver has. ``"tcp"`` forwards :data:`DEFAULT_AGENT_TCP_PORT` once per
        emulator process and reuses that forward.

        On a local URI the endpoint connects to the channel's unix socket. On a remote URI it
        opens the channel with ``virDomainOpenChannel`` on each connect, and its bytes travel
        over the driver's libvirt connection (see :mod:`hypervisors.libvirt.channel`); the
        channel takes one client at a time, as its socket does.
        """

        def chosen(d: libvirt.virDomain) -> tuple[AgentTransport, str, int]:
            xml = d.XMLDesc(0)
            wanted = transport if transport != "auto" else agent_transport(xml)
            if wanted == "auto":
                wanted = "virtio-serial"
            _require_running(d, name, f"it has no {wanted} agent channel")
            if wanted == "virtio-serial" and self.remote:
                path: str | None = agent_channel(xml)  # the channel's name: its socket is there
            elif wanted == "virtio-serial":
                path = channel_socket_path(xml, agent_channel(xml))
            elif wanted == "serial":
                ports = serial_port_names(xml)
                path = serial_port_socket_path(xml, ports[0]) if ports else None
                if path is None:
                    raise HypervisorError(
                        f"VM {name!r} has no serial port for the agent; define it with "
                        "VMSpec(serial_ports=(...))"
                    )
            else:
                path = ""
            return wanted, path or "", d.ID()

        async def go() -> IStreamClientEndpoint:
            if transport != "auto":
                require_capability(self, _TRANSPORT_CAPABILITY[transport], f"{self.uri} has no such channel")
            wanted, path, domain_id = await self._domain_call(name, "find the agent channel of", chosen)
            require_capability(self, _TRANSPORT_CAPABILITY[wanted], f"{self.uri} has no such channel")
            if wanted == "tcp":
                known = self._agent_forwards.get(name)
                if known is None or known[0] != domain_id:
                    port = await self.forward_port(name, DEFAULT_AGENT_TCP_PORT)
                    known = self._agent_forwards[name] = (domain_id, port)
                return TCP4ClientEndpoint(self._reactor, "127.0.0.1", known[1])
            if self.remote:
                return self._channel_endpoint(name, path)
            if not path:
                raise HypervisorError(
                    f"VM {name!r} has no socket for its agent channel; it was defined without it "
                    "(see VMSpec.agent_channel)"
                )
            return UNIXClientEndpoint(self._reactor, path)

        return self._run(go())

    def _channel_endpoint(self, name: str, channel: str) -> ChannelEndpoint:
        """An endpoint that opens VM ``name``'s virtio-serial ``channel`` through libvirt."""

        def open_stream(conn: libvirt.virConnect) -> VirStream:
            d = conn.lookupByName(name)
            _require_running(d, name, f"its channel {channel!r} cannot be opened")
            stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
            try:
                d.openChannel(channel, stream, 0)
            except libvirt.libvirtError:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                raise
            return stream

        def close_stream(stream: VirStream, abort: bool) -> None:
            def close(_conn: libvirt.virConnect) -> None:
                libvirt_stream = cast(libvirt.virStream, stream)
                (libvirt_stream.abort if abort else libvirt_stream.finish)()

            self._in_pool(close, action=f"close the channel {channel!r} of", vm=name).addErrback(
                # The stream failed or the VM went away: libvirtd has dropped it already.
                lambda f: self.log.debug("Closing a channel stream: {error}", error=f.value)
            )

        return ChannelEndpoint(
            self._reactor,
            lambda: self._in_pool(open_stream, action=f"open the channel {channel!r} of", vm=name),
            close_stream,
            ChannelAddress(self.uri, name, channel),
            self._channels,
        )

    def _sockets_here(self, name: str, what: str) -> Deferred[str] | None:
        """A failure when the VM's sockets are on another host (a remote URI)."""
        if not self.remote:
            return None
        return fail(
            HypervisorError(
                f"the {what} of VM {name!r} is a socket on the host of {self.uri}, not here; reach "
                "the agent with agent_endpoint(), which opens its channel through libvirt"
            )
        )

    def agent_socket_path(self, name: str, channel: str | None = None) -> Deferred[str]:
        """
        The host socket of VM ``name``'s virtio-serial port ``channel`` (by default the agent's):
        for extra channels (``VMSpec.extra_channels``); the agent is reached with
        :meth:`agent_endpoint`.
        """

        def path(d: libvirt.virDomain) -> str:
            xml = d.XMLDesc(0)
            wanted = channel or agent_channel(xml)
            _require_running(d, name, f"its channel {wanted!r} has no socket")
            found = channel_socket_path(xml, wanted)
            if found is None:
                raise HypervisorError(
                    f"VM {name!r} has no unix channel named {wanted!r}; it was defined without it "
                    "(see VMSpec.agent_channel and VMSpec.extra_channels)"
                )
            return found

        elsewhere = self._sockets_here(name, f"channel {channel!r}" if channel else "agent's channel")
        if elsewhere is not None:
            return elsewhere
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
        try:
            require_capability(self, Capability.PORT_FORWARD, f"{self.uri} has no NAT network")
        except HypervisorError:
            return fail()

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
        """The host socket of VM ``name``'s serial port ``port`` (``VMSpec.serial_ports``)."""

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
            return channel_state(xml, channel or agent_channel(xml)) == "connected"

        return self._run(self._domain_call(name, "read the channel state of", is_open))


def _overlay_volume(vm: str) -> str:
    return f"{vm}.qcow2"


def _console_volume(vm: str) -> str:
    return f"{vm}.console.log"


def _credentials_volume(vm: str) -> str:
    return f"{vm}.{FW_CFG_FILE}"


_TRANSPORT_CAPABILITY: dict[str, Capability] = {
    "virtio-serial": Capability.VIRTIO_SERIAL,
    "serial": Capability.SERIAL_PORTS,
    "tcp": Capability.PORT_FORWARD,
}
