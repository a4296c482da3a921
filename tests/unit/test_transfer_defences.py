"""
The host's own checks of what the agent says about a transfer, the agent's exact modes and
its answer to a cancel, and what happens to a user who is not root (CI runs as root: these
tests drop the effective user to ``nobody`` for the call, and get root back after).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from guest_agent.ops import files
from guest_agent.protocol.connection import Limits
from guest_agent.protocol.errors import (
    AgentOSError,
    BadRequest,
    ConnectionLost,
    IncompleteTransfer,
    IntegrityError,
    IsADirectory,
    NotADirectory,
    OperationCancelled,
    OperationError,
    PathNotFound,
    PermissionDenied,
    ProtocolError,
)
from guest_agent.protocol.frames import Channel
from guest_agent.session import OperationContext
from tests.unit.test_client_session import error_of
from tests.unit.test_files_ops import (
    CHECKSUM_OF,
    OPERATIONS,
    Tracked,
    crc,
    current_umask,
    result_of,
    sha,
    start,
)
from vmcontroller.testing import InMemoryLink

NOBODY = 65534


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """Run the block with the effective user and group ``nobody`` (as root); root again after."""
    if os.geteuid() != 0:
        yield  # not root already
        return
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """
    A directory ``nobody`` can reach (pytest's tmp_path is root's alone) and not write, with
    a file ``secret`` and a directory ``closed`` it may not open.  Modes, not owners, close
    them: without root the test's user owns them, and its own modes bind it too.
    """
    path = Path(tempfile.mkdtemp(prefix="vmc-test-"))
    (path / "secret").write_bytes(b"s")
    (path / "closed").mkdir()
    (path / "secret").chmod(0)
    (path / "closed").chmod(0)
    path.chmod(0o555)
    yield path
    path.chmod(0o755)
    (path / "closed").chmod(0o755)
    shutil.rmtree(path)


def lying(
    op: str,
    answer: dict[str, Any],
    data: bytes = b"",
    trailer: dict[str, Any] | None = None,
) -> InMemoryLink:
    """An agent whose ``op`` takes what is pushed (or sends ``data``) and answers ``answer``."""

    async def operation(ctx: OperationContext) -> dict[str, Any]:
        if op == "push":
            while await ctx.io.receive(Channel.INPUT) is not None:
                pass
        else:
            await ctx.io.send(Channel.INPUT, data)
            ctx.io.send_eof(Channel.INPUT, trailer)
        return {"path": ctx.args["path"], **answer}

    return InMemoryLink({op: operation})


# ---- the host checks the agent's word ----------------------------------------------------


@pytest.mark.parametrize("checksum", ["crc32", "sha256"])
@pytest.mark.parametrize(("stored", "size"), [(b"other", 5), (b"hello", 6)])
def test_push_checks_the_agents_size_and_checksum(checksum: str, stored: bytes, size: int) -> None:
    """crc32 is what the host asks for; an agent from before it answers with sha256."""
    ours, theirs = CHECKSUM_OF[checksum](b"hello"), CHECKSUM_OF[checksum](stored)
    link = lying("push", {checksum: theirs, "size": size, "mode": 0o644})
    error = error_of(start(link, link.client.push(io.BytesIO(b"hello"), "/g/f")))
    assert isinstance(error, IntegrityError) and error.details == {"path": "/g/f"}
    assert error.message == (f"sent 5 bytes with {checksum} {ours} to /g/f but the agent stored {size} bytes "
                             f"with {checksum} {theirs}: push again")


def test_push_checks_the_agents_crc32_where_it_gives_both() -> None:
    link = lying("push", {"crc32": crc(b"other"), "sha256": sha(b"hello"), "size": 5, "mode": 0o644})
    with pytest.raises(IntegrityError, match=f"with crc32 {crc(b'hello')} to /g/f"):
        result_of(start(link, link.client.push(io.BytesIO(b"hello"), "/g/f")))


@pytest.mark.parametrize(
    ("answer", "malformed"),
    [
        ({"size": 5, "mode": 0o644}, "a checksum ('crc32' or 'sha256') is missing"),
        ({"sha256": sha(b"hello").upper(), "size": 5, "mode": 0o644}, "'sha256' is missing or invalid"),
        ({"crc32": crc(b"hello").upper(), "size": 5, "mode": 0o644}, "'crc32' is missing or invalid"),
        ({"crc32": sha(b"hello"), "size": 5, "mode": 0o644}, "'crc32' is missing or invalid"),
        ({"crc32": 0x3610A686, "size": 5, "mode": 0o644}, "'crc32' is missing or invalid"),
        ({"sha256": sha(b"hello"), "size": "5", "mode": 0o644}, "'size' is missing or invalid"),
        ({"crc32": crc(b"hello"), "size": 5, "mode": 0o10000}, "'mode' is missing or invalid"),
    ],
)
def test_a_malformed_push_answer_is_a_protocol_error(answer: dict[str, Any], malformed: str) -> None:
    link = lying("push", answer)
    with pytest.raises(
        ProtocolError, match="^" + re.escape(f"the agent answered push with a malformed result: {malformed}")
    ):
        result_of(start(link, link.client.push(io.BytesIO(b"hello"), "/g/f")))


def test_push_result_and_what_the_agent_is_told(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    async def recording(ctx: OperationContext) -> dict[str, Any]:
        seen.update(ctx.args)
        data = b""
        while (chunk := await ctx.io.receive(Channel.INPUT)) is not None:
            data += chunk
        seen["trailer"] = ctx.io.trailer(Channel.INPUT)
        ctx.reactor.advance(2.5)  # type: ignore[attr-defined]
        return {"path": ctx.args["path"], "sha256": sha(data), "size": len(data), "mode": 0o604}

    link = InMemoryLink({"push": recording})
    link.clock.advance(100)
    source = tmp_path / "src"
    source.write_bytes(b"0123456789" * 70_000)
    source.chmod(0o640)
    progress: list[tuple[int, int | None]] = []
    with source.open("rb") as f:
        f.seek(100_000)
        result = result_of(start(link, link.client.push(f, "/g/f", progress=lambda *a: progress.append(a))))
    rest = 700_000 - 100_000
    sent = source.read_bytes()[100_000:]
    assert seen == {
        "path": "/g/f",
        "mode": 0o640,
        "size": rest,
        "checksum": "crc32",
        # Both: an agent from before crc32 ignores the argument and checks sha256.
        "trailer": {"crc32": crc(sent), "sha256": sha(sent), "size": rest},
    }
    assert progress == [(262_144, rest), (524_288, rest), (rest, rest)]
    assert result.path == "/g/f" and result.size == rest and result.mode == 0o604 and result.seconds == 2.5
    # A mode given wins over the host file's; a file object without a descriptor has neither.
    result_of(start(link, link.client.push(str(source), "/g/f", mode=0o600)))
    assert seen["mode"] == 0o600 and seen["size"] == 700_000
    result_of(start(link, link.client.push(io.BytesIO(b"x"), "/g/f")))
    assert seen["mode"] is None and seen["size"] is None


def test_push_refuses_host_paths_that_are_not_files(tmp_path: Path) -> None:
    link = InMemoryLink(OPERATIONS)
    with pytest.raises(PathNotFound, match=f"the host file {tmp_path}/nope does not exist"):
        result_of(start(link, link.client.push(str(tmp_path / "nope"), "/g/f")))
    with pytest.raises(IsADirectory, match="is a directory; push the files in it one by one"):
        result_of(start(link, link.client.push(str(tmp_path), "/g/f")))
    with pytest.raises(IsADirectory, match="the host path /dev/null is not a regular file"):
        result_of(start(link, link.client.push("/dev/null", "/g/f")))


@pytest.mark.parametrize(
    ("trailer", "answer", "error"),
    [
        ({"sha256": sha(b"hello"), "size": 4}, {"sha256": sha(b"hello"), "size": 5}, IncompleteTransfer),
        ({"sha256": sha(b"hello"), "size": 5}, {"sha256": sha(b"hello"), "size": 4}, IncompleteTransfer),
        (None, {"sha256": sha(b"hello"), "size": 5}, IncompleteTransfer),
        ({"sha256": sha(b"hello"), "size": 5}, {"sha256": sha(b"other"), "size": 5}, IntegrityError),
        ({"sha256": sha(b"other"), "size": 5}, {"sha256": sha(b"hello"), "size": 5}, IntegrityError),
    ],
)
def test_pull_checks_both_the_trailer_and_the_answer(
    tmp_path: Path, trailer: dict[str, Any] | None, answer: dict[str, Any], error: type[Exception]
) -> None:
    link = lying("pull", {**answer, "mode": 0o644}, b"hello", trailer)
    with pytest.raises(error, match="pull again") as raised:
        result_of(start(link, link.client.pull("/g/f", str(tmp_path / "f"))))
    assert os.listdir(tmp_path) == []
    # An agent whose account differs from its bytes lies: the client disconnects it.
    assert link.client._transport is None
    assert error_of(start(link, link.client.ping())) is raised.value
    link = lying("pull", {**answer, "mode": 0o644}, b"hello", trailer)
    sink = io.BytesIO()
    with pytest.raises(error):
        result_of(start(link, link.client.pull("/g/f", sink)))
    assert sink.getvalue() == b"hello"  # a file object holds what arrived


@pytest.mark.usefixtures("umask_027")
def test_pull_result_mode_and_progress(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    link = lying(
        "pull",
        {"sha256": sha(data), "size": len(data), "mode": 0o4777},
        data,
        {"sha256": sha(data), "size": len(data)},
    )
    progress: list[tuple[int, int | None]] = []
    result = result_of(
        start(link, link.client.pull("/g/f", str(tmp_path / "f"), progress=lambda *a: progress.append(a)))
    )
    assert (tmp_path / "f").read_bytes() == data and os.listdir(tmp_path) == ["f"]
    # The host file's mode is the host's: 0o666 less the umask, never the guest's set-uid 0o4777.
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    assert (result.path, result.size, result.sha256, result.mode) == ("/g/f", len(data), sha(data), 0o4777)
    assert progress[-1] == (len(data), None) and all(total is None for _, total in progress)
    assert [done for done, _ in progress] == sorted({done for done, _ in progress})
    # A mode given by the caller is the host file's exactly, set-id bits included, umask or not.
    result_of(start(link, link.client.pull("/g/f", str(tmp_path / "g"), mode=0o2700)))
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) == 0o2700
    with pytest.raises(BadRequest, match=r"^mode must be permission bits"):
        result_of(start(link, link.client.pull("/g/f", str(tmp_path / "h"), mode=0o10000)))
    assert sorted(os.listdir(tmp_path)) == ["f", "g"]


def test_pull_refuses_host_destinations_it_cannot_use(tmp_path: Path) -> None:
    link = lying("pull", {})
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(PathNotFound, match="create it before pulling into it"):
        result_of(start(link, link.client.pull("/g/f", str(tmp_path / "no" / "f"))))
    with pytest.raises(NotADirectory, match=f"the host path {tmp_path}/file is not a directory"):
        result_of(start(link, link.client.pull("/g/f", str(tmp_path / "file" / "f"))))
    with pytest.raises(IsADirectory, match="give the file's path"):
        result_of(start(link, link.client.pull("/g/f", str(tmp_path))))
    assert os.listdir(tmp_path) == ["file"]


# ---- the agent's modes and its answer to a cancel ----------------------------------------


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def umask_077() -> Iterator[None]:
    with umask(0o077):
        yield


@pytest.fixture
def umask_027() -> Iterator[None]:
    with umask(0o027):
        yield


@pytest.mark.usefixtures("umask_077")
def test_mkdir_sets_the_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    link = InMemoryLink(OPERATIONS)
    result_of(start(link, link.client.mkdir(str(tmp_path / "a"), mode=0o775)))
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o775
    result_of(start(link, link.client.mkdir(str(tmp_path / "b" / "c"), parents=True, mode=0o1777)))
    assert stat.S_IMODE((tmp_path / "b" / "c").stat().st_mode) == 0o1777
    result_of(start(link, link.client.call("mkdir", {"path": str(tmp_path / "d")})))  # the default
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


@pytest.mark.usefixtures("umask_077")
def test_push_sets_the_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    link = InMemoryLink(OPERATIONS)
    result = result_of(start(link, link.client.push(io.BytesIO(b"x"), str(tmp_path / "f"), mode=0o2755)))
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o2755 == result.mode


@pytest.mark.parametrize("op", ["push", "pull"])
def test_the_agents_answer_to_a_cancel(tmp_path: Path, op: str) -> None:
    tracked = Tracked(getattr(files, op))
    link = InMemoryLink(
        {**OPERATIONS, op: tracked},
        agent_limits=Limits(window=64 * 1024),
        client_limits=Limits(window=64 * 1024),
    )
    (tmp_path / "big").write_bytes(os.urandom(1024 * 1024))
    if op == "push":
        d = link.client.push(io.BytesIO(os.urandom(1024 * 1024)), str(tmp_path / "f"))
    else:
        d = link.client.pull(str(tmp_path / "big"), io.BytesIO())
    for _ in range(20):
        link.pump.pump()
    d.cancel()
    link.flush()
    with pytest.raises(CancelledError):
        result_of(d)
    (outcome,) = tracked.outcomes
    assert isinstance(outcome, OperationCancelled)
    path = tmp_path / ("f" if op == "push" else "big")
    assert outcome.message == f"{op} of {path} stopped: cancelled by the host; nothing was written"
    assert sorted(os.listdir(tmp_path)) == ["big"]


# ---- a user who is not root ----------------------------------------------------------------


def test_agent_operations_as_an_unprivileged_user(shared: Path) -> None:
    link = InMemoryLink(OPERATIONS)
    cases: list[tuple[Deferred[Any], str]] = [
        (link.client.push(io.BytesIO(b"x"), str(shared / "new")), "permission denied to the agent's user"),
        (link.client.pull(str(shared / "secret"), io.BytesIO()), "permission denied to the agent's user"),
        (link.client.list(str(shared / "closed")), "cannot list"),
        (link.client.mkdir(str(shared / "d")), "cannot create directory"),
        (link.client.remove(str(shared / "secret")), "cannot remove"),
    ]
    with as_nobody():
        for call, message in cases:
            link.flush()
            with pytest.raises(PermissionDenied, match=message):
                result_of(call)
    assert sorted(os.listdir(shared)) == ["closed", "secret"]


def test_host_files_an_unprivileged_user_may_not_touch(shared: Path) -> None:
    data = b"guest data"
    link = lying(
        "pull",
        {"sha256": sha(data), "size": len(data), "mode": 0o644},
        data,
        {"sha256": sha(data), "size": len(data)},
    )
    with as_nobody():
        push = link.client.push(str(shared / "secret"), "/g/f")
        pull = link.client.pull("/g/f", str(shared / "out"))
        link.flush()
        with pytest.raises(
            PermissionDenied, match=f"this host user may not read the host file {shared}/secret"
        ) as read:
            result_of(push)
        with pytest.raises(PermissionDenied,
                           match=f"may not create files in the host directory {shared}") as made:
            result_of(pull)
    assert read.value.details == {"path": f"{shared}/secret"} and made.value.details == {"path": str(shared)}
    assert sorted(os.listdir(shared)) == ["closed", "secret"]


# ---- blocking work goes to the reactor's thread pool ---------------------------------------


class InlinePool:
    """A thread pool that runs work at once, in the caller's thread, and records it."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def callInThreadWithCallback(self, on_result: Any, work: Any, *args: Any, **kwargs: Any) -> None:
        self.ran.append(getattr(work, "__name__", repr(work)))
        try:
            result = work(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


@implementer(IReactorThreads, IReactorFromThreads)
class ThreadedClock(Clock):
    """A Clock with a thread pool, as a real reactor has."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = InlinePool()

    def getThreadPool(self) -> Any:
        return self.pool

    def callFromThread(self, callable: Any, *args: Any, **kwargs: Any) -> None:
        callable(*args, **kwargs)

    def callInThread(self, callable: Any, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def suggestThreadPoolSize(self, size: int) -> None:
        raise NotImplementedError


def test_fsync_and_recursive_removal_run_in_the_thread_pool(tmp_path: Path) -> None:
    clock = ThreadedClock()
    link = InMemoryLink(OPERATIONS, clock=clock)
    result_of(start(link, link.client.push(io.BytesIO(b"data"), str(tmp_path / "f"))))
    assert clock.pool.ran == ["<lambda>", "<lambda>"]  # the file's fsync, then its directory's
    assert (tmp_path / "f").read_bytes() == b"data"
    clock.pool.ran.clear()
    result_of(start(link, link.client.pull(str(tmp_path / "f"), str(tmp_path / "g"))))
    assert clock.pool.ran == ["fsync"] and (tmp_path / "g").read_bytes() == b"data"
    clock.pool.ran.clear()
    (tmp_path / "d" / "e").mkdir(parents=True)
    result_of(start(link, link.client.remove(str(tmp_path / "d"), recursive=True)))
    assert clock.pool.ran == ["<lambda>"] and not (tmp_path / "d").exists()


# ---- metadata, exactly ---------------------------------------------------------------------


def test_stat_and_list_say_exactly_what_lstat_says(tmp_path: Path) -> None:
    link = InMemoryLink(OPERATIONS)
    (tmp_path / "f").write_bytes(b"12345")
    (tmp_path / "f").chmod(0o640)
    os.utime(tmp_path / "f", (1000, 2000.5))
    (tmp_path / "l").symlink_to("f")
    (tmp_path / "d").mkdir(mode=0o750)
    (tmp_path / "d").chmod(0o750)
    info = result_of(start(link, link.client.stat(str(tmp_path / "f"))))
    assert info == {
        "path": str(tmp_path / "f"),
        "type": "file",
        "size": 5,
        "mode": 0o640,
        "mtime": 2000.5,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "target": None,
    }
    link_info = result_of(start(link, link.client.stat(str(tmp_path / "l") + "/")))  # normalised
    assert link_info["path"] == str(tmp_path / "l") and link_info["type"] == "symlink"
    assert link_info["target"] == "f"
    entries = result_of(start(link, link.client.list(str(tmp_path))))
    assert [(e["name"], e["type"]) for e in entries] == [("d", "dir"), ("f", "file"), ("l", "symlink")]
    assert entries[1] == {"name": "f", "type": "file", "size": 5, "mode": 0o640, "mtime": 2000.5}
    assert entries[0]["mode"] == 0o750
    missing = str(tmp_path / "nope")
    with pytest.raises(
        PathNotFound, match=f"^cannot stat {missing}: no such file or directory in the guest$"
    ):
        result_of(start(link, link.client.stat(missing)))
    with pytest.raises(
        PathNotFound, match=f"^cannot list {missing}: no such file or directory in the guest$"
    ):
        result_of(start(link, link.client.list(missing)))


# ---- the agent's messages and defaults, exactly ---------------------------------------------


@pytest.mark.parametrize(("body", "reason"), [({}, "cancelled by the host"), ({"reason": "quota"}, "quota")])
def test_a_cancelled_push_says_why(tmp_path: Path, body: dict[str, Any], reason: str) -> None:
    link = InMemoryLink(OPERATIONS)
    target = str(tmp_path / "f")

    async def push_then_cancel() -> Any:
        stream, result = await link.client.open_request("push", {"path": target, "mode": None, "size": None})
        await stream.send(Channel.INPUT, b"partial")
        link.client._connection.send_cancel(stream.request_id, body)
        link.client._link.flush()
        return await result

    with pytest.raises(OperationCancelled) as raised:
        result_of(start(link, push_then_cancel()))
    assert raised.value.message == f"push of {target} stopped: {reason}; nothing was written"
    assert os.listdir(tmp_path) == []


def test_file_operation_errors_name_the_action_and_the_path(tmp_path: Path) -> None:
    link = InMemoryLink(OPERATIONS)
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"")
    file, deep = str(tmp_path / "file"), str(tmp_path / "a" / "b")
    cases: list[tuple[str, dict[str, Any], str]] = [
        (
            "mkdir",
            {"path": deep},
            f"cannot create directory {deep}: a parent directory does not exist; pass parents=True",
        ),
        ("mkdir", {"path": file}, f"cannot create directory {file}: it exists already"),
        ("mkdir", {"path": deep, "parents": "yes"}, "'parents' must be true or false, got 'yes'"),
        ("list", {"path": file}, f"cannot list {file}: it, or a directory on its path, is not a directory"),
        (
            "remove",
            {"path": str(tmp_path / "full")},
            f"cannot remove {tmp_path}/full: the directory is not "
            "empty; pass recursive=True to remove it too",
        ),
        ("remove", {"path": "/", "recursive": True}, "refusing to remove the guest's root directory"),
    ]
    for op, args, message in cases:
        with pytest.raises(Exception) as raised:
            result_of(start(link, link.client.call(op, args)))
        assert str(raised.value) == message
    assert sorted(os.listdir(tmp_path)) == ["file", "full"]


def test_list_skips_an_entry_removed_while_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"")
    real_scandir = os.scandir

    class Vanishing:
        def __init__(self, entry: os.DirEntry[str]) -> None:
            self.name = entry.name
            self._entry = entry

        def stat(self, follow_symlinks: bool = True) -> os.stat_result:
            if self.name == "a":
                raise FileNotFoundError(2, "gone")
            return self._entry.stat(follow_symlinks=follow_symlinks)

    @contextlib.contextmanager
    def scandir(path: str) -> Iterator[list[Vanishing]]:
        with real_scandir(path) as entries:
            yield sorted((Vanishing(entry) for entry in entries), key=lambda entry: entry.name)

    monkeypatch.setattr(files.os, "scandir", scandir)
    link = InMemoryLink(OPERATIONS)
    assert [e["name"] for e in result_of(start(link, link.client.list(str(tmp_path))))] == ["b", "c"]


def test_a_failed_rename_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(source: str, destination: str) -> None:
        raise PermissionError(13, "Permission denied", destination)

    monkeypatch.setattr(files.os, "rename", refuse)
    link = InMemoryLink(OPERATIONS)
    target = str(tmp_path / "f")
    with pytest.raises(PermissionDenied, match=f"^cannot write {target}: permission denied"):
        result_of(start(link, link.client.push(io.BytesIO(b"data"), target)))
    assert os.listdir(tmp_path) == []


# ---- disk errors on either side, and what each error carries ----------------------------------


def test_host_errors_carry_the_path(tmp_path: Path) -> None:
    link = InMemoryLink(OPERATIONS)
    (tmp_path / "file").write_bytes(b"")
    cases: list[tuple[Deferred[Any], str]] = [
        (link.client.push(str(tmp_path / "nope"), "/g/f"), str(tmp_path / "nope")),
        (link.client.push(str(tmp_path), "/g/f"), str(tmp_path)),
        (link.client.push("/dev/null", "/g/f"), "/dev/null"),
        (link.client.pull("/g/f", str(tmp_path / "no" / "f")), str(tmp_path / "no")),
        (link.client.pull("/g/f", str(tmp_path / "file" / "f")), str(tmp_path / "file")),
        (link.client.pull("/g/f", str(tmp_path)), str(tmp_path)),
    ]
    for call, path in cases:
        error = error_of(call)
        assert isinstance(error, OperationError) and error.details == {"path": path}


def test_disk_errors_in_the_guest_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link = InMemoryLink(OPERATIONS)
    (tmp_path / "src").write_bytes(b"contents")
    real_read, real_write = os.read, os.write

    def failing_read(fd: int, size: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    def failing_write(fd: int, data: Any) -> int:
        if bytes(data) == b"to disk":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(files.os, "read", failing_read)
    with pytest.raises(AgentOSError, match=f"^cannot read {tmp_path}/src: EIO: Input/output error$"):
        result_of(start(link, link.client.pull(str(tmp_path / "src"), io.BytesIO())))
    monkeypatch.setattr(files.os, "read", real_read)
    monkeypatch.setattr(files.os, "write", failing_write)
    with pytest.raises(AgentOSError, match=f"^cannot write {tmp_path}/dst: ENOSPC: No space left on device$"):
        result_of(start(link, link.client.push(io.BytesIO(b"to disk"), str(tmp_path / "dst"))))
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_failed_fsync_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    link = InMemoryLink(OPERATIONS)
    with pytest.raises(AgentOSError, match=f"^cannot write {tmp_path}/f: EIO: Input/output error$"):
        result_of(start(link, link.client.push(io.BytesIO(b"x"), str(tmp_path / "f"))))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("checksum", ["crc32", "sha256", None])
def test_the_agents_push_answer(tmp_path: Path, checksum: str | None) -> None:
    """The checksum the host names, sha256 for a host that names none (from before crc32)."""
    link = InMemoryLink(OPERATIONS)
    target = str(tmp_path / "f")
    name = checksum or "sha256"
    args = {"path": target, "mode": 0o600, "size": 2, **({"checksum": checksum} if checksum else {})}
    trailer = {name: CHECKSUM_OF[name](b"ab"), "size": 2}
    result = result_of(start(link, raw_push(link, args, b"ab", trailer)))
    assert result == {"path": target, "size": 2, name: CHECKSUM_OF[name](b"ab"), "mode": 0o600}
    assert (tmp_path / "f").read_bytes() == b"ab"


@pytest.mark.parametrize("checksum", ["crc32", "sha256"])
def test_the_agent_checks_the_checksum_the_host_named(tmp_path: Path, checksum: str) -> None:
    """Only that one: a trailer with the other (right) one and this one wrong is refused."""
    link = InMemoryLink(OPERATIONS)
    (tmp_path / "f").write_bytes(b"keep me")
    other = "sha256" if checksum == "crc32" else "crc32"
    trailer = {checksum: CHECKSUM_OF[checksum](b"abd"), other: CHECKSUM_OF[other](b"abc"), "size": 3}
    args = {"path": str(tmp_path / "f"), "checksum": checksum}
    error = error_of(start(link, raw_push(link, args, b"abc", trailer)))
    assert isinstance(error, IntegrityError)
    of = CHECKSUM_OF[checksum]
    assert error.message == (f"the 3 bytes received for {tmp_path}/f have {checksum} {of(b'abc')} but the "
                             f"host sent {of(b'abd')}: the data was corrupted in transit; nothing was "
                             "written: push again")
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_bytes() == b"keep me"


@pytest.mark.parametrize("checksum", ["crc32", "sha256"])
def test_the_agents_pull_trailer_and_answer_carry_the_checksum_named(tmp_path: Path, checksum: str) -> None:
    link = InMemoryLink(OPERATIONS)
    (tmp_path / "f").write_bytes(b"pulled")

    async def raw() -> Any:
        args = {"path": str(tmp_path / "f"), "checksum": checksum}
        stream, result = await link.client.open_request("pull", args)
        while await stream.receive(Channel.INPUT) is not None:
            pass
        return stream.trailer(Channel.INPUT), await result

    trailer, result = result_of(start(link, raw()))
    assert trailer == {checksum: CHECKSUM_OF[checksum](b"pulled"), "size": 6}
    assert result == {"path": str(tmp_path / "f"), "size": 6, checksum: CHECKSUM_OF[checksum](b"pulled"),
                      "mode": stat.S_IMODE((tmp_path / "f").stat().st_mode)}


def test_a_pull_writes_into_a_hidden_temp_file_beside_the_destination(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    async def pull(ctx: OperationContext) -> dict[str, Any]:
        await ctx.io.send(Channel.INPUT, b"data")
        seen.append(sorted(os.listdir(tmp_path)))
        ctx.io.send_eof(Channel.INPUT, {"sha256": sha(b"data"), "size": 4})
        return {"path": ctx.args["path"], "sha256": sha(b"data"), "size": 4, "mode": 0o644}

    link = InMemoryLink({"pull": pull})
    result_of(start(link, link.client.pull("/g/f", str(tmp_path / "result.txt"))))
    ((temp,),) = seen
    assert temp.startswith(".result.txt.") and temp.endswith(".vmc-part")
    assert os.listdir(tmp_path) == ["result.txt"]


# ---- the agent's checks of a push, exactly ---------------------------------------------------


async def raw_push(link: InMemoryLink, args: dict[str, Any], data: bytes = b"",
                   trailer: dict[str, Any] | None = None, eof: bool = True) -> Any:
    """A push driven on the wire, to send what the real host never would."""
    stream, result = await link.client.open_request("push", {"mode": None, "size": None, **args})
    if data:
        await stream.send(Channel.INPUT, data)
    if eof:
        stream.send_eof(Channel.INPUT, trailer)
    return await result


@pytest.mark.parametrize(("trailer", "size", "message"), [
    ({"size": 3}, None, "the stream for {target} ended after 3 bytes without a sha256 and size trailer; "
                        "nothing was written: push again"),
    ({"sha256": sha(b"abc")}, None, "the stream for {target} ended after 3 bytes without a sha256 and size "
                                    "trailer; nothing was written: push again"),
    ({"sha256": sha(b"abc"), "size": 4}, None,
     "received 3 bytes for {target} but the host announced None and its trailer says 4; nothing was "
     "written: did the host file change during the push? push again"),
    ({"sha256": sha(b"abc"), "size": 3}, 2,
     "the host announced 2 bytes for {target} and sent more; nothing was written: did the host file "
     "change during the push? push again"),
])
def test_a_push_that_does_not_add_up_says_what_and_writes_nothing(
        tmp_path: Path, trailer: dict[str, Any], size: int | None, message: str) -> None:
    link = InMemoryLink(OPERATIONS)
    target = str(tmp_path / "f")
    error = error_of(start(link, raw_push(link, {"path": target, "size": size}, b"abc", trailer)))
    assert isinstance(error, IncompleteTransfer) and error.message == message.format(target=target)
    assert os.listdir(tmp_path) == []


def test_a_push_trailer_may_give_its_sha256_in_capitals(tmp_path: Path) -> None:
    link = InMemoryLink(OPERATIONS)
    trailer = {"sha256": sha(b"abc").upper(), "size": 3}
    result_of(start(link, raw_push(link, {"path": str(tmp_path / "f"), "size": 3}, b"abc", trailer)))
    assert (tmp_path / "f").read_bytes() == b"abc"


@pytest.mark.parametrize(("args", "message"), [
    ({"size": "3"}, "'size' must be a non-negative integer or null, got '3'"),
    ({"size": True}, "'size' must be a non-negative integer or null, got True"),
    ({"size": -1}, "'size' must be a non-negative integer or null, got -1"),
    ({"offset": 1.5}, "'offset' must be a non-negative integer or null, got 1.5"),
    ({"transfer_id": ""}, "'transfer_id' must be null or a string of 1 to 128 characters; got ''"),
    ({"transfer_id": "x" * 129}, "'transfer_id' must be null or a string of 1 to 128 characters; got "
                                 f"{'x' * 129!r}"),
    ({"transfer_id": 7}, "'transfer_id' must be null or a string of 1 to 128 characters; got 7"),
    ({"path": 7}, "'path' must be a string, got 7"),
    ({"checksum": "md5"}, "'checksum' must be one of ['crc32', 'sha256'], got 'md5'"),
    ({"checksum": ["crc32"]}, "'checksum' must be one of ['crc32', 'sha256'], got ['crc32']"),
    ({"checksum": None}, "'checksum' must be one of ['crc32', 'sha256'], got None"),
])
def test_odd_push_arguments_are_refused_by_name(tmp_path: Path, args: dict[str, Any], message: str) -> None:
    link = InMemoryLink(OPERATIONS)
    error = error_of(start(link, raw_push(link, {"path": str(tmp_path / "f"), **args}, eof=False)))
    assert isinstance(error, BadRequest) and error.message == message
    assert os.listdir(tmp_path) == []


def test_a_transfer_id_of_128_characters_is_taken(tmp_path: Path) -> None:
    link = InMemoryLink({**OPERATIONS, **files.PartialUploads().operations()})
    args = {"path": str(tmp_path / "f"), "transfer_id": "x" * 128}
    result_of(start(link, raw_push(link, args, b"abc", {"sha256": sha(b"abc"), "size": 3})))
    assert (tmp_path / "f").read_bytes() == b"abc"


def test_pull_and_push_errors_name_the_action_and_the_path(tmp_path: Path) -> None:
    link = InMemoryLink(OPERATIONS)
    missing, directory = str(tmp_path / "nope"), str(tmp_path / "d")
    os.mkdir(directory)
    cases: list[tuple[Deferred[Any], type[Exception], str]] = [
        (link.client.pull(missing, io.BytesIO()), PathNotFound,
         f"cannot read {missing}: no such file or directory in the guest"),
        (link.client.pull(directory, io.BytesIO()), IsADirectory,
         f"cannot read {directory}: it is a directory in the guest; pull the files in it one by one"),
        (link.client.push(io.BytesIO(b"x"), directory), IsADirectory,
         f"cannot write {directory}: it is a directory in the guest; push to a file path inside it"),
        (link.client.push(io.BytesIO(b"x"), f"{missing}/f"), PathNotFound,
         f"cannot write {missing}/f: {missing}: the directory does not exist in the guest; create it first "
         "(mkdir with parents=True)"),
    ]
    for call, cls, message in cases:
        link.flush()
        error = error_of(call)
        assert type(error) is cls and error.message == message  # type: ignore[attr-defined]
    assert os.listdir(tmp_path) == ["d"] and os.listdir(directory) == []


def test_os_errors_without_a_known_errno(tmp_path: Path) -> None:
    error = files.os_error(OSError("odd"), "cannot frob", "/x")
    assert type(error) is AgentOSError and error.details == {"path": "/x", "errno": "0"}
    error = files.os_error(OSError(9999, "Strange error"), "cannot frob", "/x")
    assert type(error) is AgentOSError and error.message == "cannot frob /x: 9999: Strange error"
    assert error.details == {"path": "/x", "errno": "9999"}


@pytest.mark.parametrize("fallback", [False, True], ids=["O_TMPFILE", "named-temp"])
def test_a_push_to_the_longest_file_name(tmp_path: Path, fallback: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The short-lived temp name must stay under NAME_MAX whatever the destination's name.
    if fallback:
        without_o_tmpfile(monkeypatch)
    target = tmp_path / ("n" * 255)
    link = InMemoryLink(OPERATIONS)
    result_of(start(link, link.client.push(io.BytesIO(b"data"), str(target))))
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == [target.name]


def without_o_tmpfile(monkeypatch: pytest.MonkeyPatch, named_error: int | None = None) -> None:
    """O_TMPFILE fails as on a filesystem without it; with ``named_error``, the named temp file too."""
    real_open = os.open

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)
        if named_error is not None and flags & os.O_EXCL:
            raise OSError(named_error, os.strerror(named_error), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", fake_open)


def test_the_named_temp_file_gets_a_new_files_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    without_o_tmpfile(monkeypatch)
    link = InMemoryLink(OPERATIONS)
    result = result_of(start(link, link.client.push(io.BytesIO(b"data"), str(tmp_path / "f"))))
    mode = 0o666 & ~current_umask()  # as O_TMPFILE gives it: no execute bits
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode == result.mode


def test_a_named_temp_file_that_cannot_be_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    without_o_tmpfile(monkeypatch, named_error=errno.ENOSPC)
    link = InMemoryLink(OPERATIONS)
    target = str(tmp_path / "f")
    error = error_of(start(link, link.client.push(io.BytesIO(b"data"), target)))
    assert type(error) is AgentOSError
    assert re.fullmatch(rf"cannot write {target}: {tmp_path}: {tmp_path}/\.f\.[0-9a-f]{{12}}\.vmc-tmp: "
                        r"ENOSPC: No space left on device", error.message), error.message
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fallback", [False, True], ids=["O_TMPFILE", "named-temp"])
def test_a_destination_that_became_a_directory_meanwhile(tmp_path: Path, fallback: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if fallback:
        without_o_tmpfile(monkeypatch)
    link = InMemoryLink(OPERATIONS)
    target = tmp_path / "f"
    real_write_all = files._write_all

    def write_while_a_directory_appears(fd: int, data: bytes) -> None:
        real_write_all(fd, data)
        target.mkdir(exist_ok=True)  # after the agent's check, before the rename

    monkeypatch.setattr(files, "_write_all", write_while_a_directory_appears)
    error = error_of(start(link, link.client.push(io.BytesIO(b"data"), str(target))))
    assert type(error) is IsADirectory and error.message == f"cannot write {target}: it is a directory"
    assert os.listdir(tmp_path) == ["f"] and os.listdir(target) == []


def test_a_push_puts_the_directory_entry_on_disk_too(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[os.stat_result] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.fstat(fd))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    link = InMemoryLink(OPERATIONS)
    result_of(start(link, link.client.push(io.BytesIO(b"data"), str(tmp_path / "f"))))
    file, directory = synced
    assert stat.S_ISREG(file.st_mode) and file.st_size == 4
    assert stat.S_ISDIR(directory.st_mode) and directory.st_ino == tmp_path.stat().st_ino


def test_a_cancel_while_the_file_is_synced_writes_nothing(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    contexts: list[OperationContext] = []

    async def push(ctx: OperationContext) -> Any:
        contexts.append(ctx)
        return await files.push(ctx)

    def fsync_meanwhile_cancelled(fd: int) -> None:
        # With a real reactor the fsync runs in a thread while the CANCEL arrives.
        contexts[0].cancel({"reason": "the host gave up"})

    monkeypatch.setattr(files.os, "fsync", fsync_meanwhile_cancelled)
    tracked = Tracked(push)
    link = InMemoryLink({**OPERATIONS, "push": tracked})
    start(link, link.client.push(io.BytesIO(b"data"), str(tmp_path / "f")))
    (outcome,) = tracked.outcomes
    assert isinstance(outcome, OperationCancelled)
    assert outcome.message == f"push of {tmp_path}/f stopped: the host gave up; nothing was written"
    assert os.listdir(tmp_path) == []


# ---- mkdir: never wider than asked -----------------------------------------------------------


def test_a_new_directory_is_never_more_open_than_asked(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Between mkdir and the chmod that undoes the umask, another guest user must not be able
    # to enter a directory meant to be private.
    created: list[int] = []
    real_chmod = os.chmod

    def recording_chmod(path: Any, mode: int, *args: Any, **kwargs: Any) -> None:
        created.append(stat.S_IMODE(os.stat(path).st_mode))
        real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(files.os, "chmod", recording_chmod)
    link = InMemoryLink(OPERATIONS)
    result_of(start(link, link.client.mkdir(str(tmp_path / "a"), mode=0o700)))
    result_of(start(link, link.client.mkdir(str(tmp_path / "b" / "c"), parents=True, mode=0o700)))
    assert len(created) == 2 and all(mode & ~0o700 == 0 for mode in created), created
    assert stat.S_IMODE((tmp_path / "b" / "c").stat().st_mode) == 0o700


def test_mkdir_with_parents_when_another_process_makes_the_parent_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target, parent = tmp_path / "a" / "b", tmp_path / "a"
    real_mkdir = os.mkdir
    raced: list[str] = []

    def racing_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(path) == str(target) and not raced:
            raced.append("parent")
            try:
                real_mkdir(path, *args, **kwargs)
            finally:
                real_mkdir(parent)  # another guest process, just after our attempt failed
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "mkdir", racing_mkdir)
    link = InMemoryLink(OPERATIONS)
    result_of(start(link, link.client.mkdir(str(target), parents=True, mode=0o750)))
    assert raced and stat.S_IMODE(target.stat().st_mode) == 0o750


# ---- resuming a push: the agent's side ----------------------------------------------------------


class ResumingAgent:
    """
    An agent that keeps partial pushes, reached by one controller after another, each of
    which names ``checksum`` (crc32, as the host does; sha256, as a host from before it).
    """

    def __init__(self, limit: int = 8, checksum: str = "crc32") -> None:
        self.checksum = checksum
        self.uploads = files.PartialUploads(limit)
        self.operations = {**OPERATIONS, **self.uploads.operations()}
        self.link = InMemoryLink(self.operations)

    def push_then_drop(self, path: Path, transfer_id: str, data: bytes) -> None:
        """Push the start of a file, then lose the channel before its end."""

        async def partial() -> Any:
            stream, result = await self.link.client.open_request(
                "push", {"path": str(path), "mode": None, "size": None, "transfer_id": transfer_id,
                         "checksum": self.checksum})
            await stream.send(Channel.INPUT, data)
            result.addErrback(lambda _: None)

        start(self.link, partial())
        self.link.client.close()
        self.link.flush()
        self.link = InMemoryLink(self.operations)  # the controller is back

    def offset(self, transfer_id: str) -> Any:
        return result_of(start(self.link, self.link.client.call("push_offset", {"transfer_id": transfer_id})))

    def resume(self, path: Path, transfer_id: str | None, offset: int, rest: bytes,
               whole: bytes) -> Deferred[Any]:
        args = {"path": str(path), "transfer_id": transfer_id, "offset": offset, "size": len(whole),
                "checksum": self.checksum}
        trailer = {self.checksum: CHECKSUM_OF[self.checksum](whole), "size": len(whole)}
        return start(self.link, raw_push(self.link, args, rest, trailer))


def open_files_in(directory: Path) -> int:
    """
    How many of this process's descriptors are open on files in ``directory``, unnamed ones
    included (their link reads ``DIRECTORY/#INODE (deleted)``).  Counting only those, a
    descriptor of something else closing meanwhile (an earlier test's garbage, a library's
    thread) cannot make a count wrong.
    """
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"{directory}/")
    return count


@pytest.mark.parametrize("checksum", ["crc32", "sha256"])
def test_a_dropped_push_is_held_and_continued(tmp_path: Path, checksum: str) -> None:
    agent = ResumingAgent(checksum=checksum)
    of = CHECKSUM_OF[checksum]
    target = tmp_path / "f"
    assert agent.offset("t1") == {"offset": 0}
    agent.push_then_drop(target, "t1", b"first half, ")
    assert agent.offset("t1") == {"offset": 12, checksum: of(b"first half, "), "path": str(target)}
    assert os.listdir(tmp_path) == []
    whole = b"first half, second half"
    result = result_of(agent.resume(target, "t1", 12, b"second half", whole))
    assert result == {"path": str(target), "size": len(whole), checksum: of(whole),
                      "mode": 0o666 & ~current_umask()}
    assert target.read_bytes() == whole
    assert agent.offset("t1") == {"offset": 0}  # nothing held any more


def test_a_push_cancelled_by_the_host_is_not_held(tmp_path: Path) -> None:
    agent = ResumingAgent()

    async def cancelled() -> None:
        stream, result = await agent.link.client.open_request(
            "push", {"path": str(tmp_path / "f"), "mode": None, "size": None, "transfer_id": "t1"})
        await stream.send(Channel.INPUT, b"some")
        result.addErrback(lambda _: None)
        result.cancel()

    start(agent.link, cancelled())
    assert agent.offset("t1") == {"offset": 0}
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("transfer_id", "offset", "path", "held"), [
    ("t1", 5, "f", "4 bytes for {tmp}/f"),
    ("t1", 4, "g", "4 bytes for {tmp}/f"),
    ("t2", 4, "f", "nothing"),
    (None, 4, "f", "nothing"),
])
def test_a_push_that_does_not_continue_what_is_held_is_refused(
        tmp_path: Path, transfer_id: str | None, offset: int, path: str, held: str) -> None:
    agent = ResumingAgent()
    agent.push_then_drop(tmp_path / "f", "t1", b"abcd")
    assert open_files_in(tmp_path) == 1
    error = error_of(agent.resume(tmp_path / path, transfer_id, offset, b"ef", b"abcdef"))
    assert isinstance(error, IncompleteTransfer)
    assert error.message == (f"cannot resume the push to {tmp_path}/{path} at byte {offset}: the agent "
                             f"holds {held.format(tmp=tmp_path)} (see push_offset); nothing was written: "
                             "push again from the start")
    assert os.listdir(tmp_path) == []
    if transfer_id == "t1":  # what was held and did not fit is dropped, its file closed
        assert agent.offset("t1") == {"offset": 0}
        assert open_files_in(tmp_path) == 0


def test_a_push_from_the_start_replaces_what_is_held(tmp_path: Path) -> None:
    agent = ResumingAgent()
    agent.push_then_drop(tmp_path / "f", "t1", b"stale")
    result_of(agent.resume(tmp_path / "f", "t1", 0, b"fresh", b"fresh"))
    assert (tmp_path / "f").read_bytes() == b"fresh"
    assert agent.offset("t1") == {"offset": 0}


def test_the_agent_holds_at_most_its_limit_of_dropped_pushes(tmp_path: Path) -> None:
    agent = ResumingAgent(limit=2)
    for name in ("a", "b", "c"):
        agent.push_then_drop(tmp_path / name, name, name.encode() * 3)
    assert open_files_in(tmp_path) == 2
    assert agent.offset("a")["offset"] == 0  # the oldest went
    assert agent.offset("b")["offset"] == agent.offset("c")["offset"] == 3
    agent.push_then_drop(tmp_path / "b", "b", b"bbbb")  # the same id again: the new part only
    assert agent.offset("b") == {"offset": 4, "crc32": crc(b"bbbb"), "path": f"{tmp_path}/b"}
    assert open_files_in(tmp_path) == 2
    agent.uploads.drop("b")
    agent.uploads.drop("c")
    assert open_files_in(tmp_path) == 0


def test_push_closes_the_files_it_opens_and_only_those(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").write_bytes(b"data")
    opened: list[Any] = []
    real_open = open

    def recording_open(*args: Any, **kwargs: Any) -> Any:
        f = real_open(*args, **kwargs)
        opened.append(f)
        return f

    monkeypatch.setattr("vmcontroller._files.open", recording_open, raising=False)
    link = InMemoryLink(OPERATIONS)
    result_of(start(link, link.client.push(str(tmp_path / "src"), str(tmp_path / "a"))))
    assert len(opened) == 1 and opened[0].closed
    with (tmp_path / "src").open("rb") as mine:
        result_of(start(link, link.client.push(mine, str(tmp_path / "b"))))
        assert not mine.closed  # the caller's file object stays the caller's
    assert (tmp_path / "b").read_bytes() == b"data"


def test_the_agent_holds_eight_dropped_pushes_by_default(tmp_path: Path) -> None:
    agent = ResumingAgent()
    for n in range(9):
        agent.push_then_drop(tmp_path / str(n), str(n), b"x")
    assert agent.offset("0")["offset"] == 0 and agent.offset("1")["offset"] == 1
    for n in range(1, 9):
        agent.uploads.drop(str(n))


def test_a_rename_error_the_agent_has_no_words_for_keeps_the_systems(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def cross_device(source: str, destination: str) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link", source, None, destination)

    monkeypatch.setattr(files.os, "rename", cross_device)
    link = InMemoryLink(OPERATIONS)
    target = str(tmp_path / "f")
    error = error_of(start(link, link.client.push(io.BytesIO(b"data"), target)))
    assert type(error) is AgentOSError
    assert error.message == f"cannot write {target}: EXDEV: Invalid cross-device link"
    assert os.listdir(tmp_path) == []


def test_a_resumed_push_to_an_agent_that_keeps_nothing_is_refused(tmp_path: Path) -> None:
    """An agent serving push without PartialUploads holds no partial push: an offset is refused."""
    link = InMemoryLink(OPERATIONS)
    args = {"path": str(tmp_path / "f"), "transfer_id": "t1", "offset": 4, "size": 6}
    error = error_of(start(link, raw_push(link, args, b"ef", {"sha256": sha(b"abcdef"), "size": 6})))
    assert isinstance(error, IncompleteTransfer) and "the agent holds nothing" in str(error)
    assert os.listdir(tmp_path) == []


def test_two_dropped_pushes_with_one_transfer_id_hold_one_file(tmp_path: Path) -> None:
    """A host that reuses a transfer id at once: the agent holds the later push only."""
    agent = ResumingAgent()

    async def two_pushes() -> None:
        for data in (b"first", b"second"):
            stream, result = await agent.link.client.open_request(
                "push", {"path": str(tmp_path / "f"), "mode": None, "size": None, "transfer_id": "t1"})
            await stream.send(Channel.INPUT, data)
            result.addErrback(lambda _: None)

    start(agent.link, two_pushes())
    agent.link.client.close()
    agent.link.flush()
    agent.link = InMemoryLink(agent.operations)
    assert agent.offset("t1") == {"offset": 6, "sha256": sha(b"second"), "path": str(tmp_path / "f")}
    assert open_files_in(tmp_path) == 1  # the first push's file was closed


def test_a_push_whose_rename_fails_names_the_destination_not_the_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_rename(source: str, destination: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", source)

    monkeypatch.setattr(files.os, "rename", failing_rename)
    link = InMemoryLink(OPERATIONS)
    target = tmp_path / "f"
    trailer = {"sha256": sha(b"abc"), "size": 3}
    error = error_of(start(link, raw_push(link, {"path": str(target)}, b"abc", trailer)))
    assert str(target) in str(error) and files.TEMP_SUFFIX not in str(error), error
    assert os.listdir(tmp_path) == []


def test_a_push_whose_channel_drops_before_the_answer_says_so() -> None:
    """Without reconnection: every byte was sent, the agent's answer never came."""

    async def swallowing(ctx: OperationContext) -> Any:
        while await ctx.io.receive(Channel.INPUT) is not None:
            pass
        await Deferred()  # the channel drops first

    link = InMemoryLink({"push": swallowing})
    pushing = start(link, link.client.push(io.BytesIO(b"hello"), "/g/f"))
    link.pump.clientIO.loseConnection()
    link.flush()
    error = error_of(pushing)
    assert isinstance(error, ConnectionLost) and "the channel to the agent closed" in str(error), error
