"""
``vmwrapper`` run by the real BOINC client (Debian's ``boinc-client``), with no project server.

The client gets its work from a server's scheduler, but it keeps what it has in
``client_state.xml`` and reads it back at start (``client/cs_statefile.cpp``). :class:`RealClient`
writes a data directory as the client would have left it after downloading one job of a
project: an account file (a project without one is dropped, ``parse_state_file_aux``), the
project with no master file or scheduler RPC pending, the app, its version (our launcher as the
main program, ``job.xml`` as a file of the version, as BOINC's wrapper is deployed; flagged
``is_wrapper``, which spares it the idle scheduling class the client gives applications,
``client/app_start.cpp``), a workunit with an input file and a result in state "files
downloaded" with one output file. The master URL
is in ``.invalid``, which never resolves (RFC 2606): nothing reaches a server, and the finished
result waits for an upload that cannot happen, which does not matter here.

The client then does all the rest as in production: slot directory, soft links, ``init_data.xml``,
``boinc_mmap_file``, heartbeats, suspend/resume/quit requests, reading ``app_status`` and
``boinc_finish_called``. The tests look through its GUI RPC (``boinccmd`` on a Unix socket in the
data directory, no TCP port), its log and its state file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.local.test_wrapper_host import PUT_WHOLE

BOINC = shutil.which("boinc")
BOINCCMD = shutil.which("boinccmd")
needs_boinc = pytest.mark.skipif(
    BOINC is None or BOINCCMD is None,
    reason="the BOINC client is not installed: bash scripts/setup-host.sh installs Debian's boinc-client",
)
pytestmark = needs_boinc

MASTER_URL = "http://vmcontroller.invalid/test/"
#: The project's directory, as the client names it (escape_project_url in lib/url.cpp).
PROJECT_DIR = "projects/vmcontroller.invalid_test"
PASSWORD = "vmc-test"
VMWRAPPER = Path(sys.executable).with_name("vmwrapper")
# The app version's main program, what a project deploys: the wrapper is a Python program, so a
# script that starts it. The last line is never run (exec replaces the shell); BOINC's
# tools/update_versions looks for it ('strings FILE | egrep ^API_VERSION_x.y.z$') to give the
# version an API version, and the client maps boinc_mmap_file only for an API version of 6 or
# more (client/app_start.cpp); without one it uses System V shared memory, which the wrapper
# does not speak.
LAUNCHER = f"""#!/bin/sh
exec {VMWRAPPER} "$@"
API_VERSION_7.20.0
"""
# The application. "worker.py burn SECONDS" uses that much CPU time. "worker.py" reads how many
# steps from stdin (the workunit's input file) and does a step of CPU work every 0.1 s, writing
# each to stdout (the result's output file), its fraction done and its own checkpoint, so that a
# run started again goes on from there.
WORKER = """\
import os, sys, time
if sys.argv[1:2] == ["burn"]:
    while time.process_time() < float(sys.argv[2]):
        pass
    print("burnt", flush=True)
    sys.exit(0)
steps = int(sys.stdin.read())
""" + PUT_WHOLE + """\
put("worker.pid", str(os.getpid()))
done = int(open("worker.ckpt").read()) if os.path.exists("worker.ckpt") else 0
while done < steps:
    start = time.process_time()
    while time.process_time() - start < 0.01:
        pass
    time.sleep(0.1)
    done += 1
    print("step", done, flush=True)
    put("worker.ckpt", str(done))
    put("progress", str(done / steps))
"""


def job_xml(first_task_cpu: float) -> str:
    """Two tasks: one that uses ``first_task_cpu`` CPU seconds, then the worker."""
    return f"""<job_desc>
  <task>
    <application>{sys.executable}</application>
    <command_line>worker.py burn {first_task_cpu}</command_line>
    <stdout_filename>first.txt</stdout_filename>
  </task>
  <task>
    <application>{sys.executable}</application>
    <command_line>worker.py</command_line>
    <stdin_filename>steps.txt</stdin_filename>
    <stdout_filename>out.txt</stdout_filename>
    <fraction_done_filename>progress</fraction_done_filename>
    <weight>4</weight>
  </task>
</job_desc>
"""


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _file_info(path: Path, extra: str = "") -> str:
    data = path.read_bytes()
    return f"""<file_info>
  <name>{path.name}</name>
  <nbytes>{len(data)}</nbytes>
  <md5_cksum>{hashlib.md5(data).hexdigest()}</md5_cksum>
  <status>1</status>{extra}
