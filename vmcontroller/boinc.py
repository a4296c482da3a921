"""
The BOINC client's conventions for the applications it runs, in Python: what a wrapper needs
to be one (BOINC's ``lib/app_ipc.h`` and ``api/boinc_api.cpp`` define them).

In its slot directory an application finds ``init_data.xml`` (:class:`InitData`) and the file
``boinc_mmap_file``, mapped by both sides: eight message channels of 1024 bytes
(:data:`CHANNELS`). A channel's first byte is non-zero while it holds an unread message, the
text that follows, NUL-terminated; the sender writes only into an empty channel and the
receiver clears the flag. The client sends ``<heartbeat/>`` every second and asks for
``<suspend/>``, ``<resume/>``, ``<quit/>`` or ``<abort/>``; the application reports its CPU time
and fraction done every second on ``app_status``. When done it writes ``boinc_finish_called``
and exits with its status. Without ``init_data.xml`` the application runs standalone.

The client puts the application's files in the slot as *soft links*: small files whose first
line is ``<soft_link>../../projects/DIR/NAME</soft_link>`` (``client/file_names.cpp``,
``make_soft_link``); :func:`resolve_filename` follows them as ``boinc_resolve_filename`` does.
"""

from __future__ import annotations

import enum
import mmap
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from vmcontroller.errors import VMControllerError

__all__ = [
    "CHANNELS",
    "EXIT_ABORTED_BY_CLIENT",
    "FINISH_FILE",
    "INIT_DATA_FILE",
    "MMAP_FILE",
    "TEMPORARY_EXIT_FILE",
    "ClientChannels",
    "ClientRequest",
    "InitData",
    "SoftLinkError",
    "app_status_message",
    "resolve_filename",
    "write_finish_file",
    "write_temporary_exit",
]

INIT_DATA_FILE = "init_data.xml"
MMAP_FILE = "boinc_mmap_file"
FINISH_FILE = "boinc_finish_called"
TEMPORARY_EXIT_FILE = "boinc_temporary_exit"
MSG_CHANNEL_SIZE = 1024
#: ``struct SHARED_MEM``'s channels, in their order in the mapped file.
CHANNELS = (
    "process_control_request",
    "process_control_reply",
    "graphics_request",
    "graphics_reply",
    "heartbeat",
    "app_status",
    "trickle_up",
    "trickle_down",
)
SHARED_MEM_SIZE = MSG_CHANNEL_SIZE * len(CHANNELS)
#: BOINC's ``EXIT_ABORTED_BY_CLIENT`` (``lib/error_numbers.h``).
EXIT_ABORTED_BY_CLIENT = 194
#: ``boinc_resolve_filename`` reads a soft link's first line into a buffer of this size.
SOFT_LINK_LINE = 512
_SOFT_LINK = re.compile(rb"<soft_link>(.*?)</soft_link>")


class SoftLinkError(VMControllerError):
    """A soft link in the slot points outside the BOINC client's project directories."""


class ClientRequest(enum.Enum):
    """What the client asks of the application on ``process_control_request``."""

    SUSPEND = "suspend"
    RESUME = "resume"
    QUIT = "quit"
    ABORT = "abort"


@dataclass(frozen=True)
class InitData:
    """
    The parts of ``init_data.xml`` a wrapper uses.

    :ivar slot: the slot number.
    :ivar wu_name: the workunit's name.
    :ivar checkpoint_period: seconds between checkpoints the volunteer asked for.
    :ivar fraction_done_start: where this run's fraction done starts (compound apps).
    :ivar fraction_done_end: where it ends.
    """

    slot: int = 0
    wu_name: str = ""
    checkpoint_period: float = 300.0
    fraction_done_start: float = 0.0
    fraction_done_end: float = 1.0

    @classmethod
    def parse(cls, text: str) -> InitData:
        """
        Parse the text of ``init_data.xml``; missing elements take BOINC's defaults.

        :raises ValueError: not XML, or a number that is not one.
        """
        try:
            root = ET.fromstring(text)
        except ET.ParseError as e:
            raise ValueError(f"{INIT_DATA_FILE} is not XML: {e}") from None

        def number(tag: str, default: float) -> float:
            value = root.findtext(tag)
            if value is None or not value.strip():
                return default
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{INIT_DATA_FILE}: <{tag}> is {value!r}, not a number") from None

        return cls(
            slot=int(number("slot", 0)),
            wu_name=(root.findtext("wu_name") or "").strip(),
            checkpoint_period=number("checkpoint_period", 300.0),
            fraction_done_start=number("fraction_done_start", 0.0),
            fraction_done_end=number("fraction_done_end", 1.0),
        )


def app_status_message(cpu_time: float, checkpoint_cpu_time: float, fraction_done: float) -> str:
    """The ``app_status`` message, as ``boinc_api.cpp``'s ``update_app_progress`` writes it."""
    return (
        f"<current_cpu_time>{cpu_time:e}</current_cpu_time>\n"
        f"<checkpoint_cpu_time>{checkpoint_cpu_time:e}</checkpoint_cpu_time>\n"
        f"<fraction_done>{min(max(fraction_done, 0.0), 1.0):e}</fraction_done>\n"
    )


