"""
The libvirt driver on libvirt's simulated hypervisor (``test:///default``, in this process, no
libvirtd, no VM): events through libvirt's event loop on the real reactor, only for our VMs;
checkpoints; wait_for_state without polling; the reactor serving while a libvirt call blocks;
the capabilities the test driver lacks.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread

from hypervisors.interface import Capability, VMEvent, VMEventType, VMSpec, VMState
from hypervisors.libvirt import LibvirtDriver
from hypervisors.libvirt.xml import METADATA_NS
from vmcontroller.errors import (
    CapabilityUnsupported,
    SnapshotNotFound,
    VMAlreadyExists,
    VMNotFound,
    VMStateError,
)

URI = "test:///default"


@pytest.fixture(scope="module")
def base_disk(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("base") / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return str(path)


@pytest_twisted.async_yield_fixture()
async def driver(tmp_path: Path) -> AsyncIterator[LibvirtDriver]:
    driver = LibvirtDriver(reactor, uri=URI, state_dir=tmp_path / "vms")
    driver.startService()
    yield driver
    for name in await driver.list_vms():
        await driver.undefine(name)
    await driver.stopService()


def spec(base_disk: str, name: str = "vmc-local-1", **overrides: Any) -> VMSpec:
    return VMSpec(name=name, disk=base_disk, **overrides)


async def settle() -> None:
    """Let libvirt's queued events reach the reactor (the test driver dispatches them by a timer)."""
    for _ in range(5):
        await deferLater(reactor, 0.05, lambda: None)


def in_raw_connection(fn: Any) -> Deferred[Any]:
    """Run ``fn(conn)`` on a libvirt connection of its own, as another program would, off the reactor."""

    def work() -> Any:
        conn = libvirt.open(URI)
        try:
            return fn(conn)
        finally:
            conn.close()

    return deferToThread(work)


@pytest_twisted.ensureDeferred
async def test_every_state_change_arrives_as_an_event_in_order(driver: LibvirtDriver, base_disk: str) -> None:
    events: list[VMEvent] = []
    driver.subscribe(events.append)
    name = await driver.define(spec(base_disk))
    await driver.start(name)
    await driver.pause(name)
    await driver.resume(name)
    await driver.save_state(name)
    assert await driver.state(name) is VMState.SAVED
    await driver.start(name)
    await driver.power_off(name)
    await driver.undefine(name)
    await settle()
    assert [(e.vm, e.type, e.state) for e in events] == [
        (name, VMEventType.DEFINED, VMState.SHUTOFF),
        (name, VMEventType.STARTED, VMState.RUNNING),
        (name, VMEventType.PAUSED, VMState.PAUSED),
        (name, VMEventType.RESUMED, VMState.RUNNING),
        (name, VMEventType.SAVED, VMState.SAVED),
        (name, VMEventType.RESTORED, VMState.RUNNING),
        (name, VMEventType.SHUTOFF, VMState.SHUTOFF),
        (name, VMEventType.UNDEFINED, VMState.NOSTATE),
    ]


@pytest_twisted.ensureDeferred
async def test_lifecycle_and_snapshots(driver: LibvirtDriver, base_disk: str) -> None:
    name = await driver.define(spec(base_disk))
    with pytest.raises(VMStateError):
        await driver.power_off(name)
    await driver.start(name)
    with pytest.raises(VMStateError):
        await driver.start(name)
    running = await driver.snapshot_create(name, "running")
    assert (running.state, running.has_memory) == (VMState.RUNNING, True)
    await driver.shutdown(name, wait=True, timeout=10)
    assert await driver.state(name) is VMState.SHUTOFF
    offline = await driver.snapshot_create(name, "offline")
    assert (offline.state, offline.parent) == (VMState.SHUTOFF, "running")
    assert [(s.name, s.current) for s in await driver.snapshot_list(name)] == [
        ("running", False),
        ("offline", True),
    ]
    await driver.snapshot_revert(name, "running")
    assert await driver.state(name) is VMState.RUNNING
    with pytest.raises(SnapshotNotFound):
        await driver.snapshot_revert(name, "nope")
    await driver.snapshot_delete(name, "running")
    assert [s.name for s in await driver.snapshot_list(name)] == ["offline"]
    await driver.reset(name)
    await driver.power_off(name)
    assert await driver.state(name) is VMState.SHUTOFF
    with pytest.raises(VMAlreadyExists):
        await driver.define(spec(base_disk))
    await driver.undefine(name)
    with pytest.raises(VMNotFound):
        await driver.state(name)


