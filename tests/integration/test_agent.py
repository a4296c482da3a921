"""
Every agent operation, and the bad input the acceptance list names, against the real
agent in a real QEMU guest booted once for the session (``booted_vm`` in conftest), and again
against the single-file agent in a guest without Debian's Twisted (``bundle_vm``).

The channel takes one host at a time, so each test connects its own client and closes
it; tests that damage the guest revert it to the ``clean`` snapshot afterwards.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from guest_agent.protocol.frames import FrameType, encode_frame
from tests.integration.conftest import sha256
from vmcontroller.client import GuestClient, connect
from vmcontroller.errors import (
    CommandNotFound,
    ConnectionLost,
    DirectoryNotEmpty,
    FrameTooLarge,
    OperationTimeout,
    PathNotFound,
    UnsupportedProtocolVersion,
)
from vmcontroller.machine import connect_vm_agent

pytestmark = pytest.mark.integration


@pytest.fixture(params=["package", "bundle"])
def guest(request: pytest.FixtureRequest) -> Any:
    """The guest with the agent as a package over Debian's Twisted, then as the single file."""
    return request.getfixturevalue("booted_vm" if request.param == "package" else "bundle_vm")


@pytest_twisted.async_yield_fixture()
async def agent(guest: Any) -> AsyncIterator[GuestClient]:
    client = await connect_vm_agent(reactor, guest.driver, guest.name, timeout=180)
    yield client
    client.close()


@pytest_twisted.ensureDeferred
async def test_ping_and_info(agent: GuestClient) -> None:
    pong = await agent.ping()
    assert pong["version"]
    info = await agent.info()
    assert info["kernel"].startswith("Linux")
    assert "bookworm" in str(info["os_release"]).lower() or "12" in str(info["os_release"])
    assert info["memory"]["total"] > 100 * 1024 * 1024
    assert info["disk"]["total"] > 0 and info["uptime"] > 0


@pytest_twisted.ensureDeferred
async def test_exec_streams_10_mib_while_another_exec_runs(agent: GuestClient) -> None:
    slow = agent.run(["sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.3; done"])
    script = "head -c 10485760 /dev/urandom > /tmp/big && sha256sum /tmp/big && cat /tmp/big"
    seen: list[bytes] = []
    big = agent.exec(["sh", "-c", script], on_stdout=seen.append)
    result = await big.exited
    slow_result = await slow
    out = b"".join(seen)
    digest_line, payload = out.split(b"\n", 1)
    assert len(payload) == 10 * 1024 * 1024
    assert sha256(payload) == digest_line.split()[0].decode()
    assert result.exit_code == 0
    assert slow_result.stdout == b"tick 1\ntick 2\ntick 3\n"


@pytest_twisted.ensureDeferred
async def test_exec_stdin_env_cwd_exit_code(agent: GuestClient) -> None:
    result = await agent.run(
        ["sh", "-c", 'cat; echo "$GREETING"; pwd; exit 3'],
        stdin=b"from stdin\n",
        env={"GREETING": "hello"},
        cwd="/tmp",
    )
    assert result.stdout == b"from stdin\nhello\n/tmp\n"
    assert result.exit_code == 3


@pytest_twisted.ensureDeferred
async def test_nonexistent_command(agent: GuestClient) -> None:
    with pytest.raises(CommandNotFound, match="no-such-program"):
        await agent.run(["no-such-program", "--flag"])
    assert (await agent.run(["true"])).exit_code == 0  # nothing lost: the agent serves on


@pytest_twisted.ensureDeferred
async def test_timeout_kills_the_process_group(agent: GuestClient) -> None:
    with pytest.raises(OperationTimeout):
        await agent.run(["sh", "-c", "sleep 300 & echo $! > /tmp/child.pid; sleep 300"], timeout=1)
    check = await agent.run(
        ["sh", "-c", "kill -0 $(cat /tmp/child.pid) 2>/dev/null && echo alive || echo dead"]
    )
    assert check.stdout == b"dead\n"


