"""
The ``exec`` operation: run a program in the guest and stream its output to the host.

The program leads a session and process group of its own, so a timeout, a cancel or a
lost host kills it together with everything it started.  Twisted's ``spawnProcess`` has
no pre-exec hook (and, before Twisted 23.8, always forks), so :class:`_SessionProcess`
keeps Twisted's ``Process`` for the pipes and the reaping but replaces its fork with one
``os.posix_spawn(..., setsid=True)``: a single exec, no fork of the agent's memory (which
dominates under emulation).  The program's pid is its process group's id and the exit
status we reap is its own.

``posix_spawn`` cannot change directory (Python 3.11), so a request with a ``cwd`` goes
through ``reactor.spawnProcess`` and ``setsid(1)`` (util-linux or busybox), which calls
``setsid()`` and execs the program (a Python shim where ``setsid(1)`` is missing); so does
a program the kernel cannot exec itself (``ENOEXEC``: a script without ``#!``, which
``execvp`` hands to ``/bin/sh``).

With a ``pty`` argument the program runs on a new pseudo-terminal instead of pipes, as
the controlling terminal of its session (Twisted's ``usePTY``: ``setsid``, ``TIOCSCTTY``,
the terminal on fds 0-2), which costs a fork of the agent.  STDOUT carries what the
terminal shows, INPUT is typed into it (so a Ctrl-C byte interrupts the foreground job) and
``resize`` changes its size.

Output flows under the protocol's flow control: while the host withholds credit the
pipes are not read, so the program blocks on a full pipe, nothing is cut and the agent
buffers at most :data:`HIGH_WATER` bytes per stream.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import os
import re
import shutil
import signal
import struct
import sys
import termios
from dataclasses import dataclass
from typing import Any, Protocol, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import (
    IProcessTransport,
    IPushProducer,
    IReactorProcess,
)
from twisted.internet.process import Process, PTYProcess, _listOpenFDs
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from guest_agent.link import RequestIO
from guest_agent.ops._checks import os_string
from guest_agent.protocol.errors import (
    AgentOSError,
    BadRequest,
    CommandNotFound,
    ConnectionLost,
    NotADirectory,
    OperationCancelled,
    OperationTimeout,
    PathNotFound,
    PermissionDenied,
    VMControllerError,
)
from guest_agent.protocol.frames import Channel
from guest_agent.session import Operation, OperationContext

#: The PATH of a process given an ``env`` of its own without one.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Bytes of one output stream held for the host before the pipes stop being read.
HIGH_WATER = 256 * 1024
_OUTPUTS = (Channel.STDOUT, Channel.STDERR)
_SETSID_SHIM = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"
#: The most rows or columns a terminal may have: enough for any screen, and far from what
#: a program that allocates rows x columns cells would choke on.
MAX_TERMINAL_SIDE = 4096
#: The TERM of a pty exec that names none.
DEFAULT_TERM = "vt100"
#: What a TERM value may be: a terminfo entry's name.
TERM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_WINSIZE = struct.Struct("HHHH")


@functools.cache
def _launcher() -> tuple[str, ...]:
    """The command that starts a program as the leader of a new session."""
    setsid = shutil.which("setsid", path=DEFAULT_PATH)
    if setsid is not None:
        return (setsid,)
    return (sys.executable, "-I", "-S", "-c", _SETSID_SHIM)


def window_size(args: dict[str, Any], what: str) -> tuple[int, int]:
    """
    The ``rows`` and ``cols`` of ``args``.

    :raises BadRequest: either is not an integer from 1 to :data:`MAX_TERMINAL_SIDE`.
    """
    sides = []
    for name in ("rows", "cols"):
        value = args.get(name)
        if type(value) is not int or not 1 <= value <= MAX_TERMINAL_SIDE:
            raise BadRequest(f"{what} '{name}' must be an integer from 1 to {MAX_TERMINAL_SIDE}; "
                             f"got {str(value)[:100]}")
        sides.append(value)
    return sides[0], sides[1]


@dataclass(frozen=True)
class PtyRequest:
    """The ``pty`` argument of an ``exec`` request, checked: the terminal to open."""

    rows: int
    cols: int
    term: str

    @classmethod
    def from_wire(cls, value: Any) -> PtyRequest:
        """:raises BadRequest: not an object of ``rows``, ``cols`` and an optional ``term``."""
        if not isinstance(value, dict) or not set(value) <= {"rows", "cols", "term"}:
            raise BadRequest("exec 'pty' must be null or an object of 'rows', 'cols' and 'term'; "
                             f"got {str(value)[:200]}")
        rows, cols = window_size(value, "exec 'pty'")
        term = value.get("term", DEFAULT_TERM)
        if not isinstance(term, str) or not TERM_NAME.fullmatch(term):
            raise BadRequest("exec 'pty' 'term' must be a terminal type such as \"xterm-256color\" "
                             f"(letters, digits and ._+-, at most 64); got {str(term)[:100]!r}")
        return cls(rows, cols, term)


#: At most this much is read from a terminal once its program has exited: a background
#: job may write on for ever.
TERMINAL_REMAINS = 1024 * 1024


def read_terminal_remains(master: int) -> list[bytes]:
    """
    What the terminal of pty master ``master`` holds now (up to :data:`TERMINAL_REMAINS`
    bytes).  Linux's ``read`` of a master first moves along what was written to the
    terminal and is still on its way, so this is all that was written before the call.
    """
    chunks: list[bytes] = []
    taken = 0
    while taken < TERMINAL_REMAINS:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EAGAIN: nothing more now; EIO: nobody else holds the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
        taken += len(chunk)
    return chunks


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """
    Give the terminal of ``fd`` its size; the kernel sends SIGWINCH to the terminal's
    foreground process group when the size changes, as it does for any TIOCSWINSZ.
    """
    fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(rows, cols, 0, 0))


@dataclass(frozen=True)
class ExecRequest:
    """The arguments of an ``exec`` request, checked."""

    argv: list[str]
    env: dict[str, str] | None
    cwd: str | None
    stream_stdin: bool
    timeout: float | None
    pty: PtyRequest | None = None

    @classmethod
    def from_wire(cls, args: dict[str, Any]) -> ExecRequest:
        """:raises BadRequest: an argument is missing or of the wrong type."""
        argv = args.get("argv")
        if not (isinstance(argv, list) and argv):
            raise BadRequest(f"exec needs 'argv', a non-empty list of strings; got {str(argv)[:200]}")
        for number, arg in enumerate(argv):
            os_string(arg, f"exec 'argv[{number}]'")
        env = args.get("env")
        if env is not None:
            if not isinstance(env, dict) or not all(k and "=" not in k for k in env):
                raise BadRequest("exec 'env' must be null or an object of names (without '=') to strings")
            for name, value in env.items():
                os_string(name, "an exec 'env' name")
                os_string(value, f"exec 'env' value of {name[:100]!r}")
        cwd = args.get("cwd")
        if cwd is not None:
            os_string(cwd, "exec 'cwd'")
        stdin = args.get("stdin", "none")
        if stdin not in ("none", "stream"):
            raise BadRequest(f"exec 'stdin' must be \"none\" or \"stream\"; got {stdin!r}")
        timeout = args.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise BadRequest(f"exec 'timeout' must be null or a positive number of seconds; got {timeout!r}")
        pty = None if args.get("pty") is None else PtyRequest.from_wire(args["pty"])
        return cls(argv, env, cwd, stdin == "stream", timeout, pty)

    def timeout_error(self) -> OperationTimeout:
        """What the request ends with when its timeout passes."""
        return OperationTimeout(
            f"{self.argv[0]!r} ran past its timeout of {self.timeout:g} s: its process group "
            "was killed with SIGKILL; give a longer timeout", {"timeout": self.timeout})

    def cancelled_error(self, reason: dict[str, Any]) -> OperationCancelled:
        """What the request ends with when the host cancels it with ``reason`` (a CANCEL's body)."""
        return OperationCancelled(
            f"{self.argv[0]!r} was cancelled ({reason.get('reason', 'no reason given')}): "
            "its process group was killed with SIGKILL")

    def environment(self) -> dict[str, str]:
        """
        The agent's environment, or the given one over a minimal default; on a pty,
        ``TERM`` is the terminal's type.
        """
        environment = dict(os.environ) if self.env is None else {"PATH": DEFAULT_PATH, **self.env}
        if self.pty is not None:
            environment["TERM"] = self.pty.term
        return environment

    def check_runnable(self, environment: dict[str, str]) -> str:
        """
        Fail before spawning, with the path at fault, when the program or the working
        directory is missing: once spawned, the failure would only be an exit status.

        :return: the program's path, absolute.
        :raises PathNotFound: ``cwd`` does not exist.
        :raises NotADirectory: ``cwd`` is not a directory.
        :raises CommandNotFound: the program is not an executable file.
        """
        if self.cwd is not None:
            if not os.path.exists(self.cwd):
                raise PathNotFound(f"the working directory {self.cwd!r} does not exist in the guest",
                                   {"path": self.cwd})
            if not os.path.isdir(self.cwd):
                raise NotADirectory(f"the working directory {self.cwd!r} is not a directory",
                                    {"path": self.cwd})
        program = self.argv[0]
        if "/" in program:
            path = os.path.join(self.cwd or os.getcwd(), program)
            if not os.path.isfile(path) or not os.access(path, os.X_OK):
                where = f" (relative to {self.cwd!r})" if self.cwd and not os.path.isabs(program) else ""
                raise CommandNotFound(f"{program!r} is not an executable file in the guest{where}",
                                      {"path": path})
            return os.path.abspath(path)
        search = environment.get("PATH", os.defpath)
        found = shutil.which(program, path=search)
        if found is None:
            raise CommandNotFound(f"no executable {program!r} in the guest's PATH {search!r}: "
                                  "give its full path or set PATH in env", {"path": program})
        return os.path.abspath(found)


def _file_actions(fdmap: dict[int, int], open_fds: dict[int, bool]) -> list[tuple[int, ...]]:
    """
    The ``posix_spawn`` file actions that give the child what Twisted's ``_setupChild``
    gives a forked one: child fd ``c`` open on the parent's ``fdmap[c]``, inheritable,
    and no other descriptor inherited.

    Each action runs in order in the child, so a ``dup2`` onto a child fd must not clobber
    a parent fd a later action still reads: every parent fd that is also a child fd (its
    own or another mapping's) is first copied to a spare fd, open neither in the parent
    nor in the child's map, and the mappings read the copy.  That copy also clears
    close-on-exec on a parent fd mapped to itself (``dup2(fd, fd)`` would leave the flag).

    :param fdmap: child fd to parent fd, as Twisted's ``Process`` builds it.
    :param open_fds: the parent's open fds, to whether each is inheritable.
    """
    taken = set(open_fds) | set(fdmap) | set(fdmap.values())
    spares = (fd for fd in itertools.count() if fd not in taken)
    copies = {parent: next(spares) for parent in sorted(set(fdmap.values()) & set(fdmap))}
    actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, parent, copy) for parent, copy in copies.items()]
    actions += [(os.POSIX_SPAWN_DUP2, copies.get(parent, parent), child)
                for child, parent in sorted(fdmap.items())]
    actions += [(os.POSIX_SPAWN_CLOSE, copy) for copy in copies.values()]
    # Close-on-exec fds go by themselves; an inheritable one the child is not given is closed.
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd, inheritable in sorted(open_fds.items())
                if inheritable and fd not in fdmap]
    return actions


