"""
One host session inside the agent: it feeds the sans-I/O engine, runs each request's
operation as a coroutine and turns its outcome into a RESPONSE or an ERROR frame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from guest_agent.link import Link, RequestIO
from guest_agent.protocol.connection import (
    AgentConnection,
    CancelRequested,
    Event,
    HandshakeComplete,
    Limits,
    ProtocolFailure,
    RequestReceived,
    SessionReset,
)
from guest_agent.protocol.errors import ConnectionLost, InternalError, OperationError, UnknownOperation

#: An operation returns its JSON-able result, or an awaitable of it; it raises
#: OperationError to fail.  Plain functions answer without a coroutine's overhead.
Operation = Callable[["OperationContext"], Awaitable[Any] | Any]

#: What an operation whose session ended answers: nothing.
_NO_ANSWER = object()


class OperationContext:
    """
    What an operation sees of its request: its arguments, its data streams and a way to
    learn that the host cancelled it or went away.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        request_id: int,
        op: str,
        args: dict[str, Any],
        io: RequestIO,
        notify: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.reactor = reactor
        self.request_id = request_id
        self.op = op
        self.args = args
        self.io = io
        self.notify = notify
        self.cancel_reason: dict[str, Any] | None = None
        #: The cancel came from the session ending, not from the host's CANCEL: an
        #: operation whose work outlives the session stops only talking to it.
        self.session_ended = False
        self._cancel_callbacks: list[Callable[[dict[str, Any]], None]] = []

    def on_cancel(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback`` with the host's CANCEL body when the operation must stop."""
        if self.cancel_reason is not None:
            callback(self.cancel_reason)
        else:
            self._cancel_callbacks.append(callback)

    def cancel(self, reason: dict[str, Any], session_ended: bool = False) -> None:
        if self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        self.session_ended = session_ended
        callbacks, self._cancel_callbacks = self._cancel_callbacks, []
        for callback in callbacks:
            callback(reason)


class AgentSession:
    """
    Serves one host over one byte stream, across any number of resynchronisations.

    :param write: writes to the transport.
    :param operations: handlers by operation name.
    :param write_sequence: writes a sequence of byte strings (see :class:`Link`).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        operations: Mapping[str, Operation],
        write: Callable[[bytes], None],
        limits: Limits | None = None,
        hello: dict[str, Any] | None = None,
        write_sequence: Callable[[Sequence[bytes | memoryview]], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._operations = operations
        self.connection = AgentConnection(limits, hello_extra=hello)
        self.link = Link(self.connection, write, write_sequence)
        self._running: dict[int, OperationContext] = {}

    @property
    def busy(self) -> bool:
        """Whether an operation is running."""
        return bool(self._running)

    def announce_restart(self) -> None:
        self.connection.announce_restart()
        self.link.flush()

    def data_received(self, data: bytes | memoryview) -> None:
        self._handle(self.connection.receive_data(data))

    def line_idle(self) -> None:
        """No byte came for a while: a partial frame is dropped (see ``AgentConnection``)."""
        self._handle(self.connection.line_idle())

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if self.link.route_stream_event(event):
                continue
            if isinstance(event, RequestReceived):
                self._start(event)
            elif isinstance(event, CancelRequested):
                context = self._running.get(event.request_id)
                if context is not None:
                    context.cancel(event.body)
            elif isinstance(event, SessionReset | ProtocolFailure):
                why = event.reason if isinstance(event, SessionReset) else str(event.error)
                self.log.warn("Session ended: {why}", why=why)
                self._end_session(why)
            elif isinstance(event, HandshakeComplete):
                self.log.info("Host connected, protocol version {v}", v=event.version)
        self.link.flush()

    def host_disconnected(self) -> None:
        """The transport lost the host: stop everything the session started."""
        self.connection.host_disconnected()
        self._end_session("the host disconnected")

    def _end_session(self, why: str) -> None:
        running, self._running = self._running, {}
        for context in running.values():
            context.cancel({"reason": why}, session_ended=True)
        self.link.fail_all(ConnectionLost(why))

    def _start(self, event: RequestReceived) -> None:
        operation = self._operations.get(event.op)
        if operation is None:
            self.connection.send_error(
                event.request_id,
                UnknownOperation(
                    f"the agent has no operation {event.op!r}; it knows {sorted(self._operations)}"
                ),
            )
            return
        io = self.link.open_io(event.request_id)
        context = OperationContext(self._reactor, event.request_id, event.op, event.args, io, self._notify)
        self._running[event.request_id] = context
        try:
            outcome = operation(context)
        except Exception as e:
            outcome = self._outcome_of_error(context, e)
        # Results are JSON-able data, which has no __await__: a cheaper test than
        # inspect.isawaitable's ABC check, on the path of every request.
        if hasattr(outcome, "__await__"):
            Deferred.fromCoroutine(self._await(context, outcome))
        else:
            self._finish(context, outcome)

    async def _await(self, context: OperationContext, pending: Awaitable[Any]) -> None:
        try:
            outcome = await pending
        except Exception as e:
            outcome = self._outcome_of_error(context, e)
        self._finish(context, outcome)

    def _outcome_of_error(self, context: OperationContext, error: Exception) -> Any:
        if isinstance(error, OperationError):
            return error
        if isinstance(error, ConnectionLost):
            return _NO_ANSWER  # the session that asked is gone
        self.log.failure("Operation {op} failed", op=context.op)
        return InternalError(f"the agent failed running {context.op!r}; see the agent's journal in the guest")

    def _finish(self, context: OperationContext, outcome: Any) -> None:
        # A context from an ended session must not answer a new request that reuses its id.
        if self._running.get(context.request_id) is not context:
            return
        del self._running[context.request_id]
        self.link.close_io(context.request_id)
        if outcome is _NO_ANSWER:
            return
        if isinstance(outcome, OperationError):
            self.connection.send_error(context.request_id, outcome)
        else:
            self.connection.send_response(context.request_id, outcome)
        self.link.flush()

    def _notify(self, name: str, body: dict[str, Any]) -> None:
        self.connection.send_notification(name, body)
        self.link.flush()
