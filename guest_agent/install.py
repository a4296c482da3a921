"""
Install the guest agent into a Debian system: ``python3 -m guest_agent install [--root DIR]``.

Two forms of the agent install the same way:

- this package, copied into the target's ``/usr/local/lib/python3.X/dist-packages`` (on
  Debian's ``sys.path`` for its own ``/usr/bin/python3``); it needs ``python3-twisted`` there;
- the single-file agent (``python -m vmcontroller.agent_bundle``), run as
  ``python3 vmcontroller-agent.pyz install``, copied to ``/usr/local/lib/vmcontroller/``; it
  needs only ``python3``.

Then the agent is enabled at boot by files and symlinks alone, the way ``systemctl enable``
(or ``rc-update add``, or ``update-rc.d``) would, so that it works in a chroot or an unbooted
image tree: a systemd unit, or where the target has no systemd, an OpenRC service or a SysV
init script that restarts the agent when it exits.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Literal

__all__ = ["BUNDLE_DIR", "BUNDLE_FILE", "UNIT_NAME", "agent_command", "init_system", "install", "main"]

SERVICE_NAME = "vmcontroller-agent"
UNIT_NAME = f"{SERVICE_NAME}.service"
PACKAGE_DIR = Path(__file__).resolve().parent
#: Where the single-file agent goes, relative to the target's root.
BUNDLE_DIR = "usr/local/lib/vmcontroller"
BUNDLE_FILE = "vmcontroller-agent.pyz"
GUEST_PYTHON = "/usr/bin/python3"

InitSystem = Literal["systemd", "openrc", "sysv"]

_OPENRC_SCRIPT = """\
#!/sbin/openrc-run
# Written by `vmcontroller-agent install`: the agent where the guest boots with OpenRC.
description="vmcontroller guest agent"
command={command}
command_args={args}
# Restarted when it exits, as systemd's Restart=always does.
supervisor=supervise-daemon
respawn_delay=1
output_log=/var/log/vmcontroller-agent.log
error_log=/var/log/vmcontroller-agent.log

depend() {{
    need localmount
}}
"""

_SYSV_SCRIPT = """\
#!/bin/sh
### BEGIN INIT INFO
# Provides:          vmcontroller-agent
# Required-Start:    $local_fs
# Required-Stop:     $local_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: vmcontroller guest agent
### END INIT INFO
# Written by `vmcontroller-agent install`: the agent where the guest has no systemd.
PIDFILE=/run/vmcontroller-agent.pid
LOG=/var/log/vmcontroller-agent.log

running() {{
    [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}}

case "$1" in
start)
    running && exit 0
    # A session of its own: not ended with the shell or terminal that started it.
    setsid "$0" supervise </dev/null >/dev/null 2>&1 &
    echo $! >"$PIDFILE"
    ;;
supervise)
    # Restart the agent when it exits, as systemd's Restart=always does; on TERM, end it too.
    trap 'kill "$child" 2>/dev/null; exit 0' TERM INT
    while :; do
        {command} >>"$LOG" 2>&1 &
        child=$!
        wait "$child"
        sleep 1
    done
    ;;
stop)
    running && kill "$(cat "$PIDFILE")" 2>/dev/null
    rm -f "$PIDFILE"
    ;;
restart)
    "$0" stop
    "$0" start
    ;;
status)
    running && echo "vmcontroller-agent is running" && exit 0
    echo "vmcontroller-agent is stopped"
    exit 3
    ;;
*)
    echo "usage: $0 {{start|stop|restart|status}}" >&2
    exit 2
    ;;
