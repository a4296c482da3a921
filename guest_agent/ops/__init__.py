"""The agent's operations, by the name a REQUEST gives."""

from __future__ import annotations

from guest_agent.config import AgentConfig
from guest_agent.ops import exec as _exec
from guest_agent.ops import files as _files
from guest_agent.ops import system as _system
from guest_agent.session import Operation

OPERATIONS: dict[str, Operation] = {**_system.OPERATIONS, **_exec.OPERATIONS, **_files.OPERATIONS}


def build_operations(config: AgentConfig, extra: dict[str, Operation] | None = None) -> dict[str, Operation]:
    """
    The operations, with ``extra`` ones over them (e.g. ``exec`` that retains commands),
    under ``config``'s rules (allowed roots, exec allow-list, process limit).
    """
    from guest_agent.ops import policy

    return policy.apply({**OPERATIONS, **(extra or {})}, config)
