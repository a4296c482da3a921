"""
A hypervisor driver from outside vmcontroller: :class:`vmcontroller.testing.FakeHypervisor`
under a name of its own, registered in the ``vmcontroller.hypervisors`` entry-point group.
"""

from __future__ import annotations

from typing import Any

from vmcontroller.testing import FakeHypervisor

__all__ = ["ThirdPartyHypervisor"]


class ThirdPartyHypervisor(FakeHypervisor):
    """The in-memory hypervisor, registered as ``thirdparty``."""

    def __init__(self, reactor: Any, **options: Any) -> None:
        super().__init__(reactor, "thirdparty", **options)