def _open_fds() -> dict[int, bool]:
    """The agent's open fds, to whether each is inheritable."""
    fds: dict[int, bool] = {}
    for fd in _listOpenFDs():  # /proc/self/fd or /dev/fd where they are right (also in Twisted 22.4)
        with contextlib.suppress(OSError):  # the fd that listed the directory, closed since
            fds[fd] = os.get_inheritable(fd)
    return fds


class _SessionProcess(Process):
    """
    Twisted's ``Process`` (pipes, reaping, signals) around one ``os.posix_spawn`` of the
    program in a new session, instead of a fork (Twisted 22.4) or a ``posix_spawnp``
    without ``setsid`` (later Twisted).

    Construct it as ``reactor.spawnProcess`` constructs a ``Process``:
    ``_SessionProcess(reactor, executable, args, environment, None, protocol)``, with
    ``executable`` an absolute path.  ``__init__`` calls :meth:`_fork`, then connects the
    protocol and registers the pid for reaping; an ``OSError`` from the spawn (the exec
    failed) comes out of the constructor with the pipes already closed.
    """

    def _fork(self, path: str | None, uid: int | None, gid: int | None, executable: str,
              args: list[str], environment: dict[str, str], **kwargs: Any) -> None:
        # Overrides both Process._fork and what newer Twisted tries first from it,
        # _trySpawnInsteadOfFork (same signature in Twisted 22.4 and 26.x).
        assert path is None and uid is None and gid is None, "no cwd or credentials here"
        ignored = [number for number in range(1, signal.NSIG)
                   if signal.getsignal(number) == signal.SIG_IGN]  # SIGPIPE, for one
        self.pid = os.posix_spawn(executable, args, environment,
                                  file_actions=_file_actions(kwargs["fdmap"], _open_fds()),
                                  setsigdef=ignored, setsid=True)
        self.status = -1


