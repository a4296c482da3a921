"""
The transport over a libvirt channel stream (hypervisors/libvirt/channel.py), on a fake stream
that answers as libvirt-python's non-blocking ``virStream`` does: ``recv`` gives bytes, ``b""``
at the end, ``-2`` when nothing is there; ``send`` takes some or all of the bytes or gives
``-2``; failures raise ``libvirtError``. A MemoryReactorClock, no libvirtd: the real stream is
driven in tests/integration/test_libvirt_remote.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import libvirt
import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hypervisors.libvirt.channel import ChannelAddress, ChannelEndpoint, StreamTransport
from vmcontroller.errors import ConnectionLost, HypervisorError

READABLE = libvirt.VIR_STREAM_EVENT_READABLE
WRITABLE = libvirt.VIR_STREAM_EVENT_WRITABLE
HANGUP = libvirt.VIR_STREAM_EVENT_HANGUP
AGAIN = -2

ADDRESS = ChannelAddress("qemu+tcp://10.0.0.2/system", "vm1", "org.vmcontroller.agent.0")


class FakeStream:
    """A non-blocking virStream: what libvirt has for us to recv, and what each send takes."""

    def __init__(self) -> None:
        self.incoming: list[bytes | int | libvirt.libvirtError] = []
        #: What the next sends take: a byte count, AGAIN, or an error to raise; then everything.
        self.takes: list[int | libvirt.libvirtError] = []
        self.sent = bytearray()
        self.send_sizes: list[int] = []
        self.events: int | None = None
        self.callback: Callable[[Any, int, Any], object] | None = None
        self.recv_calls = 0

    def eventAddCallback(self, events: int, cb: Callable[[Any, int, Any], object], opaque: Any) -> None:
        assert self.callback is None, "one callback per stream"
        self.events, self.callback = events, cb

    def eventUpdateCallback(self, events: int) -> None:
        assert self.callback is not None
        self.events = events

    def eventRemoveCallback(self) -> None:
        assert self.callback is not None
        self.events, self.callback = None, None

    def recv(self, nbytes: int) -> bytes | int:
        self.recv_calls += 1
        if not self.incoming:
            return AGAIN
        item = self.incoming.pop(0)
        if isinstance(item, libvirt.libvirtError):
            raise item
        if isinstance(item, bytes) and len(item) > nbytes:
            self.incoming.insert(0, item[nbytes:])
            return item[:nbytes]
        return item

    def send(self, data: bytes) -> int:
        assert isinstance(data, bytes) and data, "libvirt takes non-empty bytes"
        take: int | libvirt.libvirtError = self.takes.pop(0) if self.takes else len(data)
        if isinstance(take, libvirt.libvirtError):
            raise take
        if take == AGAIN:
            return AGAIN
        self.sent += data[:take]
        self.send_sizes.append(min(take, len(data)))
        return min(take, len(data))

    def fire(self, events: int) -> None:
        """libvirt's event loop calls back for ``events``."""
        assert self.callback is not None, "no callback registered"
        self.callback(self, events, None)

    def pump(self) -> None:
        """Call back for what is asked until nothing more is (as libvirt's timer does)."""
        for _ in range(1000):
            if self.callback is None or not self.events:
                return
            ready = self.events & WRITABLE
            if self.events & READABLE and self.incoming:
                ready |= READABLE
            if not ready:
                return
            self.fire(ready)
        raise AssertionError("the transport keeps asking for events")


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.made = 0
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.append(reason)


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.stopped = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped += 1


class Setup:
    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.stream = FakeStream()
        self.closed: list[tuple[Any, bool]] = []
        self.opening: Deferred[Any] = Deferred()
        self.live: set[StreamTransport] = set()
        self.endpoint = ChannelEndpoint(
            self.reactor,
            lambda: self.opening,
            lambda s, abort: self.closed.append((s, abort)),
            ADDRESS,
            self.live,
        )
        self.protocol = Recorder()

    def connect(self) -> Deferred[Any]:
        return self.endpoint.connect(Factory.forProtocol(lambda: self.protocol))

    def connected(self) -> StreamTransport:
        d = self.connect()
        self.opening.callback(self.stream)
        assert self.protocol.made == 1
        assert d.called
        transport = self.protocol.transport
        assert isinstance(transport, StreamTransport)
        return transport


@pytest.fixture
def setup() -> Setup:
    return Setup()


def error(message: str) -> libvirt.libvirtError:
    return libvirt.libvirtError(message)