@pytest_twisted.ensureDeferred
async def test_push_pull_round_trip(agent: GuestClient, tmp_path: Any) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    os.chmod(source, 0o640)
    pushed = await agent.push(str(source), "/root/in.bin")
    assert pushed.sha256 == sha256(data) and pushed.size == len(data)
    assert (await agent.stat("/root/in.bin"))["mode"] & 0o777 == 0o640
    back = tmp_path / "back.bin"
    pulled = await agent.pull("/root/in.bin", str(back))
    assert back.read_bytes() == data and pulled.sha256 == sha256(data)
    # The host decides the mode, not the guest: 0o666 less the umask unless the caller says.
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(back).st_mode & 0o7777 == 0o666 & ~umask
    await agent.pull("/root/in.bin", str(tmp_path / "chosen.bin"), mode=0o600)
    assert os.stat(tmp_path / "chosen.bin").st_mode & 0o7777 == 0o600


@pytest_twisted.ensureDeferred
async def test_pull_of_missing_path(agent: GuestClient, tmp_path: Any) -> None:
    with pytest.raises(PathNotFound, match="/no/such/file"):
        await agent.pull("/no/such/file", str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_push_into_missing_directory(agent: GuestClient, tmp_path: Any) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(1024 * 1024))
    with pytest.raises(PathNotFound, match="/no/such/dir"):
        await agent.push(str(source), "/no/such/dir/file")
    with pytest.raises(PathNotFound):
        await agent.stat("/no/such/dir")


@pytest_twisted.ensureDeferred
async def test_directories(agent: GuestClient) -> None:
    await agent.run(["rm", "-rf", "/tmp/d"])
    await agent.mkdir("/tmp/d/a/b", parents=True)
    await agent.run(["sh", "-c", "echo x > /tmp/d/a/f"])
    names = sorted(entry["name"] for entry in await agent.list("/tmp/d/a"))
    assert names == ["b", "f"]
    assert (await agent.stat("/tmp/d/a/f"))["size"] == 2
    with pytest.raises(DirectoryNotEmpty):
        await agent.remove("/tmp/d")
    await agent.remove("/tmp/d", recursive=True)
    with pytest.raises(PathNotFound):
        await agent.stat("/tmp/d")


@pytest_twisted.ensureDeferred
async def test_frame_over_the_size_limit(agent: GuestClient) -> None:
    pending = agent.run(["sleep", "5"])
    await deferLater(reactor, 0.5, lambda: None)
    # Only the header: the agent must refuse before waiting for 16 MiB of payload.
    header = encode_frame(FrameType.REQUEST, 4242, b"x" * (16 * 1024 * 1024))[:16]
    agent._write(header)
    with pytest.raises(FrameTooLarge, match="exceeds the limit"):
        await pending
    assert (await agent.ping())["version"]  # resynchronised, nothing wedged


@pytest_twisted.ensureDeferred
async def test_unknown_protocol_version(booted_vm: Any) -> None:
    endpoint = await booted_vm.driver.agent_endpoint(booted_vm.name)
    credentials = await booted_vm.driver.agent_credentials(booted_vm.name)
    with pytest.raises(UnsupportedProtocolVersion, match="install a matching"):
        await connect(reactor, endpoint, credentials=credentials, versions=(99,), timeout=60)
    client = await connect(reactor, endpoint, credentials=credentials, timeout=60)
    assert (await client.ping())["version"]
    client.close()


@pytest_twisted.ensureDeferred
async def test_push_interrupted_by_killing_the_agent(agent: GuestClient, tmp_path: Any) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(64 * 1024 * 1024))
    await agent.run(["mkdir", "-p", "/root/upload"])
    killed: list[Deferred[Any]] = []

    def progress(done: int, total: int | None) -> None:
        if done >= 4 * 1024 * 1024 and not killed:
            killed.append(
                agent.run(["sh", "-c", "kill -9 $(systemctl show -p MainPID --value vmcontroller-agent)"])
            )

    with pytest.raises(ConnectionLost):
        await agent.push(str(source), "/root/upload/big.bin", progress=progress)
    assert killed
    await gatherResults(killed).addErrback(lambda f: None)
    # The restarted agent answers; the destination and its directory hold nothing.
    await agent.wait_ready()
    assert await agent.list("/root/upload") == []


