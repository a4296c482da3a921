"""
Building blocks every driver shares, third-party ones included: the event fan-out behind
:meth:`~hypervisors.interface.IHypervisorDriver.subscribe` and ``wait_for_state``, a poller for
hypervisors that push nothing, and the capability check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from hypervisors.interface import Capability, ISubscription, VMEvent, VMEventType, VMState
from vmcontroller.errors import CapabilityUnsupported, VMNotFound, VMTimeout

__all__ = ["EventHub", "PerVMQueue", "StatePoller", "event_for_transition", "require_capability"]

T = TypeVar("T")

EventCallback = Callable[[VMEvent], object]


def require_capability(driver: Any, capability: Capability, reason: str) -> None:
    """
    Raise :class:`~vmcontroller.errors.CapabilityUnsupported` unless ``driver`` declares
    ``capability``.

    :param reason: why this driver (or product) lacks it, and what to do instead.
    """
    if capability not in driver.capabilities:
        raise CapabilityUnsupported(driver.name, capability.value, reason)


class PerVMQueue:
    """
    Runs one job per VM at a time, in call order (the interface promises that state changes
    of one VM do); jobs on different VMs run side by side. A VM's lock is dropped once its
    queue is empty, so the table holds only VMs with work in hand.
    """

    def __init__(self) -> None:
        self._locks: dict[str, DeferredLock] = {}

    async def run(self, vm: str, body: Callable[[], Coroutine[Any, Any, T]]) -> T:
        lock = self._locks.get(vm)
        if lock is None:
            lock = self._locks[vm] = DeferredLock()
        await lock.acquire()
        try:
            return await body()
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(vm, None)


@implementer(ISubscription)
class _Subscription:
    def __init__(self, hub: EventHub, callback: EventCallback, vm: str | None) -> None:
        self._hub = hub
        self.callback = callback
        self.vm = vm

    def cancel(self) -> None:
        self._hub._remove(self)


class EventHub:
    """
    Fans :class:`~hypervisors.interface.VMEvent` out to subscribers. Call :meth:`publish` on
    the reactor thread only.

    :param on_first_subscriber: called when the first subscriber arrives (a polling driver
        starts polling there); :param on_last_unsubscribed: when the last one leaves.
    """

    log = Logger()

    def __init__(
        self,
        on_first_subscriber: Callable[[], object] | None = None,
        on_last_unsubscribed: Callable[[], object] | None = None,
    ) -> None:
        self._subscriptions: list[_Subscription] = []
        self._on_first = on_first_subscriber
        self._on_last = on_last_unsubscribed

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscriptions)

    def subscribe(self, callback: EventCallback, name: str | None = None) -> ISubscription:
        subscription = _Subscription(self, callback, name)
        self._subscriptions.append(subscription)
        if len(self._subscriptions) == 1 and self._on_first is not None:
            self._on_first()
        return subscription

    def _remove(self, subscription: _Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
            if not self._subscriptions and self._on_last is not None:
                self._on_last()

    def publish(self, event: VMEvent) -> None:
        # A copy: a callback may cancel its own or another subscription.
        for subscription in list(self._subscriptions):
            if subscription.vm is not None and subscription.vm != event.vm:
                continue
            try:
                subscription.callback(event)
            except Exception:
                self.log.failure(
                    "VM event subscriber {callback!r} failed on {event}",
                    callback=subscription.callback,
                    event=event,
                )

    def close(self) -> None:
        """Drop every subscriber (the driver stops)."""
        had = bool(self._subscriptions)
        self._subscriptions.clear()
        if had and self._on_last is not None:
            self._on_last()

    async def wait_for_state(
        self,
        clock: IReactorTime,
        name: str,
        state: VMState,
        timeout: float,
        current_state: Callable[[], Awaitable[VMState]],
        hint: str = "",
        recheck: float | None = None,
    ) -> None:
        """
        Fire once VM ``name`` is in ``state``: subscribe first, so that no event between the
        check and the wait is missed, then ask ``current_state`` once, then wait for the event
        that brings the VM there.

        :param recheck: also ask ``current_state`` again every ``recheck`` seconds: for a
            :class:`StatePoller`, whose first poll only sets what later polls compare with, so
            that a change between the check and that poll is never published.

        :raises VMTimeout: not there within ``timeout`` seconds; ``hint`` says what to look at.
        :raises VMNotFound: the VM was undefined while waiting.
        """
        reached: Deferred[None] = Deferred()
        last: list[VMState] = []

        def on_event(event: VMEvent) -> None:
            last[:] = [event.state]
            if reached.called:
                return
            if event.state is state:
                reached.callback(None)
            elif event.type is VMEventType.UNDEFINED:
                reached.errback(
                    VMNotFound(f"VM {name!r} was undefined while waiting for it to become {state.value}")
                )

        def on_timeout() -> None:
            if not reached.called:
                now = last[0].value if last else "unknown"
                reached.errback(
                    VMTimeout(
                        f"VM {name!r} did not become {state.value} within {timeout:g} s (it is {now})"
                        f"{'; ' + hint if hint else ''}"
                    )
                )

        async def check_again() -> None:
            try:
                now = await current_state()
            except Exception as e:
                if not reached.called:
                    reached.errback(e)
                return
            last[:] = [now]
            if now is state and not reached.called:
                reached.callback(None)

        subscription = self.subscribe(on_event, name)
        timer: IDelayedCall = clock.callLater(timeout, on_timeout)
        rechecks = LoopingCall(lambda: ensureDeferred(check_again()))
        rechecks.clock = clock
        try:
            current = await current_state()
            last[:] = last or [current]
            if current is state and not reached.called:
                reached.callback(None)
            if recheck is not None and not reached.called:
                rechecks.start(recheck, now=False)
            await reached
        finally:
            subscription.cancel()
            if timer.active():
                timer.cancel()
            if rechecks.running:
                rechecks.stop()


def event_for_transition(before: VMState | None, after: VMState | None) -> VMEventType | None:
    """
    The event a polling driver reports when a VM's state goes from ``before`` to ``after``
    (``None``: the VM did not exist), or ``None`` when nothing is worth reporting.
    """
    if before is after:
        return None
    if after is None:
        return VMEventType.UNDEFINED
    if before is None:
        return VMEventType.DEFINED
    return {
        VMState.RUNNING: (
            VMEventType.RESUMED
            if before is VMState.PAUSED
            else VMEventType.RESTORED
            if before is VMState.SAVED
            else VMEventType.STARTED
        ),
        VMState.BLOCKED: None,
        VMState.PAUSED: VMEventType.PAUSED,
        VMState.SHUTDOWN: None,
        VMState.SHUTOFF: VMEventType.SHUTOFF,
        VMState.CRASHED: VMEventType.CRASHED,
        VMState.SAVED: VMEventType.SAVED,
        VMState.PMSUSPENDED: VMEventType.PAUSED,
        VMState.NOSTATE: None,
    }[after]


class StatePoller:
    """
    Events for a hypervisor that pushes none: while ``hub`` has subscribers, ask ``states``
    (every VM's state, by name) each ``interval`` seconds and publish the changes.
    Declare no :attr:`~hypervisors.interface.Capability.PUSHED_EVENTS` when using it.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        states: Callable[[], Awaitable[dict[str, VMState]]],
        interval: float = 1.0,
    ) -> None:
        self.hub = EventHub(self._start, self._stop)
        self._clock = clock
        self._states = states
        self._interval = interval
        self._loop = LoopingCall(self._poll)
        self._known: dict[str, VMState] | None = None

    def _start(self) -> None:
        self._known = None
        # A new loop each time: a stopped LoopingCall restarted while its last poll is still
        # out schedules twice, and its second stop then fails inside Twisted.
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self.log.failure("VM state poller stopped", f)
        )

    def _stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    async def wait_for_state(
        self,
        name: str,
        state: VMState,
        timeout: float,
        current_state: Callable[[], Awaitable[VMState]],
        hint: str = "",
    ) -> None:
        """:meth:`EventHub.wait_for_state`, rechecking at each poll interval (see ``recheck``)."""
        await self.hub.wait_for_state(
            self._clock, name, state, timeout, current_state, hint, recheck=self._interval
        )

    def _poll(self) -> Deferred[None]:
        async def poll() -> None:
            try:
                now = await self._states()
            except Exception:
                self.log.failure("Polling the VMs' states failed; trying again")
                return
            known, self._known = self._known, now
            if known is None:
                return
            for vm in sorted(known.keys() | now.keys()):
                before, after = known.get(vm), now.get(vm)
                kind = event_for_transition(before, after)
                if kind is not None:
                    self.hub.publish(VMEvent(vm, kind, after or VMState.NOSTATE, "polled"))

        return ensureDeferred(poll())
