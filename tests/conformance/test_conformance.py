"""
The contract of :class:`~hypervisors.interface.IHypervisorDriver`, checked on every driver
configuration (:mod:`tests.conformance.configurations`): each check drives the driver through
the interface only and proves the effect of what it asked for.

``@exercises(...)`` names the interface members a check drives; ``test_every_operation_is_exercised``
fails for a member that no check drives, so an operation added to the interface needs a check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface.verify import verifyObject

from guest_agent.protocol.tls import Credentials
from hypervisors import installed_drivers
from hypervisors.interface import Capability, IHypervisorDriver, SnapshotInfo, VMEventType, VMState
from tests.conformance.configurations import CONFIGURATIONS, DiskProbe
from tests.conformance.conftest import EventRecorder, Harness, expect_state, start_driver
from vmcontroller.client import connect
from vmcontroller.errors import (
    AuthenticationFailed,
    CapabilityUnsupported,
    HypervisorError,
    HypervisorUnavailable,
    SnapshotNotFound,
    VMAlreadyExists,
    VMLocked,
    VMNotFound,
    VMStateError,
    VMTimeout,
)

F = TypeVar("F", bound=Callable[..., Any])

#: Seconds to wait for a state the VM is in already.
EVENT_TIMEOUT_SHORT = 5.0

#: The interface members some check drives (filled by :func:`exercises`).
EXERCISED: set[str] = set()


def exercises(*names: str) -> Callable[[F], F]:
    """Record that the decorated check drives these interface members (and proves their effect)."""
    unknown = set(names) - set(IHypervisorDriver.names(all=True))
    assert not unknown, f"not members of IHypervisorDriver: {unknown}"
    EXERCISED.update(names)
    return lambda check: check


async def _fails_with(error: type[Exception], d: Deferred[Any] | Any) -> Exception:
    """Await ``d`` (a Deferred, or a call that may raise at once) and return its ``error``."""
    try:
        result = await d
    except error as e:
        return e
    raise AssertionError(f"expected {error.__name__}, got the result {result!r}")


async def _call_fails_with(error: type[Exception], call: Callable[[], Any]) -> Exception:
    try:
        d = call()
    except error as e:
        return e
    return await _fails_with(error, d)


# -- the suite covers the interface, every configuration provides it ---------------------------


def test_every_operation_is_exercised() -> None:
    missing = set(IHypervisorDriver.names(all=True)) - EXERCISED
    assert not missing, f"no conformance check drives {sorted(missing)}: add one"


def test_every_installed_driver_has_a_configuration() -> None:
    configured = {c.entry_point for c in CONFIGURATIONS}
    missing = set(installed_drivers()) - configured
    assert not missing, f"installed drivers the conformance suite does not run: {sorted(missing)}"


@exercises("name", "capabilities")
def test_provides_the_interface(harness: Harness) -> None:
    driver = harness.driver
    assert verifyObject(IHypervisorDriver, driver)
    # load_driver found it by this name: the driver says so itself.
    assert driver.name == harness.configuration.entry_point
    assert isinstance(driver.capabilities, frozenset)
    assert all(isinstance(c, Capability) for c in driver.capabilities)


# -- lifecycle, with its events ------------------------------------------------------------------


@exercises(
    "define", "start", "pause", "resume", "reset", "power_off", "state", "subscribe", "list_vms", "undefine"
)
@pytest_twisted.ensureDeferred
async def test_lifecycle_and_its_events(harness: Harness) -> None:
    driver = harness.driver
    everything = EventRecorder(driver)
    name = await harness.define()
    this_vm = EventRecorder(driver, name)
    await harness.settle()
    assert name in await driver.list_vms()
    assert await driver.state(name) is VMState.SHUTOFF

    steps: list[tuple[Callable[[str], Deferred[None]], tuple[VMEventType, ...], VMState]] = [
        (driver.start, (VMEventType.STARTED,), VMState.RUNNING),
        (driver.pause, (VMEventType.PAUSED,), VMState.PAUSED),
        (driver.resume, (VMEventType.RESUMED,), VMState.RUNNING),
        (driver.power_off, (VMEventType.SHUTOFF,), VMState.SHUTOFF),
    ]
    if Capability.PAUSE not in driver.capabilities:  # test_missing_capability_is_refused checks it
        del steps[1:3]
    for operation, types, state in steps:
        await operation(name)
        for recorder in (everything, this_vm):
            event = await recorder.next(name, *types)
            assert event.state is state, event
        assert await driver.state(name) is state

    # A reset keeps the VM running (its guest reboots); refused on a stopped VM.
    await _fails_with(VMStateError, driver.reset(name))
    await driver.start(name)
    await this_vm.next(name, VMEventType.STARTED)
    await driver.reset(name)
    await expect_state(driver, name, VMState.RUNNING)

    await driver.undefine(name)
    assert name not in await driver.list_vms()
    await _fails_with(VMNotFound, driver.state(name))
    for recorder in (everything, this_vm):
        event = await recorder.next(name, VMEventType.SHUTOFF, VMEventType.UNDEFINED)
        assert event.state in (VMState.SHUTOFF, VMState.NOSTATE)


@exercises("subscribe", "start", "power_off")
@pytest_twisted.ensureDeferred
async def test_events_are_per_vm_and_stop_when_cancelled(harness: Harness) -> None:
    driver = harness.driver
    first, second = await harness.define(), await harness.define()
    everything = EventRecorder(driver)
    of_first = EventRecorder(driver, first)
    of_second = EventRecorder(driver, second)
    await harness.settle()

    await driver.start(second)
    await everything.next(second, VMEventType.STARTED)
    await of_second.next(second, VMEventType.STARTED)
    await driver.start(first)
    await of_first.next(first, VMEventType.STARTED)
    await everything.next(first, VMEventType.STARTED)
    # The per-VM subscriptions saw only their own VM.
    assert {e.vm for e in of_first.events} == {first}
    assert {e.vm for e in of_second.events} == {second}

    of_second.subscription.cancel()
    of_second.subscription.cancel()  # Again: nothing happens.
    seen = len(of_second.events)
    await driver.power_off(second)
    await driver.power_off(first)
    await everything.next(second, VMEventType.SHUTOFF)
    await everything.next(first, VMEventType.SHUTOFF)
    await of_first.next(first, VMEventType.SHUTOFF)
    assert len(of_second.events) == seen, "a cancelled subscription still received events"


@exercises("shutdown")
@pytest_twisted.ensureDeferred
async def test_shutdown(harness: Harness) -> None:
    driver = harness.driver
    name = await harness.running()
    events = EventRecorder(driver, name)
    await harness.settle()
    if harness.configuration.boots is not None:
        # A guest reacts to the power button once its kernel has booted.
        await harness.configuration.boots(driver, name)
    await driver.shutdown(name, wait=True, timeout=300)
    assert await driver.state(name) is VMState.SHUTOFF
    # libvirt cannot tell a shutdown the host asked for from one the guest began.
    event = await events.next(name, VMEventType.SHUTOFF, VMEventType.GUEST_SHUTDOWN)
    assert event.state is VMState.SHUTOFF
    await _fails_with(VMStateError, driver.shutdown(name))


@exercises("wait_for_state")
@pytest_twisted.ensureDeferred
async def test_wait_for_state(harness: Harness) -> None:
    driver = harness.driver
    name = await harness.define()
    # At once when the VM is there already.
    await driver.wait_for_state(name, VMState.SHUTOFF, timeout=EVENT_TIMEOUT_SHORT)
    # Waiting before the change: fires with it.
    running = driver.wait_for_state(name, VMState.RUNNING, timeout=60)
    assert not running.called
    await driver.start(name)
    await running
    assert await driver.state(name) is VMState.RUNNING
    # Never reached: VMTimeout, naming the VM.
    error = await _fails_with(VMTimeout, driver.wait_for_state(name, VMState.PAUSED, timeout=1))
    assert name in str(error)
    await _fails_with(VMNotFound, driver.wait_for_state("vmc-test-no-such-vm", VMState.RUNNING, timeout=5))


# -- checkpoints ------------------------------------------------------------------------------------


@exercises("save_state", "start")
@pytest_twisted.ensureDeferred
async def test_save_state_and_start_again(harness: Harness) -> None:
    harness.require(Capability.SAVE_STATE)
    driver = harness.driver
    name = await harness.running()
    events = EventRecorder(driver, name)
    await harness.settle()
    await driver.save_state(name)
    assert (await events.next(name, VMEventType.SAVED)).state is VMState.SAVED
    assert await driver.state(name) is VMState.SAVED
    await _fails_with(VMStateError, driver.save_state(name))
    await driver.start(name)
    # Restored from the checkpoint, not booted afresh.
    assert (await events.next(name, VMEventType.RESTORED)).state is VMState.RUNNING
    assert await driver.state(name) is VMState.RUNNING

    if Capability.PAUSE in driver.capabilities:
        # From paused too.
        await driver.pause(name)
        await expect_state(driver, name, VMState.PAUSED)
        await driver.save_state(name)
        await expect_state(driver, name, VMState.SAVED)


# -- snapshots --------------------------------------------------------------------------------------


def _probe(harness: Harness, online: bool) -> DiskProbe:
    """The configuration's disk probe for a running (``online``) or shut-off VM, or skip."""
    configuration = harness.configuration
    probe = configuration.online_probe if online else configuration.offline_probe
    if probe is None:
        pytest.skip(f"{configuration.id} cannot read a VM's disk: {configuration.no_disk_probe}")
    return probe


