"""
The libvirt driver on a remote URI, against a second libvirt host: a libvirtd of its own in a
network namespace with its own address (scripts/remote-libvirtd.sh), reached over
``qemu+tcp://``. One controller (this process) drives the session's local guest and a guest on
the other "host" at once; the remote guest's images go there as storage volumes and its agent
is reached through ``virDomainOpenChannel``, over libvirt's own connection.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import pytest_twisted
from twisted.internet import reactor, utils
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint

from hypervisors.interface import VMSpec
from hypervisors.libvirt import LibvirtDriver
from hypervisors.libvirt.channel import ChannelEndpoint
from tests.conftest import TEST_VM_PREFIX, BootedVM, pid_alive, teardown_vm
from vmcontroller.client import GuestClient
from vmcontroller.errors import CapabilityUnsupported, ConnectionLost, HypervisorError
from vmcontroller.images import GuestImage
from vmcontroller.machine import connect_vm_agent

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "remote-libvirtd.sh"
#: The second hosts' directories, one per test process (named by its pid): uploads go there.
REMOTE_HOSTS = Path("/var/tmp/vmc-remote-libvirtd")
#: libvirtd's TCP port: the one port of the other host this process may talk to.
LIBVIRT_TCP_PORT = 16509


class RemoteHost(NamedTuple):
    uri: str
    address: str
    directory: Path
    driver: LibvirtDriver


async def run_script(action: str, directory: Path) -> str:
    """``remote-libvirtd.sh ACTION DIRECTORY``; its output."""
    out, err, code = await utils.getProcessOutputAndValue(
        "/bin/bash", [str(SCRIPT), action, str(directory)], env=dict(os.environ)
    )
    assert code == 0, f"remote-libvirtd.sh {action} failed: {err.decode(errors='replace')}"
    return out.decode().strip()


def _script(action: str, directory: Path) -> str:
    return pytest_twisted.blockon(Deferred.fromCoroutine(run_script(action, directory)))


def _sweep() -> None:
    """Stop the second hosts of test processes that died without stopping them (a timeout)."""
    for directory in REMOTE_HOSTS.glob("*"):
        if directory.name.isdigit() and not pid_alive(int(directory.name)):
            _script("stop", directory)


@pytest.fixture(scope="module")
def remote_host() -> Iterator[RemoteHost]:
    """The second libvirt host, and a started driver on its ``qemu+tcp://`` URI."""
    _sweep()
    directory = REMOTE_HOSTS / str(os.getpid())
    try:
        uri = _script("start", directory).splitlines()[-1]
        address = re.fullmatch(r"qemu\+tcp://([\d.]+)/system", uri)
        assert address is not None, uri
        driver = LibvirtDriver(reactor, uri)
        driver.startService()
        try:
            yield RemoteHost(uri, address.group(1), directory, driver)
        finally:
            pytest_twisted.blockon(driver.stopService())
    finally:
        _script("stop", directory)


@pytest.fixture(scope="module")
def remote_vm(remote_host: RemoteHost, guest_image: GuestImage) -> Iterator[BootedVM]:
    """A guest of the session's image on the second host (its images uploaded there)."""
    name = f"{TEST_VM_PREFIX}remote-{os.getpid()}"
    pytest_twisted.blockon(remote_host.driver.define(guest_image.vm_spec(name)))
    try:
        pytest_twisted.blockon(remote_host.driver.start(name))
        yield BootedVM(remote_host.driver, name, guest_image)
    finally:
        teardown_vm(remote_host.driver, name)


@pytest_twisted.async_yield_fixture()
async def two_agents(
    booted_vm: BootedVM, remote_vm: BootedVM
) -> AsyncIterator[tuple[GuestClient, GuestClient]]:
    """Clients of the local and the remote guest's agents, connected at the same time."""
    attempts = [
        # Two guests booting at once: more time than one gets.
        Deferred.fromCoroutine(connect_vm_agent(reactor, vm.driver, vm.name, timeout=600))
        for vm in (booted_vm, remote_vm)
    ]
    try:
        local, remote = await gatherResults(attempts, consumeErrors=True)
    except BaseException:
        # The other one gives up, or closes: left open it would hold its channel, which takes
        # one client at a time, from the next tests.
        for attempt in attempts:
            attempt.addCallback(lambda client: client.close()).addErrback(lambda _: None)
            attempt.cancel()
        raise
    yield local, remote
    await gatherResults([local.close(), remote.close()])


