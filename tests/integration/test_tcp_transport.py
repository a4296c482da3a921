"""
The agent's TCP transport in a real QEMU guest: a VM of its own with a NAT network card
(``VMSpec.nat_network``: QEMU's user-mode network, the way VirtualBox's NAT reaches a guest),
the card configured through the normal virtio agent, a second agent listening on TCP in the
guest, and a host port forwarded to it (``driver.forward_port``); then every kind of operation
over that TCP connection, and what only a NAT forward does: it accepts a connection and drops
it while nothing listens behind it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint

from guest_agent.protocol.tls import Credentials
from hypervisors.interface import DEFAULT_AGENT_TCP_PORT, NAT_GATEWAY, NAT_GUEST_ADDRESS
from hypervisors.libvirt import LibvirtDriver
from tests.attacks import (
    anonymous_authenticator,
    another_vms_credentials,
    connect_with,
    record_a_real_handshake,
    replay,
    serves_its_host,
    tamper_next_write,
)
from tests.integration.conftest import (
    TEST_VM_PREFIX,
    BootedVM,
    print_journal,
    sha256,
    start_second_agent,
    teardown_vm,
)
from vmcontroller.client import GuestClient, connect
from vmcontroller.errors import AuthenticationFailed, HypervisorError, TamperingDetected, VMStateError
from vmcontroller.images import GuestImage
from vmcontroller.machine import connect_vm_agent

pytestmark = pytest.mark.integration

AGENT_PORT = DEFAULT_AGENT_TCP_PORT
TCP_UNIT = "vmc-tcp-agent"
BOOT_TIMEOUT = 300.0


class NatVM(NamedTuple):
    driver: LibvirtDriver
    name: str
    #: The host port (on 127.0.0.1) forwarded to the TCP agent in the guest.
    port: int
    #: A client of the VM's normal agent (virtio-serial), to look inside the guest.
    virtio: GuestClient
    #: The host's end of the VM's credentials.
    credentials: Credentials


async def start_tcp_agent(virtio: GuestClient, unit: str, port: int) -> None:
    await start_second_agent(virtio, unit, "--listen", f"tcp:{port}:interface={NAT_GUEST_ADDRESS}")


async def _bring_up(driver: LibvirtDriver, name: str) -> NatVM:
    virtio = await connect_vm_agent(reactor, driver, name, timeout=BOOT_TIMEOUT)
    # The default image leaves the card down; the addresses are those of QEMU's NAT.
    cards = (await virtio.run(["ls", "/sys/class/net"], check=True)).stdout.decode().split()
    card = next(c for c in cards if c != "lo")
    await virtio.run(
        ["sh", "-c", f"ip addr add {NAT_GUEST_ADDRESS}/24 dev {card} && ip link set {card} up && "
                     f"ip route add default via {NAT_GATEWAY}"],
        check=True,
    )
    port = await driver.forward_port(name, AGENT_PORT)
    await start_tcp_agent(virtio, TCP_UNIT, AGENT_PORT)
    return NatVM(driver, name, port, virtio, await driver.agent_credentials(name))


@pytest.fixture(scope="module")
def nat_vm(hypervisor: LibvirtDriver, guest_image: GuestImage) -> Iterator[NatVM]:
    """A VM of the module's own with an agent listening on TCP behind QEMU's NAT."""
    name = f"{TEST_VM_PREFIX}tcp-{os.getpid()}"
    pytest_twisted.blockon(hypervisor.define(guest_image.vm_spec(name, memory_mib=384, nat_network=True)))
    vm: NatVM | None = None
    try:
        pytest_twisted.blockon(hypervisor.start(name))
        vm = pytest_twisted.blockon(Deferred.fromCoroutine(_bring_up(hypervisor, name)))
        yield vm
        print_journal(vm.virtio, TCP_UNIT)
    finally:
        if vm is not None:
            vm.virtio.close()
        teardown_vm(hypervisor, name)


def endpoint(port: int) -> TCP4ClientEndpoint:
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port)


@pytest_twisted.async_yield_fixture()
async def tcp(nat_vm: NatVM) -> AsyncIterator[GuestClient]:
    """A client of the agent in the guest, over TCP through a port agent_endpoint forwards."""
    client = await connect_vm_agent(reactor, nat_vm.driver, nat_vm.name, transport="tcp", timeout=120)
    yield client
    await client.close()


# -- the driver's side ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_agent_endpoint_forwards_the_agent_port_once(nat_vm: NatVM) -> None:
    first = await nat_vm.driver.agent_endpoint(nat_vm.name, "tcp")
    again = await nat_vm.driver.agent_endpoint(nat_vm.name, "tcp")
    assert isinstance(first, TCP4ClientEndpoint) and isinstance(again, TCP4ClientEndpoint)
    assert (first._host, again._host) == ("127.0.0.1", "127.0.0.1")
    assert first._port == again._port != nat_vm.port


@pytest_twisted.ensureDeferred
async def test_forward_port_needs_a_running_vm_with_a_nat_card(
    nat_vm: NatVM, booted_vm: BootedVM, guest_image: GuestImage
) -> None:
    with pytest.raises(HypervisorError, match=r"no NAT network card.*nat_network=True"):
        await booted_vm.driver.forward_port(booted_vm.name, AGENT_PORT)
    stopped = f"{TEST_VM_PREFIX}tcp-stopped-{os.getpid()}"
    await nat_vm.driver.define(guest_image.vm_spec(stopped, nat_network=True))
    try:
        with pytest.raises(VMStateError, match="not running"):
            await nat_vm.driver.forward_port(stopped, AGENT_PORT)
    finally:
        await nat_vm.driver.undefine(stopped)


# -- the agent over TCP -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ping_info_and_exec(tcp: GuestClient, nat_vm: NatVM) -> None:
    assert (await tcp.ping())["version"]
    info = await tcp.info()
    # The same guest as the virtio agent sees.
    assert info["hostname"] == (await nat_vm.virtio.info())["hostname"]
    result = await tcp.run(
        ["sh", "-c", 'cat; echo "$GREETING" >&2; pwd; exit 3'],
        stdin=b"from stdin\n",
        env={"GREETING": "hello"},
        cwd="/tmp",
    )
    assert (result.stdout, result.stderr, result.exit_code) == (b"from stdin\n/tmp\n", b"hello\n", 3)
    # Many at once on the one connection.
    results = await gatherResults([tcp.run(["sh", "-c", f"echo {n}"], check=True) for n in range(8)])
    assert [r.stdout for r in results] == [f"{n}\n".encode() for n in range(8)]


@pytest_twisted.ensureDeferred
async def test_push_and_pull(tcp: GuestClient, tmp_path: Any) -> None:
    data = os.urandom(4 * 1024 * 1024 + 17)
    source = tmp_path / "up.bin"
    source.write_bytes(data)
    pushed = await tcp.push(str(source), "/root/tcp.bin", mode=0o600)
    assert (pushed.size, pushed.sha256) == (len(data), sha256(data))
    pulled = await tcp.pull("/root/tcp.bin", str(tmp_path / "down.bin"))
    assert pulled.sha256 == sha256(data)
    assert (tmp_path / "down.bin").read_bytes() == data
    assert (await tcp.stat("/root/tcp.bin"))["mode"] & 0o777 == 0o600
    await tcp.remove("/root/tcp.bin")


@pytest_twisted.ensureDeferred
async def test_a_host_that_reconnects_gets_a_new_session(nat_vm: NatVM) -> None:
    first = await connect(reactor, endpoint(nat_vm.port), credentials=nat_vm.credentials, timeout=60)
    await first.ping()
    await first.close()
    second = await connect(reactor, endpoint(nat_vm.port), credentials=nat_vm.credentials, timeout=60)
    try:
        assert (await second.run(["true"], check=True)).exit_code == 0
    finally:
        await second.close()


@pytest_twisted.ensureDeferred
async def test_connect_waits_for_an_agent_not_yet_listening_behind_the_forward(nat_vm: NatVM) -> None:
    """QEMU's NAT accepts the host's connection and drops it while nothing listens in the guest."""
    port = await nat_vm.driver.forward_port(nat_vm.name, AGENT_PORT + 1)
    connecting = connect(reactor, endpoint(port), credentials=nat_vm.credentials, timeout=120)
    await start_tcp_agent(nat_vm.virtio, f"{TCP_UNIT}-late", AGENT_PORT + 1)
    client = await connecting
    try:
        assert (await client.ping())["version"]
    finally:
        await client.close()
        await nat_vm.virtio.run(["systemctl", "stop", f"{TCP_UNIT}-late"], check=True)


# -- authentication over TCP (the same over virtio-serial: test_authentication.py) -------------


@pytest_twisted.ensureDeferred
async def test_no_credentials_is_refused(nat_vm: NatVM) -> None:
    with pytest.raises(AuthenticationFailed, match="certificate"):
        anonymous = anonymous_authenticator(nat_vm.credentials.peer_certificate)
        await connect_with(reactor, endpoint(nat_vm.port), anonymous)
    await serves_its_host(reactor, endpoint(nat_vm.port), nat_vm.credentials)


@pytest_twisted.ensureDeferred
async def test_another_vms_credentials_are_refused(nat_vm: NatVM) -> None:
    with pytest.raises(AuthenticationFailed, match="does not accept this end's certificate"):
        await connect(reactor, endpoint(nat_vm.port), credentials=another_vms_credentials(nat_vm.credentials))
    await serves_its_host(reactor, endpoint(nat_vm.port), nat_vm.credentials)


@pytest_twisted.ensureDeferred
async def test_replayed_handshake_is_refused(nat_vm: NatVM) -> None:
    recorded = await record_a_real_handshake(reactor, endpoint(nat_vm.port), nat_vm.credentials)
    errors = await replay(reactor, endpoint(nat_vm.port), recorded)
    refusals = [e for e in errors if isinstance(e, AuthenticationFailed)]
    assert refusals and "replayed or altered" in str(refusals[0]), errors
    await serves_its_host(reactor, endpoint(nat_vm.port), nat_vm.credentials)


@pytest_twisted.ensureDeferred
async def test_tampered_frame_mid_session_is_refused(nat_vm: NatVM) -> None:
    client = await connect(reactor, endpoint(nat_vm.port), credentials=nat_vm.credentials, timeout=60)
    try:
        assert (await client.ping())["version"]
        tamper_next_write(client)
        with pytest.raises(TamperingDetected, match="integrity"):
            await client.ping()
        assert (await client.ping())["version"]  # a new session on the same connection
    finally:
        await client.close()
    await serves_its_host(reactor, endpoint(nat_vm.port), nat_vm.credentials)
