"""
Fakes for code that uses vmcontroller: a guest client joined in memory to a real agent
session, driven by a :class:`~twisted.internet.task.Clock` and an
:class:`~twisted.test.iosim.IOPump` instead of a reactor.

``twisted.test.iosim`` is not public API: this module is the one place that imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.task import Clock
from twisted.test import iosim

from guest_agent.protocol.connection import SUPPORTED_VERSIONS, Limits
from guest_agent.protocol.tls import Authenticator, Credentials
from guest_agent.session import Operation
from guest_agent.transports import AgentProtocol
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


__all__ = ["InMemoryLink", "minted", "paired_authenticators"]