def _on_remote(remote_host: RemoteHost, path: str) -> Path:
    """Where a file the second libvirtd has under /var/lib/libvirt is, seen from here."""
    return remote_host.directory / "lib" / Path(path).relative_to("/var/lib/libvirt")


async def _backing_file(path: Path) -> str:
    out, err, code = await utils.getProcessOutputAndValue(
        "qemu-img", ["info", "-U", "--output=json", str(path)], env=dict(os.environ)
    )
    assert code == 0, err
    backing: str = json.loads(out)["backing-filename"]
    return backing


def _tcp_peers() -> set[tuple[str, int]]:
    """The remote (address, port) of every TCP connection this process holds (IPv4)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.islink(f"/proc/self/fd/{fd}") else ""
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    peers = set()
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes and fields[3] == "01":  # ESTABLISHED
            host, port = fields[2].split(":")
            address = ".".join(str(b) for b in reversed(bytes.fromhex(host)))
            peers.add((address, int(port, 16)))
    return peers


def _netns(path: str) -> tuple[int, int]:
    """The identity of the network namespace at ``path`` (``/proc/PID/ns/net``, ``/run/netns/NS``)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _qemu_netns(remote_host: RemoteHost, vm: str) -> tuple[int, int]:
    """The network namespace of the VM's QEMU process, as the second libvirtd records its pid."""
    pid = int((remote_host.directory / "run" / "qemu" / f"{vm}.pid").read_text())
    return _netns(f"/proc/{pid}/ns/net")


@pytest_twisted.ensureDeferred
async def test_one_controller_drives_a_local_and_a_remote_guest(
    booted_vm: BootedVM,
    remote_vm: BootedVM,
    remote_host: RemoteHost,
    two_agents: tuple[GuestClient, GuestClient],
    tmp_path: Path,
) -> None:
    local, remote = two_agents
    # The remote guest is the second host's: its QEMU runs in that network namespace, and the
    # local libvirtd does not know it.
    state = dict(line.split("=", 1) for line in (remote_host.directory / "state").read_text().split())
    assert _qemu_netns(remote_host, remote_vm.name) == _netns(f"/run/netns/{state['NS']}")
    assert _qemu_netns(remote_host, remote_vm.name) != _netns("/proc/self/ns/net")
    assert remote_vm.name not in await booted_vm.driver.list_vms()
    assert await remote_vm.driver.list_vms() == [remote_vm.name]
    # Its disk is an overlay volume there, over the base image uploaded there; its console log
    # is written there.
    pool = remote_host.directory / "lib" / "images" / "vmcontroller"
    base = await _backing_file(pool / f"{remote_vm.name}.qcow2")
    assert base.startswith("/var/lib/libvirt/images/vmcontroller/") and base.endswith("-root.qcow2")
    assert _on_remote(remote_host, base).stat().st_size == Path(remote_vm.image.root_disk).stat().st_size
    console_log = _on_remote(remote_host, str(remote_vm.driver.console_log_path(remote_vm.name)))
    assert console_log.stat().st_size > 0
    # Local: the channel's unix socket; remote: the channel through libvirt.
    assert isinstance(await booted_vm.driver.agent_endpoint(booted_vm.name), UNIXClientEndpoint)
    assert isinstance(await remote_vm.driver.agent_endpoint(remote_vm.name), ChannelEndpoint)

    payload = os.urandom(16 * 1024 * 1024)
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    # Both guests at once: an exec on each while the payload goes to the remote one.
    local_running = local.run(["/bin/sh", "-c", "echo local $((6 * 7))"], check=True)
    remote_running = remote.run(["/bin/sh", "-c", "echo remote $((6 * 7)); echo err >&2; exit 3"])
    pushing = remote.push(str(source), "/root/payload.bin")
    local_run, remote_run, pushed = await local_running, await remote_running, await pushing
    assert local_run.stdout == b"local 42\n"
    assert (remote_run.stdout, remote_run.stderr, remote_run.exit_code) == (b"remote 42\n", b"err\n", 3)
    assert (pushed.size, pushed.sha256) == (len(payload), digest)
    in_guest = await remote.run(["sha256sum", "/root/payload.bin"], check=True)
    assert in_guest.stdout.split()[0].decode() == digest
    # The local guest has no such file: the push went to the other host.
    assert (await local.run(["test", "-e", "/root/payload.bin"])).exit_code == 1

    pulled = tmp_path / "pulled.bin"
    assert (await remote.pull("/root/payload.bin", str(pulled))).sha256 == digest
    assert hashlib.sha256(pulled.read_bytes()).hexdigest() == digest

    # No socket of ours to the other host but libvirt's own connection.
    ports = {port for address, port in _tcp_peers() if address == remote_host.address}
    assert ports == {LIBVIRT_TCP_PORT}


