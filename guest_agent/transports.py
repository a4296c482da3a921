"""
How the agent reaches the host: TCP (a session per connection) and character devices
(a virtio-serial port or a serial tty: one device, any number of host connections).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import select
import signal
import termios
import tty
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet import abstract
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from guest_agent.config import TCPLimits
from guest_agent.protocol.connection import Limits
from guest_agent.session import AgentSession, Operation

#: A virtio-serial read returns at most one of the port's 4 KiB buffers ...
_READ_SIZE = 4096
#: ... so one readv(2) asks for this many of them: the kernel loops over the pieces and
#: stops at the first short one, one system call for what took one each.  QEMU gives the
#: port 128 buffers, so this drains a full queue.
_READ_PIECES = 128
#: A virtio-serial write takes at most 32 KiB; a writev(2) of pieces that size moves many
#: of them in one system call (the kernel stops at the first one the port cannot take).
_WRITE_PIECE = 32 * 1024
_WRITE_PIECES = 64
#: Pieces smaller than this are joined with their neighbours before they are written.
_JOIN_BELOW = 4096


@implementer(IPushProducer)
class _ReadGate:
    """
    Registered with the transport: when what the agent writes piles up because the peer
    does not read, the transport pauses it, and it stops reading the peer's requests.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class AgentProtocol(Protocol):
    """
    One host over one TCP (or other stream) connection.  A peer that has not completed
    the handshake within ``tcp.handshake_timeout``, or sends nothing for
    ``tcp.idle_timeout`` while no operation runs, is disconnected.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        operations: Mapping[str, Operation],
        limits: Limits | None,
        hello: dict[str, Any],
        tcp: TCPLimits | None = None,
        on_lost: Callable[[AgentProtocol], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._operations = operations
        self._limits = limits
        self._hello = hello
        self._tcp = tcp or TCPLimits()
        self._on_lost = on_lost
        self._timer: IDelayedCall | None = None
        self.session: AgentSession | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.session = AgentSession(
            self._reactor, self._operations, self.transport.write, self._limits, self._hello
        )
        cast(IConsumer, self.transport).registerProducer(_ReadGate(self.transport), True)
        self._timer = self._reactor.callLater(self._tcp.handshake_timeout, self._handshake_expired)

    def dataReceived(self, data: bytes) -> None:
        assert self.session is not None
        self.session.data_received(data)
        if self.session.connection.is_open and self._timer is not None:
            self._timer.reset(self._tcp.idle_timeout)  # from now on it is the idle timer

    def _handshake_expired(self) -> None:
        assert self.session is not None
        if self.session.connection.is_open:
            self._idle_expired()
        else:
            self._disconnect(f"no completed handshake within {self._tcp.handshake_timeout:g} s "
                             "(tcp.handshake_timeout)")

    def _idle_expired(self) -> None:
        assert self.session is not None
        if self.session.busy:
            self._timer = self._reactor.callLater(self._tcp.idle_timeout, self._idle_expired)
        else:
            self._disconnect(f"nothing received for {self._tcp.idle_timeout:g} s while idle "
                             "(tcp.idle_timeout)")

    def _disconnect(self, why: str) -> None:
        self._timer = None
        peer = self.transport.getPeer() if self.transport is not None else None
        self.log.warn("Disconnecting {peer}: {why}", peer=peer, why=why)
        if self.transport is not None:
            # A registered producer would keep a closing transport open while it produces.
            cast(IConsumer, self.transport).unregisterProducer()
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.session is not None:
            self.session.host_disconnected()
        if self._on_lost is not None:
            self._on_lost(self)


class AgentFactory(Factory):
    """
    Serves agent sessions on a listening endpoint (``tcp:PORT:interface=ADDR``), at most
    ``tcp.max_connections`` at once: a connection beyond is closed at once, logged.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        operations: Mapping[str, Operation],
        limits: Limits | None = None,
        hello: dict[str, Any] | None = None,
        tcp: TCPLimits | None = None,
    ) -> None:
        self.reactor = reactor
        self.operations = operations
        self.limits = limits
        self.hello = hello or {}
        self.tcp = tcp or TCPLimits()
        self.connections: set[AgentProtocol] = set()

    def buildProtocol(self, addr: Any) -> AgentProtocol | None:
        if len(self.connections) >= self.tcp.max_connections:
            self.log.warn("Refusing {addr}: {n} connections are open already (tcp.max_connections)",
                          addr=addr, n=len(self.connections))
            return None
        protocol = AgentProtocol(self.reactor, self.operations, self.limits, self.hello, self.tcp,
                                 self.connections.discard)
        self.connections.add(protocol)
        return protocol


