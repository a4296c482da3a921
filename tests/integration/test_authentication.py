"""
Mutual authentication on a real guest, over its virtio-serial channel: every way in without
this VM's credentials is refused with a clear error and the agent then serves its real host;
and the credentials show up nowhere they could leak from (the image, the domain XML and its
kernel command line, the host's and the agent's logs, ``ps`` on either side).

The same four attacks over TCP are in test_tcp_transport.py.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import implementer

from guest_agent.protocol.errors import AuthenticationFailed, TamperingDetected
from guest_agent.protocol.tls import Credentials
from tests.attacks import (
    anonymous_authenticator,
    another_vms_credentials,
    connect_with,
    record_a_real_handshake,
    replay,
    serves_its_host,
    tamper_next_write,
)
from tests.integration.conftest import BootedVM
from vmcontroller.client import connect
from vmcontroller.machine import connect_vm_agent

pytestmark = pytest.mark.integration
reactor: Any = _reactor


async def channel(booted_vm: BootedVM) -> tuple[UNIXClientEndpoint, Credentials]:
    credentials = await booted_vm.driver.agent_credentials(booted_vm.name)
    path = await booted_vm.driver.agent_socket_path(booted_vm.name)
    return UNIXClientEndpoint(reactor, path), credentials


@pytest_twisted.ensureDeferred
async def test_no_credentials_is_refused(booted_vm: BootedVM) -> None:
    endpoint, credentials = await channel(booted_vm)
    await serves_its_host(reactor, endpoint, credentials, timeout=300)  # the guest is up
    with pytest.raises(AuthenticationFailed, match="certificate"):
        await connect_with(reactor, endpoint, anonymous_authenticator(credentials.peer_certificate))
    await serves_its_host(reactor, endpoint, credentials)


@pytest_twisted.ensureDeferred
async def test_another_vms_credentials_are_refused(booted_vm: BootedVM) -> None:
    endpoint, credentials = await channel(booted_vm)
    with pytest.raises(AuthenticationFailed, match="does not accept this end's certificate"):
        await connect(reactor, endpoint, credentials=another_vms_credentials(credentials), timeout=60)
    await serves_its_host(reactor, endpoint, credentials)


@pytest_twisted.ensureDeferred
async def test_replayed_handshake_is_refused(booted_vm: BootedVM) -> None:
    endpoint, credentials = await channel(booted_vm)
    recorded = await record_a_real_handshake(reactor, endpoint, credentials)
    errors = await replay(reactor, endpoint, recorded)
    refusals = [e for e in errors if isinstance(e, AuthenticationFailed)]
    assert refusals and "replayed or altered" in str(refusals[0]), errors
    await serves_its_host(reactor, endpoint, credentials)


@pytest_twisted.ensureDeferred
async def test_tampered_frame_mid_session_is_refused(booted_vm: BootedVM) -> None:
    endpoint, credentials = await channel(booted_vm)
    client = await connect(reactor, endpoint, credentials=credentials, timeout=60)
    try:
        assert (await client.ping())["version"]
        tamper_next_write(client)
        with pytest.raises(TamperingDetected, match="integrity"):
            await client.ping()
        # The same client resynchronises and carries on with a new authenticated session.
        assert (await client.ping())["version"]
    finally:
        await client.close()
    await serves_its_host(reactor, endpoint, credentials)


# -- where the credentials must never appear ----------------------------------------------------


def needles(credentials: Credentials) -> list[bytes]:
    """The key as it could leak: raw, in base64 (as in the credentials JSON), the whole JSON."""
    return [credentials.private_key, base64.b64encode(credentials.private_key), credentials.to_json()]


def assert_absent(haystack: bytes, secrets: list[bytes], where: str) -> None:
    for secret in secrets:
        assert secret not in haystack, f"a private key appears in {where}"


def file_contains(path: Path, secrets: list[bytes]) -> bool:
    overlap = max(len(s) for s in secrets)
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(16 << 20):
            window = tail + chunk
            if any(s in window for s in secrets):
                return True
            tail = window[-overlap:]
    return False


@pytest.fixture
def host_log() -> Iterator[list[str]]:
    lines: list[str] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")
        if event.get("log_failure") is not None:
            lines.append(event["log_failure"].getTraceback())

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_credentials_never_leak(booted_vm: BootedVM, host_log: list[str]) -> None:
    driver, name, image = booted_vm
    host_end = await driver.agent_credentials(name)
    agent_end = driver.credentials.agent_credentials(name)
    secrets = needles(host_end) + needles(agent_end)
    client = await connect_vm_agent(reactor, driver, name, timeout=300)
    try:
        # In the guest: its journal (the agent's and everything else's), ps, /proc/cmdline.
        for argv in (
            ["journalctl", "--no-pager", "-o", "verbose"],
            ["ps", "-e", "-ww", "-o", "args"],
            ["cat", "/proc/cmdline"],
        ):
            out = (await client.run(argv, check=True)).stdout
            assert_absent(out, secrets, f"the guest's `{' '.join(argv)}`")
        # The agent logged where its credentials came from and that each session is authenticated.
        journal_argv = ["journalctl", "--no-pager", "-o", "cat", "-u", "vmcontroller-agent"]
        journal = (await client.run(journal_argv)).stdout
        assert b"Credentials from QEMU fw_cfg" in journal
        assert b"Host connected, protocol version 2, authenticated" in journal
    finally:
        await client.close()
    # The host's log of all that.
    assert_absent("\n".join(host_log).encode(), secrets, "the host's log")
    # The domain XML names the file, not its content; the kernel command line has nothing.
    def domain_xml() -> str:
        conn = libvirt.open(driver.uri)
        try:
            return str(conn.lookupByName(name).XMLDesc(0))
        finally:
            conn.close()

    xml = await threads.deferToThread(domain_xml)
    assert "opt/org.vmcontroller/credentials" in xml
    assert_absent(xml.encode(), secrets, "the domain XML")
    # ps on the host: QEMU's command line names the fw_cfg file only.
    ps = subprocess.run(["ps", "-e", "-ww", "-o", "args"], capture_output=True, check=True).stdout
    assert b"opt/org.vmcontroller/credentials" in ps
    assert_absent(ps, secrets, "the host's ps output")
    # The shared image never. The VM's own disk holds the guest's RAM in a snapshot with
    # memory (earlier tests take some, and qcow2 does not zero a deleted one's clusters), so
    # only root, and QEMU's user while it runs, may read it.
    assert not await threads.deferToThread(file_contains, Path(image.root_disk), secrets)
    overlay = driver.state_dir / name / "disk.qcow2"
    assert overlay.stat().st_mode & 0o077 == 0, oct(overlay.stat().st_mode)
