"""
The checksum that ends a file transfer, the same code at both ends.

A push's or pull's EOF trailer and result carry the checksum of the whole file under its
name: ``{"crc32": "cbf43926", "size": 9}`` for the bytes ``123456789``.  It catches
accidents between the file read at one end and the file written at the other (framing,
reassembly, the offset of a resumed push), which is all an unkeyed digest sent beside the
data can do: a peer able to change the data could recompute any of them, and TLS
already authenticates every record.  CRC-32 does that for an eighth of sha256's cost
to an emulated guest CPU, which is what limits a transfer under TCG (docs/performance.md).

A host names the checksum in the argument ``checksum`` of push and pull.
``"sha256"`` is what hosts and agents from before ``"crc32"`` use: an agent that is not
asked uses it, and one that ignores the argument answers with it, so a host computes both.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Protocol


class Checksum(Protocol):
    """What both ends need of a running checksum (``hashlib``'s objects have it)."""

    @property
    def name(self) -> str: ...

    def update(self, data: bytes | bytearray, /) -> None: ...

    def hexdigest(self) -> str: ...


class CRC32:
    """zlib's CRC-32 (that of gzip and PNG) with ``hashlib``'s interface."""

    name = "crc32"
    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes | bytearray, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


#: The checksums by their wire names, and the length of their hex digests.
CHECKSUMS = {"crc32": 8, "sha256": 64}
#: What a transfer uses when the host names none (a host from before ``checksum``).
DEFAULT_CHECKSUM = "sha256"


def new_checksum(name: str) -> Checksum:
    """A fresh checksum of the algorithm ``name``, one of :data:`CHECKSUMS`."""
    return CRC32() if name == "crc32" else hashlib.sha256()
