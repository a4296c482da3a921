"""Reaching the agent of a VM that a hypervisor driver runs."""

from __future__ import annotations

from typing import Any

from hypervisors.interface import AgentTransport, IHypervisorDriver
from vmcontroller.client import GuestClient, connect


async def connect_vm_agent(
    reactor: Any,
    driver: IHypervisorDriver,
    name: str,
    *,
    transport: AgentTransport = "auto",
    timeout: float = 180.0,
) -> GuestClient:
    """
    Connect to the agent of VM ``name`` through the driver's
    :meth:`~hypervisors.interface.IHypervisorDriver.agent_endpoint`, waiting up to ``timeout``
    seconds for the guest to boot and the agent to answer.
    """
    endpoint = await driver.agent_endpoint(name, transport)
    return await connect(reactor, endpoint, timeout=timeout)
