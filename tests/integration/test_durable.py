"""
Results and sessions that outlive a controller, an agent and a boot, on the session's real
QEMU guest: a controller process killed with SIGKILL in the middle of an exec and another
that collects it; the agent service restarted and the guest rebooted under a client that
carries on; and cancel, streamed stdin and streamed output against real processes.

The channel takes one host at a time, so each test's clients are closed before the next
connects (the restart test's controllers are processes of their own, on the same socket).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from guest_agent.protocol.tls import Credentials
from hypervisors.interface import VMState
from tests.integration.conftest import once_libvirtd_answers, restart_libvirtd
from vmcontroller._exec import STREAM, ExecHandle
from vmcontroller.client import GuestClient, connect
from vmcontroller.errors import ConnectionLost, OperationCancelled, UnknownCommand
from vmcontroller.machine import connect_vm_agent

pytestmark = pytest.mark.integration

CONTROLLER = Path(__file__).with_name("controller_process.py")
#: 300 lines, one every 0.1 s: about 30 s of output (longer under emulation).
LINES = 300
PRINTER = (f'i=1; while [ $i -le {LINES} ]; do printf "line %d of the job %s\\n" $i '
           '"$(printf %060d $i)"; i=$((i+1)); sleep 0.1; done; echo done >&2; exit 7')
T = TypeVar("T")
EXPECTED = b"".join(b"line %d of the job %060d\n" % (i, i) for i in range(1, LINES + 1))


@pytest_twisted.async_fixture()
async def credentials(booted_vm: Any) -> Credentials:
    """The host's end of the guest's credentials: every controller here authenticates."""
    found: Credentials = await booted_vm.driver.agent_credentials(booted_vm.name)
    return found


@pytest_twisted.async_yield_fixture()
async def socket(booted_vm: Any, credentials: Credentials) -> AsyncIterator[str]:
    """The unix socket of the guest agent's virtio-serial channel, once the agent answers."""
    path: str = await booted_vm.driver.agent_socket_path(booted_vm.name)
    client = await connect(reactor, UNIXClientEndpoint(reactor, path), credentials=credentials, timeout=300)
    await client.close()
    yield path


@pytest_twisted.async_yield_fixture()
async def agent(socket: str, credentials: Credentials) -> AsyncIterator[GuestClient]:
    client = await connect(reactor, UNIXClientEndpoint(reactor, socket), credentials=credentials, timeout=300)
    assert client.authenticated
    yield client
    await client.close()


@pytest.fixture
def credentials_file(credentials: Credentials, tmp_path: Path) -> str:
    """The host's end in a private file, for the controllers that run as processes of their own."""
    path = tmp_path / "host-credentials.json"
    path.touch(mode=0o600)
    path.write_bytes(credentials.to_json())
    return str(path)


class _Controller(ProcessProtocol):
    """A controller_process.py run: its stdout, a wait for some of it, and its end."""

    def __init__(self) -> None:
        self.output = bytearray()
        #: Fires with how it ended (ProcessDone or ProcessTerminated).
        self.ended: Deferred[BaseException] = Deferred()
        self._wanted: tuple[int, Deferred[None]] | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if self._wanted is not None and len(self.output) >= self._wanted[0]:
            self._wanted[1].callback(None)
            self._wanted = None

    def errReceived(self, data: bytes) -> None:
        sys.stderr.write(data.decode(errors="replace"))

    def processEnded(self, reason: Failure) -> None:
        if self._wanted is not None:
            self._wanted[1].errback(reason)
        assert reason.value is not None
        self.ended.callback(reason.value)

    def received(self, count: int) -> Deferred[None]:
        """Fires once ``count`` bytes of stdout have come (fails if the process ends first)."""
        waiter: Deferred[None] = Deferred()
        if len(self.output) >= count:
            waiter.callback(None)
        else:
            self._wanted = (count, waiter)
        return waiter


def _spawn_controller(*args: str) -> tuple[_Controller, Any]:
    protocol = _Controller()
    transport = reactor.spawnProcess(
        protocol, sys.executable, [sys.executable, str(CONTROLLER), *args], env=dict(os.environ))
    return protocol, transport


