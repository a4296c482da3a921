"""
``vmcontroller``: poke VMs and their agents from a shell.

``vmcontroller demo`` runs the main job end to end on the default guest image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from hypervisors import load_driver
from hypervisors.interface import IHypervisorDriver, VMState
from vmcontroller.client import GuestClient
from vmcontroller.errors import VMControllerError, VMNotFound
from vmcontroller.images import build_image
from vmcontroller.machine import connect_vm_agent

DEMO_VM = "vmc-demo"


class _Steps:
    """Prints each step of a job with the time it took."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    async def run(self, title: str, step: Callable[[], Awaitable[Any]]) -> Any:
        print(f"==> {title} ...", flush=True)
        began = time.monotonic()
        result = await step()
        print(f"    done in {time.monotonic() - began:.2f} s", flush=True)
        return result

    def total(self) -> None:
        print(f"==> all done in {time.monotonic() - self.start:.1f} s", flush=True)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def _driver(reactor: Any, args: argparse.Namespace) -> IHypervisorDriver:
    options = {"uri": args.uri} if args.uri else {}
    driver = load_driver(args.driver, reactor, **options)
    driver.startService()  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", driver.stopService)  # type: ignore[attr-defined]
    return driver


async def demo(reactor: Any, args: argparse.Namespace) -> None:
    steps = _Steps()
    image = await steps.run("build or reuse the default guest image", lambda: build_image(reactor))
    print(f"    image {image.directory}")
    driver = await _driver(reactor, args)
    name = args.name
    if name in await driver.list_vms():
        await steps.run(f"remove the VM {name} left by an earlier run", lambda: driver.undefine(name))
    spec = image.vm_spec(name, accel=args.accel)
    await steps.run(f"define VM {name} (accel={args.accel})", lambda: driver.define(spec))
    await steps.run("boot it", lambda: driver.start(name))
    client: GuestClient = await steps.run(
        "wait for the guest agent", lambda: connect_vm_agent(reactor, driver, name)
    )
    try:
        info = await client.info()
        print(f"    agent {info.get('agent_version')} on {info.get('hostname')}, kernel {info.get('kernel')}")
        result = await steps.run("exec uname -a", lambda: client.run(["uname", "-a"], check=True))
        print("    " + result.stdout.decode().strip())
        with tempfile.TemporaryDirectory() as scratch:
            source = os.path.join(scratch, "input.bin")
            with open(source, "wb") as f:
                f.write(os.urandom(16 * 1024 * 1024))
            pushed = await steps.run("push a 16 MiB file", lambda: client.push(source, "/root/input.bin"))
            back = os.path.join(scratch, "output.bin")
            await steps.run("pull it back", lambda: client.pull("/root/input.bin", back))
            local, returned = _sha256(source), _sha256(back)
            print(f"    sha256 sent     {local}")
            print(f"    sha256 in guest {pushed.sha256}")
            print(f"    sha256 pulled   {returned}")
            if not local == pushed.sha256 == returned:
                raise VMControllerError("the file changed on its round trip through the guest")
        await steps.run("take snapshot 'demo'", lambda: driver.snapshot_create(name, "demo"))
        await steps.run("delete the file in the guest", lambda: client.remove("/root/input.bin"))
        client.close()
        await steps.run("revert to snapshot 'demo'", lambda: driver.snapshot_revert(name, "demo"))
        client = await steps.run("reconnect to the agent", lambda: connect_vm_agent(reactor, driver, name))
        stat = await client.stat("/root/input.bin")
        print(f"    /root/input.bin is back after the revert: {stat['size']} bytes")
    finally:
        client.close()
    await steps.run("shut the VM down (ACPI)", lambda: driver.shutdown(name, wait=True, timeout=120))
    state = await driver.state(name)
    print(f"    state: {state.name}")
    if state is not VMState.SHUTOFF:
        raise VMControllerError(f"the VM is {state.name} after shutdown")
    if not args.keep:
        await steps.run(f"remove VM {name}", lambda: driver.undefine(name))
    steps.total()


async def _with_agent(
    reactor: Any, args: argparse.Namespace, action: Callable[[GuestClient], Awaitable[Any]]
) -> Any:
    driver = await _driver(reactor, args)
    client = await connect_vm_agent(reactor, driver, args.name, timeout=args.timeout)
    try:
        return await action(client)
    finally:
        client.close()


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


