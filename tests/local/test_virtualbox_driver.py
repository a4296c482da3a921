"""
The VirtualBox driver over both of its backends, each over its stand-in (tests/standins/):
pyvbox (the real library) over the ``vboxapi`` stand-in, and VBoxManage's stand-in run as a
real process. Effects are read from the stand-in's registry and files, not from the driver.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from zope.interface.verify import verifyObject

from guest_agent.credentials import VBOX_PROPERTY, load_credentials
from guest_agent.protocol.tls import Credentials
from hypervisors import load_driver
from hypervisors.interface import (
    DEFAULT_AGENT_TCP_PORT,
    Capability,
    IHypervisorDriver,
    VMEvent,
    VMEventType,
    VMSpec,
    VMState,
)
from hypervisors.virtualbox import BACKEND_ENV, VirtualBoxDriver
from tests.standins.vbox import (
    FACTORIES,
    STANDINS,
    VBOXMANAGE,
    StandinVirtualBox,
    unavailable_options,
    vbox_model,
    virtualbox_pyvbox,
)
from vmcontroller.errors import (
    CapabilityUnsupported,
    HypervisorError,
    HypervisorUnavailable,
    SnapshotNotFound,
    VMAlreadyExists,
    VMLocked,
    VMNotFound,
    VMStateError,
)


@pytest_twisted.async_yield_fixture(params=sorted(FACTORIES))
async def vbox(request, tmp_path: Path) -> AsyncIterator[StandinVirtualBox]:
    standin = FACTORIES[request.param](reactor, tmp_path)
    yield standin
    await standin.driver.stopService()


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(b"base image")
    return path


def machine(vbox: StandinVirtualBox, name: str) -> dict:
    with vbox_model.transaction(vbox.home) as registry:
        return registry.find_machine(name)


async def until(condition, what: str) -> None:
    for _ in range(400):
        if condition():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{what} never happened")


@pytest_twisted.ensureDeferred
async def test_define_makes_a_differencing_child_of_the_base(vbox, base):
    spec = VMSpec(
        name="vm1",
        disk=str(base),
        memory_mib=256,
        vcpus=2,
        cpu_cap_percent=40,
        serial_ports=("agent",),
        nat_network=True,
    )
    assert await vbox.driver.define(spec) == "vm1"

    record = machine(vbox, "vm1")
    assert (record["memory"], record["cpus"], record["cpu_cap"]) == (256, 2, 40)
    assert record["uarts"][1] == {
        "enabled": True,
        "mode": "hostpipe",
        "server": True,
        "path": str(vbox.driver.state_dir / "vm1" / "serial-agent.sock"),
    }
    assert record["nic1"]["attachment"] == "nat"
    disk = vbox.current_disk_file("vm1")
    assert disk != base and disk.parent == vbox.driver.state_dir / "vm1" / "Snapshots"
    disk.write_bytes(b"written by the guest")
    assert base.read_bytes() == b"base image"
    assert await vbox.driver.list_vms() == ["vm1"]
    assert await vbox.driver.state("vm1") is VMState.SHUTOFF


@pytest_twisted.ensureDeferred
async def test_lifecycle(vbox, base):
    driver = vbox.driver
    await driver.define(VMSpec(name="vm1", disk=str(base)))
    await driver.start("vm1")
    assert machine(vbox, "vm1")["state"] == vbox_model.RUNNING
    await driver.pause("vm1")
    assert await driver.state("vm1") is VMState.PAUSED
    await driver.resume("vm1")
    await driver.reset("vm1")
    assert await driver.state("vm1") is VMState.RUNNING
    await driver.shutdown("vm1", timeout=30)
    assert machine(vbox, "vm1")["state"] == vbox_model.POWERED_OFF
    await driver.start("vm1")
    await driver.power_off("vm1")
    assert await driver.state("vm1") is VMState.SHUTOFF


@pytest_twisted.ensureDeferred
async def test_save_state_then_start_resumes(vbox, base):
    driver = vbox.driver
    await driver.define(VMSpec(name="vm1", disk=str(base)))
    await driver.start("vm1")
    await driver.save_state("vm1")
    assert await driver.state("vm1") is VMState.SAVED
    state_file = Path(machine(vbox, "vm1")["state_file"])
    assert state_file.is_file()
    await driver.start("vm1")
    assert await driver.state("vm1") is VMState.RUNNING
    assert not state_file.exists() and machine(vbox, "vm1")["state_file"] is None


@pytest_twisted.ensureDeferred
async def test_snapshots_restore_the_disk_offline_and_online(vbox, base):
    driver = vbox.driver
    await driver.define(VMSpec(name="vm1", disk=str(base)))
    vbox.current_disk_file("vm1").write_bytes(b"first")
    off = await driver.snapshot_create("vm1", "off", "taken shut off")
    assert (off.name, off.description, off.state, off.parent, off.current) == (
        "off",
        "taken shut off",
        VMState.SHUTOFF,
        None,
        True,
    )
    await driver.start("vm1")
    vbox.current_disk_file("vm1").write_bytes(b"second")
    live = await driver.snapshot_create("vm1", "live")
    assert live.has_memory and live.parent == "off"
    vbox.current_disk_file("vm1").write_bytes(b"third")

    await driver.snapshot_revert("vm1", "off")
    assert vbox.current_disk_file("vm1").read_bytes() == b"first"
    assert await driver.state("vm1") is VMState.SHUTOFF
    await driver.snapshot_revert("vm1", "live")
    assert vbox.current_disk_file("vm1").read_bytes() == b"second"
    assert await driver.state("vm1") is VMState.RUNNING
    listed = await driver.snapshot_list("vm1")
    assert [(s.name, s.parent, s.current) for s in listed] == [("off", None, False), ("live", "off", True)]
    assert base.read_bytes() == b"base image"


@pytest_twisted.ensureDeferred
async def test_deleting_a_parent_snapshot_keeps_its_child_restorable(vbox, base):
    driver = vbox.driver
    await driver.define(VMSpec(name="vm1", disk=str(base)))
    await driver.start("vm1")
    vbox.current_disk_file("vm1").write_bytes(b"parent")
    await driver.snapshot_create("vm1", "parent")
    vbox.current_disk_file("vm1").write_bytes(b"child")
    await driver.snapshot_create("vm1", "child")
    vbox.current_disk_file("vm1").write_bytes(b"later")
    await driver.snapshot_delete("vm1", "parent")  # on the running VM
    assert [(s.name, s.parent) for s in await driver.snapshot_list("vm1")] == [("child", None)]
    await driver.snapshot_revert("vm1", "child")
    assert vbox.current_disk_file("vm1").read_bytes() == b"child"

    # A second child of "child": VirtualBox cannot merge a snapshot into two children.
    await driver.snapshot_create("vm1", "grandchild")
    await driver.snapshot_revert("vm1", "child")
    await driver.snapshot_create("vm1", "sibling")
    with pytest.raises(HypervisorError, match="at most one child"):
        await driver.snapshot_delete("vm1", "child")
    assert sorted(s.name for s in await driver.snapshot_list("vm1")) == ["child", "grandchild", "sibling"]


@pytest_twisted.ensureDeferred
async def test_undefine_deletes_the_vm_and_its_media_not_the_base(vbox, base):
    driver = vbox.driver
    await driver.define(VMSpec(name="vm1", disk=str(base)))
    await driver.start("vm1")
    await driver.snapshot_create("vm1", "s1")
    await driver.undefine("vm1")
    assert await driver.list_vms() == []
    assert not (driver.state_dir / "vm1").exists()
    assert list(vbox_model.medium_files(vbox.home).values()) == [str(base)]
    assert base.read_bytes() == b"base image"


@pytest_twisted.ensureDeferred
async def test_agent_endpoints(vbox, base):
    driver = vbox.driver
    await driver.define(VMSpec(name="vm1", disk=str(base), serial_ports=("agent",), nat_network=True))
    with pytest.raises(VMStateError):
        await driver.agent_endpoint("vm1")
    await driver.start("vm1")
    serial = await driver.agent_endpoint("vm1")
    assert isinstance(serial, UNIXClientEndpoint)
    assert (
        serial._path
        == machine(vbox, "vm1")["uarts"][1]["path"]
        == await driver.serial_socket_path("vm1", "agent")
    )
    tcp = await driver.agent_endpoint("vm1", "tcp")
    assert isinstance(tcp, TCP4ClientEndpoint) and tcp._host == "127.0.0.1"
    [rule] = machine(vbox, "vm1")["nic1"]["redirects"]
    _name, proto, host_ip, host_port, guest_ip, guest_port = rule.split(",")
    assert (proto, host_ip, int(host_port), guest_ip, int(guest_port)) == (
        "1",
        "127.0.0.1",
        tcp._port,
        "10.0.2.15",
        DEFAULT_AGENT_TCP_PORT,
    )
    again = await driver.agent_endpoint("vm1", "tcp")
    assert again._port == tcp._port and len(machine(vbox, "vm1")["nic1"]["redirects"]) == 1
    with pytest.raises(CapabilityUnsupported, match="virtio-serial"):
        await driver.agent_endpoint("vm1", "virtio-serial")


@pytest_twisted.ensureDeferred
async def test_errors(vbox, base):
    driver = vbox.driver
    with pytest.raises(VMNotFound, match="nope"):
        await driver.start("nope")
    await driver.define(VMSpec(name="vm1", disk=str(base)))
    with pytest.raises(VMAlreadyExists):
        await driver.define(VMSpec(name="vm1", disk=str(base)))
    with pytest.raises(VMStateError, match="only a running VM pauses"):
        await driver.pause("vm1")
    with pytest.raises(SnapshotNotFound, match="nope"):
        await driver.snapshot_revert("vm1", "nope")
    await driver.snapshot_create("vm1", "s1")
    with pytest.raises(HypervisorError, match="has a snapshot of that name"):
        await driver.snapshot_create("vm1", "s1")
    with pytest.raises(HypervisorError, match="does not exist"):
        await driver.define(VMSpec(name="vm2", disk=str(base) + ".missing"))
    assert await driver.list_vms() == ["vm1"]

    vbox.hold_session("vm1")
    with pytest.raises(VMLocked, match="another program holds"):
        await driver.start("vm1")
    assert await driver.state("vm1") is VMState.SHUTOFF
    vbox.release_session("vm1")
    await driver.start("vm1")
    with pytest.raises(VMStateError, match="runs already"):
        await driver.start("vm1")
    assert [s.name for s in await driver.snapshot_list("vm1")] == ["s1"]


@pytest_twisted.ensureDeferred
async def test_events(vbox, base):
    driver = vbox.driver
    pushed = Capability.PUSHED_EVENTS in driver.capabilities
    assert pushed == (driver.backend_name == "pyvbox")
    events: list[VMEvent] = []
    subscription = driver.subscribe(events.append, "vm1")
    await deferLater(reactor, 0.5, lambda: None)  # the poller's first look, the listener's registration

    async def expect(kind: VMEventType, state: VMState) -> None:
        await until(lambda: any(e.type is kind for e in events), f"a {kind.value} event")
        event = next(e for e in events if e.type is kind)
        assert (event.vm, event.state) == ("vm1", state)
        events.clear()

    await driver.define(VMSpec(name="vm1", disk=str(base)))
    await expect(VMEventType.DEFINED, VMState.SHUTOFF)
    await driver.start("vm1")
    await expect(VMEventType.STARTED, VMState.RUNNING)
    await driver.pause("vm1")
    await expect(VMEventType.PAUSED, VMState.PAUSED)
    await driver.resume("vm1")
    await expect(VMEventType.RESUMED, VMState.RUNNING)
    await driver.save_state("vm1")
    await expect(VMEventType.SAVED, VMState.SAVED)
    await driver.start("vm1")
    await expect(VMEventType.RESTORED, VMState.RUNNING)
    vbox.guest_powers_off("vm1")
    # Only pushed events tell who stopped the VM; a poller sees it shut off.
    await expect(VMEventType.GUEST_SHUTDOWN if pushed else VMEventType.SHUTOFF, VMState.SHUTOFF)
    await driver.start("vm1")
    await expect(VMEventType.STARTED, VMState.RUNNING)
    await driver.power_off("vm1")
    await expect(VMEventType.SHUTOFF, VMState.SHUTOFF)
    await driver.start("vm1")
    events.clear()
    vbox.vm_process_dies("vm1")
    await expect(VMEventType.CRASHED, VMState.CRASHED)
    await driver.wait_for_state("vm1", VMState.CRASHED, timeout=10)
    await driver.undefine("vm1")
    await expect(VMEventType.UNDEFINED, VMState.NOSTATE)
    subscription.cancel()


@pytest_twisted.ensureDeferred
async def test_backend_choice_is_logged_and_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "vboxmanage")
    home = tmp_path / "home"
    driver = VirtualBoxDriver(
        reactor, vboxmanage=str(VBOXMANAGE), vbox_user_home=str(home), state_dir=tmp_path / "vms"
    )
    with capturedLogs() as events:
        driver.startService()
    try:
        assert driver.backend_name == "vboxmanage"
        assert Capability.PUSHED_EVENTS not in driver.capabilities
        assert any(
            e.get("log_format", "").startswith("VirtualBox driver:")
            and e["backend"] == "vboxmanage"
            and BACKEND_ENV in e["reason"]
            for e in events
        )
        assert await driver.list_vms() == []
    finally:
        await driver.stopService()


@pytest_twisted.ensureDeferred
async def test_a_slow_virtualbox_call_does_not_block_the_reactor(tmp_path, base):
    vbox = virtualbox_pyvbox(reactor, tmp_path)
    try:
        await vbox.driver.define(VMSpec(name="vm1", disk=str(base)))
        import vboxapi  # the stand-in, put on sys.path by the factory

        release = vboxapi.hold_calls()
        try:
            starting = vbox.driver.start("vm1")
            ticks: list[int] = []
            for tick in range(5):
                await deferLater(reactor, 0.02, ticks.append, tick)
            assert ticks == [0, 1, 2, 3, 4] and not starting.called
        finally:
            release()
        await starting
        assert machine(vbox, "vm1")["state"] == vbox_model.RUNNING
    finally:
        await vbox.driver.stopService()


@pytest_twisted.ensureDeferred
async def test_virtualbox_missing(tmp_path):
    driver = VirtualBoxDriver(reactor, state_dir=tmp_path, **unavailable_options(tmp_path))
    driver.startService()
    try:
        assert driver.backend_name is None
        with pytest.raises(HypervisorUnavailable, match="install VirtualBox"):
            await driver.list_vms()
    finally:
        await driver.stopService()


@pytest_twisted.ensureDeferred
async def test_found_through_its_entry_point(tmp_path):
    driver = load_driver(
        "virtualbox",
        reactor,
        backend="vboxmanage",
        vboxmanage=str(VBOXMANAGE),
        vbox_user_home=str(tmp_path / "home"),
        state_dir=tmp_path / "vms",
    )
    assert isinstance(driver, VirtualBoxDriver) and verifyObject(IHypervisorDriver, driver)
    assert driver.capabilities >= {Capability.SNAPSHOTS, Capability.LIVE_SNAPSHOTS, Capability.SAVE_STATE}


@pytest_twisted.ensureDeferred
async def test_credentials_are_minted_at_define_and_removed_at_undefine(vbox, base):
    driver = vbox.driver
    await driver.define(VMSpec(name="vm1", disk=str(base)))
    await driver.define(VMSpec(name="vm2", disk=str(base)))
    host_end = await driver.agent_credentials("vm1")
    agent_end = driver.credentials.agent_credentials("vm1")
    assert host_end.peer_certificate == agent_end.certificate
    assert agent_end.peer_certificate == host_end.certificate
    assert (await driver.agent_credentials("vm2")).certificate != host_end.certificate
    await driver.undefine("vm1")
    with pytest.raises(VMNotFound):
        await driver.agent_credentials("vm1")
    assert not driver.credentials.exists("vm1") and driver.credentials.exists("vm2")


# -- the agent's credentials, provisioned as a guest property ------------------------------------


def guest_property(vbox: StandinVirtualBox, vm: str) -> dict | None:
    with vbox_model.transaction(vbox.home) as registry:
        return registry.guest_property(registry.find_machine(vm), VBOX_PROPERTY)


async def agent_reads_its_credentials(vbox: StandinVirtualBox, vm: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> Credentials:
    """What the agent in ``vm`` loads at boot, through the VBoxControl stand-in on the VM's properties."""
    monkeypatch.setenv("VBOX_USER_HOME", str(vbox.home))
    monkeypatch.setenv("VBOX_STANDIN_VM", vm)
    return await load_credentials(
        reactor,
        fw_cfg=str(tmp_path / "no-fw_cfg"),
        vboxcontrol=str(STANDINS / "VBoxControl"),
        rpctool=str(tmp_path / "no-vmware-rpctool"),
        run_copy=str(tmp_path / "run" / vm / "credentials"),
    )


