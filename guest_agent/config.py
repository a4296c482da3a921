"""
The agent's configuration file: its limits, where push and pull may touch files and which
programs exec may run.  TOML (read with the standard library's ``tomllib``)::

    [limits]                 # what a host may make the agent spend; defaults shown
    max_frame = 262144       # largest frame payload accepted, bytes
    window = 4194304         # bytes a host may send on one stream before credit
    max_inflight = 64        # requests served at once per session
    max_buffered = 67108864  # received stream bytes not yet consumed, per session
    max_processes = 64       # exec processes running at once, across sessions

    [tcp]                    # only for --listen: a network peer may be anyone
    handshake_timeout = 10.0 # seconds from accepting a connection to a completed HELLO
    idle_timeout = 900.0     # seconds without a byte while no operation runs
    max_connections = 8      # connections at once; more are refused

    [files]
    allowed_roots = ["/var/lib/boinc", "/tmp"]   # absent: every path

    [exec]
    allow = ["/usr/bin/boinc_client"]            # absent: every program

Every key is optional; an unknown key or a value of the wrong type is an error at start,
not a limit silently not applied.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from guest_agent.protocol.connection import MAX_FRAME, MAX_INFLIGHT, MAX_WINDOW, Limits

DEFAULT_CONFIG_PATH = "/etc/vmcontroller/agent.toml"


class ConfigError(Exception):
    """The configuration file cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class TCPLimits:
    handshake_timeout: float = 10.0
    idle_timeout: float = 900.0
    max_connections: int = 8


@dataclass(frozen=True)
class AgentConfig:
    """
    :ivar limits: the protocol limits of every session.
    :ivar max_processes: exec processes running at once, across all sessions.
    :ivar tcp: what a TCP listener allows.
    :ivar allowed_roots: directories (real paths) under which file operations may act;
        None: anywhere.
    :ivar exec_allow: real paths of the programs exec may run; None: any.
    """

    limits: Limits = field(default_factory=Limits)
    max_processes: int = 64
    tcp: TCPLimits = field(default_factory=TCPLimits)
    allowed_roots: tuple[str, ...] | None = None
    exec_allow: frozenset[str] | None = None

    @classmethod
    def load(cls, path: str) -> AgentConfig:
        """:raises ConfigError: unreadable, not TOML, or a key unknown or of the wrong type."""
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read the agent configuration {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"the agent configuration {path} is not valid TOML: {e}") from None
        try:
            return cls.from_document(document)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> AgentConfig:
        _only(document, {"limits", "tcp", "files", "exec"}, "the top level")
        limits_table = dict(_table(document, "limits"))
        max_processes = limits_table.pop("max_processes", 64)
        limits = _numbers(Limits, limits_table, "limits", int)
        if not (1024 <= limits.max_frame <= MAX_FRAME and 1024 <= limits.window <= MAX_WINDOW
                and limits.max_inflight <= MAX_INFLIGHT):
            raise ConfigError(f"limits must keep max_frame in 1024..{MAX_FRAME}, window in "
                              f"1024..{MAX_WINDOW} and max_inflight up to {MAX_INFLIGHT}")
        if type(max_processes) is not int or max_processes < 1:
            raise ConfigError(f"limits.max_processes must be a positive integer, got {max_processes!r}")
        tcp = _numbers(TCPLimits, _table(document, "tcp"), "tcp", (int, float))
        files = _table(document, "files")
        _only(files, {"allowed_roots"}, "[files]")
        roots = files.get("allowed_roots")
        exec_table = _table(document, "exec")
        _only(exec_table, {"allow"}, "[exec]")
        allow = exec_table.get("allow")
        return cls(
            limits=limits,
            max_processes=max_processes,
            tcp=tcp,
            allowed_roots=None if roots is None else tuple(_absolute_paths(roots, "files.allowed_roots")),
            exec_allow=None if allow is None else frozenset(_absolute_paths(allow, "exec.allow")),
        )


def _table(document: dict[str, Any], name: str) -> dict[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    return table


def _only(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)} in {where}; known: {sorted(known)}")


def _numbers(cls: Any, table: dict[str, Any], where: str, kinds: type | tuple[type, ...]) -> Any:
    names = {f.name for f in fields(cls)}
    _only(table, names, f"[{where}]")
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:  # type: ignore[operator]
            raise ConfigError(f"{where}.{name} must be a positive number, got {value!r}")
    return cls(**table)


def _absolute_paths(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) and os.path.isabs(p) for p in value):
        raise ConfigError(f"{where} must be a list of absolute paths, got {value!r}")
    # Compared as real paths: a symlink in the configuration means what it points to.
    return [os.path.realpath(p) for p in value]


__all__ = ["DEFAULT_CONFIG_PATH", "AgentConfig", "ConfigError", "TCPLimits"]
