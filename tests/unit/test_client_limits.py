"""
The host client against a misbehaving agent, joined in memory with a Clock: each test is
one defect class found by trying, with its clear error and proof that nothing was lost.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from guest_agent.link import SendGate
from guest_agent.ops import files, system
from guest_agent.protocol.connection import Limits
from guest_agent.protocol.frames import (
    ACK_MAGIC,
    SYNC_MAGIC,
    Channel,
    Frame,
    FrameDecoder,
    FrameType,
    encode_header,
    encode_json,
)
from guest_agent.session import Operation, OperationContext
from tests.unit.test_client_session import call, error_of, result_of
from tests.unit.test_files_ops import crc, current_umask
from vmcontroller._exec import STREAM
from vmcontroller.client import ClientLimits, GuestClient
from vmcontroller.errors import (
    ConnectionLost,
    IncompleteTransfer,
    IntegrityError,
    LimitExceeded,
    OperationTimeout,
    ProtocolError,
)
from vmcontroller.testing import InMemoryLink

SHA_OF_NOTHING = hashlib.sha256(b"").hexdigest()


def dropped(link: InMemoryLink, logs: Sequence[Mapping[str, Any]], why: str) -> None:
    """The client disconnected the agent and logged ``why``."""
    link.flush()
    assert link.client._transport is None
    assert any(event["log_format"] == "Disconnecting the agent: {error}" and why in str(event.get("error"))
               for event in logs), [str(event.get("error")) for event in logs]


class Silent:
    """An operation that never answers; with ``ignore_cancel``, not even a CANCEL."""

    def __init__(self, ignore_cancel: bool) -> None:
        self.ignore_cancel = ignore_cancel
        self.cancels: list[dict[str, Any]] = []

    async def __call__(self, ctx: OperationContext) -> Any:
        forever: Deferred[None] = Deferred()

        def on_cancel(reason: dict[str, Any]) -> None:
            self.cancels.append(reason)
            if not self.ignore_cancel:
                forever.callback(None)

        ctx.on_cancel(on_cancel)
        await forever
        raise files.OperationCancelled("stopped")


# ---- pulls ------------------------------------------------------------------------


def test_pull_never_gives_the_host_file_the_guests_set_id_bits(tmp_path: Path) -> None:
    guest = tmp_path / "suid"
    guest.write_bytes(b"#!/bin/sh\n")
    guest.chmod(0o6777)
    assert stat.S_IMODE(guest.stat().st_mode) == 0o6777
    link = InMemoryLink(files.OPERATIONS)
    link.flush()
    pulled = result_of(start(link, link.client.pull(str(guest), str(tmp_path / "host"))))
    assert pulled.mode == 0o6777  # what the guest reported, for information
    assert stat.S_IMODE((tmp_path / "host").stat().st_mode) == 0o666 & ~current_umask()
    # Only a caller that asks gets set-id bits.
    result_of(start(link, link.client.pull(str(guest), str(tmp_path / "asked"), mode=0o4750)))
    assert stat.S_IMODE((tmp_path / "asked").stat().st_mode) == 0o4750


def start(link: InMemoryLink, d: Deferred[Any]) -> Deferred[Any]:
    link.flush()
    return d


def lying_pull(data: bytes, trailer: dict[str, Any], reply: dict[str, Any]) -> Operation:
    async def pull(ctx: OperationContext) -> dict[str, Any]:
        await ctx.io.send(Channel.INPUT, data)
        ctx.io.send_eof(Channel.INPUT, trailer)
        return reply
    return pull


GOOD = hashlib.sha256(b"payload").hexdigest()
GOOD_CRC = crc(b"payload")


@pytest.mark.parametrize(("trailer", "reply", "error"), [
    ({"size": 7, "sha256": SHA_OF_NOTHING}, {"size": 7, "sha256": SHA_OF_NOTHING}, IntegrityError),
    ({"size": 7, "sha256": GOOD}, {"size": 7, "sha256": SHA_OF_NOTHING}, IntegrityError),
    ({"size": 7, "crc32": crc(b"")}, {"size": 7, "crc32": GOOD_CRC}, IntegrityError),
    ({"size": 7, "crc32": GOOD_CRC}, {"size": 7, "crc32": crc(b"")}, IntegrityError),
    ({"size": 7, "crc32": GOOD_CRC}, {"size": 7, "sha256": SHA_OF_NOTHING}, IntegrityError),
    ({"size": 7}, {"size": 7, "crc32": GOOD_CRC}, IntegrityError),
    ({"size": 8, "sha256": GOOD}, {"size": 8, "sha256": GOOD}, IncompleteTransfer),
    ({"size": 7, "sha256": GOOD}, {"size": 6, "sha256": GOOD}, IncompleteTransfer),
], ids=["wrong-sha", "reply-sha", "wrong-crc", "reply-crc", "reply-other", "no-checksum", "wrong-size",
        "reply-size"])
def test_a_tampered_pull_leaves_nothing(tmp_path: Path, trailer: dict[str, Any], reply: dict[str, Any],
                                        error: type[Exception]) -> None:
    reply = {"path": "/f", "mode": 0o644, **reply}
    link = InMemoryLink({"pull": lying_pull(b"payload", trailer, reply)})
    link.flush()
    failed = start(link, link.client.pull("/f", str(tmp_path / "dest")))
    assert isinstance(error_of(failed), error)
    assert os.listdir(tmp_path) == []
    link.flush()
    assert link.client._transport is None  # an agent whose account differs from its bytes lies


def test_pull_stops_at_its_size_limit_and_leaves_nothing(tmp_path: Path) -> None:
    async def pull(ctx: OperationContext) -> Any:
        ctx.on_cancel(lambda reason: ctx.io.fail(files.OperationCancelled("stopped")))
        while True:  # a guest file that never ends
            await ctx.io.send(Channel.INPUT, b"x" * 65536)

    link = InMemoryLink({"pull": pull})
    link.flush()
    failed = start(link, link.client.pull("/dev/zero-ish", str(tmp_path / "dest"), max_size=1_000_000))
    error = error_of(failed)
    assert isinstance(error, LimitExceeded) and "1000000 bytes" in str(error)
    assert os.listdir(tmp_path) == []
    assert link.agent.session is not None and not link.agent.session._running  # the guest stopped


def test_stream_data_waits_while_the_transport_is_full(tmp_path: Path) -> None:
    """
    Credit does not bound what the host buffers: an agent may grant credit and never read.
    So while the transport's buffer is full (it pauses its producer) push data waits.
    """
    received: list[int] = []

    async def push(ctx: OperationContext) -> dict[str, Any]:
        while (chunk := await ctx.io.receive(Channel.INPUT)) is not None:
            received.append(len(chunk))
        digest = hashlib.sha256(data).hexdigest()
        return {"path": "/f", "size": sum(received), "sha256": digest, "mode": 0o644}

    data = os.urandom(300_000)
    link = InMemoryLink({"push": push})
    link.flush()
    link.client._link.pause_sending()  # what the transport does once its buffer is full
    pushed = start(link, link.client.push(io.BytesIO(data), "/f"))
    assert received == [] and not pushed.called  # the request went out, no data
    link.client._link.resume_sending()
    link.flush()
    assert result_of(pushed).size == sum(received) == len(data)


def test_a_stream_waiting_for_a_full_transport_fails_with_the_session() -> None:
    link = InMemoryLink({"push": Silent(ignore_cancel=False)})
    link.flush()
    link.client._link.pause_sending()
    pushed = start(link, link.client.push(io.BytesIO(b"x" * 1000), "/f"))
    link.client._transport_lost(Failure(ConnectionDone()))
    assert isinstance(error_of(pushed), ConnectionLost)


# ---- exec output ------------------------------------------------------------------


def test_run_without_callbacks_caps_the_collected_output() -> None:
    sent = [0]
    cancels: list[dict[str, Any]] = []

    async def exec_(ctx: OperationContext) -> Any:
        ctx.on_cancel(cancels.append)
        ctx.on_cancel(lambda reason: ctx.io.fail(files.OperationCancelled("stopped")))
        while True:
            await ctx.io.send(Channel.STDOUT, b"o" * 65536)
            sent[0] += 65536

    link = InMemoryLink({"exec": exec_}, host_limits=ClientLimits(max_output=1024 * 1024))
    link.flush()
    ran = start(link, link.client.run(["yes"]))
    error = error_of(ran)
    assert isinstance(error, LimitExceeded) and "more than 1048576 bytes to stdout" in str(error)
    assert cancels  # the guest process was stopped
    # It stopped about one window after the cap, not at the guest's pleasure.
    assert sent[0] <= 1024 * 1024 + Limits().window + 65536


# ---- timeouts and cancels ----------------------------------------------------------


def test_a_silent_agent_times_out_with_a_clear_error() -> None:
    silent = Silent(ignore_cancel=False)
    link = InMemoryLink({"ping": silent}, host_limits=ClientLimits(call_timeout=10))
    link.flush()
    pending = call(link, "ping")
    link.clock.advance(9)
    assert not pending.called
    link.clock.advance(1)
    link.flush()
    error = error_of(pending)
    assert isinstance(error, OperationTimeout) and str(error) == (
        "the agent did not answer ping within 10 s; it was cancelled (pass a longer timeout, or check "
        "the guest's load)"
    )
    assert error.details == {"timeout": 10}
    assert silent.cancels and link.client._transport is not None  # it answered the CANCEL: kept


def test_deadlines_a_fraction_of_a_second_apart_each_fire_on_time() -> None:
    silent = Silent(ignore_cancel=False)
    link = InMemoryLink({"ping": silent}, host_limits=ClientLimits(call_timeout=10))
    link.flush()
    calls = [start(link, Deferred.fromCoroutine(link.client.call("ping", timeout=t))) for t in (2, 2.5, 2.75)]
    for step, ended in ((1.99, [False] * 3), (0.01, [True, False, False]), (0.5, [True, True, False]),
                        (0.25, [True] * 3)):
        link.clock.advance(step)
        link.flush()
        assert [c.called for c in calls] == ended
    assert all(isinstance(error_of(c), OperationTimeout) for c in calls)


def test_calls_time_out_each_at_its_own_deadline_on_one_timer() -> None:
    silent = Silent(ignore_cancel=False)
    link = InMemoryLink({"ping": silent}, host_limits=ClientLimits(call_timeout=10))
    link.flush()
    timers = len(link.clock.getDelayedCalls())
    first = call(link, "ping")  # due at 10
    link.clock.advance(3)
    second = call(link, "ping")  # at 13
    short = start(link, Deferred.fromCoroutine(link.client.call("ping", timeout=2)))  # at 5: sooner
    assert len(link.clock.getDelayedCalls()) == timers + 1  # one timer for the three
    link.clock.advance(2)
    link.flush()
    error = error_of(short)
    assert isinstance(error, OperationTimeout) and "within 2 s" in str(error)
    assert not first.called and not second.called
    link.clock.advance(5)
    link.flush()
    assert isinstance(error_of(first), OperationTimeout) and not second.called
    link.clock.advance(3)
    link.flush()
    assert isinstance(error_of(second), OperationTimeout) and len(silent.cancels) == 3
    # The caller's own cancel is no timeout; nor is a call that ended in time.
    cancelled = call(link, "ping")
    cancelled.cancel()
    link.flush()
    assert isinstance(error_of(cancelled), CancelledError)
    assert link.client._deadlines._due == {} and link.client._deadlines._expired == set()


def test_an_agent_ignoring_cancel_keeps_its_slots_and_is_dropped() -> None:
    silent = Silent(ignore_cancel=True)
    link = InMemoryLink({"wait": silent}, agent_limits=Limits(max_inflight=2),
                        host_limits=ClientLimits(call_timeout=5, cancel_grace=20))
    link.flush()
    first, second = call(link, "wait"), call(link, "wait")
    link.clock.advance(5)
    link.flush()
    assert isinstance(error_of(first), OperationTimeout) and isinstance(error_of(second), OperationTimeout)
    assert len(silent.cancels) == 2
    # The agent still counts both as in flight: a third call waits for a slot instead of
    # failing with a misleading "too many requests".
    third = call(link, "wait")
    assert not third.called
    with capturedLogs() as logs:
        link.clock.advance(20)
        dropped(link, logs, "did not answer the CANCEL of wait")
    error = error_of(third)
    assert isinstance(error, ProtocolError) and "CANCEL" in str(error)


def test_an_agent_silent_during_a_stream_and_to_pings_is_dropped(tmp_path: Path) -> None:
    stuck = Silent(ignore_cancel=True)
    link = InMemoryLink({"pull": stuck, "ping": stuck},
                        host_limits=ClientLimits(liveness_interval=60, call_timeout=10, cancel_grace=1000))
    link.flush()
    pulling = start(link, link.client.pull("/f", str(tmp_path / "dest")))
    link.clock.advance(60)  # silent for a minute: pinged
    link.flush()
    assert not pulling.called
    with capturedLogs() as logs:
        link.clock.advance(10)
        dropped(link, logs, "did not answer a ping within 10 s")
    assert isinstance(error_of(pulling), ProtocolError) and os.listdir(tmp_path) == []


def test_a_quiet_operation_of_an_agent_that_answers_pings_is_left_alone() -> None:
    quiet = Silent(ignore_cancel=False)  # a guest process that prints nothing for a long time
    link = InMemoryLink({**system.OPERATIONS, "exec": quiet},
                        host_limits=ClientLimits(liveness_interval=60, call_timeout=10))
    link.flush()
    running = start(link, link.client.run(["sleep", "1000"]))
    for _ in range(20):
        link.clock.advance(30)
        link.flush()
    assert not running.called and link.client._transport is not None
    running.cancel()
    link.flush()


# ---- malformed results --------------------------------------------------------------


def answering(result: Any) -> Operation:
    return lambda ctx: result


@pytest.mark.parametrize(("op", "result", "why"), [
    ("ping", ["not", "an", "object"], "a JSON object was expected, got list"),
    ("ping", None, "got NoneType"),
    ("stat", {"path": "/x", "type": "file", "size": 1, "mtime": 0, "uid": 0, "gid": 0, "target": None},
     "'mode' is missing"),
    ("stat", {"path": "/x", "type": "file", "size": 1, "mode": 2**80, "mtime": 0, "uid": 0, "gid": 0,
              "target": None}, "'mode' is missing or invalid"),
    ("list", [{"name": "a", "type": "file", "size": 1, "mode": -1, "mtime": 0}], "'mode'"),
    ("list", {"a": 1}, "a JSON array was expected"),
    # A name is one path component: a caller joins it to a host directory.
    ("list", [{"name": "../../etc/cron.d/x", "type": "file", "size": 1, "mode": 0, "mtime": 0}], "'name'"),
    ("list", [{"name": "..", "type": "dir", "size": 1, "mode": 0, "mtime": 0}], "'name'"),
    ("list", [{"name": "", "type": "file", "size": 1, "mode": 0, "mtime": 0}], "'name'"),
    ("list", [{"name": "a", "type": "fifo", "size": 1, "mode": 0, "mtime": 0}], "'type'"),
    ("exec", {"exit_code": "0", "signal": None}, "'exit_code'"),
    ("push", {"path": "/x", "size": 0, "sha256": SHA_OF_NOTHING, "mode": 1e300}, "'mode'"),
    ("mkdir", {"surprise": True}, "no result was expected"),
])
def test_a_malformed_result_is_our_protocol_error_and_drops_the_agent(op: str, result: Any, why: str) -> None:
    link = InMemoryLink({op: answering(result)})
    link.flush()
    with capturedLogs() as logs:
        pending = call(link, op, {})
        dropped(link, logs, why)
    error = error_of(pending)
    assert isinstance(error, ProtocolError) and f"answered {op} with a malformed result" in str(error)


def test_malformed_results_reach_the_public_methods_as_protocol_errors(tmp_path: Path) -> None:
    link = InMemoryLink({"exec": answering({"exit_code": "0"}), "pull": answering("no")})
    link.flush()
    assert isinstance(error_of(start(link, link.client.run(["true"]))), ProtocolError)
    link = InMemoryLink({"pull": answering({"path": "/f", "size": 0, "sha256": SHA_OF_NOTHING})})
    link.flush()
    assert isinstance(error_of(start(link, link.client.pull("/f", str(tmp_path / "f")))), ProtocolError)
    assert os.listdir(tmp_path) == []


# ---- floods and trickles ------------------------------------------------------------


def test_a_notification_flood_drops_the_agent() -> None:
    def flood(ctx: OperationContext) -> None:
        for _ in range(1000):
            ctx.notify("spam", {"n": 1})

    link = InMemoryLink({"flood": flood}, host_limits=ClientLimits(notification_rate=50))
    link.flush()
    link.clock.advance(100)  # a while after connecting: the bucket holds 50, not more
    seen: list[str] = []
    link.client.notifications.append(lambda name, body: seen.append(name))
    with capturedLogs() as logs:
        pending = call(link, "flood")
        dropped(link, logs, "faster than 50 per second")
    assert len(seen) == 50 and isinstance(error_of(pending), ProtocolError)


def test_notifications_within_the_rate_are_delivered() -> None:
    def some(ctx: OperationContext) -> None:
        for _ in range(40):
            ctx.notify("event", {})

    link = InMemoryLink({"some": some}, host_limits=ClientLimits(notification_rate=50))
    link.flush()
    seen: list[str] = []
    link.client.notifications.append(lambda name, body: seen.append(name))
    for _ in range(3):
        assert result_of(call(link, "some")) is None
        link.clock.advance(1)  # the bucket refills
    assert len(seen) == 120 and link.client._transport is not None


def test_a_notification_of_exactly_the_largest_size_is_delivered() -> None:
    largest = len(encode_json({"name": "big", "body": {"x": "y" * 2000}}))
    link = InMemoryLink({"big": lambda ctx: ctx.notify("big", {"x": "y" * 2000})},
                        host_limits=ClientLimits(max_notification=largest))
    link.flush()
    seen: list[dict[str, Any]] = []
    link.client.notifications.append(lambda name, body: seen.append(body))
    assert result_of(call(link, "big")) is None
    assert seen == [{"x": "y" * 2000}] and link.client._transport is not None


def test_a_large_notification_drops_the_agent() -> None:
    link = InMemoryLink({"big": lambda ctx: ctx.notify("big", {"x": "y" * 2000})},
                        host_limits=ClientLimits(max_notification=2000))
    link.flush()
    with capturedLogs() as logs:
        pending = call(link, "big")
        dropped(link, logs, "more than 2000 (the limit max_notification)")
    assert isinstance(error_of(pending), ProtocolError)


def test_a_frame_sent_one_byte_a_second_drops_the_agent() -> None:
    link = InMemoryLink({}, host_limits=ClientLimits(partial_frame_timeout=30))
    link.flush()
    frame = encode_header(FrameType.NOTIFY, 0, 100) + b"x" * 100
    with capturedLogs() as logs:
        for byte in range(29):
            link.client._data_received(frame[byte:byte + 1])
            link.clock.advance(1)
        assert link.client._transport is not None
        link.client._data_received(frame[29:30])
        link.clock.advance(1)
        dropped(link, logs, "left a frame unfinished for 30 s")


# ---- limits, exactly at their bounds -------------------------------------------------------


def streaming_pull(chunks: list[bytes]) -> Operation:
    """A pull that sends ``chunks`` one frame each, and an honest account of them."""

    async def pull(ctx: OperationContext) -> dict[str, Any]:
        ctx.on_cancel(lambda reason: ctx.io.fail(files.OperationCancelled("stopped")))
        for chunk in chunks:
            await ctx.io.send(Channel.INPUT, chunk)
        data = b"".join(chunks)
        digest = hashlib.sha256(data).hexdigest()
        ctx.io.send_eof(Channel.INPUT, {"sha256": digest, "size": len(data)})
        ctx.reactor.advance(2.5)  # type: ignore[attr-defined]
        return {"path": ctx.args["path"], "sha256": digest, "size": len(data), "mode": 0o644}

    return pull


def test_a_pull_of_exactly_its_limit_is_taken_and_one_byte_more_is_not(tmp_path: Path) -> None:
    link = InMemoryLink({"pull": streaming_pull([b"x" * 6, b"y" * 4])})
    link.flush()
    link.clock.advance(100)  # the pull's time is its own, not the clock's reading
    progress: list[tuple[int, int | None]] = []
    sink = io.BytesIO()
    result = result_of(start(link, link.client.pull("/g/f", sink, max_size=10,
                                                    progress=lambda *a: progress.append(a))))
    assert sink.getvalue() == b"xxxxxxyyyy" and result.size == 10 and result.seconds == 2.5
    assert progress == [(6, None), (10, None)]
    link = InMemoryLink({"pull": streaming_pull([b"x" * 6, b"y" * 5])})
    link.flush()
    error = error_of(start(link, link.client.pull("/g/f", str(tmp_path / "f"), max_size=10)))
    assert isinstance(error, LimitExceeded) and str(error) == (
        "the guest file /g/f is larger than the pull's limit of 10 bytes; the pull was stopped: pass a "
        "larger max_size")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("trailer", "reply", "message"), [
    ({"size": 6, "sha256": GOOD}, {"size": 7, "sha256": GOOD},
     "received 7 bytes of the guest file /f but the agent says it sent 6: pull again"),
    ({"size": 7, "sha256": SHA_OF_NOTHING}, {"size": 7, "sha256": GOOD},
     f"the 7 bytes received of the guest file /f have sha256 {GOOD} but the agent sent {SHA_OF_NOTHING}: "
     "the data was corrupted in transit; pull again"),
    ({"size": 7, "crc32": GOOD_CRC}, {"size": 7, "crc32": "00000000"},
     f"the 7 bytes received of the guest file /f have crc32 {GOOD_CRC} but the agent sent 00000000: "
     "the data was corrupted in transit; pull again"),
    ({"size": 7}, {"size": 7, "crc32": GOOD_CRC},
     f"the 7 bytes received of the guest file /f have crc32 {GOOD_CRC} but the agent sent None: "
     "the data was corrupted in transit; pull again"),
])
def test_a_tampered_pull_says_what_did_not_add_up(trailer: dict[str, Any], reply: dict[str, Any],
                                                   message: str) -> None:
    link = InMemoryLink({"pull": lying_pull(b"payload", trailer, {"path": "/f", "mode": 0o644, **reply})})
    link.flush()
    error = error_of(start(link, link.client.pull("/f", io.BytesIO())))
    assert str(error) == message and error.details == {"path": "/f"}  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", [0, 0o7777])
def test_the_callers_mode_may_be_anything_from_0_to_0o7777(tmp_path: Path, mode: int) -> None:
    link = InMemoryLink({"pull": streaming_pull([b"data"])})
    link.flush()
    result_of(start(link, link.client.pull("/g/f", str(tmp_path / "f"), mode=mode)))
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode
    (tmp_path / "f").chmod(0o600)


def test_a_boolean_mode_is_refused(tmp_path: Path) -> None:
    link = InMemoryLink({"pull": streaming_pull([b"data"])})
    link.flush()
    pulling = link.client.pull("/g/f", str(tmp_path / "f"), mode=True)
    error = error_of(start(link, pulling))
    assert str(error) == "mode must be permission bits (0 to 0o7777), got True"
    assert os.listdir(tmp_path) == []


def test_a_failed_pull_whose_temp_file_someone_removed_keeps_its_own_error(tmp_path: Path) -> None:
    async def pull(ctx: OperationContext) -> dict[str, Any]:
        await ctx.io.send(Channel.INPUT, b"data")
        for temp in tmp_path.iterdir():
            temp.unlink()  # a cleaner of stale files, say
        ctx.io.send_eof(Channel.INPUT, {"sha256": SHA_OF_NOTHING, "size": 4})
        return {"path": ctx.args["path"], "sha256": SHA_OF_NOTHING, "size": 4, "mode": 0o644}

    link = InMemoryLink({"pull": pull})
    link.flush()
    error = error_of(start(link, link.client.pull("/g/f", str(tmp_path / "f"))))
    assert isinstance(error, IntegrityError) and os.listdir(tmp_path) == []


def exec_writing(chunks: list[bytes]) -> Operation:
    async def exec_(ctx: OperationContext) -> Any:
        ctx.on_cancel(lambda reason: ctx.io.fail(files.OperationCancelled("stopped")))
        for chunk in chunks:
            await ctx.io.send(Channel.STDOUT, chunk)
        return {"argv": ctx.args["argv"], "exit_code": 0, "signal": None}

    return exec_


def test_collected_output_of_exactly_max_output_is_kept_and_one_byte_more_is_not() -> None:
    link = InMemoryLink({"exec": exec_writing([b"a" * 6, b"b" * 4])}, host_limits=ClientLimits(max_output=1))
    link.flush()
    assert result_of(start(link, link.client.run(["cat"], max_output=10))).stdout == b"aaaaaabbbb"
    assert result_of(start(link, link.client.exec(["cat"], max_output=10).result())).stdout == b"aaaaaabbbb"
    link = InMemoryLink({"exec": exec_writing([b"a" * 6, b"b" * 5])})
    link.flush()
    error = error_of(start(link, link.client.run(["cat"], max_output=10)))
    assert isinstance(error, LimitExceeded) and str(error) == (
        "['cat'] wrote more than 10 bytes to stdout; it was cancelled in the guest: pass on_stdout to stream "
        "its output, or a larger max_output")


def test_stdin_written_before_the_session_opens_reaches_the_process() -> None:
    received: list[bytes] = []

    async def exec_(ctx: OperationContext) -> Any:
        while (chunk := await ctx.io.receive(Channel.INPUT)) is not None:
            received.append(bytes(chunk))
        return {"argv": ctx.args["argv"], "exit_code": 0, "signal": None}

    link = InMemoryLink({"exec": exec_})
    handle = link.client.exec(["cat"], stdin=STREAM)  # no handshake yet: the request waits
    written = handle.write_stdin(b"early")
    handle.close_stdin()
    link.flush()
    assert result_of(written) is None and received == [b"early"]
    assert result_of(handle.result()).exit_code == 0


def test_an_agent_ignoring_cancel_is_told_why_it_was_dropped() -> None:
    silent = Silent(ignore_cancel=True)
    link = InMemoryLink({"wait": silent}, host_limits=ClientLimits(call_timeout=5, cancel_grace=20))
    link.flush()
    waiting = call(link, "wait")
    link.clock.advance(5)
    link.flush()
    assert isinstance(error_of(waiting), OperationTimeout)
    link.clock.advance(20)
    assert str(link.client._closed) == ("the agent did not answer the CANCEL of wait (request 1) within 20 s "
                                        "(the limit cancel_grace)")


# ---- liveness, exactly -----------------------------------------------------------------------


class CountingPing:
    """An agent's ping that counts calls and answers unless told to be silent."""

    def __init__(self, silent: bool) -> None:
        self.silent = silent
        self.calls = 0

    async def __call__(self, ctx: OperationContext) -> Any:
        self.calls += 1
        if self.silent:
            await Deferred()
        return {"time": 0, "version": "x"}


