"""
System operations: ping, info, and powering the guest off or rebooting it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from guest_agent import __version__
from guest_agent.protocol.connection import SUPPORTED_VERSIONS
from guest_agent.protocol.errors import InternalError
from guest_agent.session import Operation, OperationContext

#: Seconds between the reply to shutdown/reboot and running systemctl: time for the
#: reply to leave the guest before systemd starts stopping services (and the agent).
POWER_DELAY = 0.1
OS_RELEASE_PATHS = ("/etc/os-release", "/usr/lib/os-release")

_T = TypeVar("_T")
log = Logger()


def ping(ctx: OperationContext) -> dict[str, Any]:
    """The agent's clock (to estimate skew) and version; synchronous, as it is the latency probe."""
    return {"time": ctx.reactor.seconds(), "version": __version__}


def _best_effort(fact: str, read: Callable[[], _T]) -> _T | None:
    """One unreadable fact (a container without /proc, say) must not hide the others."""
    try:
        return read()
    except (OSError, ValueError) as e:
        log.warn("info: cannot read {fact}: {error}", fact=fact, error=e)
        return None


def _os_release() -> dict[str, str]:
    """os-release(5): shell-quoted KEY=value lines; the first file that exists wins."""
    for path in OS_RELEASE_PATHS:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            continue
        fields = {}
        for line in lines:
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                words = shlex.split(value)
                fields[key.strip()] = words[0] if words else ""
        return fields
    raise FileNotFoundError(f"none of {', '.join(OS_RELEASE_PATHS)} exists")


def _uptime() -> float:
    with open("/proc/uptime", encoding="ascii") as f:
        return float(f.read().split()[0])


def _memory() -> dict[str, int]:
    fields = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                fields[key] = int(value.split()[0]) * 1024  # meminfo counts KiB
    return {"total": fields["MemTotal"], "available": fields["MemAvailable"]}


def _disk(path: str) -> dict[str, int]:
    vfs = os.statvfs(path)
    # f_bavail: what an unprivileged user may still use, as df shows it.
    return {"total": vfs.f_blocks * vfs.f_frsize, "free": vfs.f_bavail * vfs.f_frsize}


async def info(ctx: OperationContext) -> dict[str, Any]:
    """Facts about the guest; a fact that cannot be read is null, with a warning in the log."""
    uname = os.uname()
    return {
        "hostname": socket.gethostname(),
        # As ``uname -srvm`` prints it.
        "kernel": f"{uname.sysname} {uname.release} {uname.version} {uname.machine}",
        "os_release": _best_effort("os-release", _os_release),
        "uptime": _best_effort("/proc/uptime", _uptime),
        "load": _best_effort("load average", lambda: list(os.getloadavg())),
        "memory": _best_effort("/proc/meminfo", _memory),
        "disk": _best_effort("disk usage of /", lambda: _disk("/")),
        "agent_version": __version__,
        "protocol_versions": list(SUPPORTED_VERSIONS),
    }


class _PowerCommand(ProcessProtocol):
    """``systemctl poweroff|reboot``: the host has its reply already, so a failure can only be logged."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        if not isinstance(reason.value, ProcessDone):
            log.error("{argv} failed ({why}): {output}", argv=" ".join(self.argv),
                      why=reason.getErrorMessage(), output=self.output.decode(errors="replace").strip())


def _run_power_command(reactor: IReactorProcess, verb: str) -> None:
    executable = shutil.which("systemctl")
    if executable is None:
        log.error("Cannot {verb} the guest: systemctl is not on the agent's PATH", verb=verb)
        return
    argv = [executable, verb]
    try:
        reactor.spawnProcess(_PowerCommand(argv), executable, argv, env=dict(os.environ))
    except OSError:
        log.failure("Cannot {verb} the guest: starting systemctl failed", verb=verb)


def _power(verb: str) -> Operation:
    async def operation(ctx: OperationContext) -> None:
        if not IReactorProcess.providedBy(ctx.reactor):
            raise InternalError(f"the agent's reactor cannot run processes, so it cannot {verb} the guest")
        process_reactor = cast(IReactorProcess, ctx.reactor)
        # Returning sends the reply now; systemctl runs once it is on its way.
        ctx.reactor.callLater(POWER_DELAY, _run_power_command, process_reactor, verb)

    operation.__name__ = operation.__qualname__ = verb
    operation.__doc__ = f"Reply, then run ``systemctl {verb}`` {POWER_DELAY} s later."
    return operation


OPERATIONS: dict[str, Operation] = {
    "ping": ping,
    "info": info,
    "shutdown": _power("poweroff"),
    "reboot": _power("reboot"),
}
