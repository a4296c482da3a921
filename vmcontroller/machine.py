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
    development: bool = False,
) -> GuestClient:
    """
    Connect to the agent of VM ``name`` through the driver's
    :meth:`~hypervisors.interface.IHypervisorDriver.agent_endpoint`, authenticated with the
    VM's credentials from :meth:`~hypervisors.interface.IHypervisorDriver.agent_credentials`,
    waiting up to ``timeout`` seconds for the guest to boot and the agent to answer.

    :param development: no authentication (an agent started with ``--development``).
    """
    credentials = None if development else await driver.agent_credentials(name)
    endpoint = await driver.agent_endpoint(name, transport)
    return await connect(reactor, endpoint, credentials=credentials, development=development, timeout=timeout)
