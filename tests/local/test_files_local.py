"""
File and system operations over loopback TCP with the real reactor: the agent's
operations run in this process against pytest's tmp_path.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.task import deferLater

from guest_agent import __version__
from guest_agent.ops import files, system
from guest_agent.protocol.checksums import new_checksum
from guest_agent.protocol.errors import (
    AgentOSError,
    ConnectionLost,
    DirectoryNotEmpty,
    IntegrityError,
    OperationCancelled,
    PathNotFound,
)
from guest_agent.protocol.frames import Channel
from guest_agent.session import Operation, OperationContext
from guest_agent.transports import AgentFactory
from vmcontroller.client import GuestClient, connect
from vmcontroller.testing import minted

reactor: Any = _reactor
OPERATIONS: dict[str, Operation] = {**files.OPERATIONS, **system.OPERATIONS}


@asynccontextmanager
async def agent(operations: dict[str, Operation] = OPERATIONS) -> AsyncIterator[GuestClient]:
    """An agent listening on loopback and a client connected to it."""
    listening = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    credentials, authenticator = minted()
    port = await listening.listen(AgentFactory(reactor, operations, authenticator=authenticator))
    client = await connect(
        reactor,
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        credentials=credentials,
        timeout=10,
    )
    try:
        yield client
    finally:
        client.close()
        await port.stopListening()


async def settle(condition: Any, what: str) -> None:
    """Let the reactor run until ``condition()`` holds."""
    for _ in range(500):
        if condition():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError(f"timed out waiting for {what}")


def unnamed_files_in(directory: Path) -> list[str]:
    """This process's open O_TMPFILE files in ``directory`` (``/dir/#inode (deleted)``)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/#"):
            found.append(target)
    return found


@pytest_twisted.ensureDeferred
async def test_round_trip_keeps_bytes_and_the_mode_the_host_chose(tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    source = tmp_path / "source"
    source.write_bytes(data)
    source.chmod(0o751)
    (tmp_path / "guest").mkdir()
    async with agent() as client:
        pushed = await client.push(str(source), str(tmp_path / "guest" / "f"))
        pulled = await client.pull(str(tmp_path / "guest" / "f"), str(tmp_path / "back"), mode=0o700)
    digest = hashlib.sha256(data).hexdigest()
    assert (tmp_path / "guest" / "f").read_bytes() == data == (tmp_path / "back").read_bytes()
    assert pushed.sha256 == pulled.sha256 == digest and pushed.size == pulled.size == len(data)
    assert stat.S_IMODE((tmp_path / "guest" / "f").stat().st_mode) == 0o751
    assert stat.S_IMODE((tmp_path / "back").stat().st_mode) == 0o700 and pulled.mode == 0o751
    assert sorted(os.listdir(tmp_path)) == ["back", "guest", "source"]
    assert os.listdir(tmp_path / "guest") == ["f"]


@pytest_twisted.ensureDeferred
async def test_missing_paths(tmp_path: Path) -> None:
    async with agent() as client:
        with pytest.raises(PathNotFound, match="does not exist in the guest"):
            await client.push(io.BytesIO(os.urandom(8 * 1024 * 1024)), str(tmp_path / "no" / "f"))
        with pytest.raises(PathNotFound):
            await client.pull(str(tmp_path / "nope"), str(tmp_path / "host-copy"))
        assert await client.ping()  # the session survived both
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("checksum", ["crc32", "sha256"])
@pytest_twisted.ensureDeferred
async def test_wrong_checksum_writes_nothing(tmp_path: Path, checksum: str) -> None:
    data = os.urandom(3 * 1024 * 1024)
    wrong = new_checksum(checksum)
    wrong.update(data[:-1])
    async with agent() as client:
        stream, result = await client.open_request(
            "push", {"path": str(tmp_path / "f"), "mode": None, "size": len(data), "checksum": checksum}
        )
        await stream.send(Channel.INPUT, data)
        stream.send_eof(Channel.INPUT, {checksum: wrong.hexdigest(), "size": len(data)})
        with pytest.raises(IntegrityError):
            await result
    assert os.listdir(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_disconnect_mid_push_leaves_nothing(tmp_path: Path) -> None:
    outcomes: list[Any] = []

    async def tracked_push(ctx: OperationContext) -> Any:
        try:
            return await files.push(ctx)
        except Exception as e:
            outcomes.append(e)
            raise

    seen_mid_transfer: list[tuple[list[str], list[str]]] = []

    async with agent({**OPERATIONS, "push": tracked_push}) as client:

        class Disconnecting(io.BytesIO):
            def read(self, size: int | None = -1) -> bytes:
                if self.tell() >= 6 * 1024 * 1024 and not seen_mid_transfer:
                    # More than a window has gone: the agent has been writing for a while.
                    seen_mid_transfer.append((os.listdir(tmp_path), unnamed_files_in(tmp_path)))
                    client.close()
                return super().read(size)

        with pytest.raises(ConnectionLost):
            await client.push(Disconnecting(os.urandom(16 * 1024 * 1024)), str(tmp_path / "f"))
        await settle(lambda: outcomes, "the agent's push to end")
    [(listed, unnamed)] = seen_mid_transfer
    assert listed == [] and len(unnamed) == 1  # written into an O_TMPFILE, never named
    assert isinstance(outcomes[0], OperationCancelled)
    assert os.listdir(tmp_path) == [] and unnamed_files_in(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_write_error_in_the_file_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[int] = []
    real_write_all = files._write_all

    def filling_up(fd: int, data: bytes) -> None:
        if sum(written) >= 2 * 1024 * 1024:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)
        written.append(len(data))

    monkeypatch.setattr(files, "_write_all", filling_up)
    async with agent() as client:
        with pytest.raises(AgentOSError, match=r"cannot write .*ENOSPC"):
            await client.push(io.BytesIO(os.urandom(8 * 1024 * 1024)), str(tmp_path / "f"))
        assert await client.ping()  # the session survived
    assert os.listdir(tmp_path) == [] and unnamed_files_in(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_directory_operations(tmp_path: Path) -> None:
    base = tmp_path / "a"
    async with agent() as client:
        await client.mkdir(str(base / "b"), parents=True, mode=0o700)
        await client.push(io.BytesIO(b"hi"), str(base / "b" / "f"))
        entries = await client.list(str(base / "b"))
        info = await client.stat(str(base / "b"))
        with pytest.raises(DirectoryNotEmpty):
            await client.remove(str(base))
        await client.remove(str(base), recursive=True)
    assert [(e["name"], e["type"], e["size"]) for e in entries] == [("f", "file", 2)]
    assert (info["type"], info["mode"]) == ("dir", 0o700)
    assert os.listdir(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_ping_and_info() -> None:
    async with agent() as client:
        before = reactor.seconds()
        pong = await client.ping()
        info = await client.info()
    assert pong["version"] == __version__ and pong["time"] >= before
    assert {
        "hostname",
        "kernel",
        "os_release",
        "uptime",
        "load",
        "memory",
        "disk",
        "agent_version",
        "protocol_versions",
    } <= set(info)
    assert info["memory"]["total"] > 0 and info["disk"]["total"] > 0
