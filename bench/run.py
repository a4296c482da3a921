"""
One benchmark run: boot a guest with an extra virtio-serial port, reach its agent, time
ping and exec through the agent, push and pull in rounds beside the same work done by C
tools in the guest on the extra port (:mod:`bench.ctools`), then a bare echo on that port:
the references the agent's figures are compared with. The peer, the QEMU guest agent, runs
in the same guest (its image has ``qemu-guest-agent``) and is measured in turn with ours
(:mod:`bench.qga`).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, race
from twisted.internet.endpoints import UNIXClientEndpoint

from bench.ctools import PULL_WAYS, PUSH_WAYS, TransferRound, median_rate, reference_pull, reference_push
from bench.echo import EchoClient, connect_echo, echo_rtt, echo_throughput, wait_until_echoing
from bench.qga import (
    BENCH_QGA_CHANNEL,
    BENCH_QGA_UNIT,
    QGA_CHANNEL,
    QGA_PACKAGE,
    QGA_UNIT,
    QGAClient,
    QGAError,
    QGAFigures,
    connect_qga,
    qga_exec,
    qga_pull,
    qga_push,
)
from bench.stats import MB, Latency, Throughput
from hypervisors import load_driver
from hypervisors.interface import Accel, IHypervisorDriver, VMState
from hypervisors.libvirt import LibvirtDriver
from vmcontroller.client import ExecHandle, GuestClient, connect
from vmcontroller.errors import OperationCancelled, VMControllerError
from vmcontroller.images import build_image
from vmcontroller.machine import connect_vm_agent

__all__ = [
    "AUTH_RATIO_MIN",
    "DEVELOPMENT_CHANNEL",
    "ECHO_CHANNEL",
    "EXEC_MEDIAN_MAX",
    "PING_RATIO_MAX",
    "QGA_SPEEDUP_MIN",
    "TRANSFER_RATIO_MIN",
    "BenchError",
    "DevelopmentMode",
    "Results",
    "Settings",
    "measure",
    "run",
]

ECHO_CHANNEL = "org.vmcontroller.echo.0"
#: A third port, for an agent in development mode (no TLS) beside the authenticated one.
DEVELOPMENT_CHANNEL = "org.vmcontroller.dev.0"
DEVELOPMENT_UNIT = "vmc-bench-development-agent"
#: What ``openssl speed`` measures in the guest: the AEADs of TLS 1.3 and the suites' hash.
OPENSSL_ALGORITHMS = ("aes-256-gcm", "aes-128-gcm", "chacha20-poly1305", "sha384")
#: A virtio-serial port admits one opener, so one read-write descriptor serves both ways.
ECHO_COMMAND = ["sh", "-c", f"exec 3<>/dev/virtio-ports/{ECHO_CHANNEL}; exec cat <&3 >&3"]
GUEST_FILE = "/root/bench.bin"
#: Where qemu-ga's push puts its copy (and its pull reads it back).
GUEST_QGA_FILE = "/root/bench-qga.bin"
#: Where the C-tools reference push puts its copy (and its pull reads it back).
GUEST_REFERENCE_FILE = "/root/bench-reference.bin"
MIB = 1024 * 1024
#: Seconds the echo gets to exit by itself once its host end is closed.
ECHO_EXIT_TIMEOUT = 10.0

#: The project's targets.
PING_RATIO_MAX = 3.0
TRANSFER_RATIO_MIN = 0.60
EXEC_MEDIAN_MAX = 0.030
#: Push and pull with authentication, at least this share of their rate without.
AUTH_RATIO_MIN = 0.80
#: The peer to beat, the QEMU guest agent: each operation at least this many times faster.
QGA_SPEEDUP_MIN = 1.0

Say = Callable[[str], None]


class BenchError(VMControllerError):
    """The benchmark could not measure something (not: a target was missed)."""


@dataclass(frozen=True)
class Settings:
    name: str = "vmc-bench"
    driver: str = "libvirt"
    uri: str | None = None
    accel: Accel = "auto"
    #: Virtual CPUs of the guest; None: the VMSpec default.
    vcpus: int | None = None
    pings: int = 200
    execs: int = 50
    #: Untimed operations before each timed series (connection set-up, page cache, JIT-less
    #: Python's first-call costs in the agent).
    warmup: int = 5
    #: Pings or execs through one agent before the next agent's turn. One at a time, every
    #: request in the single guest vCPU follows one to another agent process and starts
    #: cold (under TCG a context switch also empties QEMU's software TLB): that measured
    #: the switch, twice the latency of a series, for the C qemu-ga and ours alike.
    block: int = 10
    transfer_size: int = 64 * MIB
    #: qemu-ga's push and pull, each round: smaller, as qemu-ga moves bytes as base64 in JSON
    #: and is slow at it; rates compare.
    qga_transfer_size: int = 16 * MIB
    #: Rounds of push, reference push, pull, reference pull; ratios are per round, then the median.
    rounds: int = 3
    echo_messages: int = 200
    echo_message_size: int = 64
    echo_size: int = 64 * MIB
    echo_chunk: int = 256 * 1024
    #: Bytes in flight for the echo: the protocol's default stream window, so the raw path
    #: gets no more buffering than the agent's streams do.
    echo_window: int = 4 * MIB
    boot_timeout: float = 600.0
    #: Per wait in the echo and per transfer; generous because TCG is slow.
    step_timeout: float = 600.0
    keep: bool = False
    reuse: bool = False


@dataclass(frozen=True)
class DevelopmentMode:
    """
    The same operations through a second agent in the same guest, started with
    ``--development`` (no authentication, no TLS) on its own virtio-serial port, measured in
    turn with the authenticated agent's (pings and execs in blocks, transfer by transfer, so
    that the load of a shared host falls on both alike): what the authentication costs.
    """

    ping: Latency
    exec_true: Latency
    push: Throughput
    pull: Throughput


@dataclass(frozen=True)
class Results:
    vm: str
    #: What the guest says it runs on (``systemd-detect-virt``): ``qemu`` is TCG.
    virtualization: str
    agent: dict[str, Any]
    settings: Settings
    ping: Latency
    exec_true: Latency
    #: The agent's push and pull: the rounds' median rates.
    push: Throughput
    pull: Throughput
    echo_rtt: Latency
    echo_bulk: Throughput
    sha256: str
    #: The guest kernel's command line: under TCG it shows ``norandmaps`` (see VMSpec.tcg_cmdline),
    #: which the exec figure depends on.
    guest_cmdline: str = ""
    #: Seconds from the start of the wait (right after the VM was started, or found running)
    #: to the agent's answer; None when not measured.
    boot_to_agent: float | None = None
    #: The TLS cipher suite of the measured (authenticated) session.
    tls_cipher: str | None = None
    #: The same operations without authentication; None when not measured.
    development: DevelopmentMode | None = None
    #: ``openssl speed -evp`` in the guest, bytes per second on 16 KiB blocks (a TLS record's
    #: size), by algorithm: what bounds the guest's side of an authenticated transfer.
    guest_openssl: dict[str, float] = field(default_factory=dict)
    #: Each round's push and pull beside the C-tools reference (bench.ctools).
    transfer_rounds: tuple[TransferRound, ...] = ()
    #: The QEMU guest agent's figures, in turn with ours; None when not measured.
    qga: QGAFigures | None = None

    @property
    def qga_speedups(self) -> dict[str, float] | None:
        """How many times faster ours is than qemu-ga: time over time, or rate over rate."""
        if self.qga is None:
            return None
        return {
            "ping": self.qga.ping.median / self.ping.median,
            "exec_true": self.qga.exec_true.median / self.exec_true.median,
            "push": self.push.mb_per_s / self.qga.push.mb_per_s,
            "pull": self.pull.mb_per_s / self.qga.pull.mb_per_s,
        }

    @property
    def push_reference(self) -> Throughput:
        return median_rate([r.push_reference for r in self.transfer_rounds])

    @property
    def pull_reference(self) -> Throughput:
        return median_rate([r.pull_reference for r in self.transfer_rounds])

    @property
    def push_over_reference(self) -> float:
        """The median of the rounds' push / reference push."""
        return statistics.median(r.push_ratio for r in self.transfer_rounds)

    @property
    def pull_over_reference(self) -> float:
        """The median of the rounds' pull / reference pull."""
        return statistics.median(r.pull_ratio for r in self.transfer_rounds)

    @property
    def ping_ratio(self) -> float:
        return self.ping.median / self.echo_rtt.median

    @property
    def push_ratio(self) -> float:
        return self.push.mb_per_s / self.echo_bulk.mb_per_s

    @property
    def pull_ratio(self) -> float:
        return self.pull.mb_per_s / self.echo_bulk.mb_per_s

    @property
    def auth_push_ratio(self) -> float | None:
        """Push with authentication over push without (development mode)."""
        return None if self.development is None else self.push.mb_per_s / self.development.push.mb_per_s

    @property
    def auth_pull_ratio(self) -> float | None:
        return None if self.development is None else self.pull.mb_per_s / self.development.pull.mb_per_s

    def verdicts(self) -> dict[str, bool]:
        verdicts = {
            "ping_ratio": self.ping_ratio <= PING_RATIO_MAX,
            "exec_median": self.exec_true.median <= EXEC_MEDIAN_MAX,
            "push_over_reference": self.push_over_reference >= TRANSFER_RATIO_MIN,
            "pull_over_reference": self.pull_over_reference >= TRANSFER_RATIO_MIN,
        }
        if self.auth_push_ratio is not None and self.auth_pull_ratio is not None:
            verdicts["auth_push_ratio"] = self.auth_push_ratio >= AUTH_RATIO_MIN
            verdicts["auth_pull_ratio"] = self.auth_pull_ratio >= AUTH_RATIO_MIN
        for operation, speedup in (self.qga_speedups or {}).items():
            verdicts[f"faster_than_qga_{operation}"] = speedup >= QGA_SPEEDUP_MIN
        return verdicts

    def as_dict(self) -> dict[str, Any]:
        """Everything, with times in seconds and rates in MB/s (10**6 bytes)."""
        data = asdict(self)
        for name in ("push", "pull", "echo_bulk"):
            data[name]["mb_per_s"] = getattr(self, name).mb_per_s
        for figures in data["transfer_rounds"]:
            for figure in (figures["push"], figures["pull"], *figures["push_ways"].values(),
                           *figures["pull_ways"].values()):
                figure["mb_per_s"] = figure["size"] / MB / figure["seconds"]
        data["push_reference"] = {**asdict(self.push_reference), "mb_per_s": self.push_reference.mb_per_s}
        data["pull_reference"] = {**asdict(self.pull_reference), "mb_per_s": self.pull_reference.mb_per_s}
        data["echo_bulk"]["definition"] = "bytes echoed / time (each byte counted once)"
        data["ratios"] = {
            "ping_rtt_over_echo_rtt": self.ping_ratio,
            "push_over_echo": self.push_ratio,
            "pull_over_echo": self.pull_ratio,
            "push_authenticated_over_development": self.auth_push_ratio,
            "pull_authenticated_over_development": self.auth_pull_ratio,
            "push_over_reference": self.push_over_reference,
            "pull_over_reference": self.pull_over_reference,
        }
        data["targets"] = {
            "ping_rtt_over_echo_rtt_max": PING_RATIO_MAX,
            "transfer_over_reference_min": TRANSFER_RATIO_MIN,
            "exec_median_max_s": EXEC_MEDIAN_MAX,
            "transfer_authenticated_over_development_min": AUTH_RATIO_MIN,
            "ours_faster_than_qga_min": QGA_SPEEDUP_MIN,
        }
        if self.development is not None:
            for name in ("push", "pull"):
                data["development"][name]["mb_per_s"] = getattr(self.development, name).mb_per_s
        if self.qga is not None:
            for name in ("push", "pull"):
                data["qga"][name]["mb_per_s"] = getattr(self.qga, name).mb_per_s
            data["ratios"]["ours_faster_than_qga"] = self.qga_speedups
        data["met"] = self.verdicts()
        return data


