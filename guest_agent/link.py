"""
The Twisted layer both ends share: one :class:`Link` per session wraps a sans-I/O
connection engine, writes what it produces and routes stream events to the
:class:`RequestIO` of each request, where ``async`` code sends with flow control and
receives chunk by chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from guest_agent.protocol.connection import (
    DataReceived,
    Event,
    StreamEnded,
    WindowOpened,
    _Connection,
)
from guest_agent.protocol.errors import ConnectionLost


class RequestIO:
    """
    The data streams of one request, seen from one end.

    Received chunks are queued (the peer's window bounds the queue) and credit is given
    back when :meth:`receive` hands a chunk out, so a slow consumer slows the sender
    instead of filling memory.
    """

    def __init__(self, link: Link, request_id: int) -> None:
        self._link = link
        self.request_id = request_id
        self._chunks: dict[int, deque[bytes | bytearray]] = {}
        self._trailers: dict[int, dict[str, Any]] = {}
        self._readers: dict[int, Deferred[None]] = {}
        self._writers: dict[int, Deferred[None]] = {}
        self._failure: BaseException | None = None

    async def send(self, channel: int, data: bytes | memoryview) -> None:
        """Send all of ``data``, waiting for the peer's credit as needed."""
        view = memoryview(data)
        while True:
            self._raise_if_failed()
            await self._link.writable()
            self._raise_if_failed()
            taken = self._link.connection.send_data(self.request_id, channel, view)
            self._link.flush()
            view = view[taken:]
            if not view:
                return
            waiter: Deferred[None] = Deferred()
            self._writers[channel] = waiter
            await waiter

    def send_eof(self, channel: int, trailer: dict[str, Any] | None = None) -> None:
        self._raise_if_failed()
        self._link.connection.send_eof(self.request_id, channel, trailer)
        self._link.flush()

    async def receive(self, channel: int) -> bytes | bytearray | None:
        """The next chunk on ``channel``, or None once the peer ended it."""
        while True:
            queue = self._chunks.get(channel)
            if queue:
                chunk = queue.popleft()
                self._link.connection.consumed(self.request_id, channel, len(chunk))
                self._link.flush()
                return chunk
            if channel in self._trailers:
                return None
            self._raise_if_failed()
            waiter: Deferred[None] = Deferred()
            self._readers[channel] = waiter
            await waiter

    def trailer(self, channel: int) -> dict[str, Any] | None:
        """The trailer that ended ``channel``, once it has ended."""
        return self._trailers.get(channel)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _wake(self, waiters: dict[int, Deferred[None]], channel: int) -> None:
        waiter = waiters.pop(channel, None)
        if waiter is not None:
            waiter.callback(None)

    def data_received(self, channel: int, data: bytes | bytearray) -> None:
        self._chunks.setdefault(channel, deque()).append(data)
        self._wake(self._readers, channel)

    def stream_ended(self, channel: int, trailer: dict[str, Any]) -> None:
        self._trailers[channel] = trailer
        self._wake(self._readers, channel)

    def window_opened(self, channel: int) -> None:
        self._wake(self._writers, channel)

    def fail(self, reason: BaseException) -> None:
        """Wake every waiter with ``reason``; later calls raise it too."""
        if self._failure is None:
            self._failure = reason
        for waiters in (self._readers, self._writers):
            pending = list(waiters.values())
            waiters.clear()
            for waiter in pending:
                waiter.errback(reason)


@implementer(IPushProducer)
class SendGate:
    """Registered with a transport: its buffer filling pauses the link's stream data."""

    def __init__(self, link: Link) -> None:
        self._link = link

    def pauseProducing(self) -> None:
        self._link.pause_sending()

    def resumeProducing(self) -> None:
        self._link.resume_sending()

    def stopProducing(self) -> None:
        pass


class Link:
    """
    A session's engine plus the function that writes to the transport.

    :param write: writes bytes to the transport; replaced when the transport changes.
    :param write_sequence: writes a sequence of byte strings in order (a vectored write,
        e.g. a transport's ``writeSequence``), so that frame headers and payloads need
        not be joined first; without it they are joined and given to ``write``.
    """

    def __init__(
        self,
        connection: _Connection,
        write: Callable[[bytes], None],
        write_sequence: Callable[[Sequence[bytes | memoryview]], None] | None = None,
    ) -> None:
        self.connection = connection
        self.write = write
        self.write_sequence = write_sequence
        self._io: dict[int, RequestIO] = {}
        # Waiters for the transport to take more data, while it is paused.
        self._unpaused: list[Deferred[None]] | None = None

    def pause_sending(self) -> None:
        """
        The transport's buffer is full: stream data waits (nothing else does, and reading
        goes on, so both ends pausing cannot deadlock).  Credit alone would not bound it: a
        peer may grant credit for data it never reads.
        """
        if self._unpaused is None:
            self._unpaused = []

    def resume_sending(self) -> None:
        waiters, self._unpaused = self._unpaused or [], None
        for waiter in waiters:
            waiter.callback(None)

    async def writable(self) -> None:
        """Return once stream data may be sent (at once unless the transport is paused)."""
        if self._unpaused is not None:
            waiter: Deferred[None] = Deferred()
            self._unpaused.append(waiter)
            await waiter

    def flush(self) -> None:
        pieces = self.connection.pieces_to_send()
        if not pieces:
            return
        if self.write_sequence is not None:
            self.write_sequence(pieces)
        else:
            self.write(b"".join(pieces))

    def open_io(self, request_id: int) -> RequestIO:
        io = self._io[request_id] = RequestIO(self, request_id)
        return io

    def close_io(self, request_id: int) -> None:
        self._io.pop(request_id, None)

    def route_stream_event(self, event: Event) -> bool:
        """Deliver a stream event to its request; False when ``event`` is not one."""
        if isinstance(event, DataReceived):
            io = self._io.get(event.request_id)
            if io is not None:
                io.data_received(event.channel, event.data)
        elif isinstance(event, StreamEnded):
            io = self._io.get(event.request_id)
            if io is not None:
                io.stream_ended(event.channel, event.trailer)
        elif isinstance(event, WindowOpened):
            io = self._io.get(event.request_id)
            if io is not None:
                io.window_opened(event.channel)
        else:
            return False
        return True

    def fail_all(self, reason: BaseException) -> None:
        """Every request's streams fail with ``reason`` (the session is gone)."""
        ios = list(self._io.values())
        self._io.clear()
        for io in ios:
            io.fail(reason)
        # Writers waiting for the transport wake and see their stream's failure; the
        # transport stays paused for the writers of the next session.
        if self._unpaused:
            waiters, self._unpaused = self._unpaused, []
            for waiter in waiters:
                waiter.callback(None)


__all__ = ["ConnectionLost", "Link", "RequestIO", "SendGate"]
