"""
Every exception vmcontroller raises.

The errors that can cross the wire are defined once, in :mod:`guest_agent.protocol.errors`,
which the agent shares; the hypervisor errors are host-only.
"""

from typing import TYPE_CHECKING

from guest_agent.protocol.errors import (
    AgentOSError,
    AlreadyExists,
    AuthenticationFailed,
    BadRequest,
    CommandNotFound,
    ConnectionLost,
    CredentialsUnavailable,
    DirectoryNotEmpty,
    ErrorCode,
    FrameTooLarge,
    IncompleteTransfer,
    IntegrityError,
    InternalError,
    IsADirectory,
    NotADirectory,
    OperationCancelled,
    OperationError,
    OperationTimeout,
    PathNotFound,
    PermissionDenied,
    ProtocolError,
    ResultTooLarge,
    TamperingDetected,
    TooManyCommands,
    TooManyRequests,
    UnknownCommand,
    UnknownOperation,
    UnsupportedProtocolVersion,
    VMControllerError,
)

if TYPE_CHECKING:
    from vmcontroller._exec import ExecResult


class ProcessFailed(VMControllerError):
    """
    A guest process run with ``check=True`` exited with a non-zero status or was killed.

    :ivar result: its :class:`~vmcontroller.client.ExecResult`, with its output.
    """

    def __init__(self, message: str, result: "ExecResult") -> None:
        super().__init__(message)
        self.result = result


class LimitExceeded(VMControllerError):
    """
    Something the guest sent went past a limit the host set (collected output, a pulled
    file's size); what was received so far was discarded and the guest operation stopped.
    """


class AgentUnreachable(VMControllerError):
    """No agent answered on the channel within the time given."""


class HypervisorError(VMControllerError):
    """The hypervisor refused or failed an operation."""


class DriverNotFound(HypervisorError):
    """No installed hypervisor driver has the requested name."""


class InvalidDriverOption(HypervisorError):
    """A driver was given an option it does not take, or a value it refuses."""


class VMNotFound(HypervisorError):
    """No VM of that name is defined on this hypervisor."""


class VMStateError(HypervisorError):
    """The VM is not in a state that allows the operation (e.g. pausing a stopped VM)."""


class VMAlreadyExists(HypervisorError):
    """A VM of that name is defined already."""


class VMTimeout(HypervisorError):
    """The VM did not reach the expected state in the time given."""


class SnapshotNotFound(HypervisorError):
    """The VM has no snapshot of that name."""


class HypervisorUnavailable(HypervisorError):
    """The hypervisor is not installed, or not running, or does not answer."""


class VMLocked(HypervisorError):
    """Another program holds the VM (e.g. a VirtualBox session lock): try again when it lets go."""


class CapabilityUnsupported(HypervisorError):
    """
    The driver (or the installed hypervisor product) cannot do this operation.

    :ivar driver: the driver's name.
    :ivar capability: the :class:`hypervisors.interface.Capability` value it lacks.
    """

    def __init__(self, driver: str, capability: str, reason: str) -> None:
        super().__init__(f"the {driver} driver cannot do {capability}: {reason}")
        self.driver = driver
        self.capability = capability


class ImageBuildError(VMControllerError):
    """Building a guest image failed."""


__all__ = [
    "AgentOSError",
    "AgentUnreachable",
    "AlreadyExists",
    "AuthenticationFailed",
    "BadRequest",
    "CapabilityUnsupported",
    "CommandNotFound",
    "ConnectionLost",
    "CredentialsUnavailable",
    "DirectoryNotEmpty",
    "DriverNotFound",
    "ErrorCode",
    "FrameTooLarge",
    "HypervisorError",
    "HypervisorUnavailable",
    "ImageBuildError",
    "IncompleteTransfer",
    "IntegrityError",
    "InternalError",
    "InvalidDriverOption",
    "IsADirectory",
    "LimitExceeded",
    "NotADirectory",
    "OperationCancelled",
    "OperationError",
    "OperationTimeout",
    "PathNotFound",
    "PermissionDenied",
    "ProcessFailed",
    "ProtocolError",
    "ResultTooLarge",
    "SnapshotNotFound",
    "TamperingDetected",
    "TooManyCommands",
    "TooManyRequests",
    "UnknownCommand",
    "UnknownOperation",
    "UnsupportedProtocolVersion",
    "VMAlreadyExists",
    "VMControllerError",
    "VMLocked",
    "VMNotFound",
    "VMStateError",
    "VMTimeout",
]