# ---- measurements -----------------------------------------------------------------------


async def _series(
    count: int, warmup: int, block: int, operations: Sequence[Callable[[], Deferred[Any]]]
) -> list[Latency]:
    """
    Time each of ``operations`` ``count`` times, taking turns ``block`` operations at a time
    (in alternating order), so that what the loaded host does to the guest falls on all of
    them alike, while each is measured in a series, as a caller's series of requests runs.
    """
    for once in operations:
        for _ in range(warmup):
            await once()
    samples: list[list[float]] = [[] for _ in operations]
    for turn, first in enumerate(range(0, count, block)):
        order = range(len(operations)) if turn % 2 == 0 else reversed(range(len(operations)))
        for index in order:
            for _ in range(min(block, count - first)):
                began = time.perf_counter()
                await operations[index]()
                samples[index].append(time.perf_counter() - began)
    return [Latency.of(taken) for taken in samples]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _random_file(path: str, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for offset in range(0, size, MIB):
            piece = os.urandom(min(MIB, size - offset))
            digest.update(piece)
            f.write(piece)
    return digest.hexdigest()


async def _agent_push_pull(
    client: GuestClient, source: str, back: str, local: str, size: int
) -> tuple[Throughput, Throughput]:
    began = time.perf_counter()
    pushed = await client.push(source, GUEST_FILE)
    push = Throughput(pushed.size, time.perf_counter() - began)
    began = time.perf_counter()
    pulled = await client.pull(GUEST_FILE, back)
    pull = Throughput(pulled.size, time.perf_counter() - began)
    returned = _sha256(back)
    if not local == pushed.sha256 == pulled.sha256 == returned:
        raise BenchError(
            f"the file changed on its round trip: sha256 sent {local}, stored {pushed.sha256}, "
            f"pulled {pulled.sha256}, received {returned}"
        )
    if pushed.size != size or pulled.size != size:
        raise BenchError(f"moved {pushed.size} and {pulled.size} bytes, not {size}")
    return push, pull


#: A push and a pull.
Moved = tuple[Throughput, Throughput]


async def _qga_push_pull(qga: QGAClient, source: str, back: str, local: str, size: int) -> Moved:
    push, pushed = await qga_push(qga, source, GUEST_QGA_FILE)
    pull, pulled = await qga_pull(qga, GUEST_QGA_FILE, back, size)
    if not local == pushed == pulled:
        raise BenchError(
            f"qemu-ga changed the file on its round trip: sha256 sent {local}, got back {pulled}"
        )
    if push.size != size or pull.size != size:
        raise BenchError(f"qemu-ga moved {push.size} and {pull.size} bytes, not {size}")
    return push, pull


async def _transfers(
    reactor: Any,
    clients: Sequence[GuestClient],
    driver: IHypervisorDriver,
    settings: Settings,
    say: Say,
    qga: QGAClient | None,
) -> tuple[tuple[TransferRound, ...], list[Moved], list[Moved], str]:
    """
    ``settings.rounds`` rounds of each agent's push (taking turns, in alternate order), the
    C-tools reference push, each agent's pull and the reference pull, of the same bytes, and
    qemu-ga's push and pull of ``settings.qga_transfer_size`` bytes.
    The rounds hold the first (authenticated) agent's figures; the first list, the other
    agents'; the second, qemu-ga's.
    """
    size = settings.transfer_size
    port = await _echo_socket_path(driver, settings.name)
    device = f"/dev/virtio-ports/{ECHO_CHANNEL}"
    rounds = []
    others: list[Moved] = []
    qga_moves: list[Moved] = []
    with tempfile.TemporaryDirectory(prefix="vmc-bench-") as scratch:
        source = os.path.join(scratch, "bench.bin")
        local = _random_file(source, size)
        back = os.path.join(scratch, "back.bin")
        qga_source = os.path.join(scratch, "qga.bin")
        qga_local = _random_file(qga_source, settings.qga_transfer_size) if qga is not None else ""
        for number in range(1, settings.rounds + 1):
            say(f"round {number}/{settings.rounds}: push {size / MIB:g} MiB to {GUEST_FILE}, pull it back, "
                f"each followed by C tools in the guest on {ECHO_CHANNEL}")
            order = range(len(clients)) if number % 2 else reversed(range(len(clients)))
            moved = {i: await _agent_push_pull(clients[i], source, back, local, size) for i in order}
            first = clients[0]
            push_ways = {
                way: await reference_push(reactor, first, port, device, source, local, GUEST_REFERENCE_FILE,
                                          settings.step_timeout, way)
                for way in PUSH_WAYS
            }
            pull_ways = {
                way: await reference_pull(reactor, first, port, device, GUEST_REFERENCE_FILE, size, local,
                                          back, settings.step_timeout, way)
                for way in PULL_WAYS
            }
            if qga is not None:
                say(f"round {number}/{settings.rounds}: qemu-ga's push and pull of "
                    f"{settings.qga_transfer_size / MIB:g} MiB to {GUEST_QGA_FILE}")
                qga_moves.append(
                    await _qga_push_pull(qga, qga_source, back, qga_local, settings.qga_transfer_size)
                )
            push, pull = moved[0]
            rounds.append(TransferRound(push, pull, push_ways, pull_ways))
            others.extend(moved[index] for index in range(1, len(clients)))
    await clients[0].remove(GUEST_FILE)
    await clients[0].remove(GUEST_REFERENCE_FILE)
    if qga is not None:
        await clients[0].remove(GUEST_QGA_FILE)
    return tuple(rounds), others, qga_moves, local


def _outcome(d: Deferred[Any]) -> Deferred[None]:
    """
    A Deferred that fires with None when ``d`` succeeds or fails and never fails itself,
    for :func:`race`, which otherwise waits on for a success; ``d``'s result stays with it.
    """
    seen: Deferred[None] = Deferred()

    def fire(outcome: Any) -> Any:
        if not seen.called:
            seen.callback(None)
        return outcome

    d.addBoth(fire)
    return seen


async def _stop_echo(reactor: Any, echo: EchoClient, handle: ExecHandle, say: Say) -> None:
    """
    Closing the host end makes the guest's read return end-of-file, so ``cat`` exits by
    itself; if it has not within a few seconds, the timeout cancels the exec (cancelling
    a Deferred of an :class:`ExecHandle` makes the agent kill the process group).
    """
    echo.close()
    try:
        await handle.exited.addTimeout(ECHO_EXIT_TIMEOUT, reactor)
    except (defer.TimeoutError, CancelledError, OperationCancelled):
        say("the echo did not end at end-of-file: cancelled it")
    except VMControllerError as e:
        raise BenchError(f"the guest echo {ECHO_COMMAND} failed: {e}") from e


async def _start_echo(reactor: Any, client: GuestClient, echo: EchoClient, timeout: float) -> ExecHandle:
    """Start the echo in the guest; return once a probe has come back through it."""
    handle = client.exec(ECHO_COMMAND)
    ready = Deferred.fromCoroutine(wait_until_echoing(echo, reactor, timeout))
    ended = handle.exited
    ended_early = _outcome(ended)
    ended.addErrback(lambda failure: None)  # read again below, from a fresh Deferred
    await race([_outcome(ready), ended_early])
    if not ready.called:
        ready.cancel()
        ready.addErrback(lambda failure: None)
        try:
            result = await handle.exited
        except VMControllerError as e:
            raise BenchError(f"the guest echo {ECHO_COMMAND} failed: {e}") from e
        raise BenchError(f"the guest echo {ECHO_COMMAND} ended before echoing anything: {result}")
    try:
        await ready
    except BaseException:
        await _stop_echo(reactor, echo, handle, lambda message: None)
        raise
    return handle


async def _echo_socket_path(driver: IHypervisorDriver, name: str) -> str:
    # The raw echo runs on an extra virtio-serial port, not the agent's channel: only the
    # libvirt driver hands out such a port (its host socket).
    if not isinstance(driver, LibvirtDriver):
        raise BenchError(
            f"the raw echo needs the libvirt driver's extra virtio-serial ports, not {driver.name}'s"
        )
    return await driver.agent_socket_path(name, channel=ECHO_CHANNEL)


async def _raw_echo(
    reactor: Any, client: GuestClient, driver: IHypervisorDriver, settings: Settings, say: Say
) -> tuple[Latency, Throughput]:
    path = await _echo_socket_path(driver, settings.name)
    # The host end first: a port whose host side is closed reads as end-of-file in the guest.
    echo = await connect_echo(reactor, path)
    say(f"start the echo on {ECHO_CHANNEL} in the guest (host end {path})")
    handle = await _start_echo(reactor, client, echo, settings.step_timeout)
    try:
        say(f"echo {settings.echo_messages} x {settings.echo_message_size} B")
        await echo_rtt(echo, reactor, settings.warmup, settings.echo_message_size, settings.step_timeout)
        samples = await echo_rtt(
            echo, reactor, settings.echo_messages, settings.echo_message_size, settings.step_timeout
        )
        say(f"echo {settings.echo_size / MIB:g} MiB")
        bulk = await echo_throughput(
            echo,
            reactor,
            settings.echo_size,
            settings.echo_chunk,
            settings.echo_window,
            settings.step_timeout,
        )
    finally:
        await _stop_echo(reactor, echo, handle, say)
    return Latency.of(samples), bulk


async def _qga_exec_true(qga: QGAClient, polls: list[int]) -> None:
    code, count = await qga_exec(qga, ["/bin/true"])
    if code != 0:
        raise BenchError(f"/bin/true through qemu-ga ended with exit code {code}")
    polls.append(count)


async def _operations(
    clients: Sequence[GuestClient], settings: Settings, say: Say, qga: QGAClient | None
) -> tuple[list[Latency], list[Latency], list[int]]:
    """
    Ping and exec through each of ``clients`` (one agent each) and qemu-ga (last in the
    lists), taking turns operation by operation; and qemu-ga's polls per exec.
    """
    pings_of = [client.ping for client in clients]
    execs_of: list[Callable[[], Deferred[Any]]] = [
        partial(client.run, ["/bin/true"], check=True) for client in clients
    ]
    polls: list[int] = []
    if qga is not None:
        pings_of.append(qga.ping)
        execs_of.append(lambda: Deferred.fromCoroutine(_qga_exec_true(qga, polls)))
    say(f"ping x {settings.pings}" + (" through each agent in turn" if len(pings_of) > 1 else ""))
    pings = await _series(settings.pings, settings.warmup, settings.block, pings_of)
    say(f"exec /bin/true x {settings.execs}")
    execs = await _series(settings.execs, settings.warmup, settings.block, execs_of)
    return pings, execs, polls


async def _extra_port(
    driver: IHypervisorDriver, settings: Settings, channel: str, comparison: str, say: Say
) -> str | None:
    """The host end of the VM's extra port ``channel``; None, and why, when it has none."""
    if not isinstance(driver, LibvirtDriver):
        say(f"the {driver.name} driver has no extra virtio-serial port: no comparison with {comparison}")
        return None
    try:
        return await driver.agent_socket_path(settings.name, channel=channel)
    except VMControllerError:
        say(f"the VM has no {channel} port: no comparison with {comparison}")
        return None


async def _start_qga(
    reactor: Any, client: GuestClient, driver: IHypervisorDriver, settings: Settings, say: Say
) -> QGAClient | None:
    """
    qemu-ga on the bench's port, connected; None when the VM or its image has none. Checks
    first that the package's own unit runs on the standard port, as in any libvirt guest.
    """
    path = await _extra_port(driver, settings, BENCH_QGA_CHANNEL, "the QEMU guest agent", say)
    if path is None:
        return None
    packaged = await client.run(["systemctl", "is-active", QGA_UNIT])
    state = packaged.stdout.decode(errors="replace").strip()
    if state != "active":
        raise BenchError(
            f"{QGA_UNIT} is {state!r} in the guest, not active on {QGA_CHANNEL}: the image's "
            f"{QGA_PACKAGE} does not start as it does in any libvirt guest (udev starts it)"
        )
    say(f"{QGA_UNIT} runs on {QGA_CHANNEL} (libvirt's); start qemu-ga on {BENCH_QGA_CHANNEL} to measure it")
    # The package's command with the bench's port, and a state directory of its own (qemu-ga
    # keeps its file handle counter there; the packaged one uses /var/run).
    await _run_unit(
        client, BENCH_QGA_UNIT,
        ["-p", f"RuntimeDirectory={BENCH_QGA_UNIT}",
         "/usr/sbin/qemu-ga", "--method", "virtio-serial", "--path", f"/dev/virtio-ports/{BENCH_QGA_CHANNEL}",
         "--statedir", f"/run/{BENCH_QGA_UNIT}"],
    )
    try:
        return await connect_qga(reactor, path, timeout=120)
    except BaseException:
        await client.run(["systemctl", "stop", BENCH_QGA_UNIT])
        raise


async def _start_development_agent(
    reactor: Any, client: GuestClient, driver: IHypervisorDriver, settings: Settings, say: Say
) -> GuestClient | None:
    """An agent in development mode on the third port, connected; None when there is none."""
    path = await _extra_port(driver, settings, DEVELOPMENT_CHANNEL, "development mode", say)
    if path is None:
        return None
    say(f"start an agent in development mode on {DEVELOPMENT_CHANNEL}")
    await _run_unit(
        client, DEVELOPMENT_UNIT,
        ["/usr/bin/python3", "-m", "guest_agent", "run", "--development",
         "--virtio-port", DEVELOPMENT_CHANNEL],
    )
    try:
        return await connect(reactor, UNIXClientEndpoint(reactor, path), development=True, timeout=120)
    except BaseException:
        await client.run(["systemctl", "stop", DEVELOPMENT_UNIT])
        raise


async def _run_unit(client: GuestClient, unit: str, arguments: list[str]) -> None:
    """Run ``arguments`` (systemd-run's) in the guest as the transient ``unit``."""
    await client.run(["systemctl", "stop", unit])  # one left by a run with --keep
    await client.run(["systemctl", "reset-failed", unit])
    await client.run(["systemd-run", "--unit", unit, *arguments], check=True)


def parse_openssl_speed(output: str) -> dict[str, float]:
    """
    Bytes per second by algorithm from ``openssl speed -mr`` lines, ``+F:n:name:rate...``
    (one rate per block size asked for; the last one is taken).
    """
    rates = {}
    for line in output.splitlines():
        fields = line.strip().split(":")
        if fields[0] == "+F" and len(fields) >= 4:
            rates[fields[2].lower()] = float(fields[-1])
    return rates


async def _guest_openssl(client: GuestClient, say: Say) -> dict[str, float]:
    rates: dict[str, float] = {}
    for algorithm in OPENSSL_ALGORITHMS:
        say(f"openssl speed {algorithm} in the guest")
        result = await client.run(
            ["openssl", "speed", "-mr", "-seconds", "2", "-bytes", "16384", "-evp", algorithm]
        )
        rates.update(parse_openssl_speed(result.stdout.decode(errors="replace")))
    return rates


async def measure(
    reactor: Any, client: GuestClient, driver: IHypervisorDriver, settings: Settings, say: Say
) -> Results:
    """Every measurement, on an agent that is connected and a VM that has the echo port."""
    virt = await client.run(["systemd-detect-virt"])
    virtualization = virt.stdout.decode(errors="replace").strip() or "unknown"
    cmdline = (await client.run(["cat", "/proc/cmdline"], check=True)).stdout.decode(errors="replace").strip()
    insecure = await _start_development_agent(reactor, client, driver, settings, say)
    clients = [client] if insecure is None else [client, insecure]
    qga: QGAClient | None = None
    try:
        qga = await _start_qga(reactor, client, driver, settings, say)
        if insecure is not None:
            say("every operation with authentication and through the development-mode agent, in turn"
                + (", and through qemu-ga" if qga is not None else ""))
        pings, execs, qga_polls = await _operations(clients, settings, say, qga)
        rounds, development_moves, qga_moves, digest = await _transfers(
            reactor, clients, driver, settings, say, qga
        )
        qga_figures = None
        if qga is not None:
            info = await qga.command("guest-info")
            qga_figures = QGAFigures(
                version=str(info.get("version", "?")),
                ping=pings[-1],
                exec_true=execs[-1],
                exec_polls=sum(qga_polls) / len(qga_polls),
                push=median_rate([push for push, _ in qga_moves]),
                pull=median_rate([pull for _, pull in qga_moves]),
            )
    except QGAError as e:
        raise BenchError(f"measuring the QEMU guest agent: {e}") from e
    finally:
        if insecure is not None:
            insecure.close()
            await client.run(["systemctl", "stop", DEVELOPMENT_UNIT])
        if qga is not None:
            qga.close()
            await client.run(["systemctl", "stop", BENCH_QGA_UNIT])
    development = (
        None
        if insecure is None
        else DevelopmentMode(
            pings[1],
            execs[1],
            median_rate([push for push, _ in development_moves]),
            median_rate([pull for _, pull in development_moves]),
        )
    )
    echo_rtt_, echo_bulk = await _raw_echo(reactor, client, driver, settings, say)
    guest_openssl = await _guest_openssl(client, say)
    return Results(
        vm=settings.name,
        virtualization=virtualization,
        guest_cmdline=cmdline,
        agent=dict(client.agent_hello),
        settings=settings,
        ping=pings[0],
        exec_true=execs[0],
        push=median_rate([r.push for r in rounds]),
        pull=median_rate([r.pull for r in rounds]),
        echo_rtt=echo_rtt_,
        echo_bulk=echo_bulk,
        sha256=digest,
        transfer_rounds=rounds,
        tls_cipher=client.tls_cipher,
        development=development,
        guest_openssl=guest_openssl,
        qga=qga_figures,
    )


# ---- the VM around it --------------------------------------------------------------------


async def _prepare_vm(reactor: Any, driver: IHypervisorDriver, settings: Settings, say: Say) -> None:
    name = settings.name
    existing = name in await driver.list_vms()
    if existing and settings.reuse and (await driver.state(name)) is VMState.RUNNING:
        try:
            await _echo_socket_path(driver, name)
        except VMControllerError:
            say(f"VM {name} runs but has no {ECHO_CHANNEL} port: redefining it")
        else:
            say(f"reuse the running VM {name}")
            return
    say(f"build or reuse the bench's guest image (ours, with {QGA_PACKAGE})")
    image = await build_image(reactor, extra_packages=(QGA_PACKAGE,))
    if existing:
        say(f"remove the VM {name} left by an earlier run")
        await driver.undefine(name)
    overrides: dict[str, Any] = {} if settings.vcpus is None else {"vcpus": settings.vcpus}
    spec = image.vm_spec(
        name,
        accel=settings.accel,
        extra_channels=(ECHO_CHANNEL, DEVELOPMENT_CHANNEL, QGA_CHANNEL, BENCH_QGA_CHANNEL),
        **overrides,
    )
    ports = ", ".join(spec.extra_channels)
    say(f"define {name} (accel={settings.accel}, vcpus={spec.vcpus}) with the extra ports {ports}")
    await driver.define(spec)
    say("boot it")
    await driver.start(name)


async def run(reactor: Any, settings: Settings, say: Say) -> Results:
    """Boot (or reuse) the VM, measure, and remove the VM unless ``settings.keep``."""
    options = {"uri": settings.uri} if settings.uri else {}
    driver = load_driver(settings.driver, reactor, **options)
    driver.startService()  # type: ignore[attr-defined]
    try:
        await _prepare_vm(reactor, driver, settings, say)
        try:
            say("wait for the guest agent")
            began = time.perf_counter()
            client = await connect_vm_agent(reactor, driver, settings.name, timeout=settings.boot_timeout)
            boot = time.perf_counter() - began
            say(f"agent answered after {boot:.1f} s")
            try:
                return replace(await measure(reactor, client, driver, settings, say), boot_to_agent=boot)
            finally:
                client.close()
        finally:
            if not settings.keep:
                say(f"remove the VM {settings.name}")
                await driver.undefine(settings.name)
    finally:
        await driver.stopService()  # type: ignore[attr-defined]