@exercises("snapshot_create", "snapshot_list", "snapshot_revert", "snapshot_delete")
@pytest_twisted.ensureDeferred
async def test_snapshot_tree(harness: Harness) -> None:
    harness.require(Capability.SNAPSHOTS)
    driver = harness.driver
    name = await harness.define()
    assert await driver.snapshot_list(name) == []
    parent = await driver.snapshot_create(name, "parent", "the first")
    assert isinstance(parent, SnapshotInfo)
    assert (parent.name, parent.description, parent.state, parent.has_memory) == (
        "parent",
        "the first",
        VMState.SHUTOFF,
        False,
    )
    child = await driver.snapshot_create(name, "child")
    assert child.parent == "parent"
    listed = await driver.snapshot_list(name)
    assert [s.name for s in listed] == ["parent", "child"]
    assert [s.current for s in listed] == [False, True]

    await driver.snapshot_revert(name, "parent")
    assert [s.current for s in await driver.snapshot_list(name)] == [True, False]
    assert await driver.state(name) is VMState.SHUTOFF

    await driver.snapshot_delete(name, "parent")
    (only,) = await driver.snapshot_list(name)
    assert (only.name, only.parent) == ("child", None)
    await driver.snapshot_revert(name, "child")
    assert (await driver.snapshot_list(name))[0].current


