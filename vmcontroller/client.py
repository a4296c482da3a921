"""
The host's client of a guest agent.

``connect(reactor, endpoint, credentials=...)`` returns a Deferred that fires with a
:class:`GuestClient` once the agent has proved it holds the VM's credentials and answered
the handshake.  Every operation returns a Deferred (use it
with ``await``); ``exec`` returns an :class:`ExecHandle` at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import IO, Any, cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from guest_agent.link import Link, RequestIO, SendGate
from guest_agent.protocol.connection import (
    SUPPORTED_VERSIONS,
    ErrorReceived,
    HandshakeComplete,
    HandshakeFailed,
    HostConnection,
    Limits,
    NotificationReceived,
    ResponseReceived,
    SessionReset,
)
from guest_agent.protocol.tls import Authenticator, Credentials
from vmcontroller import _exec, _files
from vmcontroller._exec import CommandInfo, ExecHandle, ExecResult, Terminal
from vmcontroller._files import Progress, TransferResult
from vmcontroller._results import check_result
from vmcontroller.errors import (
    AgentUnreachable,
    ConnectionLost,
    CredentialsUnavailable,
    OperationTimeout,
    ProtocolError,
    VMControllerError,
)

#: How often the handshake's SYNC is repeated until the agent answers: the agent may
#: still be booting, or a stale partial frame may have swallowed the first one.
SYNC_RETRY_INTERVAL = 1.0
#: The first delay before connecting again, doubled (with jitter) after each failure ...
CONNECT_RETRY_INTERVAL = 0.5
#: ... up to this.
RECONNECT_MAX_DELAY = 10.0

_log = Logger()
MIB = 1024 * 1024


@dataclass(frozen=True)
class ClientLimits:
    """
    What the host lets one agent make it spend, beyond the wire limits of
    :class:`~guest_agent.protocol.connection.Limits`.  An agent that breaks one is
    disconnected, with the reason logged and raised to what was in flight.

    :ivar call_timeout: seconds an operation that streams nothing (ping, stat, mkdir...)
        may take before it is cancelled with :class:`OperationTimeout`; None: no limit.
    :ivar cancel_grace: seconds the agent has to answer a CANCEL; an agent that has not
        is disconnected (its in-flight slot would otherwise be held for ever).
    :ivar partial_frame_timeout: seconds a frame may stay partly received.
    :ivar notification_rate: notifications per second the agent may send (a burst of as
        many is allowed).
    :ivar max_notification: bytes of one notification's payload; with the rate, this bounds
        the decoding work an agent's notifications cost the controller.
    :ivar liveness_interval: seconds of silence from the agent, while operations are in
        flight, after which it is pinged; one that does not answer within ``call_timeout``
        is disconnected (streaming operations have no timeout of their own).  None: never.
    :ivar max_output: bytes of one output stream ``exec``/``run`` collect without a callback.
    :ivar max_pull: bytes a pull accepts unless the call gives its own limit.
    """

    call_timeout: float | None = 300.0
    cancel_grace: float = 30.0
    partial_frame_timeout: float = 30.0
    notification_rate: float = 100.0
    max_notification: int = 16 * 1024
    liveness_interval: float | None = 60.0
    max_output: int = 64 * MIB
    max_pull: int = 16 * 1024 * MIB


class _Deadlines:
    """
    The timeouts of a client's calls on one reactor timer, not one each: a call adds its
    deadline and removes it when it ends; the timer, at the earliest deadline, cancels the
    calls past theirs and is set again for the next.  A controller serving many agents
    then schedules and cancels no timer per request (bench.scale's profile found the
    reactor's heap of per-request timers among the controller's larger costs).
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._due: dict[Deferred[Any], float] = {}
        self._expired: set[Deferred[Any]] = set()
        self._timer: IDelayedCall | None = None

    def add(self, waiting: Deferred[Any], timeout: float) -> None:
        """Cancel ``waiting`` unless it has ended within ``timeout`` seconds."""
        deadline = self._reactor.seconds() + timeout
        self._due[waiting] = deadline
        if self._timer is None:
            self._timer = self._reactor.callLater(timeout, self._expire)
        elif deadline < self._timer.getTime():
            self._timer.reset(timeout)

    def remove(self, waiting: Deferred[Any]) -> bool:
        """Forget ``waiting``; whether its deadline passed (and it was cancelled)."""
        self._due.pop(waiting, None)
        if waiting in self._expired:
            self._expired.discard(waiting)
            return True
        return False

    def _expire(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        for waiting in [w for w, deadline in self._due.items() if deadline <= now]:
            del self._due[waiting]
            self._expired.add(waiting)
            waiting.cancel()
        if self._due and self._timer is None:
            self._timer = self._reactor.callLater(max(0.0, min(self._due.values()) - now), self._expire)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


@dataclass
class _Pending:
    op: str
    io: RequestIO
    result: Deferred[Any]


class GuestClient:
    """
    A session with one guest agent over one transport.

    Not made directly: use :func:`connect`.

    :param authenticator: the host's end of the VM's credentials; None only in development
        mode.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        limits: Limits | None = None,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        client_limits: ClientLimits | None = None,
        *,
        authenticator: Authenticator | None,
    ) -> None:
        self.reactor = reactor
        self.client_limits = client_limits or ClientLimits()
        self._connection = HostConnection(
            limits, versions, {"software": "vmcontroller"}, authenticator=authenticator
        )
        self._link = Link(self._connection, self._write)
        self._transport: ITransport | None = None
        self._pending: dict[int, _Pending] = {}
        self._ready_waiters: list[Deferred[None]] = []
        #: Set by connect(): reconnects the transport, with backoff, whenever it is lost.
        self._service: ClientService | None = None
        #: Why the last connection attempt failed or the last connection ended, for the error
        #: of a connect() that gives up.
        self.last_connect_error: BaseException | None = None
        self._sync_timer: IDelayedCall | None = None
        self._closed: BaseException | None = None
        self._slots: DeferredSemaphore | None = None
        # Requests cancelled and not yet answered: each holds its in-flight slot, and a
        # timer that disconnects an agent that ignores the CANCEL.
        self._cancelled: dict[int, tuple[DeferredSemaphore, IDelayedCall]] = {}
        self._partial_frame_timer: IDelayedCall | None = None
        self._deadlines = _Deadlines(reactor)
        self._last_heard = reactor.seconds()
        self._liveness: LoopingCall | None = None
        self._probing = False
        self._notification_tokens = self.client_limits.notification_rate
        self._notification_time = reactor.seconds()
        self.notifications: list[Callable[[str, dict[str, Any]], None]] = []
        #: The agent's HELLO: its version, limits and software.
        self.agent_hello: dict[str, Any] = {}

    @property
    def authenticated(self) -> bool:
        """The session runs inside TLS with this VM's agent (False in development mode)."""
        return self._connection.authenticated

    @property
    def tls_cipher(self) -> str | None:
        """The TLS cipher suite of the session, e.g. ``TLS_AES_256_GCM_SHA384``."""
        return self._connection.tls_cipher

    # ---- transport side ----------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def _transport_connected(self, transport: ITransport) -> None:
        self._transport = transport
        self._resync()

    def _resync(self) -> None:
        """Start a new session: SYNC, repeated until the agent answers."""
        self._connection.start()
        self._link.flush()
        if self._sync_timer is not None and self._sync_timer.active():
            self._sync_timer.cancel()
        self._sync_timer = self.reactor.callLater(SYNC_RETRY_INTERVAL, self._resync)

    def _data_received(self, data: bytes) -> None:
        if self._closed is not None:
            return  # dropped: what still arrives before the channel closes is ignored
        self._last_heard = self.reactor.seconds()
        try:
            events = self._connection.receive_data(data)
        except ProtocolError as e:
            self._drop(e)
            return
        for event in events:
            if self._closed is not None:
                return  # an event before dropped the agent
            if self._link.route_stream_event(event):
                continue
            if isinstance(event, ResponseReceived):
                self._answered(event.request_id, event.result)
            elif isinstance(event, ErrorReceived):
                if event.request_id == 0:
                    self.log.warn("Agent rejected the session: {error}", error=event.error)
                    self._session_failed(event.error)
                else:
                    self._answered(event.request_id, Failure(event.error))
            elif isinstance(event, HandshakeComplete):
                self._handshake_complete(event)
            elif isinstance(event, HandshakeFailed):
                self._handshake_failed(event.error)
            elif isinstance(event, SessionReset):
                self._session_failed(
                    ConnectionLost(
                        f"{event.reason}: operations in flight were abandoned and their outcome "
                        "in the guest is unknown; retry them"
                    )
                )
            elif isinstance(event, NotificationReceived):
                if event.size > self.client_limits.max_notification:
                    self._drop(ProtocolError(
                        f"the agent sent a notification of {event.size} bytes, more than "
                        f"{self.client_limits.max_notification} (the limit max_notification)"))
                    return
                if not self._take_notification_token():
                    self._drop(ProtocolError(
                        f"the agent sent notifications faster than {self.client_limits.notification_rate:g} "
                        "per second (the limit notification_rate)"))
                    return
                for observer in list(self.notifications):
                    observer(event.name, event.body)
        self._link.flush()
        self._time_partial_frame()

    def _take_notification_token(self) -> bool:
        """A token bucket: ``notification_rate`` per second, as many at once."""
        rate = self.client_limits.notification_rate
        now = self.reactor.seconds()
        refill = (now - self._notification_time) * rate
        self._notification_tokens = min(rate, self._notification_tokens + refill)
        self._notification_time = now
        if self._notification_tokens < 1:
            return False
        self._notification_tokens -= 1
        return True

    def _time_partial_frame(self) -> None:
        """
        A timer runs from the first byte of a frame to its last, not reset as bytes trickle
        in: an agent sending one byte a second must not hold a frame open for ever.
        """
        if not self._connection.is_open or not self._connection.partial_frame_bytes:
            if self._partial_frame_timer is not None and self._partial_frame_timer.active():
                self._partial_frame_timer.cancel()
            self._partial_frame_timer = None
        elif self._partial_frame_timer is None:
            timeout = self.client_limits.partial_frame_timeout
            self._partial_frame_timer = self.reactor.callLater(timeout, self._partial_frame_expired, timeout)

    def _partial_frame_expired(self, timeout: float) -> None:
        self._partial_frame_timer = None
        self._drop(ProtocolError(
            f"the agent left a frame unfinished for {timeout:g} s "
            f"({self._connection.partial_frame_bytes} bytes of it arrived; the limit partial_frame_timeout)"))

    def _drop(self, error: VMControllerError) -> None:
        """
        Disconnect an agent that broke the protocol or one of the host's limits: log why,
        fail everything in flight with ``error`` and close the channel.
        """
        if self._closed is not None:
            return
        self.log.warn("Disconnecting the agent: {error}", error=error)
        self._closed = error
        self._fail_pending(error)
        self._fire_ready(error)
        self.close()

    def _transport_lost(self, reason: Failure) -> None:
        self._transport = None
        self._stop_sync_timer()
        self._stop_liveness()
        reconnecting = self._service is not None and self._closed is None
        error = self._closed or ConnectionLost(
            f"the channel to the agent closed: {reason.getErrorMessage()}; what was in flight has an "
            "unknown outcome in the guest" + ("; reconnecting" if reconnecting else ""))
        self.last_connect_error = error
        # In flight: failed at once.  Later operations wait for the next session, unless
        # nothing will reconnect.
        self._fail_pending(error)
        if not reconnecting:
            self._closed = error
            self._fire_ready(error)

    # ---- session state -------------------------------------------------------------

    def _stop_sync_timer(self) -> None:
        if self._sync_timer is not None and self._sync_timer.active():
            self._sync_timer.cancel()
        self._sync_timer = None

    def _handshake_complete(self, event: HandshakeComplete) -> None:
        self._stop_sync_timer()
        self.agent_hello = event.peer
        max_inflight = self._connection.peer_limits.max_inflight
        # One semaphore across sessions: callers waiting on it keep their place.
        if self._slots is None or self._slots.limit != max_inflight:
            self._slots = DeferredSemaphore(max_inflight)
        interval = self.client_limits.liveness_interval
        if interval is not None and self._liveness is None:
            self._liveness = LoopingCall(self._check_liveness, interval)
            self._liveness.clock = self.reactor
            self._liveness.start(interval, now=False)
        self._fire_ready(None)

    def _stop_liveness(self) -> None:
        if self._liveness is not None and self._liveness.running:
            self._liveness.stop()
        self._liveness = None

    def _check_liveness(self, interval: float) -> None:
        """Ping an agent silent for ``interval`` while operations wait on it."""
        silent = self.reactor.seconds() - self._last_heard
        # With every slot taken a ping would only queue: liveness is then unknown.
        if self._probing or not self._pending or silent < interval:
            return
        if self._slots is None or not self._slots.tokens:
            return
        self._probing = True
        timeout = self.client_limits.call_timeout or interval
        waiting = len(self._pending)

        def failed(failure: Failure) -> None:
            if failure.check(OperationTimeout):
                self._drop(ProtocolError(
                    f"the agent sent nothing for {silent:g} s while {waiting} operations waited on it, "
                    f"and did not answer a ping within {timeout:g} s (the limit liveness_interval)"))

        def probed(outcome: object) -> None:
            self._probing = False

        probe = Deferred.fromCoroutine(self.call("ping", timeout=timeout))
        probe.addErrback(failed).addBoth(probed)

    def _handshake_failed(self, error: VMControllerError) -> None:
        self._stop_sync_timer()
        self._closed = error
        self._fire_ready(error)
        self.close()

    def _session_failed(self, error: VMControllerError) -> None:
        """Fail what was in flight with ``error`` and start a fresh session."""
        # The new session first: a caller that retries from an errback below must wait
        # for it, not write into the session being torn down.
        if self._transport is not None:
            self._resync()
        self._fail_pending(error)

    def _fail_pending(self, error: BaseException) -> None:
        pending, self._pending = self._pending, {}
        cancelled, self._cancelled = self._cancelled, {}
        for slots, timer in cancelled.values():
            if timer.active():
                timer.cancel()
            slots.release()
        for request in pending.values():
            # An errback of one may have cancelled another (a caller's cleanup).
            if not request.result.called:
                request.result.errback(Failure(error))
        self._link.fail_all(error)

    def _fire_ready(self, error: BaseException | None) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(Failure(error))

    async def wait_ready(self) -> None:
        """Wait until a session is open (after a resynchronisation, say)."""
        if self._closed is not None:
            raise self._closed
        if self.connected:
            return
        waiter: Deferred[None] = Deferred()
        self._ready_waiters.append(waiter)
        await waiter

    def _answered(self, request_id: int, outcome: Any) -> None:
        """The agent answered: a request still wanted completes, a cancelled one frees its slot."""
        cancelled = self._cancelled.pop(request_id, None)
        if cancelled is not None:
            slots, timer = cancelled
            timer.cancel()
            slots.release()
        pending = self._pending.get(request_id)
        if pending is not None and not isinstance(outcome, Failure):
            try:
                check_result(pending.op, outcome)
            except ProtocolError as e:
                self._drop(e)
                return
        self._complete(request_id, outcome)

    def _complete(self, request_id: int, outcome: Any) -> None:
        pending = self._pending.pop(request_id, None)
        self._link.close_io(request_id)
        if pending is None:
            return
        # The result first: a stream waiter woken by the failure may cancel the result.
        if isinstance(outcome, Failure):
            pending.result.errback(outcome)
            pending.io.fail(outcome.value or ConnectionLost("the request failed"))
        else:
            pending.result.callback(outcome)
            pending.io.fail(ConnectionLost("the request already ended"))

    # ---- requests ------------------------------------------------------------------

    async def open_request(
        self, op: str, args: dict[str, Any] | None = None
    ) -> tuple[RequestIO, Deferred[Any]]:
        """
        Send a request and return its streams and a Deferred of its result.  Waits for a
        session and for a free slot under the agent's in-flight limit.
        """
        await self.wait_ready()
        assert self._slots is not None
        slots = self._slots
        await slots.acquire()
        try:
            await self.wait_ready()
            request_id = self._connection.send_request(op, args)
        except BaseException:
            slots.release()
            raise
        io = self._link.open_io(request_id)

        def cancel(result: Deferred[Any]) -> None:
            # The agent stops the operation; its reply is then ignored.  The slot stays
            # taken until that reply: the agent still counts the request as in flight.
            if self._pending.pop(request_id, None) is not None:
                self._connection.send_cancel(request_id, {"reason": "cancelled by the host"})
                self._link.flush()
                self._link.close_io(request_id)
                io.fail(CancelledError())
                grace = self.client_limits.cancel_grace
                self._cancelled[request_id] = (slots, self.reactor.callLater(
                    grace, self._cancel_ignored, request_id, op, grace))

        result: Deferred[Any] = Deferred(cancel)

        def release(outcome: Any) -> Any:
            if request_id not in self._cancelled:
                slots.release()
            return outcome

        result.addBoth(release)
        self._pending[request_id] = _Pending(op, io, result)
        self._link.flush()
        return io, result

    def _cancel_ignored(self, request_id: int, op: str, grace: float) -> None:
        # Dropping frees every slot, this one's too, once waiters can only fail.
        self._drop(ProtocolError(
            f"the agent did not answer the CANCEL of {op} (request {request_id}) within {grace:g} s "
            "(the limit cancel_grace)"))

    async def call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """
        Run an operation that streams nothing and return its result.

        :param timeout: seconds before the operation is cancelled; None: the client's
            ``call_timeout`` (see :class:`ClientLimits`).
        :raises OperationTimeout: it took longer.
        """
        timeout = self.client_limits.call_timeout if timeout is None else timeout
        _, result = await self.open_request(op, args)
        if timeout is None:
            return await result
        self._deadlines.add(result, timeout)
        try:
            return await result
        except CancelledError:
            if not self._deadlines.remove(result):
                raise  # the caller's cancel
            raise OperationTimeout(
                f"the agent did not answer {op} within {timeout:g} s; it was cancelled "
                "(pass a longer timeout, or check the guest's load)", {"timeout": timeout}) from None
        finally:
            self._deadlines.remove(result)

    # ---- operations ----------------------------------------------------------------

    def ping(self) -> Deferred[dict[str, Any]]:
        """Round trip to the agent; fires with the agent's clock and version."""
        return Deferred.fromCoroutine(self.call("ping"))

    def info(self) -> Deferred[dict[str, Any]]:
        """Hostname, kernel, OS release, uptime, load, memory, disk and agent version."""
        return Deferred.fromCoroutine(self.call("info"))

    def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | type[_exec.STREAM] | None = None,
        timeout: float | None = None,
        on_stdout: _exec.OutputCallback | None = None,
        on_stderr: _exec.OutputCallback | None = None,
        exec_id: str | None = None,
        max_output: int | None = None,
        pty: Terminal | None = None,
    ) -> ExecHandle:
        """
        Start ``argv`` in the guest.  Output goes to ``on_stdout``/``on_stderr`` as it is
        produced (a callback that returns a Deferred holds the output back until it fires)
        or, without a callback, is collected whole in the :class:`ExecResult`.
        ``stdin`` is bytes to feed, None for none, or :data:`STREAM` to write it through
        the handle.  ``timeout`` kills the process group in the guest.  Collected output
        is limited to ``max_output`` bytes per stream (by default
        :attr:`ClientLimits.max_output`): past it the process is cancelled and the result
        fails with :class:`LimitExceeded`.

        With an ``exec_id`` (1 to 128 letters, digits or ``._:@-``, chosen by the caller)
        the agent retains the command: it runs on when the channel or this controller goes
        away, and its output and exit status wait in the guest until :meth:`acknowledge`;
        :meth:`attach` collects them, and ``exec`` with the same id and ``argv`` again
        streams the same command from the start instead of starting another.

        With ``pty`` (a :class:`Terminal`) the process runs on a new pseudo-terminal of
        that size and type, which leads its session: ``on_stdout`` gets what the terminal
        shows (stdout and stderr together, with the terminal's line endings), stdin bytes
        are typed into it (``b"\\x03"`` interrupts, as Ctrl-C does; closing stdin sends
        nothing: type ``b"\\x04"``), and :meth:`ExecHandle.resize` changes its size.  Such
        a process cannot be retained (no ``exec_id``).

        :raises TooManyCommands: (from the result) the agent retains as many commands as it may.
        :raises AlreadyExists: (from the result) ``exec_id`` names a command with another argv.
        :raises UnknownOperation: (from the result) ``pty`` asked of an agent too old for it.
        """
        return _exec.start(
            self,
            argv,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout=timeout,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            exec_id=exec_id,
            max_output=max_output,
            pty=pty,
        )

    def attach(
        self,
        exec_id: str,
        *,
        stdout_offset: int = 0,
        stderr_offset: int = 0,
        on_stdout: _exec.OutputCallback | None = None,
        on_stderr: _exec.OutputCallback | None = None,
    ) -> ExecHandle:
        """
        Stream a retained command's output from the given byte offsets (what the caller
        has already) and then its result, live while it runs.  Cancelling the handle
        kills the command, as for :meth:`exec`; losing the channel does not.

        :raises UnknownCommand: (from the result) the agent retains no such command.
        """
        return _exec.attach(self, exec_id, stdout_offset=stdout_offset, stderr_offset=stderr_offset,
                            on_stdout=on_stdout, on_stderr=on_stderr)

    def commands(self) -> Deferred[list[CommandInfo]]:
        """The commands the agent retains (started with an ``exec_id``), oldest first."""

        async def listing() -> list[CommandInfo]:
            reply = await self.call("commands")
            entries = reply.get("commands") if isinstance(reply, dict) else None
            if not isinstance(entries, list):
                raise ProtocolError(f"the agent's command list is malformed: {reply!r}")
            return [CommandInfo.from_wire(entry) for entry in entries]

        return Deferred.fromCoroutine(listing())

    def acknowledge(self, exec_id: str) -> Deferred[None]:
        """
        Tell the agent the result of retained command ``exec_id`` is safe with the
        caller: it forgets the command and its output.

        :raises UnknownCommand: the agent retains no such command.
        :raises BadRequest: the command is still running.
        """
        return Deferred.fromCoroutine(self.call("acknowledge", {"exec_id": exec_id}))

    def run(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        max_output: int | None = None,
    ) -> Deferred[ExecResult]:
        """
        Run ``argv`` to completion and fire with its whole output and exit status.

        :raises LimitExceeded: it wrote more than ``max_output`` bytes to one stream (see
            :meth:`exec`).
        """
        return self.exec(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                         max_output=max_output).result(check=check)

    def push(
        self,
        source: str | IO[bytes],
        destination: str,
        *,
        mode: int | None = None,
        progress: Progress | None = None,
    ) -> Deferred[TransferResult]:
        """Copy a host file (path or binary file object) to ``destination`` in the guest."""
        return Deferred.fromCoroutine(_files.push(self, source, destination, mode=mode, progress=progress))

    def pull(
        self,
        source: str,
        destination: str | IO[bytes],
        *,
        mode: int | None = None,
        max_size: int | None = None,
        progress: Progress | None = None,
    ) -> Deferred[TransferResult]:
        """
        Copy the guest file ``source`` to a host path or binary file object.  The host
        decides the file's ``mode`` (by default ``0o666`` less the umask) and the largest
        size accepted (by default :attr:`ClientLimits.max_pull`); see :func:`_files.pull`.
        """
        return Deferred.fromCoroutine(
            _files.pull(self, source, destination, mode=mode, max_size=max_size, progress=progress)
        )

    def mkdir(self, path: str, *, parents: bool = False, mode: int = 0o755) -> Deferred[None]:
        return Deferred.fromCoroutine(self.call("mkdir", {"path": path, "parents": parents, "mode": mode}))

    def list(self, path: str) -> Deferred[list[dict[str, Any]]]:
        """The entries of a guest directory, each with name, type, size, mode and mtime."""
        return Deferred.fromCoroutine(self.call("list", {"path": path}))

    def stat(self, path: str) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self.call("stat", {"path": path}))

    def remove(self, path: str, *, recursive: bool = False) -> Deferred[None]:
        return Deferred.fromCoroutine(self.call("remove", {"path": path, "recursive": recursive}))

    def shutdown(self) -> Deferred[None]:
        """Ask the guest OS to power off; fires once the agent has accepted."""
        return Deferred.fromCoroutine(self.call("shutdown"))

    def reboot(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.call("reboot"))

    @property
    def reconnects(self) -> bool:
        """The client connects again by itself when its channel is lost (see :func:`connect`)."""
        return self._service is not None

    @property
    def connected(self) -> bool:
        """A session with the agent is open now."""
        return self._connection.is_open and self._transport is not None

    def close(self) -> Deferred[None]:
        """
        Close the channel and stop reconnecting; what is in flight, and what waits for a
        session, fails with :class:`ConnectionLost`.  Fires once the channel is closed.
        """
        self._stop_sync_timer()
        self._stop_liveness()
        self._deadlines.stop()
        if self._transport is not None:
            # A registered producer would keep a closing transport open while it produces.
            cast(IConsumer, self._transport).unregisterProducer()
        closed: Deferred[None]
        if self._service is not None:
            service, self._service = self._service, None
            closed = maybeDeferred(service.stopService)
        else:
            closed = succeed(None)
            if self._transport is not None:
                self._transport.loseConnection()
        if self._transport is None and self._closed is None:
            self._closed = ConnectionLost("the client was closed")
            self._fire_ready(self._closed)
        return closed


