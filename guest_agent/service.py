"""``python -m guest_agent run``: the agent as a long-running service."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

import guest_agent
from guest_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, ConfigError
from guest_agent.credentials import load_credentials, read_credentials_file
from guest_agent.ops import build_operations
from guest_agent.ops.commands import CommandRegistry, RetentionLimits
from guest_agent.ops.files import PartialUploads
from guest_agent.protocol.connection import SUPPORTED_VERSIONS
from guest_agent.protocol.errors import AuthenticationFailed, CredentialsUnavailable
from guest_agent.protocol.tls import Authenticator
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


#: The exit status when the agent refuses to serve for want of credentials (EX_CONFIG); the
#: unit does not restart the agent after it (RestartPreventExitStatus).
EXIT_NO_CREDENTIALS = 78


def build_service(
    reactor: object,
    args: argparse.Namespace,
    config: AgentConfig,
    operations: dict[str, Operation],
    authenticator: Authenticator | None,
) -> MultiService:
    top = MultiService()
    for name in args.virtio_port:
        CharacterDeviceTransport(
            reactor,
            virtio_port_path(name),
            operations,
            limits=config.limits,
            hello=HELLO,
            authenticator=authenticator,
        ).setServiceParent(top)
    for device in args.serial:
        CharacterDeviceTransport(
            reactor,
            device,
            operations,
            serial=True,
            limits=config.limits,
            hello=HELLO,
            authenticator=authenticator,
        ).setServiceParent(top)
    return top


async def agent_authenticator(
    reactor: Any, development: bool, credentials_file: str | None = None
) -> Authenticator | None:
    """
    The agent's TLS end from the VM's credentials; None in development mode, loudly.

    :raises CredentialsUnavailable: no usable credentials (the agent then refuses to serve).
    """
    if development:
        log.warn(
            "DEVELOPMENT MODE: this agent authenticates nobody; anyone who reaches its channels "
            "runs commands as root here. Never use it outside development"
        )
        return None
    if credentials_file is not None:
        credentials = read_credentials_file(credentials_file)
    else:
        credentials = await load_credentials(reactor)
    try:
        return Authenticator.from_credentials(credentials, server_side=True)
    except AuthenticationFailed as e:
        raise CredentialsUnavailable(str(e)) from None


async def serve(
    reactor: Any, args: argparse.Namespace, config: AgentConfig, operations: dict[str, Operation]
) -> MultiService:
    """Load the credentials, then start every channel; nothing listens before that."""
    authenticator = await agent_authenticator(reactor, args.development, args.credentials)
    top = build_service(reactor, args, config, operations, authenticator)
    for description in args.listen:
        await serverFromString(reactor, description).listen(
            AgentFactory(reactor, operations, config.limits, HELLO, config.tcp, authenticator=authenticator)
        )
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
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
    parser.add_argument(
        "--credentials",
        metavar="FILE",
        help="read this VM's credentials from FILE (mode 0600), provisioned by other means than "
        "the hypervisor's (never a file of the shared image); by default they come from QEMU "
        "fw_cfg, a VirtualBox guest property or VMware guestinfo",
    )
    parser.add_argument(
        "--development",
        action="store_true",
        help="serve without authentication or protection (the host must say development=True too); "
        "for development only, never on a volunteer's machine",
    )
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
    status = [0]

    def refuse(failure: Failure) -> None:
        if failure.check(CredentialsUnavailable):
            log.critical("Refusing to serve: {why}", why=failure.getErrorMessage())
            status[0] = EXIT_NO_CREDENTIALS
        else:
            log.failure("The agent could not start", failure)
            status[0] = 1
        reactor.stop()

    reactor.callWhenRunning(
        lambda: Deferred.fromCoroutine(serve(reactor, args, config, operations)).addErrback(refuse)
    )
    reactor.run()
    return status[0]
