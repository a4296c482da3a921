"""
Running ``vmrun`` (VMware's command-line tool, from the VIX API) without blocking the reactor,
parsing what it prints, and turning its ``Error: ...`` lines into our exceptions.

Output formats, as quoted by projects that drive the real tool:

- ``vmrun list``: ``Total running VMs: N`` then one ``.vmx`` path per line
  (vagrant-vmware-desktop's ``read_running_vms``/``read_state`` in
  ``lib/vagrant-vmware-desktop/driver/base.rb``, packer's ``IsRunning``).
- ``vmrun listSnapshots <vmx> showTree``: ``Total snapshots: N`` then one name per line,
  each child indented by one tab more than its parent (vagrant-vmware-desktop's
  ``snapshot_tree``).
- Failures: one ``Error: <text>`` line on standard output. The exit status is 255 on Linux
  (-1 on Windows) but some versions exit 0 after an ``Error:`` line, so the line decides.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from vmcontroller.errors import (
    HypervisorError,
    HypervisorUnavailable,
    SnapshotNotFound,
    VMLocked,
    VMNotFound,
    VMStateError,
)

__all__ = [
    "PRODUCTS",
    "Product",
    "Vmrun",
    "find_vmrun",
    "parse_list",
    "parse_snapshot_tree",
    "translate_error",
]

#: ``vmrun -T``'s host types: Workstation, Fusion, Workstation Player.
Product = Literal["ws", "fusion", "player"]
PRODUCTS: tuple[Product, ...] = ("ws", "fusion", "player")

#: Where VMware's installers put vmrun when it is not on PATH.
_KNOWN_LOCATIONS = (
    "/usr/bin/vmrun",
    "/usr/local/bin/vmrun",
    "/Applications/VMware Fusion.app/Contents/Library/vmrun",
)

#: How much vmrun output is kept: it prints a line or a list of names; anything beyond is noise.
_MAX_OUTPUT = 1 << 20


def find_vmrun() -> str | None:
    """The vmrun executable on PATH or where VMware's installers put it, or ``None``."""
    return shutil.which("vmrun") or next((p for p in _KNOWN_LOCATIONS if os.access(p, os.X_OK)), None)


def parse_list(output: str) -> list[str]:
    """The ``.vmx`` paths of ``vmrun list``'s output (its ``Total running VMs`` line dropped)."""
    return [
        line.strip()
        for line in output.splitlines()
        if line.strip() and not line.startswith("Total running VMs:")
    ]


def parse_snapshot_tree(output: str) -> list[tuple[str, str | None]]:
    """
    ``(name, parent)`` for each snapshot in ``vmrun listSnapshots <vmx> showTree``'s output,
    in its order (parents before their children); a line's tabs give its depth.
    """
    found: list[tuple[str, str | None]] = []
    path: list[str] = []  # the names from the root down to the last line's snapshot
    for line in output.splitlines():
        if not line.strip() or line.startswith("Total snapshots:"):
            continue
        depth = len(line) - len(line.lstrip("\t"))
        del path[depth:]
        name = line.strip()
        found.append((name, path[-1] if path else None))
        path.append(name)
    return found


def _error_text(output: str) -> str | None:
    for line in output.splitlines():
        if line.startswith("Error:"):
            return line[len("Error:") :].strip()
    return None


def translate_error(
    text: str, *, action: str, vm: str | None = None, snapshot: str | None = None
) -> HypervisorError:
    """
    Our exception for vmrun's ``Error: <text>``. The texts are VIX's error strings
    (``Vix_GetErrorText``), some with vmrun's own prefix:

    - ``Cannot open VM: <vmx>, The virtual machine cannot be found`` (VIX_E_VM_NOT_FOUND, 4000)
    - ``The virtual machine is not powered on: <vmx>`` (vmrun's wording of
      VIX_E_VM_NOT_RUNNING, 3006), ``The virtual machine should not be powered on. It appears
      to be running already.`` (VIX_E_VM_IS_RUNNING, 3007)
    - ``Invalid snapshot name '<name>'`` (an unknown snapshot), ``The name does not uniquely
      identify one snapshot`` (VIX_E_SNAPSHOT_NONUNIQUE_NAME, 13017)
    - ``The operation is not supported for the specified parameters`` (VIX_E_NOT_SUPPORTED, 6:
      e.g. snapshots with ``-T player``)
    - ``The file is already in use`` (VIX_E_FILE_ALREADY_LOCKED, 15), ``This VM is in use.``
    """
    what = f"{action} (VM {vm!r})" if vm else action
    lowered = text.lower()
    if "cannot open vm" in lowered or "virtual machine cannot be found" in lowered:
        return VMNotFound(
            f"cannot {what}: no VM named {vm!r} is defined (vmrun: {text}); see list_vms() for the "
            "defined VMs"
        )
    if "not powered on" in lowered or "needs to be powered on" in lowered:
        return VMStateError(f"cannot {what}: it is not running (vmrun: {text}); start it first")
    if "should not be powered on" in lowered or "running already" in lowered:
        return VMStateError(f"cannot {what}: it is running (vmrun: {text}); stop it first")
    if "invalid snapshot name" in lowered or "snapshot not found" in lowered:
        return SnapshotNotFound(
            f"cannot {what}: VM {vm!r} has no snapshot {snapshot!r} (vmrun: {text}); see snapshot_list()"
        )
    if "does not uniquely identify one snapshot" in lowered:
        return HypervisorError(
            f"cannot {what}: VM {vm!r} has several snapshots named {snapshot!r} (vmrun: {text}), taken "
            "outside vmcontroller; rename or delete all but one in VMware's snapshot manager"
        )
    if "in use" in lowered or "locked" in lowered:
        return VMLocked(
            f"cannot {what}: another program holds the VM (vmrun: {text}); close it in VMware's "
            "window or wait for the other vmrun to finish, then try again"
        )
    if "not supported" in lowered:
        return HypervisorError(
            f"cannot {what}: the installed VMware product cannot do this (vmrun: {text}); VMware "
            "Player lacks snapshots, pause and clones: use Workstation Pro or Fusion"
        )
    return HypervisorError(f"cannot {what}: vmrun says: {text}; read vmware.log in the VM's directory")


