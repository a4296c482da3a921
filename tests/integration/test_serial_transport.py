"""
The agent's serial-tty transport in a real QEMU guest: a VM of its own with one extra serial
port (``VMSpec.serial_ports``, the guest's ``/dev/ttyS1``, a unix socket on the host), a second
agent started on it through the normal virtio agent, and every kind of operation through the
serial port; then what only a serial port does: it never tells the agent that a host left, so
a new host must recover the session with its SYNC retry, past whatever the old one left behind.

An emulated UART is slow, so the data sizes are small; the tests print the rates they saw.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import deferLater

from hypervisors.interface import VMSpec
from hypervisors.libvirt import LibvirtDriver
from tests.integration.conftest import (
    TEST_VM_PREFIX,
    print_journal,
    sha256,
    start_second_agent,
    teardown_vm,
)
from vmcontroller.client import GuestClient
from vmcontroller.errors import ConnectionLost, HypervisorError
from vmcontroller.images import GuestImage
from vmcontroller.machine import connect_vm_agent

pytestmark = pytest.mark.integration

SERIAL_PORT = "agent-serial"
SERIAL_UNIT = "vmc-serial-agent"
BOOT_TIMEOUT = 300.0


class SerialVM(NamedTuple):
    driver: LibvirtDriver
    name: str
    spec: VMSpec
    #: The host side of the serial port the second agent serves.
    socket: str
    #: A client of the VM's normal agent (virtio-serial), to look inside the guest.
    virtio: GuestClient


def rate(size: int, seconds: float) -> str:
    return f"{size / 1024:.0f} KiB in {seconds:.1f} s = {size / 1024 / max(seconds, 1e-6):.1f} KiB/s"


async def _start_serial_agent(driver: LibvirtDriver, name: str, spec: VMSpec) -> tuple[str, GuestClient]:
    virtio = await connect_vm_agent(reactor, driver, name, timeout=BOOT_TIMEOUT)
    device = spec.serial_device(SERIAL_PORT)
    assert device == "/dev/ttyS1"
    # The guest kernel found the UART (an absent one reads "uart:unknown").
    uart = await virtio.run(["cat", "/proc/tty/driver/serial"], check=True)
    assert b"1: uart:16550A" in uart.stdout, uart.stdout
    await start_second_agent(virtio, SERIAL_UNIT, "--serial", device)
    return await driver.serial_socket_path(name, SERIAL_PORT), virtio


@pytest.fixture(scope="module")
def serial_vm(hypervisor: LibvirtDriver, guest_image: GuestImage) -> Iterator[SerialVM]:
    """A VM of the module's own with an agent on its ttyS1, started once."""
    name = f"{TEST_VM_PREFIX}serial-{os.getpid()}"
    spec = guest_image.vm_spec(name, memory_mib=384, serial_ports=(SERIAL_PORT,))
    pytest_twisted.blockon(hypervisor.define(spec))
    virtio: GuestClient | None = None
    try:
        pytest_twisted.blockon(hypervisor.start(name))
        socket, virtio = pytest_twisted.blockon(
            Deferred.fromCoroutine(_start_serial_agent(hypervisor, name, spec))
        )
        yield SerialVM(hypervisor, name, spec, socket, virtio)
        print_journal(virtio, SERIAL_UNIT)
    finally:
        if virtio is not None:
            virtio.close()
        teardown_vm(hypervisor, name)


async def connect_serial(vm: SerialVM, timeout: float = 120.0) -> GuestClient:
    """The agent on the serial port, reached through the driver's agent_endpoint."""
    return await connect_vm_agent(reactor, vm.driver, vm.name, transport="serial", timeout=timeout)


@pytest_twisted.async_yield_fixture()
async def serial(serial_vm: SerialVM) -> AsyncIterator[GuestClient]:
    """A client of the agent on the serial port."""
    client = await connect_serial(serial_vm)
    yield client
    client.close()


async def serial_agent_pid(vm: SerialVM) -> int:
    result = await vm.virtio.run(["systemctl", "show", "-p", "MainPID", "--value", SERIAL_UNIT], check=True)
    return int(result.stdout)


# -- the driver's side ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_serial_socket_path(serial_vm: SerialVM) -> None:
    driver, name = serial_vm.driver, serial_vm.name
    path = await driver.serial_socket_path(name, SERIAL_PORT)
    assert path == str(driver.state_dir / name / "serial-agent-serial.sock")
    assert os.path.exists(path)
    with pytest.raises(HypervisorError, match="no serial port named 'nope'"):
        await driver.serial_socket_path(name, "nope")
    # The virtio agent channel is still where it was.
    assert await driver.agent_socket_path(name) != path
    endpoint = await driver.agent_endpoint(name, "serial")
    assert isinstance(endpoint, UNIXClientEndpoint)
    assert endpoint._path == path