def test_a_silent_agent_without_a_call_timeout_is_dropped_after_twice_the_interval() -> None:
    ping = CountingPing(silent=True)
    link = InMemoryLink({"ping": ping, "wait": Silent(ignore_cancel=True)},
                        host_limits=ClientLimits(liveness_interval=60, call_timeout=None))
    link.flush()
    waiting = call(link, "wait")
    link.clock.advance(59)
    link.flush()
    assert ping.calls == 0  # not silent long enough yet
    link.clock.advance(1)
    link.flush()
    assert ping.calls == 1
    with capturedLogs() as logs:
        link.clock.advance(60)  # the ping's own timeout is the interval
        dropped(link, logs, "the agent sent nothing for 60 s while 1 operations waited on it, and did not "
                            "answer a ping within 60 s (the limit liveness_interval)")
    assert isinstance(error_of(waiting), ProtocolError)


def test_without_a_liveness_interval_a_silent_agent_is_never_pinged() -> None:
    ping = CountingPing(silent=False)
    link = InMemoryLink({"ping": ping, "exec": Silent(ignore_cancel=False)},
                        host_limits=ClientLimits(liveness_interval=None, call_timeout=None))
    link.flush()
    running = link.client.run(["sleep", "1000"])
    for _ in range(10):
        link.clock.advance(600)
        link.flush()
    assert ping.calls == 0 and link.client.connected and not running.called
    running.cancel()
    running.addErrback(lambda _: None)
    link.flush()


