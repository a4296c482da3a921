"""
The peer: the QEMU guest agent (``qemu-ga``, Debian's ``qemu-guest-agent``) in the same
guest as ours, measured in turn with our agent, from a plain Twisted client of its unix
socket (no libvirt in between).

qemu-ga speaks JSON: one request object per command, one response line (``{"return": ...}``
or ``{"error": ...}`` and ``\\n``) per request, in order (QEMU's qga/main.c, ``send_response``).
A client first resynchronises the stream, as QEMU's qga/qapi-schema.json documents for
``guest-sync-delimited``: it sends a 0xFF byte (invalid in JSON, it resets qemu-ga's parser
whatever a previous client left in it), then ``guest-sync-delimited`` with a random id, and
drops everything it reads up to the 0xFF that qemu-ga puts before that one response.

The operations are the ones every QGA user has: ``guest-ping``; ``guest-exec`` then
``guest-exec-status`` polled back to back (no sleep between polls) until the process has
exited; a push as ``guest-file-open`` (mode ``"w"``), ``guest-file-write`` of base64
chunks, ``guest-file-close``; a pull as ``guest-file-read`` until ``eof``. One request at a
time, as libvirt sends them.

The bench's qemu-ga runs on a virtio-serial port of its own (:data:`BENCH_QGA_CHANNEL`),
started by the bench as a transient unit, the way the bench starts its development-mode
agent: libvirt connects to the standard port ``org.qemu.guest_agent.0`` itself once the
guest opens it (its ``qemuConnectAgent``) and QEMU's socket chardev serves one client at a
time, so a direct client cannot use that one. The domain has the standard port too, and the
bench checks that the package's unit started on it (udev starts it:
``/lib/udev/rules.d/60-qemu-guest-agent.rules``), as in any libvirt guest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from bench.stats import Latency, Throughput
from vmcontroller.errors import VMControllerError

__all__ = [
    "BENCH_QGA_CHANNEL",
    "BENCH_QGA_UNIT",
    "QGA_CHANNEL",
    "QGA_PACKAGE",
    "QGA_READ_COUNT",
    "QGA_UNIT",
    "QGA_WRITE_CHUNK",
    "QGAClient",
    "QGACommandError",
    "QGADecoder",
    "QGAError",
    "QGAFigures",
    "connect_qga",
    "qga_exec",
    "qga_pull",
    "qga_push",
]

#: The Debian package the bench's image gets (vmcontroller.images.build_image(extra_packages=...)).
QGA_PACKAGE = "qemu-guest-agent"
#: The standard port: libvirt's agent channel, on which the package's unit runs.
QGA_CHANNEL = "org.qemu.guest_agent.0"
QGA_UNIT = "qemu-guest-agent.service"
#: The port of the qemu-ga the bench measures, which libvirt leaves alone.
BENCH_QGA_CHANNEL = "org.vmcontroller.qga.0"
BENCH_QGA_UNIT = "vmc-bench-qga"

#: The byte qemu-ga puts before the response to ``guest-sync-delimited`` (QGA_SENTINEL_BYTE
#: in qga/guest-agent-core.h), and that a client sends to reset qemu-ga's parser.
SENTINEL = b"\xff"

#: qemu-ga takes a request of at most 64 MiB of JSON tokens (MAX_TOKEN_SIZE in
#: qobject/json-streamer.c) and reads at most 48 MiB per ``guest-file-read``
#: (GUEST_FILE_READ_COUNT_MAX in qga/commands.c, "48MB + Base64 3:4 overhead = JSON parser
#: 64 MB limit"; 4 KiB, QGA_READ_COUNT_DEFAULT, when ``count`` is not given). Both figures
#: are QEMU 7.2's, Debian bookworm's. Below 48 MiB the size of a request hardly matters:
#: qemu-ga reads its port 4 KiB at a time (QGA_READ_COUNT_DEFAULT, qga/main.c) and lexes
#: JSON character by character, so the time goes into the bytes, not the round trips; 4 MiB
#: keeps a request's three copies in qemu-ga (the lexer's token, the string, the decoded
#: bytes) small in a 512 MiB guest.
QGA_WRITE_CHUNK = 4 * 1024 * 1024
QGA_READ_COUNT = 4 * 1024 * 1024
#: The longest response line the client accepts: a read of QGA_READ_COUNT in base64 and
#: its JSON around it, with room to spare. qemu-ga is in the guest, which is untrusted.
MAX_RESPONSE = QGA_READ_COUNT * 4 // 3 + 64 * 1024


class QGAError(VMControllerError):
    """qemu-ga could not be reached, or answered something that is not its protocol."""


class QGACommandError(QGAError):
    """qemu-ga answered a command with an error."""


class QGADecoder:
    """
    qemu-ga's responses from the bytes of its port: JSON objects, one a line. After
    :meth:`expect_sentinel` everything up to the next 0xFF is dropped (stale responses, or
    whatever a previous client left unread).
    """

    def __init__(self, max_response: int = MAX_RESPONSE) -> None:
        self._max_response = max_response
        self._buffer = bytearray()
        # How far the buffer is known to hold no newline: a long line arriving in pieces is
        # scanned once, not once per piece.
        self._scanned = 0
        self._awaiting_sentinel = False

    def expect_sentinel(self) -> None:
        self._awaiting_sentinel = True

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """
        The responses completed by ``data``.

        :raises QGAError: a line is longer than ``max_response`` or is not a response.
        """
        self._buffer += data
        responses: list[dict[str, Any]] = []
        while True:
            if self._awaiting_sentinel:
                at = self._buffer.find(SENTINEL)
                if at < 0:
                    self._buffer.clear()
                    self._scanned = 0
                    return responses
                del self._buffer[: at + 1]
                self._scanned = 0
                self._awaiting_sentinel = False
            end = self._buffer.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._buffer)
                if self._scanned > self._max_response:
                    raise QGAError(
                        f"qemu-ga sent a line of more than {self._max_response} bytes, more than any "
                        "response to the bench's requests can be"
                    )
                return responses
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scanned = 0
            if line.strip():
                responses.append(_response(line))


def _response(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError as e:
        raise QGAError(f"qemu-ga sent a line that is not JSON ({e}): {line[:80]!r}") from None
    if not isinstance(message, dict) or not ("return" in message or "error" in message):
        raise QGAError(f"qemu-ga sent JSON that is not a response: {line[:80]!r}")
    return message


class QGAClient(Protocol):
    """A thin adapter: requests out, :class:`QGADecoder`'s responses to their callers, in order."""

    def __init__(self) -> None:
        self._decoder = QGADecoder()
        self._waiting: deque[Deferred[Any]] = deque()
        self._lost: str | None = None

    def dataReceived(self, data: bytes) -> None:
        try:
            responses = self._decoder.feed(data)
        except QGAError as e:
            self._give_up(e)
            return
        for response in responses:
            if not self._waiting:
                self._give_up(QGAError(f"qemu-ga answered a request it was not sent: {response!r:.80}"))
                return
            waiter = self._waiting.popleft()
            if "error" in response:
                error = response["error"]
                waiter.errback(Failure(QGACommandError(f"qemu-ga refused the command: {error!r:.200}")))
            else:
                waiter.callback(response["return"])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = reason.getErrorMessage()
        self._fail_all(QGAError(f"the connection to qemu-ga closed: {self._lost}"))

    def _give_up(self, error: QGAError) -> None:
        self._fail_all(error)
        assert self.transport is not None
        self.transport.loseConnection()

    def _fail_all(self, error: QGAError) -> None:
        while self._waiting:
            self._waiting.popleft().errback(Failure(error))

    def command(self, execute: str, arguments: dict[str, Any] | None = None) -> Deferred[Any]:
        """Send one request; the Deferred fires with its ``return`` value."""
        if self._lost is not None:
            raise QGAError(f"the connection to qemu-ga closed: {self._lost}")
        assert self.transport is not None
        request: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            request["arguments"] = arguments
        waiter: Deferred[Any] = Deferred()
        self._waiting.append(waiter)
        self.transport.write(json.dumps(request, separators=(",", ":")).encode())
        return waiter

    async def sync(self, clock: IReactorTime, timeout: float) -> None:
        """Resynchronise: 0xFF, then ``guest-sync-delimited``; what came before is dropped."""
        assert not self._waiting, "resynchronise with no request outstanding"
        assert self.transport is not None
        ident = secrets.randbelow(2**53)  # an int that JSON and qemu-ga's int64 both hold
        self._decoder.expect_sentinel()
        self.transport.write(SENTINEL)
        echoed = await self.command("guest-sync-delimited", {"id": ident}).addTimeout(timeout, clock)
        if echoed != ident:
            raise QGAError(f"qemu-ga answered guest-sync-delimited {ident} with {echoed!r}")

    def ping(self) -> Deferred[Any]:
        return self.command("guest-ping")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