async def _agent_cpu_ticks(client: GuestClient) -> int:
    script = "cut -d' ' -f14,15 /proc/$(systemctl show -p MainPID --value vmcontroller-agent)/stat"
    utime, stime = (await client.run(["sh", "-c", script], check=True)).stdout.split()
    return int(utime) + int(stime)


@pytest_twisted.ensureDeferred
async def test_agent_waits_for_the_host_without_spinning(agent: GuestClient, guest: Any) -> None:
    """With no host on the port (which then polls as hang-up), the agent must sleep, not spin."""
    before = await _agent_cpu_ticks(agent)
    agent.close()
    await deferLater(reactor, 10, lambda: None)
    again = await connect_vm_agent(reactor, guest.driver, guest.name, timeout=60)
    try:
        used = await _agent_cpu_ticks(again) - before
        ticks_per_second = int((await again.run(["getconf", "CLK_TCK"], check=True)).stdout)
    finally:
        again.close()
    # Spinning would burn about the whole 10 s; reconnecting and two execs cost a little.
    assert used < 2 * ticks_per_second


@pytest_twisted.ensureDeferred
async def test_snapshot_revert_restores_disk_state(agent: GuestClient, guest: Any) -> None:
    driver, name = guest.driver, guest.name
    await agent.run(["sh", "-c", "echo before > /root/state.txt && sync"], check=True)
    await driver.snapshot_create(name, "agent-test")
    try:
        change = "echo after > /root/state.txt && rm -f /etc/hostname && sync"
        await agent.run(["sh", "-c", change], check=True)
        agent.close()
        await driver.snapshot_revert(name, "agent-test")
        reverted = await connect_vm_agent(reactor, driver, name, timeout=180)
        try:
            assert (await reverted.run(["cat", "/root/state.txt"])).stdout == b"before\n"
            assert (await reverted.stat("/etc/hostname"))["type"] == "file"
        finally:
            reverted.close()
    finally:
        await driver.snapshot_delete(name, "agent-test")


@pytest_twisted.ensureDeferred
async def test_the_single_file_agent_needs_no_twisted_package(bundle_vm: Any) -> None:
    client = await connect_vm_agent(reactor, bundle_vm.driver, bundle_vm.name, timeout=180)
    try:
        probe = await client.run(["python3", "-c", "import twisted"])
        assert probe.exit_code != 0 and b"No module named 'twisted'" in probe.stderr
        listed = await client.run(["dpkg-query", "-W", "python3-twisted"])
        assert listed.exit_code != 0
        unit = await client.run(["systemctl", "show", "-p", "ExecStart", "--value", "vmcontroller-agent"])
        assert b"/usr/local/lib/vmcontroller/vmcontroller-agent.pyz run" in unit.stdout
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_reboot_and_shutdown(agent: GuestClient, guest: Any) -> None:
    """Last: both take the guest away; the agent is back after each."""
    from hypervisors.interface import VMState

    boot_id = (await agent.run(["cat", "/proc/sys/kernel/random/boot_id"])).stdout
    await agent.reboot()
    # The client outlives the reboot: requests caught by it fail with ConnectionLost when the
    # new agent announces itself, and the client resynchronises with that agent.
    new_boot_id = boot_id
    for _ in range(60):
        try:
            await Deferred.fromCoroutine(agent.wait_ready()).addTimeout(300, reactor)
            new_boot_id = (await agent.run(["cat", "/proc/sys/kernel/random/boot_id"])).stdout
        except ConnectionLost:
            continue
        if new_boot_id != boot_id:
            break
        await deferLater(reactor, 2, lambda: None)
    assert new_boot_id != boot_id

    await agent.shutdown()
    await guest.driver.wait_for_state(guest.name, VMState.SHUTOFF, timeout=180)
    agent.close()
    await guest.driver.start(guest.name)
    again = await connect_vm_agent(reactor, guest.driver, guest.name, timeout=300)
    assert (await again.ping())["version"]
    again.close()
