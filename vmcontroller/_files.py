"""
Host side of file transfers: :func:`push` streams a host file to the agent's ``push``
operation, :func:`pull` receives the agent's ``pull`` stream.  Both checksum what moves and
check it against the other end's account (guest_agent/protocol/checksums.py): the agent is
asked for CRC-32, far cheaper than sha256 on an emulated CPU, and an agent from before it
answers with sha256; the host computes both, and sha256 is what the caller gets.

Host disk reads and writes happen on the reactor thread, a 256 KiB chunk at a time: for a
local file that is far quicker than a thread hop per chunk, and flow control bounds each
burst to one window.  A file object passed in must therefore not block (no pipes or
sockets); ``fsync`` of a pulled file, which can take seconds, runs in the reactor's thread
pool.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.internet.threads import deferToThreadPool

from guest_agent.link import RequestIO
from guest_agent.protocol.checksums import CHECKSUMS, new_checksum
from guest_agent.protocol.frames import Channel
from vmcontroller.errors import (
    BadRequest,
    ConnectionLost,
    IncompleteTransfer,
    IntegrityError,
    IsADirectory,
    LimitExceeded,
    NotADirectory,
    PathNotFound,
    PermissionDenied,
    UnknownOperation,
    VMControllerError,
)

if TYPE_CHECKING:
    from vmcontroller.client import GuestClient

#: Called as bytes move: bytes done so far, and the total when known (a pull does not
#: know it before the end).
Progress = Callable[[int, int | None], None]

CHUNK_SIZE = 256 * 1024
#: How many times one push resumes after a dropped channel before it gives up ...
MAX_RESUMES = 3
#: ... and how long it waits each time for the agent to be back.
RESUME_WAIT = 30.0
#: The checksum the host asks the agent for.
CHECKSUM = "crc32"


@dataclass(frozen=True)
class TransferResult:
    """
    A finished transfer.

    :ivar path: the file's path in the guest (the destination of a push, the source of
        a pull).
    :ivar sha256: the host's own sha256 of the bytes it sent or received, which the agent's
        checksum matched.
    :ivar mode: the permission bits of the guest file (as the agent reports them; a pulled
        host file's mode is the caller's choice, see :func:`pull`).
    :ivar seconds: how long the transfer took, by the client's clock.
    """

    path: str
    size: int
    sha256: str
    mode: int
    seconds: float


async def _fsync(client: GuestClient, fd: int) -> None:
    """fsync in the reactor's thread pool; a test's Clock has none, and there it runs inline."""
    if IReactorThreads.providedBy(client.reactor):
        reactor = cast(IReactorThreads, client.reactor)
        await deferToThreadPool(cast(IReactorFromThreads, reactor), reactor.getThreadPool(), os.fsync, fd)
    else:
        os.fsync(fd)


def _stream_failed(result: Deferred[Any]) -> None:
    """
    A stream call raised a :class:`VMControllerError`: the request has ended, and the
    error is the agent's own (or the lost connection's).  ``result`` fails with the same
    error, possibly just after this returns (the client wakes the stream first), so it
    must not be cancelled; its failure is consumed here instead.
    """
    result.addErrback(lambda failure: None)


def _abandon(result: Deferred[Any]) -> None:
    """The host gave up (a local error, a cancel): the agent stops and discards its part."""
    result.cancel()
    result.addErrback(lambda failure: None)  # its CancelledError interests nobody


class _Checksums:
    """The host's checksums of what a transfer moved: every one an agent may answer with."""

    def __init__(self) -> None:
        self._running = [new_checksum(name) for name in CHECKSUMS]

    def update(self, data: bytes | bytearray) -> None:
        for checksum in self._running:
            checksum.update(data)

    def hexdigests(self) -> dict[str, str]:
        return {checksum.name: checksum.hexdigest() for checksum in self._running}


def _checksum_of(account: dict[str, Any]) -> tuple[str, Any]:
    """
    The checksum in the agent's ``account`` of a file (a trailer or result), as its name
    and value: the first of :data:`CHECKSUMS` it gives (an agent from before crc32 gives
    sha256), else ours with the value None.
    """
    name = next((name for name in CHECKSUMS if name in account), CHECKSUM)
    return name, account.get(name)


def _open_source(source: str | os.PathLike[str]) -> IO[bytes]:
    path = os.fspath(source)
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by push)
    except FileNotFoundError:
        raise PathNotFound(f"the host file {path} does not exist", {"path": path}) from None
    except IsADirectoryError:
        raise IsADirectory(f"the host path {path} is a directory; push the files in it one by one",
                           {"path": path}) from None
    except PermissionError:
        raise PermissionDenied(f"this host user may not read the host file {path}", {"path": path}) from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise IsADirectory(f"the host path {path} is not a regular file", {"path": path})
    return f


