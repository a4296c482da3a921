"""
The transfer reference: the work of the agent's push and pull done by C tools in the guest
(coreutils under bash), over the bench's extra virtio-serial port, which the agent does not
hold.  Push and pull are judged against it: it is the best the guest does under the same
emulation, through the same kind of channel, with the same work per byte.

- push: the host writes the data to the port; the guest runs ``head -c SIZE <port | tee TEMP
  | sha256sum`` (or ``dd`` to the file, then ``sha256sum`` of it), then, as the agent's push
  does, fsyncs the file, renames it into place, fsyncs the directory and answers with the
  digest.
- pull: on the host's go byte, the guest runs ``cat FILE | tee >(sha256sum >port) >port``
  (or ``dd`` to the port, then ``sha256sum`` of the file): the bytes, then their digest.

Each way is measured; the faster of the two is the reference.  A third way, ``cksum``, is
the ``dd`` way with coreutils' ``cksum`` (a CRC) in place of ``sha256sum``: the agent
checks its transfers with CRC-32 (docs/protocol.md, Checksums), so this is the C tools doing
exactly the agent's guest work but for TLS.  It is printed beside the reference, not judged
(the issue's reference hashes with sha256).

The host does its share as the agent's push and pull do (reads and hashes the file as it
sends; writes and hashes the bytes as they arrive, then fsyncs the file and renames it), so
that the two differ only in the guest.  The clock runs
from the host's first byte (push) or go byte (pull) to the digest's arrival.  The shell and
its pipeline are started before that: the guest says "R" once it holds the port, then the
host waits :data:`SETTLE` seconds for the pipeline's processes to be exec'd and blocked on
their reads.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import IO

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IReactorUNIX
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from bench.stats import Throughput
from vmcontroller.client import ExecHandle, GuestClient
from vmcontroller.errors import VMControllerError

__all__ = [
    "JUDGED_WAYS",
    "PULL_WAYS",
    "PUSH_WAYS",
    "PortClient",
    "ReferenceError",
    "TransferRound",
    "median_rate",
    "reference_pull",
    "reference_push",
]

#: Seconds between the guest's "R" and the start of the clock: the shell has forked the
#: pipeline by then; the wait lets its processes reach their first read.
SETTLE = 0.3
#: Seconds the guest's shell gets to open the port and say "R".
READY_TIMEOUT = 60.0
_READY = b"R"
#: What the host reads of the file and sends at a time in the reference push.
_HOST_CHUNK = 1024 * 1024
#: The longest answer line: a hex sha256 (cksum's "CRC SIZE" is shorter) and a newline.
_DIGEST_LINE = 64 + 1


class ReferenceError(VMControllerError):
    """The C-tools reference could not be measured (a tool failed, bytes differ)."""


@dataclass(frozen=True)
class TransferRound:
    """
    One round: the agent's push, each way's reference push, the agent's pull, each way's
    reference pull, one after the other, so that each ratio compares figures taken under
    the same load.
    """

    push: Throughput
    pull: Throughput
    #: Each way's figure (PUSH_WAYS, PULL_WAYS).
    push_ways: dict[str, Throughput]
    pull_ways: dict[str, Throughput]

    @property
    def push_reference(self) -> Throughput:
        """The fastest of the :data:`JUDGED_WAYS`: the reference the agent is judged against."""
        return max((self.push_ways[way] for way in JUDGED_WAYS), key=lambda figure: figure.mb_per_s)

    @property
    def pull_reference(self) -> Throughput:
        return max((self.pull_ways[way] for way in JUDGED_WAYS), key=lambda figure: figure.mb_per_s)

    @property
    def push_ratio(self) -> float:
        return self.push.mb_per_s / self.push_reference.mb_per_s

    @property
    def pull_ratio(self) -> float:
        return self.pull.mb_per_s / self.pull_reference.mb_per_s


def median_rate(figures: Sequence[Throughput]) -> Throughput:
    """The figure of median rate (the lower middle one of an even count)."""
    ordered = sorted(figures, key=lambda figure: figure.mb_per_s)
    return ordered[(len(ordered) - 1) // 2]


class PortClient(Protocol):
    """The host end of the port: sends, keeps every byte received, wakes one waiter."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._line_from = 0
        self._waiter: Deferred[bytes] | None = None
        self._lost: str | None = None
        # Where the bytes at stream offsets [start, end) go as they arrive, and their hash.
        self._span = (0, 0)
        self._sink: IO[bytes] | None = None
        self.hasher = hashlib.sha256()

    def record(self, start: int, size: int, sink: IO[bytes]) -> None:
        """Write the ``size`` bytes from stream offset ``start`` to ``sink`` as they arrive, hashing them."""
        self._span, self._sink = (start, start + size), sink

    def dataReceived(self, data: bytes) -> None:
        offset = len(self.received)
        self.received += data
        start, end = self._span
        if self._sink is not None and offset < end and offset + len(data) > start:
            with memoryview(data) as view:
                piece = view[max(start - offset, 0) : end - offset]
                self._sink.write(piece)
                self.hasher.update(piece)
        self._check()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = reason.getErrorMessage()
        self.fail(ReferenceError(f"the bench port closed: {self._lost}"))

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def line(self, start: int) -> Deferred[bytes]:
        """Fires with the bytes from ``start`` up to the first newline at or after it."""
        if self._lost is not None:
            raise ReferenceError(f"the bench port closed: {self._lost}")
        assert self._waiter is None, "one waiter at a time"
        self._line_from = start
        self._waiter = Deferred()
        waiter = self._waiter
        self._check()
        return waiter

    def fail(self, error: Exception) -> None:
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(error)

    def _check(self) -> None:
        if self._waiter is None or len(self.received) <= self._line_from:
            return
        end = self.received.find(b"\n", self._line_from)
        if end >= 0:
            waiter, self._waiter = self._waiter, None
            waiter.callback(bytes(self.received[self._line_from : end]))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


