"""
The VirtualBox stand-ins and factories of drivers over them. (Not ``virtualbox.py``: this
directory goes on ``sys.path`` for ``vboxapi``, where that name would hide pyvbox.)

``vbox_model`` (VBoxSVC's registry and rules), ``vboxapi/`` (the COM bindings
under the real pyvbox) and ``VBoxManage`` (the command-line tool). :data:`FACTORIES` gives a
started driver over each, named as the conformance suite names its configurations;
:func:`virtualbox_options`, :func:`current_disk_file` and :func:`hold_session` serve a suite
that loads the driver through its entry point.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.standins import vbox_model

STANDINS = Path(__file__).resolve().parent
VBOXMANAGE = STANDINS / "VBoxManage"


@dataclass
class StandinVirtualBox:
    """A started :class:`~hypervisors.virtualbox.VirtualBoxDriver` over a stand-in, and the
    stand-in's side of things for tests."""

    driver: Any
    #: The stand-in VirtualBox's home (``VBOX_USER_HOME``): its registry.
    home: Path

    def current_disk_file(self, vm: str) -> Path:
        """The file holding VM ``vm``'s current disk content (write a marker there)."""
        return vbox_model.current_disk_file(self.home, vm)

    def hold_session(self, vm: str) -> None:
        """Another program (the VirtualBox Manager) locks ``vm``'s session."""
        vbox_model.hold_session(self.home, vm)

    def release_session(self, vm: str) -> None:
        vbox_model.release_session(self.home, vm)

    def guest_powers_off(self, vm: str) -> None:
        vbox_model.guest_powers_off(self.home, vm)

    def vm_process_dies(self, vm: str) -> None:
        vbox_model.vm_process_dies(self.home, vm)


def use_vboxapi_standin(home: Path) -> None:
    """Make ``import vboxapi`` find the stand-in, serving the VirtualBox of ``home``."""
    if str(STANDINS) not in sys.path:
        sys.path.insert(0, str(STANDINS))
    import vboxapi  # the stand-in: tests/standins/vboxapi

    vboxapi.use_home(home)


# -- for the conformance suite: options for load_driver("virtualbox", ...) and probes ----------


def virtualbox_options(backend: str, workdir: Path) -> dict[str, Any]:
    """
    ``load_driver("virtualbox", reactor, **options)`` over the stand-in of ``backend``
    (``"pyvbox"`` or ``"vboxmanage"``), with VirtualBox's home in ``workdir/vbox-home`` and the
    VMs in ``workdir/vms``. For pyvbox this points the ``vboxapi`` stand-in at that home (one
    home per process at a time: pyvbox keeps one manager per process).
    """
    home = workdir / "vbox-home"
    options: dict[str, Any] = {"backend": backend, "state_dir": workdir / "vms", "poll_interval": 0.2}
    if backend == "pyvbox":
        use_vboxapi_standin(home)
    else:
        options.update(vboxmanage=str(VBOXMANAGE), vbox_user_home=str(home))
    return options


def unavailable_options(workdir: Path) -> dict[str, Any]:
    """Options that give a VirtualBox driver finding no VirtualBox (no vboxapi, no VBoxManage)."""
    return {"backend": "vboxmanage", "vboxmanage": str(workdir / "no-virtualbox" / "VBoxManage")}


def standin_home(driver: Any) -> Path:
    """The stand-in home of a driver made with :func:`virtualbox_options`."""
    return Path(driver.state_dir).parent / "vbox-home"


def current_disk_file(driver: Any, vm: str) -> Path:
    """The file holding VM ``vm``'s current disk content (write a marker there)."""
    return vbox_model.current_disk_file(standin_home(driver), vm)


async def hold_session(driver: Any, vm: str) -> Callable[[], Awaitable[None]]:
    """Another program (the VirtualBox Manager) locks ``vm``'s session; returns the release."""
    home = standin_home(driver)
    vbox_model.hold_session(home, vm)

    async def release() -> None:
        vbox_model.release_session(home, vm)

    return release


# -- for the driver's own tests ---------------------------------------------------------------


def _started(backend: str, reactor: Any, directory: Path) -> StandinVirtualBox:
    from hypervisors.virtualbox import VirtualBoxDriver

    driver = VirtualBoxDriver(reactor, **virtualbox_options(backend, directory))
    driver.startService()
    return StandinVirtualBox(driver, standin_home(driver))


def virtualbox_pyvbox(reactor: Any, directory: Path) -> StandinVirtualBox:
    """The VirtualBox driver's pyvbox backend, started, over the ``vboxapi`` stand-in."""
    return _started("pyvbox", reactor, directory)


def virtualbox_vboxmanage(reactor: Any, directory: Path) -> StandinVirtualBox:
    """The VirtualBox driver's VBoxManage backend, started, over the ``VBoxManage`` stand-in."""
    return _started("vboxmanage", reactor, directory)


#: Driver factories by conformance configuration name: ``factory(reactor, directory)``.
FACTORIES: dict[str, Callable[[Any, Path], StandinVirtualBox]] = {
    "virtualbox-pyvbox": virtualbox_pyvbox,
    "virtualbox-vboxmanage": virtualbox_vboxmanage,
}