def _status(reason: Failure) -> dict[str, Any]:
    code = getattr(reason.value, "exitCode", None)
    number = getattr(reason.value, "signal", None)
    name = None
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"SIG{number}"
    return {"exit_code": code, "signal": name, "timed_out": False}


class _Pipes(Protocol):
    """
    What Twisted's ``Process`` offers over its pipes beyond :class:`IProcessTransport`:
    pausing the output pipes and a producer for stdin.
    """

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


@implementer(IPushProducer)
class _StdinGate:
    """Holds back the host's stdin while the pipe to the program is full."""

    def __init__(self) -> None:
        self._waiting: Deferred[None] | None = None
        self._paused = False

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        # The pipe is gone: what the host still sends is dropped, as Process.write does.
        self.resumeProducing()

    async def wait(self) -> None:
        if self._paused:
            self._waiting = Deferred()
            await self._waiting


async def _feed_stdin(io: RequestIO, transport: IProcessTransport) -> None:
    """Copy the host's INPUT stream to the program's stdin, then close it."""
    gate = _StdinGate()
    pipes = cast(_Pipes, transport)
    pipes.registerProducer(gate, True)
    try:
        while (chunk := await io.receive(Channel.INPUT)) is not None:
            transport.write(bytes(chunk))  # a large chunk is a bytearray: copied; bytes as they are
            await gate.wait()
    except (ConnectionLost, CancelledError):
        return  # the host went away or the program ended: nothing left to feed
    finally:
        pipes.unregisterProducer()
    transport.closeStdin()


