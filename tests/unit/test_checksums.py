"""The transfer checksums both ends compute (guest_agent/protocol/checksums.py)."""

from __future__ import annotations

import hashlib
import os

import pytest

from guest_agent.protocol.checksums import CHECKSUMS, CRC32, DEFAULT_CHECKSUM, new_checksum


@pytest.mark.parametrize(("data", "digest"), [
    (b"", "00000000"),  # leading zeros kept: always 8 digits
    (b"123456789", "cbf43926"),  # the CRC-32 check value (gzip, PNG, zlib)
    (b"\x00" * 4, "2144df1c"),
])
def test_crc32_gives_the_standard_check_values(data: bytes, digest: str) -> None:
    checksum = CRC32()
    checksum.update(data)
    assert checksum.hexdigest() == digest and checksum.name == "crc32"


def test_a_checksum_over_pieces_is_that_of_the_whole() -> None:
    data = os.urandom(100_000)
    for name in CHECKSUMS:
        whole, pieces = new_checksum(name), new_checksum(name)
        whole.update(data)
        for start in range(0, len(data), 7_777):
            pieces.update(bytearray(data[start:start + 7_777]))
        assert pieces.hexdigest() == whole.hexdigest()
        assert len(whole.hexdigest()) == CHECKSUMS[name] and whole.name == name


def test_sha256_is_hashlibs_and_the_default() -> None:
    checksum = new_checksum(DEFAULT_CHECKSUM)
    checksum.update(b"abc")
    assert DEFAULT_CHECKSUM == "sha256" and checksum.hexdigest() == hashlib.sha256(b"abc").hexdigest()
