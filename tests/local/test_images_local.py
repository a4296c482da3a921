"""The image build's processes on this host, for real: what they leave behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmcontroller import images

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (CI runs as root)")


def mounts_under(directory: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f]
    return [target for target in targets if target.startswith(f"{directory}/")]


def test_a_build_step_killed_with_its_mounts_up_leaves_none(tmp_path: Path) -> None:
    """What mmdebstrap does in root mode (/proc, /sys, /dev mounted in the tree), killed midway."""
    tree = tmp_path / "rootfs"
    (tree / "proc").mkdir(parents=True)
    script = f"mount -t tmpfs build-leftover {tree}/proc && kill -KILL $$"
    step = subprocess.run(images._with_private_mounts(["sh", "-c", script]), check=False)
    assert step.returncode == -9  # it got as far as mounting, then died without cleaning up
    assert mounts_under(tmp_path) == []
    subprocess.run(["rm", "-rf", "--one-file-system", str(tree)], check=True)
    assert not tree.exists()
