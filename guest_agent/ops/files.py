"""
File operations: push and pull stream a file's bytes on :attr:`Channel.INPUT`; mkdir,
list, stat and remove answer in one response.

A pushed file is written into an unnamed ``O_TMPFILE`` file in the destination's
directory, so an agent that crashes or is killed mid-transfer leaves nothing behind, and
it becomes visible only once its size and checksum have been checked and it is on disk.
Every ``OSError`` becomes one of our error classes in :func:`os_error`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.internet.threads import deferToThreadPool

from guest_agent.ops._checks import mode_arg, os_string
from guest_agent.protocol.checksums import CHECKSUMS, DEFAULT_CHECKSUM, Checksum, new_checksum
from guest_agent.protocol.errors import (
    AgentOSError,
    AlreadyExists,
    BadRequest,
    ConnectionLost,
    DirectoryNotEmpty,
    IncompleteTransfer,
    IntegrityError,
    IsADirectory,
    NotADirectory,
    OperationCancelled,
    OperationError,
    PathNotFound,
    PermissionDenied,
)
from guest_agent.protocol.frames import Channel
from guest_agent.session import Operation, OperationContext

#: Bytes read from disk per chunk; ``RequestIO.send`` cuts them to the peer's frame limit.
CHUNK_SIZE = 256 * 1024
#: Suffix of the short-lived names a pushed file has before it is renamed into place.
TEMP_SUFFIX = ".vmc-tmp"

_T = TypeVar("_T")

# Descriptors from os.open are close-on-exec already (PEP 446: CPython adds O_CLOEXEC), so a
# process the agent spawns inherits none of the files and directories opened here.

_ERRNO_CLASSES: dict[int, tuple[type[OperationError], str]] = {
    errno.ENOENT: (PathNotFound, "no such file or directory in the guest"),
    errno.ENOTDIR: (NotADirectory, "it, or a directory on its path, is not a directory"),
    errno.EISDIR: (IsADirectory, "it is a directory"),
    errno.EEXIST: (AlreadyExists, "it exists already"),
    errno.EACCES: (PermissionDenied, "permission denied to the agent's user; check the guest's permissions"),
    errno.EPERM: (PermissionDenied, "operation not permitted to the agent's user"),
    errno.ENOTEMPTY: (DirectoryNotEmpty, "the directory is not empty; pass recursive=True to remove it too"),
}


def os_error(error: OSError, action: str, path: str, hint: str = "") -> OperationError:
    """
    The error class and message for an ``OSError`` met while doing ``action`` on ``path``
    (e.g. ``"cannot list"``); ``hint`` says what to do, when the caller knows better
    than the generic text.
    """
    code = error.errno or 0
    name = errno.errorcode.get(code, str(code))
    cls, why = _ERRNO_CLASSES.get(code, (AgentOSError, f"{name}: {error.strerror}"))
    # rmtree and friends report the entry that failed, which may lie below ``path``.
    where = os.fsdecode(error.filename) if error.filename is not None else path
    message = f"{action} {path}: {where + ': ' if where != path else ''}{hint or why}"
    return cls(message, {"path": where, "errno": name})


async def _blocking(ctx: OperationContext, work: Callable[[], _T]) -> _T:
    """
    Run blocking work (fsync, recursive removal) in the reactor's thread pool, so that
    other requests keep moving.  A test's ``Clock`` has no threads: there it runs inline.
    Cancelling does not stop work already in a thread; callers check for cancellation
    when it returns.
    """
    if IReactorThreads.providedBy(ctx.reactor):
        reactor = cast(IReactorThreads, ctx.reactor)
        return await deferToThreadPool(cast(IReactorFromThreads, reactor), reactor.getThreadPool(), work)
    return work()


# ---- arguments ----------------------------------------------------------------------


def path_arg(args: dict[str, Any]) -> str:
    """The ``path`` argument, absolute and normalised."""
    path = os_string(args.get("path"), "'path'")
    if not os.path.isabs(path):
        raise BadRequest(f"'path' must be an absolute guest path, got {path[:200]!r}")
    return os.path.normpath(path)


def _int_arg(args: dict[str, Any], name: str) -> int | None:
    value = args.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise BadRequest(f"{name!r} must be a non-negative integer or null, got {value!r}")
    return value


def _checksum_arg(args: dict[str, Any]) -> str:
    name = args.get("checksum", DEFAULT_CHECKSUM)
    if not (isinstance(name, str) and name in CHECKSUMS):
        raise BadRequest(f"'checksum' must be one of {sorted(CHECKSUMS)}, got {name!r}")
    return name


def _bool_arg(args: dict[str, Any], name: str) -> bool:
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{name!r} must be true or false, got {value!r}")
    return value


def _cancelled(ctx: OperationContext) -> OperationCancelled:
    reason = (ctx.cancel_reason or {}).get("reason", "cancelled by the host")
    return OperationCancelled(f"{ctx.op} of {ctx.args.get('path')} stopped: {reason}; nothing was written")


def _stop_on_cancel(ctx: OperationContext) -> None:
    """A cancel (or the host leaving) wakes the stream waits of the operation with an error."""
    ctx.on_cancel(lambda reason: ctx.io.fail(_cancelled(ctx)))


# ---- push ---------------------------------------------------------------------------


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _temp_name(destination: str) -> str:
    directory, name = os.path.split(destination)
    # Shortened so that the temp name stays under NAME_MAX whatever the destination's.
    return os.path.join(directory, f".{name[:200]}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


class _IncomingFile:
    """
    A pushed file while it is received: unnamed (``O_TMPFILE``) until :meth:`publish`,
    or, where the filesystem lacks ``O_TMPFILE``, a named temp file that any failure
    removes (only a crash of the agent can leave that one behind).
    """

    def __init__(self, fd: int, named: str | None) -> None:
        self.fd = fd
        self._named = named

    @classmethod
    def create(cls, destination: str) -> _IncomingFile:
        directory = os.path.dirname(destination)
        action = f"cannot write {destination}:"
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o666)
            return cls(fd, None)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
                # EISDIR means a kernel without O_TMPFILE; other errors are about the directory.
                hint = ("the directory does not exist in the guest; create it first (mkdir with parents=True)"
                        if e.errno == errno.ENOENT else "")
                raise os_error(e, action, directory, hint) from None
        named = _temp_name(destination)
        try:
            fd = os.open(named, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except OSError as e:
            raise os_error(e, action, directory) from None
        return cls(fd, named)

    def publish(self, destination: str) -> None:
        """Give the complete file its name, replacing whatever had it."""
        if self._named is None:
            # The link gives the unnamed file a temp name, the rename moves it into place.
            # Should the agent die between the two (microseconds), the temp name is left:
            # a dot-file ending in TEMP_SUFFIX.  linkat cannot replace, so there is no
            # single atomic step from O_TMPFILE to an existing name.
            temp = _temp_name(destination)
            proc_fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
            try:
                # os.link("/proc/self/fd/N", ...) fails with EXDEV: CPython < 3.13 calls
                # link(2), which links the magic symlink itself; a dir fd makes it call
                # linkat(2) with AT_SYMLINK_FOLLOW, which links the file it points to.
                os.link(str(self.fd), temp, src_dir_fd=proc_fds, follow_symlinks=True)
            finally:
                os.close(proc_fds)
        else:
            temp = self._named
        try:
            os.rename(temp, destination)
        except OSError as e:
            os.unlink(temp)
            # rename names its source in the error: the short-lived name means nothing to the host.
            raise OSError(e.errno, e.strerror, destination) from None
        self._named = None
        os.close(self.fd)
        self.fd = -1

    def discard(self) -> None:
        """Drop the file: closing an unnamed file frees it; a named one is unlinked."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._named is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._named)
            self._named = None


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_trailer(trailer: dict[str, Any] | None, received: int, announced: int | None,
                   checksum: Checksum, destination: str) -> None:
    sent = (trailer or {}).get(checksum.name)
    size = (trailer or {}).get("size")
    if not isinstance(sent, str) or not isinstance(size, int):
        raise IncompleteTransfer(
            f"the stream for {destination} ended after {received} bytes without a {checksum.name} and size "
            "trailer; nothing was written: push again")
    if size != received or (announced is not None and announced != received):
        raise IncompleteTransfer(
            f"received {received} bytes for {destination} but the host announced {announced} and its trailer "
            f"says {size}; nothing was written: did the host file change during the push? push again")
    digest = checksum.hexdigest()
    if sent.lower() != digest:
        raise IntegrityError(
            f"the {received} bytes received for {destination} have {checksum.name} {digest} but the host "
            f"sent {sent}: the data was corrupted in transit; nothing was written: push again")