</file_info>
"""


class RealClient:
    """The BOINC client in its own data directory, with one job of a local project."""

    def __init__(
        self, data: Path, job: str, inputs: dict[str, str], *, wu: str = "wu1", leave_apps_in_memory: bool
    ) -> None:
        """
        :param job: the app version's ``job.xml``.
        :param inputs: the workunit's input files, by the name the job opens them with.
        :param wu: the workunit's name (the wrapper names its VM after it).
        """
        self.data = data
        self.project = data / PROJECT_DIR
        self.project.mkdir(parents=True)
        self.wu, self.result = wu, f"{wu}_0"
        now = time.time()
        files = {
            "vmwrapper_launcher": LAUNCHER,
            "job_1.xml": job,
            "worker_1.py": WORKER,
            **{f"{wu}_{name}": text for name, text in inputs.items()},
        }
        for name, text in files.items():
            (self.project / name).write_text(text)
        (self.project / "vmwrapper_launcher").chmod(0o755)
        (data / "account_vmcontroller.invalid_test.xml").write_text(
            f"<account><master_url>{MASTER_URL}</master_url><authenticator>local</authenticator></account>"
        )
        # No server to report to: the client needs no network. The other machines' load must
        # not suspend the job (the default suspends above 25 % of CPU used by others).
        (data / "global_prefs_override.xml").write_text(
            "<global_preferences><suspend_cpu_usage>0</suspend_cpu_usage>"
            f"<leave_apps_in_memory>{int(leave_apps_in_memory)}</leave_apps_in_memory>"
            "</global_preferences>"
        )
        (data / "cc_config.xml").write_text(
            "<cc_config><log_flags><task/><task_debug/><cpu_sched/><checkpoint_debug/></log_flags>"
            "<options><dont_contact_ref_site>1</dont_contact_ref_site></options></cc_config>"
        )
        (data / "gui_rpc_auth.cfg").write_text(PASSWORD)
        (data / "client_state.xml").write_text(
            f"""<client_state>
<project>
  <master_url>{MASTER_URL}</master_url>
  <project_name>vmcontroller local test</project_name>
  <master_url_fetch_pending>0</master_url_fetch_pending>
  <sched_rpc_pending>0</sched_rpc_pending>
  <dont_request_more_work/>
</project>
<app><name>vmwrapper</name><user_friendly_name>vmwrapper</user_friendly_name></app>
{"".join(_file_info(self.project / name, "<executable/>" * (name == "vmwrapper_launcher")) for name in files)}
<file_info>
  <name>{self.result}_r0</name>
  <max_nbytes>1000000</max_nbytes>
  <url>http://vmcontroller.invalid/test_cgi/file_upload_handler</url>
</file_info>
<app_version>
  <app_name>vmwrapper</app_name>
  <version_num>100</version_num>
  <platform>x86_64-pc-linux-gnu</platform>
  <avg_ncpus>1</avg_ncpus>
  <api_version>7.20.0</api_version>
  <is_wrapper/>
  <file_ref><file_name>vmwrapper_launcher</file_name><main_program/></file_ref>
  <file_ref><file_name>job_1.xml</file_name><open_name>job.xml</open_name></file_ref>
  <file_ref><file_name>worker_1.py</file_name><open_name>worker.py</open_name><copy_file/></file_ref>
</app_version>
<workunit>
  <name>{wu}</name>
  <app_name>vmwrapper</app_name>
  <version_num>100</version_num>
  <rsc_fpops_est>1e18</rsc_fpops_est>
  <rsc_fpops_bound>1e18</rsc_fpops_bound>
  <rsc_memory_bound>1e9</rsc_memory_bound>
  <rsc_disk_bound>1e10</rsc_disk_bound>
  {"".join(f"<file_ref><file_name>{wu}_{n}</file_name><open_name>{n}</open_name></file_ref>" for n in inputs)}
</workunit>
<result>
  <name>{self.result}</name>
  <wu_name>{wu}</wu_name>
  <version_num>100</version_num>
  <platform>x86_64-pc-linux-gnu</platform>
  <state>2</state>
  <received_time>{now:f}</received_time>
  <report_deadline>{now + 7 * 86400:f}</report_deadline>
  <file_ref><file_name>{self.result}_r0</file_name><open_name>out.txt</open_name></file_ref>