@pytest_twisted.ensureDeferred
async def test_the_remote_channel_recovers_when_the_remote_libvirtd_restarts(
    remote_vm: BootedVM, remote_host: RemoteHost
) -> None:
    client = await connect_vm_agent(reactor, remote_vm.driver, remote_vm.name, timeout=300)
    try:
        boot_id = ["cat", "/proc/sys/kernel/random/boot_id"]
        booted = (await client.run(boot_id, check=True)).stdout
        in_flight = client.exec(["sleep", "600"])
        await client.run(["/bin/true"], check=True)  # the exec has started
        await run_script("restart", remote_host.directory)
        # The stream went with libvirtd's connection: what was in flight failed, not hung ...
        with pytest.raises(ConnectionLost, match=r"connection to libvirtd at qemu\+tcp://.* was lost"):
            await in_flight.result()
        # ... and the same client goes on through a new stream on the driver's new connection.
        result = await client.run(["/bin/echo", "after"], check=True)
        assert result.stdout == b"after\n"
        # The same boot: libvirtd's restart left QEMU alone.
        assert (await client.run(boot_id, check=True)).stdout == booted
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_what_a_remote_host_cannot_do_is_refused_clearly(
    remote_host: RemoteHost, guest_image: GuestImage
) -> None:
    driver = remote_host.driver
    spec = guest_image.vm_spec(f"{TEST_VM_PREFIX}remote-serial-{os.getpid()}", serial_ports=("agent",))
    with pytest.raises(CapabilityUnsupported, match="serial"):
        await driver.define(spec)
    assert spec.name not in await driver.list_vms()
    with pytest.raises(HypervisorError, match="socket on the host of qemu\\+tcp://"):
        await driver.agent_socket_path("any-vm")
    missing = VMSpec(name=f"{TEST_VM_PREFIX}remote-missing-{os.getpid()}", disk="/nonexistent.qcow2")
    with pytest.raises(HypervisorError, match="does not exist"):
        await driver.define(missing)
    assert missing.name not in await driver.list_vms()


@pytest_twisted.ensureDeferred
async def test_images_are_uploaded_once_and_a_vms_own_volumes_go_with_it(
    remote_vm: BootedVM, remote_host: RemoteHost
) -> None:
    driver = remote_host.driver
    pool = remote_host.directory / "lib" / "images" / "vmcontroller"

    def uploaded() -> dict[str, tuple[int, int]]:
        return {
            p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in pool.iterdir()
            if not p.name.startswith(TEST_VM_PREFIX)
        }

    before = uploaded()
    assert len(before) == 6  # base, kernel, initrd, and their marks
    name = f"{TEST_VM_PREFIX}remote-second-{os.getpid()}"
    await driver.define(remote_vm.image.vm_spec(name))
    try:
        # The base, kernel and initrd the first VM uploaded serve this one: none sent again.
        assert uploaded() == before
        assert (pool / f"{name}.qcow2").exists() and (pool / f"{name}.console.log").exists()
    finally:
        await driver.undefine(name)
    assert not (pool / f"{name}.qcow2").exists() and not (pool / f"{name}.console.log").exists()
    assert (pool / f"{remote_vm.name}.qcow2").exists()  # the other VM's are left alone
