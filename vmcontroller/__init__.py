"""
vmcontroller: drive VMs and the agents inside them from Twisted.

- :func:`connect` opens a session with a guest agent through any Twisted endpoint;
  :func:`connect_vm_agent` does so for a VM that a hypervisor driver runs.
- :func:`hypervisors.load_driver` finds a hypervisor driver by name.
- :mod:`vmcontroller.errors` has every exception raised.
"""

from vmcontroller.client import (
    CommandInfo,
    ExecHandle,
    ExecResult,
    GuestClient,
    Terminal,
    TransferResult,
    connect,
)
from vmcontroller.machine import connect_vm_agent

__version__ = "0.1.0"

__all__ = [
    "CommandInfo",
    "ExecHandle",
    "ExecResult",
    "GuestClient",
    "Terminal",
    "TransferResult",
    "__version__",
    "connect",
    "connect_vm_agent",
]