</result>
</client_state>
"""
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def slot(self) -> Path:
        return self.data / "slots" / "0"

    def start(self) -> None:
        assert BOINC is not None
        with (self.data / "client.log").open("wb") as log:
            self.process = subprocess.Popen(
                [
                    BOINC,
                    "--dir",
                    str(self.data),
                    "--gui_rpc_unix_domain",  # a socket in the data directory, no TCP port
                    "--skip_cpu_benchmarks",
                    "--unsigned_apps_ok",  # the app version's files carry no signature
                    "--no_info_fetch",
                ],
                cwd=self.data,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process
        # The GUI RPC socket is set up before that line (client/main.cpp, initialize()).
        started = "Initialization completed"
        wait_for(lambda: started in self.log() or process.poll() is not None, "the client's start")
        assert process.poll() is None, f"the BOINC client exited at start:\n{self.log()}"

    def log(self) -> str:
        return (self.data / "client.log").read_text(errors="replace")

    def boinccmd(self, *args: str) -> str:
        assert BOINCCMD is not None
        # boinccmd takes --passwd before --unix_domain (client/boinc_cmd.cpp reads them in order),
        # and finds the socket in the current directory.
        done = subprocess.run(
            [BOINCCMD, "--passwd", PASSWORD, "--unix_domain", *args],
            cwd=self.data,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise AssertionError(f"boinccmd {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def task(self) -> dict[str, str]:
        """Our task as ``boinccmd --get_tasks`` shows it (GUI RPC get_results)."""
        fields: dict[str, str] = {}
        for line in self.boinccmd("--get_tasks").splitlines():
            key, sep, value = line.strip().partition(": ")
            if sep:
                fields[key] = value
        return fields

    def task_control(self, op: str) -> None:
        self.boinccmd("--task", MASTER_URL, self.result, op)

    def output(self) -> str:
        """The result's output file, in the project directory."""
        return (self.project / f"{self.result}_r0").read_text()

    def finished(self) -> bool:
        return f"Computation for task {self.result} finished" in self.log()

    def result_state(self) -> str:
        """The result's record in client_state.xml, as the client wrote it when it quit.

        A running client writes the file some time after a change (``write_state_file_if_needed``
        in its poll loop): read before that, the record lacks what the change brought (a CI run
        read an aborted result without the wrapper's stderr). On quit it writes the file first
        (``CLIENT_STATE::quit_activities``, client/client_state.cpp)."""
        assert self.process is not None and self.process.poll() is not None, "read after stop()"
        state = (self.data / "client_state.xml").read_text()
        return state.split("<result>")[1].split("</result>")[0]

    def stop(self) -> None:
        """Ask the client to exit (it quits the wrapper first); kill its process group (the
        wrapper is in it) if it does not."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.boinccmd("--quit")
            self.process.wait(timeout=60)
        except (AssertionError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # Whatever the test did: no worker left behind.
    for pid_file in tmp_path.glob("slots/*/worker.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@contextlib.contextmanager
def running(client: RealClient) -> Iterator[RealClient]:
    client.start()
    try:
        yield client
    finally:
        client.stop()
        print(client.log())
        stderr = client.slot / "stderr.txt"  # the wrapper's, while the slot is kept
        if stderr.exists():
            print(f"--- the wrapper's stderr.txt ---\n{stderr.read_text(errors='replace')}")


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def number(fields: dict[str, str], key: str) -> float:
    return float(fields.get(key, "0") or 0)


def test_the_real_client_runs_the_wrapper_and_suspends_and_resumes_it(data: Path) -> None:
    client = RealClient(data, job_xml(first_task_cpu=0.2), {"steps.txt": "60\n"}, leave_apps_in_memory=True)
    with running(client):
        worker_pid = client.slot / "worker.pid"
        wait_for(worker_pid.exists, "the worker, the wrapper's second task")
        worker = int(worker_pid.read_text())
        # What the wrapper reports on app_status reaches the client: fraction done (the first
        # task's weight and some of the second's) and CPU time. (Without reports the client
        # shows an estimate after a minute, ACTIVE_TASK::write_gui in client/app.cpp; with this
        # workunit's rsc_fpops_est it stays at 0.)
        wait_for(lambda: number(client.task(), "fraction done") > 0.3, "the fraction done at the client")
        task = client.task()
        assert number(task, "current CPU time") > 0.2, task
        assert task["active_task_state"] == "EXECUTING", task
        # An app version flagged is_wrapper runs out of the idle class (client/app_start.cpp).
        assert os.sched_getscheduler(int(task["PID"])) != os.SCHED_IDLE

        # The client sends <suspend/> (the task stays in memory): the wrapper stops the worker.
        client.task_control("suspend")
        wait_for(lambda: process_state(worker) == "T", "the worker to stop")
        assert client.task()["active_task_state"] == "SUSPENDED"
        steps = (client.slot / "worker.ckpt").read_text()
        time.sleep(1.0)  # heartbeats go on; a stopped worker makes no step
        assert (client.slot / "worker.ckpt").read_text() == steps and process_state(worker) == "T"
        client.task_control("resume")
        wait_for(lambda: process_state(worker) != "T", "the worker to go on")

        wait_for(client.finished, "the task's end")
    result = client.result_state()
    log = client.log()
    # Started once, ended with boinc_finish_called: no restart, no error.
    assert log.count("ACTIVE_TASK::start(): forked process") == 1, log
    assert "exited with zero status but no 'finished' file" not in log
    assert "<exit_status>0</exit_status>" in result and "<state>4</state>" in result, result
    # The worker's stdout went where the client's soft link in the slot pointed: the result's
    # output file in the project directory.
    out = client.output()
    assert out == "".join(f"step {i}\n" for i in range(1, 61))
    # init_data.xml was read: the wrapper knew the workunit's name and that a client was there.
    assert "under the BOINC client" in result and "workunit wu1" in result, result


def test_suspended_after_a_checkpoint_it_is_quit_and_started_again_where_it_was(data: Path) -> None:
    # The volunteer's default: a task that has checkpointed is removed from memory when
    # suspended (ACTIVE_TASK::preempt in client/app.cpp sends <quit/>), and started again on resume.
    first_task_cpu = 2.5
    client = RealClient(data, job_xml(first_task_cpu), {"steps.txt": "40\n"}, leave_apps_in_memory=False)
    with running(client):
        worker_pid = client.slot / "worker.pid"
        wait_for(worker_pid.exists, "the worker, the wrapper's second task")
        # The first task's end was a checkpoint, reported with its CPU time.
        wait_for(
            lambda: number(client.task(), "CPU time at last checkpoint") >= first_task_cpu, "the checkpoint"
        )
        assert f"[checkpoint] result {client.result} checkpointed" in client.log()
        worker = int(worker_pid.read_text())
        client.task_control("suspend")
        wait_for(lambda: "(removed from memory)" in client.log(), "the client to quit the task")
        # The wrapper quit: its worker is gone, and it did not call the job finished.
        wait_for(lambda: process_state(worker) in ("gone", "Z"), "the worker's end")
        wait_for(lambda: "task_state=UNINITIALIZED" in client.log(), "the wrapper's exit")
        assert not (client.slot / "boinc_finish_called").exists()
        client.task_control("resume")
        wait_for(client.finished, "the task's end")
    result = client.result_state()
    log = client.log()
    assert log.count("ACTIVE_TASK::start(): forked process") == 2, log
    assert "<exit_status>0</exit_status>" in result, result
    # Started again, the wrapper went on from its state file: the first task ran once, and
    # the worker went on from its own checkpoint.
    out = client.output().splitlines()
    assert out.count("step 1") == 1 and out[-1] == "step 40", out
    assert "resuming after 1 done" in result, result
    # The CPU time the client keeps is the job's: the first run's seconds counted once (the
    # client's wu_cpu_time in init_data.xml holds them too, and is not added again).
    final_cpu = float(result.split("<final_cpu_time>")[1].split("<")[0])
    assert first_task_cpu <= final_cpu < first_task_cpu + 1.5, result


def test_aborted_by_the_client_the_wrapper_stops_its_task(data: Path) -> None:
    client = RealClient(data, job_xml(first_task_cpu=0.1), {"steps.txt": "1000\n"}, leave_apps_in_memory=True)
    with running(client):
        worker_pid = client.slot / "worker.pid"
        wait_for(worker_pid.exists, "the worker")
        worker = int(worker_pid.read_text())
        client.task_control("abort")  # <abort/> (ACTIVE_TASK::request_abort, client/app_control.cpp)
        wait_for(lambda: process_state(worker) in ("gone", "Z"), "the worker's end")
        wait_for(lambda: "task_state=ABORTED" in client.log(), "the wrapper's exit")
    result = client.result_state()
    # The client marks the result aborted (state 6) with EXIT_ABORTED_VIA_GUI (203) whatever the
    # wrapper exits with (ACTIVE_TASK::abort_task); the wrapper's log has the request.
    assert "<state>6</state>" in result and "<exit_status>203</exit_status>" in result, result
    assert "asks the job to abort" in result, result
    assert client.output().count("step") < 1000
