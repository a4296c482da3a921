"""``python -m guest_agent run``: the agent as a long-running service."""

from __future__ import annotations

import argparse
import sys

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

import guest_agent
from guest_agent.ops import OPERATIONS
from guest_agent.protocol.connection import SUPPORTED_VERSIONS
from guest_agent.transports import AgentFactory, CharacterDeviceTransport, virtio_port_path

log = Logger()
HELLO = {"software": f"vmcontroller-agent {guest_agent.__version__}"}


def build_service(reactor: object, args: argparse.Namespace) -> MultiService:
    top = MultiService()
    for name in args.virtio_port:
        CharacterDeviceTransport(reactor, virtio_port_path(name), OPERATIONS, hello=HELLO).setServiceParent(
            top
        )
    for device in args.serial:
        CharacterDeviceTransport(reactor, device, OPERATIONS, serial=True, hello=HELLO).setServiceParent(top)
    return top


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
    args = parser.parse_args(argv)
    if not (args.virtio_port or args.serial or args.listen):
        parser.error("name at least one channel: --virtio-port, --serial or --listen")

    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    log.info(
        "vmcontroller agent {version}, protocol versions {versions}",
        version=guest_agent.__version__,
        versions=list(SUPPORTED_VERSIONS),
    )
    top = build_service(reactor, args)
    for description in args.listen:
        serverFromString(reactor, description).listen(AgentFactory(reactor, OPERATIONS, hello=HELLO))
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0
