"""The command line's pure parts, and its guest tree walk against a guest that lies."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

import hypervisors
from guest_agent.session import OperationContext
from hypervisors.interface import Capability, VMSpec, VMState
from vmcontroller import cli
from vmcontroller.errors import VMNotFound, VMStateError
from vmcontroller.testing import FakeHypervisor, InMemoryLink


async def endless_directories(ctx: OperationContext) -> list[dict[str, Any]]:
    # Every directory holds another: a guest that would keep cp walking for ever.
    return [{"name": "d", "type": "dir", "size": 0, "mode": 0o755, "mtime": 0.0}]


def test_cp_stops_at_a_guest_tree_deeper_than_its_bound() -> None:
    link = InMemoryLink({"list": endless_directories})
    seen: list[str] = []

    async def walk() -> None:
        async for path, _ in cli._walk_guest(link.client, "/top"):
            seen.append(path)

    failures: list[Any] = []
    Deferred.fromCoroutine(walk()).addErrback(failures.append)
    for _ in range(cli.MAX_GUEST_TREE_DEPTH + 5):
        link.flush()
    assert failures and failures[0].check(cli.UsageError)
    assert "more than 64 levels deep" in failures[0].getErrorMessage()
    assert len(seen) == cli.MAX_GUEST_TREE_DEPTH


@pytest.mark.parametrize(
    ("text", "vm", "path"),
    [("vm1:/root/x", "vm1", "/root/x"), ("./vm1:x", None, "./vm1:x"), ("/tmp/a:b", None, "/tmp/a:b")],
)
def test_guest_locations(text: str, vm: str | None, path: str) -> None:
    assert cli._location(text) == cli._Location(vm, path)


def test_a_relative_guest_path_is_refused() -> None:
    with pytest.raises(cli.UsageError, match="must be absolute"):
        cli._location("vm1:root/x")


def test_errors_become_one_line_with_cli_hints_and_their_exit_codes() -> None:
    error = VMNotFound("no VM named 'x'\n(call list_vms() to see them)")
    assert cli._one_line(error) == "no VM named 'x' (call `vmcontroller list` to see them)"
    assert cli._exit_code(error) == 3
    assert cli._exit_code(VMStateError("off")) == 4


def test_every_command_has_a_description_and_json_where_it_reads() -> None:
    parser = cli.parser()
    help_text = parser.format_help()
    assert "``" not in help_text  # no raw reST
    for name in ("list", "info", "ping", "image", "watch", "cp"):
        args = parser.parse_args(
            [name, "--json"]
            + (["vm"] if name in ("info", "ping") else [])
            + (["a", "vm:/b"] if name == "cp" else [])
        )
        assert args.json
    # The command's own options need no "--" before them.
    args = parser.parse_args(["exec", "vm", "uname", "-a"])
    assert args.argv == ["uname", "-a"]
    # --driver before or after the command name.
    assert parser.parse_args(["list", "--driver", "vmware"]).driver == "vmware"
    assert parser.parse_args(["--driver", "vmware", "list"]).driver == "vmware"


@pytest.mark.parametrize("command", ["pause", "resume"])
def test_pause_on_a_driver_that_cannot_is_one_line_saying_why(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str) -> None:
    reactor = MemoryReactorClock()
    player = FakeHypervisor(reactor, "player", frozenset(Capability) - {Capability.PAUSE})
    player.startService()
    player.define(VMSpec(name="vm1", disk="/base.qcow2"))
    player.start("vm1")
    monkeypatch.setattr(cli, "load_driver", lambda name, reactor, **options: player)
    status = Deferred.fromCoroutine(cli.run_command(reactor, cli.parse_args([command, "vm1"])))
    assert status.result == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"vmcontroller: error: the player driver cannot do pause: this fake plays a product that cannot "
        f"{command} a VM\n")
    assert player.vm("vm1").state is VMState.RUNNING


def register_driver(monkeypatch: pytest.MonkeyPatch, name: str, factory: Callable[..., Any]) -> None:
    """``factory`` as the one installed driver, found by ``name`` through its entry point."""
    entry_point = SimpleNamespace(name=name, value="tests:factory", load=lambda: factory)
    monkeypatch.setattr(hypervisors, "entry_points", lambda group: [entry_point])


def test_driver_options_from_the_command_line_reach_the_constructor_typed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    received: dict[str, Any] = {}

    def factory(reactor: Any, *, uri: str = "", interval: float = 1.0, retries: int = 3,
                strict: bool = False) -> FakeHypervisor:
        received.update(uri=uri, interval=interval, retries=retries, strict=strict)
        return FakeHypervisor(reactor, "fake")

    register_driver(monkeypatch, "fake", factory)
    args = cli.parse_args([
        "list", "--driver", "fake", "--uri", "fake:///", "--driver-option", "interval=2.5",
        "--driver-option", "retries=7", "--driver-option", "strict=yes",
    ])
    Deferred.fromCoroutine(cli._driver(MemoryReactorClock(), args))
    assert received == {"uri": "fake:///", "interval": 2.5, "retries": 7, "strict": True}
    for bad, message in (
        ("retries=many", "hypervisor driver 'fake': retries='many' is not a number (like 3)"),
        ("strict=maybe", "hypervisor driver 'fake': strict='maybe' is not true or false"),
        ("colour=red",
         "hypervisor driver 'fake' has no option 'colour'; its options: uri, interval, retries, strict"),
        ("retries", "--driver-option takes NAME=VALUE (product=player, say), not 'retries'"),
    ):
        args = cli.parse_args(["list", "--driver", "fake", "--driver-option", bad])
        failed = Deferred.fromCoroutine(cli._driver(MemoryReactorClock(), args))
        errors: list[Failure] = []
        failed.addErrback(errors.append)
        assert errors and errors[0].getErrorMessage() == message


def test_a_driver_that_takes_any_options_gets_them_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    received: dict[str, Any] = {}

    def factory(reactor: Any, **options: Any) -> FakeHypervisor:
        received.update(options)
        return FakeHypervisor(reactor, "open")

    register_driver(monkeypatch, "open", factory)
    hypervisors.load_driver("open", MemoryReactorClock(), capabilities=frozenset(), colour="red")
    assert received == {"capabilities": frozenset(), "colour": "red"}
