"""
The host's client of a guest agent.

``connect(reactor, endpoint)`` returns a Deferred that fires with a :class:`GuestClient`
once the agent has answered the handshake.  Every operation returns a Deferred (use it
with ``await``); ``exec`` returns an :class:`ExecHandle` at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from guest_agent.link import Link, RequestIO
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
from vmcontroller import _exec, _files
from vmcontroller._exec import CommandInfo, ExecHandle, ExecResult
from vmcontroller._files import Progress, TransferResult
from vmcontroller.errors import AgentUnreachable, ConnectionLost, ProtocolError, VMControllerError

#: How often the handshake's SYNC is repeated until the agent answers: the agent may
#: still be booting, or a stale partial frame may have swallowed the first one.
SYNC_RETRY_INTERVAL = 1.0
#: The first delay before connecting again, doubled (with jitter) after each failure ...
CONNECT_RETRY_INTERVAL = 0.5
#: ... up to this.
RECONNECT_MAX_DELAY = 10.0


@dataclass
class _Pending:
    io: RequestIO
    result: Deferred[Any]


class GuestClient:
    """
    A session with one guest agent over one transport.

    Not made directly: use :func:`connect`.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        limits: Limits | None = None,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
    ) -> None:
        self.reactor = reactor
        self._connection = HostConnection(limits, versions, {"software": "vmcontroller"})
        self._link = Link(self._connection, self._write)
        self._transport: ITransport | None = None
        self._pending: dict[int, _Pending] = {}
        self._ready_waiters: list[Deferred[None]] = []
        #: The current transport has carried a session: if not, its loss is a failed attempt.
        self._handshaken = False
        #: Set by connect(): reconnects the transport, with backoff, whenever it is lost.
        self._service: ClientService | None = None
        self._closing = False
        #: Why the last connection attempt failed, for the error of a connect() that gives up.
        self.last_connect_error: BaseException | None = None
        self._sync_timer: IDelayedCall | None = None
        self._closed: BaseException | None = None
        self._slots: DeferredSemaphore | None = None
        self.notifications: list[Callable[[str, dict[str, Any]], None]] = []
        #: The agent's HELLO: its version, limits and software.
        self.agent_hello: dict[str, Any] = {}

    # ---- transport side ----------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def _transport_connected(self, transport: ITransport) -> None:
        self._transport = transport
        self._handshaken = False
        self._resync()

    def _resync(self) -> None:
        """Start a new session: SYNC, repeated until the agent answers."""
        self._connection.start()
        self._link.flush()
        if self._sync_timer is not None and self._sync_timer.active():
            self._sync_timer.cancel()
        self._sync_timer = self.reactor.callLater(SYNC_RETRY_INTERVAL, self._resync)

    def _data_received(self, data: bytes) -> None:
        try:
            events = self._connection.receive_data(data)
        except ProtocolError as e:
            self.log.warn("Agent broke the protocol ({error}); resynchronising", error=e)
            self._session_failed(e)
            return
        for event in events:
            if self._link.route_stream_event(event):
                continue
            if isinstance(event, ResponseReceived):
                self._complete(event.request_id, event.result)
            elif isinstance(event, ErrorReceived):
                if event.request_id == 0:
                    self.log.warn("Agent rejected the session: {error}", error=event.error)
                    self._session_failed(event.error)
                else:
                    self._complete(event.request_id, Failure(event.error))
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
                for observer in list(self.notifications):
                    observer(event.name, event.body)
        self._link.flush()

    def _transport_lost(self, reason: Failure) -> None:
        self._transport = None
        self._stop_sync_timer()
        reconnecting = self._service is not None and not self._closing and self._closed is None
        error = self._closed or ConnectionLost(
            f"the channel to the agent closed: {reason.getErrorMessage()}; what was in flight has an "
            "unknown outcome in the guest" + ("; reconnecting" if reconnecting else ""))
        if not self._handshaken:
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
        self._handshaken = True
        self._fire_ready(None)

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
        for request in pending.values():
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
            # The agent stops the operation; its reply is then ignored.
            if self._pending.pop(request_id, None) is not None:
                self._connection.send_cancel(request_id, {"reason": "cancelled by the host"})
                self._link.flush()
                self._link.close_io(request_id)
                io.fail(CancelledError())

        result: Deferred[Any] = Deferred(cancel)

        def release(outcome: Any) -> Any:
            slots.release()
            return outcome

        result.addBoth(release)
        self._pending[request_id] = _Pending(io, result)
        self._link.flush()
        return io, result

    async def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Run an operation that streams nothing and return its result."""
        _, result = await self.open_request(op, args)
        return await result

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
    ) -> ExecHandle:
        """
        Start ``argv`` in the guest.  Output goes to ``on_stdout``/``on_stderr`` as it is
        produced (a callback that returns a Deferred holds the output back until it fires)
        or, without a callback, is collected whole in the :class:`ExecResult`.
        ``stdin`` is bytes to feed, None for none, or :data:`STREAM` to write it through
        the handle.  ``timeout`` kills the process group in the guest.

        With an ``exec_id`` (1 to 128 letters, digits or ``._:@-``, chosen by the caller)
        the agent retains the command: it runs on when the channel or this controller goes
        away, and its output and exit status wait in the guest until :meth:`acknowledge`;
        :meth:`attach` collects them, and ``exec`` with the same id and ``argv`` again
        streams the same command from the start instead of starting another.

        :raises LimitExceeded: (from the result) the agent retains as many commands as it may.
        :raises AlreadyExists: (from the result) ``exec_id`` names a command with another argv.
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
    ) -> Deferred[ExecResult]:
        """Run ``argv`` to completion and fire with its whole output and exit status."""
        return self.exec(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout).result(check=check)

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
        self, source: str, destination: str | IO[bytes], *, progress: Progress | None = None
    ) -> Deferred[TransferResult]:
        """Copy the guest file ``source`` to a host path or binary file object."""
        return Deferred.fromCoroutine(_files.pull(self, source, destination, progress=progress))

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
        self._closing = True
        self._stop_sync_timer()
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
        self.client._transport_connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.client._data_received(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.client._transport_lost(reason or Failure(ConnectionLost("closed")))


@implementer(IStreamClientEndpoint)
class _RecordingEndpoint:
    """An endpoint whose failed connection attempts the client remembers, to explain giving up."""

    def __init__(self, endpoint: IStreamClientEndpoint, client: GuestClient) -> None:
        self._endpoint = endpoint
        self._client = client

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def failed(reason: Failure) -> Failure:
            self._client.last_connect_error = reason.value
            return reason

        return self._endpoint.connect(protocolFactory).addErrback(failed)


async def _connect(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    timeout: float,
    limits: Limits | None,
    versions: tuple[int, ...],
) -> GuestClient:
    client = GuestClient(reactor, limits, versions)
    # Connections are retried with backoff, at first and whenever one is lost: a VM's channel
    # socket appears only once the VM runs, a NAT port forward accepts a connection and drops
    # it while nothing listens behind it yet, and a guest that reboots comes back.
    # The handshake is the client's own (wait_ready below), not a prepareConnection:
    # ClientService (Twisted 26) has no transition for a connection lost while it is being
    # prepared, which is what a NAT forward or a rebooting guest does.  A connection lost
    # before its handshake is retried after the backoff's first delay.
    client._service = ClientService(
        _RecordingEndpoint(endpoint, client),
        Factory.forProtocol(partial(_AgentProtocol, client)),
        retryPolicy=backoffPolicy(initialDelay=CONNECT_RETRY_INTERVAL, maxDelay=RECONNECT_MAX_DELAY),
        clock=reactor,
    )
    client._service.startService()
    try:
        await Deferred.fromCoroutine(client.wait_ready()).addTimeout(timeout, reactor)
    except (CancelledError, DeferredTimeoutError):
        await client.close()
        last_error = client.last_connect_error
        why = f" (last error: {last_error})" if last_error else ""
        raise AgentUnreachable(
            f"no agent answered within {timeout:g} s{why}: check that the guest has booted and that "
            "the vmcontroller-agent service runs in it (journalctl -u vmcontroller-agent)"
        ) from None
    return client


def connect(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    *,
    timeout: float = 60.0,
    limits: Limits | None = None,
    versions: tuple[int, ...] = SUPPORTED_VERSIONS,
) -> Deferred[GuestClient]:
    """
    Connect to an agent through ``endpoint`` (e.g. the unix socket of a VM's virtio-serial
    channel, or TCP) and complete the handshake.

    The client reconnects by itself, with backoff (at most :data:`RECONNECT_MAX_DELAY`
    between attempts), whenever the channel is lost, until :meth:`GuestClient.close`.
    Operations in flight when the channel or the agent's session goes fail at once with
    :class:`ConnectionLost`; later ones wait for the next session.

    :raises AgentUnreachable: nothing answered within ``timeout`` seconds.
    :raises UnsupportedProtocolVersion: the agent speaks none of ``versions``.
    """
    return Deferred.fromCoroutine(_connect(reactor, endpoint, timeout, limits, versions))


__all__ = ["CommandInfo", "ExecHandle", "ExecResult", "GuestClient", "Progress", "TransferResult", "connect"]
