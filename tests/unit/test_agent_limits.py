"""
The agent against odd arguments and hostile network peers, and its configuration file:
bad input is a ``bad-request``, never ``internal``; the configured rules hold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from guest_agent.config import AgentConfig, ConfigError, TCPLimits
from guest_agent.ops import OPERATIONS, build_operations, policy
from guest_agent.protocol.connection import Limits
from guest_agent.protocol.errors import BadRequest, PermissionDenied, TooManyRequests
from guest_agent.protocol.frames import SYNC_MAGIC
from guest_agent.transports import AgentFactory, AgentProtocol
from tests.unit.test_client_limits import Silent
from tests.unit.test_client_session import call, error_of, result_of
from vmcontroller.testing import InMemoryLink


def served(operations: dict[str, Any] | None = None) -> InMemoryLink:
    link = InMemoryLink(operations or OPERATIONS)
    link.flush()
    return link


@pytest.mark.parametrize(("op", "args", "why"), [
    ("stat", {"path": "/tmp/a\0b"}, "NUL"),
    ("stat", {"path": "/tmp/\ud800"}, "lone surrogate"),
    ("pull", {"path": "/tmp/\udfff"}, "lone surrogate"),
    ("list", {"path": "/\0"}, "NUL"),
    ("remove", {"path": "/tmp/x\0"}, "NUL"),
    ("mkdir", {"path": "/tmp/vmc-never", "mode": 2**70}, "'mode' must be permission bits"),
    ("mkdir", {"path": "/tmp/vmc-never", "mode": -1}, "'mode' must be permission bits"),
    ("mkdir", {"path": "/tmp/vmc-never", "mode": 0o17777}, "'mode' must be permission bits"),
    ("push", {"path": "/tmp/vmc-never", "mode": 2**70}, "'mode' must be permission bits"),
    ("push", {"path": "/tmp/vmc-never", "mode": 1.5}, "'mode' must be permission bits"),
    ("exec", {"argv": ["/bin/true", "a\0b"]}, "NUL"),
    ("exec", {"argv": ["/bin/true", "\ud800"]}, "lone surrogate"),
    ("exec", {"argv": ["\udbff"]}, "lone surrogate"),
    ("exec", {"argv": ["/bin/true"], "env": {"A": "\ud800"}}, "lone surrogate"),
    ("exec", {"argv": ["/bin/true"], "env": {"\ud800": "x"}}, "lone surrogate"),
    ("exec", {"argv": ["/bin/true"], "env": {"A": 1}}, "must be a string"),
    ("exec", {"argv": ["/bin/true"], "cwd": "/tmp\0"}, "NUL"),
    ("exec", {"argv": ["/bin/true"], "cwd": "/\ud800"}, "lone surrogate"),
])
def test_odd_arguments_are_bad_requests_not_internal_errors(op: str, args: dict[str, Any], why: str) -> None:
    link = served()
    with capturedLogs() as logs:
        error = error_of(call(link, op, args))
    assert isinstance(error, BadRequest) and why in str(error), error
    assert not [event for event in logs if event.get("log_failure")]  # no traceback in the journal
    assert not os.path.exists("/tmp/vmc-never")
    assert result_of(call(link, "ping"))["version"]  # the session goes on


def test_undecodable_file_names_still_work(tmp_path: Path) -> None:
    # os.fsdecode turns undecodable bytes into surrogates; those name real files.
    name = os.fsdecode(b"caf\xe9")
    (tmp_path / name).write_bytes(b"x")
    link = served()
    entry = result_of(call(link, "stat", {"path": str(tmp_path / name)}))
    assert entry["size"] == 1


# ---- the configuration file ---------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_a_configuration_file_sets_every_limit(tmp_path: Path) -> None:
    config = AgentConfig.load(write_config(tmp_path, """