def _describe(source: IO[bytes]) -> tuple[int | None, int | None]:
    """Size and permission bits of a file object, when it is a regular file."""
    try:
        info = os.fstat(source.fileno())
    except (AttributeError, OSError, ValueError):
        return None, None  # BytesIO and the like have no descriptor
    if not stat.S_ISREG(info.st_mode):
        return None, None
    return info.st_size - source.tell(), stat.S_IMODE(info.st_mode)


async def _send_file(io: RequestIO, source: IO[bytes], total: int | None, progress: Progress | None,
                     checksums: _Checksums, sent: int) -> tuple[dict[str, str], int]:
    """Send the rest of ``source``; ``checksums`` and ``sent`` cover what was sent before."""
    while chunk := source.read(CHUNK_SIZE):
        checksums.update(chunk)
        await io.send(Channel.INPUT, chunk)
        sent += len(chunk)
        if progress is not None:
            progress(sent, total)
    digests = checksums.hexdigests()
    io.send_eof(Channel.INPUT, {**digests, "size": sent})
    return digests, sent


async def push(client: GuestClient, source: str | os.PathLike[str] | IO[bytes], destination: str, *,
               mode: int | None, progress: Progress | None) -> TransferResult:
    """
    Copy ``source`` (a host path or a binary file object, read from its position) to the
    guest path ``destination``, which appears there whole or not at all.

    :param mode: permission bits of the guest file; None keeps the host file's (or, for a
        file object without one, the guest's default).
    :raises PathNotFound: the host file, or the guest destination's directory, is missing.
    :raises IntegrityError: the agent received other bytes than were sent.
    """
    started = client.reactor.seconds()
    f = source if not isinstance(source, str | os.PathLike) else _open_source(source)
    try:
        size, host_mode = _describe(f)
        args: dict[str, Any] = {"path": destination, "mode": host_mode if mode is None else mode,
                                "size": size, "checksum": CHECKSUM}
        # A reconnecting client resumes a push whose channel dropped, from a regular file.
        resumable = client.reconnects and size is not None
        if resumable:
            args["transfer_id"] = uuid.uuid4().hex
        begin = f.tell()
        checksums, done = _Checksums(), 0
        for attempt in range(MAX_RESUMES + 1):
            io, result = await client.open_request("push", {**args, "offset": done} if done else args)
            try:
                digests, sent = await _send_file(io, f, size, progress, checksums, done)
            except ConnectionLost as e:
                _stream_failed(result)
                lost = e
            except VMControllerError:
                # E.g. the guest directory is missing: the agent answered with an error at
                # once, RequestIO raises that error, and the file is not read any further.
                _stream_failed(result)
                raise
            except BaseException:
                _abandon(result)
                raise
            else:
                try:
                    reply = await result
                    break
                except ConnectionLost as e:  # after the last byte: the agent may hold it all
                    lost = e
            if not resumable or attempt == MAX_RESUMES:
                raise lost
            try:
                await Deferred.fromCoroutine(client.wait_ready()).addTimeout(RESUME_WAIT, client.reactor)
            except DeferredTimeoutError:
                raise ConnectionLost(
                    f"{lost}; the agent was not back within {RESUME_WAIT:g} s to resume the push to "
                    f"{destination}, which was not written: push again") from None
            checksums, done = await _verified_part(client, args["transfer_id"], f, begin)
            if not done:
                raise ConnectionLost(
                    f"{lost}; the agent holds no part of the push to {destination} that matches the host "
                    "file to resume from (it restarted, the file changed, or all of it had arrived): the "
                    "outcome in the guest is unknown; push again (a push replaces the destination whole)")
    finally:
        if f is not source:
            f.close()
    name, theirs = _checksum_of(reply)
    if theirs != digests[name] or reply.get("size") != sent:
        raise IntegrityError(
            f"sent {sent} bytes with {name} {digests[name]} to {destination} but the agent stored "
            f"{reply.get('size')} bytes with {name} {theirs}: push again", {"path": destination})
    return TransferResult(destination, sent, digests["sha256"], int(reply["mode"]),
                          client.reactor.seconds() - started)


async def _verified_part(client: GuestClient, transfer_id: str, source: IO[bytes],
                         begin: int) -> tuple[_Checksums, int]:
    """
    After a dropped channel: how much of the file the agent holds, checked against the
    host file's own bytes.  Returns the checksums and the offset to send from, with
    ``source`` there; offset 0 when the agent holds nothing, or something else.
    """
    try:
        held = await client.call("push_offset", {"transfer_id": transfer_id})
    except UnknownOperation:  # an agent from before resumable pushes
        held = {}
    offset = held.get("offset") if isinstance(held, dict) else None
    checksums = _Checksums()
    source.seek(begin)
    if isinstance(offset, int) and offset > 0:
        remaining = offset
        while remaining and (chunk := source.read(min(CHUNK_SIZE, remaining))):
            checksums.update(chunk)
            remaining -= len(chunk)
        name, theirs = _checksum_of(held)
        if remaining == 0 and theirs == checksums.hexdigests()[name]:
            return checksums, offset
        checksums = _Checksums()
        source.seek(begin)
    return checksums, 0


