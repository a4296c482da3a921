"""
vmcontroller: control VMs and run commands in them through their guest agent.

Each command takes --driver, --uri and --driver-option NAME=VALUE (the hypervisor), before or
after its name. Read commands take --json. A guest path is written NAME:PATH (cp). Exit
status: 0 success; 1 an error (one line on stderr says what went wrong and what to do); 2 bad
usage; 3 no such VM or snapshot; 4 the VM's state forbids the command; 5 the agent did not
answer; 6 no such file; exec and shell exit with the guest command's own status (127: not
found, 126: not runnable, 128+N: killed by signal N, 130: interrupted with Ctrl-C); shell and
exec -t exit 2 when stdin is not a terminal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import tempfile
import termios
import time
import tty
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import react
from twisted.python.failure import Failure
from zope.interface import implementer

from guest_agent.ops.exec import MAX_TERMINAL_SIDE
from hypervisors import installed_drivers, load_driver
from hypervisors.interface import IHypervisorDriver, VMEvent, VMSpec, VMState
from vmcontroller._exec import STREAM, ExecHandle, ExecResult, Terminal
from vmcontroller.client import GuestClient
from vmcontroller.errors import (
    AgentUnreachable,
    BadRequest,
    CommandNotFound,
    HypervisorUnavailable,
    OperationCancelled,
    PathNotFound,
    PermissionDenied,
    SnapshotNotFound,
    VMAlreadyExists,
    VMControllerError,
    VMNotFound,
    VMStateError,
)
from vmcontroller.images import AGENT_FORMS, build_image
from vmcontroller.machine import connect_vm_agent

__all__ = ["EXIT_CODES", "main", "parser"]

DEMO_VM = "vmc-demo"


class UsageError(VMControllerError):
    """The command line asks for something that cannot be done as asked."""


class NotATerminal(UsageError):
    """An interactive command (``shell``, ``exec -t``) was started with stdin not a terminal."""


#: The exit status of each error class (the first that matches), documented in the help.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (NotATerminal, 2),
    (VMNotFound, 3),
    (SnapshotNotFound, 3),
    (VMStateError, 4),
    (AgentUnreachable, 5),
    (PathNotFound, 6),
    (CommandNotFound, 127),
    (PermissionDenied, 1),
    (VMControllerError, 1),
)
# The library's hints name Python calls; on the command line, name the commands instead.
_CLI_HINTS = (
    ("list_vms()", "`vmcontroller list`"),
    ("snapshot_list()", "`vmcontroller snapshot list NAME`"),
    ("mkdir with parents=True", "`vmcontroller exec NAME mkdir -p DIR`"),
    ("call startService()", "report this as a bug"),
)


# -- output ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-ready copy: dataclasses as dicts, enums by value, times as ISO text."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and hasattr(value, "name") and not isinstance(value, int | str):
        return value.value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _emit(args: argparse.Namespace, value: Any, text: Callable[[], str]) -> None:
    print(json.dumps(_plain(value), indent=2) if getattr(args, "json", False) else text(), flush=True)


def _say(message: str) -> None:
    """Progress for the person at the terminal: on stderr, so that stdout stays the result."""
    print(message, file=sys.stderr, flush=True)


def _mode(mode: Any) -> str:
    return f"{int(mode):04o}" if isinstance(mode, int) else str(mode)


# -- the driver and the agent ------------------------------------------------------------------


async def _driver(reactor: Any, args: argparse.Namespace) -> IHypervisorDriver:
    options: dict[str, str] = {}
    for pair in args.driver_option:
        option, equals, value = pair.partition("=")
        if not (option and equals):
            raise UsageError(f"--driver-option takes NAME=VALUE (product=player, say), not {pair!r}")
        options[option] = value
    if args.uri:
        options["uri"] = args.uri
    driver = load_driver(args.driver, reactor, **options)
    driver.startService()  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", driver.stopService)  # type: ignore[attr-defined]
    return driver


async def _running(driver: IHypervisorDriver, name: str) -> None:
    state = await driver.state(name)
    if not state.is_active:
        raise VMStateError(f"VM {name!r} is {state.value}: start it with `vmcontroller start {name}`")


async def _agent(reactor: Any, args: argparse.Namespace, driver: IHypervisorDriver, name: str) -> GuestClient:
    await _running(driver, name)
    if sys.stderr.isatty():
        _say(f"waiting for the agent of {name} (up to {args.timeout:g} s; a booting guest takes a while)")
    try:
        return await connect_vm_agent(reactor, driver, name, timeout=args.timeout)
    except AgentUnreachable as e:
        raise AgentUnreachable(
            f"the agent of VM {name!r} did not answer within {args.timeout:g} s: is the guest still "
            f"booting (try again, or --timeout), and does it run vmcontroller-agent? ({e})"
        ) from None


# -- VM commands -------------------------------------------------------------------------------


async def cmd_list(reactor: Any, args: argparse.Namespace) -> int:
    driver = await _driver(reactor, args)
    vms = [{"name": n, "state": (await driver.state(n)).value} for n in await driver.list_vms()]
    _emit(args, vms, lambda: "\n".join(f"{v['name']}\t{v['state']}" for v in vms) or "(no VMs)")
    return 0


def _spec_from_args(args: argparse.Namespace, image: Any) -> VMSpec:
    fields: dict[str, Any] = {}
    if args.spec:
        try:
            fields = json.loads(Path(args.spec).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the spec file {args.spec}: {e}") from None
        if not isinstance(fields, dict):
            raise UsageError(f"the spec file {args.spec} must hold a JSON object of VMSpec fields")
    for flag, key in (("memory", "memory_mib"), ("vcpus", "vcpus"), ("cpu_cap", "cpu_cap_percent")):
        if getattr(args, flag) is not None:
            fields[key] = getattr(args, flag)
    if args.nat:
        fields["nat_network"] = True
    if args.serial:
        fields["serial_ports"] = tuple(args.serial)
    if args.accel:
        fields["accel"] = args.accel
    for key in ("serial_ports", "extra_channels"):
        if key in fields:
            fields[key] = tuple(fields[key])
    try:
        if "disk" in fields:
            return VMSpec(name=args.name, **fields)
        return image.vm_spec(args.name, **fields)
    except (TypeError, ValueError) as e:
        raise UsageError(f"cannot define {args.name!r}: {e}") from None


async def cmd_define(reactor: Any, args: argparse.Namespace) -> int:
    driver = await _driver(reactor, args)
    image = None
    if not args.spec or "disk" not in Path(args.spec).read_text():
        _say(f"finding or building the {args.image} guest image (the first build takes about a minute)")
        image = await build_image(reactor, agent="bundle" if args.image == "bundle" else "package")
    spec = _spec_from_args(args, image)
    await driver.define(spec)
    print(
        f"defined {spec.name} ({spec.memory_mib} MiB, {spec.vcpus} vCPU); "
        f"start it with `vmcontroller start {spec.name}`"
    )
    return 0


async def cmd_undefine(reactor: Any, args: argparse.Namespace) -> int:
    driver = await _driver(reactor, args)
    state = await driver.state(args.name)
    snapshots = await driver.snapshot_list(args.name)
    if not args.force and (state.is_active or snapshots):
        what = [f"it is {state.value}"] if state.is_active else []
        if snapshots:
            what.append(
                f"its {len(snapshots)} snapshot(s) ({', '.join(s.name for s in snapshots)}) would be lost"
            )
        raise VMStateError(
            f"not removing {args.name!r}: {' and '.join(what)}; add --force to remove it anyway"
        )
    await driver.undefine(args.name)
    print(f"removed {args.name} with its disk and snapshots")
    return 0


async def cmd_lifecycle(reactor: Any, args: argparse.Namespace) -> int:
    driver = await _driver(reactor, args)
    name = args.name
    if args.command == "start":
        was_saved = (await driver.state(name)) is VMState.SAVED
        await driver.start(name)
        print(f"{'restored' if was_saved else 'started'} {name}")
        if args.wait_agent:
            (await _agent(reactor, args, driver, name)).close()
            print(f"the agent of {name} answers")
    elif args.command == "stop":
        if args.force:
            await driver.power_off(name)
            print(f"powered off {name}")
        else:
            _say(f"asking {name} to shut down (ACPI), waiting up to {args.grace:g} s")
            try:
                await driver.shutdown(name, wait=True, timeout=args.grace)
            except VMControllerError as e:
                raise VMControllerError(f"{e}; `vmcontroller stop --force {name}` powers it off") from None
            print(f"stopped {name}")
    else:
        action, done = {
            "pause": (driver.pause, "paused"),
            "resume": (driver.resume, "resumed"),
            "reset": (driver.reset, "reset"),
            "save": (driver.save_state, "saved to disk; `vmcontroller start` resumes"),
        }[args.command]
        await action(name)
        print(f"{name}: {done}")
    return 0


async def cmd_snapshot(reactor: Any, args: argparse.Namespace) -> int:
    driver = await _driver(reactor, args)
    if args.action == "list":
        snapshots = await driver.snapshot_list(args.name)

        def table() -> str:
            lines = [
                "\t".join(
                    [
                        s.name,
                        f"{s.created:%Y-%m-%d %H:%M:%S}",
                        s.state.value,
                        "current" if s.current else "",
                        s.description,
                    ]
                ).rstrip()
                for s in snapshots
            ]
            return "\n".join(lines) or f"(no snapshots of {args.name})"

        _emit(args, snapshots, table)
    elif args.action == "create":
        taken = await driver.snapshot_create(args.name, args.snapshot, args.description or "")
        print(
            f"took snapshot {taken.name} of {args.name} ({'with' if taken.has_memory else 'without'} memory)"
        )
    elif args.action == "revert":
        await driver.snapshot_revert(args.name, args.snapshot)
        print(f"{args.name} is back at snapshot {args.snapshot} ({(await driver.state(args.name)).value})")
    else:
        await driver.snapshot_delete(args.name, args.snapshot)
        print(f"deleted snapshot {args.snapshot} of {args.name}")
    return 0


async def cmd_info(reactor: Any, args: argparse.Namespace) -> int:
    driver = await _driver(reactor, args)
    state = await driver.state(args.name)
    info: dict[str, Any] = {"name": args.name, "driver": args.driver, "state": state.value, "agent": None}
    if state.is_active:
        try:
            client = await connect_vm_agent(reactor, driver, args.name, timeout=args.timeout)
        except AgentUnreachable as e:
            info["agent_error"] = str(e)
        else:
            try:
                info["agent"] = await client.info()
            finally:
                client.close()

    def text() -> str:
        lines = [f"{args.name}: {state.value} ({args.driver})"]
        agent = info["agent"]
        if agent:
            lines += [
                f"agent {agent.get('agent_version')}, protocol {agent.get('protocol_versions')}",
                f"host name {agent.get('hostname')}, kernel {agent.get('kernel')}",
                f"memory {agent['memory']['available'] >> 20} of {agent['memory']['total'] >> 20} MiB free",
                f"disk {agent['disk']['free'] >> 20} of {agent['disk']['total'] >> 20} MiB free",
                f"up {agent.get('uptime', 0):.0f} s",
            ]
        elif "agent_error" in info:
            lines.append(f"agent: not answering ({info['agent_error']})")
        return "\n".join(lines)

    _emit(args, info, text)
    return 0


async def cmd_watch(reactor: Any, args: argparse.Namespace) -> int:
    driver = await _driver(reactor, args)
    if args.name:
        await driver.state(args.name)  # an unknown VM is an error now, not silence forever
    stopped: Deferred[None] = Deferred()

    def show(event: VMEvent) -> None:
        if args.json:
            print(json.dumps({"time": time.time(), **_plain(event)}), flush=True)
        else:
            print(
                f"{time.strftime('%H:%M:%S')} {event.vm}: {event.type.value} -> {event.state.value}",
                flush=True,
            )

    subscription = driver.subscribe(show, args.name)
    _say(f"watching {args.name or 'every VM'} of {args.driver}; Ctrl-C to stop")

    def stop() -> None:
        if not stopped.called:
            stopped.callback(None)

    _on_interrupt(reactor, stop)
    try:
        await stopped
    finally:
        subscription.cancel()
    return 0


# -- agent commands ----------------------------------------------------------------------------


async def cmd_ping(reactor: Any, args: argparse.Namespace) -> int:
    driver = await _driver(reactor, args)
    client = await _agent(reactor, args, driver, args.name)
    try:
        started = time.monotonic()
        pong = await client.ping()
        pong["round_trip_ms"] = round((time.monotonic() - started) * 1000, 3)
    finally:
        client.close()
    _emit(args, pong, lambda: f"the agent of {args.name} answers ({pong['round_trip_ms']} ms)")
    return 0


def _on_interrupt(reactor: Any, action: Callable[[], object]) -> None:
    # Twisted installs its own SIGINT handler (stop the reactor); a command that must first
    # undo something remote (cancel an exec) puts this one in its place.
    reactor.callWhenRunning(lambda: signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(action)))


async def cmd_exec(reactor: Any, args: argparse.Namespace) -> int:
    if not args.argv:
        raise UsageError("exec needs a command to run in the guest, e.g. `vmcontroller exec NAME uname -a`")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--env {item!r}: write NAME=VALUE")
        env[key] = value
    if args.tty:
        return await _interactive(reactor, args, args.argv, env=env or None, cwd=args.cwd,
                                  timeout=args.exec_timeout, command="exec -t")
    driver = await _driver(reactor, args)
    client = await _agent(reactor, args, driver, args.name)
    forward_stdin = not sys.stdin.isatty() and not args.no_stdin

    def write(stream: Any) -> Callable[[bytes], None]:
        def out(data: bytes) -> None:
            stream.buffer.write(data)
            stream.buffer.flush()

        return out

    try:
        handle = client.exec(
            args.argv,
            env=env or None,
            cwd=args.cwd,
            timeout=args.exec_timeout,
            stdin=STREAM if forward_stdin else None,
            on_stdout=write(sys.stdout),
            on_stderr=write(sys.stderr),
        )
        interrupted: list[bool] = []

        def interrupt() -> None:
            interrupted.append(True)
            handle.cancel()

        _on_interrupt(reactor, interrupt)
        if forward_stdin:
            Deferred.fromCoroutine(_pump_stdin(handle)).addErrback(lambda _: None)
        try:
            result = await handle.exited
        except OperationCancelled:
            if interrupted:
                _say("interrupted: the command's process group was killed in the guest")
                return 130
            raise
        except (CommandNotFound, PermissionDenied) as e:
            return _could_not_start(e)
    finally:
        client.close()
    return _status(result)


async def _pump_stdin(handle: Any) -> None:
    while data := await threads.deferToThread(os.read, 0, 65536):
        await handle.write_stdin(data)
    handle.close_stdin()


# -- shell -------------------------------------------------------------------------------------

#: What `shell` runs without --command: the guest's bash if it has one, else its sh, as a
#: login shell.
LOGIN_SHELL = 'exec "$(command -v bash || echo /bin/sh)" -l'
#: Signals that end an interactive session here; the guest's process group is killed.
_ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _terminal_size() -> tuple[int, int]:
    """This terminal's rows and columns (24x80 where it reports none), as a guest's may be."""
    size = os.get_terminal_size(sys.stdin.fileno())
    return min(size.lines or 24, MAX_TERMINAL_SIDE), min(size.columns or 80, MAX_TERMINAL_SIDE)


def _local_terminal() -> Terminal:
    rows, cols = _terminal_size()
    try:
        return Terminal(rows, cols, os.environ.get("TERM", ""))
    except BadRequest:  # no TERM, or one the agent would refuse
        return Terminal(rows, cols)


class _RawMode:
    """
    This terminal in raw mode: each key goes to the guest as typed (Ctrl-C included), and
    the guest's terminal does the echoing and the line editing.  :meth:`restore` puts the
    settings back; it is called on every way out and does its work once.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._saved: list[Any] | None = termios.tcgetattr(fd)
        tty.setraw(fd, termios.TCSANOW)

    def restore(self) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, saved)


