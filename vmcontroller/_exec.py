"""
The host side of ``exec``: an :class:`ExecHandle` per process started in the guest.

Output is read chunk by chunk; each chunk read gives the agent credit to send more, so a
callback that returns a Deferred holds the guest process back until it fires.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.python.failure import Failure

from guest_agent.link import RequestIO
from guest_agent.ops.exec import PtyRequest
from guest_agent.protocol.errors import error_from_wire
from guest_agent.protocol.frames import Channel
from vmcontroller.errors import (
    BadRequest,
    LimitExceeded,
    OperationCancelled,
    ProcessFailed,
    ProtocolError,
    UnknownOperation,
    VMControllerError,
)

if TYPE_CHECKING:
    from vmcontroller.client import GuestClient


class STREAM:
    """Pass as ``stdin`` to write the process's input through :meth:`ExecHandle.write_stdin`."""


@dataclass(frozen=True)
class Terminal:
    """
    A pseudo-terminal to run a guest process on (``exec(..., pty=Terminal(...))``).

    :ivar rows: lines, 1 to 4096.
    :ivar cols: columns, 1 to 4096.
    :ivar term: the terminal type, the process's ``TERM`` (e.g. the local ``$TERM``).
    """

    rows: int = 24
    cols: int = 80
    term: str = "vt100"

    def __post_init__(self) -> None:
        """:raises BadRequest: a size or type the agent would refuse (its own check)."""
        PtyRequest.from_wire(self.to_wire())

    def to_wire(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols, "term": self.term}


#: Receives each chunk of output; returning a Deferred holds back further output until it fires.
OutputCallback = Callable[[bytes], "Deferred[None] | None"]


@dataclass(frozen=True)
class ExecResult:
    """How a guest process ended, with its output when no callback took it."""

    argv: tuple[str, ...]
    exit_code: int | None
    signal: str | None
    stdout: bytes
    stderr: bytes
    #: The id the command was started with, for a retained command.
    exec_id: str | None = None
    #: Bytes of output a retained command produced beyond the agent's limits, by stream
    #: ("stdout", "stderr"): the output above is then a prefix of it.
    output_dropped: dict[str, int] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0

    @property
    def output_complete(self) -> bool:
        """No output was dropped for want of room in the guest."""
        return not any(self.output_dropped.values())

    def check(self) -> ExecResult:
        """
        Return this result if the process exited with status 0.

        :raises ProcessFailed: it exited with another status or was killed by a signal.
        """
        if self.succeeded:
            return self
        how = f"was killed by {self.signal}" if self.signal else f"exited with status {self.exit_code}"
        tail = self.stderr[-500:].decode(errors="replace").strip()
        raise ProcessFailed(f"{list(self.argv)!r} {how} in the guest" + (f": {tail}" if tail else ""), self)