async def _receive_file(client: GuestClient, source: str, sink: IO[bytes], max_size: int,
                        progress: Progress | None) -> TransferResult:
    started = client.reactor.seconds()
    io, result = await client.open_request("pull", {"path": source, "checksum": CHECKSUM})
    checksums = _Checksums()
    received = 0
    try:
        while (chunk := await io.receive(Channel.INPUT)) is not None:
            if received + len(chunk) > max_size:
                # A local error: the agent must be told to stop, as for a cancel.
                _abandon(result)
                raise LimitExceeded(
                    f"the guest file {source} is larger than the pull's limit of {max_size} bytes; "
                    "the pull was stopped: pass a larger max_size")
            sink.write(chunk)
            checksums.update(chunk)
            received += len(chunk)
            if progress is not None:
                progress(received, None)
    except VMControllerError:
        _stream_failed(result)
        raise
    except BaseException:
        _abandon(result)
        raise
    digests = checksums.hexdigests()
    trailer = io.trailer(Channel.INPUT) or {}
    reply = await result
    error: IncompleteTransfer | IntegrityError | None = None
    wrong = [(name, theirs) for name, theirs in map(_checksum_of, (trailer, reply))
             if theirs != digests[name]]
    if trailer.get("size") != received or reply.get("size") != received:
        error = IncompleteTransfer(
            f"received {received} bytes of the guest file {source} but the agent says it sent "
            f"{trailer.get('size')}: pull again", {"path": source})
    elif wrong:
        name, theirs = wrong[0]
        error = IntegrityError(
            f"the {received} bytes received of the guest file {source} have {name} {digests[name]} but the "
            f"agent sent {theirs}: the data was corrupted in transit; pull again", {"path": source})
    if error is not None:
        # The channel is reliable: an agent whose account differs from its bytes lies.
        client._drop(error)
        raise error
    return TransferResult(source, received, digests["sha256"], int(reply["mode"]),
                          client.reactor.seconds() - started)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for all threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _host_mode(mode: int | None) -> int:
    if mode is None:
        return 0o666 & ~_umask()  # what open() would give a new file
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise BadRequest(f"mode must be permission bits (0 to 0o7777), got {mode!r}")
    return mode


async def pull(client: GuestClient, source: str, destination: str | os.PathLike[str] | IO[bytes], *,
               mode: int | None = None, max_size: int | None = None,
               progress: Progress | None) -> TransferResult:
    """
    Copy the guest file ``source`` to ``destination``.  A host path appears whole or not
    at all (a temp file in its directory is renamed into place once the size and checksum
    check out); a file object is written to as the data arrives, so it holds what was
    received even when the pull fails.

    :param mode: the host file's permission bits, set-id and sticky bits only when given
        here; None: ``0o666`` less the umask, as for any new file.  The guest's mode is
        never used: the guest is not trusted.
    :param max_size: the most bytes accepted; None: the client's ``max_pull``.
    :raises PathNotFound: the guest file, or the host destination's directory, is missing.
    :raises IntegrityError: the received bytes do not match the agent's checksum.
    :raises LimitExceeded: the file is larger than ``max_size``; the guest stopped sending.
    """
    limit = client.client_limits.max_pull if max_size is None else max_size
    if not isinstance(destination, str | os.PathLike):
        return await _receive_file(client, source, destination, limit, progress)
    host_mode = _host_mode(mode)
    path = os.path.abspath(os.fspath(destination))
    directory = os.path.dirname(path)
    if not os.path.exists(directory):
        raise PathNotFound(f"the host directory {directory} does not exist: create it before pulling into it",
                           {"path": directory})
    if not os.path.isdir(directory):
        raise NotADirectory(f"the host path {directory} is not a directory", {"path": directory})
    if os.path.isdir(path):
        raise IsADirectory(f"the host path {path} is a directory: give the file's path", {"path": path})
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)[:200]}.", suffix=".vmc-part",
                                    dir=directory)
    except PermissionError:
        raise PermissionDenied(f"this host user may not create files in the host directory {directory}",
                               {"path": directory}) from None
    try:
        with os.fdopen(fd, "wb") as sink:
            transfer = await _receive_file(client, source, sink, limit, progress)
            sink.flush()
            os.fchmod(sink.fileno(), host_mode)
            await _fsync(client, sink.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return transfer


__all__ = ["Progress", "TransferResult", "pull", "push"]