class _ExecProcess(ProcessProtocol):
    """
    One running program: forwards its output to the host and settles the operation's
    outcome in :attr:`finished` once it has ended (or been stopped) and its output has
    gone out.
    """

    transport: IProcessTransport | None

    def __init__(self, io: RequestIO, on_pty: bool = False) -> None:
        self._io = io
        self._on_pty = on_pty
        self._pending: dict[int, bytearray] = {channel: bytearray() for channel in _OUTPUTS}
        self._open_pipes = set(_OUTPUTS)
        self._data_waiters: dict[int, Deferred[None]] = {}
        self._pumps: dict[int, Deferred[None]] = {}
        self._paused = False
        self._exited = False
        self._ended: Failure | None = None
        self._stopping: VMControllerError | None = None
        self._group = 0
        #: Fires with the RESPONSE's result, or fails with the error to send.
        self.finished: Deferred[dict[str, Any]] = Deferred()

    # -- the process side ------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None and self.transport.pid is not None
        # Kept: the transport forgets the pid once the leader is reaped, the group may live on.
        self._group = self.transport.pid
        self._pumps = {channel: Deferred.fromCoroutine(self._pump(channel)) for channel in _OUTPUTS}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        pending = self._pending.get(childFD)
        if pending is None:
            return
        pending += data
        self._throttle()
        self._wake(childFD)

    def childConnectionLost(self, childFD: int) -> None:
        self._open_pipes.discard(childFD)
        self._wake(childFD)

    def processExited(self, reason: Failure) -> None:
        self._exited = True
        if self._on_pty:
            self._hang_up()
        self._settle()

    def _hang_up(self) -> None:
        """
        The program that led the terminal's session has exited: take what the terminal
        still holds for us and close it, so that what is left on it (a background job)
        gets SIGHUP and the exec ends, as when a terminal window closes; otherwise any
        process holding the terminal would keep the request open.
        """
        transport = cast(PTYProcess, self.transport)
        if transport is None or not transport.connected:
            return  # every holder closed it already: the output has been read whole
        for chunk in read_terminal_remains(transport.fileno()):
            self.childDataReceived(Channel.STDOUT, chunk)
        transport.loseConnection()

    def processEnded(self, reason: Failure) -> None:
        self._ended = reason
        # Every pipe has closed by now; a pty reports no pipe closing at all, only this.
        closing, self._open_pipes = self._open_pipes, set()
        for channel in closing:
            self._wake(channel)
        self._settle()

    # -- control ------------------------------------------------------------------

    def resize(self, rows: int, cols: int) -> None:
        """
        Give the program's terminal a new size.

        :raises BadRequest: the terminal is closed: the program has ended.
        """
        transport = cast(PTYProcess, self.transport)
        if transport is None or not transport.connected:  # its fd is closed, maybe reused
            raise BadRequest("the terminal is closed: the program has ended")
        set_window_size(transport.fileno(), rows, cols)

    def stop(self, error: VMControllerError) -> None:
        """Kill the program's process group and fail the operation with ``error``."""
        if self._stopping is not None or self.finished.called:
            return
        self._stopping = error
        if self.transport is not None:
            # The leader first: it may not have called setsid() yet.
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess("KILL")
            _kill_group(self._group)
        self._settle()

    def _settle(self) -> None:
        if self.finished.called:
            return
        if self._stopping is not None:
            if self._exited and self.transport is not None:
                # Whoever still holds the pipes escaped the group: stop waiting for them.
                self.transport.loseConnection()
            if self._ended is not None:
                for pump in self._pumps.values():
                    pump.cancel()
                self.finished.errback(Failure(self._stopping))
        elif self._ended is not None and not self._pumps:
            for channel in _OUTPUTS:
                self._io.send_eof(channel)
            self.finished.callback(_status(self._ended))

    # -- output ---------------------------------------------------------------------

    def _throttle(self) -> None:
        congested = any(len(pending) >= HIGH_WATER for pending in self._pending.values())
        if congested != self._paused and self.transport is not None:
            self._paused = congested
            pipes = cast(_Pipes, self.transport)
            if congested:
                pipes.pauseProducing()
            else:
                pipes.resumeProducing()

    def _wake(self, channel: int) -> None:
        waiter = self._data_waiters.pop(channel, None)
        if waiter is not None:
            waiter.callback(None)

    async def _pump(self, channel: int) -> None:
        pending = self._pending[channel]
        try:
            while pending or channel in self._open_pipes:
                if not pending:
                    waiter: Deferred[None] = Deferred()
                    self._data_waiters[channel] = waiter
                    await waiter
                    continue
                chunk = bytes(pending)
                pending.clear()
                self._throttle()
                await self._io.send(channel, chunk)
        except CancelledError:
            return
        except ConnectionLost as e:
            del self._pumps[channel]
            self.stop(e)
            return
        del self._pumps[channel]
        self._settle()