async def connect_qga(reactor: Any, path: str, timeout: float) -> QGAClient:
    """
    Connect to the host socket of qemu-ga's port and resynchronise. QEMU holds the bytes
    until the guest opens its end, so this may be called before qemu-ga has started.
    """
    client = QGAClient()
    endpoint = UNIXClientEndpoint(reactor, path)
    await endpoint.connect(Factory.forProtocol(lambda: client))
    try:
        await client.sync(reactor, timeout)
    except BaseException:
        client.close()
        raise
    return client


async def qga_exec(client: QGAClient, argv: Sequence[str]) -> tuple[int | None, int]:
    """
    Run ``argv`` and wait until it has exited, polling ``guest-exec-status`` back to back.

    :return: its exit code (None if a signal ended it) and the number of polls.
    """
    started = await client.command("guest-exec", {"path": argv[0], "arg": list(argv[1:])})
    pid = started["pid"]
    polls = 0
    while True:
        status = await client.command("guest-exec-status", {"pid": pid})
        polls += 1
        if status["exited"]:
            code = status.get("exitcode")
            return (code if isinstance(code, int) else None), polls


async def qga_push(client: QGAClient, source: str, guest_path: str) -> tuple[Throughput, str]:
    """
    Write the host file ``source`` to ``guest_path`` in base64 chunks of
    :data:`QGA_WRITE_CHUNK`; return the time and the sha256 of what was sent. The clock runs
    from the open to the close's answer, the host's reading and hashing included, as it does
    for our agent's push.
    """
    digest = hashlib.sha256()
    size = 0
    began = time.perf_counter()
    handle = await client.command("guest-file-open", {"path": guest_path, "mode": "w"})
    with open(source, "rb") as f:
        while chunk := f.read(QGA_WRITE_CHUNK):
            digest.update(chunk)
            written = await client.command(
                "guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()}
            )
            if written["count"] != len(chunk):
                raise QGAError(f"qemu-ga wrote {written['count']} of {len(chunk)} bytes")
            size += len(chunk)
    await client.command("guest-file-close", {"handle": handle})
    return Throughput(size, time.perf_counter() - began), digest.hexdigest()


