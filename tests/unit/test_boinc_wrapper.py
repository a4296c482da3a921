"""BOINC's app-client conventions and the wrapper's job file, without a reactor."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vmcontroller import boinc
from vmcontroller.errors import AgentUnreachable
from vmcontroller.wrapper import (
    TEMPORARY_EXIT_DELAY,
    Client,
    GuestTaskStatus,
    JobFile,
    JobFileError,
    Task,
    VMJob,
    WrapperState,
    run_job,
)

successResultOf = SynchronousTestCase().successResultOf
failureResultOf = SynchronousTestCase().failureResultOf


def test_channels_follow_boincs_flag_protocol(tmp_path: Path) -> None:
    client_side = boinc.ClientChannels.create(tmp_path)
    app_side = boinc.ClientChannels(tmp_path)
    assert app_side.requests() == []
    assert client_side.send_msg("process_control_request", "<suspend/>")
    # A second message waits until the first is read: the sender never overwrites.
    assert not client_side.send_msg("process_control_request", "<resume/>")
    assert app_side.requests() == [boinc.ClientRequest.SUSPEND]
    assert app_side.requests() == []
    assert client_side.send_msg("process_control_request", "<quit/>")
    assert app_side.requests() == [boinc.ClientRequest.QUIT]
    raw = (tmp_path / boinc.MMAP_FILE).read_bytes()
    assert len(raw) == 8 * 1024 and raw[0] == 0  # read: the flag is clear for the client

    assert app_side.send_msg("app_status", boinc.app_status_message(12.5, 10.0, 0.25))
    status = client_side.get_msg("app_status")
    assert status is not None and "<fraction_done>2.500000e-01</fraction_done>" in status
    assert "<current_cpu_time>1.250000e+01</current_cpu_time>" in status
    assert raw[5 * 1024] == 0 and (tmp_path / boinc.MMAP_FILE).read_bytes()[5 * 1024] == 0


def test_a_channel_full_of_garbage_reads_as_text(tmp_path: Path) -> None:
    boinc.ClientChannels.create(tmp_path)
    data = bytearray((tmp_path / boinc.MMAP_FILE).read_bytes())
    data[0] = 7
    data[1:1024] = b"\xff" * 1023  # no NUL anywhere: the read stops at the channel's end
    (tmp_path / boinc.MMAP_FILE).write_bytes(bytes(data))
    assert boinc.ClientChannels(tmp_path).requests() == []


def test_a_short_mmap_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / boinc.MMAP_FILE).write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="not a BOINC client's shared memory"):
        boinc.ClientChannels(tmp_path)


def test_init_data_and_finish_file(tmp_path: Path) -> None:
    init = boinc.InitData.parse(
        "<app_init_data><slot>3</slot><wu_name>wu_7</wu_name><checkpoint_period>120</checkpoint_period>"
        "<fraction_done_start>0.5</fraction_done_start></app_init_data>"
    )
    assert (init.slot, init.wu_name, init.checkpoint_period) == (3, "wu_7", 120.0)
    assert (init.fraction_done_start, init.fraction_done_end) == (0.5, 1.0)
    assert boinc.InitData.parse("<app_init_data/>").checkpoint_period == 300.0
    with pytest.raises(ValueError, match="checkpoint_period"):
        boinc.InitData.parse("<app_init_data><checkpoint_period>soon</checkpoint_period></app_init_data>")
    boinc.write_finish_file(tmp_path, 3, "bad input")
    assert (tmp_path / boinc.FINISH_FILE).read_text() == "3\nbad input\n"


def slot_in_data_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A slot and a project directory laid out as the client lays them out."""
    slot, project = tmp_path / "slots" / "0", tmp_path / "projects" / "example.org_p"
    slot.mkdir(parents=True)
    project.mkdir(parents=True)
    return slot, project