def _port_script(device: str, body: str) -> list[str]:
    # One read-write descriptor: a virtio-serial port admits one opener.
    return ["bash", "-c", f"set -e -o pipefail\nexec 3<>{shlex.quote(device)}\nprintf 'R\\n' >&3\n{body}"]


async def _run_timed(
    reactor: IReactorUNIX,
    client: GuestClient,
    host_socket: str,
    argv: list[str],
    send: Callable[[PortClient, int], Awaitable[None]],
    answer_at: int,
    finish: Callable[[], Awaitable[None]],
    timeout: float,
) -> tuple[float, PortClient]:
    """
    Connect to the port, start ``argv`` in the guest, wait for its "R" and the settle time,
    then start the clock, run ``send`` (given the stream offset after the "R" line), wait
    for the line at ``answer_at`` (counted from that offset), run ``finish`` and stop the
    clock.  The process must end with status 0.
    """
    clock: IReactorTime = reactor  # type: ignore[assignment]
    port = PortClient()
    # The host end first: a port whose host side is closed reads as end-of-file in the guest.
    await UNIXClientEndpoint(reactor, host_socket).connect(Factory.forProtocol(lambda: port))
    handle = client.exec(argv)
    try:
        _fail_port_when_ended(handle, port, argv)
        ready = await port.line(0).addTimeout(READY_TIMEOUT, clock)
        if ready != _READY:
            raise ReferenceError(f"expected {_READY!r} from the guest's {argv}, got {ready[:80]!r}")
        await deferLater(clock, SETTLE, lambda: None)
        base = len(ready) + 1
        began = time.perf_counter()
        await send(port, base)
        await port.line(base + answer_at).addTimeout(timeout, clock)
        await finish()
        elapsed = time.perf_counter() - began
    except BaseException:
        port.close()
        handle.cancel()
        raise
    try:
        await handle.result(check=True).addTimeout(timeout, clock)
    except VMControllerError as e:
        raise ReferenceError(f"the guest's {argv[-1]!r} failed: {e}") from e
    finally:
        port.close()
    del port.received[:base]
    return elapsed, port


def _fail_port_when_ended(handle: ExecHandle, port: PortClient, argv: list[str]) -> None:
    """A script that ends while the host waits on the port wakes it with the reason."""

    def ended(outcome: object) -> None:
        port.fail(ReferenceError(f"the guest's {argv[-1]!r} ended before it answered: {outcome}"))

    handle.exited.addBoth(ended)


def _digest_of_answer(answer: bytes) -> str:
    """The first word of the guest's answer: a hex sha256, or cksum's decimal CRC."""
    return answer.decode(errors="replace").split()[0] if answer.strip() else ""


def _expected_answer(way: str, path: str, digest: str) -> str:
    """What the guest's tool must answer for the bytes of the host file ``path``."""
    if way != "cksum":
        return digest
    # The host's own cksum: a POSIX CRC, which zlib does not compute.
    with open(path, "rb") as f:
        answer = subprocess.run(["cksum"], stdin=f, capture_output=True, check=True, text=True).stdout
    return answer.split()[0]


