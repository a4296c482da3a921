"""
The VMware driver over the vmrun stand-in (``tests/standins/vmrun``), a real process per call:
every operation, its errors, events through the poller, checkpoints and snapshots checked by
their effect on the stand-in's disk file. No VMware runs here (see docs/drivers-vmware.md).
"""

from __future__ import annotations

import base64
import json
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from guest_agent.credentials import VMWARE_VARIABLE, load_credentials
from hypervisors import load_driver
from hypervisors.interface import Capability, IHypervisorDriver, VMEvent, VMEventType, VMState
from hypervisors.vmware import VMwareDriver
from hypervisors.vmware.vmx import parse_vmx
from tests.standins.vmware import base_image, disk_content_path, hold_vm_lock, started_driver, vm_spec
from vmcontroller.errors import (
    CapabilityUnsupported,
    HypervisorError,
    HypervisorUnavailable,
    InvalidDriverOption,
    SnapshotNotFound,
    VMAlreadyExists,
    VMLocked,
    VMNotFound,
    VMStateError,
    VMTimeout,
)


@pytest.fixture()
def workdir() -> Iterator[Path]:
    # Short: the serial ports' unix sockets live under it (at most 107 bytes).
    with tempfile.TemporaryDirectory(prefix="vmw-") as d:
        yield Path(d)


@pytest.fixture()
def driver(workdir: Path) -> Iterator[VMwareDriver]:
    d = started_driver(reactor, workdir, poll_interval=0.05)
    yield d
    d.stopService()


@pytest.fixture()
def base(workdir: Path) -> Path:
    return base_image(workdir)


async def define(driver: VMwareDriver, base: Path, name: str = "vm1", **overrides: object) -> str:
    return await driver.define(vm_spec(name, base, **overrides))


async def failure(d: Awaitable[Any]) -> BaseException:
    try:
        await d
    except Exception as e:
        return e
    raise AssertionError("the call did not fail")


# -- the contract and its registration ---------------------------------------------------------


def test_the_driver_provides_the_interface_and_is_registered(workdir: Path) -> None:
    driver = load_driver("vmware", reactor, vmrun=str(workdir / "none"), state_dir=workdir)
    assert isinstance(driver, VMwareDriver)
    assert verifyObject(IHypervisorDriver, driver)


def test_options_as_a_command_line_gives_them(workdir: Path) -> None:
    driver = load_driver(
        "vmware", reactor, product="player", vmrun=str(workdir / "none"), state_dir=str(workdir),
        poll_interval="2.5", vmrun_timeout="60",
    )
    assert isinstance(driver, VMwareDriver) and driver.product == "player"
    assert Capability.SNAPSHOTS not in driver.capabilities
    with pytest.raises(InvalidDriverOption) as raised:
        load_driver("vmware", reactor, uri="qemu:///system")
    assert str(raised.value) == (
        "hypervisor driver 'vmware' has no option 'uri'; its options: product, vmrun, state_dir, qemu_img, "
        "poll_interval, vmrun_timeout, credentials_dir"
    )
    with pytest.raises(InvalidDriverOption) as raised:
        load_driver("vmware", reactor, product="esx", vmrun=str(workdir / "none"))
    assert str(raised.value) == (
        "hypervisor driver 'vmware': product='esx': use 'ws' (Workstation Pro), 'fusion' or 'player'"
    )
    with pytest.raises(InvalidDriverOption, match=r"poll_interval='often' is not a number \(like 1.0\)"):
        load_driver("vmware", reactor, vmrun=str(workdir / "none"), poll_interval="often")


def test_capabilities_depend_on_the_product(workdir: Path) -> None:
    ws = VMwareDriver(reactor, product="ws", state_dir=workdir)
    player = VMwareDriver(reactor, product="player", state_dir=workdir)
    assert {Capability.SNAPSHOTS, Capability.LIVE_SNAPSHOTS, Capability.SAVE_STATE} <= ws.capabilities
    assert Capability.SNAPSHOTS not in player.capabilities
    for driver in (ws, player):
        assert (
            not {Capability.PUSHED_EVENTS, Capability.PORT_FORWARD, Capability.VIRTIO_SERIAL}
            & driver.capabilities
        )
    with pytest.raises(ValueError, match="product='esx'"):
        VMwareDriver(reactor, product="esx", state_dir=workdir)  # type: ignore[arg-type]


