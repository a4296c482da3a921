"""
``python -m bench.scale``: how many agents one controller serves.

For each N, starts N agents as host processes (no VM: ``--per-process`` agents in each, every
agent on a unix socket of its own, running the real agent code and operations), connects one
controller (this process) to all of them, then runs a mixed load for ``--duration`` seconds:
operations arrive at ``--rate`` per second per agent on average (one Poisson process over all
the agents, each arrival on an agent drawn at random, without waiting for the agent's last
operation to end: an open loop, see :func:`_load`), 80 % ping, 10 % exec of ``/bin/true``,
5 % push and 5 % pull of 4 KiB. Prints, per N, the
throughput, p50/p99 latency per operation, and the controller's resident memory per
connected agent (RSS after connecting, minus RSS before, over N); and, to judge the
latencies on a machine others load too: the controller's CPU time per operation (its cost,
which the machine's load hardly changes), the controller's and the agents' processes' share
of a CPU during the load, the p99 lag of the controller's reactor (how late a timer set
every 10 ms fires: the controller's own delay, beside which a larger p99 ping is the
agents' or the machine's), and the machine's load average at the start and the end.

The files pushed and pulled live on a tmpfs (``/dev/shm``) where there is one: the bench
measures the controller, not the host's disk (whose fsync and rename, measured on a loaded
disk, cost the controller and the agents more than their protocol work).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater, react

from bench.stats import Latency, percentile
from guest_agent.protocol.tls import Credentials
from vmcontroller.client import GuestClient, connect
from vmcontroller.credentials import mint

__all__ = ["ScaleResult", "main", "measure"]

#: The operations of the mixed load and their shares.
MIX: tuple[tuple[str, float], ...] = (("ping", 0.80), ("exec", 0.10), ("push", 0.05), ("pull", 0.05))
SMALL_FILE = os.urandom(4096)
#: The agents' end of the credentials, in the run's directory (never on a command line).
AGENT_CREDENTIALS = "agent.json"
#: Targets of the project (issue 8): p99 ping under the mixed load, memory per agent.
PING_P99_MAX = 0.020
MEMORY_PER_AGENT_MAX = 200 * 1024


@dataclass(frozen=True)
class ScaleResult:
    agents: int
    connect_seconds: float
    operations: int
    errors: int
    throughput: float
    latency: dict[str, Latency]
    memory_per_agent: float
    #: The controller's CPU time during the load over the load's wall time (1.0: one core busy).
    controller_cpu: float
    #: The same for the agents' processes together.
    agents_cpu: float
    #: The controller's CPU seconds per operation done.
    controller_cpu_per_op: float
    #: p99 of how late the controller's reactor ran a timer due every 10 ms, in seconds.
    reactor_lag_p99: float
    #: The machine's 1-minute load average when the load started and when it ended.
    load_average: tuple[float, float]


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu_seconds(pid: int) -> float:
    """User and system time of a running child (``/proc/PID/stat``, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _scratch_directory() -> Path:
    """A directory for the agents' sockets and files, on a tmpfs where there is one."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="vmc-scale-", dir=shm if shm.is_dir() else None))


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the agents' side: one process serving many agents -------------------------------------


def serve_agents(directory: Path, first: int, count: int) -> None:
    """
    Listen as ``count`` agents on ``directory/agent-<i>.sock``, authenticated with the agent's
    end of the credentials in ``directory/agent.json``; print ``ready`` once listening.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXServerEndpoint

    from guest_agent.config import TCPLimits
    from guest_agent.ops import OPERATIONS
    from guest_agent.protocol.tls import Authenticator
    from guest_agent.transports import AgentFactory

    _raise_fd_limit()
    credentials = Credentials.from_json((directory / AGENT_CREDENTIALS).read_bytes())
    # One factory stands for ``count`` agents, each with one host: the TCP limits of one
    # agent (connections at once, handshake time under this load) do not apply.
    tcp = TCPLimits(handshake_timeout=600, max_connections=count)
    factory = AgentFactory(
        reactor,
        OPERATIONS,
        hello={"software": "bench.scale"},
        tcp=tcp,
        authenticator=Authenticator.from_credentials(credentials, server_side=True),
    )
    listening = [
        UNIXServerEndpoint(reactor, str(directory / f"agent-{i}.sock")).listen(factory)
        for i in range(first, first + count)
    ]

    def ready(_: object) -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    defer.gatherResults(listening).addCallback(ready)
    reactor.run()


class _AgentsProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._out = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if b"ready\n" in self._out and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        sys.stderr.write(data.decode(errors="replace"))

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"agent process ended before listening: {reason.value}"))
        self.ended.callback(None)


# -- the controller's side -----------------------------------------------------------------


