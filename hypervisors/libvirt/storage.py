"""
A VM's files on the libvirt host when that host is not this one: libvirt storage volumes.

On a remote URI the driver cannot run ``qemu-img`` or write files where QEMU runs, so the
images go through libvirt's storage API, into a directory pool of ours on that host
(:data:`DEFAULT_POOL`): each file a VM needs from this host (base disk, kernel, initrd, and any
other, such as a firmware config file) is uploaded once with ``virStorageVolUpload`` and kept
under a name that changes with the file, and each VM's overlay is a volume created with the
base volume as its backing store (``virStorageVolCreateXML``).

Everything here blocks (libvirt calls, reading the file): the driver runs it in its thread pool.
The XML builders are pure.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import libvirt

from vmcontroller.errors import HypervisorError

__all__ = [
    "DEFAULT_POOL",
    "DEFAULT_POOL_PATH",
    "StoragePool",
    "pool_xml",
    "qcow2_virtual_size",
    "uploaded_name",
    "volume_xml",
]

#: The directory pool the driver keeps its volumes in on a remote host, and where it is.
DEFAULT_POOL = "vmcontroller"
DEFAULT_POOL_PATH = "/var/lib/libvirt/images/vmcontroller"

#: Bytes read from the file and sent per stream packet (libvirt's packets hold 256 KiB at most).
_UPLOAD_PIECE = 256 * 1024 - 1024
#: Suffix of the empty volume that marks an upload as complete.
_COMPLETE = ".complete"
_QCOW2_MAGIC = b"QFI\xfb"


def pool_xml(name: str, path: str) -> str:
    """A directory pool ``name`` at ``path`` on the libvirt host."""
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = path
    permissions = ET.SubElement(target, "permissions")
    ET.SubElement(permissions, "mode").text = "0755"
    return ET.tostring(pool, encoding="unicode")


def volume_xml(
    name: str,
    capacity: int,
    fmt: str,
    *,
    backing: tuple[str, str] | None = None,
    mode: str = "0644",
    owner: tuple[int, int] | None = None,
) -> str:
    """
    A volume of ``capacity`` bytes in format ``fmt`` (``raw``, ``qcow2``), allocated as it is
    written.

    :param backing: (path, format) of its backing volume, for a copy-on-write overlay.
    :param mode: its file mode: readable by all (0644) for what QEMU only reads under its own
        user, since the driver tells libvirt not to relabel a base image.
    :param owner: (uid, gid) of the file on the libvirt host; libvirt's own user by default.
    """
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    ET.SubElement(volume, "allocation", unit="bytes").text = "0"
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type=fmt)
    permissions = ET.SubElement(target, "permissions")
    ET.SubElement(permissions, "mode").text = mode
    if owner is not None:
        ET.SubElement(permissions, "owner").text = str(owner[0])
        ET.SubElement(permissions, "group").text = str(owner[1])
    if backing is not None:
        store = ET.SubElement(volume, "backingStore")
        ET.SubElement(store, "path").text = backing[0]
        ET.SubElement(store, "format", type=backing[1])
    return ET.tostring(volume, encoding="unicode")


def uploaded_name(source: Path, stat: os.stat_result) -> str:
    """
    The volume name a local file is uploaded under: its name after a digest of its path, size
    and modification time, so that a changed file is uploaded again and an unchanged one once.
    """
    identity = f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    return f"{hashlib.sha256(identity).hexdigest()[:16]}-{source.name}"


def qcow2_virtual_size(path: Path) -> int:
    """
    The disk size a qcow2 image presents to the guest (its header's ``size`` field).

    :raises HypervisorError: the file is not a qcow2 image.
    """
    with open(path, "rb") as f:
        header = f.read(32)
    if len(header) < 32 or header[:4] != _QCOW2_MAGIC:
        raise HypervisorError(f"{path} is not a qcow2 image; the driver takes qcow2 base disks")
    size: int = struct.unpack(">Q", header[24:32])[0]
    return size


class StoragePool:
    """
    The driver's directory pool on one libvirt host: files uploaded once, overlays, deletion.

    One per driver; its methods run in the driver's thread pool, and two threads uploading the
    same file take turns (the second finds it there).
    """

    def __init__(self, name: str = DEFAULT_POOL, path: str = DEFAULT_POOL_PATH) -> None:
        self.name = name
        self.path = path
        self._lock = threading.Lock()
        self._uploading: dict[str, threading.Lock] = {}

    def pool(self, conn: libvirt.virConnect) -> libvirt.virStoragePool:
        """The pool, defined, built and started first if needed."""
        try:
            pool = conn.storagePoolLookupByName(self.name)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise
            pool = conn.storagePoolDefineXML(pool_xml(self.name, self.path), 0)
            pool.build(0)
            pool.setAutostart(1)
        if not pool.isActive():
            pool.create(0)
        return pool

    def volume_path(self, name: str) -> str:
        """Where volume ``name`` of this pool is on the libvirt host."""
        return f"{self.path.rstrip('/')}/{name}"

    def upload(self, conn: libvirt.virConnect, source: Path, fmt: str = "raw") -> libvirt.virStorageVol:
        """
        The volume holding local file ``source``: uploaded on first use (see
        :func:`uploaded_name`), found again after. An upload cut short is deleted and done again.

        :param fmt: the file's format, for libvirt's records (the bytes go as they are).
        :raises HypervisorError: the file cannot be read.
        """
        try:
            stat = source.stat()
        except OSError as e:
            raise HypervisorError(f"cannot upload {source}: {e.strerror}; build the image first") from e
        name = uploaded_name(source, stat)
        with self._turn(name):
            pool = self.pool(conn)
            if self._lookup(pool, name + _COMPLETE) is not None:
                volume = self._lookup(pool, name)
                if volume is not None:
                    return volume
            for stale in (name + _COMPLETE, name):
                self.delete(pool, stale)
            volume = pool.createXML(volume_xml(name, stat.st_size, fmt), 0)
            try:
                with open(source, "rb") as f:
                    self._send(conn, volume, f, stat.st_size)
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    volume.delete(0)
                raise
            # Only now is it whole: the mark says so to later defines, also after a crash.
            self.empty(conn, name + _COMPLETE)
            return volume

    @staticmethod
    def _send(conn: libvirt.virConnect, volume: libvirt.virStorageVol, f: BinaryIO, size: int) -> None:
        stream = conn.newStream(0)
        volume.upload(stream, 0, size, 0)
        try:
            while piece := f.read(_UPLOAD_PIECE):
                _send_piece(stream, piece)
            stream.finish()
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise

    def overlay(
        self, conn: libvirt.virConnect, name: str, base: libvirt.virStorageVol, capacity: int
    ) -> libvirt.virStorageVol:
        """A new qcow2 volume ``name`` of ``capacity`` bytes over the qcow2 volume ``base``."""
        pool = self.pool(conn)
        self.delete(pool, name)  # left by a VM of that name whose undefine did not finish
        xml = volume_xml(name, capacity, "qcow2", backing=(base.path(), "qcow2"))
        return pool.createXML(xml, 0)

    def write(
        self, conn: libvirt.virConnect, name: str, data: bytes, mode: str, owner: tuple[int, int] | None
    ) -> libvirt.virStorageVol:
        """
        A new volume ``name`` holding ``data``, with file mode ``mode`` and owned by ``owner``
        (uid, gid on the libvirt host): a secret for QEMU there (the agent's credentials).
        """
        pool = self.pool(conn)
        self.delete(pool, name)
        volume = pool.createXML(volume_xml(name, len(data), "raw", mode=mode, owner=owner), 0)
        try:
            self._send(conn, volume, io.BytesIO(data), len(data))
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                volume.delete(0)
            raise
        return volume

    def empty(self, conn: libvirt.virConnect, name: str) -> libvirt.virStorageVol:
        """
        A new empty volume ``name``: a file for the libvirt host to write (a console log) that
        the pool knows, so that it is deleted as a volume without a pool refresh (which libvirt
        refuses while an upload runs).
        """
        pool = self.pool(conn)
        self.delete(pool, name)
        return pool.createXML(volume_xml(name, 0, "raw"), 0)

    def delete_volumes(self, conn: libvirt.virConnect, names: list[str]) -> None:
        """Delete the volumes ``names`` that exist."""
        pool = self.pool(conn)
        for name in names:
            self.delete(pool, name)

    @staticmethod
    def delete(pool: libvirt.virStoragePool, name: str) -> None:
        volume = StoragePool._lookup(pool, name)
        if volume is not None:
            volume.delete(0)

    @staticmethod
    def _lookup(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
        try:
            return pool.storageVolLookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise

    @contextlib.contextmanager
    def _turn(self, name: str) -> Iterator[None]:
        with self._lock:
            lock = self._uploading.setdefault(name, threading.Lock())
        with lock:
            yield


def _send_piece(stream: libvirt.virStream, piece: bytes) -> None:
    # A blocking stream: send returns once it took some bytes (all of them, on a remote one).
    while piece:
        piece = piece[stream.send(piece) :]