def test_a_silent_agent_gets_one_probe_at_a_time() -> None:
    ping = CountingPing(silent=True)
    link = InMemoryLink({"ping": ping, "exec": Silent(ignore_cancel=True)},
                        host_limits=ClientLimits(liveness_interval=60, call_timeout=150))
    link.flush()
    running = link.client.run(["sleep", "1000"])  # no call timeout: it streams
    for _ in range(3):  # 60 s: the probe; 120 and 180 s: it is still out
        link.clock.advance(60)
        link.flush()
    assert ping.calls == 1 and link.client._transport is not None
    with capturedLogs() as logs:
        link.clock.advance(30)  # the probe's timeout is the call timeout
        dropped(link, logs, "the agent sent nothing for 60 s while 1 operations waited on it, and did not "
                            "answer a ping within 150 s (the limit liveness_interval)")
    assert isinstance(error_of(running), ProtocolError)


def test_an_agent_that_answers_is_pinged_once_per_silent_interval() -> None:
    ping = CountingPing(silent=False)
    link = InMemoryLink({"ping": ping, "exec": Silent(ignore_cancel=False)},
                        host_limits=ClientLimits(liveness_interval=60, call_timeout=10))
    link.flush()
    running = link.client.run(["sleep", "1000"])
    for _ in range(4):
        link.clock.advance(60)
        link.flush()
    assert ping.calls == 4 and link.client._transport is not None
    running.cancel()
    running.addErrback(lambda _: None)
    link.flush()
    for _ in range(4):  # nothing waits: nothing to ask
        link.clock.advance(60)
        link.flush()
    assert ping.calls == 4