async def _one_op(client: GuestClient, op: str, files: Path, index: int) -> None:
    if op == "ping":
        await client.ping()
    elif op == "exec":
        await client.run(["/bin/true"], check=True)
    elif op == "push":
        source = files / f"in-{index}"
        await client.push(str(source), str(files / f"guest-{index}"))
    else:
        await client.pull(str(files / f"guest-{index}"), str(files / f"out-{index}"))


async def _timed(
    reactor: Any,
    client: GuestClient,
    op: str,
    files: Path,
    index: int,
    samples: dict[str, list[float]],
    errors: list[BaseException],
) -> None:
    started = reactor.seconds()
    try:
        await _one_op(client, op, files, index)
    except Exception as e:
        errors.append(e)
        return
    samples[op].append(reactor.seconds() - started)


async def _load(
    reactor: Any,
    clients: Sequence[GuestClient],
    files: Path,
    rate: float,
    until: float,
    rng: random.Random,
    samples: dict[str, list[float]],
    errors: list[BaseException],
) -> None:
    """
    The mixed load until ``until``: the arrivals of one Poisson process at ``rate`` per agent
    per second, over all the agents, each an operation drawn from :data:`MIX` on an agent
    drawn at random, started whether or not that agent's last one has ended.  An open loop:
    agents that each waited for their answer before the next would lower the load as the
    latency grows, and hide it.  One timer for all the arrivals, not one per agent: a reactor
    heap of N timers costs every arrival log N comparisons, the bench's cost, not the
    controller's.
    """
    names = [name for name, _ in MIX]
    weights = [share for _, share in MIX]
    running: list[Deferred[None]] = []
    due = reactor.seconds()
    while True:
        # From the planned time, not from when this one ran: a late timer is caught up.
        due += rng.expovariate(rate * len(clients))
        if due >= until:
            break
        await deferLater(reactor, max(0.0, due - reactor.seconds()), lambda: None)
        index = rng.randrange(len(clients))
        op = rng.choices(names, weights)[0]
        running.append(
            Deferred.fromCoroutine(_timed(reactor, clients[index], op, files, index, samples, errors))
        )
    await defer.gatherResults(running)


async def measure(reactor: Any, agents: int, per_process: int, duration: float, rate: float) -> ScaleResult:
    """One run with ``agents`` agents; see the module's description."""
    directory = _scratch_directory()
    files = directory / "files"
    files.mkdir()
    # One VM's credentials for all the agents: the cost per session is the same.
    host_credentials, agent_credentials = mint()
    (directory / AGENT_CREDENTIALS).write_bytes(agent_credentials.to_json())  # mkdtemp's dir is 0700
    processes: list[tuple[Any, _AgentsProcess]] = []
    clients: list[GuestClient] = []
    try:
        for first in range(0, agents, per_process):
            protocol = _AgentsProcess()
            args = [
                sys.executable,
                "-m",
                "bench.scale",
                "--serve",
                str(directory),
                str(first),
                str(min(per_process, agents - first)),
            ]
            transport = reactor.spawnProcess(
                protocol, sys.executable, args, env=os.environ, childFDs={0: "w", 1: "r", 2: "r"}
            )
            processes.append((transport, protocol))
        await defer.gatherResults([p.ready for _, p in processes])
        for i in range(agents):
            (files / f"in-{i}").write_bytes(SMALL_FILE)
        gc.collect()
        before = _rss()
        started = reactor.seconds()
        # In batches: a thousand handshakes at once is a burst no controller needs to take.
        for batch in range(0, agents, 100):
            clients += await defer.gatherResults(
                [
                    Deferred.fromCoroutine(
                        _connect_one(reactor, directory / f"agent-{i}.sock", host_credentials)
                    )
                    for i in range(batch, min(batch + 100, agents))
                ]
            )
        connect_seconds = reactor.seconds() - started
        gc.collect()
        memory_per_agent = (_rss() - before) / agents
        # Every agent has the file a pull needs before the timed load starts.
        await defer.gatherResults(
            [c.push(str(files / f"in-{i}"), str(files / f"guest-{i}")) for i, c in enumerate(clients)]
        )
        samples: dict[str, list[float]] = {name: [] for name, _ in MIX}
        errors: list[BaseException] = []
        rng = random.Random(agents)
        load_average_started = os.getloadavg()[0]
        cpu_started = _cpu_seconds()
        agents_cpu_started = sum(_process_cpu_seconds(t.pid) for t, _ in processes)
        load_started = reactor.seconds()
        until = load_started + duration
        lags: list[float] = []
        lag_probe = LoopingCall(_record_lag, reactor, lags, [load_started])
        lag_probe.clock = reactor
        lag_probe.start(LAG_PROBE_INTERVAL, now=False)
        await _load(reactor, clients, files, rate, until, rng, samples, errors)
        lag_probe.stop()
        elapsed = reactor.seconds() - load_started
        controller_cpu_seconds = _cpu_seconds() - cpu_started
        controller_cpu = controller_cpu_seconds / elapsed
        agents_cpu = (sum(_process_cpu_seconds(t.pid) for t, _ in processes) - agents_cpu_started) / elapsed
        if errors:
            print(
                f"scale: {len(errors)} operations failed at N={agents}; first: {errors[0]!r}", file=sys.stderr
            )
        done = sum(len(s) for s in samples.values())
        return ScaleResult(
            agents=agents,
            connect_seconds=connect_seconds,
            operations=done,
            errors=len(errors),
            throughput=done / elapsed,
            latency={op: Latency.of(s) for op, s in samples.items() if s},
            memory_per_agent=memory_per_agent,
            controller_cpu=controller_cpu,
            agents_cpu=agents_cpu,
            controller_cpu_per_op=controller_cpu_seconds / max(done, 1),
            reactor_lag_p99=percentile(lags, 99) if lags else 0.0,
            load_average=(load_average_started, os.getloadavg()[0]),
        )
    finally:
        for c in clients:
            c.close()
        for transport, protocol in processes:
            if not protocol.ended.called:
                transport.signalProcess("TERM")
        await defer.gatherResults([p.ended for _, p in processes])
        shutil.rmtree(directory, ignore_errors=True)


