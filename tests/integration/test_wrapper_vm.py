"""
``vmwrapper`` running a job in a real guest under a stand-in BOINC client: killed with SIGKILL
after its first checkpoint and started again, it finishes the job without starting it over;
the client's suspend and resume pause and resume the VM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.local.test_wrapper_host import StandInClient

pytestmark = pytest.mark.integration

#: What waits on a guest's boot or shutdown may wait this long: minutes under TCG on a busy host.
VM_WAIT = 480.0

STEPS = 30
# The job: counts to STEPS, a second a step; "started" is written once per start of the job,
# so a job that started over shows it twice.
JOB_SCRIPT = f"""#!/bin/sh
echo started >> /root/starts.txt
i=0
while [ $i -lt {STEPS} ]; do
    i=$((i + 1))
    echo "step $i" >> /root/out.txt
    echo "$i {STEPS}" | awk '{{print $1 / $2}}' > /root/progress
    sleep 1
done
echo finished
"""


def job_xml() -> str:
    return """<job_desc>
  <task>
    <application>/bin/sh</application>
    <command_line>/root/job.sh</command_line>
    <stdout_filename>stdout.txt</stdout_filename>
    <fraction_done_filename>/root/progress</fraction_done_filename>
  </task>
  <vm>
    <copy_in host="job.sh" guest="/root/job.sh"/>
    <copy_out guest="/root/out.txt" host="out.txt"/>
    <copy_out guest="/root/starts.txt" host="starts.txt"/>
    <minimum_checkpoint_interval>5</minimum_checkpoint_interval>
  </vm>
</job_desc>"""


def history(slot: Path) -> list[str]:
    try:
        return list(json.loads((slot / "vmwrapper_state.json").read_text())["history"])
    except (OSError, ValueError):
        return []


def start_wrapper(slot: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmcontroller.wrapper", "--slot", str(slot)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def vm_state(name: str) -> str:
    """The VM's state as libvirt says it. Not through a driver on the test's reactor: this test
    waits on processes, blocking that reactor, and libvirt drops a client whose keepalives go
    unanswered."""
    done = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", name], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "undefined"


@pytest.fixture
def slot(tmp_path: Path, booted_vm: Any) -> Iterator[Path]:
    (tmp_path / "job.sh").write_text(JOB_SCRIPT)
    (tmp_path / "job.xml").write_text(job_xml())
    yield tmp_path
    name = f"vmwrapper-vmc-test-wrapper-{os.getpid()}"
    if vm_state(name) != "undefined":
        subprocess.run([str(Path(sys.executable).with_name("vmcontroller")), "undefine", "--force", name])


def test_killed_after_a_checkpoint_it_finishes_the_job_without_starting_over(slot: Path) -> None:
    client = StandInClient(slot)
    (slot / "init_data.xml").write_text(
        f"<app_init_data><wu_name>vmc-test-wrapper-{os.getpid()}</wu_name>"
        "<checkpoint_period>5</checkpoint_period></app_init_data>"
    )
    name = f"vmwrapper-vmc-test-wrapper-{os.getpid()}"
    first = start_wrapper(slot)
    try:
        client.wait_for(
            lambda: any(h.startswith("checkpoint ") for h in history(slot)), "a checkpoint", VM_WAIT
        )
    finally:
        os.kill(first.pid, signal.SIGKILL)
        print(first.communicate()[0].decode(errors="replace"))
    assert not (slot / "boinc_finish_called").exists()

    second = start_wrapper(slot)
    try:
        client.wait_for(
            lambda: any(h.startswith("re-attached") for h in history(slot)), "the re-attach", VM_WAIT
        )
        client.ask("suspend")
        client.wait_for(lambda: "suspended" in history(slot), "the suspend")
        assert vm_state(name) == "paused"
        client.ask("resume")
        client.wait_for(lambda: "resumed" in history(slot), "the resume")
        assert vm_state(name) == "running"
        client.wait_for(lambda: second.poll() is not None, "the job's end", VM_WAIT)
    finally:
        if second.poll() is None:
            second.kill()
        print(second.communicate()[0].decode(errors="replace"))
    assert second.returncode == 0
    assert (slot / "boinc_finish_called").read_text() == "0\n"
    # Each step once, and the job started once: the second wrapper went on with the job.
    assert (slot / "out.txt").read_text() == "".join(f"step {i}\n" for i in range(1, STEPS + 1))
    assert (slot / "starts.txt").read_text() == "started\n"
    assert (slot / "stdout.txt").read_text() == "finished\n"
    assert client.fractions and max(client.fractions) > 0.1
    assert vm_state(name) == "undefined"  # the wrapper removed its VM