def test_connect_watches_the_stream_for_reading(setup: Setup) -> None:
    transport = setup.connected()
    assert setup.stream.events == READABLE  # not WRITABLE: nothing to write
    assert transport.getPeer() == ADDRESS == transport.getHost()
    assert "vm1" in str(transport.getPeer())
    verifyObject(IPushProducer, transport)


def test_data_reaches_the_protocol_and_eagain_is_no_end(setup: Setup) -> None:
    setup.connected()
    setup.stream.incoming = [b"hello ", AGAIN, b"world"]
    setup.stream.fire(READABLE)
    setup.stream.fire(READABLE)  # -2: nothing there yet
    assert bytes(setup.protocol.data) == b"hello "
    assert not setup.protocol.lost
    setup.stream.fire(READABLE)
    assert bytes(setup.protocol.data) == b"hello world"
    assert not setup.protocol.lost and not setup.closed


def test_reads_take_one_chunk_per_event(setup: Setup) -> None:
    setup.connected()
    big = bytes(range(256)) * (StreamTransport.CHUNK * 2 // 256 + 1)
    setup.stream.incoming = [big]
    setup.stream.fire(READABLE)
    assert len(setup.protocol.data) == StreamTransport.CHUNK
    setup.stream.pump()
    assert bytes(setup.protocol.data) == big


def test_eagain_on_send_keeps_the_data_until_writable(setup: Setup) -> None:
    transport = setup.connected()
    transport.write(b"ping")
    assert setup.stream.events == READABLE | WRITABLE
    setup.stream.takes = [AGAIN]
    setup.stream.fire(WRITABLE)
    assert setup.stream.sent == b""
    assert setup.stream.events == READABLE | WRITABLE  # still waiting to write
    setup.stream.fire(WRITABLE)
    assert setup.stream.sent == b"ping"
    assert setup.stream.events == READABLE  # drained: no more WRITABLE callbacks


def test_partial_sends_deliver_every_byte_in_order_in_chunks(setup: Setup) -> None:
    transport = setup.connected()
    data = bytes(range(256)) * 1000  # 256000 bytes: several chunks
    transport.write(data[:100])
    transport.write(data[100:])
    setup.stream.takes = [7, AGAIN, 1, 70000]
    setup.stream.pump()
    assert bytes(setup.stream.sent) == data
    assert max(setup.stream.send_sizes) <= StreamTransport.CHUNK
    assert setup.stream.send_sizes[:2] == [7, 1]


def test_an_empty_write_sends_nothing(setup: Setup) -> None:
    transport = setup.connected()
    transport.write(b"")
    assert setup.stream.events == READABLE
    transport.loseConnection()
    setup.stream.pump()  # flush: nothing to send, so no (empty) packet
    assert setup.stream.send_sizes == []
    assert setup.protocol.lost and setup.protocol.lost[0].check(ConnectionDone)


def test_end_of_stream_closes_cleanly_and_finishes_it(setup: Setup) -> None:
    setup.connected()
    setup.stream.incoming = [b"last words", b""]
    setup.stream.pump()
    assert bytes(setup.protocol.data) == b"last words"
    [reason] = setup.protocol.lost
    assert reason.check(ConnectionDone)
    assert setup.closed == [(setup.stream, False)]  # finish, not abort
    assert setup.stream.callback is None  # no more callbacks


def test_a_hangup_is_read_even_while_paused(setup: Setup) -> None:
    transport = setup.connected()
    transport.pauseProducing()
    setup.stream.incoming = [b""]
    setup.stream.fire(HANGUP)
    assert setup.protocol.lost and setup.protocol.lost[0].check(ConnectionDone)


@pytest.mark.parametrize("where", ["recv", "send"])
def test_a_stream_error_is_our_connection_lost_and_aborts(setup: Setup, where: str) -> None:
    transport = setup.connected()
    if where == "recv":
        setup.stream.incoming = [error("stream had I/O failure")]
        setup.stream.fire(READABLE)
    else:
        setup.stream.takes = [error("stream had I/O failure")]
        transport.write(b"x")
        setup.stream.fire(WRITABLE)
    [reason] = setup.protocol.lost
    assert reason.check(ConnectionLost)
    message = str(reason.value)
    assert "stream had I/O failure" in message and "'vm1'" in message
    assert ("receive from" if where == "recv" else "send to") in message
    assert setup.closed == [(setup.stream, True)]
    assert setup.stream.callback is None
    # Lost once: later events (libvirt may still have one queued) do nothing.
    transport.write(b"more")
    assert len(setup.protocol.lost) == 1 and setup.closed == [(setup.stream, True)]


def test_pausing_stops_reading_until_resumed(setup: Setup) -> None:
    transport = setup.connected()
    transport.pauseProducing()
    assert setup.stream.events == 0
    setup.stream.incoming = [b"waits"]
    setup.stream.fire(READABLE)  # one libvirt had queued before the update
    assert setup.protocol.data == b"" and setup.stream.recv_calls == 0
    transport.resumeProducing()
    assert setup.stream.events == READABLE
    setup.stream.pump()
    assert setup.protocol.data == b"waits"


def test_a_full_buffer_pauses_the_producer_until_it_drains(setup: Setup) -> None:
    transport = setup.connected()
    producer = Producer()
    transport.registerProducer(producer, True)
    transport.write(b"x" * (transport.bufferSize + 1))
    assert producer.paused == 1 and producer.resumed == 0
    setup.stream.takes = [AGAIN]
    setup.stream.fire(WRITABLE)
    assert producer.resumed == 0  # nothing went out
    setup.stream.pump()
    assert producer.resumed == 1
    assert len(setup.stream.sent) == transport.bufferSize + 1


def test_lose_connection_flushes_first_then_finishes(setup: Setup) -> None:
    transport = setup.connected()
    transport.write(b"goodbye")
    transport.loseConnection()
    assert not setup.protocol.lost
    setup.stream.takes = [3]
    setup.stream.fire(WRITABLE)
    assert not setup.protocol.lost  # "bye" still to send
    setup.stream.pump()
    assert setup.stream.sent == b"goodbye"
    assert setup.protocol.lost[0].check(ConnectionDone)
    assert setup.closed == [(setup.stream, False)]


def test_abort_drops_unsent_data_and_aborts_the_stream(setup: Setup) -> None:
    transport = setup.connected()
    transport.write(b"never sent")
    transport.abortConnection()
    assert setup.stream.events == 0
    setup.reactor.advance(0)
    assert setup.stream.sent == b""
    [reason] = setup.protocol.lost
    assert reason.check(ConnectionAborted)
    assert setup.closed == [(setup.stream, True)]


def test_an_open_failure_reaches_the_caller(setup: Setup) -> None:
    d = setup.connect()
    setup.opening.errback(HypervisorError("cannot open the channel"))
    assert isinstance(setup.endpoint, ChannelEndpoint)
    f = _failure(d)
    assert f.check(HypervisorError) and setup.protocol.made == 0


def test_a_stream_opened_after_cancel_is_aborted(setup: Setup) -> None:
    d = setup.connect()
    d.cancel()
    assert _failure(d).check(CancelledError)
    setup.opening.callback(setup.stream)  # the pool's open finishes later
    assert setup.closed == [(setup.stream, True)]
    assert setup.protocol.made == 0 and setup.stream.callback is None


def test_a_factory_that_refuses_aborts_the_stream(setup: Setup) -> None:
    class Refusing(Factory):
        def buildProtocol(self, addr: Any) -> None:
            return None

    d = setup.endpoint.connect(Refusing())
    setup.opening.callback(setup.stream)
    assert _failure(d).check(ConnectionLost)
    assert setup.closed == [(setup.stream, True)]


def _failure(d: Deferred[Any]) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the Deferred did not fail"
    return failures[0]


def test_open_transports_are_known_until_they_close(setup: Setup) -> None:
    transport = setup.connected()
    assert setup.live == {transport}
    setup.stream.incoming = [b""]
    setup.stream.fire(READABLE)
    assert setup.live == set()


def test_lose_closes_at_once_with_the_reason_given(setup: Setup) -> None:
    """What the driver does when the libvirt connection under the streams goes."""
    transport = setup.connected()
    transport.write(b"unsent")
    transport.lose(ConnectionLost("the connection to libvirtd was lost"))
    [reason] = setup.protocol.lost
    assert reason.check(ConnectionLost) and "libvirtd was lost" in str(reason.value)
    assert setup.closed == [(setup.stream, True)] and setup.live == set()
    assert setup.stream.callback is None and setup.stream.sent == b""
    transport.lose(ConnectionLost("again"))  # closed already: nothing more
    assert len(setup.protocol.lost) == 1 and len(setup.closed) == 1