@pytest_twisted.ensureDeferred
async def test_save_state_and_start_again(driver: LibvirtDriver, base_disk: str) -> None:
    name = await driver.define(spec(base_disk))
    with pytest.raises(VMStateError):
        await driver.save_state(name)
    await driver.start(name)
    await driver.save_state(name)
    assert await driver.state(name) is VMState.SAVED
    assert await in_raw_connection(lambda c: c.lookupByName(name).hasManagedSaveImage(0)) == 1
    await driver.start(name)
    assert await driver.state(name) is VMState.RUNNING
    assert await in_raw_connection(lambda c: c.lookupByName(name).hasManagedSaveImage(0)) == 0


@pytest_twisted.ensureDeferred
async def test_events_of_domains_defined_elsewhere(driver: LibvirtDriver, base_disk: str) -> None:
    """Ours by the metadata, whoever defined them; other domains are not reported."""
    events: list[VMEvent] = []
    driver.subscribe(events.append)
    foreign_xml = (
        "<domain type='test'><name>not-ours</name><memory>65536</memory><os><type>hvm</type></os></domain>"
    )
    ours_xml = foreign_xml.replace("not-ours", "vmc-local-other").replace(
        "<memory>",
        f"<metadata><v:vm xmlns:v='{METADATA_NS}'/></metadata><memory>",
    )

    def define_and_start(conn: libvirt.virConnect) -> None:
        for xml in (foreign_xml, ours_xml):
            conn.defineXML(xml).create()

    def remove(conn: libvirt.virConnect) -> None:
        for vm in ("not-ours", "vmc-local-other"):
            domain = conn.lookupByName(vm)
            domain.destroy()
            domain.undefine()

    assert await driver.list_vms() == []  # connected: events flow from here on
    await in_raw_connection(define_and_start)
    try:
        await settle()
        assert [(e.vm, e.type) for e in events] == [
            ("vmc-local-other", VMEventType.DEFINED),
            ("vmc-local-other", VMEventType.STARTED),
        ]
    finally:
        await in_raw_connection(remove)


@pytest_twisted.ensureDeferred
async def test_wait_for_state_asks_libvirt_once_and_then_only_listens(
    driver: LibvirtDriver, base_disk: str
) -> None:
    name = await driver.define(spec(base_disk))
    await driver.start(name)
    pool_calls: list[Any] = []
    submit = driver._pool.callInThreadWithCallback

    def counted(*args: Any, **kwargs: Any) -> None:
        pool_calls.append(args)
        submit(*args, **kwargs)

    driver._pool.callInThreadWithCallback = counted  # type: ignore[method-assign]
    waiting = driver.wait_for_state(name, VMState.PAUSED, timeout=60)
    await deferLater(reactor, 3, lambda: None)
    assert not waiting.called
    assert len(pool_calls) == 1  # the one state query, nothing since
    # Paused by another program: the event alone ends the wait.
    await in_raw_connection(lambda c: c.lookupByName(name).suspend())
    await waiting
    assert len(pool_calls) == 1


