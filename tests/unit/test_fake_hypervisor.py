"""
What :class:`vmcontroller.testing.FakeHypervisor` offers beyond the interface (the conformance
suite checks the interface): playing the guest and the hypervisor, its memory model, its clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hypervisors.interface import VMEvent, VMEventType, VMSpec, VMState
from vmcontroller.errors import VMStateError, VMTimeout
from vmcontroller.testing import FakeHypervisor


class FakeHypervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeHypervisor(self.clock)
        self.fake.startService()
        self.events: list[VMEvent] = []
        self.fake.subscribe(self.events.append)
        self.successResultOf(self.fake.define(VMSpec(name="vm", disk="/base.qcow2")))
        self.successResultOf(self.fake.start("vm"))

    def state(self) -> Any:
        return self.successResultOf(self.fake.state("vm"))

    def test_crash(self) -> None:
        self.fake.vm("vm").memory["job"] = b"running"
        self.fake.crash("vm")
        self.assertEqual(
            self.events[-1], VMEvent("vm", VMEventType.CRASHED, VMState.CRASHED, "emulator died")
        )
        self.assertEqual(self.fake.vm("vm").memory, {})
        self.assertRaises(VMStateError, self.fake.crash, "vm")

    def test_guest_power_off_and_reboot(self) -> None:
        self.fake.vm("vm").memory["job"] = b"running"
        self.fake.guest_reboot("vm")
        self.assertEqual(self.events[-1].type, VMEventType.GUEST_REBOOT)
        self.assertIs(self.state(), VMState.RUNNING)
        self.assertEqual(self.fake.vm("vm").memory, {})
        self.fake.guest_power_off("vm")
        self.assertEqual(self.events[-1], VMEvent("vm", VMEventType.GUEST_SHUTDOWN, VMState.SHUTOFF))

    def test_a_guest_that_ignores_the_power_button(self) -> None:
        self.fake.vm("vm").ignores_power_button = True
        d = self.fake.shutdown("vm", timeout=30)
        self.assertNoResult(d)
        self.clock.advance(30)
        self.assertIn("did not become shutoff within 30 s", str(self.failureResultOf(d, VMTimeout).value))
        self.assertIs(self.state(), VMState.RUNNING)

    def test_memory_survives_a_save_not_a_power_off(self) -> None:
        self.fake.vm("vm").memory["job"] = b"step 7"
        self.successResultOf(self.fake.save_state("vm"))
        self.assertEqual(self.fake.vm("vm").memory, {})
        self.successResultOf(self.fake.start("vm"))
        self.assertEqual(self.fake.vm("vm").memory, {"job": b"step 7"})
        self.successResultOf(self.fake.power_off("vm"))
        self.successResultOf(self.fake.start("vm"))
        self.assertEqual(self.fake.vm("vm").memory, {})

    def test_an_online_snapshot_keeps_memory(self) -> None:
        self.fake.vm("vm").memory["job"] = b"step 1"
        self.successResultOf(self.fake.snapshot_create("vm", "s"))
        self.fake.vm("vm").memory["job"] = b"step 2"
        self.successResultOf(self.fake.power_off("vm"))
        self.successResultOf(self.fake.snapshot_revert("vm", "s"))
        self.assertIs(self.state(), VMState.RUNNING)
        self.assertEqual(self.events[-1].type, VMEventType.RESTORED)
        self.assertEqual(self.fake.vm("vm").memory, {"job": b"step 1"})

    def test_latency(self) -> None:
        slow = FakeHypervisor(self.clock, latency=2.0)
        d = slow.define(VMSpec(name="vm", disk="/base.qcow2"))
        self.assertNoResult(d)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d), "vm")
        # State changes of one VM run in call order, one at a time.
        started, paused = slow.start("vm"), slow.pause("vm")
        self.clock.advance(2)
        self.successResultOf(started)
        self.assertNoResult(paused)
        self.clock.advance(2)
        self.successResultOf(paused)
        self.assertIs(slow.vm("vm").state, VMState.PAUSED)
