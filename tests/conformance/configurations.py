"""
The driver configurations the conformance suite runs on.

A :class:`DriverConfiguration` says how to get a driver (by its entry point, as users do),
how to make a :class:`~hypervisors.interface.VMSpec` for it, and what the suite needs beyond
the interface to prove effects: a :class:`DiskProbe` (write a marker onto a VM's disk, read it
back), a way to make the hypervisor unavailable, a way to hold a VM's lock. Where one of those
is impossible the configuration says why, and the checks that need it are skipped with that
reason.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hypervisors.interface import Capability, IHypervisorDriver, VMSpec

#: The marker's name on the disk (a file in the guest, a key of the fake's disk).
MARKER = "vmc-conformance-marker"


@dataclass(frozen=True)
class DiskProbe:
    """
    Writes a marker onto a VM's disk and reads it back, proving what a revert restored.

    :ivar write: ``write(driver, vm, data)``.
    :ivar read: ``read(driver, vm)``: the marker, or ``b""`` if there is none.
    :ivar needs_running: the probe works only while the VM runs (it goes through the guest's
        agent); otherwise in any state (it reads the disk from the host).
    """

    write: Callable[[Any, str, bytes], Coroutine[Any, Any, None]]
    read: Callable[[Any, str], Coroutine[Any, Any, bytes]]
    needs_running: bool = False


@dataclass(frozen=True)
class DriverConfiguration:
    """
    One driver, set up one way, as the conformance suite sees it.

    :ivar id: the test parameter's name.
    :ivar entry_point: the driver's name in the ``vmcontroller.hypervisors`` group.
    :ivar options: ``options(workdir)``: keyword arguments for ``load_driver``.
    :ivar spec: ``spec(name, workdir, **overrides)``: a VMSpec this driver can define.
    :ivar unavailable_options: ``unavailable_options(workdir)``: options that give a driver
        whose hypervisor is missing or not running, or ``None`` (then ``unavailable`` is called).
    :ivar make_unavailable: ``make_unavailable(driver)``: take a started driver's hypervisor
        away, for drivers that have no such option; returns a callable bringing it back.
    :ivar lock: ``lock(driver, vm)``: another program takes the VM's lock; returns a callable
        that releases it. ``None`` with ``no_lock`` saying why.
    :ivar disk_probe: see :class:`DiskProbe`; ``None`` with ``no_disk_probe`` saying why.
    :ivar agent_reachable: an agent answers behind ``agent_endpoint`` (a real guest, the fake).
    :ivar marks: pytest marks for all its checks (e.g. ``integration``).
    """

    id: str
    entry_point: str
    spec: Callable[..., VMSpec]
    options: Callable[[Path], Mapping[str, Any]] = lambda _workdir: {}
    unavailable_options: Callable[[Path], Mapping[str, Any]] | None = None
    make_unavailable: Callable[[Any], Callable[[], None]] | None = None
    no_unavailable: str = ""
    lock: Callable[[Any, str], Awaitable[Callable[[], Awaitable[None]]]] | None = None
    no_lock: str = ""
    disk_probe: DiskProbe | None = None
    no_disk_probe: str = ""
    agent_reachable: bool = False
    marks: tuple[pytest.MarkDecorator, ...] = field(default_factory=tuple)


# -- the in-memory fake, installed as a package of its own (tests/thirdparty_driver) -----------


def _fake_spec(name: str, workdir: Path, **overrides: Any) -> VMSpec:
    return VMSpec(name=name, disk=str(workdir / "base.qcow2"), **overrides)


async def _fake_write(driver: Any, vm: str, data: bytes) -> None:
    driver.vm(vm).disk[MARKER] = data


async def _fake_read(driver: Any, vm: str) -> bytes:
    data: bytes = driver.vm(vm).disk.get(MARKER, b"")
    return data


async def _fake_lock(driver: Any, vm: str) -> Callable[[], Awaitable[None]]:
    driver.lock(vm, "the conformance suite")

    async def release() -> None:
        driver.unlock(vm)

    return release


def _fake_unavailable(driver: Any) -> Callable[[], None]:
    driver.available = False

    def restore() -> None:
        driver.available = True

    return restore


def _fake(id: str, capabilities: frozenset[Capability] | None = None) -> DriverConfiguration:
    return DriverConfiguration(
        id=id,
        entry_point="thirdparty",
        spec=_fake_spec,
        options=lambda _workdir: {} if capabilities is None else {"capabilities": capabilities},
        make_unavailable=_fake_unavailable,
        lock=_fake_lock,
        disk_probe=DiskProbe(_fake_write, _fake_read),
        agent_reachable=True,
    )


THIRDPARTY = _fake("thirdparty")

#: The fake playing a product with no optional ability but the virtio-serial channel, so that
#: every capability check has a driver that lacks it.
THIRDPARTY_BARE = _fake("thirdparty-bare", frozenset({Capability.VIRTIO_SERIAL}))

CONFIGURATIONS: tuple[DriverConfiguration, ...] = (THIRDPARTY, THIRDPARTY_BARE)


def configuration_params() -> list[Any]:
    """
    The configurations as pytest parameters, with their marks; only those named in
    ``$VMC_CONFORMANCE_CONFIGURATIONS`` (comma-separated ids) if it is set.
    """
    chosen = os.environ.get("VMC_CONFORMANCE_CONFIGURATIONS")
    wanted = set(chosen.split(",")) if chosen else {c.id for c in CONFIGURATIONS}
    unknown = wanted - {c.id for c in CONFIGURATIONS}
    if unknown:
        raise ValueError(f"VMC_CONFORMANCE_CONFIGURATIONS names unknown configurations: {sorted(unknown)}")
    return [pytest.param(c, id=c.id, marks=c.marks) for c in CONFIGURATIONS if c.id in wanted]


__all__ = ["CONFIGURATIONS", "MARKER", "DiskProbe", "DriverConfiguration", "IHypervisorDriver"]