@exercises("snapshot_create", "snapshot_revert", "snapshot_delete")
@pytest_twisted.ensureDeferred
async def test_revert_restores_the_disk_offline(harness: Harness) -> None:
    harness.require(Capability.SNAPSHOTS)
    probe = _probe(harness, online=False)
    driver = harness.driver
    name = await harness.define()
    await probe.write(driver, name, b"before the snapshot")
    await driver.snapshot_create(name, "offline")
    await probe.write(driver, name, b"after the snapshot")
    assert await probe.read(driver, name) == b"after the snapshot"
    await driver.snapshot_revert(name, "offline")
    assert await probe.read(driver, name) == b"before the snapshot"
    assert await driver.state(name) is VMState.SHUTOFF


@exercises("snapshot_create", "snapshot_revert", "snapshot_delete")
@pytest_twisted.ensureDeferred
async def test_revert_restores_the_disk_online(harness: Harness) -> None:
    harness.require(Capability.LIVE_SNAPSHOTS)
    probe = _probe(harness, online=True)
    driver = harness.driver
    name = await harness.running()
    await probe.write(driver, name, b"before the snapshot")
    online = await driver.snapshot_create(name, "online")
    assert online.has_memory and online.state is VMState.RUNNING
    await probe.write(driver, name, b"after the snapshot")
    assert await probe.read(driver, name) == b"after the snapshot"
    await driver.snapshot_revert(name, "online")
    # Taken while running: the VM runs again, where it was.
    await expect_state(driver, name, VMState.RUNNING)
    assert await probe.read(driver, name) == b"before the snapshot"


@exercises("snapshot_create", "snapshot_revert", "snapshot_delete")
@pytest_twisted.ensureDeferred
async def test_revert_to_a_child_after_its_parent_was_deleted(harness: Harness) -> None:
    harness.require(Capability.SNAPSHOTS)
    probe = _probe(harness, online=False)
    driver = harness.driver
    name = await harness.define()
    await probe.write(driver, name, b"in the parent")
    await driver.snapshot_create(name, "parent")
    await probe.write(driver, name, b"in the child")
    await driver.snapshot_create(name, "child")
    await probe.write(driver, name, b"after both")
    await driver.snapshot_delete(name, "parent")
    await driver.snapshot_revert(name, "child")
    assert await probe.read(driver, name) == b"in the child"
    await _fails_with(SnapshotNotFound, driver.snapshot_revert(name, "parent"))


# -- the agent's channel and port forwards ---------------------------------------------------------


