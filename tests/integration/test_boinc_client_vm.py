"""
``vmwrapper`` with a VM, run by the real BOINC client (:class:`RealClient`): the job's input
is a workunit file and its output the result's file, both reached through the client's soft
links; the client's suspend and resume pause and resume the VM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_wrapper_vm import vm_state
from tests.local.test_boinc_client import RealClient, needs_boinc, number, running, wait_for
from vmcontroller.images import GuestImage

pytestmark = [pytest.mark.integration, needs_boinc]

STEPS = 20
JOB_SCRIPT = f"""#!/bin/sh
i=0
while [ $i -lt {STEPS} ]; do
    i=$((i + 1))
    echo "step $i" >> /root/out.txt
    echo "$i {STEPS}" | awk '{{print $1 / $2}}' > /root/progress
    sleep 1
done
"""
JOB = """<job_desc>
  <task>
    <application>/bin/sh</application>
    <command_line>/root/job.sh</command_line>
    <fraction_done_filename>/root/progress</fraction_done_filename>
  </task>
  <vm>
    <copy_in host="job.sh" guest="/root/job.sh"/>
    <copy_out guest="/root/out.txt" host="out.txt"/>
  </vm>
</job_desc>
"""


@pytest.fixture
def workunit(guest_image: GuestImage) -> Iterator[str]:
    """The workunit's name, which names the wrapper's VM; the VM is removed if left behind."""
    wu = f"vmc-test-boinc-{os.getpid()}"
    yield wu
    name = f"vmwrapper-{wu}"
    if vm_state(name) != "undefined":
        subprocess.run([str(Path(sys.executable).with_name("vmcontroller")), "undefine", "--force", name])


def test_the_real_client_runs_a_vm_job_and_suspends_and_resumes_the_vm(tmp_path: Path, workunit: str) -> None:
    client = RealClient(tmp_path, JOB, {"job.sh": JOB_SCRIPT}, wu=workunit, leave_apps_in_memory=True)
    vm = f"vmwrapper-{workunit}"
    with running(client):
        # The VM boots (minutes under TCG on a busy host), then the job reports its progress.
        wait_for(lambda: number(client.task(), "fraction done") >= 2 / STEPS, "the job's progress", 500)
        assert vm_state(vm) == "running"
        client.task_control("suspend")
        wait_for(lambda: vm_state(vm) == "paused", "the VM to pause", 120)
        assert client.task()["active_task_state"] == "SUSPENDED"
        client.task_control("resume")
        wait_for(lambda: vm_state(vm) == "running", "the VM to run again", 120)
        wait_for(client.finished, "the task's end", 300)
    result = client.result_state()
    assert "<exit_status>0</exit_status>" in result, result
    assert client.log().count("ACTIVE_TASK::start(): forked process") == 1
    # The output came out of the guest into the result's file, where the slot's soft link led.
    assert client.output() == "".join(f"step {i}\n" for i in range(1, STEPS + 1))
    assert vm_state(vm) == "undefined"  # the wrapper removed its VM
