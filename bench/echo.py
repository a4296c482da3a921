"""
The raw reference: a plain Twisted client of an echo running in the guest on a
virtio-serial port of its own, through the same kind of channel (QEMU unix-socket
chardev, virtio-serial, guest port device) as the agent's, but with no framing, no
flow control, no JSON and no Python in the guest.
"""

from __future__ import annotations

import os
import time
import zlib

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IReactorUNIX
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from bench.stats import Throughput

__all__ = ["EchoClient", "EchoLost", "connect_echo", "echo_rtt", "echo_throughput", "wait_until_echoing"]


class EchoLost(Exception):
    """The echo channel closed, or returned other bytes than were sent."""


class EchoClient(Protocol):
    """
    Counts the bytes that come back and keeps a running CRC-32 of them, so a test can
    wait for "everything sent so far has returned" and check that it is the same bytes.
    """

    def __init__(self) -> None:
        self.received = 0
        self.crc = 0
        self._threshold = 0
        self._waiter: Deferred[None] | None = None
        self._lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.crc = zlib.crc32(data, self.crc)
        if self._waiter is not None and self.received >= self._threshold:
            waiter, self._waiter = self._waiter, None
            waiter.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = reason
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(EchoLost(f"the echo channel closed: {reason.getErrorMessage()}"))

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def wait_for(self, total: int) -> Deferred[None]:
        """Fires once ``total`` bytes have come back since the connection was made."""
        if self.received >= total:
            return succeed(None)
        if self._lost is not None:
            raise EchoLost(f"the echo channel closed: {self._lost.getErrorMessage()}")
        assert self._waiter is None, "one waiter at a time"
        self._threshold = total
        self._waiter = Deferred()
        return self._waiter

    def reset_check(self) -> None:
        """Start a new CRC (after a phase whose bytes were checked)."""
        self.crc = 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


async def connect_echo(reactor: IReactorUNIX, path: str) -> EchoClient:
    """Connect to the host end (a unix socket) of the guest echo's port."""
    client = EchoClient()
    await UNIXClientEndpoint(reactor, path).connect(Factory.forProtocol(lambda: client))
    return client


async def wait_until_echoing(echo: EchoClient, clock: IReactorTime, timeout: float) -> None:
    """
    Send a probe and wait for it to come back. QEMU holds the bytes until the guest opens
    its end of the port, so the probe may go out before the echo has started.
    """
    probe = b"vmcontroller-bench-probe\n"
    start = echo.received
    echo.send(probe)
    await echo.wait_for(start + len(probe)).addTimeout(timeout, clock)
    echo.reset_check()


async def echo_rtt(
    echo: EchoClient, clock: IReactorTime, count: int, size: int, timeout: float
) -> list[float]:
    """Round trips of ``count`` sequential ``size``-byte messages, in seconds."""
    samples: list[float] = []
    expected = 0
    for _ in range(count):
        message = os.urandom(size)
        expected = zlib.crc32(message, expected)
        target = echo.received + size
        began = time.perf_counter()
        echo.send(message)
        await echo.wait_for(target).addTimeout(timeout, clock)
        samples.append(time.perf_counter() - began)
    if echo.crc != expected:
        raise EchoLost("the echo returned other bytes than were sent (small messages)")
    echo.reset_check()
    return samples


async def echo_throughput(
    echo: EchoClient, clock: IReactorTime, size: int, chunk: int, window: int, timeout: float
) -> Throughput:
    """
    Echo ``size`` random bytes, writing ``chunk`` at a time while reading, with at most
    ``window`` bytes in flight (as the protocol's flow control allows the agent), and time
    from the first write to the last byte back.

    The result is *bytes echoed / time*: each byte crosses the channel twice (there and
    back, concurrently), but counts once, so it compares directly with a one-way push or
    pull of the same size. With one guest vCPU doing both directions this is a
    conservative (low) reference, which favours the agent in the ratios.
    """
    chunks = [os.urandom(min(chunk, size - offset)) for offset in range(0, size, chunk)]
    expected = 0
    for piece in chunks:
        expected = zlib.crc32(piece, expected)
    base = echo.received
    sent = 0
    began = time.perf_counter()
    for piece in chunks:
        if sent + len(piece) - window > 0:
            await echo.wait_for(base + sent + len(piece) - window).addTimeout(timeout, clock)
        echo.send(piece)
        sent += len(piece)
    await echo.wait_for(base + size).addTimeout(timeout, clock)
    elapsed = time.perf_counter() - began
    if echo.crc != expected:
        raise EchoLost("the echo returned other bytes than were sent (bulk)")
    echo.reset_check()
    return Throughput(size, elapsed)