#: The capability behind each agent transport ("auto" takes virtio-serial first).
_TRANSPORTS = {
    "virtio-serial": Capability.VIRTIO_SERIAL,
    "serial": Capability.SERIAL_PORTS,
    "tcp": Capability.PORT_FORWARD,
}


@exercises("agent_endpoint")
@pytest_twisted.ensureDeferred
async def test_agent_endpoint(harness: Harness) -> None:
    driver = harness.driver
    transport = harness.spec().agent_transport
    harness.require(_TRANSPORTS.get(transport, Capability.VIRTIO_SERIAL))
    name = await harness.define()
    await _fails_with(VMStateError, driver.agent_endpoint(name))
    await driver.start(name)
    endpoint = await driver.agent_endpoint(name)
    assert IStreamClientEndpoint.providedBy(endpoint)
    # A real guest takes a while to boot: talk to the session's, booted once for all tests.
    booted = harness.shared_guest
    if booted is not None:
        endpoint = await driver.agent_endpoint(booted)
    assert IStreamClientEndpoint.providedBy(endpoint)
    if not harness.configuration.agent_reachable:
        pytest.skip(f"no agent runs behind {harness.configuration.id}'s channel")
    reached = booted or name
    # Another VM's credentials are refused: the agent behind the endpoint is this VM's.
    stranger = await harness.define()
    error = await _fails_with(
        AuthenticationFailed,
        connect(reactor, endpoint, credentials=await driver.agent_credentials(stranger), timeout=600),
    )
    assert "not the one pinned for this VM" in str(error)
    credentials = await driver.agent_credentials(reached)
    client = await connect(reactor, endpoint, credentials=credentials, timeout=600)
    try:
        answer = await client.ping()
        assert "version" in answer and client.authenticated
    finally:
        await client.close()


@exercises("agent_credentials")
@pytest_twisted.ensureDeferred
async def test_agent_credentials_are_per_vm_and_go_with_it(harness: Harness) -> None:
    driver = harness.driver
    name = await harness.define()
    other = await harness.define()
    first = await driver.agent_credentials(name)
    assert isinstance(first, Credentials) and first.private_key and first.peer_certificate
    assert await driver.agent_credentials(name) == first  # kept, not minted at each call
    assert (await driver.agent_credentials(other)).certificate != first.certificate
    await driver.undefine(name)
    error = await _fails_with(VMNotFound, driver.agent_credentials(name))
    assert name in str(error)
    # A VM defined again under the name is another VM: what pinned the old one is refused.
    await harness.define(name)
    again = await driver.agent_credentials(name)
    assert again.certificate != first.certificate and again.peer_certificate != first.peer_certificate


@exercises("forward_port")
@pytest_twisted.ensureDeferred
async def test_forward_port(harness: Harness) -> None:
    harness.require(Capability.PORT_FORWARD)
    driver = harness.driver
    name = await harness.define(nat_network=True)
    await _fails_with(VMStateError, driver.forward_port(name, 9000))
    await driver.start(name)
    first = await driver.forward_port(name, 9000)
    second = await driver.forward_port(name, 22)
    assert 0 < first < 65536 and 0 < second < 65536 and first != second
    without_nat = await harness.running()
    await _fails_with(HypervisorError, driver.forward_port(without_nat, 9000))


# -- errors -----------------------------------------------------------------------------------------

_UNKNOWN = "vmc-test-no-such-vm"

#: Every operation on a VM, called on one that does not exist.
_ON_UNKNOWN_VM: dict[str, Callable[[Any], Any]] = {
    "start": lambda d: d.start(_UNKNOWN),
    "shutdown": lambda d: d.shutdown(_UNKNOWN),
    "power_off": lambda d: d.power_off(_UNKNOWN),
    "pause": lambda d: d.pause(_UNKNOWN),
    "resume": lambda d: d.resume(_UNKNOWN),
    "reset": lambda d: d.reset(_UNKNOWN),
    "save_state": lambda d: d.save_state(_UNKNOWN),
    "state": lambda d: d.state(_UNKNOWN),
    "snapshot_create": lambda d: d.snapshot_create(_UNKNOWN, "s"),
    "snapshot_list": lambda d: d.snapshot_list(_UNKNOWN),
    "snapshot_revert": lambda d: d.snapshot_revert(_UNKNOWN, "s"),
    "snapshot_delete": lambda d: d.snapshot_delete(_UNKNOWN, "s"),
    "undefine": lambda d: d.undefine(_UNKNOWN),
    "agent_endpoint": lambda d: d.agent_endpoint(_UNKNOWN),
    "agent_credentials": lambda d: d.agent_credentials(_UNKNOWN),
    "forward_port": lambda d: d.forward_port(_UNKNOWN, 9000),
}