class _Collect(ProcessProtocol):
    def __init__(self, done: Deferred[tuple[str, int]]) -> None:
        self._done = done
        self._output = bytearray()

    def outReceived(self, data: bytes) -> None:
        if len(self._output) < _MAX_OUTPUT:
            self._output += data[: _MAX_OUTPUT - len(self._output)]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = 0
        if reason.check(ProcessTerminated):
            value: Any = reason.value
            code = value.exitCode if value.exitCode is not None else -(value.signal or 1)
        elif not reason.check(ProcessDone):
            code = -1
        if not self._done.called:
            self._done.callback((self._output.decode(errors="replace").replace("\r\n", "\n"), code))


@dataclass
class Vmrun:
    """
    Runs ``vmrun -T <product> ...`` with ``reactor.spawnProcess``: no thread, no blocking.

    :ivar reactor: provides :class:`IReactorProcess` and :class:`IReactorTime`.
    :ivar executable: the vmrun to run, or ``None`` when none was found.
    :ivar product: the ``-T`` host type.
    :ivar timeout: seconds after which a hung vmrun is killed (vagrant-vmware-desktop gives
        ``vmrun start`` 300 s: "Sometimes vmrun just hangs").
    """

    reactor: Any
    executable: str | None
    product: Product
    timeout: float = 300.0

    def run(
        self, args: Sequence[str], *, action: str, vm: str | None = None, snapshot: str | None = None
    ) -> Deferred[str]:
        """
        Run vmrun with ``args`` and fire with its output.

        :param action: what is being done, for error messages ("start", ...).
        :raises HypervisorUnavailable: vmrun is not installed.
        :raises HypervisorError: (a subclass, see :func:`translate_error`) vmrun failed.
        """
        return Deferred.fromCoroutine(self._run(list(args), action=action, vm=vm, snapshot=snapshot))

    async def _run(self, args: list[str], *, action: str, vm: str | None, snapshot: str | None) -> str:
        if self.executable is None or not os.access(self.executable, os.X_OK):
            raise HypervisorUnavailable(
                f"cannot {action}{' ' + repr(vm) if vm else ''}: vmrun is not installed"
                f"{' at ' + self.executable if self.executable else ' (not on PATH)'}; install VMware "
                "Workstation Pro, Fusion or Workstation Player (Player needs the VIX API as well), or "
                "pass vmrun='/path/to/vmrun' to the driver"
            )
        spawned: list[Any] = []

        def kill_on_cancel(_: Deferred[tuple[str, int]]) -> None:
            # The process's end afterwards is ignored (_Collect fires once).
            for process in spawned:
                _kill(process)

        done: Deferred[tuple[str, int]] = Deferred(kill_on_cancel)
        protocol = _Collect(done)
        spawner: IReactorProcess = self.reactor
        argv = [self.executable, "-T", self.product, *args]
        process = spawner.spawnProcess(protocol, self.executable, argv, env=dict(os.environ))
        spawned.append(process)
        clock: IReactorTime = self.reactor
        timer: IDelayedCall = clock.callLater(self.timeout, lambda: _kill(process))
        try:
            output, code = await done
        finally:
            if timer.active():
                timer.cancel()
        error = _error_text(output)
        if error is not None:
            raise translate_error(error, action=action, vm=vm, snapshot=snapshot)
        if code != 0:
            raise HypervisorError(
                f"cannot {action}{' ' + repr(vm) if vm else ''}: vmrun {' '.join(args[:1])} exited with "
                f"status {code} (killed after {self.timeout:g} s if negative) and said: "
                f"{output.strip() or 'nothing'}"
            )
        return output


def _kill(process: Any) -> None:
    with contextlib.suppress(Exception):  # it ended meanwhile
        process.signalProcess("KILL")