# -- the agent over the serial port -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ping_and_info(serial: GuestClient, serial_vm: SerialVM) -> None:
    assert (await serial.ping())["version"]
    info = await serial.info()
    assert info["kernel"].startswith("Linux")
    # The same guest as the virtio agent sees.
    assert info["hostname"] == (await serial_vm.virtio.info())["hostname"]


@pytest_twisted.ensureDeferred
async def test_exec(serial: GuestClient) -> None:
    result = await serial.run(
        ["sh", "-c", 'cat; echo "$GREETING" >&2; pwd; exit 3'],
        stdin=b"from stdin\n",
        env={"GREETING": "hello"},
        cwd="/tmp",
    )
    assert (result.stdout, result.stderr, result.exit_code) == (b"from stdin\n/tmp\n", b"hello\n", 3)

    size = 256 * 1024
    seen: list[bytes] = []
    started = time.monotonic()
    script = f"head -c {size} /dev/urandom > /tmp/out && sha256sum /tmp/out && cat /tmp/out"
    handle = serial.exec(["sh", "-c", script], on_stdout=seen.append)
    assert (await handle.exited).exit_code == 0
    print(f"serial exec output: {rate(size, time.monotonic() - started)}")
    digest_line, payload = b"".join(seen).split(b"\n", 1)
    assert len(payload) == size
    assert sha256(payload) == digest_line.split()[0].decode()


@pytest_twisted.ensureDeferred
async def test_push_pull_round_trip(serial: GuestClient, tmp_path: Any) -> None:
    data = os.urandom(2 * 1024 * 1024 + 17)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    started = time.monotonic()
    pushed = await serial.push(str(source), "/root/serial-in.bin")
    print(f"serial push: {rate(len(data), time.monotonic() - started)}")
    assert pushed.sha256 == sha256(data) and pushed.size == len(data)
    check = await serial.run(["sha256sum", "/root/serial-in.bin"], check=True)
    assert check.stdout.split()[0].decode() == sha256(data)

    back = tmp_path / "back.bin"
    started = time.monotonic()
    pulled = await serial.pull("/root/serial-in.bin", str(back))
    print(f"serial pull: {rate(len(data), time.monotonic() - started)}")
    assert back.read_bytes() == data and pulled.sha256 == sha256(data)
    await serial.remove("/root/serial-in.bin")


# -- hosts that come and go --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reconnect_after_the_host_closes(serial_vm: SerialVM) -> None:
    """
    The tty never tells the agent the host left: each new host's SYNC starts a new session
    with the same agent process.
    """
    pid = await serial_agent_pid(serial_vm)
    for round_ in range(3):
        client = await connect_serial(serial_vm)
        try:
            assert (await client.ping())["version"]
            result = await client.run(["echo", f"round {round_}"], check=True)
            assert result.stdout == f"round {round_}\n".encode()
        finally:
            client.close()
    assert await serial_agent_pid(serial_vm) == pid


@pytest_twisted.ensureDeferred
async def test_agent_survives_a_hang_up_of_the_tty(serial_vm: SerialVM) -> None:
    """
    A session leader that opens the tty without O_NOCTTY makes it its controlling terminal and
    hangs it up when it exits (here stty, which the virtio agent starts in a session of its
    own): the agent's open file then reads end-of-file for ever, so the agent opens the
    device again.
    """
    pid = await serial_agent_pid(serial_vm)
    hang_ups = await count_hang_ups(serial_vm)
    client = await connect_serial(serial_vm)
    try:
        assert (await client.ping())["version"]
        # stty started directly (no shell) leads its own session; it also shows the agent's raw mode.
        settings = await serial_vm.virtio.run(["stty", "-a", "-F", serial_vm.spec.serial_device(SERIAL_PORT)])
        assert b"-icanon" in settings.stdout and b"-echo " in settings.stdout, settings.stdout
        deadline = time.monotonic() + 30
        while await count_hang_ups(serial_vm) == hang_ups and time.monotonic() < deadline:
            await deferLater(reactor, 0.5, lambda: None)
        assert await count_hang_ups(serial_vm) == hang_ups + 1, "stty did not hang up the tty"
        # The client's session restarts when the agent announces itself on the reopened device.
        for _ in range(3):
            try:
                result = await client.run(["echo", "after the hang-up"], check=True)
                break
            except ConnectionLost:
                await client.wait_ready()
        assert result.stdout == b"after the hang-up\n"
    finally:
        client.close()
    again = await connect_serial(serial_vm)
    try:
        assert (await again.ping())["version"]
    finally:
        again.close()
    assert await serial_agent_pid(serial_vm) == pid


