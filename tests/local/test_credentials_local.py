"""
The agent finds its credentials out of band, and the host keeps them private.

The agent side runs the real loader against a fake fw_cfg file and against stand-ins of
VirtualBox's VBoxControl and open-vm-tools' vmware-rpctool (tests/standins/, which cite the
behaviour they reproduce): the value is read, erased where guest processes could read it,
and kept in a root-only copy for a restarted agent.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from guest_agent.credentials import VBOX_PROPERTY, VMWARE_VARIABLE, load_credentials
from guest_agent.protocol.errors import CredentialsUnavailable
from vmcontroller.credentials import AGENT_FILE, HOST_FILE, CredentialStore, mint

reactor: Any = _reactor
STANDINS = Path(__file__).resolve().parent.parent / "standins"


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    vbox = tmp_path / "vbox.json"
    vmware = tmp_path / "vmware.json"
    vbox.write_text("{}")
    vmware.write_text("{}")
    monkeypatch.setenv("VBOX_STANDIN_STORE", str(vbox))
    monkeypatch.setenv("VMWARE_STANDIN_STORE", str(vmware))
    return {
        "fw_cfg": str(tmp_path / "fw_cfg" / "raw"),
        "vboxcontrol": str(STANDINS / "VBoxControl"),
        "rpctool": str(STANDINS / "vmware-rpctool"),
        "run_copy": str(tmp_path / "run" / "vmcontroller-agent" / "credentials"),
        "vbox": vbox,
        "vmware": vmware,
    }


def load(places: dict[str, Any]) -> Any:
    keys = ("fw_cfg", "vboxcontrol", "rpctool", "run_copy")
    return load_credentials(reactor, **{k: places[k] for k in keys})


@pytest_twisted.ensureDeferred
async def test_fw_cfg_is_read_first(places: dict[str, Any]) -> None:
    _, agent = mint()
    Path(places["fw_cfg"]).parent.mkdir()
    Path(places["fw_cfg"]).write_bytes(agent.to_json())
    assert await load(places) == agent
    assert not Path(places["run_copy"]).exists()  # nothing to erase, nothing to copy


@pytest_twisted.ensureDeferred
async def test_virtualbox_property_is_read_erased_and_kept_for_a_restart(places: dict[str, Any]) -> None:
    _, agent = mint()
    places["vbox"].write_text(json.dumps({VBOX_PROPERTY: {"value": agent.to_json().decode(), "flags": ""}}))
    assert await load(places) == agent
    assert json.loads(places["vbox"].read_text()) == {}  # erased: no guest process reads it now
    copy = Path(places["run_copy"])
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600 and stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
    # The agent restarts in the same boot: the property is gone, the copy serves.
    assert await load(places) == agent
    # The secret never was an argument of the tool (ps shows arguments to every user).
    calls = Path(str(places["vbox"]) + ".log").read_text()
    assert agent.to_json().decode() not in calls and base64.b64encode(agent.private_key).decode() not in calls


@pytest_twisted.ensureDeferred
async def test_read_only_virtualbox_property_is_refused(places: dict[str, Any]) -> None:
    _, agent = mint()
    value = {"value": agent.to_json().decode(), "flags": "RDONLYGUEST"}
    places["vbox"].write_text(json.dumps({VBOX_PROPERTY: value}))
    with pytest.raises(CredentialsUnavailable, match="without the RDONLYGUEST flag"):
        await load(places)
    assert not Path(places["run_copy"]).exists()


@pytest_twisted.ensureDeferred
async def test_vmware_guestinfo_in_base64_is_read_and_erased(places: dict[str, Any]) -> None:
    _, agent = mint()
    places["vmware"].write_text(json.dumps({VMWARE_VARIABLE: base64.b64encode(agent.to_json()).decode()}))
    assert await load(places) == agent
    assert json.loads(places["vmware"].read_text()) == {VMWARE_VARIABLE: ""}
    assert await load(places) == agent  # from the copy


@pytest_twisted.ensureDeferred
async def test_no_credentials_anywhere_says_where_it_looked(places: dict[str, Any]) -> None:
    with pytest.raises(CredentialsUnavailable) as raised:
        await load(places)
    message = str(raised.value)
    for where in ("fw_cfg", VBOX_PROPERTY, VMWARE_VARIABLE, "--development"):
        assert where in message


@pytest_twisted.ensureDeferred
async def test_damaged_credentials_are_refused_without_quoting_them(places: dict[str, Any]) -> None:
    Path(places["fw_cfg"]).parent.mkdir()
    Path(places["fw_cfg"]).write_bytes(b'{"format": 1, "key": "c2VjcmV0"}')
    with pytest.raises(CredentialsUnavailable, match="damaged") as raised:
        await load(places)
    assert "c2VjcmV0" not in str(raised.value)


def test_store_is_private_and_removed_with_the_vm(tmp_path: Path) -> None:
    os.umask(0o022)
    store = CredentialStore(tmp_path / "credentials")
    store.create("vm-1")
    store.create("vm-2")
    assert stat.S_IMODE((tmp_path / "credentials").stat().st_mode) == 0o700
    for vm in ("vm-1", "vm-2"):
        assert stat.S_IMODE((tmp_path / "credentials" / vm).stat().st_mode) == 0o700
        for name in (HOST_FILE, AGENT_FILE):
            assert stat.S_IMODE((tmp_path / "credentials" / vm / name).stat().st_mode) == 0o600
    host, agent = store.host_credentials("vm-1"), store.agent_credentials("vm-1")
    assert host.peer_certificate == agent.certificate and agent.peer_certificate == host.certificate
    assert store.host_credentials("vm-2").certificate != host.certificate  # per VM
    store.rotate("vm-1")
    assert store.host_credentials("vm-1").certificate != host.certificate
    store.remove("vm-1")
    assert not (tmp_path / "credentials" / "vm-1").exists() and store.exists("vm-2")
    with pytest.raises(CredentialsUnavailable, match="has no credentials"):
        store.host_credentials("vm-1")
    with pytest.raises(ValueError):
        store.create("../escape")


@pytest_twisted.ensureDeferred
async def test_agent_without_credentials_refuses_to_serve_and_says_why(tmp_path: Path) -> None:
    """The real agent process, on this host where no hypervisor provisioned anything."""
    from twisted.internet.utils import getProcessOutputAndValue

    from guest_agent.credentials import FW_CFG_PATH, RUN_COPY
    from guest_agent.service import EXIT_NO_CREDENTIALS

    if os.path.exists(FW_CFG_PATH) or os.path.exists(RUN_COPY):
        pytest.skip("this machine has vmcontroller credentials provisioned")
    socket = tmp_path / "agent.sock"
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no VBoxControl or vmware-rpctool stand-ins
    _out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "guest_agent", "run", "--listen", f"unix:{socket}"], env=env, reactor=reactor
    )
    assert code == EXIT_NO_CREDENTIALS
    log = err.decode()
    assert "Refusing to serve: no credentials" in log and "--development" in log
    assert not socket.exists()  # it never listened


def test_a_credentials_file_must_be_private(tmp_path: Path) -> None:
    from guest_agent.credentials import read_credentials_file

    _, agent = mint()
    path = tmp_path / "credentials.json"
    path.write_bytes(agent.to_json())
    path.chmod(0o644)
    with pytest.raises(CredentialsUnavailable, match="chmod 600"):
        read_credentials_file(str(path))
    path.chmod(0o600)
    assert read_credentials_file(str(path)) == agent
    with pytest.raises(CredentialsUnavailable, match="cannot open"):
        read_credentials_file(str(tmp_path / "missing"))
