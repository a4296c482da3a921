"""Reaching the agent of a VM that a hypervisor driver runs."""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import UNIXClientEndpoint

from hypervisors.interface import IHypervisorDriver
from vmcontroller.client import GuestClient, connect


async def connect_vm_agent(
    reactor: Any, driver: IHypervisorDriver, name: str, *, timeout: float = 180.0
) -> GuestClient:
    """
    Connect to the agent of VM ``name`` through the host side of its virtio-serial channel,
    waiting up to ``timeout`` seconds for the guest to boot and the agent to answer.
    """
    path = await driver.agent_socket_path(name)
    return await connect(reactor, UNIXClientEndpoint(reactor, path), timeout=timeout)