@pytest_twisted.ensureDeferred
async def test_a_new_controller_collects_an_exec_whose_controller_was_killed(
        socket: str, credentials_file: str) -> None:
    exec_id = f"restart-{os.getpid()}"
    first, process = _spawn_controller(credentials_file, socket, "start", exec_id, "sh", "-c", PRINTER)
    await first.received(3 * len(EXPECTED) // LINES)  # three lines streamed live: the job runs
    process.signalProcess("KILL")
    ended = await first.ended
    assert isinstance(ended, ProcessTerminated) and ended.signal == signal.SIGKILL
    assert EXPECTED.startswith(bytes(first.output)) and len(first.output) < len(EXPECTED)

    second, _ = _spawn_controller(credentials_file, socket, "collect", exec_id)
    assert isinstance(await second.ended, ProcessDone), bytes(second.output)
    collected = json.loads(bytes(second.output))
    assert collected["listed"] and collected["listed"][0]["argv"] == ["sh", "-c", PRINTER]
    assert bytes.fromhex(collected["stdout"]) == EXPECTED  # byte for byte, the part the killed one saw too
    assert bytes.fromhex(collected["stderr"]) == b"done\n"
    assert (collected["exit_code"], collected["signal"]) == (7, None)
    assert collected["output_complete"] and collected["remaining"] == []  # acknowledged: forgotten


async def _ended_by_the_agent_going(handle: ExecHandle) -> None:
    """
    An exec in flight when the agent goes ends at once: with ``ConnectionLost``, or, when
    the agent was stopped in order (systemd's SIGTERM to the unit's processes), with the
    result it sent before it went: killed by a signal.
    """
    try:
        result = await handle.result()
    except ConnectionLost as e:
        assert "outcome in the guest is unknown" in str(e)
    else:
        assert result.signal is not None


async def _last_words(agent: GuestClient, argv: list[str]) -> None:
    """
    Run ``argv``, which takes the agent away: its answer may be lost with the agent, or
    say it was killed with the agent's other processes.
    """
    with contextlib.suppress(ConnectionLost):
        result = await agent.run(argv)
        assert result.exit_code == 0 or result.signal is not None, result


@pytest_twisted.ensureDeferred
async def test_the_same_client_carries_on_after_the_agent_service_restarts(agent: GuestClient) -> None:
    before = (await agent.run(["systemctl", "show", "-p", "MainPID", "--value", "vmcontroller-agent"])).stdout
    in_flight = agent.exec(["sleep", "600"])
    # --no-block: the restart ends this exec's agent, and systemctl with it if it waited.
    await _last_words(agent, ["systemctl", "--no-block", "restart", "vmcontroller-agent"])
    await _ended_by_the_agent_going(in_flight)
    after = before
    for _ in range(120):
        try:
            after = (await agent.run(["systemctl", "show", "-p", "MainPID", "--value",
                                      "vmcontroller-agent"])).stdout
            break
        except ConnectionLost:  # caught by the restart before the new agent's RESET
            await deferLater(reactor, 1, lambda: None)
    assert after.strip() and after != before
    assert (await agent.ping())["version"]


@pytest_twisted.ensureDeferred
async def test_the_same_client_carries_on_after_a_reboot_in_the_middle_of_an_exec(
        agent: GuestClient) -> None:
    """Last but the destructive ones of test_agent: it takes the guest away."""
    boot_id = (await agent.run(["cat", "/proc/sys/kernel/random/boot_id"], check=True)).stdout
    exec_id = f"reboot-{os.getpid()}"
    lines: list[bytes] = []
    started: Deferred[None] = Deferred()

    def on_stdout(chunk: bytes) -> None:
        lines.append(chunk)
        if not started.called:
            started.callback(None)

    running = agent.exec(["sh", "-c", "echo up; exec sleep 600"], exec_id=exec_id, on_stdout=on_stdout)
    await started
    await _last_words(agent, ["systemctl", "--no-block", "reboot"])
    await _ended_by_the_agent_going(running)
    new_boot_id = boot_id
    for _ in range(300):
        try:
            new_boot_id = (await agent.run(["cat", "/proc/sys/kernel/random/boot_id"])).stdout
        except ConnectionLost:  # a request the shutdown or the new agent's RESET caught
            await deferLater(reactor, 1, lambda: None)
            continue
        if new_boot_id != boot_id:
            break
        await deferLater(reactor, 1, lambda: None)
    assert new_boot_id != boot_id
    assert b"".join(lines) == b"up\n"
    # The command died with the boot, and the agent says so plainly.
    assert [c.exec_id for c in await agent.commands()] == []
    with pytest.raises(UnknownCommand, match="agent restarted"):
        await agent.attach(exec_id).result()


async def _processes_running(agent: GuestClient, pattern: str) -> list[str]:
    """Command lines in the guest that match ``pattern`` (a grep regex that does not match itself)."""
    script = ("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done "
              f"| grep -e '{pattern}' || true")
    listing = (await agent.run(["sh", "-c", script], check=True)).stdout.decode()
    return [line for line in listing.splitlines() if line.strip()]


@pytest.mark.parametrize("retained", [False, True])
@pytest_twisted.ensureDeferred
async def test_cancelling_an_exec_ends_its_whole_process_group(agent: GuestClient, retained: bool) -> None:
    marker = f"{3000 + retained}{os.getpid()}"
    started: Deferred[None] = Deferred()
    handle = agent.exec(
        ["sh", "-c", f"sleep {marker} & sleep {marker} & echo started; wait"],
        exec_id=f"cancel-{os.getpid()}" if retained else None,
        on_stdout=lambda chunk: None if started.called else started.callback(None),
    )
    await started
    pattern = f"slee[p] {marker}"
    assert len(await _processes_running(agent, pattern)) == 3  # the shell and its two children
    handle.cancel()
    with pytest.raises(OperationCancelled):
        await handle.result()
    # The agent answers once the leader is reaped; the killed children may take a moment more.
    left = await _processes_running(agent, pattern)
    for _ in range(20):
        if not left:
            break
        await deferLater(reactor, 0.5, lambda: None)
        left = await _processes_running(agent, pattern)
    assert left == []
    if retained:
        [info] = [c for c in await agent.commands() if c.exec_id == f"cancel-{os.getpid()}"]
        assert not info.running and isinstance(info.error, OperationCancelled)
        await agent.acknowledge(info.exec_id)


@pytest_twisted.ensureDeferred
async def test_stdin_streamed_to_an_exec(agent: GuestClient) -> None:
    handle = agent.exec(["sha256sum"], stdin=STREAM)
    digest = hashlib.sha256()
    for index in range(64):
        chunk = bytes([index]) * 65536 + os.urandom(1000)
        digest.update(chunk)
        await handle.write_stdin(chunk)
    handle.close_stdin()
    result = await handle.result(check=True)
    assert result.stdout.split()[0].decode() == digest.hexdigest()


@pytest_twisted.ensureDeferred
async def test_output_is_consumed_as_a_stream(agent: GuestClient) -> None:
    """The first line arrives while the process still waits for the test to let it go on."""
    gate = f"/tmp/gate-{os.getpid()}"
    first: Deferred[bytes] = Deferred()
    chunks: list[bytes] = []

    def on_stdout(chunk: bytes) -> None:
        chunks.append(chunk)
        if not first.called:
            first.callback(chunk)

    handle = agent.exec(
        ["sh", "-c", f"echo first; while [ ! -e {gate} ]; do sleep 0.1; done; echo second; rm {gate}"],
        on_stdout=on_stdout)
    assert await first == b"first\n"
    assert not handle.exited.called  # it waits for the gate, which only the test opens
    await agent.run(["touch", gate], check=True)
    result = await handle.result(check=True)
    assert b"".join(chunks) == b"first\nsecond\n" and result.stdout == b""  # the callback took it all


async def _pushed_intact(agent: GuestClient, tmp_path: Path, name: str) -> None:
    """Push a file of random bytes and check the guest's sha256 of it; remove it after."""
    source = tmp_path / name
    source.write_bytes(os.urandom(1024 * 1024 + 3))
    destination = f"/root/{name}-{os.getpid()}"
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    assert (await agent.push(str(source), destination)).sha256 == expected
    digest = (await agent.run(["sha256sum", destination], check=True)).stdout.split()[0].decode()
    assert digest == expected
    await agent.remove(destination)


@pytest_twisted.ensureDeferred
async def test_a_libvirtd_restart_loses_nothing_on_the_channel(
        booted_vm: Any, agent: GuestClient, tmp_path: Path) -> None:
    """
    libvirtd stopped and started again while an exec streams its output: the channel is
    QEMU's, so the session carries on; the driver reconnects to the new libvirtd.
    """
    driver, name = booted_vm.driver, booted_vm.name
    path = await driver.agent_socket_path(name)
    chunks: list[bytes] = []
    started: Deferred[None] = Deferred()

    def on_stdout(chunk: bytes) -> None:
        chunks.append(chunk)
        if not started.called:
            started.callback(None)

    streaming = agent.exec(["sh", "-c", PRINTER], on_stdout=on_stdout)
    await started
    await restart_libvirtd()
    assert not streaming.exited.called  # it ran through the restart
    result = await streaming.result()
    assert b"".join(chunks) == EXPECTED and result.stderr == b"done\n"
    assert (result.exit_code, result.signal) == (7, None)
    await _pushed_intact(agent, tmp_path, "after-libvirtd")
    assert await once_libvirtd_answers(lambda: driver.state(name)) is VMState.RUNNING
    assert await driver.agent_socket_path(name) == path


async def _until_reconnected(call: Callable[[], Deferred[T]]) -> T:
    """
    ``call()``'s outcome once the client's new session answers it (earlier tries may be
    cut); a client that does not reconnect within 300 s fails the test, not hangs it.
    """
    deadline = reactor.seconds() + 300
    while True:
        try:
            return await call().addTimeout(max(1.0, deadline - reactor.seconds()), reactor)
        except ConnectionLost:  # sent as the channel went
            await deferLater(reactor, 1, lambda: None)


@pytest_twisted.ensureDeferred
async def test_the_same_client_carries_on_after_the_guest_is_saved_and_restored(
        booted_vm: Any, socket: str, tmp_path: Path) -> None:
    """
    The restored VM runs in a new QEMU, whose channel socket is another path: a client of
    ``connect_vm_agent`` asks the driver again and carries on, with the guest's processes.
    """
    driver, name = booted_vm.driver, booted_vm.name
    client = await connect_vm_agent(reactor, driver, name, timeout=300)
    try:
        exec_id = f"restore-{os.getpid()}"
        started: Deferred[None] = Deferred()
        retained = client.exec(["sh", "-c", "echo before; sleep 20; echo after; exit 3"], exec_id=exec_id,
                               on_stdout=lambda chunk: None if started.called else started.callback(None))
        await started
        await driver.save_state(name)
        with pytest.raises(ConnectionLost, match="unknown outcome in the guest; reconnecting"):
            await retained.result()
        await driver.start(name)
        moved = await driver.agent_socket_path(name)
        print(f"agent socket before the save: {socket}, after the restore: {moved}")
        assert moved != socket
        # The command ran on through the save; its whole output waited in the guest.
        result = await _until_reconnected(lambda: client.attach(exec_id).result())
        assert (result.stdout, result.exit_code) == (b"before\nafter\n", 3)
        await client.acknowledge(exec_id)
        await _pushed_intact(client, tmp_path, "after-restore")
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_killing_qemu_in_the_middle_of_a_push_leaves_no_partial_file(
        booted_vm: Any, agent: GuestClient, credentials: Credentials, tmp_path: Path) -> None:
    """Last: it kills the guest, then boots it again."""
    driver, name = booted_vm.driver, booted_vm.name
    directory = f"/root/crash-{os.getpid()}"
    await agent.mkdir(directory)
    kept = tmp_path / "kept.bin"
    kept.write_bytes(os.urandom(2 * 1024 * 1024))
    await agent.push(str(kept), f"{directory}/kept.bin")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(64 * 1024 * 1024))
    qemu = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    killed: list[int] = []

    def progress(done: int, total: int | None) -> None:
        if done >= 4 * 1024 * 1024 and not killed:
            os.kill(qemu, signal.SIGKILL)
            killed.append(done)

    with pytest.raises(ConnectionLost, match="channel to the agent closed"):
        await agent.push(str(big), f"{directory}/big.bin", progress=progress)
    assert killed
    await agent.close()
    # A killed emulator is a crash to libvirt (stopped, reason "failed"): the driver says CRASHED.
    await driver.wait_for_state(name, VMState.CRASHED, timeout=120)
    await driver.start(name)
    path = await driver.agent_socket_path(name)  # a new one for the new QEMU
    # The same credentials: QEMU hands the guest the same fw_cfg entry at each start.
    again = await connect(reactor, UNIXClientEndpoint(reactor, path), credentials=credentials, timeout=300)
    try:
        assert [entry["name"] for entry in await again.list(directory)] == ["kept.bin"]
        digest = (await again.run(["sha256sum", f"{directory}/kept.bin"], check=True)).stdout.split()[0]
        assert digest.decode() == hashlib.sha256(kept.read_bytes()).hexdigest()
        await again.remove(directory, recursive=True)
    finally:
        await again.close()
