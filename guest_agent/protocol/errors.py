"""
The exception classes shared by the host library and the guest agent.

Every error that crosses the wire travels as a short string code (``ErrorCode``) with a
message; :func:`error_from_wire` turns it back into the same exception class on the other
side, so a host caller catches :class:`PathNotFound` whether the path was missing in the
guest or on the host.
"""

from __future__ import annotations

import enum
from typing import Any


class VMControllerError(Exception):
    """Base class of every error raised by vmcontroller, its drivers and its agent."""


class ErrorCode(enum.StrEnum):
    """The codes carried by ERROR frames."""

    BAD_REQUEST = "bad-request"
    UNKNOWN_OPERATION = "unknown-operation"
    UNSUPPORTED_VERSION = "unsupported-version"
    FRAME_TOO_LARGE = "frame-too-large"
    PROTOCOL_VIOLATION = "protocol-violation"
    AUTHENTICATION_FAILED = "authentication-failed"
    TAMPERING_DETECTED = "tampering-detected"
    TOO_MANY_REQUESTS = "too-many-requests"
    COMMAND_NOT_FOUND = "command-not-found"
    PATH_NOT_FOUND = "path-not-found"
    NOT_A_DIRECTORY = "not-a-directory"
    IS_A_DIRECTORY = "is-a-directory"
    ALREADY_EXISTS = "already-exists"
    PERMISSION_DENIED = "permission-denied"
    DIRECTORY_NOT_EMPTY = "directory-not-empty"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INTEGRITY = "integrity"
    INCOMPLETE = "incomplete"
    OS_ERROR = "os-error"
    RESULT_TOO_LARGE = "result-too-large"
    TOO_MANY_COMMANDS = "too-many-commands"
    UNKNOWN_COMMAND = "unknown-command"
    INTERNAL = "internal"


class ProtocolError(VMControllerError):
    """The peer broke the wire protocol; the connection cannot go on."""

    code = ErrorCode.PROTOCOL_VIOLATION


class FrameTooLarge(ProtocolError):
    """A frame announced a payload larger than the negotiated limit."""

    code = ErrorCode.FRAME_TOO_LARGE


class UnsupportedProtocolVersion(ProtocolError):
    """Host and agent share no protocol version."""

    code = ErrorCode.UNSUPPORTED_VERSION


class AuthenticationFailed(ProtocolError):
    """
    The TLS handshake failed: a peer without this VM's credentials, with another VM's, a
    replayed or altered handshake, or an end that does not authenticate at all.
    """

    code = ErrorCode.AUTHENTICATION_FAILED


class TamperingDetected(ProtocolError):
    """A record of an authenticated session failed its integrity check: the session ends."""

    code = ErrorCode.TAMPERING_DETECTED


class CredentialsUnavailable(VMControllerError):
    """An end has no usable credentials for the VM (missing, unreadable or damaged)."""


class ConnectionLost(VMControllerError):
    """The channel to the agent closed or the agent restarted while an operation was in flight."""


class OperationError(VMControllerError):
    """
    An operation failed; raised on the side that asked for it.

    :ivar details: extra machine-readable facts sent with the error (a path, an errno, ...).
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class BadRequest(OperationError):
    """The request's arguments were missing or of the wrong type."""

    code = ErrorCode.BAD_REQUEST


class UnknownOperation(OperationError):
    """The agent does not implement the requested operation."""

    code = ErrorCode.UNKNOWN_OPERATION


class TooManyRequests(OperationError):
    """More operations were in flight than the agent accepts at once."""

    code = ErrorCode.TOO_MANY_REQUESTS


class CommandNotFound(OperationError):
    """The program to execute does not exist or is not executable."""

    code = ErrorCode.COMMAND_NOT_FOUND


class PathNotFound(OperationError):
    """A file or directory named by the operation does not exist."""

    code = ErrorCode.PATH_NOT_FOUND


class NotADirectory(OperationError):
    """A path that must be a directory is not one."""

    code = ErrorCode.NOT_A_DIRECTORY


class IsADirectory(OperationError):
    """A path that must be a file is a directory."""

    code = ErrorCode.IS_A_DIRECTORY


class AlreadyExists(OperationError):
    """The path to create exists already."""

    code = ErrorCode.ALREADY_EXISTS


class PermissionDenied(OperationError):
    """The agent's user may not do this."""

    code = ErrorCode.PERMISSION_DENIED


class DirectoryNotEmpty(OperationError):
    """A directory to remove without ``recursive`` still has entries."""

    code = ErrorCode.DIRECTORY_NOT_EMPTY


class OperationTimeout(OperationError):
    """The operation ran past its timeout and was stopped (a process group was killed)."""

    code = ErrorCode.TIMEOUT


class OperationCancelled(OperationError):
    """The operation was cancelled by the host."""

    code = ErrorCode.CANCELLED


class IntegrityError(OperationError):
    """A transferred file's sha256 did not match: nothing was written at the destination."""

    code = ErrorCode.INTEGRITY


class IncompleteTransfer(OperationError):
    """A transfer ended early: nothing was written at the destination."""

    code = ErrorCode.INCOMPLETE


class ResultTooLarge(OperationError):
    """The operation's result did not fit in one frame (e.g. listing a huge directory)."""

    code = ErrorCode.RESULT_TOO_LARGE


class TooManyCommands(OperationError):
    """The agent retains as many commands as it may: acknowledge finished ones first."""

    code = ErrorCode.TOO_MANY_COMMANDS


class UnknownCommand(OperationError):
    """The agent keeps no command with this ``exec_id`` (never started, or acknowledged)."""

    code = ErrorCode.UNKNOWN_COMMAND


class AgentOSError(OperationError):
    """An operating-system error in the guest that has no more specific class."""

    code = ErrorCode.OS_ERROR


class InternalError(OperationError):
    """The agent hit a bug; its log in the guest has the traceback."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[str, type[OperationError]] = {
    cls.code.value: cls
    for cls in (
        BadRequest,
        UnknownOperation,
        TooManyRequests,
        CommandNotFound,
        PathNotFound,
        NotADirectory,
        IsADirectory,
        AlreadyExists,
        PermissionDenied,
        DirectoryNotEmpty,
        OperationTimeout,
        OperationCancelled,
        IntegrityError,
        IncompleteTransfer,
        ResultTooLarge,
        TooManyCommands,
        UnknownCommand,
        AgentOSError,
        InternalError,
    )
}


def error_from_wire(code: str, message: str, details: dict[str, Any] | None = None) -> VMControllerError:
    """Rebuild the exception an ERROR frame describes."""
    if code == ErrorCode.UNSUPPORTED_VERSION.value:
        return UnsupportedProtocolVersion(message)
    if code == ErrorCode.FRAME_TOO_LARGE.value:
        return FrameTooLarge(message)
    if code == ErrorCode.PROTOCOL_VIOLATION.value:
        return ProtocolError(message)
    if code == ErrorCode.AUTHENTICATION_FAILED.value:
        return AuthenticationFailed(message)
    if code == ErrorCode.TAMPERING_DETECTED.value:
        return TamperingDetected(message)
    return _BY_CODE.get(code, InternalError)(message, details)
