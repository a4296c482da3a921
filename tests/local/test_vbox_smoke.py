import pytest, pytest_twisted
from twisted.internet import reactor
from hypervisors.interface import VMSpec, VMState
from tests.standins import FACTORIES

@pytest.mark.parametrize("config", sorted(FACTORIES))
@pytest_twisted.ensureDeferred
async def test_smoke(config, tmp_path):
    s = FACTORIES[config](reactor, tmp_path)
    try:
        await body(s, tmp_path)
    finally:
        await s.driver.stopService()

async def body(s, tmp_path):
    d = s.driver
    base = tmp_path / "base.img"; base.write_bytes(b"BASE")
    await d.define(VMSpec(name="v1", disk=str(base), serial_ports=("agent",), nat_network=True, cpu_cap_percent=50))
    print(await d.list_vms())
    await d.start("v1")
    print(await d.state("v1"))
    s.current_disk_file("v1").write_bytes(b"one")
    print(await d.snapshot_create("v1", "s1"))
    s.current_disk_file("v1").write_bytes(b"two")
    await d.snapshot_revert("v1", "s1")
    print(s.current_disk_file("v1").read_bytes(), await d.state("v1"))
    print(await d.snapshot_list("v1"))
    print(await d.agent_endpoint("v1"), await d.agent_endpoint("v1", "tcp"))
    await d.save_state("v1"); print(await d.state("v1"))
    await d.start("v1"); await d.pause("v1"); await d.resume("v1"); await d.reset("v1")
    await d.shutdown("v1", timeout=5)
    await d.snapshot_delete("v1", "s1")
    await d.undefine("v1")
    print(await d.list_vms(), list(tmp_path.rglob("*")))
    await d.stopService()
