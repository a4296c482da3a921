"""
The hostile-guest suite: one controller (this test's reactor) serves a healthy real agent
process and, beside it, a hostile one (``fake_agent.py``, the real engine for the
handshake, then one misbehaviour).  During every misbehaviour the healthy agent's ping,
exec and push keep working at the latency measured just before (a ratio, not a
duration), the controller's buffered bytes for the hostile agent stay within its limits,
and the hostile agent ends disconnected with our error and a logged reason.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from guest_agent.protocol.connection import Limits
from guest_agent.protocol.tls import Credentials
from vmcontroller.client import ClientLimits, GuestClient, connect
from vmcontroller.credentials import mint
from vmcontroller.errors import (
    FrameTooLarge,
    IncompleteTransfer,
    IntegrityError,
    LimitExceeded,
    OperationTimeout,
    ProtocolError,
    VMControllerError,
)

FAKE_AGENT = Path(__file__).with_name("fake_agent.py")
KIB = 1024
#: The hostile agent's client: small limits, short timeouts, so each behaviour ends soon.
HOSTILE_LIMITS = Limits(max_frame=64 * KIB, window=256 * KIB, max_buffered=1024 * KIB)
HOSTILE_CLIENT_LIMITS = ClientLimits(call_timeout=4, cancel_grace=2, partial_frame_timeout=3,
                                     notification_rate=100, max_output=1024 * KIB, liveness_interval=3)
#: What the controller may hold for one agent: unread stream bytes, one frame being
#: received and one read of the transport.
BUFFER_BOUND = HOSTILE_LIMITS.max_buffered + HOSTILE_LIMITS.max_frame + 64 * KIB
#: How much slower the healthy agent's operations may get while the hostile one misbehaves.
LATENCY_RATIO = 3.0
#: Healthy rounds at least, before and during.
ROUNDS = 12


def lower_quartile(durations: list[float]) -> float:
    """
    The duration a quarter of the rounds beat, the reference for the quickest round during
    the misbehaviour.  The machine is shared (other tests' VMs under TCG): a median of a few
    rounds swings with their load, while a controller whose reactor the hostile agent
    starves is slow in every round, the quickest included.
    """
    return statistics.quantiles(durations, n=4)[0]

#: behaviour: (what the controller asks the hostile agent, the error that call must end with)
BEHAVIOURS: dict[str, tuple[str, type[Exception] | None]] = {
    "oversized": ("ping", FrameTooLarge),
    "malformed": ("ping", ProtocolError),
    "nested-json": ("ping", ProtocolError),
    "malformed-result": ("ping", ProtocolError),
    "unknown-id": ("ping", ProtocolError),
    "duplicate": ("ping", None),  # the first answer is fine; the second drops the agent
    "notify-flood": ("ping", ProtocolError),
    "trickle": ("ping", ProtocolError),
    "endless-stream": ("run", LimitExceeded),
    "pull-wrong-sha": ("pull", IntegrityError),
    "pull-wrong-size": ("pull", IncompleteTransfer),
    "silence": ("ping", OperationTimeout),
    "stalled-pull": ("pull", ProtocolError),  # a liveness ping goes unanswered
}


async def start_process(argv: list[str], socket: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` and wait until it listens on ``socket``."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(400):
        if socket.exists():
            return process
        if process.poll() is not None:
            assert process.stderr is not None
            raise AssertionError(f"{argv!r} exited: {process.stderr.read().decode()}")
        await deferLater(reactor, 0.05, lambda: None)
    stop_process(process)
    raise AssertionError(f"{argv!r} never listened on {socket}")


def private_agent_credentials(path: Path) -> Credentials:
    """Mint a VM's credentials, write the agent's end to ``path`` (0600), return the host's."""
    host, agent = mint()
    path.touch(mode=0o600)
    path.write_bytes(agent.to_json())
    return host


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GuestClient, Path]]:
    """A real agent process on a unix socket and the controller's client of it."""
    directory = tmp_path_factory.mktemp("healthy")
    socket = directory / "agent.sock"
    host_end = private_agent_credentials(directory / "credentials.json")
    argv = [sys.executable, "-m", "guest_agent", "run", "--credentials", str(directory / "credentials.json"),
            "--listen", f"unix:{socket}"]
    process = pytest_twisted.blockon(Deferred.fromCoroutine(start_process(argv, socket)))
    try:
        endpoint = UNIXClientEndpoint(reactor, str(socket))
        client = pytest_twisted.blockon(connect(reactor, endpoint, credentials=host_end, timeout=30))
        yield client, directory
        client.close()
    finally:
        stop_process(process)


