"""``connect`` against a real TCP listener that does not serve an agent at once."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from guest_agent.ops import OPERATIONS
from guest_agent.transports import AgentFactory
from vmcontroller.client import connect
from vmcontroller.errors import AgentUnreachable
from vmcontroller.testing import minted


class _HangUp(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class _AgentAfterHangUps(Factory):
    """Accepts and drops the first connections, as a NAT port forward does before the agent
    behind it listens, then serves the agent."""

    def __init__(self, hang_ups: int) -> None:
        self.hang_ups = hang_ups
        self.credentials, authenticator = minted()
        self.agent = AgentFactory(reactor, OPERATIONS, authenticator=authenticator)

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if self.hang_ups > 0:
            self.hang_ups -= 1
            return _HangUp()
        return self.agent.buildProtocol(addr)


@pytest_twisted.ensureDeferred
async def test_a_connection_dropped_before_the_handshake_is_retried() -> None:
    factory = _AgentAfterHangUps(2)
    listener = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        client = await connect(
            reactor,
            TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getHost().port),
            credentials=factory.credentials,
            timeout=30,
        )
        assert (await client.ping())["version"]
        client.close()
    finally:
        await listener.stopListening()


@pytest_twisted.ensureDeferred
async def test_only_hang_ups_until_the_deadline_are_unreachable() -> None:
    factory = _AgentAfterHangUps(10**6)
    listener = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        # Long enough for a connection to be made and dropped on a loaded machine: with 1.5 s
        # it failed once in a full run beside a fuzzer and a CI run on the 2 cores.
        with pytest.raises(AgentUnreachable, match=r"no agent answered within 5 s \(last error: .*closed"):
            await connect(
                reactor,
                TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getHost().port),
                credentials=factory.credentials,
                timeout=5,
            )
    finally:
        await listener.stopListening()