def test_soft_links_lead_to_the_project_directory(tmp_path: Path) -> None:
    slot, project = slot_in_data_dir(tmp_path)
    (project / "job_3.xml").write_text("<job_desc/>")
    # As make_soft_link (client/file_names.cpp) writes it.
    (slot / "job.xml").write_text("<soft_link>../../projects/example.org_p/job_3.xml</soft_link>\n")
    assert boinc.resolve_filename(slot, "job.xml") == project / "job_3.xml"
    # An output file's link leads to a file not there yet.
    (slot / "out.txt").write_text("<soft_link>../../projects/example.org_p/wu_0_r0</soft_link>\n")
    assert boinc.resolve_filename(slot, "out.txt") == project / "wu_0_r0"
    # A plain file, a symbolic link and a missing file are themselves.
    (slot / "plain.txt").write_text("data <soft_link> not on the first line\n")
    (slot / "link").symlink_to(project / "job_3.xml")
    for name in ("plain.txt", "link", "missing"):
        assert boinc.resolve_filename(slot, name) == slot / name


@pytest.mark.parametrize("target", ["../../../etc/passwd", "/etc/passwd", "../../projects", "../../slots/1"])
def test_a_soft_link_out_of_the_project_directories_is_refused(tmp_path: Path, target: str) -> None:
    slot, _ = slot_in_data_dir(tmp_path)
    (slot / "job.xml").write_text(f"<soft_link>{target}</soft_link>\n")
    with pytest.raises(boinc.SoftLinkError, match="outside the client's project directories"):
        boinc.resolve_filename(slot, "job.xml")


PLAIN_JOB = """
<job_desc>
  <task>
    <application>worker</application>
    <command_line>--steps 3 "two words"</command_line>
    <stdout_filename>out.txt</stdout_filename>
    <fraction_done_filename>progress</fraction_done_filename>
    <weight>2</weight>
    <setenv>MODE=fast</setenv>
  </task>
  <task><application>/bin/true</application></task>
</job_desc>
"""


def test_a_plain_boinc_job_file_has_no_vm() -> None:
    job = JobFile.parse(PLAIN_JOB)
    assert job.vm is None
    first = job.tasks[0]
    assert first.argv == ["worker", "--steps", "3", "two words"]
    assert (first.stdout_filename, first.fraction_done_filename, first.weight) == ("out.txt", "progress", 2.0)
    assert first.setenv == (("MODE", "fast"),)
    assert job.tasks[1] == Task(application="/bin/true")


def test_vm_tags_and_vboxwrapper_options() -> None:
    job = JobFile.parse(
        """<job_desc>
          <task><application>sh</application><command_line>run.sh</command_line></task>
          <vm><image>bundle</image><memory_mb>768</memory_mb><vcpus>2</vcpus><network>1</network>
              <copy_in host="in.dat" guest="/root/in.dat"/><copy_out guest="/root/out.dat" host="out.dat"/>
              <checkpoint>save</checkpoint><minimum_checkpoint_interval>60</minimum_checkpoint_interval></vm>
        </job_desc>""",
        "<vbox_job><minimum_checkpoint_interval>90</minimum_checkpoint_interval>"
        "<job_duration>3600</job_duration><completion_trigger_file>/root/done</completion_trigger_file>"
        "<fraction_done_filename>/root/progress</fraction_done_filename></vbox_job>",
    )
    vm = job.vm
    assert vm is not None
    assert (vm.image, vm.memory_mib, vm.vcpus, vm.network, vm.checkpoint) == ("bundle", 768, 2, True, "save")
    assert vm.copy_in == (("in.dat", "/root/in.dat"),) and vm.copy_out == (("/root/out.dat", "out.dat"),)
    # vbox_job.xml comes last and wins, as vboxwrapper reads it for these options.
    assert vm.minimum_checkpoint_interval == 90.0 and vm.job_duration == 3600.0
    assert (vm.completion_trigger_file, vm.fraction_done_filename) == ("/root/done", "/root/progress")