@pytest.mark.parametrize("operation", sorted(_ON_UNKNOWN_VM))
@pytest_twisted.ensureDeferred
async def test_unknown_vm(harness: Harness, operation: str) -> None:
    capability = {
        "save_state": Capability.SAVE_STATE,
        "forward_port": Capability.PORT_FORWARD,
        "pause": Capability.PAUSE,
        "resume": Capability.PAUSE,
        **dict.fromkeys(
            ("snapshot_create", "snapshot_list", "snapshot_revert", "snapshot_delete"), Capability.SNAPSHOTS
        ),
    }.get(operation)
    if capability is not None:
        harness.require(capability)
    error = await _call_fails_with(VMNotFound, lambda: _ON_UNKNOWN_VM[operation](harness.driver))
    assert _UNKNOWN in str(error)


@exercises("start", "pause", "resume")
@pytest_twisted.ensureDeferred
async def test_wrong_state(harness: Harness) -> None:
    driver = harness.driver
    name = await harness.define()
    pauses = Capability.PAUSE in driver.capabilities
    for refused in (driver.pause, driver.resume, driver.power_off) if pauses else (driver.power_off,):
        await _fails_with(VMStateError, refused(name))
    assert await driver.state(name) is VMState.SHUTOFF
    await driver.start(name)
    for refused in (driver.start, driver.resume) if pauses else (driver.start,):
        await _fails_with(VMStateError, refused(name))
    assert await driver.state(name) is VMState.RUNNING


@pytest_twisted.ensureDeferred
async def test_unknown_snapshot(harness: Harness) -> None:
    harness.require(Capability.SNAPSHOTS)
    driver = harness.driver
    name = await harness.define()
    await driver.snapshot_create(name, "kept")
    for operation in (driver.snapshot_revert, driver.snapshot_delete):
        error = await _fails_with(SnapshotNotFound, operation(name, "no-such-snapshot"))
        assert "no-such-snapshot" in str(error)
    assert [s.name for s in await driver.snapshot_list(name)] == ["kept"]


@exercises("define")
@pytest_twisted.ensureDeferred
async def test_name_taken(harness: Harness) -> None:
    driver = harness.driver
    name = await harness.define()
    await driver.start(name)
    error = await _fails_with(VMAlreadyExists, driver.define(harness.spec(name, memory_mib=256)))
    assert name in str(error)
    # The VM that had the name is untouched.
    assert await driver.state(name) is VMState.RUNNING
    assert (await driver.list_vms()).count(name) == 1


@exercises("list_vms", "define")
@pytest_twisted.ensureDeferred
async def test_hypervisor_unavailable(harness: Harness) -> None:
    configuration = harness.configuration
    if configuration.unavailable_options is not None:
        driver = start_driver(configuration, dict(configuration.unavailable_options(harness.workdir)))
        try:
            try:
                name = await driver.define(harness.spec())
            except HypervisorUnavailable:
                pass
            else:
                # Defining may be files only (VMware's .vmx); starting needs the hypervisor.
                await _fails_with(HypervisorUnavailable, driver.start(name))
        finally:
            await driver.stopService()
    elif configuration.make_unavailable is not None:
        name = await harness.define()
        restore = configuration.make_unavailable(harness.driver)
        try:
            await _fails_with(HypervisorUnavailable, harness.driver.list_vms())
            await _fails_with(HypervisorUnavailable, harness.driver.start(name))
        finally:
            restore()
        # Back: the VM is still there, untouched.
        assert await harness.driver.state(name) is VMState.SHUTOFF
    else:
        pytest.skip(f"{configuration.id}: {configuration.no_unavailable}")


@pytest_twisted.ensureDeferred
async def test_locked_vm(harness: Harness) -> None:
    configuration = harness.configuration
    if configuration.lock is None:
        pytest.skip(f"{configuration.id}: {configuration.no_lock}")
    driver = harness.driver
    name = await harness.define()
    release = await configuration.lock(driver, name)
    try:
        error = await _fails_with(VMLocked, driver.start(name))
        assert name in str(error)
        assert await driver.state(name) is VMState.SHUTOFF
    finally:
        await release()
    await driver.start(name)
    await expect_state(driver, name, VMState.RUNNING)


# -- capabilities -----------------------------------------------------------------------------------

