"""
Fakes for code that uses vmcontroller: a guest client joined in memory to a real agent
session, driven by a :class:`~twisted.internet.task.Clock` and an
:class:`~twisted.test.iosim.IOPump` instead of a reactor (:class:`InMemoryLink`), and a
hypervisor that lives in memory (:class:`FakeHypervisor`), held to the same conformance suite
as the real drivers.

``twisted.test.iosim`` is not public API: this module is the one place that imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.task import Clock
from twisted.test import iosim

from guest_agent.protocol.connection import SUPPORTED_VERSIONS, Limits
from guest_agent.session import Operation
from guest_agent.transports import AgentProtocol
from vmcontroller._fakehypervisor import FakeHypervisor, FakeVM
from vmcontroller.client import ClientLimits, GuestClient, _AgentProtocol


class InMemoryLink:
    """A client and an agent session joined by in-memory transports."""

    def __init__(
        self,
        operations: Mapping[str, Operation],
        *,
        clock: Clock | None = None,
        client_limits: Limits | None = None,
        agent_limits: Limits | None = None,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        agent_reactor: Any = None,
        host_limits: ClientLimits | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.client = GuestClient(self.clock, client_limits, versions, host_limits)
        self.agent = AgentProtocol(
            agent_reactor or self.clock, operations, agent_limits, {"software": "in-memory"}
        )
        client_protocol = _AgentProtocol(self.client)
        self.pump = iosim.connect(
            self.agent,
            iosim.makeFakeServer(self.agent),
            client_protocol,
            iosim.makeFakeClient(client_protocol),
            greet=True,
        )

    def flush(self) -> None:
        """Move bytes both ways until neither side has anything more to say."""
        self.pump.flush()


__all__ = ["FakeHypervisor", "FakeVM", "InMemoryLink"]
