"""
File and system operations, host and agent joined in memory (a Clock, no reactor); the
files themselves live in pytest's tmp_path.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import stat
import zlib
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from zope.interface import implementer

from guest_agent import __version__
from guest_agent.ops import files, system
from guest_agent.protocol.connection import SUPPORTED_VERSIONS, Limits
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
    PathNotFound,
    PermissionDenied,
)
from guest_agent.protocol.frames import Channel
from guest_agent.session import Operation, OperationContext
from vmcontroller.testing import InMemoryLink

_T = TypeVar("_T")


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
OPERATIONS: dict[str, Operation] = {**files.OPERATIONS, **system.OPERATIONS}


def start(link: InMemoryLink, work: Deferred[_T] | Coroutine[Any, Any, _T]) -> Deferred[_T]:
    """Start a client call and move bytes until both ends are idle."""
    d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
    link.flush()
    return d


def result_of(d: Deferred[_T]) -> _T:
    """The Deferred's result, raising its failure; it must have fired."""
    outcomes: list[Any] = []
    d.addBoth(outcomes.append)
    assert outcomes, "the operation is still running"
    if isinstance(outcomes[0], Failure):
        outcomes[0].raiseException()
    return outcomes[0]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crc(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


#: Each checksum by its wire name: what the host asks for now, and what older ends use.
CHECKSUM_OF = {"crc32": crc, "sha256": sha}


class Tracked:
    """Wraps an agent operation and records how it ended."""

    def __init__(self, operation: Operation) -> None:
        self.operation = operation
        self.outcomes: list[Any] = []

    async def __call__(self, ctx: OperationContext) -> Any:
        try:
            result = await self.operation(ctx)
        except Exception as e:
            self.outcomes.append(e)
            raise
        self.outcomes.append(result)
        return result


class CountingReader(io.BytesIO):
    """A source that counts how much the host read of it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.taken = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.taken += len(chunk)
        return chunk


@pytest.fixture
def link() -> InMemoryLink:
    # A small window makes the transfers below wait for credit many times.
    window = Limits(window=64 * 1024)
    return InMemoryLink(OPERATIONS, agent_limits=window, client_limits=window)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- push and pull -----------------------------------------------------------------------


def test_push_pull_round_trip(link: InMemoryLink, tmp_path: Path) -> None:
    data = os.urandom(1024 * 1024 + 17)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    source.chmod(0o640)
    guest = tmp_path / "guest"
    guest.mkdir()
    seen: list[tuple[int, int | None]] = []

    pushed = result_of(start(link, link.client.push(str(source), str(guest / "copy.bin"),
                                                    progress=lambda done, total: seen.append((done, total)))))

    assert (guest / "copy.bin").read_bytes() == data
    assert stat.S_IMODE((guest / "copy.bin").stat().st_mode) == 0o640
    assert (pushed.path, pushed.size, pushed.sha256, pushed.mode) == (
        str(guest / "copy.bin"), len(data), sha(data), 0o640)
    assert seen[-1] == (len(data), len(data)) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert os.listdir(guest) == ["copy.bin"]

    seen.clear()
    back = tmp_path / "back.bin"
    pulled = result_of(start(link, link.client.pull(str(guest / "copy.bin"), str(back),
                                                    progress=lambda done, total: seen.append((done, total)))))
    assert back.read_bytes() == data
    # The host decides the mode: a new file's default, not the guest's 0o640.
    assert stat.S_IMODE(back.stat().st_mode) == 0o666 & ~current_umask()
    assert (pulled.size, pulled.sha256, pulled.mode) == (len(data), sha(data), 0o640)
    assert seen[-1] == (len(data), None)
    assert sorted(os.listdir(tmp_path)) == ["back.bin", "guest", "source.bin"]


def test_push_replaces_and_file_objects(link: InMemoryLink, tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old contents")
    result = result_of(start(link, link.client.push(io.BytesIO(b"new"), str(target))))
    assert target.read_bytes() == b"new"
    # A BytesIO has no mode: the guest's default for new files applies.
    assert result.mode == stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()
    result_of(start(link, link.client.push(io.BytesIO(b""), str(tmp_path / "empty"), mode=0o600)))
    assert (tmp_path / "empty").read_bytes() == b""
    assert stat.S_IMODE((tmp_path / "empty").stat().st_mode) == 0o600

    sink = io.BytesIO()
    pulled = result_of(start(link, link.client.pull(str(target), sink)))
    assert sink.getvalue() == b"new" and pulled.sha256 == sha(b"new")


def test_push_into_missing_directory_stops_the_host(link: InMemoryLink, tmp_path: Path) -> None:
    source = CountingReader(os.urandom(4 * 1024 * 1024))
    d = start(link, link.client.push(source, str(tmp_path / "missing" / "f")))
    with pytest.raises(PathNotFound, match=r"missing: the directory does not exist in the guest"):
        result_of(d)
    assert source.taken < 1024 * 1024  # about one window, not the whole file
    assert os.listdir(tmp_path) == []


def test_push_onto_a_directory(link: InMemoryLink, tmp_path: Path) -> None:
    with pytest.raises(IsADirectory):
        result_of(start(link, link.client.push(io.BytesIO(b"x"), str(tmp_path))))
    with pytest.raises(BadRequest, match="absolute"):
        result_of(start(link, link.client.push(io.BytesIO(b"x"), "relative/path")))


async def _raw_push(link: InMemoryLink, path: str, data: bytes, trailer: dict[str, Any] | None,
                    size: int | None = None) -> Any:
    """Drive the wire directly, to send what the real host never would."""
    stream, result = await link.client.open_request("push", {"path": path, "mode": None, "size": size})
    await stream.send(Channel.INPUT, data)
    stream.send_eof(Channel.INPUT, trailer)
    return await result


@pytest.mark.parametrize("fallback", [False, True], ids=["O_TMPFILE", "named-temp"])
def test_push_with_wrong_checksum_writes_nothing(link: InMemoryLink, tmp_path: Path, fallback: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if fallback:
        _without_o_tmpfile(monkeypatch)
    (tmp_path / "f").write_bytes(b"keep me")
    data = os.urandom(200_000)
    d = start(link, _raw_push(link, str(tmp_path / "f"), data, {"sha256": sha(b"other"), "size": len(data)}))
    with pytest.raises(IntegrityError, match="corrupted in transit"):
        result_of(d)
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_bytes() == b"keep me"


@pytest.mark.parametrize("trailer, size", [
    (None, None),
    ({"sha256": sha(b"abc"), "size": 4}, None),
    ({"sha256": sha(b"abc"), "size": 3}, 10),
])
def test_push_incomplete(link: InMemoryLink, tmp_path: Path, trailer: dict[str, Any] | None,
                         size: int | None) -> None:
    d = start(link, _raw_push(link, str(tmp_path / "f"), b"abc", trailer, size))
    with pytest.raises(IncompleteTransfer):
        result_of(d)
    assert os.listdir(tmp_path) == []


def _without_o_tmpfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make O_TMPFILE fail as on a filesystem without it."""
    real_open = os.open

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", fake_open)


def test_push_without_o_tmpfile(link: InMemoryLink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _without_o_tmpfile(monkeypatch)
    result_of(start(link, link.client.push(io.BytesIO(b"data"), str(tmp_path / "f"), mode=0o604)))
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_bytes() == b"data"
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o604


def test_host_cancel_mid_push_writes_nothing(tmp_path: Path) -> None:
    tracked = Tracked(files.push)
    link = InMemoryLink({**OPERATIONS, "push": tracked}, agent_limits=Limits(window=64 * 1024))
    source = io.BytesIO(os.urandom(1024 * 1024))
    d = link.client.push(source, str(tmp_path / "f"))
    for _ in range(1000):  # step by step until the host waits for credit mid-file
        if source.tell() >= 300_000:
            break
        link.pump.pump()
    assert 300_000 <= source.tell() < 1024 * 1024
    d.cancel()
    link.flush()
    with pytest.raises(CancelledError):
        result_of(d)
    assert len(tracked.outcomes) == 1 and isinstance(tracked.outcomes[0], OperationCancelled)
    assert os.listdir(tmp_path) == []


def test_host_disconnect_mid_push_writes_nothing(tmp_path: Path) -> None:
    tracked = Tracked(files.push)
    link = InMemoryLink({**OPERATIONS, "push": tracked}, agent_limits=Limits(window=64 * 1024))

    class Disconnecting(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() >= 300_000:
                link.client.close()
            return super().read(size)

    d = start(link, link.client.push(Disconnecting(os.urandom(1024 * 1024)), str(tmp_path / "f")))
    with pytest.raises(ConnectionLost):
        result_of(d)
    assert len(tracked.outcomes) == 1 and isinstance(tracked.outcomes[0], OperationCancelled)
    assert os.listdir(tmp_path) == []


def test_pull_errors_create_nothing_on_the_host(link: InMemoryLink, tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    with pytest.raises(PathNotFound, match="no such file"):
        result_of(start(link, link.client.pull(str(tmp_path / "nope"), str(host / "f"))))
    with pytest.raises(IsADirectory, match="directory in the guest"):
        result_of(start(link, link.client.pull(str(tmp_path), str(host / "f"))))
    with pytest.raises(PathNotFound, match="host directory"):
        result_of(start(link, link.client.pull(str(tmp_path / "nope"), str(tmp_path / "nowhere" / "f"))))
    assert os.listdir(host) == []


def test_pull_refuses_special_files(link: InMemoryLink, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BadRequest, match="not a regular file"):
        result_of(start(link, link.client.pull(str(tmp_path / "fifo"), io.BytesIO())))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_pull_unreadable(link: InMemoryLink, tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"x")
    (tmp_path / "secret").chmod(0)
    with pytest.raises(PermissionDenied):
        result_of(start(link, link.client.pull(str(tmp_path / "secret"), io.BytesIO())))


def test_pull_with_bad_trailer_leaves_no_host_file(tmp_path: Path) -> None:
    async def lying_pull(ctx: OperationContext) -> dict[str, Any]:
        await ctx.io.send(Channel.INPUT, b"hello")
        ctx.io.send_eof(Channel.INPUT, {"sha256": sha(b"other"), "size": 5})
        return {"path": ctx.args["path"], "size": 5, "sha256": sha(b"other"), "mode": 0o644}

    link = InMemoryLink({"pull": lying_pull})
    with pytest.raises(IntegrityError, match="corrupted in transit"):
        result_of(start(link, link.client.pull("/guest/f", str(tmp_path / "f"))))
    assert os.listdir(tmp_path) == []


def test_pull_failing_mid_stream_leaves_no_host_file(tmp_path: Path) -> None:
    async def failing_pull(ctx: OperationContext) -> None:
        await ctx.io.send(Channel.INPUT, b"partial")
        raise files.os_error(OSError(errno.EIO, "Input/output error"), "cannot read", ctx.args["path"])

    link = InMemoryLink({"pull": failing_pull})
    with pytest.raises(AgentOSError, match="EIO"):
        result_of(start(link, link.client.pull("/guest/f", str(tmp_path / "f"))))
    assert os.listdir(tmp_path) == []


# ---- metadata ----------------------------------------------------------------------------


def test_mkdir(link: InMemoryLink, tmp_path: Path) -> None:
    result_of(start(link, link.client.mkdir(str(tmp_path / "a"), mode=0o700)))
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    with pytest.raises(AlreadyExists):
        result_of(start(link, link.client.mkdir(str(tmp_path / "a"))))
    with pytest.raises(PathNotFound, match="parents=True"):
        result_of(start(link, link.client.mkdir(str(tmp_path / "b" / "c"))))
    result_of(start(link, link.client.mkdir(str(tmp_path / "b" / "c"), parents=True, mode=0o750)))
    assert stat.S_IMODE((tmp_path / "b" / "c").stat().st_mode) == 0o750
    result_of(start(link, link.client.mkdir(str(tmp_path / "b" / "c"), parents=True)))  # exists: fine
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(AlreadyExists):
        result_of(start(link, link.client.mkdir(str(tmp_path / "file"), parents=True)))
    with pytest.raises(NotADirectory):
        result_of(start(link, link.client.mkdir(str(tmp_path / "file" / "sub"))))


def test_list_and_stat(link: InMemoryLink, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"12345")
    (tmp_path / "f").chmod(0o600)
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to("f")
    os.mkfifo(tmp_path / "p")
    entries = result_of(start(link, link.client.list(str(tmp_path))))
    assert [(e["name"], e["type"]) for e in entries] == [("d", "dir"), ("f", "file"), ("l", "symlink"),
                                                          ("p", "other")]
    f = entries[1]
    assert (f["size"], f["mode"]) == (5, 0o600) and f["mtime"] == (tmp_path / "f").stat().st_mtime

    info = result_of(start(link, link.client.stat(str(tmp_path / "l"))))
    assert info["type"] == "symlink" and info["target"] == "f"
    info = result_of(start(link, link.client.stat(str(tmp_path / "f"))))
    assert {k: info[k] for k in ("type", "size", "mode", "uid", "gid", "target")} == {
        "type": "file", "size": 5, "mode": 0o600, "uid": os.getuid(), "gid": os.getgid(), "target": None}

    with pytest.raises(PathNotFound):
        result_of(start(link, link.client.stat(str(tmp_path / "nope"))))
    with pytest.raises(NotADirectory):
        result_of(start(link, link.client.list(str(tmp_path / "f"))))


def test_remove(link: InMemoryLink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests run as root: should the agent's refusal of "/" break (a mutant does exactly
    # that), the removal below must fail the test, not empty the host's file system.
    real_rmtree = shutil.rmtree

    def rmtree_below_tmp(path: str, *args: object, **kwargs: object) -> None:
        if not Path(path).resolve().is_relative_to(tmp_path):
            raise AssertionError(f"the agent tried to remove {path} recursively")
        real_rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "rmtree", rmtree_below_tmp)
    (tmp_path / "f").write_bytes(b"")
    (tmp_path / "l").symlink_to("f")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full" / "deep").mkdir(parents=True)
    (tmp_path / "full" / "deep" / "x").write_bytes(b"")

    result_of(start(link, link.client.remove(str(tmp_path / "l"))))
    assert (tmp_path / "f").exists()  # a symlink goes, not its target
    result_of(start(link, link.client.remove(str(tmp_path / "f"))))
    result_of(start(link, link.client.remove(str(tmp_path / "empty"))))
    with pytest.raises(DirectoryNotEmpty, match="recursive=True"):
        result_of(start(link, link.client.remove(str(tmp_path / "full"))))
    assert (tmp_path / "full" / "deep" / "x").exists()
    result_of(start(link, link.client.remove(str(tmp_path / "full"), recursive=True)))
    assert os.listdir(tmp_path) == []
    with pytest.raises(PathNotFound):
        result_of(start(link, link.client.remove(str(tmp_path / "f"))))
    with pytest.raises(BadRequest, match="root"):
        result_of(start(link, link.client.remove("/", recursive=True)))


@pytest.mark.parametrize("code, cls", [
    (errno.ENOENT, PathNotFound), (errno.ENOTDIR, NotADirectory), (errno.EISDIR, IsADirectory),
    (errno.EEXIST, AlreadyExists), (errno.EACCES, PermissionDenied), (errno.EPERM, PermissionDenied),
    (errno.ENOTEMPTY, DirectoryNotEmpty), (errno.ENOSPC, AgentOSError),
])
def test_os_error_mapping(code: int, cls: type[Exception]) -> None:
    error = files.os_error(OSError(code, os.strerror(code), "/x/y"), "cannot frob", "/x")
    assert type(error) is cls
    assert error.message.startswith("cannot frob /x: /x/y: ")
    assert error.details == {"path": "/x/y", "errno": errno.errorcode[code]}
    if cls is AgentOSError:
        assert "ENOSPC" in error.message


# ---- system ------------------------------------------------------------------------------


@implementer(IReactorProcess)
class ProcessClock(Clock):
    """A Clock that records the processes it is asked to start."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, bytes | str, list[bytes | str]]] = []

    def spawnProcess(self, processProtocol: Any, executable: bytes | str, args: Sequence[bytes | str],
                     env: Any = None, path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = False,
                     childFDs: Any = None) -> Any:
        self.spawned.append((processProtocol, executable, list(args)))
        return None


def test_ping_and_info() -> None:
    link = InMemoryLink(OPERATIONS)
    link.flush()  # the handshake, before the agent's handshake timeout
    link.clock.advance(123.5)
    assert result_of(start(link, link.client.ping())) == {"time": 123.5, "version": __version__}
    info = result_of(start(link, link.client.info()))
    assert info["hostname"] == os.uname().nodename
    assert info["kernel"].startswith(f"{os.uname().sysname} {os.uname().release} ")
    assert info["agent_version"] == __version__ == "0.1.0"
    assert info["protocol_versions"] == list(SUPPORTED_VERSIONS)
    assert info["memory"]["total"] >= info["memory"]["available"] > 0
    assert info["disk"]["total"] >= info["disk"]["free"] >= 0
    assert info["uptime"] > 0 and len(info["load"]) == 3
    assert isinstance(info["os_release"], dict)


def test_info_survives_missing_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system, "OS_RELEASE_PATHS", ("/nonexistent/os-release",))
    link = InMemoryLink(OPERATIONS)
    with capturedLogs() as events:
        info = result_of(start(link, link.client.info()))
    assert info["os_release"] is None and info["hostname"]
    assert any("os-release" in str(e.get("fact")) for e in events)


@pytest.mark.parametrize("method, verb", [("shutdown", "poweroff"), ("reboot", "reboot")])
def test_power_replies_then_runs_systemctl(method: str, verb: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system.shutil, "which", lambda name: f"/usr/bin/{name}")
    reactor = ProcessClock()
    link = InMemoryLink(OPERATIONS, agent_reactor=reactor)
    assert result_of(start(link, getattr(link.client, method)())) is None
    assert reactor.spawned == []  # the reply went first
    reactor.advance(system.POWER_DELAY)
    [(protocol, executable, args)] = reactor.spawned
    assert (executable, args) == ("/usr/bin/systemctl", ["/usr/bin/systemctl", verb])

    with capturedLogs() as events:
        protocol.errReceived(b"Access denied\n")
        protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
    [event] = events
    assert event["log_level"].name == "error" and event["output"] == "Access denied"
