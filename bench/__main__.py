"""``python -m bench``: run the benchmark on one booted guest and print the results."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from bench.report import table
from bench.run import MIB, BenchError, Settings, run
from vmcontroller.errors import VMControllerError


def _parser() -> argparse.ArgumentParser:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").strip())
    p.add_argument("--name", default=defaults.name, help="the VM's name (default %(default)s)")
    p.add_argument("--driver", default=defaults.driver, help="hypervisor driver (default %(default)s)")
    p.add_argument("--uri", help="libvirt URI (the driver's default otherwise)")
    p.add_argument(
        "--accel",
        default=os.environ.get("VMCONTROLLER_ACCEL", defaults.accel),
        choices=["auto", "kvm", "tcg"],
    )
    p.add_argument("--vcpus", type=int, default=None, help="the guest's virtual CPUs (default: VMSpec's)")
    p.add_argument("--pings", type=int, default=defaults.pings)
    p.add_argument("--execs", type=int, default=defaults.execs)
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed runs before each series")
    p.add_argument(
        "--block",
        type=int,
        default=defaults.block,
        help="pings or execs through one agent before the next one's turn (default %(default)s)",
    )
    p.add_argument(
        "--size-mib",
        type=int,
        default=defaults.transfer_size // MIB,
        help="size of the pushed, pulled and echoed data (default %(default)s)",
    )
    p.add_argument(
        "--qga-size-mib",
        type=int,
        default=defaults.qga_transfer_size // MIB,
        help="size of the QEMU guest agent's push and pull, each round (default %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="rounds of push and pull, each beside the C-tools reference (default %(default)s)",
    )
    p.add_argument("--echo-messages", type=int, default=defaults.echo_messages)
    p.add_argument("--echo-message-size", type=int, default=defaults.echo_message_size)
    p.add_argument("--boot-timeout", type=float, default=defaults.boot_timeout)
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--keep", action="store_true", help="keep the VM (running) afterwards")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="measure on the VM if it already runs with the echo port (e.g. kept with --keep)",
    )
    return p


def _settings(args: argparse.Namespace) -> Settings:
    if args.vcpus is not None and args.vcpus < 1:
        raise SystemExit("--vcpus must be at least 1")
    counts = ("pings", "execs", "size_mib", "qga_size_mib", "rounds", "echo_messages", "echo_message_size")
    for name in counts:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    size = args.size_mib * MIB
    return Settings(
        name=args.name,
        driver=args.driver,
        uri=args.uri,
        accel=args.accel,
        vcpus=args.vcpus,
        pings=args.pings,
        execs=args.execs,
        warmup=max(args.warmup, 0),
        block=max(args.block, 1),
        transfer_size=size,
        qga_transfer_size=args.qga_size_mib * MIB,
        rounds=args.rounds,
        echo_size=size,
        echo_messages=args.echo_messages,
        echo_message_size=args.echo_message_size,
        boot_timeout=args.boot_timeout,
        keep=args.keep,
        reuse=args.reuse,
    )


def _say(message: str) -> None:
    # Progress goes to stderr, so that --json output stays parseable.
    print(f"==> {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    settings = _settings(args)
    out = sys.stdout
    if args.json:
        # Image builds and child processes print to fd 1: send all of that to stderr and keep
        # a private copy of the real stdout for the JSON alone.
        sys.stdout.flush()
        out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)

    async def go(reactor: Any) -> None:
        try:
            results = await run(reactor, settings, _say)
        except (BenchError, VMControllerError) as e:
            print(f"bench: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        if args.json:
            print(json.dumps(results.as_dict(), indent=2), file=out, flush=True)
        else:
            print(table(results), file=out, flush=True)

    react(lambda reactor: Deferred.fromCoroutine(go(reactor)))


if __name__ == "__main__":
    main()