@pytest_twisted.ensureDeferred
async def test_the_agent_s_end_is_a_guest_property_the_guest_reads_and_erases(
        vbox, base, tmp_path, monkeypatch):
    driver = vbox.driver
    await driver.define(VMSpec(name="vm1", disk=str(base)))
    assert guest_property(vbox, "vm1") is None  # not before the VM boots
    await driver.start("vm1")
    provisioned = guest_property(vbox, "vm1")
    assert provisioned is not None
    # Erasable by the guest (no RDONLYGUEST), gone at power off and reset, never saved.
    assert provisioned["flags"] == ["TRANSIENT", "TRANSRESET"]
    host_end = await driver.agent_credentials("vm1")
    agent_end = await agent_reads_its_credentials(vbox, "vm1", tmp_path, monkeypatch)
    assert agent_end.peer_certificate == host_end.certificate
    assert host_end.peer_certificate == agent_end.certificate
    assert host_end.private_key not in provisioned["value"].encode()  # the host's key stays on the host
    assert guest_property(vbox, "vm1") is None  # erased once read: no other guest process gets it


@pytest_twisted.ensureDeferred
async def test_the_property_goes_at_power_off_and_comes_back_at_each_boot(vbox, base, tmp_path, monkeypatch):
    driver = vbox.driver
    await driver.define(VMSpec(name="vm1", disk=str(base)))
    await driver.start("vm1")
    await driver.power_off("vm1")
    assert guest_property(vbox, "vm1") is None  # the agent never ran: VirtualBox dropped it
    await driver.start("vm1")
    await agent_reads_its_credentials(vbox, "vm1", tmp_path, monkeypatch)
    await driver.reset("vm1")  # the guest boots again, without its copy in /run
    assert guest_property(vbox, "vm1") is not None
    vbox_model.guest_reboots(vbox.home, "vm1")
    assert guest_property(vbox, "vm1") is None  # TRANSRESET: a reboot inside takes it away too


