"""
Fixtures of the conformance suite: ``harness`` gives each check a started driver of one
configuration (see :mod:`tests.conformance.configurations`) and removes the VMs it defined.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from zope.interface import implementer

from hypervisors import load_driver
from hypervisors.interface import Capability, ISubscription, VMEvent, VMEventType, VMSpec, VMState
from tests.conformance.configurations import DriverConfiguration, configuration_params
from tests.conftest import BootedVM
from vmcontroller.errors import HypervisorError

#: How long a check waits for an event or a state; polling drivers report within a second or two.
#: ``scripts/conformance-removal.sh`` shortens it, as it runs the suite with events missing.
EVENT_TIMEOUT = float(os.environ.get("VMC_CONFORMANCE_EVENT_TIMEOUT", "60"))

_serial = itertools.count()


class Harness:
    """A started driver of one configuration, and the VMs a check defined on it."""

    def __init__(
        self, configuration: DriverConfiguration, driver: Any, workdir: Path, real_guest: BootedVM | None
    ) -> None:
        self.configuration = configuration
        self.driver = driver
        self.workdir = workdir
        self.defined: list[str] = []
        self._image = real_guest.image if real_guest is not None else None
        #: The session's booted guest (tests/conftest.py) if this configuration boots real guests.
        self.shared_guest = real_guest.name if real_guest is not None else None

    def vm_name(self) -> str:
        # The integration conftest removes leftovers of dead sessions by this prefix and pid.
        return f"vmc-test-conf{next(_serial)}-{os.getpid()}"

    def spec(self, name: str | None = None, **overrides: Any) -> VMSpec:
        return self.configuration.spec(name or self.vm_name(), self.workdir, self._image, **overrides)

    async def define(self, name: str | None = None, **overrides: Any) -> str:
        spec = self.spec(name, **overrides)
        defined: str = await self.driver.define(spec)
        self.defined.append(defined)
        return defined

    async def running(self, **overrides: Any) -> str:
        """A VM of its own, defined and started."""
        name = await self.define(**overrides)
        await self.driver.start(name)
        return name

    async def settle(self) -> None:
        """
        Let a driver that polls (no :attr:`Capability.PUSHED_EVENTS`) take in the current
        states: a poller reports what changed between two polls, so a change made before its
        first poll after a subscription, or two changes within one poll, go unreported.
        """
        if Capability.PUSHED_EVENTS not in self.driver.capabilities:
            await deferLater(reactor, self.configuration.poll_settle, lambda: None)

    def require(self, capability: Capability) -> None:
        """Skip the check where the driver lacks ``capability`` (``test_capabilities`` covers that)."""
        if capability not in self.driver.capabilities:
            pytest.skip(
                f"{self.configuration.id} lacks {capability.value}; test_missing_capability_is_refused "
                "checks the error"
            )

    async def cleanup(self) -> None:
        for name in self.defined:
            with contextlib.suppress(HypervisorError):
                await self.driver.undefine(name)


@pytest.fixture(params=configuration_params())
def configuration(request: pytest.FixtureRequest) -> DriverConfiguration:
    config: DriverConfiguration = request.param
    return config


def start_driver(configuration: DriverConfiguration, options: dict[str, Any]) -> Any:
    """The configuration's driver, found through its entry point as users find it, started."""
    driver: Any = load_driver(configuration.entry_point, reactor, **options)
    for variable, make in ((REMOVE_VARIABLE, without_member), (HOLLOW_VARIABLE, with_hollow_member)):
        member = os.environ.get(variable)
        if member:
            driver.__class__ = make(type(driver), member)
    driver.startService()
    return driver


#: ``scripts/conformance-removal.sh`` sets these to an interface member: the drivers the suite
#: loads then lack it, or have it do nothing, and the suite must fail.
REMOVE_VARIABLE = "VMC_CONFORMANCE_REMOVE"
HOLLOW_VARIABLE = "VMC_CONFORMANCE_HOLLOW"


