"""
A guest's channel through libvirt itself: ``virDomainOpenChannel`` on a non-blocking
``virStream``, as a Twisted transport on the reactor.

This is how the agent of a VM on another host is reached: libvirtd on that host connects to the
channel's socket and carries its bytes over the libvirt connection the driver already has
(``qemu+tcp://``, ``qemu+ssh://``, ``qemu+tls://``), so no socket of ours crosses the network.

The stream is opened with ``VIR_STREAM_NONBLOCK`` and watched with ``eventAddCallback``; libvirt
calls back on the reactor thread through its event loop (:mod:`hypervisors.libvirt.events`).
``recv`` then returns what libvirt has buffered or ``-2`` (nothing yet), never waiting for the
network; ``send`` returns ``-2`` when a local stream's socket is full. On a remote connection
libvirt sends each data packet before ``send`` returns: the call hands it to the kernel's socket
buffer, and waits only when that buffer is full (a peer slower than this side, which the agent
protocol's flow-control windows keep to their size). ``finish`` and ``abort`` wait for libvirtd's
answer, so they run in the driver's thread pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import libvirt
from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vmcontroller.errors import ConnectionLost

__all__ = ["ChannelAddress", "ChannelEndpoint", "StreamTransport", "VirStream"]

_READABLE = libvirt.VIR_STREAM_EVENT_READABLE
_WRITABLE = libvirt.VIR_STREAM_EVENT_WRITABLE
_ERROR = libvirt.VIR_STREAM_EVENT_ERROR
_HANGUP = libvirt.VIR_STREAM_EVENT_HANGUP
#: What ``recv`` and ``send`` return on a non-blocking stream that would block.
_AGAIN = -2


class VirStream(Protocol):
    """The part of ``libvirt.virStream`` the transport uses (a fake one in the unit tests)."""

    def eventAddCallback(self, events: int, cb: Callable[[Any, int, Any], object], opaque: Any) -> None: ...

    def eventUpdateCallback(self, events: int) -> None: ...

    def eventRemoveCallback(self) -> None: ...

    def recv(self, nbytes: int) -> bytes | int: ...

    def send(self, data: bytes) -> int: ...


#: Closes a stream once the transport is done with it: ``abort`` (True) or ``finish``; both
#: wait for libvirtd, so the driver runs them in its thread pool.
CloseStream = Callable[[VirStream, bool], object]


@implementer(IAddress)
@dataclass(frozen=True)
class ChannelAddress:
    """Both ends of a channel stream: the VM's channel behind a libvirt URI."""

    uri: str
    vm: str
    channel: str

    def __str__(self) -> str:
        return f"channel {self.channel!r} of VM {self.vm!r} at {self.uri}"