@pytest_twisted.ensureDeferred
async def test_a_vm_restored_from_its_saved_state_gets_no_property(vbox, base, tmp_path, monkeypatch):
    driver = vbox.driver
    await driver.define(VMSpec(name="vm1", disk=str(base)))
    await driver.start("vm1")
    await agent_reads_its_credentials(vbox, "vm1", tmp_path, monkeypatch)
    await driver.save_state("vm1")
    await driver.start("vm1")
    # Its agent kept them in memory: a property now would only wait for other guest processes.
    assert guest_property(vbox, "vm1") is None


@pytest_twisted.ensureDeferred
async def test_rotation_reaches_the_guest_at_its_next_boot_without_a_new_image(
        vbox, base, tmp_path, monkeypatch):
    driver = vbox.driver
    image = base.read_bytes()
    await driver.define(VMSpec(name="vm1", disk=str(base)))
    old = await driver.agent_credentials("vm1")
    await driver.rotate_credentials("vm1")
    new = await driver.agent_credentials("vm1")
    assert new.certificate != old.certificate and new.peer_certificate != old.peer_certificate
    await driver.start("vm1")
    agent_end = await agent_reads_its_credentials(vbox, "vm1", tmp_path, monkeypatch)
    assert agent_end.peer_certificate == new.certificate and agent_end.certificate == new.peer_certificate
    assert base.read_bytes() == image
    with pytest.raises(VMNotFound):
        await driver.rotate_credentials("no-such-vm")