async def count_hang_ups(vm: SerialVM) -> int:
    journal = await vm.virtio.run(["journalctl", "--no-pager", "-o", "cat", "-u", SERIAL_UNIT], check=True)
    return journal.stdout.count(b"(end of file)")


async def wait_until_gone(vm: SerialVM, marker: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await vm.virtio.run(["pgrep", "-f", marker])).exit_code == 1:
            return
        await deferLater(reactor, 0.5, lambda: None)
    listing = await vm.virtio.run(["pgrep", "-af", marker])
    raise AssertionError(f"the old session's process still runs: {listing.stdout!r}")


async def restart_serial_agent(vm: SerialVM) -> None:
    await vm.virtio.run(["systemctl", "stop", SERIAL_UNIT])
    await vm.virtio.run(["systemctl", "reset-failed", SERIAL_UNIT])
    await vm.virtio.run(
        ["systemd-run", "--unit", SERIAL_UNIT, "/usr/bin/python3", "-m", "guest_agent", "run", "--serial",
         vm.spec.serial_device(SERIAL_PORT)],
        check=True,
    )


@pytest_twisted.ensureDeferred
async def test_leftovers_of_an_abandoned_session(serial_vm: SerialVM, tmp_path: Any) -> None:
    """
    A host leaves while an exec streams output to it and requests are in flight: the agent
    does not know, keeps the process running and its output queued. The next host still gets
    a working session past those leftovers, and its SYNC ends the old session's operations.
    """
    pid = await serial_agent_pid(serial_vm)
    marker = "vmc-serial-leftover"
    old = await connect_serial(serial_vm)
    streamed: list[bytes] = []
    stream = old.exec(
        ["sh", "-c", f": {marker}; while :; do head -c 65536 /dev/urandom; done"],
        on_stdout=streamed.append,
    )
    deadline = time.monotonic() + 60
    while sum(map(len, streamed)) < 64 * 1024 and time.monotonic() < deadline:
        await deferLater(reactor, 0.2, lambda: None)
    assert streamed, "no output came through the serial port in 60 s"
    in_flight: list[Deferred[Any]] = [old.ping(), old.run(["sleep", "30"]), old.info()]
    old.close()
    for pending in (stream.exited, *in_flight):
        with pytest.raises(ConnectionLost):
            await pending

    new = await connect_serial(serial_vm)
    try:
        assert (await new.ping())["version"]
        assert (await new.run(["echo", "fresh"], check=True)).stdout == b"fresh\n"
        await wait_until_gone(serial_vm, marker)
        data = os.urandom(64 * 1024 + 3)
        small = tmp_path / "small.bin"
        small.write_bytes(data)
        assert (await new.push(str(small), "/root/serial-small.bin")).sha256 == sha256(data)
        back = tmp_path / "small-back.bin"
        await new.pull("/root/serial-small.bin", str(back))
        assert back.read_bytes() == data
    finally:
        new.close()
    assert await serial_agent_pid(serial_vm) == pid


@pytest_twisted.ensureDeferred
async def test_host_gone_in_the_middle_of_a_push(serial_vm: SerialVM, tmp_path: Any) -> None:
    """
    A host leaves in the middle of a push: QEMU drops what it had not yet passed to the UART,
    so the agent holds half a DATA frame. Once the line has been idle for a moment the agent
    drops it and finds the next host's SYNC, which gets a session.
    """
    await serial_vm.virtio.run(["mkdir", "-p", "/root/serial-upload"], check=True)
    old = await connect_serial(serial_vm)
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(4 * 1024 * 1024))
    pushed_so_far: list[int] = []
    push = old.push(
        str(source), "/root/serial-upload/upload.bin", progress=lambda done, total: pushed_so_far.append(done)
    )
    deadline = time.monotonic() + 120
    while not pushed_so_far and time.monotonic() < deadline:
        await deferLater(reactor, 0.2, lambda: None)
    assert pushed_so_far, "the push did not start in 120 s"
    old.close()
    with pytest.raises(ConnectionLost):
        await push
    try:
        new = await connect_serial(serial_vm, timeout=60)
    except Exception:
        await restart_serial_agent(serial_vm)  # leave a working agent to the tests after this one
        raise
    try:
        assert (await new.ping())["version"]
        # The interrupted push left nothing behind.
        assert await new.list("/root/serial-upload") == []
    finally:
        new.close()
        await serial_vm.virtio.run(["rm", "-rf", "/root/serial-upload"])