async def qga_pull(
    client: QGAClient, guest_path: str, destination: str, limit: int
) -> tuple[Throughput, str]:
    """
    Read ``guest_path`` into the host file ``destination`` with ``guest-file-read`` of
    :data:`QGA_READ_COUNT` until ``eof``, hashing and then fsyncing the file as our agent's
    pull does on the host; return the time and the sha256 of what came.

    :param limit: the most bytes to accept: the file in the guest could be any size.
    """
    digest = hashlib.sha256()
    size = 0
    began = time.perf_counter()
    handle = await client.command("guest-file-open", {"path": guest_path, "mode": "r"})
    with open(destination, "wb") as f:
        while True:
            read = await client.command("guest-file-read", {"handle": handle, "count": QGA_READ_COUNT})
            piece = base64.b64decode(read["buf-b64"], validate=True)
            size += len(piece)
            if size > limit:
                raise QGAError(f"qemu-ga sent more than the {limit} bytes of {guest_path}")
            digest.update(piece)
            f.write(piece)
            if read["eof"]:
                break
        f.flush()
        os.fsync(f.fileno())
    await client.command("guest-file-close", {"handle": handle})
    return Throughput(size, time.perf_counter() - began), digest.hexdigest()


@dataclass(frozen=True)
class QGAFigures:
    """
    qemu-ga's figures, taken in turn with our agent's (see :mod:`bench.qga`).

    :ivar version: what ``guest-info`` says.
    :ivar ping: ``guest-ping`` round trips.
    :ivar exec_true: ``guest-exec`` of ``/bin/true`` to the ``guest-exec-status`` that says
        it exited, polled back to back.
    :ivar exec_polls: the ``guest-exec-status`` requests per exec, on average.
    :ivar push: the median round's push; its size may be smaller than ours (rates compare).
    :ivar pull: the median round's pull.
    """

    version: str
    ping: Latency
    exec_true: Latency
    exec_polls: float
    push: Throughput
    pull: Throughput