async def command(reactor: Any, args: argparse.Namespace) -> int:
    if args.command == "demo":
        await demo(reactor, args)
        return 0
    if args.command == "image":
        image = await build_image(reactor, force=args.force)
        _print(image.__dict__)
        return 0
    if args.command == "vm":
        driver = await _driver(reactor, args)
        if args.action == "list":
            _print(await driver.list_vms())
            return 0
        if args.action == "define":
            image = await build_image(reactor)
            await driver.define(image.vm_spec(args.name, accel=args.accel))
            return 0
        if args.action == "state":
            print((await driver.state(args.name)).name)
            return 0
        if args.action in ("snapshot", "revert", "delete-snapshot"):
            if not args.snapshot:
                raise VMControllerError(f"'vm {args.action}' needs --snapshot NAME")
            if args.action == "snapshot":
                await driver.snapshot_create(args.name, args.snapshot)
            elif args.action == "revert":
                await driver.snapshot_revert(args.name, args.snapshot)
            else:
                await driver.snapshot_delete(args.name, args.snapshot)
            return 0
        if args.action == "snapshots":
            _print([s.__dict__ for s in await driver.snapshot_list(args.name)])
            return 0
        action: Callable[[str], Deferred[Any]] = {
            "start": driver.start,
            "shutdown": driver.shutdown,
            "poweroff": driver.power_off,
            "pause": driver.pause,
            "resume": driver.resume,
            "reset": driver.reset,
            "save": driver.save_state,
            "undefine": driver.undefine,
        }[args.action]
        await action(args.name)
        return 0
    if args.command in ("ping", "info"):
        _print(await _with_agent(reactor, args, lambda c: getattr(c, args.command)()))
        return 0
    if args.command == "exec":

        def out(stream: Any) -> Callable[[bytes], None]:
            def write(data: bytes) -> None:
                stream.buffer.write(data)
                stream.buffer.flush()

            return write

        result = await _with_agent(
            reactor,
            args,
            lambda c: (
                c.exec(
                    args.argv, timeout=args.exec_timeout, on_stdout=out(sys.stdout), on_stderr=out(sys.stderr)
                ).exited
            ),
        )
        return result.exit_code if result.exit_code is not None else 128
    if args.command == "push":
        _print((await _with_agent(reactor, args, lambda c: c.push(args.source, args.destination))).__dict__)
        return 0
    if args.command == "pull":
        _print((await _with_agent(reactor, args, lambda c: c.pull(args.source, args.destination))).__dict__)
        return 0
    raise AssertionError(args.command)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmcontroller", description=__doc__.strip().splitlines()[0])
    p.add_argument("--driver", default="libvirt", help="hypervisor driver (entry point name)")
    p.add_argument("--uri", help="libvirt URI (default qemu:///system as root, else qemu:///session)")
    p.add_argument(
        "--accel", default=os.environ.get("VMCONTROLLER_ACCEL", "auto"), choices=["auto", "kvm", "tcg"]
    )
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the agent")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the main job: boot, exec, push, pull, snapshot, revert, shut down")
    d.add_argument("--name", default=DEMO_VM)
    d.add_argument("--keep", action="store_true", help="keep the VM defined afterwards")
    i = sub.add_parser("image", help="build (or find in the cache) the default guest image")
    i.add_argument("--force", action="store_true")
    v = sub.add_parser("vm", help="VM lifecycle")
    v.add_argument(
        "action",
        choices=[
            "list",
            "define",
            "start",
            "shutdown",
            "poweroff",
            "pause",
            "resume",
            "reset",
            "save",
            "state",
            "snapshot",
            "snapshots",
            "revert",
            "delete-snapshot",
            "undefine",
        ],
    )
    v.add_argument("name", nargs="?", default=DEMO_VM)
    v.add_argument("--snapshot")
    for name in ("ping", "info"):
        sub.add_parser(name, help=f"agent {name}").add_argument("name")
    e = sub.add_parser("exec", help="run a command in the guest, streaming its output")
    e.add_argument("name")
    e.add_argument("--exec-timeout", type=float)
    e.add_argument("argv", nargs="+")
    for name in ("push", "pull"):
        t = sub.add_parser(name, help=f"{name} a file")
        t.add_argument("name")
        t.add_argument("source")
        t.add_argument("destination")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    async def run(reactor: Any) -> None:
        try:
            code = await command(reactor, args)
        except (VMControllerError, VMNotFound) as e:
            print(f"vmcontroller: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        if code:
            raise SystemExit(code)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