@dataclass
class _PartialUpload:
    """A push received so far: its file, the checksum of what came and how much came."""

    destination: str
    incoming: _IncomingFile
    checksum: Checksum
    received: int


class PartialUploads:
    """
    Pushes with a ``transfer_id`` whose session ended before their EOF, shared by every
    session, so that a host whose channel dropped resumes the push (``push_offset``, then
    ``push`` with an ``offset``) instead of starting over.  At most ``limit`` are kept
    (each an unnamed file, freed by closing it); beyond, the oldest is dropped.
    """

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._parked: dict[str, _PartialUpload] = {}

    def operations(self) -> dict[str, Operation]:
        return {"push": self.push, "push_offset": self.offset}

    def park(self, transfer_id: str, upload: _PartialUpload) -> None:
        self.drop(transfer_id)
        self._parked[transfer_id] = upload
        while len(self._parked) > self.limit:
            self.drop(next(iter(self._parked)))

    def take(self, transfer_id: str) -> _PartialUpload | None:
        return self._parked.pop(transfer_id, None)

    def drop(self, transfer_id: str) -> None:
        upload = self._parked.pop(transfer_id, None)
        if upload is not None:
            upload.incoming.discard()

    def offset(self, ctx: OperationContext) -> dict[str, Any]:
        """``push_offset``: how much of a dropped push the agent holds (0 for none)."""
        transfer_id = _transfer_id(ctx.args)
        upload = None if transfer_id is None else self._parked.get(transfer_id)
        if upload is None:
            return {"offset": 0}
        return {"offset": upload.received, upload.checksum.name: upload.checksum.hexdigest(),
                "path": upload.destination}

    async def push(self, ctx: OperationContext) -> dict[str, Any]:
        return await push(ctx, self)


