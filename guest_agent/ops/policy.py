"""
The agent configuration's rules, put around the operations: allowed roots for the file
operations, an allow-list and a limit of processes at once for exec.

Paths are compared as real paths (symlinks resolved, the last component of the path
excepted, as the operations act on a symlink itself): a symlink under an allowed root
that points out of it does not let an operation out.  A guest process that swaps a
directory for a symlink between the check and the operation can still win that race;
the roots bound what the host can ask for, not what a guest user already can do.
"""

from __future__ import annotations

import os
from typing import Any

from guest_agent.config import AgentConfig
from guest_agent.ops import exec as exec_ops
from guest_agent.ops.files import path_arg
from guest_agent.protocol.errors import PermissionDenied, TooManyRequests
from guest_agent.session import Operation, OperationContext

#: The operations whose ``path`` argument must lie under an allowed root.
FILE_OPERATIONS = ("push", "pull", "mkdir", "list", "stat", "remove")


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _real(path: str) -> str:
    """``path`` with every symlink but its last component resolved."""
    if path == "/":
        return path
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _confined(operation: Operation, roots: tuple[str, ...]) -> Operation:
    def confined(ctx: OperationContext) -> Any:
        path = path_arg(ctx.args)
        if not _under(_real(path), roots):
            raise PermissionDenied(f"{ctx.op} of {path}: the agent's configuration allows file operations "
                                   f"only under {list(roots)}", {"path": path})
        return operation(ctx)
    return confined


class _ProcessSlots:
    """exec processes running at once, across every session of the agent."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0


def _guarded_exec(run: Operation, config: AgentConfig, slots: _ProcessSlots) -> Operation:
    allow = config.exec_allow

    async def guarded_exec(ctx: OperationContext) -> Any:
        if allow is not None:
            request = exec_ops.ExecRequest.from_wire(ctx.args)
            program = os.path.realpath(request.check_runnable(request.environment()))
            if program not in allow:
                raise PermissionDenied(f"the agent's configuration does not allow running {program!r} "
                                       "(its [exec] allow list)", {"path": program})
        if slots.running >= slots.limit:
            raise TooManyRequests(f"{slots.running} processes run already, the agent's limit is "
                                  f"{slots.limit} (max_processes): wait for some to finish")
        slots.running += 1
        try:
            return await run(ctx)
        finally:
            slots.running -= 1

    return guarded_exec


def apply(operations: dict[str, Operation], config: AgentConfig) -> dict[str, Operation]:
    """``operations`` with ``config``'s rules around those it concerns."""
    guarded = dict(operations)
    if config.allowed_roots is not None:
        for name in FILE_OPERATIONS:
            if name in guarded:
                guarded[name] = _confined(guarded[name], config.allowed_roots)
    if "exec" in guarded:
        guarded["exec"] = _guarded_exec(guarded["exec"], config, _ProcessSlots(config.max_processes))
    return guarded


__all__ = ["FILE_OPERATIONS", "apply"]