class _DeviceReader(abstract.FileDescriptor):
    """
    The device while one host is connected.  A fresh reader per host connection means
    output queued for a host that left is dropped with its reader.

    It does its own buffering of writes: a queue of pieces no larger than one
    virtio-serial write, written with writev(2) at once when possible and otherwise when
    the port has room, so that nothing is copied to be joined or sliced.
    """

    def __init__(self, reactor: Any, fd: int, device: CharacterDeviceTransport) -> None:
        super().__init__(reactor)
        self._fd = fd
        self._device = device
        self.connected = 1
        self._read_buffer = memoryview(bytearray(_READ_SIZE * _READ_PIECES))
        self._read_pieces = [
            self._read_buffer[start : start + _READ_SIZE]
            for start in range(0, len(self._read_buffer), _READ_SIZE)
        ]
        self._pending: deque[memoryview] = deque()
        self._waiting_to_write = False

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        # One piece first: a small message (most requests) costs a plain read; only a
        # full piece means more may wait, and a readv of the rest drains it.
        why = ""
        try:
            count = os.readv(self._fd, self._read_pieces[:1])
        except BlockingIOError:
            return
        except OSError as e:
            self._device.host_gone(self, f"read failed: {e}")
            return
        if count == _READ_SIZE:
            try:
                count += os.readv(self._fd, self._read_pieces[1:])
            except BlockingIOError:
                pass
            except OSError as e:
                why = f"read failed: {e}"
        if not count:
            # virtio-serial reads end-of-file while no host has the port open.
            why = "end of file"
        else:
            # The engine copies what it keeps: the buffer is reused for the next read.
            self._device.data_received(self._read_buffer[:count])
        if why:
            self._device.host_gone(self, why)

    def write(self, data: bytes) -> None:
        self.write_sequence((data,))

    def write_sequence(self, pieces: Sequence[bytes | memoryview]) -> None:
        # Write at once when nothing is queued: a reply then leaves in this reactor pass
        # instead of the next one, which is most of a small request's latency.
        if not self.connected or self.disconnecting:
            return
        queued = bool(self._pending)
        # Each piece of a writev(2) is a write of its own to the port: a buffer the host is
        # told about (a costly exit to QEMU under emulation) and often a read of its own on
        # the host.  So runs of small pieces (frame headers, JSON) are joined into one.
        small: list[bytes | memoryview] = []
        for piece in pieces:
            if len(piece) < _JOIN_BELOW:
                small.append(piece)
                continue
            if small:
                self._queue(b"".join(small))
                small = []
            self._queue(piece)
        if small:
            self._queue(b"".join(small))
        if not queued:
            self._write_pending()

    def _queue(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if len(view) <= _WRITE_PIECE:
            if view:
                self._pending.append(view)
        else:
            self._pending.extend(
                view[start : start + _WRITE_PIECE] for start in range(0, len(view), _WRITE_PIECE)
            )

    def _write_pending(self) -> None:
        pending = self._pending
        while pending:
            batch = list(itertools.islice(pending, _WRITE_PIECES))
            try:
                written = os.writev(self._fd, batch)
            except BlockingIOError:
                written = 0
            except OSError as e:
                pending.clear()
                self._device.host_gone(self, f"write failed: {e}")
                return
            full = True
            for view in batch:
                if written >= len(view):
                    written -= len(view)
                    pending.popleft()
                else:
                    if written:
                        pending[0] = view[written:]
                    full = False
                    break
            if not full:
                break  # the port is full: wait until it has room
        if bool(pending) != self._waiting_to_write:
            self._waiting_to_write = bool(pending)
            if pending:
                self.startWriting()
            else:
                self.stopWriting()

    def doWrite(self) -> None:
        self._write_pending()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw POLLHUP: the host side of the port closed.
        self._pending.clear()
        super().connectionLost(reason)
        self._device.host_gone(self, "hang-up")

    def detach(self) -> None:
        self._pending.clear()
        self._waiting_to_write = False
        self.stopReading()
        self.stopWriting()
        self.disconnected = 1


class CharacterDeviceTransport(Service):
    """
    Serves the host through a character device: a virtio-serial port, which tells the
    guest when the host side opens and closes, or a serial tty, which never does.

    Neither tells the guest *that* a host is waiting until it writes, and a virtio-serial
    port with no host polls as hang-up at once; so between hosts the agent does not poll
    the device: it waits for the SIGIO the port sends when the host opens it, with a slow
    poll as the safety net for a lost signal.

    On a tty, a host that left in the middle of a frame would leave the agent waiting for
    the rest of it, so a partial frame is dropped once the line has been idle for
    :attr:`SERIAL_IDLE_TIMEOUT`; the timer runs only while a partial frame is held.

    :param path: the device node; the agent waits for it to appear.
    :param serial: True for a tty, put in raw mode.
    """

    log = Logger()
    APPEAR_INTERVAL = 0.5
    HOST_CHECK_INTERVAL = 2.0
    #: On a tty, how long a frame may stay partly received with no byte arriving before the
    #: agent drops it.  A host writes each frame whole, so its bytes follow one another at
    #: line speed (a byte takes about 1 ms even at 9600 baud): a pause this long means the
    #: writer is gone.  It must stay well under the host's SYNC retry interval (1 s), or the
    #: SYNCs of the next host, each swallowed as payload of the dead frame, would keep the
    #: line from ever looking idle.
    SERIAL_IDLE_TIMEOUT = 0.5

    def __init__(
        self,
        reactor: Any,
        path: str,
        operations: Mapping[str, Operation],
        *,
        serial: bool = False,
        limits: Limits | None = None,
        hello: dict[str, Any] | None = None,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self._serial = serial
        self._fd: int | None = None
        self._reader: _DeviceReader | None = None
        self._waiting: LoopingCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self.session = AgentSession(reactor, operations, self._write, limits, hello, self._write_sequence)

    def _write(self, data: bytes) -> None:
        if self._reader is not None:
            self._reader.write(data)

    def _write_sequence(self, pieces: Sequence[bytes | memoryview]) -> None:
        if self._reader is not None:
            self._reader.write_sequence(pieces)

    def startService(self) -> None:
        super().startService()
        self._start_loop(self._open_when_present, self.APPEAR_INTERVAL)

    def data_received(self, data: memoryview) -> None:
        self.session.data_received(data)
        if self._serial:
            self._time_partial_frame()

    def _time_partial_frame(self) -> None:
        """(Re)start the idle timer while the session holds a partial frame; else stop it."""
        if self._reader is None or not self.session.connection.holds_partial_frame:
            self._stop_idle_timer()
        elif self._idle_timer is None:
            self._idle_timer = self._reactor.callLater(self.SERIAL_IDLE_TIMEOUT, self._line_idle)
        else:
            self._idle_timer.reset(self.SERIAL_IDLE_TIMEOUT)

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _line_idle(self) -> None:
        self._idle_timer = None
        assert self._fd is not None
        # The reactor runs its timers before it reads: after the agent was not scheduled for
        # a while, the rest of the frame may be waiting unread, and the line was not idle.
        if not _poll_now(self._fd):
            self.session.line_idle()
        self._time_partial_frame()

    def stopService(self) -> None:
        super().stopService()
        self._stop_loop()
        self._stop_idle_timer()
        if self._reader is not None:
            self._reader.detach()
            self._reader = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _start_loop(self, check: Any, interval: float) -> None:
        self._stop_loop()
        self._waiting = LoopingCall(check)
        self._waiting.clock = self._reactor
        self._waiting.start(interval, now=True)

    def _stop_loop(self) -> None:
        if self._waiting is not None and self._waiting.running:
            self._waiting.stop()
        self._waiting = None

    def _open_when_present(self) -> None:
        if not os.path.exists(self.path):
            return
        self._stop_loop()
        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)
        if self._serial:
            tty.setraw(self._fd, termios.TCSANOW)
            # What came before went through the line editing of cooked mode, which may have
            # eaten or changed bytes: drop it, the host's SYNCs are sent again.
            termios.tcflush(self._fd, termios.TCIFLUSH)
        self.log.info("Serving the host on {path}", path=self.path)
        self._attach()
        # A host that talked to an earlier agent on this device must learn it is gone.
        self.session.announce_restart()

    def _attach(self) -> None:
        assert self._fd is not None
        self._reader = _DeviceReader(self._reactor, self._fd, self)
        self._reader.startReading()

    def host_gone(self, reader: _DeviceReader, why: str) -> None:
        if reader is not self._reader or self._fd is None:
            return
        self.log.info("Host left {path} ({why}); waiting for it", path=self.path, why=why)
        reader.detach()
        self._reader = None
        self._stop_idle_timer()
        self.session.host_disconnected()
        if self._serial:
            # A tty reads end-of-file (and fails writes) only once it was hung up, e.g. when a
            # session leader that opened it as its controlling terminal exits; the hung-up
            # file stays dead, so open the device again.
            os.close(self._fd)
            self._fd = None
            self._start_loop(self._open_when_present, self.APPEAR_INTERVAL)
        else:
            self._wait_for_host()

    def _wait_for_host(self) -> None:
        assert self._fd is not None
        fcntl.fcntl(self._fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) | os.O_ASYNC)
        signal.signal(signal.SIGIO, lambda signum, frame: self._reactor.callFromThread(self._check_host))
        self._start_loop(self._check_host, self.HOST_CHECK_INTERVAL)

    def _stop_host_signal(self) -> None:
        # Left on, the port would raise SIGIO on every byte the host sends: a signal, a
        # wake-up of the reactor and a wasted pass of its loop per request.
        assert self._fd is not None
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_ASYNC)
        signal.signal(signal.SIGIO, signal.SIG_IGN)

    def _check_host(self) -> None:
        if self._fd is None or self._reader is not None:
            return
        if _poll_now(self._fd) & select.POLLHUP:
            return
        self._stop_loop()
        self._stop_host_signal()
        self.log.info("Host connected on {path}", path=self.path)
        self._attach()


def _poll_now(fd: int) -> int:
    """The poll(2) events of ``fd`` asked for readability, without waiting (0: none)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return next((mask for _, mask in poller.poll(0)), 0)


def virtio_port_path(name: str) -> str:
    return os.path.join("/dev/virtio-ports", name)


__all__ = ["AgentFactory", "AgentProtocol", "CharacterDeviceTransport", "virtio_port_path"]