@implementer(IReadDescriptor)
class _KeyReader:
    """
    Hands what is typed on a terminal (``fd``) to ``typed``, on the reactor: a read only
    when the fd is readable, so no thread sits in ``read`` when the session ends, and the
    fd is not made non-blocking (its flags are shared with the shell that started us).
    A Deferred from ``typed`` stops reading until it fires.
    """

    def __init__(self, reactor: Any, fd: int, typed: Callable[[bytes], Deferred[None]]) -> None:
        self._reactor = reactor
        self._fd = fd
        self._typed = typed
        self._stopped = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "terminal"

    def start(self) -> None:
        if not self._stopped:
            self._reactor.addReader(self)

    def stop(self) -> None:
        self._stopped = True
        self._reactor.removeReader(self)

    def doRead(self) -> None:
        data = os.read(self._fd, 4096)
        if not data:  # the terminal hung up
            self.stop()
            return
        self._reactor.removeReader(self)
        self._typed(data).addCallbacks(lambda _: self.start(), lambda _: self.stop())

    def connectionLost(self, reason: Failure) -> None:
        self._stopped = True


async def _interactive(reactor: Any, args: argparse.Namespace, argv: list[str], *, command: str,
                       env: dict[str, str] | None = None, cwd: str | None = None,
                       timeout: float | None = None) -> int:
    """
    Run ``argv`` in the guest on a pty the size of this terminal, this terminal in raw mode
    meanwhile, its keys forwarded and its size changes passed on; the guest command's exit
    status is ours.
    """
    stdin = sys.stdin.fileno()
    if not os.isatty(stdin):
        raise NotATerminal(f"{command} needs a terminal on stdin; to run a command with its input from a "
                           f"pipe or file, use `vmcontroller exec {args.name} COMMAND ...`")
    driver = await _driver(reactor, args)
    client = await _agent(reactor, args, driver, args.name)
    ending: list[int] = []
    raw: _RawMode | None = None
    keys: _KeyReader | None = None
    shutdown_trigger = None
    previous = {number: signal.getsignal(number) for number in (*_ENDING_SIGNALS, signal.SIGWINCH)}

    def write(data: bytes) -> None:
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except OSError:  # the terminal hung up (EIO) or the reader left: as a SIGHUP does
            end(signal.SIGHUP)

    def end(number: int) -> None:
        if not ending:
            ending.append(number)
            handle.cancel()

    try:
        handle: ExecHandle = client.exec(argv, env=env, cwd=cwd, timeout=timeout, stdin=STREAM,
                                         pty=_local_terminal(), on_stdout=write, on_stderr=write)

        def resized() -> None:
            handle.resize(*_terminal_size()).addErrback(lambda _: None)  # it ended meanwhile, say

        # From the signal handler to the reactor's thread, as _on_interrupt does.
        for number in _ENDING_SIGNALS:
            signal.signal(number, lambda n, _: reactor.callFromThread(end, n))
        signal.signal(signal.SIGWINCH, lambda *_: reactor.callFromThread(resized))
        raw = _RawMode(stdin)
        # The reactor may stop without this coroutine going on (a second signal...).
        shutdown_trigger = reactor.addSystemEventTrigger("before", "shutdown", raw.restore)
        keys = _KeyReader(reactor, stdin, handle.write_stdin)
        keys.start()
        try:
            result: ExecResult = await handle.exited
        except OperationCancelled:
            if ending:
                return 128 + ending[0]
            raise
        except (CommandNotFound, PermissionDenied) as e:
            return _could_not_start(e)
    finally:
        if keys is not None:
            keys.stop()
        if raw is not None:
            raw.restore()
            reactor.removeSystemEventTrigger(shutdown_trigger)
        for number, handler in previous.items():
            signal.signal(number, handler)
        client.close()
    return _status(result)