#: Seconds between two looks at the controller's reactor lag.
LAG_PROBE_INTERVAL = 0.01


def _record_lag(reactor: Any, lags: list[float], last: list[float]) -> None:
    """Record how much later than its interval this run of the lag probe came."""
    now = reactor.seconds()
    lags.append(max(0.0, now - last[0] - LAG_PROBE_INTERVAL))
    last[0] = now


async def _connect_one(reactor: Any, socket: Path, credentials: Credentials) -> GuestClient:
    endpoint = UNIXClientEndpoint(reactor, str(socket))
    return await connect(reactor, endpoint, credentials=credentials, timeout=60)


def _table(results: Sequence[ScaleResult]) -> str:
    ms = 1000.0
    lines = [
        "agents  connect s  ops/s   errors  ping p50/p99 ms   exec p50/p99 ms   push p50/p99 ms   "
        "pull p50/p99 ms   controller KiB/agent  CPU controller/agents  controller us/op  "
        "reactor lag p99 ms  load average",
    ]
    for r in results:

        def pair(op: str, r: ScaleResult = r) -> str:
            lat = r.latency.get(op)
            return f"{lat.median * ms:7.2f}/{lat.p99 * ms:<7.2f}" if lat else f"{'-':>15}"

        lines.append(
            f"{r.agents:6d}  {r.connect_seconds:9.2f}  {r.throughput:6.0f}  {r.errors:6d}  {pair('ping')}   "
            f"{pair('exec')}   {pair('push')}   {pair('pull')}   {r.memory_per_agent / 1024:8.1f}"
            f"             {r.controller_cpu:5.0%} / {r.agents_cpu:5.0%}"
            f"        {r.controller_cpu_per_op * 1e6:8.0f}          {r.reactor_lag_p99 * ms:8.2f}"
            f"        {r.load_average[0]:5.2f} -> {r.load_average[1]:5.2f}"
        )
    lines.append(
        f"targets: 1000 agents connected, p99 ping <= {PING_P99_MAX * ms:g} ms under the mixed load, "
        f"<= {MEMORY_PER_AGENT_MAX // 1024} KiB of controller memory per agent\n"
        f"CPU: share of one core during the load (this machine has {os.cpu_count()}); load average: "
        "1-minute, at the load's start -> end (above the core count, latencies measure the machine)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        serve_agents(Path(argv[1]), int(argv[2]), int(argv[3]))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=(__doc__ or "").strip())
    p.add_argument("--agents", default="10,100,1000", help="comma-separated N (default %(default)s)")
    p.add_argument(
        "--per-process", type=int, default=100, help="agents per host process (default %(default)s)"
    )
    p.add_argument(
        "--duration", type=float, default=20.0, help="seconds of mixed load per N (default %(default)s)"
    )
    p.add_argument(
        "--rate", type=float, default=1.0, help="operations per second per agent (default %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.agents.split(",")]
    if any(n < 1 for n in counts) or args.per_process < 1 or args.duration <= 0 or args.rate <= 0:
        p.error("--agents, --per-process, --duration and --rate must be positive")
    _raise_fd_limit()

    async def run(reactor: Any) -> None:
        results = []
        for n in counts:
            print(f"scale: {n} agents ...", file=sys.stderr)
            results.append(await measure(reactor, n, args.per_process, args.duration, args.rate))
        print(json.dumps([asdict(r) for r in results], indent=2) if args.json else _table(results))

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
