"""
The bench's QEMU guest agent client (bench/qga.py) against qemu-ga's wire format as QEMU's
qga/main.c writes it (JSON and ``\\n`` per response, 0xFF before the response to
``guest-sync-delimited``), in memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure


@pytest.fixture
def qga(bench_importable: None) -> ModuleType:
    import bench.qga

    return bench.qga


def connected(qga: ModuleType) -> tuple[Any, StringTransport]:
    client = qga.QGAClient()
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport


def requests(transport: StringTransport) -> list[dict[str, Any]]:
    """The JSON requests written so far (qemu-ga's parser needs no separator between them)."""
    decoder = json.JSONDecoder()
    text = transport.value().decode()
    transport.clear()
    found, at = [], 0
    while at < len(text):
        message, at = decoder.raw_decode(text, at)
        found.append(message)
    return found


def answer(client: Any, value: Any) -> None:
    client.dataReceived(json.dumps({"return": value}).encode() + b"\n")


def test_decoder_drops_everything_before_the_sentinel_and_joins_split_lines(qga: ModuleType) -> None:
    decoder = qga.QGADecoder()
    decoder.expect_sentinel()
    # A stale response of an earlier client, then the delimited one, split mid-line.
    assert decoder.feed(b'{"return": {}}\n{"ret') == []
    assert decoder.feed(b'urn": 5}\n\xff{"return"') == []
    assert decoder.feed(b": 7}\n\n") == [{"return": 7}]
    assert decoder.feed(b'{"error": {"class": "GenericError", "desc": "x"}}\n') == [
        {"error": {"class": "GenericError", "desc": "x"}}
    ]


def test_decoder_refuses_long_lines_and_lines_that_are_not_responses(qga: ModuleType) -> None:
    decoder = qga.QGADecoder(max_response=16)
    decoder.feed(b'{"return": "0123')
    with pytest.raises(qga.QGAError, match="more than 16 bytes"):
        decoder.feed(b"456789")
    with pytest.raises(qga.QGAError, match="not JSON"):
        qga.QGADecoder().feed(b"{nope\n")
    with pytest.raises(qga.QGAError, match="not a response"):
        qga.QGADecoder().feed(b'{"event": "X"}\n')


def test_sync_resets_the_parser_and_checks_the_echoed_id(qga: ModuleType) -> None:
    client, transport = connected(qga)
    clock = Clock()
    synced = Deferred.fromCoroutine(client.sync(clock, 5.0))
    sent = transport.value()
    assert sent.startswith(b"\xff")
    transport.clear()
    transport.io.write(sent[1:])
    (request,) = requests(transport)
    assert request["execute"] == "guest-sync-delimited"
    ident = request["arguments"]["id"]
    # A stale answer is dropped: only what follows the sentinel counts.
    client.dataReceived(b'{"return": 1}\n\xff' + json.dumps({"return": ident}).encode() + b"\n")
    assert synced.called and synced.result is None

    wrong = Deferred.fromCoroutine(client.sync(clock, 5.0))
    client.dataReceived(b'\xff{"return": -1}\n')
    failures: list[Failure] = []
    wrong.addErrback(failures.append)
    assert failures and failures[0].check(qga.QGAError)
    assert "with -1" in failures[0].getErrorMessage()

    silent = Deferred.fromCoroutine(client.sync(clock, 5.0))
    clock.advance(5.0)
    silent.addErrback(failures.append)
    assert len(failures) == 2  # timed out


def test_errors_and_unasked_answers(qga: ModuleType) -> None:
    client, transport = connected(qga)
    ping = client.ping()
    assert requests(transport) == [{"execute": "guest-ping"}]
    client.dataReceived(b'{"error": {"class": "CommandNotFound", "desc": "no"}}\n')
    failures: list[Failure] = []
    ping.addErrback(failures.append)
    assert failures[0].check(qga.QGACommandError)
    assert "CommandNotFound" in failures[0].getErrorMessage()

    pending = client.ping()
    answer(client, {})
    assert pending.result == {}
    assert not transport.disconnecting
    answer(client, {})  # nothing was asked: that is not qemu-ga's protocol
    assert transport.disconnecting

    lost = client.ping()
    client.connectionLost(Failure(ConnectionError("gone")))
    lost.addErrback(failures.append)
    assert len(failures) == 2 and failures[1].check(qga.QGAError)
    assert "closed: gone" in failures[1].getErrorMessage()
    with pytest.raises(qga.QGAError, match="closed: gone"):
        client.ping()


def test_exec_polls_until_the_process_exited(qga: ModuleType) -> None:
    client, transport = connected(qga)
    done = Deferred.fromCoroutine(qga.qga_exec(client, ["/bin/true"]))
    assert requests(transport) == [{"execute": "guest-exec", "arguments": {"path": "/bin/true", "arg": []}}]
    answer(client, {"pid": 41})
    for _ in range(2):
        assert requests(transport) == [{"execute": "guest-exec-status", "arguments": {"pid": 41}}]
        answer(client, {"exited": False})
    assert requests(transport) == [{"execute": "guest-exec-status", "arguments": {"pid": 41}}]
    answer(client, {"exited": True, "exitcode": 0})
    assert done.result == (0, 3)

    killed = Deferred.fromCoroutine(qga.qga_exec(client, ["/bin/sleep", "9"]))
    assert requests(transport)[0]["arguments"] == {"path": "/bin/sleep", "arg": ["9"]}
    answer(client, {"pid": 42})
    answer(client, {"exited": True, "signal": 9})
    assert killed.result == (None, 1)


def test_push_sends_the_file_in_base64_chunks(qga: ModuleType, tmp_path: Path) -> None:
    data = bytes(range(256)) * (qga.QGA_WRITE_CHUNK // 256) + b"tail"
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    client, transport = connected(qga)
    done = Deferred.fromCoroutine(qga.qga_push(client, str(source), "/root/x"))
    assert requests(transport) == [
        {"execute": "guest-file-open", "arguments": {"path": "/root/x", "mode": "w"}}
    ]
    answer(client, 1000)
    received = b""
    for _ in range(2):
        (write,) = requests(transport)
        assert write["execute"] == "guest-file-write" and write["arguments"]["handle"] == 1000
        piece = base64.b64decode(write["arguments"]["buf-b64"])
        received += piece
        answer(client, {"count": len(piece), "eof": False})
    assert received == data
    assert requests(transport) == [{"execute": "guest-file-close", "arguments": {"handle": 1000}}]
    answer(client, {})
    throughput, digest = cast(tuple[Any, str], done.result)
    assert (throughput.size, digest) == (len(data), hashlib.sha256(data).hexdigest())

    short = Deferred.fromCoroutine(qga.qga_push(client, str(source), "/root/y"))
    answer(client, 1001)
    answer(client, {"count": 3, "eof": False})
    failures: list[Failure] = []
    short.addErrback(failures.append)
    assert failures and "wrote 3 of" in failures[0].getErrorMessage()


def test_pull_reads_until_eof_and_stops_at_the_limit(qga: ModuleType, tmp_path: Path) -> None:
    client, transport = connected(qga)
    destination = tmp_path / "back.bin"
    done = Deferred.fromCoroutine(qga.qga_pull(client, "/root/x", str(destination), 10))
    assert requests(transport) == [
        {"execute": "guest-file-open", "arguments": {"path": "/root/x", "mode": "r"}}
    ]
    answer(client, 7)
    for piece, eof in ((b"hello ", False), (b"you", True)):
        assert requests(transport) == [
            {"execute": "guest-file-read", "arguments": {"handle": 7, "count": qga.QGA_READ_COUNT}}
        ]
        answer(client, {"count": len(piece), "buf-b64": base64.b64encode(piece).decode(), "eof": eof})
    assert requests(transport) == [{"execute": "guest-file-close", "arguments": {"handle": 7}}]
    answer(client, {})
    throughput, digest = cast(tuple[Any, str], done.result)
    assert destination.read_bytes() == b"hello you"
    assert (throughput.size, digest) == (9, hashlib.sha256(b"hello you").hexdigest())

    endless = Deferred.fromCoroutine(qga.qga_pull(client, "/root/x", str(destination), 10))
    answer(client, 8)
    failures: list[Failure] = []
    for _ in range(2):
        answer(client, {"count": 6, "buf-b64": base64.b64encode(b"again!").decode(), "eof": False})
    endless.addErrback(failures.append)
    assert failures and "more than the 10 bytes" in failures[0].getErrorMessage()