def _could_not_start(error: CommandNotFound | PermissionDenied) -> int:
    """Say why the guest could not start the command; a shell's status for it: 127 or 126."""
    print(f"vmcontroller: {error}", file=sys.stderr)
    return 127 if isinstance(error, CommandNotFound) else 126


def _status(result: ExecResult) -> int:
    """The exit status a shell gives a command that ended as ``result`` did."""
    if result.exit_code is not None:
        return result.exit_code
    number = getattr(signal.Signals, str(result.signal), None)
    return 128 + (number.value if number is not None else 0)


async def cmd_shell(reactor: Any, args: argparse.Namespace) -> int:
    argv = ["/bin/sh", "-c", args.command_line if args.command_line is not None else LOGIN_SHELL]
    return await _interactive(reactor, args, argv, command="shell")


# -- cp ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Location:
    vm: str | None
    path: str


def _location(text: str) -> _Location:
    vm, sep, path = text.partition(":")
    if sep and vm and "/" not in vm:
        if not path.startswith("/"):
            raise UsageError(f"{text!r}: a guest path must be absolute (NAME:/path)")
        return _Location(vm, path)
    return _Location(None, text)


class _Progress:
    """A rich progress bar with rate and time left on a terminal; nothing on a pipe."""

    def __init__(self) -> None:
        self._bar: Any = None
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()

    def callback(self, label: str) -> Callable[[int, int | None], None] | None:
        if self._bar is None:
            return None
        task = self._bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            self._bar.update(task, completed=done, total=total)

        return update

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()


