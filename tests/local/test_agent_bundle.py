"""
The single-file agent: built from this environment, installed into a root as a guest would
install it, and run by the system's python3 with no site-packages (so no Twisted but its own).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint

from guest_agent.install import BUNDLE_DIR, BUNDLE_FILE
from guest_agent.protocol.tls import Credentials
from vmcontroller.agent_bundle import build_bundle
from vmcontroller.client import connect
from vmcontroller.credentials import mint

SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="needs the system's python3")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle") / BUNDLE_FILE)


def test_the_bundle_runs_without_any_installed_twisted(bundle: Path) -> None:
    # -S: no site-packages at all, so every import comes from the bundle or the stdlib.
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-S", "-c", "import twisted"], capture_output=True, text=True, check=False
    )
    assert probe.returncode != 0, "the system python has Twisted: this test would prove nothing"
    shown = subprocess.run(
        [SYSTEM_PYTHON, "-S", str(bundle), "run", "--help"], capture_output=True, text=True, check=False
    )
    assert shown.returncode == 0, shown.stderr
    assert "--virtio-port" in shown.stdout


def test_the_bundle_is_reproducible(bundle: Path, tmp_path: Path) -> None:
    again = build_bundle(tmp_path / "again.pyz")
    assert again.read_bytes() == bundle.read_bytes()
    assert os.stat(again).st_mode & 0o777 == 0o755


def test_install_from_the_bundle_puts_it_in_place(bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/init.d").mkdir(parents=True)  # a SysV system: no systemd, no OpenRC
    done = subprocess.run(
        [SYSTEM_PYTHON, "-S", str(bundle), "install", "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    installed = root / BUNDLE_DIR / BUNDLE_FILE
    assert installed.read_bytes() == bundle.read_bytes()
    script = (root / "etc/init.d/vmcontroller-agent").read_text()
    assert f"{SYSTEM_PYTHON} /{BUNDLE_DIR}/{BUNDLE_FILE} run --virtio-port org.vmcontroller.agent.0" in script
    assert os.readlink(root / "etc/rc2.d/S20vmcontroller-agent") == "../init.d/vmcontroller-agent"
    # Nothing of the package form: the bundle is the whole agent.
    assert not list(root.glob("usr/local/lib/python3*"))


@pytest.fixture
def credentials(tmp_path: Path) -> tuple[Credentials, Path]:
    """The host's end, and a private file with the agent's."""
    host, agent = mint()
    path = tmp_path / "agent-credentials.json"
    path.touch(mode=0o600)
    path.write_bytes(agent.to_json())
    return host, path


@pytest.fixture
def bundled_agent(bundle: Path, tmp_path: Path, credentials: tuple[Credentials, Path]) -> Iterator[Path]:
    socket = tmp_path / "agent.sock"
    process = subprocess.Popen(
        [SYSTEM_PYTHON, "-S", str(bundle), "run", "--credentials", str(credentials[1]),
         "--listen", f"unix:{socket}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield socket
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
        print(err.decode(errors="replace"), file=sys.stderr)


@pytest_twisted.ensureDeferred
async def test_the_bundled_agent_serves_every_kind_of_operation(
    bundled_agent: Path, tmp_path: Path, credentials: tuple[Credentials, Path]
) -> None:
    endpoint = UNIXClientEndpoint(reactor, str(bundled_agent))
    client = await connect(reactor, endpoint, credentials=credentials[0], timeout=60)
    try:
        assert (await client.ping())["version"]
        result = await client.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[0])"], check=True)
        assert result.stdout == b"3\n"
        data = os.urandom(300_000)
        source, inside, back = tmp_path / "in", tmp_path / "inside", tmp_path / "back"
        source.write_bytes(data)
        await client.push(str(source), str(inside))
        assert hashlib.sha256(inside.read_bytes()).digest() == hashlib.sha256(data).digest()
        await client.pull(str(inside), str(back))
        assert back.read_bytes() == data
    finally:
        client.close()
