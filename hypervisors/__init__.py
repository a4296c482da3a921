"""
Hypervisor drivers and the way to find them.

Drivers register under the ``vmcontroller.hypervisors`` entry-point group; :func:`load_driver`
finds one by name. Each driver is a :class:`twisted.application.service.IService`: start it
(``startService()``, or add it to a running ``MultiService``) before use and stop it after.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from hypervisors.interface import (
    DEFAULT_AGENT_CHANNEL,
    Accel,
    IHypervisorDriver,
    SnapshotInfo,
    VMSpec,
    VMState,
)
from vmcontroller.errors import DriverNotFound, InvalidDriverOption

__all__ = [
    "DEFAULT_AGENT_CHANNEL",
    "ENTRY_POINT_GROUP",
    "Accel",
    "IHypervisorDriver",
    "SnapshotInfo",
    "VMSpec",
    "VMState",
    "installed_drivers",
    "load_driver",
]

ENTRY_POINT_GROUP = "vmcontroller.hypervisors"


def installed_drivers() -> list[str]:
    """The names of the installed hypervisor drivers, sorted."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def load_driver(name: str, reactor: Any, **options: Any) -> IHypervisorDriver:
    """
    Create the driver registered as ``name``.

    :param reactor: the reactor the driver schedules its work with (each driver needs its own
        set of reactor interfaces: threads, time, processes...).
    :param options: keyword arguments for the driver's constructor (e.g. ``uri`` for libvirt).
    :return: the driver, not started yet: call ``startService()`` or add it to a ``MultiService``.
    :raises DriverNotFound: no driver of that name is installed, or it does not provide
        :class:`IHypervisorDriver`.
    :raises InvalidDriverOption: the driver's constructor takes no such option, or refuses its
        value. A string for an option whose default is a number or a boolean (as a command
        line gives it) is converted first.
    """
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        installed = ", ".join(installed_drivers()) or "none"
        raise DriverNotFound(
            f"no hypervisor driver named {name!r} (installed: {installed}); install the package that "
            f"provides it, or check that vmcontroller is installed (pip install .) so that its "
            f"{ENTRY_POINT_GROUP!r} entry points exist"
        )
    try:
        factory = matches[0].load()
    except ImportError as e:
        raise DriverNotFound(
            f"hypervisor driver {name!r} is registered but cannot be imported ({e}); install its dependencies"
        ) from e
    options = _options_for(name, factory, options)
    try:
        driver = factory(reactor, **options)
    except ValueError as e:  # a value the driver refuses, e.g. VMware's product="esx"
        raise InvalidDriverOption(f"hypervisor driver {name!r}: {e}") from e
    try:
        verifyObject(IHypervisorDriver, driver)
    except Invalid as e:
        raise DriverNotFound(
            f"{matches[0].value} registered as hypervisor driver {name!r} does not implement "
            f"IHypervisorDriver: {e}"
        ) from e
    return driver


def _options_for(name: str, factory: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """
    ``options`` checked against the keyword parameters of the driver's constructor; a string
    for a parameter whose default is a number or a boolean (from a command line) converted.
    A constructor that takes ``**options`` checks them itself: they pass as they are.
    """
    signature = list(inspect.signature(factory).parameters.values())[1:]  # after the reactor
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in signature):
        return options
    parameters = {
        parameter.name: parameter
        for parameter in signature
        if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    }
    converted = {}
    for option, value in options.items():
        parameter = parameters.get(option)
        if parameter is None:
            raise InvalidDriverOption(
                f"hypervisor driver {name!r} has no option {option!r}; its options: "
                f"{', '.join(parameters) or 'none'}"
            )
        default = parameter.default
        if isinstance(value, str) and isinstance(default, bool):
            if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise InvalidDriverOption(
                    f"hypervisor driver {name!r}: {option}={value!r} is not true or false"
                )
            value = value.lower() in ("true", "yes", "1")
        elif isinstance(value, str) and isinstance(default, int | float):
            try:
                value = type(default)(value)
            except ValueError:
                raise InvalidDriverOption(
                    f"hypervisor driver {name!r}: {option}={value!r} is not a number (like {default!r})"
                ) from None
        converted[option] = value
    return converted