# -- define / undefine -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_define_writes_the_vmx_and_a_delta_disk_on_a_read_only_vmdk_of_the_base(
    driver: VMwareDriver, base: Path
) -> None:
    before = base.read_bytes()
    await driver.define(vm_spec("vm1", base, memory_mib=300, vcpus=2), guestinfo={"token": "abc"})
    vmx = driver.vmx_path("vm1")
    entries = parse_vmx(vmx.read_text())
    assert (entries["memsize"], entries["numvcpus"], entries["guestinfo.token"]) == ("300", "2", "abc")
    assert stat.S_IMODE(vmx.stat().st_mode) == 0o600
    assert await driver.list_vms() == ["vm1"]
    # The delta's descriptor points at the VMDK copy of the base, which nothing may write.
    (parent,) = (driver.state_dir / ".bases").glob("*.vmdk")
    assert stat.S_IMODE(parent.stat().st_mode) == 0o444
    assert f'parentFileNameHint="{parent}"'.encode() in disk_content_path(driver, "vm1").read_bytes()[:4096]
    # A second VM of the same base shares the converted copy.
    await define(driver, base, "vm2")
    assert list((driver.state_dir / ".bases").glob("*.vmdk")) == [parent]
    assert base.read_bytes() == before
    assert await driver.state("vm1") is VMState.SHUTOFF


@pytest_twisted.ensureDeferred
async def test_define_refuses_a_name_taken_and_what_vmware_cannot_do(
    driver: VMwareDriver, base: Path
) -> None:
    await define(driver, base)
    vmx_before = driver.vmx_path("vm1").read_text()
    assert isinstance(await failure(define(driver, base)), VMAlreadyExists)
    assert driver.vmx_path("vm1").read_text() == vmx_before
    error = await failure(define(driver, base, "k", kernel="/boot/vmlinuz"))
    assert type(error) is HypervisorError and "cannot boot a kernel file directly" in str(error)
    error = await failure(define(driver, base, "capped", cpu_cap_percent=50))
    assert isinstance(error, CapabilityUnsupported) and error.capability == "cpu-cap"
    error = await failure(driver.define(vm_spec("bad", base), guestinfo={"x": 'a"b'}))
    assert isinstance(error, ValueError)
    error = await failure(driver.define(vm_spec("nodisk", base.with_name("missing.qcow2"))))
    assert "does not exist" in str(error)
    assert await driver.list_vms() == ["vm1"]


