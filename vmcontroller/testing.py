"""
Fakes for code that uses vmcontroller: a guest client joined in memory to a real agent
session, driven by a :class:`~twisted.internet.task.Clock` and an
:class:`~twisted.test.iosim.IOPump` instead of a reactor (:class:`InMemoryLink`), and a
hypervisor that lives in memory (:class:`FakeHypervisor`), held to the same conformance suite
as the real drivers.

``twisted.test.iosim`` is not public API: this module is the one place that imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.test import iosim
from zope.interface import implementer

from guest_agent.protocol.connection import SUPPORTED_VERSIONS, Limits
from guest_agent.protocol.tls import Authenticator, Credentials
from guest_agent.session import Operation
from guest_agent.transports import AgentProtocol
from vmcontroller._fakehypervisor import FakeHypervisor, FakeVM
from vmcontroller.client import ClientLimits, GuestClient, _AgentProtocol
from vmcontroller.credentials import mint


def minted() -> tuple[Credentials, Authenticator]:
    """
    Fresh credentials of one VM: the host's end, for ``connect(..., credentials=...)``, and
    the agent's end ready for an agent (``AgentFactory(..., authenticator=...)``).
    """
    host, agent = mint()
    return host, Authenticator.from_credentials(agent, server_side=True)


def paired_authenticators() -> tuple[Authenticator, Authenticator]:
    """The host's and the agent's TLS ends of freshly minted credentials of one VM."""
    host, agent = mint()
    return (
        Authenticator.from_credentials(host, server_side=False),
        Authenticator.from_credentials(agent, server_side=True),
    )


class InMemoryLink:
    """
    A client and an agent session joined by in-memory transports, authenticated with
    freshly minted credentials (unless ``development``, or ``authenticators`` gives the
    host's and the agent's ends).
    """

    def __init__(
        self,
        operations: Mapping[str, Operation],
        *,
        clock: Clock | None = None,
        client_limits: Limits | None = None,
        agent_limits: Limits | None = None,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        agent_reactor: Any = None,
        host_limits: ClientLimits | None = None,
        development: bool = False,
        authenticators: tuple[Authenticator | None, Authenticator | None] | None = None,
    ) -> None:
        self.clock = clock or Clock()
        if authenticators is not None:  # e.g. ends that do not belong together
            host, agent = authenticators
        else:
            host, agent = paired_authenticators() if not development else (None, None)
        self.client = GuestClient(self.clock, client_limits, versions, host_limits, authenticator=host)
        self.agent = AgentProtocol(
            agent_reactor or self.clock,
            operations,
            agent_limits,
            {"software": "in-memory"},
            authenticator=agent,
        )
        client_protocol = _AgentProtocol(self.client)
        self.pump = iosim.connect(
            self.agent,
            iosim.makeFakeServer(self.agent),
            client_protocol,
            iosim.makeFakeClient(client_protocol),
            greet=True,
        )

    def flush(self) -> None:
        """Move bytes both ways until neither side has anything more to say."""
        self.pump.flush()


@implementer(IStreamClientEndpoint)
class InMemoryAgentEndpoint:
    """
    An endpoint for :func:`vmcontroller.client.connect` that joins each connection, in
    memory, to a new session of one agent serving ``operations`` (so what the agent keeps
    across sessions, such as retained commands, survives a dropped connection).  The agent
    authenticates with freshly minted credentials, whose host end is :attr:`credentials`,
    unless ``development``.

    :ivar credentials: the host's end, for ``connect(..., credentials=endpoint.credentials)``;
        None in development mode.
    :ivar agent_authenticator: the agent's end, used by each new session; replace it to play
        another VM's agent (or one in development mode, with None).
    :ivar down: while true, connection attempts are refused, as by an agent not yet back.
    """

    def __init__(self, operations: Mapping[str, Operation], *, agent_reactor: Any = None,
                 agent_limits: Limits | None = None, development: bool = False) -> None:
        self._operations = operations
        self.credentials: Credentials | None = None
        self.agent_authenticator: Authenticator | None = None
        if not development:
            self.credentials, self.agent_authenticator = minted()
        self._agent_reactor = agent_reactor or Clock()
        self._agent_limits = agent_limits
        self.down = False
        self.attempts = 0
        self.pump: iosim.IOPump | None = None

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        self.attempts += 1
        if self.down:
            return fail(ConnectionRefusedError("the in-memory agent is down"))
        client_protocol = protocolFactory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
        assert client_protocol is not None
        agent = AgentProtocol(self._agent_reactor, self._operations, self._agent_limits,
                              {"software": "in-memory"}, authenticator=self.agent_authenticator)
        self.pump = iosim.connect(agent, iosim.makeFakeServer(agent), client_protocol,
                                  iosim.makeFakeClient(client_protocol), greet=True)
        return succeed(client_protocol)

    def flush(self) -> None:
        """Move bytes both ways on the current connection until both sides are quiet."""
        if self.pump is not None:
            self.pump.flush()

    def drop(self) -> None:
        """
        Cut the current connection, as a killed QEMU does: bytes in flight either way are
        lost, and both sides see the connection closed.
        """
        assert self.pump is not None
        for transport in (self.pump.clientIO, self.pump.serverIO):
            transport.stream = []
            transport.disconnecting = True
        self.pump.flush()
        self.pump = None


__all__ = [
    "FakeHypervisor",
    "FakeVM",
    "InMemoryAgentEndpoint",
    "InMemoryLink",
    "minted",
    "paired_authenticators",
]
