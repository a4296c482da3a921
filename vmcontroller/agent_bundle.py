"""
The guest agent as one file: ``python -m vmcontroller.agent_bundle -o vmcontroller-agent.pyz``.

A zipapp (PEP 441) holding the ``guest_agent`` package and Twisted with every pure-Python
package it needs, as installed beside this module, so that the agent runs on a guest's own
``python3`` without pip, network or distribution packages (a CernVM or any non-Debian image).
Compiled extensions are left out: zope.interface falls back to its pure-Python version.
Install it in a guest (or an image tree) with ``python3 vmcontroller-agent.pyz install
[--root DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import sys
import zipfile
from collections.abc import Iterator
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path, PurePosixPath

__all__ = ["BUNDLE_NAME", "build_bundle", "bundle_fingerprint", "bundled_distributions", "main"]

BUNDLE_NAME = "vmcontroller-agent.pyz"
#: The agent's one third-party requirement; the rest is its dependency closure.
ROOT_REQUIREMENT = "twisted"
# A fixed timestamp: the same inputs give the same bytes (and the image recipe hash stays put).
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_SKIPPED_SUFFIXES = (".so", ".pyd", ".pyc", ".pyo", ".c", ".h", ".pyi")
# Test suites are most of Twisted's size and never imported by the agent.
_SKIPPED_DIRS = {"__pycache__", "test", "tests", "testing"}

_MAIN = """\
import sys

if sys.version_info < {minimum!r}:
    sys.exit(
        "vmcontroller-agent needs Python {minimum_text} or newer; this is "
        + sys.version.split()[0]
        + ": install a newer python3 in the guest"
    )
from guest_agent.__main__ import main

sys.exit(main(sys.argv[1:]))
"""


_NAMESPACE_INIT = b'__path__ = __import__("pkgutil").extend_path(__path__, __name__)\n'


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]


def bundled_distributions() -> list[Distribution]:
    """
    Twisted and its dependency closure as installed here, sorted by name. Requirements behind
    an extra are left out; those behind another marker (``python_version < "3.11"``) are
    bundled when installed, for guests older than this host.

    :raises RuntimeError: a requirement without a marker is not installed.
    """
    found: dict[str, Distribution] = {}
    todo = [ROOT_REQUIREMENT]
    while todo:
        requirement = todo.pop()
        name = _requirement_name(requirement)
        key = name.lower().replace("_", "-")
        if key in found or "extra ==" in requirement:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            if ";" in requirement:
                continue
            raise RuntimeError(
                f"cannot bundle the agent: {name} (needed by Twisted) is not installed here; "
                "pip install twisted in this environment"
            ) from None
        found[key] = dist
        todo.extend(dist.requires or [])
    return [found[k] for k in sorted(found)]


#: The agent's own floor (enum.StrEnum, tomllib), whatever Twisted's is.
AGENT_MINIMUM_PYTHON = (3, 11)


def _minimum_python() -> tuple[int, ...]:
    requires = distribution(ROOT_REQUIREMENT).metadata["Requires-Python"] or ">=3.8"
    match = re.search(r">=\s*(\d+)\.(\d+)", requires)
    twisted = (int(match.group(1)), int(match.group(2))) if match else (3, 8)
    return max(twisted, AGENT_MINIMUM_PYTHON)


def _wanted(path: PurePosixPath) -> bool:
    return not (_SKIPPED_DIRS & set(path.parts[:-1])) and path.suffix not in _SKIPPED_SUFFIXES


def _agent_files() -> Iterator[tuple[str, Path]]:
    import guest_agent

    package = Path(guest_agent.__file__).resolve().parent
    for path in sorted(package.rglob("*")):
        relative = PurePosixPath("guest_agent", *path.relative_to(package).parts)
        if path.is_file() and _wanted(relative):
            yield str(relative), path


def _distribution_files(dist: Distribution) -> Iterator[tuple[str, Path]]:
    for file in sorted(dist.files or [], key=str):
        relative = PurePosixPath(str(file))
        if relative.parts[0] in ("..", "") or relative.parts[0].endswith(".data"):
            continue  # scripts and headers installed outside site-packages
        if relative.parts[0].endswith(".dist-info") and relative.name not in ("METADATA", "top_level.txt"):
            continue
        if _wanted(relative):
            yield str(relative), Path(str(file.locate()))


def _members() -> list[tuple[str, Path]]:
    members = dict(_agent_files())
    for dist in bundled_distributions():
        for name, path in _distribution_files(dist):
            members.setdefault(name, path)
    return sorted(members.items())


def _namespace_packages(names: list[str]) -> list[str]:
    # zipimport does not find PEP 420 namespace packages (``zope`` has no __init__.py): give
    # each such directory a pkgutil-style __init__.py.
    modules = [PurePosixPath(n) for n in names if n.endswith(".py")]
    packages = {str(m.parent) for m in modules if m.name == "__init__.py"}
    needed: set[str] = set()
    for package in packages:
        parent = PurePosixPath(package).parent
        while str(parent) != "." and str(parent) not in packages:
            needed.add(str(parent))
            parent = parent.parent
    return sorted(needed)


def bundle_fingerprint() -> str:
    """A hash of everything :func:`build_bundle` would put in the bundle (names and bytes)."""
    h = hashlib.sha256(b"vmcontroller-agent-bundle-v1\0")
    for name, path in _members():
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_bundle(output: Path, *, interpreter: str = "/usr/bin/env python3") -> Path:
    """
    Write the bundle to ``output`` (replaced atomically) and make it executable.

    :param interpreter: the ``#!`` line's interpreter.
    :return: ``output``.
    """
    minimum = _minimum_python()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:

        def add(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, _ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)

        add(
            "__main__.py",
            _MAIN.format(minimum=minimum, minimum_text=".".join(map(str, minimum))).encode(),
        )
        members = _members()
        for name, path in members:
            add(name, path.read_bytes())
        for package in _namespace_packages([name for name, _ in members]):
            add(f"{package}/__init__.py", _NAMESPACE_INIT)
    partial = output.with_name(f".{output.name}.partial")
    partial.write_bytes(b"#!" + interpreter.encode() + b"\n" + buffer.getvalue())
    partial.chmod(0o755)
    partial.replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmcontroller.agent_bundle",
        description="Build the guest agent as one executable file (a zipapp with Twisted inside) "
        "that runs on any guest python3 without pip or network.",
    )
    parser.add_argument(
        "-o", "--output", default=BUNDLE_NAME, help="the file to write (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    output = Path(args.output)
    try:
        build_bundle(output)
    except (OSError, RuntimeError) as e:
        print(f"error: building {output} failed: {e}", file=sys.stderr)
        return 1
    size = output.stat().st_size
    print(
        f"wrote {output} ({size / 1e6:.1f} MB); in the guest, as root: "
        f"python3 {output.name} install  (or into an image tree: install --root DIR)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