APP = "<application>a</application>"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<job_desc>", "not well-formed"),
        ("<job_desc/>", "no <task>"),
        ("<job_desc><task><command_line>x</command_line></task></job_desc>", "no <application>"),
        ("<job_desc><task><application>a</application><weight>x</weight></task></job_desc>", "give a number"),
        (f"<job_desc><task>{APP}<setenv>novalue</setenv></task></job_desc>", "NAME=VALUE"),
        (f'<job_desc><task>{APP}</task><vm><copy_out guest="/x" host="../x"/></vm></job_desc>', "relative"),
        (
            '<job_desc><task><application>a</application></task><vm><copy_out guest="/x" host="/etc/x"/></vm>'
            "</job_desc>",
            "relative to the slot",
        ),
        (f"<job_desc><task>{APP}</task><vm><copy_in host='x'/></vm></job_desc>", "both"),
    ],
)
def test_bad_job_files(text: str, message: str) -> None:
    with pytest.raises(JobFileError, match=message):
        JobFile.parse(text)


def test_guest_status_is_parsed_defensively() -> None:
    assert GuestTaskStatus.parse(b"exit 3\ncpu 12.5\nfraction 0.4\n") == GuestTaskStatus(3, 12.5, 0.4)
    hostile = b"exit 99999\ncpu -5\nfraction 7\ntrigger\nexit nonsense\ncpu nan-ish\n" + b"x" * 10_000
    status = GuestTaskStatus.parse(hostile)
    assert status == GuestTaskStatus(exit_code=255, cpu=0.0, fraction=1.0, triggered=True)


def test_state_survives_in_its_file(tmp_path: Path) -> None:
    state = WrapperState(tasks_done=1, vm="vmwrapper-x", checkpoint="vmwrapper-checkpoint-2")
    state.note(tmp_path, "checkpoint vmwrapper-checkpoint-2")
    again = WrapperState.load(tmp_path)
    assert again == state and again.history == ["checkpoint vmwrapper-checkpoint-2"]
    (tmp_path / "vmwrapper_state.json").write_text("{not json")
    with pytest.raises(JobFileError, match="remove it to start the job over"):
        WrapperState.load(tmp_path)


def test_the_client_channels_are_read_while_the_wrapper_is_busy(tmp_path: Path) -> None:
    # The real client kills an application that leaves a request unread for 180 s
    # (process_control_poll, client/app_control.cpp): requests are taken off the channel every
    # second, and kept until the wrapper asks for them.
    client_side = boinc.ClientChannels.create(tmp_path)
    clock = Clock()
    wrapper_client = Client(tmp_path, clock)
    wrapper_client.start()
    assert client_side.send_msg("process_control_request", "<suspend/>")
    clock.advance(1.0)
    assert client_side.send_msg("process_control_request", "<resume/>")  # the channel was emptied
    clock.advance(1.0)
    assert wrapper_client.poll() == [boinc.ClientRequest.SUSPEND, boinc.ClientRequest.RESUME]
    assert wrapper_client.poll() == []
    wrapper_client.stop()
    assert client_side.send_msg("process_control_request", "<quit/>")
    clock.advance(1.0)
    assert not client_side.send_msg("process_control_request", "<abort/>")  # stopped: not read


VM_JOB = "<job_desc><task><application>sh</application></task><vm/></job_desc>"


def test_a_vm_that_does_not_come_up_is_a_temporary_exit_under_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def agent_never_answers(self: VMJob) -> int:
        raise AgentUnreachable("no agent answered on vmwrapper-x within 300 s")

    monkeypatch.setattr(VMJob, "run", agent_never_answers)
    (tmp_path / "job.xml").write_text(VM_JOB)
    # Standalone, the error is the wrapper's (main prints it and exits 1).
    failure = failureResultOf(Deferred.fromCoroutine(run_job(Clock(), tmp_path, "job.xml")))
    assert failure.check(AgentUnreachable)
    assert not (tmp_path / boinc.TEMPORARY_EXIT_FILE).exists()
    # Under the client, the job is put off: boinc_temporary_exit and status 0, as
    # boinc_temporary_exit() leaves them, and nothing that says the job is finished.
    boinc.ClientChannels.create(tmp_path)
    assert successResultOf(Deferred.fromCoroutine(run_job(Clock(), tmp_path, "job.xml"))) == 0
    delay, reason = (tmp_path / boinc.TEMPORARY_EXIT_FILE).read_text().splitlines()
    assert int(delay) == TEMPORARY_EXIT_DELAY and "no agent answered" in reason
    assert not (tmp_path / boinc.FINISH_FILE).exists()
