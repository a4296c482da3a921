"""
The pure parts of the libvirt driver's storage on a remote host (hypervisors/libvirt/storage.py):
pool and volume XML, upload names, a qcow2 image's virtual size. The uploads themselves run
against a second libvirtd in tests/integration/test_libvirt_remote.py.
"""

from __future__ import annotations

import os
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hypervisors.libvirt.storage import pool_xml, qcow2_virtual_size, uploaded_name, volume_xml
from vmcontroller.errors import HypervisorError


def test_pool_xml_is_a_directory_pool() -> None:
    root = ET.fromstring(pool_xml("vmcontroller", "/var/lib/libvirt/images/vmcontroller"))
    assert root.get("type") == "dir"
    assert root.findtext("name") == "vmcontroller"
    assert root.findtext("target/path") == "/var/lib/libvirt/images/vmcontroller"
    assert root.findtext("target/permissions/mode") == "0755"  # QEMU's user walks through it


def test_uploaded_volumes_are_readable_by_qemu_and_allocated_as_written() -> None:
    root = ET.fromstring(volume_xml("abc-root.qcow2", 720896000, "qcow2"))
    assert root.findtext("name") == "abc-root.qcow2"
    assert root.find("capacity") is not None
    assert (root.findtext("capacity"), root.find("capacity").get("unit")) == ("720896000", "bytes")  # type: ignore[union-attr]
    assert root.findtext("allocation") == "0"
    assert root.find("target/format").get("type") == "qcow2"  # type: ignore[union-attr]
    assert root.findtext("target/permissions/mode") == "0644"
    assert root.find("backingStore") is None


def test_an_overlay_names_its_backing_volume_and_format() -> None:
    root = ET.fromstring(
        volume_xml("vm.qcow2", 8 << 30, "qcow2", backing=("/pool/abc-root.qcow2", "qcow2"))
    )
    assert root.findtext("backingStore/path") == "/pool/abc-root.qcow2"
    assert root.find("backingStore/format").get("type") == "qcow2"  # type: ignore[union-attr]
    assert root.findtext("capacity") == str(8 << 30)


def test_names_are_escaped() -> None:
    root = ET.fromstring(volume_xml("a<b>&c", 1, "raw"))
    assert root.findtext("name") == "a<b>&c"


def test_the_upload_name_follows_the_file(tmp_path: Path) -> None:
    image = tmp_path / "root.qcow2"
    image.write_bytes(b"one")
    first = uploaded_name(image, image.stat())
    assert first.endswith("-root.qcow2") and first == uploaded_name(image, image.stat())
    # Another file of the same name elsewhere, or this one changed: another volume.
    other = tmp_path / "other"
    other.mkdir()
    (other / "root.qcow2").write_bytes(b"one")
    assert uploaded_name(other / "root.qcow2", (other / "root.qcow2").stat()) != first
    image.write_bytes(b"two!")
    os.utime(image, ns=(1, 2))
    assert uploaded_name(image, image.stat()) != first


def test_qcow2_virtual_size_reads_the_header(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    header = b"QFI\xfb" + struct.pack(">I", 3) + bytes(16) + struct.pack(">Q", 4 << 30)
    image.write_bytes(header + bytes(100))
    assert qcow2_virtual_size(image) == 4 << 30


@pytest.mark.parametrize("content", [b"", b"QFI", b"\x00" * 64, b"RAW" + bytes(61)])
def test_a_file_that_is_no_qcow2_is_refused(tmp_path: Path, content: bytes) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(content)
    with pytest.raises(HypervisorError, match="is not a qcow2 image"):
        qcow2_virtual_size(image)