#: For each optional capability, a call that needs it on a VM set up for it.
_NEEDS: dict[Capability, tuple[bool, dict[str, Any], Callable[[Any, str], Any]]] = {
    # capability: (VM running?, spec overrides, the call)
    Capability.SNAPSHOTS: (False, {}, lambda d, vm: d.snapshot_create(vm, "s")),
    Capability.LIVE_SNAPSHOTS: (True, {}, lambda d, vm: d.snapshot_create(vm, "s")),
    Capability.SAVE_STATE: (True, {}, lambda d, vm: d.save_state(vm)),
    Capability.PORT_FORWARD: (True, {"nat_network": True}, lambda d, vm: d.forward_port(vm, 9000)),
    Capability.SERIAL_PORTS: (
        True,
        {"serial_ports": ("agent",)},
        lambda d, vm: d.agent_endpoint(vm, "serial"),
    ),
    Capability.VIRTIO_SERIAL: (True, {}, lambda d, vm: d.agent_endpoint(vm, "virtio-serial")),
    Capability.PAUSE: (True, {}, lambda d, vm: d.pause(vm)),
}

_CAPABILITY_PARAMS = [pytest.param(c, id=c.value) for c in _NEEDS]


@pytest.mark.parametrize("capability", _CAPABILITY_PARAMS)
@pytest_twisted.ensureDeferred
async def test_missing_capability_is_refused(harness: Harness, capability: Capability) -> None:
    driver = harness.driver
    if capability in driver.capabilities:
        pytest.skip(f"{harness.configuration.id} has {capability.value}; the other checks use it")
    running, overrides, call = _NEEDS[capability]
    name = harness.vm_name()

    async def attempt() -> None:
        # A driver may refuse already the spec that asks for it (a serial port, a NAT card).
        await harness.define(name=name, **overrides)
        if running:
            await driver.start(name)
        await call(driver, name)

    error = await _fails_with(CapabilityUnsupported, Deferred.fromCoroutine(attempt()))
    assert isinstance(error, CapabilityUnsupported)
    assert error.driver == driver.name and driver.name in str(error)
    assert error.capability == capability.value
    if name in await driver.list_vms():
        # Refused at the call: the VM is as it was.
        assert await driver.state(name) is (VMState.RUNNING if running else VMState.SHUTOFF)
    else:
        # Refused at define: the call itself must refuse too, on a VM without the feature.
        plain = await (harness.running if running else harness.define)()
        error = await _call_fails_with(CapabilityUnsupported, lambda: call(driver, plain))
        assert isinstance(error, CapabilityUnsupported) and error.capability == capability.value


@pytest.mark.parametrize("capability", _CAPABILITY_PARAMS)
@pytest_twisted.ensureDeferred
async def test_declared_capability_works(harness: Harness, capability: Capability) -> None:
    driver = harness.driver
    harness.require(capability)
    running, overrides, call = _NEEDS[capability]
    name = await (harness.running if running else harness.define)(**overrides)
    await call(driver, name)


# -- several VMs at once ----------------------------------------------------------------------------


@exercises("define", "start", "pause", "state")
@pytest_twisted.ensureDeferred
async def test_concurrent_calls_on_several_vms(harness: Harness) -> None:
    driver = harness.driver
    specs = [harness.spec() for _ in range(3)]
    names = await gatherResults([driver.define(spec) for spec in specs])
    harness.defined.extend(names)
    assert names == [spec.name for spec in specs]
    await gatherResults([driver.start(name) for name in names])
    # Different operations at once, each on its own VM.
    first, first_state = (
        (driver.pause, VMState.PAUSED) if Capability.PAUSE in driver.capabilities
        else (driver.reset, VMState.RUNNING)
    )
    await gatherResults([first(names[0]), driver.power_off(names[1]), driver.reset(names[2])])
    states = await gatherResults([driver.state(name) for name in names])
    assert states == [first_state, VMState.SHUTOFF, VMState.RUNNING]
    probe = harness.configuration.offline_probe
    if probe is not None:
        # Each VM's disk is its own: markers written at once each land on their VM.
        await driver.power_off(names[0])
        await driver.power_off(names[2])
        await gatherResults([ensureDeferred(probe.write(driver, n, n.encode())) for n in names])
        assert [await probe.read(driver, n) for n in names] == [n.encode() for n in names]


def test_configurations_are_distinct() -> None:
    ids = [c.id for c in CONFIGURATIONS]
    assert len(ids) == len(set(ids))