class ExecHandle:
    """
    A process running in the guest.  Made by :meth:`GuestClient.exec`.

    Cancelling a Deferred from :attr:`exited` or :meth:`result` cancels the process, as
    :meth:`cancel` does.
    """

    def __init__(self, client: GuestClient, argv: list[str], args: dict[str, Any],
                 stdin: bytes | type[STREAM] | None, on_stdout: OutputCallback | None,
                 on_stderr: OutputCallback | None, max_output: int, op: str = "exec") -> None:
        self._client = client
        self._on_pty = args.get("pty") is not None
        self._answered = False
        self._argv = tuple(argv)
        self._max_output = max_output
        self._op = op
        self._stdin = stdin
        self._callbacks: dict[int, OutputCallback | None] = {
            Channel.STDOUT: on_stdout, Channel.STDERR: on_stderr}
        self._collected: dict[int, bytearray] = {Channel.STDOUT: bytearray(), Channel.STDERR: bytearray()}
        self._io: RequestIO | None = None
        self._io_waiters: list[Deferred[RequestIO]] = []
        self._stdin_lock = DeferredLock()
        self._stdin_closed = False
        self._local_failure: Failure | None = None
        self._outcome: Failure | ExecResult | None = None
        self._waiters: list[Deferred[ExecResult]] = []
        self._task = Deferred.fromCoroutine(self._run(client, args))
        self._task.addBoth(self._settle)

    # ---- the public face -----------------------------------------------------------

    @property
    def exited(self) -> Deferred[ExecResult]:
        """A new Deferred that fires with the :class:`ExecResult` once the process has ended."""
        waiter: Deferred[ExecResult] = Deferred(lambda _: self.cancel())
        if self._outcome is None:
            self._waiters.append(waiter)
        elif isinstance(self._outcome, Failure):
            waiter.errback(self._outcome)
        else:
            waiter.callback(self._outcome)
        return waiter

    def result(self, check: bool = False) -> Deferred[ExecResult]:
        """
        The :class:`ExecResult`; with ``check``, fails with :class:`ProcessFailed` unless
        the process exited with status 0.
        """
        waiter = self.exited
        if check:
            waiter.addCallback(ExecResult.check)
        return waiter

    def write_stdin(self, data: bytes) -> Deferred[None]:
        """
        Send ``data`` to the process's stdin; fires once the agent has room for more, so
        awaiting each write keeps memory bounded.  Fails with :class:`ConnectionLost` when
        the process has ended already.

        :raises BadRequest: the process was not started with ``stdin=STREAM``, or stdin was closed.
        """
        self._require_stdin_stream()
        return Deferred.fromCoroutine(self._write_stdin(data))

    def close_stdin(self) -> None:
        """End the process's stdin once every write before has gone out."""
        self._require_stdin_stream()
        self._stdin_closed = True
        Deferred.fromCoroutine(self._write_stdin(None)).addErrback(lambda _: None)

    def cancel(self) -> None:
        """Kill the process group in the guest; the result fails with :class:`OperationCancelled`."""
        self._task.cancel()

    def resize(self, rows: int, cols: int) -> Deferred[None]:
        """
        Give the terminal of a process started with ``pty`` a new size (its foreground
        process group gets SIGWINCH); fires once the agent has.  Once the process has
        ended this does nothing.

        :raises BadRequest: the process has no terminal; (from the Deferred) a size out of
            1 to 4096.
        """
        if not self._on_pty:
            raise BadRequest(f"{list(self._argv)!r} was not started with a pty: it has no terminal to resize")
        return Deferred.fromCoroutine(self._resize(rows, cols))

    # ---- stdin ---------------------------------------------------------------------

    def _require_stdin_stream(self) -> None:
        if self._stdin is not STREAM:
            raise BadRequest(
                f"{list(self._argv)!r} was not started with stdin=STREAM: pass its input to exec")
        if self._stdin_closed:
            raise BadRequest(f"the stdin of {list(self._argv)!r} is closed already")

    async def _wait_io(self) -> RequestIO:
        """The request's streams, once the request is open."""
        if self._io is not None:
            return self._io
        if isinstance(self._outcome, Failure):
            self._outcome.raiseException()
        waiter: Deferred[RequestIO] = Deferred()
        self._io_waiters.append(waiter)
        return await waiter

    async def _resize(self, rows: int, cols: int) -> None:
        io = await self._wait_io()
        if self._answered:
            return
        try:
            await self._client.call("resize", {"request": io.request_id, "rows": rows, "cols": cols})
        except BadRequest as e:
            if e.details.get("request") == io.request_id and self._answered:
                return  # the process ended while the resize was on its way
            raise

    async def _write_stdin(self, data: bytes | None) -> None:
        """Send ``data``, or EOF for None, after the writes before it."""
        # One writer at a time: the stream layer keeps a single credit waiter per channel.
        await self._stdin_lock.acquire()
        try:
            io = await self._wait_io()
            if data is None:
                io.send_eof(Channel.INPUT)
            else:
                await io.send(Channel.INPUT, data)
        finally:
            self._stdin_lock.release()

    # ---- the request ---------------------------------------------------------------

    async def _run(self, client: GuestClient, args: dict[str, Any]) -> ExecResult:
        try:
            if self._on_pty:
                await client.wait_ready()
                if "pty" not in client.agent_hello.get("features", ()):
                    raise UnknownOperation(
                        f"the agent in the guest ({client.agent_hello.get('software', 'unknown')}) cannot "
                        "run a program on a pty: install this vmcontroller's agent in the guest")
            io, reply = await client.open_request(self._op, args)
            self._io = io
            waiters, self._io_waiters = self._io_waiters, []
            for waiter in waiters:
                waiter.callback(io)
            readers = [Deferred.fromCoroutine(self._read(io, channel)) for channel in self._collected]
            if isinstance(self._stdin, bytes):
                Deferred.fromCoroutine(self._feed(io, self._stdin)).addErrback(lambda _: None)
            status = await reply
            self._answered = True
            for reader in readers:
                await reader
        except CancelledError:
            if self._local_failure is not None:
                self._local_failure.raiseException()
            raise OperationCancelled(f"{list(self._argv)!r} was cancelled: "
                                     "the agent kills its process group in the guest") from None
        stdout, stderr = (bytes(self._collected[channel]) for channel in (Channel.STDOUT, Channel.STDERR))
        dropped = {name: int(count) for name, count in (status.get("output_dropped") or {}).items()}
        return ExecResult(tuple(status.get("argv") or self._argv), status.get("exit_code"),
                          status.get("signal"), stdout, stderr, status.get("exec_id"), dropped)

    @staticmethod
    async def _feed(io: RequestIO, data: bytes) -> None:
        # Fails quietly when the process ends before reading it all: the result says how it ended.
        await io.send(Channel.INPUT, data)
        io.send_eof(Channel.INPUT)

    async def _read(self, io: RequestIO, channel: int) -> None:
        callback = self._callbacks[channel]
        try:
            while (chunk := await io.receive(channel)) is not None:
                if callback is None:
                    collected = self._collected[channel]
                    if len(collected) + len(chunk) > self._max_output:
                        collected.clear()  # not wanted any more
                        name = Channel(channel).name.lower()
                        self._local_failure = Failure(LimitExceeded(
                            f"{list(self._argv)!r} wrote more than {self._max_output} bytes to {name}; "
                            f"it was cancelled in the guest: pass on_{name} to stream its output, or a "
                            "larger max_output"))
                        self.cancel()
                        return
                    collected += chunk
                    continue
                try:
                    waiting = callback(bytes(chunk))  # callbacks get bytes, as documented
                    if waiting is not None:
                        await waiting
                except CancelledError:
                    return
                except Exception:  # any error of the user's callback ends the exec
                    self._local_failure = Failure()
                    self.cancel()
                    return
        except (VMControllerError, CancelledError):
            return  # the request failed or was cancelled: its result says why

    def _settle(self, outcome: ExecResult | Failure) -> None:
        self._outcome = outcome
        if isinstance(outcome, Failure):
            # Writes still waiting for the request to open never will.
            io_waiters, self._io_waiters = self._io_waiters, []
            for io_waiter in io_waiters:
                io_waiter.errback(outcome)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)