async def healthy_round(client: GuestClient, directory: Path) -> float:
    """Ping, exec and push on the healthy agent; returns how long they took together."""
    started = reactor.seconds()
    assert (await client.ping())["version"]
    result = await client.run(["/bin/echo", "healthy"], check=True)
    assert result.stdout == b"healthy\n"
    data = os.urandom(64 * KIB)
    pushed = await client.push(io.BytesIO(data), str(directory / "pushed"))
    assert pushed.size == len(data) and (directory / "pushed").read_bytes() == data
    return reactor.seconds() - started


def sampling_buffered(client: GuestClient) -> list[int]:
    """Record the peak of the bytes the controller holds for ``client``'s agent."""
    peak = [0]
    receive = client._data_received

    def sampled(data: bytes) -> None:
        peak[0] = max(peak[0], client._connection.buffered + len(data))
        receive(data)
        peak[0] = max(peak[0], client._connection.buffered)

    client._data_received = sampled  # type: ignore[method-assign]
    return peak


def ask(client: GuestClient, action: str, directory: Path) -> Deferred[Any]:
    if action == "run":
        return client.run(["yes"])
    if action == "pull":
        return client.pull("/f", str(directory / "pulled"))
    return client.ping()


@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
@pytest_twisted.ensureDeferred
async def test_a_hostile_agent_hurts_neither_the_controller_nor_its_other_guests(
    behaviour: str, healthy: tuple[GuestClient, Path], tmp_path: Path
) -> None:
    client, directory = healthy
    before = lower_quartile([await healthy_round(client, directory) for _ in range(ROUNDS)])

    socket = tmp_path / "hostile.sock"
    agent_end = tmp_path / "credentials.json"
    host_end = private_agent_credentials(agent_end)
    process = await start_process(
        [sys.executable, str(FAKE_AGENT), f"unix:{socket}", behaviour, str(agent_end)], socket
    )
    disconnects: list[dict[str, Any]] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        if "Disconnecting the agent" in event.get("log_format", ""):
            disconnects.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        endpoint = UNIXClientEndpoint(reactor, str(socket))
        hostile = await connect(reactor, endpoint, timeout=30, credentials=host_end,
                                limits=HOSTILE_LIMITS, client_limits=HOSTILE_CLIENT_LIMITS)
        peak = sampling_buffered(hostile)
        action, expected = BEHAVIOURS[behaviour]
        outcome: list[Any] = []
        ask(hostile, action, tmp_path).addBoth(outcome.append)

        during: list[float] = []
        deadline = reactor.seconds() + 30  # a loop bound, not an assertion
        while (not disconnects or len(during) < ROUNDS) and reactor.seconds() < deadline:
            during.append(await healthy_round(client, directory))
        await deferLater(reactor, 0, lambda: None)
    finally:
        globalLogPublisher.removeObserver(observe)
        stop_process(process)

    # The hostile agent was disconnected with our error and a logged reason ...
    assert [event["log_source"] for event in disconnects] == [hostile], disconnects
    assert isinstance(disconnects[0]["error"], VMControllerError)
    assert hostile._transport is None
    (result,) = outcome
    if expected is None:
        assert result["version"] == "hostile"
    else:
        error = getattr(result, "value", result)
        assert isinstance(error, expected), error
    # A failed pull left nothing behind, not even its temporary file.
    assert [name for name in os.listdir(tmp_path) if name not in ("hostile.sock", agent_end.name)] == []
    # The reference brackets the hostile period: the machine's load changes over minutes.
    after = lower_quartile([await healthy_round(client, directory) for _ in range(ROUNDS)])
    baseline = max(before, after)
    ratio = min(during) / baseline
    print(f"{behaviour}: peak {peak[0]} bytes held (bound {BUFFER_BOUND}); healthy rounds {len(during)}, "
          f"quickest {ratio:.2f} x the baseline ({baseline * 1000:.1f} ms)")
    # ... the controller held no more for it than its limits allow ...
    assert peak[0] <= BUFFER_BOUND, (peak[0], BUFFER_BOUND)
    # ... and the healthy agent kept being served at the latency of before.
    assert ratio <= LATENCY_RATIO, (during, baseline)