def _spawn_in_session(reactor: IReactorProcess, protocol: ProcessProtocol, executable: str,
                      argv: list[str], environment: dict[str, str]) -> IProcessTransport:
    """Start ``executable`` as the leader of a new session, in the agent's directory."""
    return _SessionProcess(reactor, executable, argv, environment, None, protocol)


def _spawn(reactor: IReactorProcess, protocol: ProcessProtocol, executable: str,
           request: ExecRequest, environment: dict[str, str]) -> IProcessTransport:
    """
    Start the program as the leader of a new session: by ``posix_spawn`` without a
    ``cwd``, else (or for a file the kernel cannot exec) through :func:`_launcher`.

    :raises CommandNotFound: the exec found no file (its ``#!`` interpreter, say).
    :raises PermissionDenied: the exec was refused.
    :raises AgentOSError: the spawn failed otherwise (e.g. out of processes).
    """
    argv = request.argv
    try:
        if request.pty is not None:
            return _spawn_on_pty(reactor, protocol, executable, request, environment)
        if request.cwd is None and hasattr(os, "posix_spawn"):
            try:
                return _spawn_in_session(reactor, protocol, executable, argv, environment)
            except OSError as e:
                if e.errno != errno.ENOEXEC:
                    raise
                # No #! line: setsid(1) execs it with execvp, which runs such a file with /bin/sh.
        launcher = _launcher()
        return reactor.spawnProcess(protocol, launcher[0], [*launcher, *argv], environment, request.cwd)
    except OSError as e:
        details = {"path": executable, "errno": e.errno}
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise CommandNotFound(f"the guest could not run {executable!r}: {e.strerror} "
                                  "(a missing #! interpreter or ELF loader?)", details) from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDenied(f"the guest may not run {executable!r}: {e.strerror}",
                                   details) from None
        raise AgentOSError(f"the guest could not start {argv[0]!r}: {e}", {"errno": e.errno}) from None