class ClientChannels:
    """
    The application's side of ``boinc_mmap_file`` in ``slot_dir``.

    The client writes its side at any time: each read takes a channel's text up to its NUL,
    whatever the bytes (the file is shared with another process, so nothing in it is trusted
    to be well formed).
    """

    def __init__(self, slot_dir: Path) -> None:
        path = slot_dir / MMAP_FILE
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < SHARED_MEM_SIZE:
                raise ValueError(
                    f"{path} has {os.fstat(fd).st_size} bytes, less than BOINC's {SHARED_MEM_SIZE}: "
                    "not a BOINC client's shared memory"
                )
            self._map = mmap.mmap(fd, SHARED_MEM_SIZE)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, slot_dir: Path) -> ClientChannels:
        """Make an empty ``boinc_mmap_file``, as the client does before starting the application."""
        (slot_dir / MMAP_FILE).write_bytes(bytes(SHARED_MEM_SIZE))
        return cls(slot_dir)

    def _offset(self, channel: str) -> int:
        return CHANNELS.index(channel) * MSG_CHANNEL_SIZE

    def get_msg(self, channel: str) -> str | None:
        """Take the channel's message, if any, and mark the channel empty."""
        start = self._offset(channel)
        if not self._map[start]:
            return None
        body = self._map[start + 1 : start + MSG_CHANNEL_SIZE]
        self._map[start] = 0
        return body.split(b"\0", 1)[0].decode("utf-8", "replace")

    def send_msg(self, channel: str, message: str) -> bool:
        """Put ``message`` in the channel unless it holds one not read yet; say whether it did."""
        start = self._offset(channel)
        if self._map[start]:
            return False
        data = message.encode()[: MSG_CHANNEL_SIZE - 2] + b"\0"
        self._map[start + 1 : start + 1 + len(data)] = data
        self._map[start] = 1
        return True

    def requests(self) -> list[ClientRequest]:
        """The control requests in the pending ``process_control_request`` message, in order."""
        message = self.get_msg("process_control_request")
        if message is None:
            return []
        found = [(message.find(f"<{r.value}/>"), r) for r in ClientRequest]
        return [r for at, r in sorted(found, key=lambda pair: pair[0]) if at >= 0]

    def heartbeat(self) -> bool:
        """Whether a heartbeat arrived since the last call."""
        message = self.get_msg("heartbeat")
        return message is not None and "<heartbeat/>" in message

    def close(self) -> None:
        self._map.close()


def resolve_filename(slot_dir: Path, name: str) -> Path:
    """
    The file that ``name`` in ``slot_dir`` stands for, as ``boinc_resolve_filename``
    (``lib/app_ipc.cpp``) finds it: a symbolic link or a plain file is itself; a file whose first
    line holds ``<soft_link>PATH</soft_link>`` is ``PATH``, relative to the slot.

    The client's links lead to its ``projects/`` directory, two levels up from the slot; a link
    that leads elsewhere is refused (``resolve_soft_link`` in the same file checks that prefix too).

    :raises SoftLinkError: a soft link out of the client's project directories.
    """
    path = slot_dir / name
    if path.is_symlink():
        return path
    try:
        with path.open("rb") as f:
            first_line = f.readline(SOFT_LINK_LINE - 1)
    except OSError:
        return path  # not there yet (an output) or not readable: the name itself, as BOINC does
    found = _SOFT_LINK.search(first_line)
    if found is None:
        return path
    target = (slot_dir / os.fsdecode(found.group(1).strip())).resolve()
    projects = (slot_dir / ".." / ".." / "projects").resolve()
    if not target.is_relative_to(projects) or target == projects:
        raise SoftLinkError(
            f"{path} is a BOINC soft link to {found.group(1).decode(errors='replace')!r}, outside the "
            f"client's project directories {projects}: the slot is not one the client set up"
        )
    return target


def write_finish_file(slot_dir: Path, status: int, message: str = "") -> None:
    """
    Write ``boinc_finish_called`` as ``boinc_finish_message`` does: the exit status on the first
    line, then the message, so that the client knows the exit was meant.
    """
    partial = slot_dir / f".{FINISH_FILE}.partial"
    partial.write_text(f"{status}\n{message}\n" if message else f"{status}\n")
    partial.replace(slot_dir / FINISH_FILE)


def write_temporary_exit(slot_dir: Path, delay: int, reason: str) -> None:
    """
    Write ``boinc_temporary_exit`` as ``boinc_temporary_exit`` (``api/boinc_api.cpp``) does: the
    delay in seconds, then the reason. An application that exits 0 with it is started again
    after the delay (``handle_temporary_exit``, ``client/app_control.cpp``), not failed.
    """
    one_line = " ".join(reason.split())
    partial = slot_dir / f".{TEMPORARY_EXIT_FILE}.partial"
    partial.write_text(f"{delay}\n{one_line}\n")
    partial.replace(slot_dir / TEMPORARY_EXIT_FILE)