def _transfer_id(args: dict[str, Any]) -> str | None:
    transfer_id = args.get("transfer_id")
    if transfer_id is not None and not (isinstance(transfer_id, str) and 0 < len(transfer_id) <= 128):
        raise BadRequest(
            f"'transfer_id' must be null or a string of 1 to 128 characters; got {transfer_id!r}")
    return transfer_id


def _upload_to_continue(uploads: PartialUploads | None, transfer_id: str | None, offset: int,
                        destination: str, checksum: str) -> _PartialUpload:
    """A new upload at offset 0, else the parked one that fits ``offset``."""
    if offset == 0:
        if uploads is not None and transfer_id is not None:
            uploads.drop(transfer_id)
        return _PartialUpload(destination, _IncomingFile.create(destination), new_checksum(checksum), 0)
    upload = uploads.take(transfer_id) if uploads is not None and transfer_id is not None else None
    if upload is None or upload.destination != destination or upload.received != offset:
        held = "nothing" if upload is None else f"{upload.received} bytes for {upload.destination}"
        if upload is not None:
            upload.incoming.discard()
        raise IncompleteTransfer(
            f"cannot resume the push to {destination} at byte {offset}: the agent holds {held} "
            "(see push_offset); nothing was written: push again from the start")
    return upload


async def push(ctx: OperationContext, uploads: PartialUploads | None = None) -> dict[str, Any]:
    """
    Receive a file on INPUT and put it at ``path`` atomically once it checks out.  With a
    ``transfer_id`` (and ``uploads``), what arrived before the session ended is kept for
    a push with the same id and an ``offset`` to continue.
    """
    destination = path_arg(ctx.args)
    mode = mode_arg(ctx.args, None)
    announced = _int_arg(ctx.args, "size")
    transfer_id = _transfer_id(ctx.args)
    offset = _int_arg(ctx.args, "offset") or 0
    checksum_name = _checksum_arg(ctx.args)
    if os.path.isdir(destination):
        raise IsADirectory(f"cannot write {destination}: it is a directory in the guest; "
                           "push to a file path inside it")
    _stop_on_cancel(ctx)
    # Errors here reach the host before its data.
    upload = _upload_to_continue(uploads, transfer_id, offset, destination, checksum_name)
    incoming = upload.incoming
    parked = False
    try:
        checksum = upload.checksum
        received = upload.received
        while True:
            try:
                chunk = await ctx.io.receive(Channel.INPUT)
            except (OperationError, ConnectionLost):
                if ctx.session_ended and uploads is not None and transfer_id is not None:
                    uploads.park(transfer_id, upload)  # checksum and count agree: both stop here
                    parked = True
                raise
            if chunk is None:
                break
            received += len(chunk)
            if announced is not None and received > announced:
                raise IncompleteTransfer(
                    f"the host announced {announced} bytes for {destination} and sent more; nothing was "
                    "written: did the host file change during the push? push again")
            try:
                _write_all(incoming.fd, chunk)
            except OSError as e:
                raise os_error(e, "cannot write", destination) from None
            checksum.update(chunk)
            upload.received = received
        _check_trailer(ctx.io.trailer(Channel.INPUT), received, announced, checksum, destination)
        try:
            if mode is not None:
                os.fchmod(incoming.fd, mode)
            final_mode = stat.S_IMODE(os.fstat(incoming.fd).st_mode)
            await _blocking(ctx, lambda: os.fsync(incoming.fd))
            if ctx.cancel_reason is not None:
                raise _cancelled(ctx)
            incoming.publish(destination)
            # The rename is durable only once the directory is on disk too.
            await _blocking(ctx, lambda: _fsync_directory(os.path.dirname(destination)))
        except OSError as e:
            raise os_error(e, "cannot write", destination) from None
    finally:
        if not parked:
            incoming.discard()
    return {"path": destination, "size": received, checksum.name: checksum.hexdigest(), "mode": final_mode}


