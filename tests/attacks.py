"""
What someone without this VM's credentials can try on the agent's channel, for the tests of
authentication: over real transports (tests/integration) and in memory (tests/unit).

Each attack returns the error it ran into; the caller checks it, then that the agent still
serves its real host.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from guest_agent.protocol.connection import SUPPORTED_VERSIONS, HandshakeComplete, HostConnection
from guest_agent.protocol.errors import ProtocolError, VMControllerError, error_from_wire
from guest_agent.protocol.frames import FrameDecoder, FrameType, Marker
from guest_agent.protocol.tls import Authenticator, Credentials
from vmcontroller.client import GuestClient, _connect, connect
from vmcontroller.credentials import mint


def anonymous_authenticator(agent_certificate: bytes) -> Authenticator:
    """A TLS client that checks the agent's certificate but has none of its own."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=agent_certificate)
    return Authenticator(context, agent_certificate, server_side=False)


def another_vms_credentials(real: Credentials) -> Credentials:
    """Another VM's host key and certificate, pinning this VM's agent (the best a thief can do)."""
    other, _ = mint()
    return Credentials(other.private_key, other.certificate, real.peer_certificate)


class RawChannel(Protocol):
    """The channel as bytes: what was written back, and a way to wait for some of it."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True


async def open_raw(endpoint: IStreamClientEndpoint) -> RawChannel:
    channel = RawChannel()
    await endpoint.connect(Factory.forProtocol(lambda: channel))
    return channel


async def until(reactor: Any, condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        await deferLater(reactor, 0.05, lambda: None)


def plaintext_errors(data: bytes) -> list[VMControllerError]:
    """The connection-level ERROR frames the agent sent outside TLS, in order."""
    decoder = FrameDecoder(1 << 20)
    decoder.feed(data)
    errors: list[VMControllerError] = []
    while True:
        try:
            item = decoder.next()
        except ProtocolError:
            return errors
        if item is None:
            return errors
        if isinstance(item, Marker) or item.type is not FrameType.ERROR:
            continue
        body = item.json()
        errors.append(error_from_wire(body["code"], body["message"], body.get("details") or {}))


async def connect_with(
    reactor: Any, endpoint: IStreamClientEndpoint, authenticator: Authenticator, timeout: float = 60
) -> GuestClient:
    """``connect`` with any TLS end at all, as an intruder would build it."""
    return await _connect(reactor, endpoint, timeout, None, SUPPORTED_VERSIONS, None, authenticator)


async def record_a_real_handshake(
    reactor: Any, endpoint: IStreamClientEndpoint, credentials: Credentials
) -> bytes:
    """Everything a real host wrote in a session that opened: what a wiretap could replay."""
    host = HostConnection(authenticator=Authenticator.from_credentials(credentials, server_side=False))
    channel = await open_raw(endpoint)
    assert channel.transport is not None
    recorded = b""
    seen = 0
    for _attempt in range(60):
        host.start()  # again, with a fresh nonce, if the agent was slow to answer
        recorded = host.data_to_send()
        channel.transport.write(recorded)
        deadline = reactor.seconds() + 2
        while reactor.seconds() < deadline:
            await deferLater(reactor, 0.05, lambda: None)
            events = host.receive_data(bytes(channel.received[seen:]))
            seen = len(channel.received)
            sent = host.data_to_send()
            recorded += sent
            channel.transport.write(sent)
            if any(isinstance(e, HandshakeComplete) for e in events):
                channel.transport.loseConnection()
                return recorded
    raise AssertionError("the real host never got a session to record")


async def replay(reactor: Any, endpoint: IStreamClientEndpoint, recorded: bytes) -> list[VMControllerError]:
    """Write a recorded session to the agent and return its plaintext ERRORs."""
    channel = await open_raw(endpoint)
    assert channel.transport is not None
    channel.transport.write(recorded)
    await until(reactor, lambda: bool(plaintext_errors(bytes(channel.received))), 60, "the agent's refusal")
    channel.transport.loseConnection()
    return plaintext_errors(bytes(channel.received))


class TamperingTransport:
    """Wraps a client's transport and flips one bit of the next write (a TLS record's tag)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.armed = True

    def write(self, data: bytes) -> None:
        if self.armed and data:
            self.armed = False
            data = data[:-1] + bytes([data[-1] ^ 0x01])
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def tamper_next_write(client: GuestClient) -> TamperingTransport:
    wrapped = TamperingTransport(client._transport)
    client._transport = wrapped  # type: ignore[assignment]
    return wrapped


async def serves_its_host(
    reactor: Any, endpoint: IStreamClientEndpoint, credentials: Credentials, timeout: float = 120
) -> None:
    """The agent still answers its real host after an attack."""
    client = await connect(reactor, endpoint, credentials=credentials, timeout=timeout)
    try:
        assert (await client.ping())["version"]
        assert client.authenticated
    finally:
        await client.close()


__all__ = [
    "anonymous_authenticator",
    "another_vms_credentials",
    "connect_with",
    "plaintext_errors",
    "record_a_real_handshake",
    "replay",
    "serves_its_host",
    "tamper_next_write",
]