#: The guest's ways of doing a push's work, each leaving the digest line in ``$sum``: the
#: issue's pipeline, and one with fewer copies (port to file in 1 MiB blocks, then hash the
#: file from the page cache), which under one vCPU is the cheaper of the two.
PUSH_WAYS = {
    "tee": "sum=$(head -c {size} <&3 | tee {temp} | sha256sum)",
    "dd": "dd bs=1M iflag=fullblock,count_bytes count={size} of={temp} status=none <&3\n"
    "sum=$(sha256sum <{temp})",
    "cksum": "dd bs=1M iflag=fullblock,count_bytes count={size} of={temp} status=none <&3\n"
    "sum=$(cksum <{temp})",
}
#: The guest's ways of doing a pull's work after the host's go byte (read by the shell's
#: builtin, so no process is started on the clock but the tool itself).
PULL_WAYS = {
    "tee": "{{ read -r -N 1 -u 3 _; exec cat {source}; }} | tee >(sha256sum >&3) >&3",
    "dd": "read -r -N 1 -u 3 _\ndd if={source} bs=1M status=none >&3\nsha256sum <{source} >&3",
    "cksum": "read -r -N 1 -u 3 _\ndd if={source} bs=1M status=none >&3\ncksum <{source} >&3",
}
#: The ways the agent is judged against (the issue's work, with sha256); the others are
#: printed beside.
JUDGED_WAYS = ("tee", "dd")


async def _nothing() -> None:
    pass


async def reference_push(
    reactor: IReactorUNIX,
    client: GuestClient,
    host_socket: str,
    device: str,
    source: str,
    digest: str,
    destination: str,
    timeout: float,
    way: str,
) -> Throughput:
    """
    Push the host file ``source`` (its sha256 is ``digest``) to ``destination`` through the
    port whose host end is ``host_socket`` and guest device ``device``, with C tools in the
    guest, the :data:`PUSH_WAYS` ``way``.  The host reads and hashes the file as it sends,
    as the agent's push does.
    """
    clock: IReactorTime = reactor  # type: ignore[assignment]
    size = os.path.getsize(source)
    hasher = hashlib.sha256()

    async def send(port: PortClient, base: int) -> None:
        with open(source, "rb") as f:
            while piece := f.read(_HOST_CHUNK):
                hasher.update(piece)
                port.send(piece)
                await deferLater(clock, 0, lambda: None)  # let the reactor write it

    temp = shlex.quote(f"{destination}.vmc-ref-tmp")
    body = (
        PUSH_WAYS[way].format(size=size, temp=temp) + "\n"
        f"sync {temp}\n"
        f"mv -f {temp} {shlex.quote(destination)}\n"
        f"sync {shlex.quote(os.path.dirname(destination))}\n"
        "printf '%s\\n' \"${sum%% *}\" >&3\n"
    )
    argv = _port_script(device, body)
    expected = await deferToThread(_expected_answer, way, source, digest)
    elapsed, port = await _run_timed(reactor, client, host_socket, argv, send, 0, _nothing, timeout)
    stored = _digest_of_answer(bytes(port.received))
    if not (stored == expected and hasher.hexdigest() == digest):
        raise ReferenceError(f"the guest's {way} way stored {destination} with the sum {stored!r}; the host "
                             f"sent the bytes of sum {expected!r} (sha256 {digest})")
    return Throughput(size, elapsed)


async def reference_pull(
    reactor: IReactorUNIX,
    client: GuestClient,
    host_socket: str,
    device: str,
    source: str,
    size: int,
    digest: str,
    destination: str,
    timeout: float,
    way: str,
) -> Throughput:
    """
    Pull ``source`` (``size`` bytes with sha256 ``digest``) from the guest through the port
    to the host file ``destination``, with C tools in the guest, the :data:`PULL_WAYS`
    ``way``.  The host writes and hashes the bytes as they arrive, then fsyncs the file and
    renames it into place, as the agent's pull does.
    """
    argv = _port_script(device, PULL_WAYS[way].format(source=shlex.quote(source)) + "\n")
    temp = f"{destination}.part"
    with open(temp, "wb") as sink:

        async def send(port: PortClient, base: int) -> None:
            port.record(base, size, sink)
            port.send(b"G")

        async def finish() -> None:
            sink.flush()
            await deferToThread(os.fsync, sink.fileno())
            os.replace(temp, destination)

        elapsed, port = await _run_timed(reactor, client, host_socket, argv, send, size, finish, timeout)
    received = port.hasher.hexdigest()
    told = _digest_of_answer(bytes(port.received[size : size + _DIGEST_LINE + 8]))
    expected = await deferToThread(_expected_answer, way, destination, digest)  # of the bytes received
    if not (told == expected and received == digest):
        raise ReferenceError(
            f"pulled {source} the {way} way: the guest's sum is {told!r} where {expected!r} was due; the "
            f"bytes received hash to sha256 {received}, the file pushed to {digest}"
        )
    return Throughput(size, elapsed)
