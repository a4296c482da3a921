"""
Commands that outlive the session that started them: ``exec`` with an ``exec_id``,
``commands``, ``attach`` and ``acknowledge``.

A retained command's output goes to a spool of its own, not straight to the host: the
agent reads the pipes whether or not a host is there, keeps each stream's first bytes in
memory and spills the rest to a file in the spool directory, and keeps all of it, with the
exit status, until the host acknowledges the command.  Any session may stream it from
any offset (``attach``), so a controller that restarted collects the whole output of a
command started before it.  Every resource has a limit: the number of commands kept, the
memory per stream and the spool's bytes on disk.  Output past the disk limit is dropped and
counted, and the result says how much (``output_dropped``): it is never cut silently.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from guest_agent.link import RequestIO
from guest_agent.ops import exec as _exec
from guest_agent.protocol.errors import (
    AlreadyExists,
    BadRequest,
    ConnectionLost,
    OperationError,
    TooManyCommands,
    UnknownCommand,
)
from guest_agent.protocol.frames import Channel
from guest_agent.session import Operation, OperationContext

#: What an ``exec_id`` may be: short, printable, safe in a file name.
EXEC_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
#: The largest DATA a stream of a retained command is read out in.
_CHUNK = 64 * 1024
_STREAMS: dict[int, str] = {Channel.STDOUT: "stdout", Channel.STDERR: "stderr"}


@dataclass(frozen=True)
class RetentionLimits:
    """
    How much the agent keeps for commands nobody has acknowledged yet.

    :ivar max_commands: commands kept at once, running or exited.
    :ivar memory_per_stream: bytes of one output stream held in memory; the rest is spilled.
    :ivar disk_bytes: bytes of spilled output of all commands together.
    """

    max_commands: int = 64
    memory_per_stream: int = 64 * 1024
    disk_bytes: int = 256 * 1024 * 1024

    def to_wire(self) -> dict[str, int]:
        return {"max_commands": self.max_commands, "memory_per_stream": self.memory_per_stream,
                "disk_bytes": self.disk_bytes}


class _DiskBudget:
    """The spool directory's bytes, shared by every command's spills."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, count: int) -> bool:
        if self.used + count > self.limit:
            return False
        self.used += count
        return True

    def give_back(self, count: int) -> None:
        self.used -= count


