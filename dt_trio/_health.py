"""The hub's health as operators' probes see it: ready to serve or not, and why.

One `Health` per hub holds the current `Readiness` and wakes whoever watches it. The gRPC health
service (`_grpc/_health.py`, grpc.health.v1.Health) answers Check from it and streams its
changes to Watch; an HTTP /readyz can answer from the same value. `Readiness.problem` is the one
rule:

    store open  and  server listening  and  no store fault  and  not stopping   ->  ready

The store reports its faults (disk full, database locked: every write fails) through its
listener, the hub the rest. While the store has a fault, `watch_store` tries a harmless write
now and then, so that readiness comes back once the fault clears even when nothing else
writes (a pod that is not ready gets no traffic that would write).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import trio

from dt_trio._core import evolve
from dt_trio._errors import StoreUnavailable

# While the store has a fault, a write is tried this often to see whether it cleared.
STORE_PROBE_SECONDS = 1.0
# On SIGTERM, watchers get this long at most to be told NOT_SERVING before the server stops.
DRAIN_SECONDS = 1.0


@dataclass(frozen=True)
class Readiness:
    """What readiness depends on, as last reported."""

    store_open: bool = False
    listening: bool = False
    store_fault: str | None = None  # why the store cannot write, while it cannot
    stopping: bool = False

    @property
    def problem(self) -> str | None:
        """Why the hub is not ready (None: it is)."""
        if self.stopping:
            return "shutting down"
        if not self.store_open:
            return "the store is not open"
        if self.store_fault is not None:
            return self.store_fault
        if not self.listening:
            return "the server is not listening"
        return None

    @property
    def ready(self) -> bool:
        return self.problem is None


class Health:
    """The current `Readiness`, changed with `update` (in the event loop's thread) and
    watched with `watch`."""

    def __init__(self) -> None:
        self._readiness = Readiness()
        self._version = 0
        self._changed = trio.Event()
        # Each watcher's last version handled; `drain` waits for them to catch up.
        self._watchers: dict[object, int] = {}
        self._caught_up = trio.Event()

    @property
    def readiness(self) -> Readiness:
        return self._readiness

    def update(
        self,
        *,
        store_open: bool | None = None,
        listening: bool | None = None,
        stopping: bool | None = None,
    ) -> None:
        changes = {
            name: value
            for name, value in (
                ("store_open", store_open),
                ("listening", listening),
                ("stopping", stopping),
            )
            if value is not None
        }
        self._set(evolve(self._readiness, **changes))

    def store_fault(self, reason: str | None) -> None:
        """The store cannot write (`reason`), or can again (None)."""
        self._set(evolve(self._readiness, store_fault=reason))

    def _set(self, readiness: Readiness) -> None:
        if readiness == self._readiness:
            return
        self._readiness = readiness
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()
        self._caught_up = trio.Event()
        self._check_caught_up()

    def _check_caught_up(self) -> None:
        if all(seen == self._version for seen in self._watchers.values()):
            self._caught_up.set()

    async def watch(self) -> AsyncGenerator[Readiness, None]:
        """The readiness now, then after each change (the latest one, when several came while
        the watcher was busy). A value counts as handled once the watcher asks for the next."""
        me = object()
        self._watchers[me] = handled = -1
        try:
            while True:
                if handled == self._version:
                    self._watchers[me] = handled
                    self._check_caught_up()
                    await self._changed.wait()
                handled = self._version
                yield self._readiness
        finally:
            del self._watchers[me]
            self._check_caught_up()

    async def next_change(self) -> None:
        """Return at the next change (without counting as a watcher: see `drain`)."""
        await self._changed.wait()

    async def drain(self) -> None:
        """Turn not ready (shutting down) and wait until every watcher has handled that, for
        at most DRAIN_SECONDS."""
        self.update(stopping=True)
        with trio.move_on_after(DRAIN_SECONDS):
            await self._caught_up.wait()


async def watch_store(health: Health, try_write: Callable[[], Awaitable[None]]) -> None:
    """While the store has a fault, call `try_write` every STORE_PROBE_SECONDS (its success
    clears the fault: the store reports it). Runs until cancelled."""
    while True:
        if health.readiness.store_fault is None:
            await health.next_change()
            continue
        await trio.sleep(STORE_PROBE_SECONDS)
        try:
            await try_write()
        except StoreUnavailable:
            pass  # still faulty; the store logged the fault when it began