def _spawn_on_pty(reactor: IReactorProcess, protocol: ProcessProtocol, executable: str,
                  request: ExecRequest, environment: dict[str, str]) -> IProcessTransport:
    """Start the program on a new terminal of ``request.pty``'s size, which leads its session."""
    assert request.pty is not None
    master, terminal = os.openpty()
    try:
        set_window_size(terminal, request.pty.rows, request.pty.cols)
        # Twisted's child calls setsid(), makes the terminal its controlling one
        # (TIOCSCTTY) and puts it on fds 0-2; the parent keeps the master, non-blocking.
        # (What reactor.spawnProcess does with usePTY, whose interface types it as a bool.)
        return cast(IProcessTransport, PTYProcess(reactor, executable, request.argv, environment, request.cwd,
                                                  protocol, usePTY=(master, terminal, os.ttyname(terminal))))
    except BaseException:
        os.close(master)
        os.close(terminal)
        raise


def _kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # every member has exited already
        os.killpg(group, signal.SIGKILL)


async def run_exec(ctx: OperationContext) -> dict[str, Any]:
    """
    Run ``argv`` and stream its stdout and stderr on the STDOUT and STDERR channels;
    return ``{"exit_code", "signal", "timed_out"}`` once it has exited and both streams
    have been sent and ended with EOF.

    :raises CommandNotFound, PermissionDenied, PathNotFound, NotADirectory: see :func:`_spawn`
        and :meth:`ExecRequest.check_runnable`.
    :raises OperationTimeout: ``timeout`` passed; the process group was killed.
    :raises OperationCancelled: the host cancelled; the process group was killed.
    """
    request = ExecRequest.from_wire(ctx.args)
    environment = request.environment()
    executable = request.check_runnable(environment)
    process = _ExecProcess(ctx.io, on_pty=request.pty is not None)
    transport = _spawn(IReactorProcess(ctx.reactor), process, executable, request, environment)
    if request.pty is not None:
        ctx.controls["resize"] = process.resize
    stdin: Deferred[None] | None = None
    if request.stream_stdin:
        stdin = Deferred.fromCoroutine(_feed_stdin(ctx.io, transport))
    else:
        transport.closeStdin()
    timer = None
    if request.timeout is not None:
        timer = ctx.reactor.callLater(request.timeout, process.stop, request.timeout_error())
    ctx.on_cancel(lambda reason: process.stop(request.cancelled_error(reason)))
    try:
        return await process.finished
    finally:
        if timer is not None and timer.active():
            timer.cancel()
        if stdin is not None:
            stdin.cancel()


def resize(ctx: OperationContext) -> None:
    """
    ``resize``: give the terminal of the pty exec ``request`` (a request in flight in this
    session) ``rows`` and ``cols``.

    :raises BadRequest: a size out of range, or ``request`` is not a pty exec in flight.
    """
    target = ctx.args.get("request")
    rows, cols = window_size(ctx.args, "resize")
    control = ctx.control_of(target, "resize") if type(target) is int else None
    if control is None:
        raise BadRequest(f"resize 'request' must be the id of a pty exec in flight in this session; got "
                         f"{str(target)[:100]} (an exec without 'pty', or one that has ended?)",
                         {"request": target if type(target) is int else None})
    control(rows, cols)


OPERATIONS: dict[str, Operation] = {"exec": run_exec, "resize": resize}
