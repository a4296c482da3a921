"""
``vmwrapper`` on the host, driven as the BOINC client drives an application: its slot
directory, ``init_data.xml`` and the shared-memory channels, with this test as the client.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmcontroller import boinc

# A BOINC-style application: counts to STEPS, one step per 0.1 s, writing its fraction done,
# keeping a checkpoint file so that a restart resumes where it was, and its pid.
# Its files are written whole or not at all: the tests and a restarted worker read them.
PUT_WHOLE = """\
def put(name, text):
    with open(name + ".new", "w") as f:
        f.write(text)
    os.replace(name + ".new", name)
"""
WORKER = """\
import os, sys, time
steps = int(sys.argv[1])
""" + PUT_WHOLE + """\
put("worker.pid", str(os.getpid()))
done = int(open("worker.ckpt").read()) if os.path.exists("worker.ckpt") else 0
while done < steps:
    time.sleep(0.1)
    done += 1
    print("step", done, flush=True)
    put("worker.ckpt", str(done))
    put("progress", str(done / steps))
"""


def job_xml(steps: int, second_task: str = "") -> str:
    return f"""<job_desc>
  <task>
    <application>{sys.executable}</application>
    <command_line>worker.py {steps}</command_line>
    <stdout_filename>out.txt</stdout_filename>
    <checkpoint_filename>worker.ckpt</checkpoint_filename>
    <fraction_done_filename>progress</fraction_done_filename>
  </task>
  {second_task}
</job_desc>"""


@pytest.fixture
def slot(tmp_path: Path) -> Path:
    (tmp_path / "worker.py").write_text(WORKER)
    return tmp_path


def start_wrapper(slot: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmcontroller.wrapper", "--slot", str(slot)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


HEARTBEAT = "<heartbeat/><wss>3.600000e+07</wss><max_wss>1.200000e+10</max_wss>"


class StandInClient:
    """
    The client's side of the slot: heartbeats, requests, and the app_status it reads, as the
    real client (BOINC 7.20, ``client/app_control.cpp``) does them: ``send_heartbeats`` sends
    ``<heartbeat/>`` with the working set sizes every second, ``suspend``/``unsuspend``/
    ``request_exit``/``request_abort`` send ``<suspend/>``, ``<resume/>``, ``<quit/>``,
    ``<abort/>`` on ``process_control_request``. ``tests/local/test_boinc_client.py`` runs the
    wrapper under the real client; this stand-in drives the same channels message by message.
    """

    def __init__(self, slot: Path) -> None:
        (slot / boinc.INIT_DATA_FILE).write_text(
            "<app_init_data><slot>0</slot><wu_name>test_wu</wu_name>"
            "<checkpoint_period>60</checkpoint_period></app_init_data>"
        )
        self.channels = boinc.ClientChannels.create(slot)
        self.fractions: list[float] = []

    def beat(self) -> None:
        self.channels.send_msg("heartbeat", HEARTBEAT)
        status = self.channels.get_msg("app_status")
        if status is not None:
            self.fractions.append(float(status.split("<fraction_done>")[1].split("<")[0]))

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Wait as a client waits: beating the heart and reading app_status meanwhile."""

        def beating() -> bool:
            self.beat()
            return condition()

        wait_for(beating, what, timeout)

    def ask(self, request: str) -> None:
        message = f"<{request}/>"
        wait_for(lambda: self.channels.send_msg("process_control_request", message), f"sending {request}")


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_plain_job_file_runs_its_tasks_on_the_host_like_boincs_wrapper(slot: Path) -> None:
    copy = "<task><application>/bin/sh</application>"
    copy += "<command_line>-c 'cp out.txt copy.txt'</command_line></task>"
    (slot / "job.xml").write_text(job_xml(5, copy))
    wrapper = start_wrapper(slot)
    output, _ = wrapper.communicate(timeout=120)
    assert wrapper.returncode == 0, output.decode()
    assert (slot / "copy.txt").read_text() == "".join(f"step {i}\n" for i in range(1, 6))
    assert (slot / boinc.FINISH_FILE).read_text() == "0\n"
    assert not (slot / "vmwrapper_state.json").exists()
    assert b"standalone" in output


def test_under_the_client_it_reports_progress_and_suspends_and_resumes(slot: Path) -> None:
    (slot / "job.xml").write_text(job_xml(40))
    client = StandInClient(slot)
    wrapper = start_wrapper(slot)
    try:
        client.wait_for(lambda: (slot / "worker.pid").exists(), "the worker")
        worker = int((slot / "worker.pid").read_text())
        client.wait_for(lambda: bool(client.fractions) and client.fractions[-1] > 0, "progress")
        client.ask("suspend")
        client.wait_for(lambda: process_state(worker) == "T", "the worker to stop")
        steps = (slot / "worker.ckpt").read_text()
        for _ in range(10):  # a second of heartbeats: a suspended job makes no progress
            client.beat()
            time.sleep(0.1)
        assert (slot / "worker.ckpt").read_text() == steps and process_state(worker) == "T"
        client.ask("resume")
        client.wait_for(lambda: wrapper.poll() is not None, "the job's end")
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        output = wrapper.communicate()[0].decode()
    assert wrapper.returncode == 0, output
    assert (slot / "out.txt").read_text().count("step 40\n") == 1
    assert client.fractions == sorted(client.fractions) and client.fractions[-1] > 0.5
    assert (slot / boinc.FINISH_FILE).read_text() == "0\n"


def test_abort_kills_the_task_and_finishes_with_boincs_status(slot: Path) -> None:
    (slot / "job.xml").write_text(job_xml(1000))
    client = StandInClient(slot)
    wrapper = start_wrapper(slot)
    client.wait_for(lambda: (slot / "worker.pid").exists(), "the worker")
    worker = int((slot / "worker.pid").read_text())
    client.ask("abort")
    assert wrapper.wait(timeout=60) == boinc.EXIT_ABORTED_BY_CLIENT
    assert (slot / boinc.FINISH_FILE).read_text().startswith(f"{boinc.EXIT_ABORTED_BY_CLIENT}\n")
    wait_for(lambda: not Path(f"/proc/{worker}").exists() or process_state(worker) == "Z", "the worker's end")


def test_killed_and_started_again_it_skips_the_tasks_already_done(slot: Path) -> None:
    count = "<task><application>/bin/sh</application><command_line>-c 'echo run >> runs.txt; sleep 3'"
    count += "</command_line></task>"
    slow = (
        "<task><application>/bin/sh</application><command_line>-c 'sleep 1; echo second >> runs.txt'"
        "</command_line></task>"
    )
    (slot / "job.xml").write_text(f"<job_desc>{count.replace('sleep 3', 'true')}{slow}{slow}</job_desc>")
    wrapper = start_wrapper(slot)
    runs_file = slot / "runs.txt"
    wait_for(lambda: runs_file.exists() and "second" in runs_file.read_text(), "task 2")
    os.kill(wrapper.pid, signal.SIGKILL)
    wrapper.wait()
    again = start_wrapper(slot)
    assert again.wait(timeout=120) == 0
    runs = (slot / "runs.txt").read_text().split()
    # The first task ran once: the second run of the wrapper started at the first task not done.
    assert runs.count("run") == 1
    assert runs.count("second") >= 2


@pytest.fixture(autouse=True)
def _no_leftover_workers(slot: Path) -> Iterator[None]:
    yield
    pid_file = slot / "worker.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
