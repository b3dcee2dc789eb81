"""What a hub counts as it works, in plain ints: read by the Prometheus collector at scrape time.

Counting costs the hot path a dict increment or a bisect, never a call into prometheus-client
(whose objects take a lock per update); the collector (`_collector.py`) turns these numbers
into metric families only when /metrics is asked for. Nothing here needs prometheus-client,
trio or a store: the store keeps its `CommitStats` here too.

The sqlite store's writer thread updates its `CommitStats` while the event loop's thread may
read them: each update is a few operations on ints that the interpreter does one at a time, so
a scrape may at worst see a commit counted in one bucket and not yet in the sum.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Iterable, Sequence
from typing import Protocol

from dt_trio._core import Status
from dt_trio._core._commit import (
    Applied,
    Commit,
    CreateInstance,
    WorkKind,
    WriteEntityStep,
    WriteStep,
)
from dt_trio._proto import orchestrator_service_pb2 as pb

# Seconds: an activity's run (from milliseconds to minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Seconds: one store transaction.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Writes in one transaction (sqlite's group commit).
WRITES_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


class Histogram:
    """Observations counted per bucket (`counts[i]`: those <= `bounds[i]`, not cumulative; the
    last one: those above every bound) and summed."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> tuple[list[int], float]:
        """The counts of observations <= each bound and in all (the last), and their sum."""
        counts = list(self.counts)  # one copy: the buckets of one scrape agree
        running = 0
        for i, count in enumerate(counts):
            running += count
            counts[i] = running
        return counts, self.total


class CommitStats:
    """A store's write transactions: how long each took, and how many writes it carried."""

    def __init__(self) -> None:
        self.seconds = Histogram(COMMIT_BUCKETS)
        self.writes = Histogram(WRITES_BUCKETS)

    def committed(self, seconds: float, writes: int) -> None:
        self.seconds.observe(seconds)
        self.writes.observe(writes)


class Attempted(Protocol):
    """A work item: `attempt` is 1 plus the failed attempts at it."""

    @property
    def attempt(self) -> int: ...


class Tally:
    """One hub's counts (see docs/observability.md for what each means)."""

    def __init__(self) -> None:
        self.started: collections.Counter[str] = collections.Counter()
        self.ended: collections.Counter[tuple[str, Status]] = collections.Counter()
        # (activity name, failed)
        self.activities: collections.Counter[tuple[str, bool]] = collections.Counter()
        self.activity_seconds: dict[str, Histogram] = {}
        self.redeliveries: collections.Counter[WorkKind] = collections.Counter()
        self.poisoned: collections.Counter[WorkKind] = collections.Counter()

    def committed(self, commit: Commit, applied: Applied) -> None:
        """Count the instances `commit` created and ended, once it is applied as `applied`."""
        if applied.alternative:
            assert commit.otherwise is not None
            commit = commit.otherwise
        for write in commit.writes:
            # (`type() is`: final classes, and this runs for every commit)
            if type(write) is WriteStep:
                result = write.result
                for new in result.new_instances:
                    self.started[new.state.name] += 1
                state = result.state
                if state.status.is_terminal and _ends(result.history):
                    self.ended[state.name, state.status] += 1
            elif type(write) is CreateInstance:
                self.started[write.state.name] += 1
            elif type(write) is WriteEntityStep:
                for new in write.result.new_instances:
                    self.started[new.state.name] += 1

    def activity_done(self, name: str, failed: bool, seconds: float | None) -> None:
        """An activity's result is committed; it ran for `seconds` (None: it did not run)."""
        self.activities[name, failed] += 1
        if seconds is not None:
            histogram = self.activity_seconds.get(name)
            if histogram is None:
                histogram = self.activity_seconds[name] = Histogram(DURATION_BUCKETS)
            histogram.observe(seconds)

    def leased(self, kind: WorkKind, items: Iterable[Attempted]) -> None:
        """Count the redeliveries among work items just leased: those tried before."""
        again = sum(1 for item in items if item.attempt > 1)
        if again:
            self.redeliveries[kind] += again


def _ends(history: Sequence[pb.HistoryEvent]) -> bool:
    """Whether the events a step appends end the execution (a step of an instance that had
    already ended appends none)."""
    return any(event.HasField("executionCompleted") for event in reversed(history))