[limits]
max_frame = 65536
window = 1048576
max_inflight = 8
max_buffered = 8388608
max_processes = 3
[tcp]
handshake_timeout = 5
idle_timeout = 60.5
max_connections = 2
[files]
allowed_roots = ["/var/lib/vmc-test-jobs"]
[exec]
allow = ["/bin/true"]
"""))
    assert config.limits == Limits(65536, 1048576, 8, 8388608) and config.max_processes == 3
    assert config.tcp == TCPLimits(5, 60.5, 2)
    # A root that is no symbolic link on the host (Debian's boinc-client makes /var/lib/boinc one,
    # and roots are compared resolved).
    assert config.allowed_roots == ("/var/lib/vmc-test-jobs",)
    assert config.exec_allow == frozenset({os.path.realpath("/bin/true")})
    assert AgentConfig.from_document({}) == AgentConfig()


@pytest.mark.parametrize(("text", "why"), [
    ("[limits]\nmax_frmae = 1\n", "unknown keys ['max_frmae']"),
    ("[limits]\nmax_frame = 0\n", "limits.max_frame must be a positive number"),
    ("[limits]\nmax_frame = 512\n", "max_frame in 1024"),
    ("[limits]\nwindow = true\n", "limits.window must be a positive number"),
    ("[tcp]\nidle_timeout = -1\n", "tcp.idle_timeout must be a positive number"),
    ("[tcp]\nidle_timeout = nan\n", "tcp.idle_timeout must be a positive number"),
    ("[files]\nallowed_roots = ['relative']\n", "files.allowed_roots must be a list of absolute paths"),
    ("[exec]\nallow = '/bin/sh'\n", "exec.allow must be a list of absolute paths"),
    ("[limits\n", "not valid TOML"),
    ("[other]\n", "unknown keys ['other']"),
])
def test_a_bad_configuration_is_refused_with_the_key_at_fault(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why.replace("[", r"\[").replace("]", r"\]")):
        AgentConfig.load(write_config(tmp_path, text))


def test_file_operations_stay_under_the_allowed_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (root / "escape").symlink_to(outside)  # a symlink out of the root does not let anything out
    (root / "inside").write_bytes(b"i")
    link = served(build_operations(AgentConfig(allowed_roots=(os.path.realpath(root),))))
    assert result_of(call(link, "stat", {"path": str(root / "inside")}))["size"] == 1
    assert result_of(call(link, "stat", {"path": str(root / "escape")}))["type"] == "symlink"  # itself
    for op, path in [("stat", outside / "secret"), ("pull", root / "escape" / "secret"),
                     ("remove", root / "escape" / "secret"), ("list", root / ".." / "outside"),
                     ("mkdir", outside / "new"), ("push", outside / "new")]:
        error = error_of(call(link, op, {"path": str(path)}))
        assert isinstance(error, PermissionDenied) and "only under" in str(error), (op, error)
    assert os.listdir(outside) == ["secret"]


def test_exec_runs_only_allowed_programs(tmp_path: Path) -> None:
    link = served(build_operations(AgentConfig(exec_allow=frozenset({os.path.realpath("/bin/true")}))))
    error = error_of(call(link, "exec", {"argv": ["/bin/sh", "-c", f"touch {tmp_path}/ran"]}))
    assert isinstance(error, PermissionDenied) and "does not allow running" in str(error)
    error = error_of(call(link, "exec", {"argv": ["sh", "-c", "true"]}))  # found on PATH: the same
    assert isinstance(error, PermissionDenied)
    assert os.listdir(tmp_path) == []


def test_exec_processes_at_once_are_limited_across_sessions() -> None:
    operations = policy.apply({"exec": Silent(ignore_cancel=False)}, AgentConfig(max_processes=1))
    # A second session of the same agent shares the limit.
    first, second = served(operations), served(operations)
    running = call(first, "exec", {"argv": ["sleep", "30"]})
    assert not running.called
    error = error_of(call(second, "exec", {"argv": ["true"]}))
    assert isinstance(error, TooManyRequests) and "max_processes" in str(error)
    running.cancel()
    first.flush()
    error_of(running)
    assert not call(second, "exec", {"argv": ["true"]}).called  # the slot is free again: it runs


# ---- TCP ----------------------------------------------------------------------------


def connected(factory: AgentFactory) -> tuple[AgentProtocol, StringTransport]:
    protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.2.2", 4000))
    assert protocol is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.2.2", 4000))
    protocol.makeConnection(transport)
    return protocol, transport


def test_tcp_peers_beyond_the_limit_are_refused_and_logged() -> None:
    factory = AgentFactory(Clock(), OPERATIONS, tcp=TCPLimits(max_connections=2), authenticator=None)
    first, _ = connected(factory)
    connected(factory)
    with capturedLogs() as logs:
        assert factory.buildProtocol(IPv4Address("TCP", "10.0.2.2", 4001)) is None
    assert any("max_connections" in event["log_format"] for event in logs)
    first.connectionLost()
    assert factory.buildProtocol(IPv4Address("TCP", "10.0.2.2", 4001)) is not None


def test_a_tcp_peer_that_does_not_complete_the_handshake_is_disconnected() -> None:
    clock = Clock()
    factory = AgentFactory(clock, OPERATIONS, tcp=TCPLimits(handshake_timeout=10), authenticator=None)
    protocol, transport = connected(factory)
    protocol.dataReceived(SYNC_MAGIC + b"n" * 16)  # a SYNC, then nothing
    clock.advance(9.9)
    assert not transport.disconnecting
    with capturedLogs() as logs:
        clock.advance(0.1)
    assert transport.disconnecting
    assert any("handshake_timeout" in str(event.get("why")) for event in logs)


def test_an_idle_tcp_peer_is_disconnected_unless_an_operation_runs() -> None:
    clock = Clock()
    link = InMemoryLink(OPERATIONS, clock=clock)
    link.flush()
    protocol = link.agent
    protocol._tcp = TCPLimits(idle_timeout=60)
    protocol.dataReceived(b"")  # restart the timer under the new limit
    clock.advance(59)
    link.flush()
    assert result_of(call(link, "ping"))  # traffic resets it
    clock.advance(59)
    link.flush()
    assert link.client._transport is not None
    with capturedLogs() as logs:
        clock.advance(1)
        link.flush()
    assert link.client._transport is None
    assert any("idle_timeout" in str(event.get("why")) for event in logs)