def test_an_agent_heard_from_recently_is_not_pinged() -> None:
    ping = CountingPing(silent=False)

    async def chatty(ctx: OperationContext) -> Any:
        while True:
            await ctx.io.send(Channel.STDOUT, b".")
            await deferLater(ctx.reactor, 30, lambda: None)

    link = InMemoryLink({"ping": ping, "exec": chatty},
                        host_limits=ClientLimits(liveness_interval=60, call_timeout=10))
    link.flush()
    running = link.client.exec(["chatty"], on_stdout=lambda data: None)
    for _ in range(8):
        link.clock.advance(30)
        link.flush()
    assert ping.calls == 0
    running.cancel()
    running.result().addErrback(lambda _: None)
    link.flush()


def test_no_ping_waits_behind_a_full_set_of_slots() -> None:
    ping = CountingPing(silent=False)
    quiet = Silent(ignore_cancel=False)
    link = InMemoryLink({"ping": ping, "wait": quiet}, agent_limits=Limits(max_inflight=1),
                        host_limits=ClientLimits(liveness_interval=60, call_timeout=None))
    link.flush()
    waiting = call(link, "wait")
    link.clock.advance(60)
    link.flush()
    waiting.cancel()
    waiting.addErrback(lambda _: None)
    link.flush()
    assert ping.calls == 0  # a ping queued for the slot would have gone out once it was free


