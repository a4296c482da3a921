"""
Stand-ins for hypervisors that cannot run here, and factories of drivers over them.

VirtualBox: ``vbox_model`` (VBoxSVC's registry and rules), ``vboxapi/`` (the COM bindings
under the real pyvbox) and ``VBoxManage`` (the command-line tool). :data:`FACTORIES` gives a
started driver over each, named as the conformance suite names its configurations.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def virtualbox_pyvbox(reactor: Any, directory: Path) -> StandinVirtualBox:
    """The VirtualBox driver's pyvbox backend, started, over the ``vboxapi`` stand-in."""
    from hypervisors.virtualbox import VirtualBoxDriver

    home = directory / "vbox-home"
    use_vboxapi_standin(home)
    driver = VirtualBoxDriver(reactor, backend="pyvbox", state_dir=directory / "vms", poll_interval=0.2)
    driver.startService()
    return StandinVirtualBox(driver, home)


def virtualbox_vboxmanage(reactor: Any, directory: Path) -> StandinVirtualBox:
    """The VirtualBox driver's VBoxManage backend, started, over the ``VBoxManage`` stand-in."""
    from hypervisors.virtualbox import VirtualBoxDriver

    home = directory / "vbox-home"
    driver = VirtualBoxDriver(
        reactor,
        backend="vboxmanage",
        vboxmanage=str(VBOXMANAGE),
        vbox_user_home=str(home),
        state_dir=directory / "vms",
        poll_interval=0.2,
    )
    driver.startService()
    return StandinVirtualBox(driver, home)


#: Driver factories by conformance configuration name: ``factory(reactor, directory)``.
FACTORIES: dict[str, Callable[[Any, Path], StandinVirtualBox]] = {
    "virtualbox-pyvbox": virtualbox_pyvbox,
    "virtualbox-vboxmanage": virtualbox_vboxmanage,
}
