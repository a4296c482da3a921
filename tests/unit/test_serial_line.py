"""
The device transport on a serial tty, which never reports a host leaving: a pseudo-terminal
stands in for the UART, a Clock for the reactor, and the host is the sans-I/O engine writing
to the pty's master.  A frame left half-received is dropped once the line is idle.
"""

from __future__ import annotations

import os
import select
import termios
import tty
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from guest_agent.protocol.connection import (
    ErrorReceived,
    Event,
    HandshakeComplete,
    HostConnection,
    ResponseReceived,
)
from guest_agent.protocol.errors import ProtocolError
from guest_agent.protocol.frames import NONCE_SIZE, RESET_MARKER, SYNC_MAGIC, Channel
from guest_agent.session import OperationContext
from guest_agent.transports import CharacterDeviceTransport
from vmcontroller.testing import paired_authenticators

IDLE = CharacterDeviceTransport.SERIAL_IDLE_TIMEOUT
#: The line is authenticated, as in production: the frames below travel inside TLS.
HOST_AUTH, AGENT_AUTH = paired_authenticators()


def new_host() -> HostConnection:
    return HostConnection(authenticator=HOST_AUTH)


class Sink:
    """An operation that reads its input to the end, as push does; records cancellations."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.cancelled: list[dict[str, Any]] = []

    async def __call__(self, ctx: OperationContext) -> Any:
        ctx.on_cancel(self.cancelled.append)
        while (chunk := await ctx.io.receive(Channel.INPUT)) is not None:
            self.received += chunk
        return len(self.received)


class Line:
    """The host's end of the tty (the pty's master) and the agent serving the other end."""

    def __init__(self, master: int, reactor: MemoryReactorClock, agent: CharacterDeviceTransport) -> None:
        self.master = master
        self.reactor = reactor
        self.agent = agent

    def write(self, data: bytes) -> None:
        """Bytes on their way to the agent, not yet read by it."""
        os.write(self.master, data)

    def deliver(self) -> None:
        """The agent reads what is waiting, as its reactor would."""
        for reader in list(self.reactor.readers):
            reader.doRead()

    def send(self, data: bytes) -> None:
        self.write(data)
        self.deliver()

    def receive(self) -> bytes:
        out = bytearray()
        while True:
            try:
                out += os.read(self.master, 65536)
            except BlockingIOError:
                return bytes(out)

    def handshake(self, host: HostConnection) -> None:
        host.start()
        events: list[Event] = []
        while not events:  # SYNC/ACK, the TLS handshake, HELLO both ways
            self.send(host.data_to_send())
            events = host.receive_data(self.receive())
        assert [type(e) for e in events] == [HandshakeComplete]


def serve(sink: Sink, *, serial: bool) -> Iterator[Line]:
    master, follower = os.openpty()
    os.set_blocking(master, False)
    reactor = MemoryReactorClock()
    if not serial:
        tty.setraw(follower)  # only a serial device is put in raw mode by the transport
    agent = CharacterDeviceTransport(
        reactor, os.ttyname(follower), {"sink": sink}, serial=serial, authenticator=AGENT_AUTH
    )
    agent.startService()
    line = Line(master, reactor, agent)
    try:
        assert line.receive() == RESET_MARKER
        yield line
    finally:
        agent.stopService()
        os.close(master)
        os.close(follower)


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def serial(sink: Sink) -> Iterator[Line]:
    yield from serve(sink, serial=True)


@pytest.fixture
def virtio_like(sink: Sink) -> Iterator[Line]:
    """The same device served as a virtio-serial port is: no idle timer."""
    yield from serve(sink, serial=False)


def start_push(line: Line) -> tuple[HostConnection, int, bytes]:
    """A session with a request in flight, and a DATA frame for it that the host has not sent."""
    host = new_host()
    line.handshake(host)
    rid = host.send_request("sink")
    line.send(host.data_to_send())
    host.send_data(rid, Channel.INPUT, b"x" * 1000)
    return host, rid, host.data_to_send()


def test_a_frame_cut_off_by_a_host_that_left_is_dropped_once_the_line_is_idle(
    serial: Line, sink: Sink
) -> None:
    old, _rid, frame = start_push(serial)
    serial.send(frame[:300])  # the host left here
    assert len(serial.reactor.getDelayedCalls()) == 1
    new = new_host()
    new.start()
    serial.send(new.data_to_send())
    assert serial.receive() == b""  # the SYNC went into the dead frame's payload
    serial.reactor.advance(IDLE)
    (cancelled,) = sink.cancelled  # the old session's operation stopped
    assert "middle of a frame" in cancelled["reason"]
    (told,) = old.receive_data(serial.receive())
    assert isinstance(told, ErrorReceived) and isinstance(told.error, ProtocolError)
    assert "middle of a frame" in str(told.error)
    assert serial.reactor.getDelayedCalls() == []  # nothing pending: no timer
    serial.handshake(new)  # the new host's next SYNC gets a session


def test_the_idle_timer_restarts_on_each_read_and_spares_unread_bytes(serial: Line, sink: Sink) -> None:
    host, rid, frame = start_push(serial)
    serial.send(frame[:300])
    serial.reactor.advance(IDLE * 0.6)
    serial.send(frame[300:600])
    serial.reactor.advance(IDLE * 0.6)
    assert serial.agent.session.connection.holds_partial_frame  # the read restarted the timer
    # The agent's reactor stalled: the timer fires before the waiting bytes are read.
    serial.write(frame[600:])
    serial.reactor.advance(IDLE)
    assert serial.agent.session.connection.is_open
    serial.deliver()
    assert serial.reactor.getDelayedCalls() == []
    host.send_eof(rid, Channel.INPUT)
    serial.send(host.data_to_send())
    assert host.receive_data(serial.receive()) == [ResponseReceived(rid, 1000)]
    assert sink.cancelled == []


def test_no_timer_between_whole_frames(serial: Line) -> None:
    serial.send(b"stale bytes before any SYNC")
    assert serial.reactor.getDelayedCalls() == []
    _host, _rid, frame = start_push(serial)
    serial.send(frame)
    assert serial.reactor.getDelayedCalls() == []


def test_no_timer_on_a_device_that_reports_the_host_leaving(virtio_like: Line, sink: Sink) -> None:
    _host, _rid, frame = start_push(virtio_like)
    virtio_like.send(frame[:300])
    assert virtio_like.reactor.getDelayedCalls() == []
    assert virtio_like.agent.session.connection.holds_partial_frame



def test_what_came_before_the_tty_was_raw_is_dropped() -> None:
    """Cooked mode's line editing may have mangled it; a SYNC sent before is not answered."""
    master, follower = os.openpty()
    os.set_blocking(master, False)
    cooked = termios.tcgetattr(follower)
    cooked[3] &= ~termios.ECHO  # only what the agent writes comes back
    termios.tcsetattr(follower, termios.TCSANOW, cooked)
    # A whole line, so that the tty says when it has taken it in.
    os.write(master, SYNC_MAGIC + b"n" * NONCE_SIZE + b"\n")
    waiting = select.poll()
    waiting.register(follower, select.POLLIN)
    assert waiting.poll(10_000), "the pty did not take the line in"
    reactor = MemoryReactorClock()
    agent = CharacterDeviceTransport(reactor, os.ttyname(follower), {}, serial=True, authenticator=AGENT_AUTH)
    agent.startService()
    line = Line(master, reactor, agent)
    try:
        line.deliver()
        assert line.receive() == RESET_MARKER  # and no ACK
    finally:
        agent.stopService()
        os.close(master)
        os.close(follower)