class StreamTransport(FileDescriptor):
    """
    A Twisted transport over a non-blocking ``virStream``.

    :class:`~twisted.internet.abstract.FileDescriptor` gives the write buffer, the registered
    producer (paused above ``bufferSize`` buffered bytes, resumed when it drains), the
    pause/resume of reading (``IPushProducer``) and the flush before ``loseConnection`` closes;
    what a reactor does for a socket (watch it, call ``doRead``/``doWrite``, close on what they
    return) is done here with the stream's event callback. A failed ``recv`` or ``send`` closes
    the connection with :class:`~vmcontroller.errors.ConnectionLost`.
    """

    #: Bytes asked of one ``recv`` and given to one ``send`` (one libvirt stream packet; libvirt
    #: refuses packets above 256 KiB).
    CHUNK = 64 * 1024

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        stream: VirStream,
        protocol: IProtocol,
        close_stream: CloseStream,
        address: ChannelAddress,
        live: set[StreamTransport] | None = None,
    ) -> None:
        super().__init__(reactor)
        self._stream = stream
        self.protocol = protocol
        self._close_stream = close_stream
        self._address = address
        #: The open transports this one belongs to while it is open (see ChannelEndpoint).
        self._live = live if live is not None else set()
        #: The events libvirt is asked to report now.
        self._events = _READABLE
        self._watching = False

    def start(self) -> None:
        """Watch the stream and give the protocol its connection."""
        self._stream.eventAddCallback(self._events, self._on_event, None)
        self._watching = True
        self._live.add(self)
        self.connected = 1
        self.protocol.makeConnection(self)

    # -- what the reactor does for a socket ----------------------------------------------------

    def _want(self, event: int, on: bool) -> None:
        events = self._events | event if on else self._events & ~event
        if events != self._events and self._watching:
            # A remote stream is always writable: asking for WRITABLE when nothing waits to be
            # written would call back at every reactor iteration.
            self._stream.eventUpdateCallback(events)
        self._events = events

    def startReading(self) -> None:
        self._want(_READABLE, True)

    def stopReading(self) -> None:
        self._want(_READABLE, False)

    def startWriting(self) -> None:
        self._want(_WRITABLE, True)

    def stopWriting(self) -> None:
        self._want(_WRITABLE, False)

    def _on_event(self, _stream: object, events: int, _opaque: object) -> None:
        # On the reactor thread, from libvirt's event loop.
        why: object = None
        if events & (_ERROR | _HANGUP) or (events & _READABLE and self._events & _READABLE):
            # An error or hang-up also shows in recv: its exception, or the end of the stream.
            why = self.doRead()
        if not why and not self.disconnected and events & _WRITABLE and self._events & _WRITABLE:
            why = self.doWrite()
        if why and not self.disconnected:
            self.connectionLost(Failure(why))

    def doRead(self) -> object:
        try:
            data = self._stream.recv(self.CHUNK)
        except libvirt.libvirtError as e:
            return self._failed("receive from", e)
        if data == _AGAIN:
            return None
        if not data:
            return main.CONNECTION_DONE
        assert isinstance(data, bytes)
        self.protocol.dataReceived(data)
        return None

    def writeSomeData(self, data: bytes) -> int | BaseException:
        if not data:
            # An empty packet means "wait for data" to libvirt's remote protocol: never send one.
            return 0
        try:
            sent = self._stream.send(bytes(data[: self.CHUNK]))
        except libvirt.libvirtError as e:
            return self._failed("send to", e)
        return 0 if sent == _AGAIN else sent

    def _failed(self, what: str, error: libvirt.libvirtError) -> ConnectionLost:
        return ConnectionLost(
            f"libvirt could not {what} the {self._address}: {error.get_error_message() or error}; "
            "the VM may have stopped or the connection to libvirtd dropped"
        )

    # -- closing -------------------------------------------------------------------------------

    def abortConnection(self) -> None:
        """Close at once, dropping what is not written yet; libvirt aborts the stream."""
        if self.disconnected or not self.connected:
            return
        self.stopReading()
        self.stopWriting()
        clock: IReactorTime = self.reactor  # type: ignore[assignment]
        clock.callLater(0, self._abort_now)

    def _abort_now(self) -> None:
        if not self.disconnected:
            self.connectionLost(Failure(ConnectionAborted()))

    def lose(self, error: BaseException) -> None:
        """
        Close at once because of ``error``, from outside (the libvirt connection under the
        stream is gone, so the stream will never say so itself).
        """
        if not self.disconnected:
            self.connectionLost(Failure(error))

    def connectionLost(self, reason: Failure) -> None:
        self._live.discard(self)
        super().connectionLost(reason)
        if self._watching:
            self._watching = False
            try:
                self._stream.eventRemoveCallback()
            except libvirt.libvirtError as e:
                self.log.debug("Removing the stream callback failed: {error}", error=e)
        # A clean end (ours after the flush, or the guest's) finishes the stream, which lets
        # libvirtd write out what it still holds; anything else aborts it.
        self._close_stream(self._stream, not reason.check(ConnectionDone))
        self.protocol.connectionLost(reason)

    # -- ITransport ----------------------------------------------------------------------------

    def getPeer(self) -> ChannelAddress:
        return self._address

    def getHost(self) -> ChannelAddress:
        return self._address

    def logPrefix(self) -> str:
        return "libvirt-channel"

    def fileno(self) -> int:
        return -1  # no descriptor of ours: libvirt owns the connection


@implementer(IStreamClientEndpoint)
class ChannelEndpoint:
    """
    Connects to a VM's channel through libvirt: each ``connect`` opens a new stream.

    :param open_stream: opens the channel's stream (``virDomainOpenChannel``, in the driver's
        thread pool); fails with one of our :class:`~vmcontroller.errors.HypervisorError`\\ s.
    :param close_stream: see :data:`CloseStream`.
    :param live: the set each open transport is in until it closes, for the driver to close
        them all when its libvirt connection goes (:meth:`StreamTransport.lose`).
    """

    def __init__(
        self,
        reactor: Any,
        open_stream: Callable[[], Deferred[VirStream]],
        close_stream: CloseStream,
        address: ChannelAddress,
        live: set[StreamTransport] | None = None,
    ) -> None:
        self._reactor = reactor
        self._open_stream = open_stream
        self._close_stream = close_stream
        self.address = address
        self._live = live

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        cancelled = False

        def cancel(_: Deferred[IProtocol]) -> None:
            # The open in the thread pool cannot be stopped: its stream is closed when it comes.
            nonlocal cancelled
            cancelled = True

        result: Deferred[IProtocol] = Deferred(cancel)

        def opened(stream: VirStream) -> None:
            if cancelled:
                self._close_stream(stream, True)
                return
            try:
                protocol = protocolFactory.buildProtocol(self.address)
                if protocol is None:
                    raise ConnectionLost(f"the protocol factory refused the {self.address}")
                StreamTransport(
                    self._reactor, stream, protocol, self._close_stream, self.address, self._live
                ).start()
            except BaseException:
                self._close_stream(stream, True)
                result.errback()
                return
            result.callback(protocol)

        def failed(reason: Failure) -> None:
            if not cancelled:
                result.errback(reason)

        self._open_stream().addCallbacks(opened, failed)
        return result
