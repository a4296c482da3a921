"""
``vmwrapper``: the reference job wrapper, what a BOINC project deploys with this library (the
paper's VMwrapper; BOINC's ``vboxwrapper`` in production).

It reads BOINC's standard wrapper job file, ``job.xml`` (:class:`JobFile`): a ``<job_desc>``
of ``<task>`` elements. Without a ``<vm>`` element the tasks run on the host, one after the
other, as BOINC's own ``wrapper`` runs them. With one, they run in a VM that the wrapper boots
on any installed driver: it copies the inputs in, runs each task's command in the guest,
reports fraction done and CPU time to the BOINC client, takes a checkpoint (a snapshot with
memory) at the volunteer's interval, follows the client's suspend, resume, quit and abort
requests, copies the outputs out, stops and deletes the VM and exits with the job's status.

Everything it needs to go on is in ``vmwrapper_state.json`` in the slot directory, written
atomically at each step: killed and started again, it re-attaches to the VM (still running, or
saved, or brought back to its last checkpoint) instead of starting over.

It talks to the client through BOINC's conventions (:mod:`vmcontroller.boinc`) and runs
standalone when there is no client (no ``init_data.xml`` in the slot directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import signal
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater, react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

from vmcontroller import boinc
from vmcontroller.errors import (
    AgentUnreachable,
    HypervisorUnavailable,
    VMControllerError,
    VMLocked,
    VMNotFound,
    VMTimeout,
)

__all__ = [
    "STATE_FILE",
    "HostTask",
    "JobFile",
    "JobFileError",
    "Task",
    "VMSettings",
    "WrapperState",
    "main",
]

STATE_FILE = "vmwrapper_state.json"
#: vboxwrapper's own job file, read for the options that apply here.
VBOX_JOB_FILE = "vbox_job.xml"
#: The client sends a heartbeat every second; without one for this long it is gone (BOINC's
#: applications exit then, as boinc_api.cpp's HEARTBEAT_TIMEOUT).
HEARTBEAT_TIMEOUT = 30.0
#: Seconds between two looks at the job (fraction done, CPU time, requests).
POLL_INTERVAL = 1.0
#: The client reads app_status every second: a report waits at most this long for it to.
REPORT_WAIT = 2.5
#: Errors that may pass (a busy host, a hypervisor restarting): under the client the wrapper
#: asks to be started again after TEMPORARY_EXIT_DELAY seconds instead of failing the job, as
#: vboxwrapper does when a VM does not come up in time.
TRANSIENT_ERRORS = (AgentUnreachable, HypervisorUnavailable, VMLocked, VMTimeout)
TEMPORARY_EXIT_DELAY = 60
#: Where the guest keeps each task's output, status and pid.
GUEST_RUN_DIR = "/var/lib/vmwrapper"
CHECKPOINT_PREFIX = "vmwrapper-checkpoint-"
SETSID = "/usr/bin/setsid"

log = Logger()


class JobFileError(VMControllerError):
    """The job file is not what the wrapper can run."""


@dataclass(frozen=True)
class Task:
    """
    One ``<task>`` of the job file (BOINC wrapper's elements). With a VM, ``application`` and
    ``command_line`` run in the guest and ``fraction_done_filename`` names a guest file.
    """

    application: str
    command_line: str = ""
    stdin_filename: str = ""
    stdout_filename: str = ""
    stderr_filename: str = ""
    checkpoint_filename: str = ""
    fraction_done_filename: str = ""
    weight: float = 1.0
    setenv: tuple[tuple[str, str], ...] = ()

    @property
    def argv(self) -> list[str]:
        return [self.application, *shlex.split(self.command_line)]


@dataclass(frozen=True)
class VMSettings:
    """
    The job file's ``<vm>`` element (our own tags) and vboxwrapper's options that apply.

    :ivar image: ``default`` (the guest image built here), or ``bundle`` (the same without
        Debian's Twisted, with the single-file agent).
    :ivar copy_in: (host path relative to the slot, guest path) pairs copied in before the tasks.
    :ivar copy_out: (guest path, host path relative to the slot) pairs copied out after them.
    :ivar checkpoint: how checkpoints are taken: a snapshot with memory (``snapshot``) or a
        save to disk and start again (``save``).
    """

    image: str = "default"
    driver: str = "libvirt"
    uri: str | None = None
    memory_mib: int = 512
    vcpus: int = 1
    network: bool = False
    working_directory: str = "/root"
    copy_in: tuple[tuple[str, str], ...] = ()
    copy_out: tuple[tuple[str, str], ...] = ()
    checkpoint: Literal["snapshot", "save"] = "snapshot"
    minimum_checkpoint_interval: float = 600.0
    job_duration: float | None = None
    completion_trigger_file: str = ""
    #: vboxwrapper's: the guest file with the fraction done, for tasks that name none.
    fraction_done_filename: str = ""


@dataclass(frozen=True)
class JobFile:
    tasks: tuple[Task, ...]
    vm: VMSettings | None = None

    @classmethod
    def parse(cls, text: str, vbox_job: str | None = None) -> JobFile:
        """
        Parse ``job.xml`` (and ``vbox_job.xml``'s options, if given).

        :raises JobFileError: not XML, no task, a task without ``application``, a bad number.
        """
        root = _xml(text, "job.xml")
        tasks = tuple(_task(element) for element in root.findall("task"))
        if not tasks:
            raise JobFileError("job.xml has no <task>: give at least one, with its <application>")
        vm_element = root.find("vm")
        if vm_element is None:
            return cls(tasks)
        options: dict[str, Any] = {}
        for source in (root, vm_element, *((_xml(vbox_job, VBOX_JOB_FILE),) if vbox_job else ())):
            options.update(_vbox_options(source))
        return cls(tasks, _vm_settings(vm_element, options))


def _xml(text: str, what: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as e:
        raise JobFileError(f"{what} is not well-formed XML: {e}") from None


def _number(element: ET.Element, tag: str, default: float | None) -> float | None:
    value = element.findtext(tag)
    if value is None or not value.strip():
        return default
    try:
        return float(value)
    except ValueError:
        raise JobFileError(f"<{tag}> is {value.strip()!r}: give a number") from None


def _task(element: ET.Element) -> Task:
    application = (element.findtext("application") or "").strip()
    if not application:
        raise JobFileError("a <task> has no <application>: name the program it runs")
    env = []
    for setenv in element.findall("setenv"):
        name, sep, value = (setenv.text or "").partition("=")
        if not sep or not name.strip():
            raise JobFileError(f"<setenv>{setenv.text}</setenv>: write NAME=VALUE")
        env.append((name.strip(), value))

    def text(tag: str) -> str:
        return (element.findtext(tag) or "").strip()

    return Task(
        application=application,
        command_line=text("command_line"),
        stdin_filename=text("stdin_filename"),
        stdout_filename=text("stdout_filename"),
        stderr_filename=text("stderr_filename"),
        checkpoint_filename=text("checkpoint_filename"),
        fraction_done_filename=text("fraction_done_filename"),
        weight=_number(element, "weight", 1.0) or 1.0,
        setenv=tuple(env),
    )


def _vbox_options(element: ET.Element) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for tag in ("minimum_checkpoint_interval", "job_duration"):
        number = _number(element, tag, None)
        if number is not None:
            found[tag] = number
    for tag in ("completion_trigger_file", "fraction_done_filename"):
        text = (element.findtext(tag) or "").strip()
        if text:
            found[tag] = text
    return found


def _vm_settings(element: ET.Element, options: dict[str, Any]) -> VMSettings:
    def text(tag: str, default: str) -> str:
        return (element.findtext(tag) or "").strip() or default

    def pairs(tag: str, first: str, second: str) -> tuple[tuple[str, str], ...]:
        found = []
        for item in element.findall(tag):
            a, b = item.get(first), item.get(second)
            if not a or not b:
                raise JobFileError(f'<{tag}> needs both {first}="..." and {second}="..."')
            found.append((a, b))
        return tuple(found)

    checkpoint = text("checkpoint", "snapshot")
    if checkpoint not in ("snapshot", "save"):
        raise JobFileError(f"<checkpoint>{checkpoint}</checkpoint>: use snapshot or save")
    for _, host in pairs("copy_out", "guest", "host"):
        _slot_relative(host)
    return VMSettings(
        image=text("image", "default"),
        driver=text("driver", "libvirt"),
        uri=text("uri", "") or None,
        memory_mib=int(_number(element, "memory_mb", 512) or 512),
        vcpus=int(_number(element, "vcpus", 1) or 1),
        network=text("network", "0") not in ("0", "false", "no"),
        working_directory=text("working_directory", "/root"),
        copy_in=pairs("copy_in", "host", "guest"),
        copy_out=pairs("copy_out", "guest", "host"),
        checkpoint=checkpoint,  # type: ignore[arg-type]
        minimum_checkpoint_interval=options.get("minimum_checkpoint_interval", 600.0),
        job_duration=options.get("job_duration"),
        completion_trigger_file=options.get("completion_trigger_file", ""),
        fraction_done_filename=options.get("fraction_done_filename", ""),
    )


def _slot_relative(path: str) -> str:
    # Outputs land in the slot directory, nowhere else: the job file comes from a project.
    if os.path.isabs(path) or ".." in Path(path).parts:
        raise JobFileError(f"{path!r}: a host path in the job file must be relative to the slot directory")
    return path


def _slot_file(slot: Path, name: str) -> Path:
    """The host file a job file's name stands for: in the slot, or where the client's soft link
    there leads (an input or output file of the workunit, in the project directory)."""
    return boinc.resolve_filename(slot, _slot_relative(name))


# -- what survives the wrapper ------------------------------------------------------------------


@dataclass
class WrapperState:
    """What ``vmwrapper_state.json`` holds; written atomically after each step."""

    tasks_done: int = 0
    #: CPU seconds of the finished tasks, and of the job at the last checkpoint.
    cpu_done: float = 0.0
    checkpoint_cpu: float = 0.0
    vm: str | None = None
    inputs_copied: bool = False
    #: Whether task ``tasks_done`` was started (in the guest: it runs detached there).
    task_started: bool = False
    checkpoint: str | None = None
    exit_status: int = 0
    started_at: float | None = None
    history: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, slot: Path) -> WrapperState:
        path = slot / STATE_FILE
        if not path.exists():
            return cls()
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise JobFileError(f"{path} is damaged ({e}); remove it to start the job over") from None

    def save(self, slot: Path) -> None:
        partial = slot / f".{STATE_FILE}.partial"
        partial.write_text(json.dumps(asdict(self)))
        os.replace(partial, slot / STATE_FILE)

    def note(self, slot: Path, event: str) -> None:
        """Record ``event`` in the history (what the tests and the operator read) and save."""
        self.history.append(event)
        self.save(slot)


# -- the client, or nobody ----------------------------------------------------------------------


class Client:
    """The BOINC client through its slot-directory conventions, or nothing when standalone."""

    def __init__(self, slot: Path, clock: Any) -> None:
        self.slot = slot
        self.clock = clock
        init = slot / boinc.INIT_DATA_FILE
        self.init = boinc.InitData.parse(init.read_text()) if init.exists() else boinc.InitData()
        self.channels = boinc.ClientChannels(slot) if (slot / boinc.MMAP_FILE).exists() else None
        self.last_heartbeat = clock.seconds()
        self._pending: list[boinc.ClientRequest] = []
        # The channels are read every second whatever the wrapper is doing (a VM boots for
        # minutes under TCG): the client takes an application that leaves a request unread for
        # 180 s for hung and kills it (process_control_poll, client/app_control.cpp).
        self._reader = LoopingCall(self._read)
        self._reader.clock = clock

    def start(self) -> None:
        """Start reading the client's channels."""
        if self.channels is not None:
            self._reader.start(POLL_INTERVAL)

    def stop(self) -> None:
        if self._reader.running:
            self._reader.stop()

    def _read(self) -> None:
        assert self.channels is not None
        if self.channels.heartbeat():
            self.last_heartbeat = self.clock.seconds()
        self._pending.extend(self.channels.requests())

    @property
    def standalone(self) -> bool:
        return self.channels is None

    def poll(self) -> list[boinc.ClientRequest]:
        """The client's requests since the last poll; a client gone silent means quit."""
        if self.channels is None:
            return []
        self._read()
        requests, self._pending = self._pending, []
        for request in requests:
            log.info("The BOINC client asks the job to {request}", request=request.value)
        if self.clock.seconds() - self.last_heartbeat > HEARTBEAT_TIMEOUT:
            log.warn("No heartbeat from the BOINC client for {s:g} s: quitting", s=HEARTBEAT_TIMEOUT)
            requests.append(boinc.ClientRequest.QUIT)
        return requests

    def report(self, cpu: float, checkpoint_cpu: float, fraction: float) -> bool:
        """Put the job's status on ``app_status``; say whether it went (the channel was free)."""
        if self.channels is None:
            return True
        start, end = self.init.fraction_done_start, self.init.fraction_done_end
        # The CPU time of earlier runs is in the state file, as BOINC's wrapper keeps it in its
        # checkpoint file; init_data.xml's wu_cpu_time (the client's checkpoint_cpu_time,
        # client/app_start.cpp) counts the same seconds again, so it is not added.
        message = boinc.app_status_message(cpu, checkpoint_cpu, start + (end - start) * fraction)
        return self.channels.send_msg("app_status", message)

    async def report_task_end(self, cpu: float, checkpoint_cpu: float, fraction: float) -> None:
        """
        Report the status at a task's end, waiting up to :data:`REPORT_WAIT` seconds for the
        client to take the previous report: the client reads the channel once more when the
        application has exited (``handle_exited_app``) and takes the job's final CPU time from it.
        """
        deadline = self.clock.seconds() + REPORT_WAIT
        while not self.report(cpu, checkpoint_cpu, fraction) and self.clock.seconds() < deadline:
            await deferLater(self.clock, 0.1, lambda: None)

    def finish(self, status: int, message: str = "") -> None:
        boinc.write_finish_file(self.slot, status, message)


class _Quit(Exception):
    """The client asked the wrapper to quit (it starts it again later)."""


class _Abort(Exception):
    """The client aborted the job."""


# -- tasks on the host --------------------------------------------------------------------------


class HostTask(ProcessProtocol):
    """One task run on the host, in a process group of its own (suspended and resumed whole)."""

    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        if isinstance(reason.value, ProcessDone):
            self.ended.callback(0)
        elif isinstance(reason.value, ProcessTerminated):
            code = reason.value.exitCode
            self.ended.callback(code if code is not None else 128 + (reason.value.signal or 0))


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime: the fields 14 to 17 of proc(5), 12 to 15 after the name.
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _read_fraction(text: str) -> float | None:
    try:
        value = float(text.split()[0])
    except (ValueError, IndexError):
        return None
    return min(max(value, 0.0), 1.0)


async def run_on_host(reactor: Any, slot: Path, job: JobFile, client: Client, state: WrapperState) -> int:
    total_weight = sum(t.weight for t in job.tasks)
    while state.tasks_done < len(job.tasks):
        task = job.tasks[state.tasks_done]
        done_weight = sum(t.weight for t in job.tasks[: state.tasks_done])
        status, cpu = await _host_task(reactor, slot, task, client, state, done_weight, total_weight)
        if status != 0:
            state.exit_status = status
            state.note(slot, f"task {state.tasks_done} failed with status {status}")
            return status
        state.tasks_done += 1
        state.cpu_done += cpu
        state.checkpoint_cpu = state.cpu_done
        state.note(slot, f"task {state.tasks_done - 1} done")
        # A finished task is a checkpoint: the client learns it from the new checkpoint CPU time.
        await client.report_task_end(
            state.cpu_done, state.checkpoint_cpu, (done_weight + task.weight) / total_weight
        )
    return 0


async def _host_task(
    reactor: Any,
    slot: Path,
    task: Task,
    client: Client,
    state: WrapperState,
    done_weight: float,
    total: float,
) -> tuple[int, float]:
    def open_fd(name: str, flags: int) -> int | None:
        return os.open(_slot_file(slot, name), flags, 0o644) if name else None

    fds = {
        0: open_fd(task.stdin_filename, os.O_RDONLY),
        1: open_fd(task.stdout_filename, os.O_WRONLY | os.O_CREAT | os.O_APPEND),
        2: open_fd(task.stderr_filename, os.O_WRONLY | os.O_CREAT | os.O_APPEND),
    }
    child_fds: dict[int, Any] = {n: (fd if fd is not None else ("r" if n else "w")) for n, fd in fds.items()}
    # A file of the app version is a soft link in the slot, as BOINC's wrapper resolves it.
    application = (
        task.application
        if os.path.isabs(task.application)
        else str(boinc.resolve_filename(slot, task.application))
    )
    if not os.path.exists(application):
        application = task.application  # a program on PATH, as BOINC's wrapper allows
    env = {**os.environ, **dict(task.setenv)}
    protocol = HostTask()
    # The task's exact CPU time once it is reaped (the wrapper runs one child at a time): the
    # samples from /proc miss a task that ends between two of them.
    children_cpu_before = _children_cpu_seconds()
    # setsid(1) execs the task in place (same pid) as the leader of a new session and process
    # group, which suspend, resume and kill then reach whole, children included.
    process = reactor.spawnProcess(
        protocol, SETSID, [SETSID, application, *task.argv[1:]], env=env, path=str(slot), childFDs=child_fds
    )
    for fd in fds.values():
        if fd is not None:
            os.close(fd)
    pid = process.pid
    cpu = fraction = 0.0
    suspended = False
    try:
        while not protocol.ended.called:
            for request in client.poll():
                if request is boinc.ClientRequest.SUSPEND and not suspended:
                    os.killpg(pid, signal.SIGSTOP)
                    suspended = True
                elif request is boinc.ClientRequest.RESUME and suspended:
                    os.killpg(pid, signal.SIGCONT)
                    suspended = False
                elif request in (boinc.ClientRequest.QUIT, boinc.ClientRequest.ABORT):
                    os.killpg(pid, signal.SIGKILL)
                    raise _Quit() if request is boinc.ClientRequest.QUIT else _Abort()
            cpu = max(cpu, _cpu_seconds(pid))
            if task.fraction_done_filename:
                with contextlib.suppress(OSError):
                    # A file caught while the task rewrites it (empty) leaves the last value.
                    read = _read_fraction((slot / task.fraction_done_filename).read_text())
                    fraction = fraction if read is None else read
            client.report(
                state.cpu_done + cpu, state.checkpoint_cpu, (done_weight + task.weight * fraction) / total
            )
            await deferLater(reactor, POLL_INTERVAL, lambda: None)
        status = await protocol.ended
        return status, max(cpu, _children_cpu_seconds() - children_cpu_before)
    finally:
        if not protocol.ended.called:
            await protocol.ended


# -- tasks in a VM ------------------------------------------------------------------------------


def _vm_name(client: Client) -> str:
    base = client.init.wu_name or client.slot.resolve().name
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in base).strip(".-") or "job"
    return f"vmwrapper-{cleaned}"[:60]


def _task_script(task: Task, index: int, workdir: str) -> bytes:
    """The guest side of a task: run detached, leaving its output and exit status in files."""
    d = f"{GUEST_RUN_DIR}/task-{index}"
    q = shlex.quote
    exports = "".join(f"export {q(name)}={q(value)}\n" for name, value in task.setenv)
    stdin = q(task.stdin_filename) if task.stdin_filename else "/dev/null"
    return (
        "#!/bin/sh\n"
        f"# Written by vmwrapper: task {index}, detached from the agent so that it outlives the wrapper.\n"
        f"echo $$ > {d}/pid\n"
        f"{exports}"
        f"cd {q(workdir)} && {shlex.join(task.argv)} < {stdin} > {d}/stdout 2> {d}/stderr\n"
        f"echo $? > {d}/exit_code.partial && mv {d}/exit_code.partial {d}/exit_code\n"
    ).encode()


def _status_script(index: int, fraction_file: str, trigger_file: str) -> str:
    d = f"{GUEST_RUN_DIR}/task-{index}"
    q = shlex.quote
    lines = [
        f"[ -f {d}/exit_code ] && echo exit $(head -c 16 {d}/exit_code)",
        f"[ -f {d}/pid ] && echo cpu $(ps -s $(head -c 16 {d}/pid) -o times= 2>/dev/null"
        " | awk '{s+=$1} END {print s+0}')",
    ]
    if fraction_file:
        lines.append(f"[ -f {q(fraction_file)} ] && echo fraction $(head -c 64 {q(fraction_file)})")
    if trigger_file:
        lines.append(f"[ -e {q(trigger_file)} ] && echo trigger")
    return "\n".join(lines) + "\ntrue\n"


@dataclass(frozen=True)
class GuestTaskStatus:
    exit_code: int | None = None
    cpu: float = 0.0
    fraction: float | None = None
    triggered: bool = False

    @classmethod
    def parse(cls, output: bytes) -> GuestTaskStatus:
        """Read the status script's output; the guest is not trusted, so anything odd is ignored."""
        status = cls()
        for line in output.decode("ascii", "replace").splitlines()[:8]:
            key, _, value = line.partition(" ")
            try:
                if key == "exit":
                    status = replace(status, exit_code=min(max(int(value), 0), 255))
                elif key == "cpu":
                    status = replace(status, cpu=max(float(value), 0.0))
                elif key == "fraction":
                    status = replace(status, fraction=_read_fraction(value))
                elif key == "trigger":
                    status = replace(status, triggered=True)
            except ValueError:
                continue
        return status


class VMJob:
    """One job in one VM: boot or re-attach, copy in, run the tasks, copy out, clean up."""

    def __init__(self, reactor: Any, slot: Path, job: JobFile, client: Client, state: WrapperState) -> None:
        assert job.vm is not None
        self.reactor = reactor
        self.slot = slot
        self.job = job
        self.settings = job.vm
        self.client = client
        self.state = state
        self.driver: Any = None
        self.agent: Any = None
        self.suspended = False
        self.last_checkpoint = reactor.seconds()

    @property
    def name(self) -> str:
        assert self.state.vm is not None
        return self.state.vm

    async def run(self) -> int:
        from hypervisors import load_driver

        options = {"uri": self.settings.uri} if self.settings.uri else {}
        self.driver = load_driver(self.settings.driver, self.reactor, **options)
        self.driver.startService()
        try:
            await self._boot_or_reattach()
            if not self.state.inputs_copied:
                for host, guest in self.settings.copy_in:
                    await self.agent.push(str(_slot_file(self.slot, host)), guest)
                self.state.inputs_copied = True
                self.state.note(self.slot, "inputs copied in")
            status = await self._tasks()
            for guest, host in self.settings.copy_out:
                target = _slot_file(self.slot, host)
                await self.agent.pull(guest, str(target))
            self.state.note(self.slot, "outputs copied out")
            await self._remove_vm()
            return status
        finally:
            if self.agent is not None:
                self.agent.close()
            await self.driver.stopService()

    async def _connect(self) -> None:
        from vmcontroller.machine import connect_vm_agent

        if self.agent is not None:
            self.agent.close()
        self.agent = await connect_vm_agent(self.reactor, self.driver, self.name, timeout=300)

    async def _boot_or_reattach(self) -> None:
        from hypervisors.interface import VMState

        if self.state.vm is not None:
            try:
                current = await self.driver.state(self.name)
            except VMNotFound:
                log.warn("The job's VM {vm} is gone: starting the job over", vm=self.state.vm)
                self.state = WrapperState(history=[*self.state.history, "VM lost: started over"])
            else:
                if current is VMState.PAUSED:
                    await self.driver.resume(self.name)
                elif current is VMState.SAVED:
                    await self.driver.start(self.name)
                elif not current.is_active:
                    if self.state.checkpoint is None:
                        await self.driver.start(self.name)  # it boots again: the tasks start over
                        self.state.task_started = False
                    else:
                        await self.driver.snapshot_revert(self.name, self.state.checkpoint)
                        if not (await self.driver.state(self.name)).is_active:
                            await self.driver.start(self.name)
                self.state.note(self.slot, f"re-attached to {self.state.vm} ({current.value})")
                await self._connect()
                return
        if self.settings.image not in ("default", "bundle"):
            raise JobFileError(f"<image>{self.settings.image}</image>: use default or bundle")
        from vmcontroller.images import build_image

        image = await build_image(
            self.reactor, agent="bundle" if self.settings.image == "bundle" else "package"
        )
        self.state.vm = _vm_name(self.client)
        self.state.started_at = self.reactor.seconds()
        spec = image.vm_spec(
            self.state.vm,
            memory_mib=self.settings.memory_mib,
            vcpus=self.settings.vcpus,
            nat_network=self.settings.network,
        )
        if self.state.vm in await self.driver.list_vms():
            await self.driver.undefine(self.state.vm)  # a VM of a run whose state file is gone
        await self.driver.define(spec)
        self.state.note(self.slot, f"defined {self.state.vm}")
        await self.driver.start(self.name)
        await self._connect()
        self.state.note(self.slot, "booted")

    async def _tasks(self) -> int:
        tasks = self.job.tasks
        total = sum(t.weight for t in tasks)
        while self.state.tasks_done < len(tasks):
            index = self.state.tasks_done
            task = tasks[index]
            if not self.state.task_started:
                await self._start_task(task, index)
            status = await self._watch(task, index, sum(t.weight for t in tasks[:index]), total)
            self.state.tasks_done += 1
            self.state.task_started = False
            self.state.note(self.slot, f"task {index} exited with {status}")
            done = sum(t.weight for t in tasks[: index + 1]) / total
            await self.client.report_task_end(self.state.cpu_done, self.state.checkpoint_cpu, done)
            await self._copy_task_output(task, index)
            if status != 0:
                return status
        return 0

    async def _start_task(self, task: Task, index: int) -> None:
        import io

        d = f"{GUEST_RUN_DIR}/task-{index}"
        await self.agent.run(["rm", "-rf", d], check=True)
        await self.agent.mkdir(d, parents=True)
        await self.agent.push(
            io.BytesIO(_task_script(task, index, self.settings.working_directory)), f"{d}/run.sh"
        )
        await self.agent.run(["sh", "-c", f"setsid sh {d}/run.sh </dev/null >/dev/null 2>&1 &"], check=True)
        self.state.task_started = True
        self.state.note(self.slot, f"task {index} started")

    async def _watch(self, task: Task, index: int, done_weight: float, total: float) -> int:
        fraction_file = task.fraction_done_filename or self.settings.fraction_done_filename
        if fraction_file and not fraction_file.startswith("/"):
            fraction_file = f"{self.settings.working_directory}/{fraction_file}"
        script = _status_script(index, fraction_file, self.settings.completion_trigger_file)
        cpu, fraction = 0.0, 0.0
        while True:
            for request in self.client.poll():
                await self._on_request(request)
            if not self.suspended:
                status = GuestTaskStatus.parse((await self.agent.run(["sh", "-c", script])).stdout)
                cpu = max(cpu, status.cpu)
                fraction = status.fraction if status.fraction is not None else fraction
                if status.exit_code is not None:
                    self.state.cpu_done += cpu
                    return status.exit_code
                if status.triggered or self._past_duration():
                    self.state.cpu_done += cpu
                    self.state.note(self.slot, f"task {index} complete by trigger or duration")
                    return 0
                self.client.report(
                    self.state.cpu_done + cpu,
                    self.state.checkpoint_cpu,
                    (done_weight + task.weight * fraction) / total,
                )
                if self.reactor.seconds() - self.last_checkpoint >= self._checkpoint_interval():
                    await self._checkpoint(self.state.cpu_done + cpu)
            await deferLater(self.reactor, POLL_INTERVAL, lambda: None)

    def _past_duration(self) -> bool:
        duration = self.settings.job_duration
        return (
            duration is not None
            and self.state.started_at is not None
            and (self.reactor.seconds() - self.state.started_at >= duration)
        )

    def _checkpoint_interval(self) -> float:
        return max(self.client.init.checkpoint_period, self.settings.minimum_checkpoint_interval)

    async def _checkpoint(self, cpu: float) -> None:
        previous = self.state.checkpoint
        if self.settings.checkpoint == "save":
            await self.driver.save_state(self.name)
            await self.driver.start(self.name)
            await self._connect()
            self.state.checkpoint = None
        else:
            count = len([h for h in self.state.history if h.startswith("checkpoint ")])
            name = f"{CHECKPOINT_PREFIX}{count + 1}"
            await self.driver.snapshot_create(self.name, name, "vmwrapper checkpoint")
            self.state.checkpoint = name
            if previous is not None:
                await self.driver.snapshot_delete(self.name, previous)
        self.state.checkpoint_cpu = cpu
        self.last_checkpoint = self.reactor.seconds()
        self.state.note(self.slot, f"checkpoint {self.state.checkpoint or 'saved state'}")

    async def _on_request(self, request: boinc.ClientRequest) -> None:
        if request is boinc.ClientRequest.SUSPEND and not self.suspended:
            await self.driver.pause(self.name)
            self.suspended = True
            self.state.note(self.slot, "suspended")
        elif request is boinc.ClientRequest.RESUME and self.suspended:
            await self.driver.resume(self.name)
            self.suspended = False
            self.state.note(self.slot, "resumed")
        elif request is boinc.ClientRequest.QUIT:
            from hypervisors.interface import Capability

            if Capability.SAVE_STATE in self.driver.capabilities:
                await self.driver.save_state(self.name)
            self.state.note(self.slot, "quit")
            raise _Quit()
        elif request is boinc.ClientRequest.ABORT:
            await self._remove_vm()
            self.state.note(self.slot, "aborted")
            raise _Abort()

    async def _copy_task_output(self, task: Task, index: int) -> None:
        d = f"{GUEST_RUN_DIR}/task-{index}"
        for guest, host in (("stdout", task.stdout_filename), ("stderr", task.stderr_filename)):
            if host:
                await self.agent.pull(f"{d}/{guest}", str(_slot_file(self.slot, host)))

    async def _remove_vm(self) -> None:
        from hypervisors.interface import VMState

        if self.agent is not None:
            self.agent.close()
            self.agent = None
        try:
            if (await self.driver.state(self.name)).is_active:
                try:
                    await self.driver.shutdown(self.name, timeout=60)
                except VMControllerError:
                    await self.driver.power_off(self.name)
            await self.driver.wait_for_state(self.name, VMState.SHUTOFF, timeout=60)
        finally:
            await self.driver.undefine(self.name)
        self.state.note(self.slot, f"removed {self.name}")


# -- entry point --------------------------------------------------------------------------------


async def run_job(reactor: Any, slot: Path, job_name: str) -> int:
    """Run (or resume) the job of the job file ``job_name`` in ``slot``; return the exit status."""
    # Under the client both files are soft links to the app version's files.
    vbox = boinc.resolve_filename(slot, VBOX_JOB_FILE)
    job = JobFile.parse(
        boinc.resolve_filename(slot, job_name).read_text(), vbox.read_text() if vbox.exists() else None
    )
    client = Client(slot, reactor)
    state = WrapperState.load(slot)
    if os.sched_getscheduler(0) == os.SCHED_IDLE:
        # The client runs applications so unless the app version says is_wrapper
        # (client/app_start.cpp): the wrapper then runs only when a CPU is otherwise idle, while
        # it has to answer the client and the hypervisor in time.
        log.warn(
            "vmwrapper runs in the SCHED_IDLE class: on a busy host it may not get to run; the "
            "project's app version should carry <is_wrapper/>"
        )
    log.info(
        "vmwrapper: workunit {wu}, {n} task(s) {where}, {mode}, resuming after {done} done",
        wu=client.init.wu_name or "(none)",
        n=len(job.tasks),
        where="in a VM" if job.vm else "on the host",
        mode="standalone" if client.standalone else "under the BOINC client",
        done=state.tasks_done,
    )
    client.start()
    try:
        if job.vm is None:
            status = await run_on_host(reactor, slot, job, client, state)
        else:
            status = await VMJob(reactor, slot, job, client, state).run()
    except _Quit:
        return 0  # the client starts the wrapper again later; the state file says where it was
    except _Abort:
        client.finish(boinc.EXIT_ABORTED_BY_CLIENT, "aborted by the client")
        return boinc.EXIT_ABORTED_BY_CLIENT
    except TRANSIENT_ERRORS as e:
        if client.standalone:
            raise
        # The state file is kept: started again, the wrapper goes on from where it was.
        log.warn("{error}: the client is to start the job again in {s} s", error=e, s=TEMPORARY_EXIT_DELAY)
        boinc.write_temporary_exit(slot, TEMPORARY_EXIT_DELAY, f"vmwrapper: {e}")
        return 0
    finally:
        client.stop()
    client.finish(status)
    (slot / STATE_FILE).unlink(missing_ok=True)
    return status


def parser() -> argparse.ArgumentParser:
    """The command line of ``vmwrapper``."""
    p = argparse.ArgumentParser(
        prog="vmwrapper",
        description="Run a BOINC job described by job.xml, on the host or in a VM, resuming "
        "from its last checkpoint when started again. Exit status: the job's; 194 when the "
        "BOINC client aborted it; 1 on an error (the message says what to do); 2 on bad usage.",
    )
    p.add_argument("--job", default="job.xml", help="the job file (default: %(default)s, in the slot)")
    p.add_argument("--slot", default=".", help="the slot directory (default: the current one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    slot = Path(args.slot).resolve()
    job_file = slot / args.job
    if not job_file.exists():
        print(f"vmwrapper: error: no job file {job_file}: write one, or give --job", file=sys.stderr)
        return 2
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    status: list[int] = []

    async def go(reactor: Any) -> None:
        try:
            status.append(await run_job(reactor, slot, args.job))
        except VMControllerError as e:
            # The state file is kept: started again, the wrapper goes on from where it was.
            print(f"vmwrapper: error: {e}", file=sys.stderr)
            status.append(1)

    try:
        react(lambda reactor: Deferred.fromCoroutine(go(reactor)))
    except SystemExit as e:
        if e.code:
            return int(e.code)
    return status[0] if status else 1


if __name__ == "__main__":
    sys.exit(main())