class _AgentProtocol(Protocol):
    """Feeds a :class:`GuestClient`; all protocol logic is in the client's engine."""

    def __init__(self, client: GuestClient) -> None:
        self.client = client

    def connectionMade(self) -> None:
        assert self.transport is not None
        # Reading goes on while the transport's buffer is full: only stream data waits.
        cast(IConsumer, self.transport).registerProducer(SendGate(self.client._link), True)
        self.client._transport_connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.client._data_received(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.client._transport_lost(reason or Failure(ConnectionLost("closed")))


#: What :func:`connect` reaches the agent through: an endpoint, or a function that finds
#: one (returning a Deferred of it), asked again before each connection attempt.
EndpointSource = IStreamClientEndpoint | Callable[[], Deferred[IStreamClientEndpoint]]


@implementer(IStreamClientEndpoint)
class _AttemptEndpoint:
    """
    The endpoint the client's ClientService connects through: before each attempt it asks
    ``find`` for the agent's endpoint, which may have moved since the last (a restarted or
    restored VM's channel socket is another path, its forwarded TCP port another port); and
    it remembers why an attempt failed, to explain giving up.
    """

    def __init__(self, find: Callable[[], Deferred[IStreamClientEndpoint]], client: GuestClient) -> None:
        self._find = find
        self._client = client

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def failed(reason: Failure) -> Failure:
            self._client.last_connect_error = reason.value
            return reason

        found = maybeDeferred(self._find)
        connected: Deferred[IProtocol] = found.addCallback(lambda endpoint: endpoint.connect(protocolFactory))
        return connected.addErrback(failed)


def host_authenticator(credentials: Credentials | None, development: bool) -> Authenticator | None:
    """
    The host's TLS configuration from ``credentials``; None in development mode, which must
    be asked for and is logged as a warning.

    :raises CredentialsUnavailable: no credentials and no development mode.
    :raises AuthenticationFailed: the credentials do not load.
    """
    if development:
        _log.warn(
            "DEVELOPMENT MODE: the channel to the agent is neither authenticated nor protected; "
            "anyone who can reach it runs commands as root in the guest. Never use it on a "
            "volunteer's machine"
        )
        return None
    if credentials is None:
        raise CredentialsUnavailable(
            "no credentials for the agent: pass the VM's (driver.agent_credentials(name), or "
            "vmcontroller.machine.connect_vm_agent, which does), or development=True for an "
            "unauthenticated development setup"
        )
    return Authenticator.from_credentials(credentials, server_side=False)


async def _connect(
    reactor: IReactorTime,
    endpoint: EndpointSource,
    timeout: float,
    limits: Limits | None,
    versions: tuple[int, ...],
    client_limits: ClientLimits | None,
    authenticator: Authenticator | None,
) -> GuestClient:
    client = GuestClient(reactor, limits, versions, client_limits, authenticator=authenticator)
    # Connections are retried with backoff, at first and whenever one is lost: a VM's channel
    # socket appears only once the VM runs, a NAT port forward accepts a connection and drops
    # it while nothing listens behind it yet, and a guest that reboots comes back.
    # The handshake is the client's own (wait_ready below), not a prepareConnection:
    # ClientService (Twisted 26) has no transition for a connection lost while it is being
    # prepared, which is what a NAT forward or a rebooting guest does.  A connection lost
    # before its handshake is retried after the backoff's first delay.
    find = endpoint if callable(endpoint) else partial(succeed, endpoint)
    client._service = ClientService(
        _AttemptEndpoint(find, client),
        Factory.forProtocol(partial(_AgentProtocol, client)),
        retryPolicy=backoffPolicy(initialDelay=CONNECT_RETRY_INTERVAL, maxDelay=RECONNECT_MAX_DELAY),
        clock=reactor,
    )
    client._service.startService()
    try:
        await Deferred.fromCoroutine(client.wait_ready()).addTimeout(timeout, reactor)
    except (CancelledError, DeferredTimeoutError):
        # Read before closing: the loss of a connection close() ends is not the agent's doing.
        last_error, silent = client.last_connect_error, client._transport is not None
        await client.close()
        seen = ["a connection was open, but nothing answered on it"] if silent else []
        seen += [f"last error: {last_error}"] if last_error else []
        why = f" ({'; '.join(seen)})" if seen else ""
        raise AgentUnreachable(
            f"no agent answered within {timeout:g} s{why}: check that the guest has booted and that "
            "the vmcontroller-agent service runs in it (journalctl -u vmcontroller-agent)"
        ) from None
    return client


def connect(
    reactor: IReactorTime,
    endpoint: EndpointSource,
    *,
    credentials: Credentials | None = None,
    development: bool = False,
    timeout: float = 60.0,
    limits: Limits | None = None,
    versions: tuple[int, ...] = SUPPORTED_VERSIONS,
    client_limits: ClientLimits | None = None,
) -> Deferred[GuestClient]:
    """
    Connect to an agent through ``endpoint`` (e.g. the unix socket of a VM's virtio-serial
    channel, or TCP), authenticate both ends and complete the handshake.  ``timeout`` also
    bounds the handshake; ``limits`` are what the host accepts on the wire, ``client_limits``
    what else it lets the agent make it spend (see :class:`ClientLimits` and docs/security.md).

    The client reconnects by itself, with backoff (at most :data:`RECONNECT_MAX_DELAY`
    between attempts), whenever the channel is lost, until :meth:`GuestClient.close`.
    ``endpoint`` may be a function returning a Deferred of the endpoint instead, called
    before every attempt: where the channel can move (a VM's socket after a restart or a
    restore), e.g. ``partial(driver.agent_endpoint, name)``; its failures are retried too.
    Operations in flight when the channel or the agent's session goes fail at once with
    :class:`ConnectionLost`; later ones wait for the next session.  Each new session runs a
    new TLS handshake (sessions are never resumed); one whose agent fails it closes the
    client, and what waits fails with :class:`AuthenticationFailed`.

    :param credentials: the host's end of the VM's credentials
        (``driver.agent_credentials(name)``); required unless ``development``.
    :param development: no authentication and no protection, for development only; the
        agent must run in development mode too. Logged as a warning.
    :raises AgentUnreachable: nothing answered within ``timeout`` seconds.
    :raises AuthenticationFailed: the agent is not the one these credentials pin, has no
        credentials, or does not authenticate (e.g. runs in development mode).
    :raises UnsupportedProtocolVersion: the agent speaks none of ``versions`` (an agent
        older than authentication, say).
    :raises CredentialsUnavailable: neither ``credentials`` nor ``development``.
    """

    async def go() -> GuestClient:
        authenticator = host_authenticator(credentials, development)
        return await _connect(reactor, endpoint, timeout, limits, versions, client_limits, authenticator)

    return Deferred.fromCoroutine(go())


__all__ = [
    "ClientLimits",
    "CommandInfo",
    "Credentials",
    "EndpointSource",
    "ExecHandle",
    "ExecResult",
    "GuestClient",
    "Progress",
    "Terminal",
    "TransferResult",
    "connect",
]