# ---- pull ---------------------------------------------------------------------------


def _open_for_pull(path: str) -> tuple[int, os.stat_result]:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise os_error(e, "cannot read", path) from None
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        return fd, info
    os.close(fd)
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectory(f"cannot read {path}: it is a directory in the guest; pull the files in it "
                           "one by one")
    raise BadRequest(f"cannot read {path}: it is a {_file_type(info.st_mode)} file, not a regular file")


async def pull(ctx: OperationContext) -> dict[str, Any]:
    """Stream the file at ``path`` on INPUT, then EOF with its checksum and size."""
    path = path_arg(ctx.args)
    checksum = new_checksum(_checksum_arg(ctx.args))
    fd, info = _open_for_pull(path)
    _stop_on_cancel(ctx)
    size = 0
    try:
        while True:
            try:
                # A local disk read of one chunk is quick enough for the reactor thread.
                chunk = os.read(fd, CHUNK_SIZE)
            except OSError as e:
                raise os_error(e, "cannot read", path) from None
            if not chunk:
                break
            checksum.update(chunk)
            size += len(chunk)
            await ctx.io.send(Channel.INPUT, chunk)
    finally:
        os.close(fd)
    digest = checksum.hexdigest()
    ctx.io.send_eof(Channel.INPUT, {checksum.name: digest, "size": size})
    return {"path": path, "size": size, checksum.name: digest, "mode": stat.S_IMODE(info.st_mode)}


# ---- metadata -----------------------------------------------------------------------


def _file_type(st_mode: int) -> str:
    if stat.S_ISREG(st_mode):
        return "file"
    if stat.S_ISDIR(st_mode):
        return "dir"
    if stat.S_ISLNK(st_mode):
        return "symlink"
    return "other"


async def mkdir(ctx: OperationContext) -> None:
    """Create ``path`` with exactly ``mode``; with ``parents``, missing parents too and no
    error when it exists as a directory (``mkdir -p``)."""
    path = path_arg(ctx.args)
    parents = _bool_arg(ctx.args, "parents")
    mode = mode_arg(ctx.args, 0o755)
    assert mode is not None
    try:
        try:
            os.mkdir(path, mode)
        except FileNotFoundError:
            if not parents:
                raise
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.mkdir(path, mode)
        except FileExistsError:
            if parents and os.path.isdir(path):
                return
            raise
        os.chmod(path, mode)  # the umask narrowed what mkdir set
    except OSError as e:
        hint = "a parent directory does not exist; pass parents=True" if e.errno == errno.ENOENT else ""
        raise os_error(e, "cannot create directory", path, hint) from None


async def list_(ctx: OperationContext) -> list[dict[str, Any]]:
    """The entries of directory ``path``, sorted by name, symlinks not followed."""
    path = path_arg(ctx.args)
    entries: list[dict[str, Any]] = []
    try:
        with os.scandir(path) as scan:
            for entry in scan:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we listed
                entries.append({"name": entry.name, "type": _file_type(info.st_mode), "size": info.st_size,
                                "mode": stat.S_IMODE(info.st_mode), "mtime": info.st_mtime})
    except OSError as e:
        raise os_error(e, "cannot list", path) from None
    entries.sort(key=lambda entry: entry["name"])
    return entries


async def stat_(ctx: OperationContext) -> dict[str, Any]:
    """What ``lstat`` says of ``path``; ``target`` is a symlink's target, else null."""
    path = path_arg(ctx.args)
    try:
        info = os.lstat(path)
        target = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
    except OSError as e:
        raise os_error(e, "cannot stat", path) from None
    return {"path": path, "type": _file_type(info.st_mode), "size": info.st_size,
            "mode": stat.S_IMODE(info.st_mode), "mtime": info.st_mtime, "uid": info.st_uid,
            "gid": info.st_gid, "target": target}


async def remove(ctx: OperationContext) -> None:
    """Remove a file, a symlink (not its target) or an empty directory; with
    ``recursive``, a directory and everything in it."""
    path = path_arg(ctx.args)
    recursive = _bool_arg(ctx.args, "recursive")
    if path == "/":
        raise BadRequest("refusing to remove the guest's root directory")
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
        elif recursive:
            await _blocking(ctx, lambda: shutil.rmtree(path))  # a large tree takes a while
        else:
            os.rmdir(path)
    except OSError as e:
        raise os_error(e, "cannot remove", path) from None


OPERATIONS: dict[str, Operation] = {
    "push": push,
    "pull": pull,
    "mkdir": mkdir,
    "list": list_,
    "stat": stat_,
    "remove": remove,
}
