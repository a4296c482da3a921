"""
hypervisors.base, what every driver shares: the event hub and its wait_for_state, the poller
for hypervisors that push nothing, the transition table and the capability check. A Clock
only, no reactor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from hypervisors.base import EventHub, StatePoller, event_for_transition, require_capability
from hypervisors.interface import Capability, VMEvent, VMEventType, VMState
from vmcontroller.errors import CapabilityUnsupported, VMNotFound, VMTimeout

RUNNING = VMEvent("vm1", VMEventType.STARTED, VMState.RUNNING)
PAUSED = VMEvent("vm1", VMEventType.PAUSED, VMState.PAUSED)
OTHER = VMEvent("vm2", VMEventType.STARTED, VMState.RUNNING)


# -- EventHub -------------------------------------------------------------------------------


def test_subscribers_get_their_vms_events_in_order() -> None:
    hub = EventHub()
    one: list[VMEvent] = []
    every: list[VMEvent] = []
    hub.subscribe(one.append, "vm1")
    hub.subscribe(every.append)
    for event in (RUNNING, OTHER, PAUSED):
        hub.publish(event)
    assert one == [RUNNING, PAUSED]
    assert every == [RUNNING, OTHER, PAUSED]


def test_a_failing_subscriber_is_logged_and_the_others_still_get_the_event() -> None:
    hub = EventHub()
    got: list[VMEvent] = []

    def broken(event: VMEvent) -> None:
        raise RuntimeError("subscriber bug")

    hub.subscribe(broken)
    hub.subscribe(got.append)
    with capturedLogs() as logs:
        hub.publish(RUNNING)
    assert got == [RUNNING]
    failures = [e for e in logs if e["log_level"] is LogLevel.critical]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)


def test_cancel_stops_delivery_and_may_be_called_twice() -> None:
    first: list[object] = []
    last: list[object] = []
    hub = EventHub(lambda: first.append(1), lambda: last.append(1))
    got: list[VMEvent] = []
    subscription = hub.subscribe(got.append)
    second = hub.subscribe(lambda e: None)
    assert (first, hub.has_subscribers) == ([1], True)
    subscription.cancel()
    subscription.cancel()
    hub.publish(RUNNING)
    assert got == []
    assert last == []  # one subscriber is left
    second.cancel()
    assert (last, hub.has_subscribers) == ([1], False)


def test_a_subscriber_may_cancel_another_while_an_event_is_delivered() -> None:
    hub = EventHub()
    got: list[VMEvent] = []
    later = hub.subscribe(got.append)
    hub.subscribe(lambda e: later.cancel())
    hub.publish(RUNNING)  # delivered to `later` first, then it is cancelled
    hub.publish(PAUSED)
    assert got == [RUNNING]


def test_close_drops_every_subscriber() -> None:
    last: list[object] = []
    hub = EventHub(on_last_unsubscribed=lambda: last.append(1))
    got: list[VMEvent] = []
    hub.subscribe(got.append)
    hub.close()
    hub.publish(RUNNING)
    assert (got, last, hub.has_subscribers) == ([], [1], False)
    hub.close()
    assert last == [1]


# -- EventHub.wait_for_state ----------------------------------------------------------------


class StateQueries:
    """``current_state`` for wait_for_state: counts the calls, answers when told."""

    def __init__(self) -> None:
        self.calls = 0
        self.pending: list[Deferred[VMState]] = []

    def __call__(self) -> Awaitable[VMState]:
        self.calls += 1
        d: Deferred[VMState] = Deferred()
        self.pending.append(d)
        return d


def wait(
    hub: EventHub,
    clock: Clock,
    state: VMState,
    current: Callable[[], Awaitable[VMState]],
    timeout: float = 10,
) -> Deferred[None]:
    return Deferred.fromCoroutine(hub.wait_for_state(clock, "vm1", state, timeout, current, hint="look"))


def test_wait_fires_at_once_when_the_vm_is_there_already() -> None:
    hub, clock, queries = EventHub(), Clock(), StateQueries()
    waiting = wait(hub, clock, VMState.RUNNING, queries)
    queries.pending[0].callback(VMState.RUNNING)
    assert waiting.called
    assert (queries.calls, hub.has_subscribers, clock.getDelayedCalls()) == (1, False, [])


def test_wait_fires_at_the_event_and_asks_the_hypervisor_once() -> None:
    hub, clock, queries = EventHub(), Clock(), StateQueries()
    waiting = wait(hub, clock, VMState.PAUSED, queries)
    queries.pending[0].callback(VMState.RUNNING)
    clock.advance(5)
    hub.publish(OTHER)
    assert not waiting.called
    hub.publish(PAUSED)
    assert waiting.called
    assert queries.calls == 1
    assert (hub.has_subscribers, clock.getDelayedCalls()) == (False, [])


def test_an_event_during_the_state_query_is_not_missed() -> None:
    """Subscribed before asking: the VM gets there while the answer (still the old state) travels."""
    hub, clock, queries = EventHub(), Clock(), StateQueries()
    waiting = wait(hub, clock, VMState.PAUSED, queries)
    hub.publish(PAUSED)
    queries.pending[0].callback(VMState.RUNNING)
    assert waiting.called


def test_wait_times_out_with_the_last_known_state_and_the_hint() -> None:
    hub, clock, queries = EventHub(), Clock(), StateQueries()
    waiting = wait(hub, clock, VMState.SHUTOFF, queries, timeout=30)
    queries.pending[0].callback(VMState.RUNNING)
    hub.publish(PAUSED)
    clock.advance(29)
    assert not waiting.called
    clock.advance(1)
    failure = waiting_failure(waiting)
    assert failure.check(VMTimeout)
    assert str(failure.value) == "VM 'vm1' did not become shutoff within 30 s (it is paused); look"
    assert not hub.has_subscribers


def test_wait_fails_when_the_vm_is_undefined() -> None:
    hub, clock, queries = EventHub(), Clock(), StateQueries()
    waiting = wait(hub, clock, VMState.RUNNING, queries)
    queries.pending[0].callback(VMState.SHUTOFF)
    hub.publish(VMEvent("vm1", VMEventType.UNDEFINED, VMState.NOSTATE))
    failure = waiting_failure(waiting)
    assert failure.check(VMNotFound)
    assert "undefined while waiting" in str(failure.value)
    assert clock.getDelayedCalls() == []


def test_a_failed_state_query_fails_the_wait_and_cleans_up() -> None:
    hub, clock, queries = EventHub(), Clock(), StateQueries()
    waiting = wait(hub, clock, VMState.RUNNING, queries)
    queries.pending[0].errback(VMNotFound("no VM named 'vm1'"))
    assert waiting_failure(waiting).check(VMNotFound)
    assert (hub.has_subscribers, clock.getDelayedCalls()) == (False, [])


def waiting_failure(d: Deferred[Any]) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert len(failures) == 1
    return failures[0]


# -- event_for_transition -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "event"),
    [
        (None, VMState.SHUTOFF, VMEventType.DEFINED),
        (VMState.SHUTOFF, None, VMEventType.UNDEFINED),
        (VMState.SHUTOFF, VMState.RUNNING, VMEventType.STARTED),
        (VMState.PAUSED, VMState.RUNNING, VMEventType.RESUMED),
        (VMState.SAVED, VMState.RUNNING, VMEventType.RESTORED),
        (VMState.RUNNING, VMState.PAUSED, VMEventType.PAUSED),
        (VMState.RUNNING, VMState.PMSUSPENDED, VMEventType.PAUSED),
        (VMState.RUNNING, VMState.SHUTOFF, VMEventType.SHUTOFF),
        (VMState.RUNNING, VMState.CRASHED, VMEventType.CRASHED),
        (VMState.RUNNING, VMState.SAVED, VMEventType.SAVED),
        (VMState.RUNNING, VMState.BLOCKED, None),
        (VMState.RUNNING, VMState.SHUTDOWN, None),
        (VMState.RUNNING, VMState.RUNNING, None),
        (None, None, None),
    ],
)
def test_event_for_transition(
    before: VMState | None, after: VMState | None, event: VMEventType | None
) -> None:
    assert event_for_transition(before, after) is event


def test_every_state_has_a_transition_entry() -> None:
    for state in VMState:
        event_for_transition(VMState.NOSTATE if state is not VMState.NOSTATE else VMState.RUNNING, state)


# -- StatePoller ----------------------------------------------------------------------------


class Hypervisor:
    """The ``states`` callable of a StatePoller: what a hypervisor reports, and how often asked."""

    def __init__(self, states: dict[str, VMState]) -> None:
        self.states = states
        self.calls = 0
        self.fail = False

    def __call__(self) -> Deferred[dict[str, VMState]]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("hypervisor hiccup")
        return succeed(dict(self.states))


async def _states(hypervisor: Hypervisor) -> dict[str, VMState]:
    return await hypervisor()


def test_the_poller_asks_only_while_someone_listens() -> None:
    clock = Clock()
    hypervisor = Hypervisor({"vm1": VMState.SHUTOFF})
    poller = StatePoller(clock, lambda: _states(hypervisor), interval=2.0)
    clock.advance(10)
    assert hypervisor.calls == 0
    subscription = poller.hub.subscribe(lambda e: None)
    assert hypervisor.calls == 1
    clock.advance(2)
    assert hypervisor.calls == 2
    subscription.cancel()
    clock.advance(10)
    assert hypervisor.calls == 2
    assert clock.getDelayedCalls() == []


def test_the_poller_restarted_while_a_poll_is_out_polls_once_per_interval() -> None:
    """Unsubscribed and subscribed again before the hypervisor answered: one loop, not two."""
    clock = Clock()
    answers: list[Deferred[dict[str, VMState]]] = []

    def states() -> Deferred[dict[str, VMState]]:
        answers.append(Deferred())
        return answers[-1]

    poller = StatePoller(clock, states, interval=1.0)
    poller.hub.subscribe(lambda e: None).cancel()
    subscription = poller.hub.subscribe(lambda e: None)
    for answer in answers:
        answer.callback({})
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    answers[-1].callback({})
    with capturedLogs() as logs:
        subscription.cancel()
        clock.advance(10)
    assert clock.getDelayedCalls() == [] and len(answers) == 3
    assert not any(e["log_level"] is LogLevel.critical for e in logs)


def test_the_poller_publishes_each_change_once() -> None:
    clock = Clock()
    hypervisor = Hypervisor({"vm1": VMState.SHUTOFF})
    poller = StatePoller(clock, lambda: _states(hypervisor), interval=1.0)
    got: list[VMEvent] = []
    poller.hub.subscribe(got.append)
    hypervisor.states = {"vm1": VMState.RUNNING, "vm2": VMState.SHUTOFF}
    clock.advance(1)
    clock.advance(1)  # nothing changed
    hypervisor.states = {"vm2": VMState.SHUTOFF}
    clock.advance(1)
    assert got == [
        VMEvent("vm1", VMEventType.STARTED, VMState.RUNNING, "polled"),
        VMEvent("vm2", VMEventType.DEFINED, VMState.SHUTOFF, "polled"),
        VMEvent("vm1", VMEventType.UNDEFINED, VMState.NOSTATE, "polled"),
    ]


def test_a_failed_poll_is_logged_and_polling_goes_on() -> None:
    clock = Clock()
    hypervisor = Hypervisor({"vm1": VMState.SHUTOFF})
    poller = StatePoller(clock, lambda: _states(hypervisor), interval=1.0)
    got: list[VMEvent] = []
    poller.hub.subscribe(got.append)
    hypervisor.fail = True
    with capturedLogs() as logs:
        clock.advance(1)
    assert any(e["log_level"] is LogLevel.critical and "trying again" in e["log_format"] for e in logs)
    hypervisor.fail = False
    hypervisor.states = {"vm1": VMState.RUNNING}
    clock.advance(1)
    assert [e.type for e in got] == [VMEventType.STARTED]


def test_a_new_subscriber_after_a_pause_does_not_get_stale_changes() -> None:
    clock = Clock()
    hypervisor = Hypervisor({"vm1": VMState.SHUTOFF})
    poller = StatePoller(clock, lambda: _states(hypervisor), interval=1.0)
    poller.hub.subscribe(lambda e: None).cancel()
    hypervisor.states = {"vm1": VMState.RUNNING}
    got: list[VMEvent] = []
    poller.hub.subscribe(got.append)  # polls now: the baseline is RUNNING
    clock.advance(1)
    assert got == []


# -- require_capability ---------------------------------------------------------------------


class _Driver:
    name = "fake"
    capabilities = frozenset({Capability.SNAPSHOTS})


def test_require_capability() -> None:
    require_capability(_Driver(), Capability.SNAPSHOTS, "unused")
    with pytest.raises(CapabilityUnsupported) as raised:
        require_capability(_Driver(), Capability.SAVE_STATE, "Player has no suspend")
    assert str(raised.value) == "the fake driver cannot do save-state: Player has no suspend"
    assert (raised.value.driver, raised.value.capability) == ("fake", "save-state")


def test_per_vm_queue_runs_one_job_per_vm_in_call_order() -> None:
    from twisted.internet.defer import Deferred

    from hypervisors.base import PerVMQueue

    queue = PerVMQueue()
    gates: dict[str, Deferred[None]] = {}
    started: list[str] = []

    def job(label: str) -> Any:
        async def body() -> str:
            started.append(label)
            gates[label] = Deferred()
            await gates[label]
            return label

        return body

    results = [
        Deferred.fromCoroutine(queue.run(vm, job(label)))
        for vm, label in [("a", "a1"), ("a", "a2"), ("b", "b1")]
    ]
    assert started == ["a1", "b1"]  # a2 waits for a1; b runs beside a
    gates["a1"].callback(None)
    assert started == ["a1", "b1", "a2"]
    gates["a2"].callback(None)
    gates["b1"].callback(None)
    assert [r.result for r in results] == ["a1", "a2", "b1"]
    assert queue._locks == {}  # nothing kept for VMs with no work in hand


def test_a_wait_through_the_poller_sees_a_change_its_first_poll_took_as_the_baseline() -> None:
    """
    The VM stops between the wait's state query (running) and the poller's first poll
    (shut off, which only sets what later polls compare with, so no event): the wait asks
    again at the next interval instead of timing out (vmrun calls may run in any order).
    """
    clock = Clock()
    first_poll: Deferred[dict[str, VMState]] = Deferred()
    polls = iter([first_poll])

    def states() -> Deferred[dict[str, VMState]]:
        return next(polls, succeed({"vm1": VMState.SHUTOFF}))

    answers = iter([VMState.RUNNING])

    async def current_state() -> VMState:
        return next(answers, VMState.SHUTOFF)

    poller = StatePoller(clock, states, interval=1.0)
    reached = Deferred.fromCoroutine(poller.wait_for_state("vm1", VMState.SHUTOFF, 30, current_state))
    first_poll.callback({"vm1": VMState.SHUTOFF})
    assert not reached.called
    clock.advance(1)
    assert reached.called and reached.result is None
    assert clock.getDelayedCalls() == []
