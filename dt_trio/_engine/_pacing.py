"""What the dispatcher remembers between steps to pace them: instances parked as their last
commit left them (`Parking`), and how long a step may wait for more activity results
(`Pacing`). Plain bounded data; the policy is the dispatcher's (see `_dispatch.py`)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator

import trio

from dt_trio._core._commit import OrchestrationWorkItem


class Parking:
    """Instances as their last step's commit left them, while they wait (see
    `Dispatcher.expected_step`): at most `max_items` of them and `max_events`
    history events in all, the oldest dropped first. Their histories are the store cache's
    own events, but an evicted cache entry would live on here: hence the bound in events."""

    def __init__(self, max_items: int = 1024, max_events: int = 100_000) -> None:
        self._items: collections.OrderedDict[str, OrchestrationWorkItem] = collections.OrderedDict()
        self._events = 0
        self._max_items = max_items
        self._max_events = max_events

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: OrchestrationWorkItem) -> None:
        self.pop(item.state.instance_id)
        if len(item.history) > self._max_events:
            return
        self._items[item.state.instance_id] = item
        self._events += len(item.history)
        while len(self._items) > self._max_items or self._events > self._max_events:
            _, dropped = self._items.popitem(last=False)
            self._events -= len(dropped.history)

    def pop(self, instance_id: str) -> OrchestrationWorkItem | None:
        item = self._items.pop(instance_id, None)
        if item is not None:
            self._events -= len(item.history)
        return item


class Pacing:
    """Fan-in coalescing: while an instance still waits for activities, its next step waits
    for more of their results, at most as long as its last step kept the worker busy (and
    at most `max_hold` seconds), or until all of them are in.

    Every step replays the whole history on the worker, so a fan-out of a thousand
    activities stepped once per result (or per handful of results) spends the worker's time
    replaying a long history again and again instead of running the activities. Bounding the
    wait by the last step's cost keeps the worker's share of time spent on the instance's
    replays at about half at most, and adds little latency where steps are cheap. The
    last step's cost is known only to this process, in memory: after a restart an instance
    steps at once until it has been stepped here.
    """

    def __init__(
        self, *, max_hold: float = 1.0, min_step: float = 0.002, max_items: int = 4096
    ) -> None:
        # instance -> (when its last step's worker answered, how long it took), trio clock
        self._last: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._holds: dict[str, _Hold] = {}
        self._max_hold = max_hold
        self._min_step = min_step
        self._max_items = max_items

    def stepped(self, instance_id: str, answered: float, took: float) -> None:
        """A worker answered a step of the instance at `answered`, `took` seconds after the
        step was sent."""
        self._last.pop(instance_id, None)
        if took >= self._min_step:
            self._last[instance_id] = (answered, min(took, self._max_hold))
            while len(self._last) > self._max_items:
                self._last.popitem(last=False)

    def forget(self, instance_id: str) -> None:
        self._last.pop(instance_id, None)

    def hold_until(self, instance_id: str, now: float) -> float | None:
        """Until when the instance's next step may wait for more results (None: no wait)."""
        last = self._last.get(instance_id)
        if last is None or last[0] + last[1] <= now:
            return None
        return last[0] + last[1]

    @contextlib.contextmanager
    def watch(self, instance_id: str) -> Iterator[_Hold]:
        """Count the instance's activity results delivered from now on (see `_Hold`)."""
        hold = self._holds[instance_id] = _Hold()
        try:
            yield hold
        finally:
            if self._holds.get(instance_id) is hold:
                del self._holds[instance_id]

    def delivered(self, instance_id: str) -> None:
        """An activity result for the instance was committed."""
        hold = self._holds.get(instance_id)
        if hold is not None:
            hold.seen += 1
            hold.check()


@dataclasses.dataclass
class _Hold:
    """The activity results of an instance delivered since it was being watched (`seen`),
    and how many its step waits for (`missing`, once known): `done` once they are in. A
    result committed before the watch began but counted by it makes `done` early, never
    late: the store has the last word (see `Dispatcher.coalesce`)."""

    seen: int = 0
    missing: int | None = None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)

    def expect(self, missing: int) -> None:
        self.missing = missing
        self.check()

    def check(self) -> None:
        if self.missing is not None and self.seen >= self.missing:
            self.done.set()