esac
"""


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


def running_bundle() -> Path | None:
    """The single-file agent (zipapp) this module runs from, or ``None`` for the package."""
    for parent in Path(__file__).parents:
        if parent.is_file():
            return parent if zipfile.is_zipfile(parent) else None
    return None


def _unit_template() -> str:
    # Through importlib.resources: inside a zipapp the unit is no file of its own.
    return resources.files("guest_agent").joinpath(UNIT_NAME).read_text()


def agent_command(bundle: bool, unit_text: str | None = None) -> list[str]:
    """
    The command line that runs the agent in the guest: the unit's own ``ExecStart`` options
    (the one place they are written), after the package's or the bundle's invocation.
    """
    unit_text = unit_text or _unit_template()
    exec_start = next(line for line in unit_text.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start[len("ExecStart=") :])
    options = argv[argv.index("guest_agent") + 1 :]
    if bundle:
        return [GUEST_PYTHON, f"/{BUNDLE_DIR}/{BUNDLE_FILE}", *options]
    return [GUEST_PYTHON, "-m", "guest_agent", *options]


def init_system(root: Path) -> InitSystem:
    """
    Which service manager the target boots with: OpenRC where ``openrc-run`` exists, systemd
    where its binary does, SysV init where only ``/etc/init.d`` does; systemd when the tree
    has none of them yet.
    """
    if any((root / d / "openrc-run").exists() for d in ("sbin", "usr/sbin")):
        return "openrc"
    if any((root / d / "systemd/systemd").exists() for d in ("lib", "usr/lib")):
        return "systemd"
    if (root / "etc/init.d").is_dir():
        return "sysv"
    return "systemd"


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    # Written beside the target and renamed over it: a running agent never sees half a file.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.chmod(mode)
    partial.replace(path)


def _link(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def _install_package(root: Path, python_version: str | None, log: Callable[[str], object]) -> None:
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


def _install_bundle(root: Path, bundle: Path, log: Callable[[str], object]) -> None:
    directory = root / BUNDLE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / BUNDLE_FILE
    _replace_file(target, bundle.read_bytes(), 0o755)
    log(f"installed the single-file agent {target}")


def _install_systemd(root: Path, command: list[str], log: Callable[[str], object]) -> None:
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = unit_dir / UNIT_NAME
    text = "".join(
        f"ExecStart={shlex.join(command)}\n" if line.startswith("ExecStart=") else line
        for line in _unit_template().splitlines(keepends=True)
    )
    _replace_file(unit, text.encode(), 0o644)
    log(f"installed the systemd unit {unit}")
    link = unit_dir / "multi-user.target.wants" / UNIT_NAME
    # An absolute link to the unit's place on the target, as `systemctl enable` makes it.
    _link(link, f"/etc/systemd/system/{UNIT_NAME}")
    log(f"enabled {UNIT_NAME} ({link} -> /etc/systemd/system/{UNIT_NAME})")


def _install_openrc(root: Path, command: list[str], log: Callable[[str], object]) -> None:
    script = root / "etc/init.d" / SERVICE_NAME
    script.parent.mkdir(parents=True, exist_ok=True)
    text = _OPENRC_SCRIPT.format(command=shlex.quote(command[0]), args=shlex.quote(shlex.join(command[1:])))
    _replace_file(script, text.encode(), 0o755)
    _link(root / "etc/runlevels/default" / SERVICE_NAME, f"/etc/init.d/{SERVICE_NAME}")
    log(f"installed and enabled the OpenRC service {script} (runlevel default)")


def _install_sysv(root: Path, command: list[str], log: Callable[[str], object]) -> None:
    script = root / "etc/init.d" / SERVICE_NAME
    script.parent.mkdir(parents=True, exist_ok=True)
    _replace_file(script, _SYSV_SCRIPT.format(command=shlex.join(command)).encode(), 0o755)
    for level in "2345":
        _link(root / f"etc/rc{level}.d/S20{SERVICE_NAME}", f"../init.d/{SERVICE_NAME}")
    for level in "016":
        _link(root / f"etc/rc{level}.d/K01{SERVICE_NAME}", f"../init.d/{SERVICE_NAME}")
    log(f"installed and enabled the SysV init script {script} (runlevels 2-5)")


def install(
    root: Path,
    *,
    python_version: str | None = None,
    init: InitSystem | None = None,
    log: Callable[[str], object] = print,
) -> None:
    """
    Install the agent under ``root`` and enable it at boot: the single-file agent when this
    runs from it (``python3 vmcontroller-agent.pyz install``), else this package; then a
    systemd unit, an OpenRC service or a SysV init script, as the target boots.

    :param root: the target system's root directory (``/`` for the running system).
    :param python_version: ``X.Y`` of the target's python3 (package only); found out when
        not given.
    :param init: the target's service manager; found out (:func:`init_system`) when not given.
    :param log: called with one line per step.
    """
    bundle = running_bundle()
    if bundle is not None:
        _install_bundle(root, bundle, log)
    else:
        _install_package(root, python_version, log)
    command = agent_command(bundle is not None)
    manager = init or init_system(root)
    {"systemd": _install_systemd, "openrc": _install_openrc, "sysv": _install_sysv}[manager](
        root, command, log
    )
    if root == Path("/"):
        start_now = {
            "systemd": f"systemctl daemon-reload && systemctl restart {SERVICE_NAME}",
            "openrc": f"rc-service {SERVICE_NAME} restart",
            "sysv": f"/etc/init.d/{SERVICE_NAME} restart",
        }[manager]
        log(f"run `{start_now}` to start it now")


def main(argv: list[str]) -> int:
    """
    Command-line entry: ``install [--root DIR] [--python-version X.Y] [--init MANAGER]``.

    :param argv: the arguments after ``python3 -m guest_agent`` (a leading ``install`` is allowed).
    :return: the process exit status.
    """
    if argv and argv[0] == "install":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python3 -m guest_agent install",
        description="Install the vmcontroller guest agent and enable it at boot (systemd, or OpenRC "
        "or SysV init where the target has no systemd).",
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
    parser.add_argument(
        "--init",
        choices=["systemd", "openrc", "sysv"],
        default=None,
        help="the target's service manager (default: found out from the target)",
    )
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if not root.is_dir():
        print(f"error: --root {args.root}: no such directory", file=sys.stderr)
        return 2
    try:
        install(root, python_version=args.python_version, init=args.init)
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