class _Spool:
    """
    One output stream of a retained command, addressable by offset: the first bytes in
    memory, the rest in a file.  Once a byte has been dropped every later byte is too, so
    what is kept is always a prefix of the output and ``dropped`` counts the rest.
    """

    def __init__(self, memory_limit: int, path: str, budget: _DiskBudget) -> None:
        self._memory = bytearray()
        self._memory_limit = memory_limit
        self._path = path
        self._budget = budget
        self._file: IO[bytes] | None = None
        self._spilled = 0
        self.size = 0
        self.dropped = 0
        #: The pipe reached end of file: nothing more will be appended.
        self.ended = False

    def append(self, data: bytes) -> None:
        if self.dropped:
            self.dropped += len(data)
            return
        room = self._memory_limit - len(self._memory)
        self._memory += data[:room]
        self.size += min(room, len(data))
        rest = data[room:]
        if rest and not self._spill(rest):
            self.dropped += len(rest)

    def _spill(self, data: bytes) -> bool:
        if not self._budget.take(len(data)):
            return False
        try:
            if self._file is None:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                self._file = os.fdopen(fd, "r+b", buffering=0)
            os.pwrite(self._file.fileno(), data, self._spilled)
        except OSError:
            self._budget.give_back(len(data))  # a full or broken disk: counted as dropped
            return False
        self._spilled += len(data)
        self.size += len(data)
        return True

    def read(self, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``offset``; empty at the end of what is kept."""
        if offset < len(self._memory):
            return bytes(self._memory[offset : offset + limit])
        if offset >= self.size or self._file is None:
            return b""
        return os.pread(self._file.fileno(), min(limit, self.size - offset), offset - len(self._memory))

    def discard(self) -> None:
        self._memory = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._budget.give_back(self._spilled)
            self._spilled = 0


class RetainedCommand(ProcessProtocol):
    """
    One program started with an ``exec_id``: its spools, how it ended, and the sessions
    streaming it.  It runs on when every session has gone.
    """

    transport: IProcessTransport | None

    def __init__(self, exec_id: str, request: _exec.ExecRequest, spools: dict[int, _Spool]) -> None:
        self.exec_id = exec_id
        self.request = request
        self.spools = spools
        #: The RESPONSE's result, or the error to answer with, once the command has ended.
        self.outcome: dict[str, Any] | OperationError | None = None
        self._group = 0
        self._exited = False
        self._ended: Failure | None = None
        self._stopping: OperationError | None = None
        self._waiters: list[Deferred[None]] = []
        self.timer: IDelayedCall | None = None

    # -- the process side ------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None and self.transport.pid is not None
        self._group = self.transport.pid  # the group may outlive its reaped leader

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        spool = self.spools.get(childFD)
        if spool is not None:
            spool.append(data)
            self._changed()

    def childConnectionLost(self, childFD: int) -> None:
        spool = self.spools.get(childFD)
        if spool is not None:
            spool.ended = True
        self._settle()

    def processExited(self, reason: Failure) -> None:
        self._exited = True
        self._settle()

    def processEnded(self, reason: Failure) -> None:
        self._ended = reason
        self._settle()

    def stop(self, error: OperationError) -> None:
        """Kill the process group; the command ends with ``error``."""
        if self._stopping is not None or self.outcome is not None:
            return
        self._stopping = error
        if self.transport is not None:
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess("KILL")
            _exec._kill_group(self._group)
        self._settle()

    def _settle(self) -> None:
        if self.outcome is None:
            if self._stopping is not None:
                if self._exited and self.transport is not None:
                    self.transport.loseConnection()  # pipes held by escaped processes
                if self._ended is not None:
                    self._end(self._stopping)
            elif self._ended is not None and all(spool.ended for spool in self.spools.values()):
                self._end({**_exec._status(self._ended), "exec_id": self.exec_id,
                           "argv": self.request.argv, "output_dropped": self.dropped()})
        self._changed()

    def _end(self, outcome: dict[str, Any] | OperationError) -> None:
        self.outcome = outcome
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    # -- readers ---------------------------------------------------------------------

    def dropped(self) -> dict[str, int]:
        return {name: self.spools[channel].dropped for channel, name in _STREAMS.items()}

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _next_change(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    async def stream(self, io: RequestIO, offsets: dict[int, int]) -> dict[str, Any]:
        """
        Send both streams from ``offsets`` to the end, end them with EOF and return the
        result once the command has ended.

        :raises OperationError: the command ended with this error (timeout, cancel).
        :raises ConnectionLost: the session went away; the command runs on.
        """
        senders = [Deferred.fromCoroutine(self._send(io, channel, offsets[channel])) for channel in _STREAMS]
        try:
            for sender in senders:
                await sender
            while self.outcome is None:
                await self._next_change()
        except Exception:  # not GeneratorExit: a coroutine collected as garbage cancels nothing
            for sender in senders:
                sender.cancel()
                sender.addErrback(lambda _: None)  # the one awaited above told its error already
            raise
        for channel in _STREAMS:
            io.send_eof(channel, {"size": self.spools[channel].size, "dropped": self.spools[channel].dropped})
        if isinstance(self.outcome, OperationError):
            raise self.outcome
        return self.outcome

    async def _send(self, io: RequestIO, channel: int, offset: int) -> None:
        spool = self.spools[channel]
        while True:
            chunk = spool.read(offset, _CHUNK)
            if chunk:
                await io.send(channel, chunk)
                offset += len(chunk)
            elif spool.ended or self.outcome is not None:
                return
            else:
                await self._next_change()

    def describe(self) -> dict[str, Any]:
        """The command as ``commands`` lists it."""
        description: dict[str, Any] = {
            "exec_id": self.exec_id,
            "argv": self.request.argv,
            "state": "running" if self.outcome is None else "exited",
            "exit_code": None,
            "signal": None,
            "error": None,
            "sizes": {name: self.spools[channel].size for channel, name in _STREAMS.items()},
            "output_dropped": self.dropped(),
        }
        if isinstance(self.outcome, OperationError):
            description["error"] = {"code": str(self.outcome.code), "message": self.outcome.message}
        elif self.outcome is not None:
            description["exit_code"] = self.outcome["exit_code"]
            description["signal"] = self.outcome["signal"]
        return description

    def discard(self) -> None:
        for spool in self.spools.values():
            spool.discard()


def _exec_id(args: dict[str, Any]) -> str:
    exec_id = args.get("exec_id")
    if not isinstance(exec_id, str) or not EXEC_ID.fullmatch(exec_id):
        raise BadRequest(f"'exec_id' must be 1 to 128 letters, digits or ._:@- ; got {exec_id!r}")
    return exec_id


class CommandRegistry:
    """
    The agent's retained commands, shared by every session on every channel.

    :param spool_dir: where output beyond memory is spilled; created (mode 0700) if
        missing, and emptied at start: an earlier agent's commands died with it.
    """

    def __init__(self, spool_dir: str, limits: RetentionLimits | None = None) -> None:
        self._spool_dir = spool_dir
        self.limits = limits or RetentionLimits()
        self._budget = _DiskBudget(self.limits.disk_bytes)
        self._commands: dict[str, RetainedCommand] = {}
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(spool_dir)
        os.makedirs(spool_dir, mode=0o700)

    def operations(self) -> dict[str, Operation]:
        """The operations to serve; ``exec`` without an ``exec_id`` is the plain one."""
        return {"exec": self.exec, "commands": self.list, "attach": self.attach,
                "acknowledge": self.acknowledge}

    async def exec(self, ctx: OperationContext) -> dict[str, Any]:
        """
        ``exec``; with an ``exec_id``, the command is retained, and the same id again
        streams the command that has it instead of starting another.

        :raises AlreadyExists: the id names a command with another ``argv``.
        :raises TooManyCommands: ``max_commands`` are kept already.
        :raises BadRequest: the exec asks for a ``pty``.
        """
        if ctx.args.get("exec_id") is None:
            return await _exec.run_exec(ctx)
        exec_id = _exec_id(ctx.args)
        request = _exec.ExecRequest.from_wire(ctx.args)
        if request.pty is not None:
            # A terminal is a conversation with the session that opened it: nothing to spool.
            raise BadRequest("an exec with 'pty' cannot be retained: drop 'exec_id' (the terminal's "
                             "program is killed with its session) or drop 'pty'", {"exec_id": exec_id})
        command = self._commands.get(exec_id)
        if command is not None:
            if command.request.argv != request.argv:
                raise AlreadyExists(
                    f"exec_id {exec_id!r} names a command with another argv, {command.request.argv!r}: "
                    "choose a new id, or acknowledge the old command first", {"exec_id": exec_id})
            return await self._stream(ctx, command, {channel: 0 for channel in _STREAMS})
        if len(self._commands) >= self.limits.max_commands:
            raise TooManyCommands(
                f"the agent keeps {len(self._commands)} commands, its limit: acknowledge finished ones "
                "(list them with 'commands')", {"max_commands": self.limits.max_commands})
        environment = request.environment()
        executable = request.check_runnable(environment)
        spools = {channel: _Spool(self.limits.memory_per_stream,
                                  os.path.join(self._spool_dir, f"{exec_id}.{name}"), self._budget)
                  for channel, name in _STREAMS.items()}
        command = RetainedCommand(exec_id, request, spools)
        transport = _exec._spawn(IReactorProcess(ctx.reactor), command, executable, request, environment)
        self._commands[exec_id] = command
        if request.stream_stdin:
            # Only this request feeds stdin; if its session ends, stdin stays open.
            Deferred.fromCoroutine(_exec._feed_stdin(ctx.io, transport))
        else:
            transport.closeStdin()
        if request.timeout is not None:
            command.timer = ctx.reactor.callLater(request.timeout, command.stop, request.timeout_error())
        return await self._stream(ctx, command, {channel: 0 for channel in _STREAMS})

    async def attach(self, ctx: OperationContext) -> dict[str, Any]:
        """
        ``attach``: stream a retained command's output from ``stdout_offset`` and
        ``stderr_offset``, then its result, as ``exec`` does.

        :raises UnknownCommand: no command has this ``exec_id``.
        """
        command = self._get(ctx.args)
        offsets = {}
        for channel, name in _STREAMS.items():
            offset = ctx.args.get(f"{name}_offset", 0)
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise BadRequest(f"attach '{name}_offset' must be a byte count; got {offset!r}")
            offsets[channel] = offset
        return await self._stream(ctx, command, offsets)

    def list(self, ctx: OperationContext) -> dict[str, Any]:
        """``commands``: every retained command, oldest first, and the limits."""
        return {"commands": [command.describe() for command in self._commands.values()],
                "limits": self.limits.to_wire(), "disk_used": self._budget.used}

    def acknowledge(self, ctx: OperationContext) -> None:
        """
        ``acknowledge``: forget an exited command and its output.

        :raises BadRequest: the command is still running.
        """
        command = self._get(ctx.args)
        if command.outcome is None:
            raise BadRequest(f"command {command.exec_id!r} is still running: wait for its result, "
                             "or attach and cancel it, before acknowledging it", {"exec_id": command.exec_id})
        del self._commands[command.exec_id]
        command.discard()

    def _get(self, args: dict[str, Any]) -> RetainedCommand:
        exec_id = _exec_id(args)
        command = self._commands.get(exec_id)
        if command is None:
            raise UnknownCommand(f"the agent keeps no command {exec_id!r}: it was acknowledged, never "
                                 "started, or the agent restarted since", {"exec_id": exec_id})
        return command

    @staticmethod
    async def _stream(
        ctx: OperationContext, command: RetainedCommand, offsets: dict[int, int]
    ) -> dict[str, Any]:
        """Stream ``command`` to this request; a CANCEL kills it, a lost session only detaches."""
        streaming = Deferred.fromCoroutine(command.stream(ctx.io, offsets))

        def cancelled(reason: dict[str, Any]) -> None:
            if ctx.session_ended:
                streaming.cancel()
            else:
                command.stop(command.request.cancelled_error(reason))

        ctx.on_cancel(cancelled)
        try:
            return await streaming
        except CancelledError:
            raise ConnectionLost("the session ended; the command runs on") from None


__all__ = ["EXEC_ID", "CommandRegistry", "RetainedCommand", "RetentionLimits"]
