"""
The device transport's reader: vectored reads and writes on a non-blocking descriptor
(a socket pair stands in for the virtio-serial port), with writes the descriptor cannot
take at once queued in order until it has room.
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from guest_agent import transports
from guest_agent.transports import CharacterDeviceTransport, _DeviceReader


class _Device:
    def __init__(self) -> None:
        self.received = bytearray()
        self.gone: list[str] = []

    def data_received(self, data: memoryview) -> None:
        self.received += data

    def host_gone(self, reader: Any, why: str) -> None:
        self.gone.append(why)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    theirs.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def _drain(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


def test_writes_what_does_not_fit_later_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    reactor, device = MemoryReactorClock(), _Device()
    reader = _DeviceReader(reactor, ours.fileno(), device)  # type: ignore[arg-type]
    header = b"H" * 16
    payload = os.urandom(3 * transports._WRITE_PIECE + 123)
    mutable = bytearray(b"tail")
    reader.write_sequence([header, memoryview(payload), b"", bytes(mutable)])
    assert reader in reactor.writers  # the socket could not take it all
    reader.write(b"more")
    received = bytearray()
    for _ in range(10_000):
        received += _drain(theirs)
        if reader not in reactor.writers:
            break
        reader.doWrite()
    received += _drain(theirs)
    assert bytes(received) == header + payload + b"tail" + b"more"
    assert reader not in reactor.writers
    assert device.gone == []


def test_small_write_goes_out_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    reactor, device = MemoryReactorClock(), _Device()
    reader = _DeviceReader(reactor, ours.fileno(), device)  # type: ignore[arg-type]
    reader.write_sequence([b"header", b"payload"])
    assert reactor.writers == set()
    assert _drain(theirs) == b"headerpayload"


def test_reads_everything_available_then_end_of_file(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    reactor, device = MemoryReactorClock(), _Device()
    reader = _DeviceReader(reactor, ours.fileno(), device)  # type: ignore[arg-type]
    sent = os.urandom(10_000)
    theirs.sendall(sent)
    reader.doRead()
    assert bytes(device.received) == sent
    reader.doRead()  # nothing there: EAGAIN is not an end
    assert device.gone == []
    theirs.shutdown(socket.SHUT_WR)
    reader.doRead()
    assert device.gone == ["end of file"]


def test_a_failed_write_drops_the_queue(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    reactor, device = MemoryReactorClock(), _Device()
    reader = _DeviceReader(reactor, ours.fileno(), device)  # type: ignore[arg-type]
    reader.write_sequence([os.urandom(1 << 20)])
    assert reader in reactor.writers
    theirs.close()
    for _ in range(100):
        if device.gone:
            break
        reader.doWrite()
    assert device.gone and device.gone[0].startswith("write failed")


def test_small_pieces_are_joined_into_one_write(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = pair
    writes: list[list[int]] = []
    writev = os.writev

    def recording_writev(fd: int, buffers: list[Any]) -> int:
        writes.append([len(b) for b in buffers])
        return writev(fd, buffers)

    monkeypatch.setattr(transports.os, "writev", recording_writev)
    reader = _DeviceReader(MemoryReactorClock(), ours.fileno(), _Device())  # type: ignore[arg-type]
    reader.write_sequence([b"H" * 16, b'{"time":1}', b"H" * 16, b""])
    assert writes == [[42]]
    assert _drain(theirs) == b"H" * 16 + b'{"time":1}' + b"H" * 16

    # A large payload is written as it is, not copied to be joined with its header.
    writes.clear()
    payload = os.urandom(transports._WRITE_PIECE + 10)
    reader.write_sequence([b"H" * 16, payload, b"T" * 16])
    received = bytearray()
    for _ in range(10_000):
        received += _drain(theirs)
        if not reader._pending:
            break
        reader.doWrite()
    assert bytes(received) == b"H" * 16 + payload + b"T" * 16
    assert [size for batch in writes for size in batch][:3] == [16, transports._WRITE_PIECE, 10]


def test_a_connected_host_gets_no_sigio() -> None:
    """
    Between hosts the port raises SIGIO to say one came; once one is there it must not,
    or every byte it sends costs a signal and a pass of the reactor loop.
    """
    master, follower = pty.openpty()
    previous = signal.getsignal(signal.SIGIO)
    reactor = MemoryReactorClock()
    device = CharacterDeviceTransport(reactor, os.ttyname(follower), {})
    try:
        device.startService()
        reader = device._reader
        assert reader is not None and device._fd is not None
        # The agent waits for the next host with SIGIO on; a pty never polls as hung up,
        # so its first check finds the "host" already back.
        device.host_gone(reader, "end of file")
        assert device._reader not in (None, reader)
        assert not fcntl.fcntl(device._fd, fcntl.F_GETFL) & os.O_ASYNC
        assert signal.getsignal(signal.SIGIO) == signal.SIG_IGN
    finally:
        device.stopService()
        signal.signal(signal.SIGIO, previous)
        os.close(master)
        os.close(follower)