#: How deep cp follows a guest directory tree: the guest says what is in it, and a hostile one
#: could report directories without end.
MAX_GUEST_TREE_DEPTH = 64


async def _walk_guest(
    client: GuestClient, top: str, depth: int = 0
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    if depth >= MAX_GUEST_TREE_DEPTH:
        raise UsageError(
            f"the guest directory {top} is more than {MAX_GUEST_TREE_DEPTH} levels deep: copy a part of it"
        )
    for entry in await client.list(top):
        path = f"{top.rstrip('/')}/{entry['name']}"
        yield path, entry
        if entry["type"] == "dir":
            async for item in _walk_guest(client, path, depth + 1):
                yield item


async def cmd_cp(reactor: Any, args: argparse.Namespace) -> int:
    source, destination = _location(args.source), _location(args.destination)
    if (source.vm is None) == (destination.vm is None):
        raise UsageError("cp copies between the host and a guest: write the guest side as NAME:/path")
    name = source.vm or destination.vm
    assert name is not None
    driver = await _driver(reactor, args)
    client = await _agent(reactor, args, driver, name)
    progress = _Progress()
    copied: list[dict[str, Any]] = []
    try:
        if destination.vm is not None:
            await _push(client, Path(source.path), destination.path, progress, copied)
        else:
            await _pull(client, source.path, Path(destination.path), progress, copied)
    finally:
        progress.stop()
        client.close()
    total = sum(c["size"] for c in copied)
    _emit(args, copied, lambda: f"copied {len(copied)} file(s), {total} bytes, checked end to end")
    return 0


async def _push(
    client: GuestClient, source: Path, target: str, progress: _Progress, copied: list[Any]
) -> None:
    if not source.exists():
        raise PathNotFound(f"no host file or directory {source}")
    if source.is_dir():
        await client.mkdir(target, parents=True)
        for entry in sorted(source.iterdir()):
            await _push(client, entry, f"{target.rstrip('/')}/{entry.name}", progress, copied)
        return
    result = await client.push(str(source), target, progress=progress.callback(source.name))
    copied.append({"from": str(source), "to": target, "size": result.size, "sha256": result.sha256})


async def _pull(
    client: GuestClient, source: str, target: Path, progress: _Progress, copied: list[Any]
) -> None:
    info = await client.stat(source)
    if info["type"] == "dir":
        target.mkdir(parents=True, exist_ok=True)
        async for path, entry in _walk_guest(client, source):
            relative = PurePosixPath(path).relative_to(source)
            local = target.joinpath(*relative.parts)
            if entry["type"] == "dir":
                local.mkdir(exist_ok=True)
            elif entry["type"] == "file":
                await _pull_file(client, path, local, progress, copied)
        return
    await _pull_file(client, source, target, progress, copied)


async def _pull_file(
    client: GuestClient, source: str, target: Path, progress: _Progress, copied: list[Any]
) -> None:
    result = await client.pull(source, str(target), progress=progress.callback(PurePosixPath(source).name))
    copied.append({"from": source, "to": str(target), "size": result.size, "sha256": result.sha256})


# -- image and demo ----------------------------------------------------------------------------


async def cmd_image(reactor: Any, args: argparse.Namespace) -> int:
    _say(f"finding or building the {args.agent} guest image (the first build takes about a minute)")
    image = await build_image(reactor, force=args.force, agent=args.agent, log=_say)
    _emit(args, image, lambda: f"guest image {image.image_id} in {image.directory}")
    return 0


async def cmd_demo(reactor: Any, args: argparse.Namespace) -> int:
    await _demo(reactor, args)
    return 0


class _Steps:
    """Prints each step of the demo with the time it took."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    async def run(self, title: str, step: Callable[[], Awaitable[Any]]) -> Any:
        print(f"==> {title} ...", flush=True)
        began = time.monotonic()
        result = await step()
        print(f"    done in {time.monotonic() - began:.2f} s", flush=True)
        return result

    def total(self) -> None:
        print(f"==> all done in {time.monotonic() - self.start:.1f} s", flush=True)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def _demo(reactor: Any, args: argparse.Namespace) -> None:
    steps = _Steps()
    image = await steps.run("build or reuse the default guest image", lambda: build_image(reactor))
    print(f"    image {image.directory}")
    driver = await _driver(reactor, args)
    name = args.name
    if name in await driver.list_vms():
        await steps.run(f"remove the VM {name} left by an earlier run", lambda: driver.undefine(name))
    spec = image.vm_spec(name, **({"accel": args.accel} if args.accel else {}))
    await steps.run(f"define VM {name}", lambda: driver.define(spec))
    await steps.run("boot it", lambda: driver.start(name))
    client: GuestClient = await steps.run(
        "wait for the guest agent", lambda: connect_vm_agent(reactor, driver, name)
    )
    try:
        info = await client.info()
        print(f"    agent {info.get('agent_version')} on {info.get('hostname')}, kernel {info.get('kernel')}")
        result = await steps.run("exec uname -a", lambda: client.run(["uname", "-a"], check=True))
        print("    " + result.stdout.decode().strip())
        with tempfile.TemporaryDirectory() as scratch:
            source = os.path.join(scratch, "input.bin")
            with open(source, "wb") as f:
                f.write(os.urandom(16 * 1024 * 1024))
            pushed = await steps.run("push a 16 MiB file", lambda: client.push(source, "/root/input.bin"))
            back = os.path.join(scratch, "output.bin")
            await steps.run("pull it back", lambda: client.pull("/root/input.bin", back))
            # The guest's own sha256sum, not our agent's word (it checks with CRC-32).
            summed = await client.run(["sha256sum", "/root/input.bin"], check=True)
            in_guest = summed.stdout.decode().split()[0]
            local, returned = _sha256(source), _sha256(back)
            print(f"    sha256 sent     {local}")
            print(f"    sha256 in guest {in_guest} (sha256sum)")
            print(f"    sha256 pulled   {returned}")
            if not local == pushed.sha256 == in_guest == returned:
                raise VMControllerError("the file changed on its round trip through the guest")
        await steps.run("take snapshot 'demo'", lambda: driver.snapshot_create(name, "demo"))
        await steps.run("delete the file in the guest", lambda: client.remove("/root/input.bin"))
        client.close()
        await steps.run("revert to snapshot 'demo'", lambda: driver.snapshot_revert(name, "demo"))
        client = await steps.run("reconnect to the agent", lambda: connect_vm_agent(reactor, driver, name))
        info_after = await client.stat("/root/input.bin")
        print(
            f"    /root/input.bin is back after the revert: {info_after['size']} bytes, "
            f"mode {_mode(info_after['mode'])}"
        )
    finally:
        client.close()
    await steps.run("shut the VM down (ACPI)", lambda: driver.shutdown(name, wait=True, timeout=120))
    state = await driver.state(name)
    print(f"    state: {state.value}")
    if state is not VMState.SHUTOFF:
        raise VMControllerError(f"the VM is {state.value} after the shutdown")
    if not args.keep:
        await steps.run(f"remove VM {name}", lambda: driver.undefine(name))
    steps.total()


# -- the command line --------------------------------------------------------------------------


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], Awaitable[int]]] = {
    "demo": cmd_demo,
    "image": cmd_image,
    "list": cmd_list,
    "define": cmd_define,
    "undefine": cmd_undefine,
    "start": cmd_lifecycle,
    "stop": cmd_lifecycle,
    "pause": cmd_lifecycle,
    "resume": cmd_lifecycle,
    "reset": cmd_lifecycle,
    "save": cmd_lifecycle,
    "snapshot": cmd_snapshot,
    "info": cmd_info,
    "watch": cmd_watch,
    "ping": cmd_ping,
    "exec": cmd_exec,
    "shell": cmd_shell,
    "cp": cmd_cp,
}


def parser() -> argparse.ArgumentParser:
    """The command line of ``vmcontroller``."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given before the command or after it, the one given wins over the default.
    common.add_argument(
        "--driver",
        default=argparse.SUPPRESS,
        help=f"hypervisor driver (default libvirt; installed: {', '.join(installed_drivers()) or 'none'})",
    )
    common.add_argument(
        "--uri", default=argparse.SUPPRESS, help="the hypervisor's URI (the driver's default)"
    )
    common.add_argument(
        "--driver-option",
        action="append",
        default=argparse.SUPPRESS,
        metavar="NAME=VALUE",
        help="an option of the driver, as its constructor names it (e.g. product=player for "
        "vmware, backend=vboxmanage for virtualbox); repeat for more",
    )
    common.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS, help="seconds to wait for the agent (default 180)"
    )
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--json", action="store_true", help="print the result as JSON")

    doc = (__doc__ or "").strip().split("\n\n")
    p = argparse.ArgumentParser(
        prog="vmcontroller",
        description=doc[0],
        epilog=doc[1],
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, parents=[common, *parents])

    def vm_name(q: argparse.ArgumentParser) -> None:
        q.add_argument("name", metavar="NAME", help="the VM's name (`vmcontroller list` shows them)")

    d = command("demo", "the main job end to end: boot, exec, copy in and out, snapshot, revert, stop")
    d.add_argument("--name", default=DEMO_VM, help="the demo VM's name (default %(default)s)")
    d.add_argument("--keep", action="store_true", help="keep the VM defined afterwards")
    d.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="CPU acceleration (default: the driver's)")
    i = command("image", "build the guest image, or find it in the cache", reading)
    i.add_argument("--force", action="store_true", help="build again even if cached")
    i.add_argument(
        "--agent", choices=AGENT_FORMS, default="package", help="the agent's form (default %(default)s)"
    )
    command("list", "the VMs of the driver and their states", reading)
    q = command("define", "create a VM (not started) from the guest image, flags or a spec file")
    vm_name(q)
    q.add_argument("--image", choices=["default", "bundle"], default="default", help="the guest image")
    q.add_argument("--spec", metavar="FILE", help="a JSON object of VMSpec fields (disk, kernel, ...)")
    q.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB (default 512)")
    q.add_argument("--vcpus", type=int, metavar="N", help="virtual CPUs (default 1)")
    q.add_argument("--cpu-cap", type=int, metavar="PERCENT", help="cap on each vCPU's host CPU use")
    q.add_argument("--nat", action="store_true", help="a NAT network card")
    q.add_argument(
        "--serial", action="append", metavar="PORT", help="a serial port for the agent (repeatable)"
    )
    q.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="CPU acceleration (default auto)")
    q = command("undefine", "remove a VM with its disk and snapshots (refused if it runs or has snapshots)")
    vm_name(q)
    q.add_argument("--force", action="store_true", help="remove it even so")
    q = command("start", "boot a VM, or resume a saved one")
    vm_name(q)
    q.add_argument("--wait-agent", action="store_true", help="then wait until its agent answers")
    q = command("stop", "shut a VM down: ACPI power button, then wait")
    vm_name(q)
    q.add_argument("--grace", type=float, default=120.0, help="seconds to wait (default %(default)g)")
    q.add_argument("--force", action="store_true", help="power it off at once instead")
    for name, summary in (
        ("pause", "freeze a VM's CPUs (memory stays)"),
        ("resume", "unfreeze a paused VM"),
        ("reset", "hard-reset a VM (no clean shutdown)"),
        ("save", "checkpoint a VM to disk and stop it; `start` resumes it"),
    ):
        vm_name(command(name, summary))
    s = command("snapshot", "create, list, revert to or delete snapshots")
    actions = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, summary in (
        ("create", "take a snapshot (with memory if the VM runs)"),
        ("revert", "return the VM to a snapshot"),
        ("delete", "delete a snapshot (its children stay)"),
        ("list", "a VM's snapshots, oldest first"),
    ):
        a = actions.add_parser(
            action,
            help=summary,
            description=summary,
            parents=[common, *([reading] if action == "list" else [])],
        )
        vm_name(a)
        if action != "list":
            a.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot's name")
        if action == "create":
            a.add_argument("--description", help="free text kept with it")
    vm_name(command("info", "a VM's state, and what its agent says of the guest", reading))
    w = command("watch", "print state changes as they happen, until Ctrl-C", reading)
    w.add_argument("name", metavar="NAME", nargs="?", help="one VM (default: every VM)")
    vm_name(command("ping", "check that a VM's agent answers", reading))
    e = command("exec", "run a command in the guest, its output streamed, its exit status ours")
    vm_name(e)
    e.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="environment (repeatable)"
    )
    e.add_argument("--cwd", metavar="DIR", help="the guest directory to run in")
    e.add_argument("--exec-timeout", type=float, metavar="S", help="kill it after S seconds")
    e.add_argument("--no-stdin", action="store_true", help="do not forward this stdin (a pipe or file)")
    e.add_argument(
        "-t", "--tty", action="store_true",
        help="run it on a terminal in the guest, this one in raw mode, as shell does (stdin must be one)",
    )
    e.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="COMMAND ...", help="the command and its arguments"
    )
    h = command(
        "shell",
        "an interactive shell in the guest on a terminal of its own (a pty), until you exit it; "
        "its exit status is ours",
    )
    vm_name(h)
    h.add_argument(
        "--command", dest="command_line", metavar="CMD",
        help="run CMD with /bin/sh -c on the terminal instead (default: the guest's bash, else sh, "
        "as a login shell)",
    )
    c = command("cp", "copy files or directories between the host and a guest (NAME:/path)", reading)
    c.add_argument("source", metavar="SOURCE", help="a host path, or NAME:/guest/path")
    c.add_argument("destination", metavar="DESTINATION", help="a host path, or NAME:/guest/path")
    return p


def _exit_code(error: BaseException) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(error, cls))


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    for python, cli in _CLI_HINTS:
        message = message.replace(python, cli)
    if isinstance(error, HypervisorUnavailable):
        message += " (`bash scripts/setup-host.sh` sets up libvirt on Debian)"
    if isinstance(error, VMAlreadyExists):
        message += "; `vmcontroller undefine NAME` removes the old one"
    return message


async def run_command(reactor: Any, args: argparse.Namespace) -> int:
    """Run the parsed command; our errors become one line on stderr and the exit status."""
    try:
        return await COMMANDS[args.command](reactor, args)
    except VMControllerError as e:
        print(f"vmcontroller: error: {_one_line(e)}", file=sys.stderr)
        return _exit_code(e)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line parsed, with the defaults of the options a command does not take."""
    args = parser().parse_args(argv)
    for name, default in (("driver", "libvirt"), ("uri", None), ("timeout", 180.0), ("driver_option", [])):
        if not hasattr(args, name):
            setattr(args, name, default)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    status: list[int] = []

    async def run(reactor: Any) -> None:
        status.append(await run_command(reactor, args))

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit(status[0] if status else 1)


if __name__ == "__main__":
    main()