def test_what_waits_for_a_session_fails_with_the_reason_the_agent_was_dropped() -> None:
    client = GuestClient(Clock(), authenticator=None)
    transport = StringTransport()
    transport.registerProducer(SendGate(client._link), True)
    client._transport_connected(transport)
    nonce = transport.value()[len(SYNC_MAGIC):]
    waiting = Deferred.fromCoroutine(client.wait_ready())
    cancelled = Deferred.fromCoroutine(client.wait_ready())

    def clean_up(failure: Failure) -> Failure:  # a caller's, which cancels another waiter
        cancelled.cancel()
        return failure

    waiting.addErrback(clean_up)
    client._data_received(ACK_MAGIC + nonce)  # the host sends its HELLO and waits for the agent's
    client._data_received(encode_header(FrameType.RESPONSE, 1, 0))
    error = error_of(waiting)
    assert isinstance(error, ProtocolError) and str(error) == "expected HELLO from the agent, got RESPONSE"
    # A waiter has no canceller: Twisted's cancel absorbs the errback that follows.
    assert isinstance(error_of(cancelled), CancelledError)


def test_the_host_names_its_software_in_its_hello() -> None:
    client = GuestClient(Clock(), authenticator=None)
    transport = StringTransport()
    client._transport_connected(transport)
    nonce = transport.value()[len(SYNC_MAGIC):]
    transport.clear()
    client._data_received(ACK_MAGIC + nonce)
    decoder = FrameDecoder(1 << 20)
    decoder.feed(transport.value())
    hello = decoder.next()
    assert isinstance(hello, Frame) and hello.type is FrameType.HELLO
    assert hello.json()["software"] == "vmcontroller"


def test_a_cancelled_exec_says_what_happens_in_the_guest() -> None:
    link = InMemoryLink({"exec": Silent(ignore_cancel=False)})
    link.flush()
    handle = link.client.exec(["sleep", "1000"])
    link.flush()
    handle.cancel()
    link.flush()
    error = error_of(handle.result())
    assert str(error) == "['sleep', '1000'] was cancelled: the agent kills its process group in the guest"
