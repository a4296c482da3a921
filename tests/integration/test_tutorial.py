"""The tutorial's program (docs/tutorial.md), run exactly as written, against a real guest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", TUTORIAL.read_text(), flags=re.S)


def test_the_tutorials_commands_are_the_projects(tmp_path: Path) -> None:
    # The shell steps name this checkout's scripts and modules: each must exist as written.
    commands = [line for block in code_blocks("sh") for line in block.splitlines() if line.strip()]
    assert commands == [
        "bash scripts/setup-host.sh",
        ".venv/bin/python -m vmcontroller.images build",
        ".venv/bin/python tutorial.py",
    ]
    root = TUTORIAL.parents[1]
    assert (root / "scripts/setup-host.sh").is_file()
    built = subprocess.run(
        [sys.executable, "-m", "vmcontroller.images", "build"], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr


def test_the_tutorials_program_runs_as_written(tmp_path: Path) -> None:
    (program,) = code_blocks("python")
    (tmp_path / "tutorial.py").write_text(program)
    ran = subprocess.run(
        [sys.executable, "tutorial.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "guest kernel: Linux" in ran.stdout
    assert "copied in and out, same bytes: True" in ran.stdout
    assert "snapshot: after-copy" in ran.stdout
    assert "state: shutoff" in ran.stdout