def start(client: GuestClient, argv: list[str], *, env: dict[str, str] | None, cwd: str | None,
          stdin: bytes | type[STREAM] | None, timeout: float | None, on_stdout: OutputCallback | None,
          on_stderr: OutputCallback | None, max_output: int | None = None,
          exec_id: str | None = None, pty: Terminal | None = None) -> ExecHandle:
    """
    Start ``argv`` in the guest; see :meth:`GuestClient.exec`.

    :raises BadRequest: ``argv`` is not a non-empty list of strings, or both ``exec_id``
        and ``pty`` are given.
    """
    if not isinstance(argv, list | tuple) or not argv or not all(isinstance(a, str) for a in argv):
        raise BadRequest(f"exec needs argv, a non-empty list of strings; got {argv!r}")
    args: dict[str, Any] = {"argv": list(argv), "env": env, "cwd": cwd,
                            "stdin": "stream" if stdin is not None else "none", "timeout": timeout}
    if exec_id is not None:
        if pty is not None:
            raise BadRequest("a command on a pty cannot be retained: give exec_id or pty, not both")
        args["exec_id"] = exec_id
    if pty is not None:
        args["pty"] = pty.to_wire()
    limit = client.client_limits.max_output if max_output is None else max_output
    return ExecHandle(client, list(argv), args, stdin, on_stdout, on_stderr, limit)


def attach(client: GuestClient, exec_id: str, *, stdout_offset: int, stderr_offset: int,
           on_stdout: OutputCallback | None, on_stderr: OutputCallback | None) -> ExecHandle:
    """Stream a retained command's output and result; see :meth:`GuestClient.attach`."""
    args = {"exec_id": exec_id, "stdout_offset": stdout_offset, "stderr_offset": stderr_offset}
    return ExecHandle(client, [], args, None, on_stdout, on_stderr, client.client_limits.max_output,
                      op="attach")


@dataclass(frozen=True)
class CommandInfo:
    """
    A command the agent retains, as :meth:`GuestClient.commands` lists it.

    :ivar running: it has not ended yet; then ``exit_code``, ``signal`` and ``error`` are None.
    :ivar error: how it failed instead of exiting (a timeout, a cancel), as an exception.
    :ivar sizes: bytes of output kept, by stream ("stdout", "stderr").
    :ivar output_dropped: bytes beyond the agent's limits, by stream.
    """

    exec_id: str
    argv: tuple[str, ...]
    running: bool
    exit_code: int | None
    signal: str | None
    error: VMControllerError | None
    sizes: dict[str, int]
    output_dropped: dict[str, int]

    @classmethod
    def from_wire(cls, entry: dict[str, Any]) -> CommandInfo:
        """:raises ProtocolError: the agent's entry is not one."""
        try:
            error = entry.get("error")
            return cls(
                str(entry["exec_id"]), tuple(str(a) for a in entry["argv"]), entry["state"] == "running",
                entry.get("exit_code"), entry.get("signal"),
                error_from_wire(str(error["code"]), str(error["message"])) if error else None,
                {k: int(v) for k, v in entry["sizes"].items()},
                {k: int(v) for k, v in entry["output_dropped"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProtocolError(f"the agent listed a malformed command {entry!r}: {e!r}") from None


__all__ = [
    "STREAM", "CommandInfo", "ExecHandle", "ExecResult", "OutputCallback", "Terminal", "attach", "start",
]