@pytest_twisted.ensureDeferred
async def test_undefine_stops_the_vm_and_removes_its_directory(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    await driver.start("vm1")
    await driver.undefine("vm1")
    assert await driver.list_vms() == []
    assert not (driver.state_dir / "vm1").exists()
    assert isinstance(await failure(driver.state("vm1")), VMNotFound)
    # The name is free again, with no snapshot left over.
    await define(driver, base)
    assert await driver.snapshot_list("vm1") == []


# -- power ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_power_operations_and_their_states(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    await driver.start("vm1")
    assert await driver.state("vm1") is VMState.RUNNING
    await driver.pause("vm1")
    assert await driver.state("vm1") is VMState.PAUSED
    await driver.reset("vm1")
    assert await driver.state("vm1") is VMState.PAUSED
    await driver.resume("vm1")
    assert await driver.state("vm1") is VMState.RUNNING
    await driver.reset("vm1")
    assert await driver.state("vm1") is VMState.RUNNING
    await driver.shutdown("vm1")
    assert await driver.state("vm1") is VMState.SHUTOFF
    await driver.start("vm1")
    await driver.power_off("vm1")
    assert await driver.state("vm1") is VMState.SHUTOFF


@pytest_twisted.ensureDeferred
async def test_shutdown_without_waiting_then_wait_for_state(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    await driver.start("vm1")
    await driver.shutdown("vm1", wait=False)
    await driver.wait_for_state("vm1", VMState.SHUTOFF, timeout=30)


@pytest_twisted.ensureDeferred
async def test_a_shutdown_past_its_timeout_stops_vmrun_and_leaves_the_vm_running(
    workdir: Path, base: Path
) -> None:
    driver = started_driver(reactor, workdir, delay=2.0)
    try:
        await define(driver, base)
        await driver.start("vm1")
        error = await failure(driver.shutdown("vm1", timeout=0.5))
        assert isinstance(error, VMTimeout) and "use power_off()" in str(error)
        # vmrun was killed before it acted: the VM still runs.
        assert await driver.state("vm1") is VMState.RUNNING
    finally:
        driver.stopService()


@pytest_twisted.ensureDeferred
async def test_save_state_suspends_to_a_vmss_and_start_resumes(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    await driver.start("vm1")
    await driver.pause("vm1")
    await driver.save_state("vm1")
    assert await driver.state("vm1") is VMState.SAVED
    vm_dir = driver.vmx_path("vm1").parent
    assert parse_vmx(driver.vmx_path("vm1").read_text())["checkpoint.vmstate"] == "vm1.vmss"
    assert (vm_dir / "vm1.vmss").exists()
    assert isinstance(await failure(driver.pause("vm1")), VMStateError)
    await driver.start("vm1")
    assert await driver.state("vm1") is VMState.RUNNING
    assert not (vm_dir / "vm1.vmss").exists()
    assert parse_vmx(driver.vmx_path("vm1").read_text())["checkpoint.vmstate"] == ""


@pytest_twisted.ensureDeferred
async def test_operations_in_the_wrong_state_fail_and_change_nothing(
    driver: VMwareDriver, base: Path
) -> None:
    await define(driver, base)
    for call in (driver.pause, driver.resume, driver.reset, driver.power_off, driver.save_state):
        error = await failure(call("vm1"))
        assert isinstance(error, VMStateError) and "it is shutoff" in str(error)
    assert isinstance(await failure(driver.shutdown("vm1")), VMStateError)
    await driver.start("vm1")
    assert isinstance(await failure(driver.start("vm1")), VMStateError)
    assert isinstance(await failure(driver.resume("vm1")), VMStateError)
    assert await driver.state("vm1") is VMState.RUNNING


@pytest_twisted.ensureDeferred
async def test_an_unknown_vm_is_vmnotfound_for_every_operation(driver: VMwareDriver) -> None:
    calls: list[Deferred[Any]] = [
        driver.start("nope"), driver.shutdown("nope"), driver.power_off("nope"), driver.pause("nope"),
        driver.resume("nope"), driver.reset("nope"), driver.save_state("nope"), driver.state("nope"),
        driver.snapshot_create("nope", "s"), driver.snapshot_list("nope"),
        driver.snapshot_revert("nope", "s"), driver.snapshot_delete("nope", "s"), driver.undefine("nope"),
        driver.agent_endpoint("nope"),
    ]  # fmt: skip
    for call in calls:
        error = await failure(call)
        assert isinstance(error, VMNotFound) and "'nope'" in str(error)


@pytest_twisted.ensureDeferred
async def test_a_missing_vmrun_is_hypervisor_unavailable(workdir: Path, base: Path) -> None:
    driver = VMwareDriver(reactor, vmrun=str(workdir / "no-vmrun"), state_dir=workdir / "vms")
    driver.startService()
    try:
        await driver.define(vm_spec("vm1", base))
        error = await failure(driver.start("vm1"))
        assert isinstance(error, HypervisorUnavailable) and "install VMware" in str(error)
        assert isinstance(await failure(driver.state("vm1")), HypervisorUnavailable)
    finally:
        driver.stopService()


@pytest_twisted.ensureDeferred
async def test_a_vm_another_vmware_program_holds_is_locked(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    lock = hold_vm_lock(driver, "vm1")
    for call in (driver.start("vm1"), driver.snapshot_create("vm1", "s1"), driver.undefine("vm1")):
        error = await failure(call)
        assert isinstance(error, VMLocked) and "another program holds the VM" in str(error)
    assert await driver.state("vm1") is VMState.SHUTOFF
    assert await driver.snapshot_list("vm1") == []
    shutil.rmtree(lock, ignore_errors=True)
    await driver.start("vm1")
    assert await driver.state("vm1") is VMState.RUNNING


@pytest_twisted.ensureDeferred
async def test_a_driver_not_started_says_so(workdir: Path) -> None:
    driver = VMwareDriver(reactor, state_dir=workdir)
    assert "not started" in str(await failure(driver.list_vms()))


@pytest_twisted.ensureDeferred
async def test_the_reactor_keeps_serving_while_vmrun_runs(workdir: Path, base: Path) -> None:
    driver = started_driver(reactor, workdir, delay=1.0)
    try:
        await define(driver, base)
        order: list[str] = []
        start = driver.start("vm1").addCallback(lambda _: order.append("vmrun done"))
        ticks = [deferLater(reactor, 0.05 * i, order.append, f"tick {i}") for i in range(1, 4)]
        for tick in ticks:
            await tick
        assert order == ["tick 1", "tick 2", "tick 3"]
        await start
        assert order[-1] == "vmrun done"
    finally:
        driver.stopService()


@pytest_twisted.ensureDeferred
async def test_concurrent_calls_on_one_vm_run_in_order(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    await driver.start("vm1")
    calls = [driver.pause("vm1"), driver.resume("vm1"), driver.save_state("vm1"), driver.start("vm1")]
    for call in calls:
        await call
    assert await driver.state("vm1") is VMState.RUNNING


# -- Player ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_player_has_no_snapshots_nor_pause_and_says_why(workdir: Path, base: Path) -> None:
    driver = started_driver(reactor, workdir, product="player")
    try:
        await define(driver, base)
        await driver.start("vm1")
        calls = (
            driver.snapshot_create("vm1", "s1"),
            driver.snapshot_list("vm1"),
            driver.snapshot_revert("vm1", "s1"),
            driver.snapshot_delete("vm1", "s1"),
        )
        for call in calls:
            error = await failure(call)
            assert isinstance(error, CapabilityUnsupported)
            # Of the running VM: a snapshot with its memory.
            wanted = "live-snapshots" if call is calls[0] else "snapshots"
            assert error.driver == "vmware" and error.capability == wanted
            assert "Workstation Player cannot take, revert or delete snapshots" in str(error)
        for call in (driver.pause("vm1"), driver.resume("vm1")):
            error = await failure(call)
            assert isinstance(error, CapabilityUnsupported) and error.capability == "pause"
            assert "Workstation Player cannot pause or unpause" in str(error)
        assert await driver.state("vm1") is VMState.RUNNING
        await driver.save_state("vm1")
        assert await driver.state("vm1") is VMState.SAVED
    finally:
        driver.stopService()


# -- snapshots ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_revert_restores_the_disk_content_and_the_power_state(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    disk = disk_content_path(driver, "vm1")
    disk.write_bytes(b"offline")
    off = await driver.snapshot_create("vm1", "off", "taken shut off")
    assert (off.state, off.current, off.parent, off.description) == (
        VMState.SHUTOFF,
        True,
        None,
        "taken shut off",
    )
    await driver.start("vm1")
    disk.write_bytes(b"online")
    on = await driver.snapshot_create("vm1", "on")
    assert (on.state, on.parent) == (VMState.RUNNING, "off")
    disk.write_bytes(b"changed")

    await driver.snapshot_revert("vm1", "off")
    assert disk.read_bytes() == b"offline"
    assert await driver.state("vm1") is VMState.SHUTOFF
    await driver.snapshot_revert("vm1", "on")
    assert disk.read_bytes() == b"online"
    assert await driver.state("vm1") is VMState.RUNNING
    assert [(s.name, s.current) for s in await driver.snapshot_list("vm1")] == [("off", False), ("on", True)]


@pytest_twisted.ensureDeferred
async def test_a_revert_that_leaves_the_vm_suspended_is_resumed(workdir: Path, base: Path) -> None:
    driver = started_driver(reactor, workdir, revert_suspends=True)
    try:
        await define(driver, base)
        await driver.start("vm1")
        disk = disk_content_path(driver, "vm1")
        disk.write_bytes(b"online")
        await driver.snapshot_create("vm1", "on")
        await driver.power_off("vm1")
        disk.write_bytes(b"changed")
        await driver.snapshot_revert("vm1", "on")
        assert disk.read_bytes() == b"online"
        assert await driver.state("vm1") is VMState.RUNNING
    finally:
        driver.stopService()


@pytest_twisted.ensureDeferred
async def test_a_child_stays_revertible_after_its_parent_is_deleted(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    disk = disk_content_path(driver, "vm1")
    disk.write_bytes(b"parent")
    await driver.snapshot_create("vm1", "parent")
    disk.write_bytes(b"child")
    await driver.snapshot_create("vm1", "child")
    await driver.snapshot_delete("vm1", "parent")
    disk.write_bytes(b"later")
    (child,) = await driver.snapshot_list("vm1")
    assert (child.name, child.parent) == ("child", None)
    await driver.snapshot_revert("vm1", "child")
    assert disk.read_bytes() == b"child"
    assert isinstance(await failure(driver.snapshot_revert("vm1", "parent")), SnapshotNotFound)


@pytest_twisted.ensureDeferred
async def test_snapshot_errors(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    await driver.snapshot_create("vm1", "s1")
    error = await failure(driver.snapshot_create("vm1", "s1"))
    assert type(error) is HypervisorError and "has a snapshot of that name already" in str(error)
    assert [s.name for s in await driver.snapshot_list("vm1")] == ["s1"]
    for call in (driver.snapshot_revert("vm1", "s9"), driver.snapshot_delete("vm1", "s9")):
        error = await failure(call)
        assert isinstance(error, SnapshotNotFound) and "'s9'" in str(error)
    await driver.snapshot_delete("vm1", "s1")
    assert await driver.snapshot_list("vm1") == []


# -- events --------------------------------------------------------------------------------------------


def event_for(driver: VMwareDriver, vm: str, kind: VMEventType) -> Deferred[VMEvent]:
    """The next event ``kind`` of ``vm``, subscribed to at once (failing after 30 s)."""
    seen: Deferred[VMEvent] = Deferred()

    def on_event(event: VMEvent) -> None:
        if event.type is kind and not seen.called:
            seen.callback(event)

    subscription = driver.subscribe(on_event, vm)

    async def wait() -> VMEvent:
        try:
            return await seen.addTimeout(30, reactor)
        finally:
            subscription.cancel()

    return Deferred.fromCoroutine(wait())


@pytest_twisted.ensureDeferred
async def test_events_are_polled_while_someone_subscribes(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    mine: list[VMEvent] = []
    everyone: list[VMEvent] = []
    subscription = driver.subscribe(mine.append, "vm1")
    everything = driver.subscribe(everyone.append)
    # A VM defined now is reported once the poller has had its first look.
    defined = event_for(driver, "vm0", VMEventType.DEFINED)
    await define(driver, base, "vm0")
    assert (await defined).state is VMState.SHUTOFF

    # A poller sees the states it finds at each look: wait for each event before the next
    # operation, so that none is shorter than a poll.
    for operation, kind in (
        (driver.start, VMEventType.STARTED),
        (driver.pause, VMEventType.PAUSED),
        (driver.resume, VMEventType.RESUMED),
        (driver.save_state, VMEventType.SAVED),
        (driver.start, VMEventType.RESTORED),
        (driver.power_off, VMEventType.SHUTOFF),
    ):
        seen = event_for(driver, "vm1", kind)
        await operation("vm1")
        await seen
    await driver.wait_for_state("vm1", VMState.SHUTOFF, timeout=30)
    undefined = event_for(driver, "vm0", VMEventType.UNDEFINED)
    await driver.undefine("vm0")
    await undefined
    subscription.cancel()
    everything.cancel()
    assert [(e.type, e.state) for e in mine] == [
        (VMEventType.STARTED, VMState.RUNNING),
        (VMEventType.PAUSED, VMState.PAUSED),
        (VMEventType.RESUMED, VMState.RUNNING),
        (VMEventType.SAVED, VMState.SAVED),
        (VMEventType.RESTORED, VMState.RUNNING),
        (VMEventType.SHUTOFF, VMState.SHUTOFF),
    ]
    assert [(e.vm, e.type) for e in everyone if e.vm == "vm0"] == [
        ("vm0", VMEventType.DEFINED),
        ("vm0", VMEventType.UNDEFINED),
    ]


@pytest_twisted.ensureDeferred
async def test_wait_for_state_times_out_with_the_state_it_saw(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    error = await failure(driver.wait_for_state("vm1", VMState.RUNNING, timeout=5))
    assert "did not become running within 5 s (it is shutoff)" in str(error)


# -- agent channel -------------------------------------------------------------------------------------


class _Hello(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello from the pipe")
        self.transport.loseConnection()


class _Read(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


@pytest_twisted.ensureDeferred
async def test_agent_endpoint_reaches_the_serial_ports_pipe(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base)
    assert isinstance(await failure(driver.agent_endpoint("vm1")), VMStateError)
    await driver.start("vm1")
    # VMware listens on the pipe ("pipe.endPoint = server"); here the test plays VMware's part.
    socket = driver.vmx_path("vm1").parent / "serial-agent.sock"
    listener = await UNIXServerEndpoint(reactor, str(socket)).listen(Factory.forProtocol(_Hello))
    try:
        endpoint = await driver.agent_endpoint("vm1")
        protocol = _Read()
        await endpoint.connect(Factory.forProtocol(lambda: protocol))
        assert await protocol.done == b"hello from the pipe"
    finally:
        await listener.stopListening()
    for transport, capability in (("virtio-serial", "virtio-serial"), ("tcp", "port-forward")):
        error = await failure(driver.agent_endpoint("vm1", transport))  # type: ignore[arg-type]
        assert isinstance(error, CapabilityUnsupported) and error.capability == capability
    error = await failure(driver.forward_port("vm1", 9000))
    assert isinstance(error, CapabilityUnsupported) and "nat.conf" in str(error)


@pytest_twisted.ensureDeferred
async def test_a_vm_without_a_serial_port_has_no_agent_channel(driver: VMwareDriver, base: Path) -> None:
    await define(driver, base, serial_ports=(), agent_transport="auto", nat_network=True)
    await driver.start("vm1")
    error = await failure(driver.agent_endpoint("vm1"))
    assert type(error) is HypervisorError and "serial port" in str(error)
    error = await failure(driver.serial_socket_path("vm1", "agent"))
    assert type(error) is HypervisorError and "no serial port named 'agent'" in str(error)


# -- credentials ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_credentials_are_minted_at_define_put_in_guestinfo_and_removed_with_the_vm(
    driver: VMwareDriver, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await define(driver, base)
    host_end = await driver.agent_credentials("vm1")
    value = parse_vmx(driver.vmx_path("vm1").read_text())[VMWARE_VARIABLE]
    assert stat.S_IMODE(driver.vmx_path("vm1").stat().st_mode) == 0o600
    # What the agent in the guest gets from vmware-rpctool (the stand-in, fed the .vmx's value).
    store = tmp_path / "guestinfo.json"
    store.write_text(json.dumps({VMWARE_VARIABLE: value}))
    monkeypatch.setenv("VMWARE_STANDIN_STORE", str(store))
    agent_end = await load_credentials(
        reactor,
        fw_cfg=str(tmp_path / "no-fw_cfg"),
        vboxcontrol=str(tmp_path / "no-VBoxControl"),
        rpctool=str(Path(__file__).resolve().parent.parent / "standins" / "vmware-rpctool"),
        run_copy=str(tmp_path / "run" / "credentials"),
    )
    assert agent_end.peer_certificate == host_end.certificate
    assert host_end.peer_certificate == agent_end.certificate
    assert host_end.private_key not in base64.b64decode(value)  # the host's key stays on the host
    await define(driver, base, "vm2")
    assert (await driver.agent_credentials("vm2")).certificate != host_end.certificate  # per VM
    await driver.undefine("vm1")
    assert isinstance(await failure(driver.agent_credentials("vm1")), VMNotFound)
    assert not driver.credentials.exists("vm1") and driver.credentials.exists("vm2")
