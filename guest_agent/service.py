"""``python -m guest_agent run``: the agent as a long-running service."""

from __future__ import annotations

import argparse
import os
import sys

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

import guest_agent
from guest_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, ConfigError
from guest_agent.ops import build_operations
from guest_agent.ops.commands import CommandRegistry, RetentionLimits
from guest_agent.ops.files import PartialUploads
from guest_agent.protocol.connection import SUPPORTED_VERSIONS
from guest_agent.session import Operation
from guest_agent.transports import AgentFactory, CharacterDeviceTransport, virtio_port_path

log = Logger()
HELLO = {"software": f"vmcontroller-agent {guest_agent.__version__}"}
#: Where retained commands spill their output (see guest_agent.ops.commands).
DEFAULT_SPOOL_DIR = "/var/lib/vmcontroller-agent/spool"


def durable_operations(args: argparse.Namespace) -> dict[str, Operation]:
    """The retained commands and partial pushes, one set shared by every channel."""
    limits = RetentionLimits(args.max_commands, args.memory_per_stream, args.spool_bytes)
    return {**CommandRegistry(args.spool_dir, limits).operations(), **PartialUploads().operations()}


def build_service(
    reactor: object, args: argparse.Namespace, config: AgentConfig, operations: dict[str, Operation]
) -> MultiService:
    top = MultiService()
    for name in args.virtio_port:
        CharacterDeviceTransport(
            reactor, virtio_port_path(name), operations, limits=config.limits, hello=HELLO
        ).setServiceParent(top)
    for device in args.serial:
        CharacterDeviceTransport(
            reactor, device, operations, serial=True, limits=config.limits, hello=HELLO
        ).setServiceParent(top)
    return top


def load_config(path: str | None) -> AgentConfig:
    """The configuration at ``path``; without one, the default file if it exists, else the defaults."""
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG_PATH):
            return AgentConfig()
        path = DEFAULT_CONFIG_PATH
    return AgentConfig.load(path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m guest_agent run", description="Serve the vmcontroller host on the given channels."
    )
    parser.add_argument(
        "--virtio-port",
        action="append",
        default=[],
        metavar="NAME",
        help="a virtio-serial port name, e.g. org.vmcontroller.agent.0 (waited for)",
    )
    parser.add_argument(
        "--serial",
        action="append",
        default=[],
        metavar="DEVICE",
        help="a serial tty, e.g. /dev/ttyS1, used in raw mode",
    )
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="a Twisted server endpoint, e.g. tcp:9000:interface=127.0.0.1",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"the agent's configuration file (TOML; default {DEFAULT_CONFIG_PATH} if it exists): limits, "
        "allowed roots for file operations, the programs exec may run",
    )
    defaults = RetentionLimits()
    parser.add_argument("--spool-dir", default=DEFAULT_SPOOL_DIR, metavar="DIR",
                        help="where retained commands spill output beyond memory (emptied at start)")
    parser.add_argument("--max-commands", type=int, default=defaults.max_commands, metavar="N",
                        help="retained commands kept at once")
    parser.add_argument("--memory-per-stream", type=int, default=defaults.memory_per_stream, metavar="BYTES",
                        help="bytes of a retained command's stdout (or stderr) kept in memory")
    parser.add_argument("--spool-bytes", type=int, default=defaults.disk_bytes, metavar="BYTES",
                        help="bytes of spilled output kept on disk, all commands together")
    args = parser.parse_args(argv)
    if not (args.virtio_port or args.serial or args.listen):
        parser.error("name at least one channel: --virtio-port, --serial or --listen")
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"vmcontroller agent: {e}", file=sys.stderr)
        return 2
    operations = build_operations(config, durable_operations(args))

    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    log.info(
        "vmcontroller agent {version}, protocol versions {versions}",
        version=guest_agent.__version__,
        versions=list(SUPPORTED_VERSIONS),
    )
    log.info("Limits {limits}, at most {n} processes; file operations under {roots}; exec of {allow}",
             limits=config.limits, n=config.max_processes, roots=config.allowed_roots or "any path",
             allow=sorted(config.exec_allow) if config.exec_allow is not None else "any program")
    top = build_service(reactor, args, config, operations)
    for description in args.listen:
        serverFromString(reactor, description).listen(
            AgentFactory(reactor, operations, config.limits, HELLO, config.tcp)
        )
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0
