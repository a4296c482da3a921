"""Reaching the agent of a VM that a hypervisor driver runs."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint

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

    The client asks the driver for the endpoint again each time it reconnects: after the
    VM's emulator restarts (a restore, a stop and start) its channel's socket path or
    forwarded port is another one.

    :param development: no authentication (an agent started with ``--development``).
    :raises VMStateError: the VM is not running (asked once, before connecting).
    """
    credentials = None if development else await driver.agent_credentials(name)
    # The first endpoint is asked here, so that a VM that is not running, or lacks the
    # transport, fails at once rather than after ``timeout`` of retries.
    first: IStreamClientEndpoint | None = await driver.agent_endpoint(name, transport)

    def find() -> Deferred[IStreamClientEndpoint]:
        nonlocal first
        if first is not None:
            endpoint, first = first, None
            return succeed(endpoint)
        return driver.agent_endpoint(name, transport)

    return await connect(reactor, find, credentials=credentials, development=development, timeout=timeout)
