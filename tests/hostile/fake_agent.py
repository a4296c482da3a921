"""
A hostile agent: it completes the handshake with the real agent engine, then misbehaves
in one chosen way.  Run as its own process, as a guest is: ``python fake_agent.py
unix:PATH BEHAVIOUR``; it prints ``listening`` once it accepts connections.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from guest_agent.credentials import read_credentials_file
from guest_agent.protocol.connection import (
    AgentConnection,
    HandshakeComplete,
    RequestReceived,
    WindowOpened,
)
from guest_agent.protocol.frames import Channel, FrameType, encode_frame, encode_header, encode_json
from guest_agent.protocol.tls import Authenticator

reactor: Any = _reactor
SHA_OF_DATA = "3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7"  # sha256(b"data")


class HostileAgent(Protocol):
    def __init__(self, behaviour: str, authenticator: Authenticator) -> None:
        self.behaviour = behaviour
        # A guest that has its VM's credentials, as a hostile guest does.
        self.engine = AgentConnection(authenticator=authenticator)
        self.loops: list[LoopingCall] = []
        self.streaming: int | None = None

    # ---- the honest part: the real engine's handshake --------------------------------

    def dataReceived(self, data: bytes) -> None:
        events = self.engine.receive_data(data)
        self.flush()
        for event in events:
            if isinstance(event, HandshakeComplete):
                self.opened()
            elif isinstance(event, RequestReceived):
                getattr(self, "on_" + self.behaviour.replace("-", "_"), self.on_silence)(event)
            elif isinstance(event, WindowOpened) and event.request_id == self.streaming:
                self.stream_more()
        self.flush()

    def flush(self) -> None:
        assert self.transport is not None
        self.transport.write(self.engine.data_to_send())

    def write(self, data: bytes) -> None:
        """Hand-made frames, sent inside the authenticated session as a guest with its keys can."""
        assert self.transport is not None
        self.engine._plain.append(data)  # the engine encrypts what is queued there
        self.flush()

    def repeat(self, interval: float, work: Callable[[], None]) -> None:
        loop = LoopingCall(work)
        loop.start(interval, now=True)
        self.loops.append(loop)

    def connectionLost(self, reason: Failure | None = None) -> None:
        for loop in self.loops:
            if loop.running:
                loop.stop()

    def opened(self) -> None:
        if self.behaviour == "notify-flood":
            body = encode_json({"name": "spam", "body": {"x": "y" * 4000}})
            flood = encode_frame(FrameType.NOTIFY, 0, body)
            self.repeat(0.001, lambda: self.write(flood * 64))

    # ---- the misbehaviours, one per request ---------------------------------------

    def on_silence(self, event: RequestReceived) -> None:
        """Never answers, ignores CANCEL (and every other behaviour's unlisted request)."""

    def on_oversized(self, event: RequestReceived) -> None:
        limit = self.engine.peer_limits.max_frame
        self.write(encode_header(FrameType.RESPONSE, event.request_id, limit + 1) + b"x" * 65536)

    def on_malformed(self, event: RequestReceived) -> None:
        self.write(b"\xa5\x5a" + bytes(14) + b"garbage" * 100)

    def on_nested_json(self, event: RequestReceived) -> None:
        self.write(encode_frame(FrameType.RESPONSE, event.request_id, b"[" * 50_000))

    def on_malformed_result(self, event: RequestReceived) -> None:
        self.engine.send_response(event.request_id, ["not", "an", "object"])

    def on_unknown_id(self, event: RequestReceived) -> None:
        self.write(encode_frame(FrameType.RESPONSE, event.request_id + 1000, b"{}"))

    def on_duplicate(self, event: RequestReceived) -> None:
        answer = encode_frame(FrameType.RESPONSE, event.request_id,
                              encode_json({"time": 0.0, "version": "hostile"}))
        self.write(answer)
        reactor.callLater(0.2, self.write, answer)  # after the host has taken the first

    def on_trickle(self, event: RequestReceived) -> None:
        frame = iter(encode_frame(FrameType.RESPONSE, event.request_id, b'{"time":0,"version":"x"}'))
        self.repeat(1.0, lambda: self.write(bytes([next(frame, 0x20)])))

    def on_endless_stream(self, event: RequestReceived) -> None:
        self.streaming = event.request_id  # CANCEL is ignored: it keeps sending what credit allows
        self.stream_more()

    def stream_more(self) -> None:
        assert self.streaming is not None
        while self.engine.send_data(self.streaming, Channel.STDOUT, b"o" * 65536):
            pass

    def on_stalled_pull(self, event: RequestReceived) -> None:
        """Starts a pull, then falls silent, to pings too."""
        if event.op == "pull":
            self.engine.send_data(event.request_id, Channel.INPUT, b"da")

    def on_pull_wrong_sha(self, event: RequestReceived) -> None:
        self.answer_pull(event.request_id, size=4, sha256="0" * 64)

    def on_pull_wrong_size(self, event: RequestReceived) -> None:
        self.answer_pull(event.request_id, size=5, sha256=SHA_OF_DATA)

    def answer_pull(self, request_id: int, size: int, sha256: str) -> None:
        self.engine.send_data(request_id, Channel.INPUT, b"data")
        self.engine.send_eof(request_id, Channel.INPUT, {"size": size, "sha256": sha256})
        self.engine.send_response(request_id, {"path": "/f", "size": size, "sha256": sha256, "mode": 0o644})


class HostileFactory(Factory):
    def __init__(self, behaviour: str, authenticator: Authenticator) -> None:
        self.behaviour = behaviour
        self.authenticator = authenticator

    def buildProtocol(self, addr: Any) -> HostileAgent:
        return HostileAgent(self.behaviour, self.authenticator)


def main(listen: str, behaviour: str, credentials: str) -> None:
    authenticator = Authenticator.from_credentials(read_credentials_file(credentials), server_side=True)
    listening = serverFromString(reactor, listen).listen(HostileFactory(behaviour, authenticator))
    listening.addCallback(lambda _: print("listening", flush=True))
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