def without_member(cls: type, member: str) -> type:
    """A subclass of ``cls`` that lacks ``member`` (a method or an attribute): reading it fails."""

    def missing(self: object) -> Any:
        raise AttributeError(f"{member} removed by ${REMOVE_VARIABLE}")

    return type(cls.__name__, (cls,), {member: property(missing)})


@implementer(ISubscription)
class _NoSubscription:
    def cancel(self) -> None:
        pass


def with_hollow_member(cls: type, member: str) -> type:
    """
    A subclass of ``cls`` whose ``member`` does nothing: a method returns a Deferred that fires
    with ``None`` at once (``subscribe`` delivers nothing), ``name`` and ``capabilities`` are
    empty.
    """
    hollow: Any
    if member == "name":
        hollow = property(lambda self: "")
    elif member == "capabilities":
        hollow = property(lambda self: frozenset())
    elif member == "subscribe":
        hollow = lambda self, *args, **kwargs: _NoSubscription()  # noqa: E731
    else:
        hollow = lambda self, *args, **kwargs: succeed(None)  # noqa: E731
    return type(cls.__name__, (cls,), {member: hollow})


@pytest.fixture
def real_guest(configuration: DriverConfiguration, request: pytest.FixtureRequest) -> BootedVM | None:
    """
    The session's booted guest, for configurations on a real hypervisor; asked for here, out of
    the reactor's greenlet, as its fixtures block until the guest runs.
    """
    if not configuration.needs_guest_image:
        return None
    booted: BootedVM = request.getfixturevalue("booted_vm")
    return booted


@pytest_twisted.async_yield_fixture()
async def harness(configuration: DriverConfiguration, real_guest: BootedVM | None) -> AsyncIterator[Harness]:
    # Not pytest's tmp_path: the VMs' serial sockets live under it, and a unix socket's path
    # has at most 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="vmc-conf-"))
    driver = start_driver(configuration, dict(configuration.options(workdir)))
    h = Harness(configuration, driver, workdir, real_guest)
    try:
        yield h
    finally:
        await h.cleanup()
        await driver.stopService()
        shutil.rmtree(workdir, ignore_errors=True)


class EventRecorder:
    """Records the events of one subscription; :meth:`next` waits for one that matches."""

    def __init__(self, driver: Any, vm: str | None = None) -> None:
        self.events: list[VMEvent] = []
        self._arrived: Deferred[None] | None = None
        self._cursor: dict[str, int] = {}
        self.subscription = driver.subscribe(self._on_event, vm)

    def _on_event(self, event: VMEvent) -> None:
        self.events.append(event)
        arrived, self._arrived = self._arrived, None
        if arrived is not None:
            arrived.callback(None)

    async def next(self, vm: str, *types: VMEventType, timeout: float = EVENT_TIMEOUT) -> VMEvent:
        """
        The next event of ``vm`` of one of ``types`` after the one this returned last, waiting
        for it. Events of other types in between are passed over: hypervisors report more
        than the contract asks (libvirt's ``BLOCKED``, a ``RESUMED`` after ``STARTED``...).
        """
        deadline = reactor.seconds() + timeout
        while True:
            for index in range(self._cursor.get(vm, 0), len(self.events)):
                event = self.events[index]
                if event.vm == vm and event.type in types:
                    self._cursor[vm] = index + 1
                    return event
            left = deadline - reactor.seconds()
            if left <= 0:
                raise AssertionError(
                    f"no {'/'.join(t.value for t in types)} event of {vm} within {timeout:g} s; "
                    f"its events: {self.of(vm)}"
                )
            self._arrived = Deferred()
            with contextlib.suppress(Exception):
                await self._arrived.addTimeout(left, reactor)

    def of(self, vm: str) -> list[VMEvent]:
        """The events of ``vm`` received so far."""
        return [e for e in self.events if e.vm == vm]


async def expect_state(driver: Any, vm: str, state: VMState) -> None:
    """Wait for ``state`` (drivers that poll get there a little later), then check it."""
    await driver.wait_for_state(vm, state, timeout=EVENT_TIMEOUT)
    assert await driver.state(vm) is state
