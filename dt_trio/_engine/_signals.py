"""In-process wake-ups: how a commit reaches the processors and the rpcs waiting on it."""

from __future__ import annotations

import trio

from dt_trio._core import InstanceState
from dt_trio._health import Health


class Wakeup:
    """A level-triggered wake-up: `set` before `wait` is not lost.

    A consumer calls `clear()` before it looks for work and `wait()` when it found none, so a
    `set()` that happens while it looks wakes it at once.
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class InstanceChange:
    """The next change of one instance. `state` is the instance's state after the latest
    change, when the commit knew it (None: read the store). A change that fired keeps taking
    later ones until its waiters have looked at it, so what they read is never stale."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self.state: InstanceState | None = None
        self.waiters = 0

    @property
    def fired(self) -> bool:
        return self._event.is_set()

    def fire(self, state: InstanceState | None) -> None:
        self.state = state
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


class Changes:
    """A count of the hub's changes (instances and entities), for any number of watchers.
    Costs a commit one increment while nobody waits."""

    def __init__(self) -> None:
        self.count = 0
        self._event: trio.Event | None = None

    def fire(self) -> None:
        self.count += 1
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait_past(self, count: int) -> None:
        """Return once `count` is no longer the latest count."""
        while self.count == count:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()


class Signals:
    """Implements `dt_trio._store.StoreListener` with trio primitives."""

    def __init__(self, health: Health | None = None) -> None:
        self.orchestration_work = Wakeup()
        self.activity_work = Wakeup()
        self.entity_work = Wakeup()
        self.changes = Changes()
        self._instances: dict[str, InstanceChange] = {}
        self.health = health or Health()  # the store's faults are part of it

    def orchestration_work_added(self) -> None:
        self.orchestration_work.set()

    def activity_work_added(self) -> None:
        self.activity_work.set()

    def entity_work_added(self) -> None:
        self.entity_work.set()
        self.changes.fire()  # a signal queued or an entity's step committed

    def instance_changed(self, instance_id: str, state: InstanceState | None = None) -> None:
        self.changes.fire()
        change = self._instances.get(instance_id)
        if change is not None:
            change.fire(state)

    def store_fault(self, reason: str | None) -> None:
        self.health.store_fault(reason)

    def any_instance_changed(self) -> None:
        for change in list(self._instances.values()):
            change.fire(None)

    def instance_event(self, instance_id: str) -> InstanceChange:
        """The next change of the instance, for one waiter, who must `release` it. Take it
        *before* reading the instance, so that a change between the read and the wait is not
        missed."""
        change = self._instances.get(instance_id)
        if change is None or change.fired:
            change = self._instances[instance_id] = InstanceChange()
        change.waiters += 1
        return change

    def release(self, instance_id: str, change: InstanceChange) -> None:
        change.waiters -= 1
        if change.waiters == 0 and self._instances.get(instance_id) is change:
            del self._instances[instance_id]