@pytest_twisted.ensureDeferred
async def test_the_reactor_serves_while_a_libvirt_call_blocks(driver: LibvirtDriver, base_disk: str) -> None:
    name = await driver.define(spec(base_disk))
    ticks: list[float] = []
    ticker = LoopingCall(lambda: ticks.append(reactor.seconds()))
    ticker.start(0.05)
    release = Deferred[None]()
    blocking = []

    def slow(conn: libvirt.virConnect) -> int:
        # A libvirt call stuck in the pool (as on a busy libvirtd) until the test lets it go.
        blocking.append(True)
        while not release.called:
            time.sleep(0.01)
        return conn.getLibVersion()

    try:
        slow_call = driver._in_pool(slow, action="a slow call")
        while not blocking:
            await deferLater(reactor, 0.01, lambda: None)
        before = len(ticks)
        # Another call of the driver goes through meanwhile, and the reactor keeps ticking.
        assert await driver.state(name) is VMState.SHUTOFF
        await deferLater(reactor, 0.3, lambda: None)
        assert not slow_call.called
        assert len(ticks) > before
        release.callback(None)
        assert await slow_call > 0
    finally:
        ticker.stop()


@pytest_twisted.ensureDeferred
async def test_two_drivers_get_the_same_events(driver: LibvirtDriver, base_disk: str, tmp_path: Path) -> None:
    other = LibvirtDriver(reactor, uri=URI, state_dir=tmp_path / "vms")
    other.startService()
    try:
        seen: list[VMEventType] = []
        other.subscribe(lambda e: seen.append(e.type), "vmc-local-1")
        name = await driver.define(spec(base_disk))
        await driver.start(name)
        await other.wait_for_state(name, VMState.RUNNING, timeout=10)
        await settle()
        assert seen == [VMEventType.DEFINED, VMEventType.STARTED]
    finally:
        await other.stopService()
    # Stopping one leaves the other's events flowing.
    mine: list[VMEventType] = []
    driver.subscribe(lambda e: mine.append(e.type))
    await driver.pause(name)
    await settle()
    assert mine == [VMEventType.PAUSED]


@pytest_twisted.ensureDeferred
async def test_what_the_test_driver_cannot_do_fails_clearly(driver: LibvirtDriver, base_disk: str) -> None:
    assert driver.capabilities == {
        Capability.SNAPSHOTS,
        Capability.LIVE_SNAPSHOTS,
        Capability.SAVE_STATE,
        Capability.PUSHED_EVENTS,
        Capability.PAUSE,
    }
    name = await driver.define(spec(base_disk))
    await driver.start(name)
    with pytest.raises(CapabilityUnsupported, match="the libvirt driver cannot do virtio-serial"):
        await driver.agent_endpoint(name)
    with pytest.raises(CapabilityUnsupported, match="port-forward"):
        await driver.agent_endpoint(name, "tcp")
    with pytest.raises(CapabilityUnsupported, match="port-forward"):
        await driver.forward_port(name, 22)
    for overrides in ({"serial_ports": ("a",)}, {"nat_network": True}, {"cpu_cap_percent": 50}):
        with pytest.raises(CapabilityUnsupported):
            await driver.define(spec(base_disk, "vmc-local-2", **overrides))
    assert await driver.list_vms() == [name]


@pytest_twisted.ensureDeferred
async def test_changes_missed_while_disconnected_are_reported_after_reconnecting(
    driver: LibvirtDriver, base_disk: str
) -> None:
    name = await driver.define(spec(base_disk))
    await driver.start(name)
    await settle()
    # Another connection keeps the simulated hypervisor (and its domains) while the driver's is gone.
    raw = await deferToThread(libvirt.open, URI)
    try:
        events: list[VMEvent] = []
        driver.subscribe(events.append, name)
        await deferToThread(driver._close_connection)
        await deferToThread(lambda: raw.lookupByName(name).suspend())
        await settle()
        assert events == []
        assert await driver.state(name) is VMState.PAUSED  # the driver connects again
        await settle()
        assert [(e.type, e.state, e.detail) for e in events] == [
            (VMEventType.PAUSED, VMState.PAUSED, "seen after reconnecting")
        ]
        # And the new connection has events again.
        await driver.resume(name)
        await settle()
        assert [e.type for e in events][1:] == [VMEventType.RESUMED]
    finally:
        await deferToThread(raw.close)
