"""
Install the guest agent into a Debian system: ``python3 -m guest_agent install [--root DIR]``.

Copies this package into the target's ``/usr/local/lib/python3.X/dist-packages`` (on Debian's
``sys.path`` for its own ``/usr/bin/python3``) and enables ``vmcontroller-agent.service`` by
symlink, the way ``systemctl enable`` would, so that it works in a chroot or an unbooted image
tree without running systemd. The agent needs only ``python3`` and ``python3-twisted`` there.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["UNIT_NAME", "install", "main"]

UNIT_NAME = "vmcontroller-agent.service"
PACKAGE_DIR = Path(__file__).resolve().parent


def guest_python_version(root: Path) -> str:
    """
    The ``X.Y`` version of the target's ``/usr/bin/python3``.

    Read from the interpreter symlink (Debian points ``python3`` at ``python3.X``) or, failing
    that, from the ``/usr/lib/python3.X`` directory; for the running system it is this
    interpreter's version when that is ``/usr/bin/python3``.
    """
    python3 = root / "usr/bin/python3"
    if python3.is_symlink():
        match = re.fullmatch(r"(?:.*/)?python(3\.\d+)", os.readlink(python3))
        if match:
            return match.group(1)
    versions = sorted(
        (p.name[len("python") :] for p in (root / "usr/lib").glob("python3.*") if p.is_dir()),
        key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()),
    )
    versions = [v for v in versions if re.fullmatch(r"3\.\d+", v)]
    if versions:
        return versions[-1]
    if root == Path("/"):
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    raise FileNotFoundError(
        f"no python3 found under {root} (looked at {python3} and {root / 'usr/lib/python3.*'}): "
        "install python3 and python3-twisted in the target first"
    )


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))}


def _make_readable(top: Path) -> None:
    # The agent runs as root, but world-readable files keep the tree usable by any user's python.
    top.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(top):
        for d in dirnames:
            Path(dirpath, d).chmod(0o755)
        for f in filenames:
            Path(dirpath, f).chmod(0o644)


def install(root: Path, *, python_version: str | None = None, log: Callable[[str], object] = print) -> None:
    """
    Install the agent package and its systemd unit under ``root`` and enable the unit.

    :param root: the target system's root directory (``/`` for the running system).
    :param python_version: ``X.Y`` of the target's python3; found out when not given.
    :param log: called with one line per step.
    """
    version = python_version or guest_python_version(root)
    site = root / f"usr/local/lib/python{version}/dist-packages"
    target = site / "guest_agent"
    site.mkdir(parents=True, exist_ok=True)

    # Copy beside the target and swap it in, so an interrupted install never leaves a mix of
    # old and new modules that the running agent could import.
    staging = Path(tempfile.mkdtemp(prefix=".guest_agent-", dir=site))
    try:
        copied = staging / "guest_agent"
        shutil.copytree(PACKAGE_DIR, copied, ignore=_ignore, symlinks=False)
        _make_readable(copied)
        old = None
        if target.exists():
            old = site / f"{staging.name}-old"
            target.rename(old)
        copied.rename(target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"installed the guest_agent package in {target}")

    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = unit_dir / UNIT_NAME
    shutil.copyfile(PACKAGE_DIR / UNIT_NAME, unit)
    unit.chmod(0o644)
    log(f"installed the systemd unit {unit}")

    wants = unit_dir / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / UNIT_NAME
    if link.is_symlink() or link.exists():
        link.unlink()
    # An absolute link to the unit's place on the target, as `systemctl enable` makes it.
    link.symlink_to(f"/etc/systemd/system/{UNIT_NAME}")
    log(f"enabled {UNIT_NAME} ({link} -> /etc/systemd/system/{UNIT_NAME})")
    if root == Path("/"):
        log("run `systemctl daemon-reload && systemctl restart vmcontroller-agent` to start it now")


def main(argv: list[str]) -> int:
    """
    Command-line entry: ``install [--root DIR] [--python-version X.Y]``.

    :param argv: the arguments after ``python3 -m guest_agent`` (a leading ``install`` is allowed).
    :return: the process exit status.
    """
    if argv and argv[0] == "install":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python3 -m guest_agent install",
        description="Install the vmcontroller guest agent and enable its systemd unit.",
    )
    parser.add_argument(
        "--root", default="/", help="root directory of the target system (default: the running one)"
    )
    parser.add_argument(
        "--python-version",
        default=None,
        metavar="X.Y",
        help="version of the target's /usr/bin/python3 (default: found out from the target)",
    )
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if not root.is_dir():
        print(f"error: --root {args.root}: no such directory", file=sys.stderr)
        return 2
    try:
        install(root, python_version=args.python_version)
    except OSError as e:
        print(
            f"error: installing the guest agent under {root} failed: {e}; "
            "check that the directory is writable (run as root for a system install)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
