"""The Prometheus collector of one hub: its tally and state, read at scrape time.

Each hub gets a registry of its own (several hubs may run in one process, as tests run them);
nothing is registered in prometheus-client's global default registry. The metric names and
what each counts are in docs/observability.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from dt_trio._core._commit import WorkKind
from dt_trio._engine import Dispatcher, RemoteExecutor, Signals
from dt_trio._metrics._tally import Histogram
from dt_trio._store import Backend

PREFIX = "dt_trio_"


@dataclass(frozen=True)
class HubView:
    """What the collector reads of one hub."""

    signals: Signals  # its tally and its health
    store: Backend
    remote: RemoteExecutor
    dispatch: Dispatcher


def _buckets(histogram: Histogram) -> tuple[list[tuple[str, float]], float]:
    counts, total = histogram.cumulative()
    # (repr: as prometheus-client writes bounds this small)
    bounds = [*(repr(float(b)) for b in histogram.bounds), "+Inf"]
    return list(zip(bounds, counts, strict=True)), total


class HubCollector:
    """Builds the metric families of one hub from what it counted and holds now."""

    def __init__(self, hub: HubView) -> None:
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self._hub
        tally = hub.signals.tally

        started = CounterMetricFamily(
            PREFIX + "orchestrations_started",
            "Orchestration instances created by this hub's commits (starts, sub-orchestrations, "
            "orchestrations started by entities).",
            labels=["name"],
        )
        for name, count in sorted(tally.started.items()):
            started.add_metric([name], count)
        yield started

        ended = CounterMetricFamily(
            PREFIX + "orchestrations_ended",
            "Orchestration executions that ended in this hub's commits, by final status.",
            labels=["name", "status"],
        )
        for (name, status), count in sorted(tally.ended.items()):
            ended.add_metric([name, status.label], count)
        yield ended

        activities = CounterMetricFamily(
            PREFIX + "activities",
            "Activity results committed, by outcome.",
            labels=["name", "outcome"],
        )
        for (name, failed), count in sorted(tally.activities.items()):
            activities.add_metric([name, "failed" if failed else "completed"], count)
        yield activities

        durations = HistogramMetricFamily(
            PREFIX + "activity_duration_seconds",
            "How long activities ran: from being handed to a worker (or waiting for one) to "
            "its answer.",
            labels=["name"],
        )
        for name, histogram in sorted(tally.activity_seconds.items()):
            durations.add_metric([name], *_buckets(histogram))
        yield durations

        waiting = GaugeMetricFamily(
            PREFIX + "work_items_waiting",
            "Work items this hub holds that wait for an SDK worker to take them.",
            labels=["kind"],
        )
        age = GaugeMetricFamily(
            PREFIX + "oldest_work_item_age_seconds",
            "How long the oldest of the work items waiting for a worker has waited (0: none "
            "waits).",
            labels=["kind"],
        )
        held = GaugeMetricFamily(
            PREFIX + "leases_held",
            "Work items this hub holds: leased, running or being committed.",
            labels=["kind"],
        )
        redeliveries = CounterMetricFamily(
            PREFIX + "redeliveries",
            "Work items leased again after a failed attempt (given back by a worker, left by "
            "a worker's stream that ended, answered wrongly, or not committed).",
            labels=["kind"],
        )
        poisoned = CounterMetricFamily(
            PREFIX + "poison_failures",
            "Work items failed because they were tried too often without success.",
            labels=["kind"],
        )
        now = time.monotonic()
        lanes = {
            WorkKind.ORCHESTRATION: hub.dispatch.orchestrations.in_flight,
            WorkKind.ACTIVITY: hub.dispatch.activities.in_flight,
            WorkKind.ENTITY: hub.dispatch.entities.in_flight,
        }
        for kind in WorkKind:
            count, oldest = hub.remote.waiting(kind)
            waiting.add_metric([kind.value], count)
            age.add_metric([kind.value], 0.0 if oldest is None else max(0.0, now - oldest))
            held.add_metric([kind.value], lanes[kind])
            redeliveries.add_metric([kind.value], tally.redeliveries[kind])
            poisoned.add_metric([kind.value], tally.poisoned[kind])
        yield from (waiting, age, held, redeliveries, poisoned)

        yield GaugeMetricFamily(
            PREFIX + "workers_connected",
            "SDK workers connected (GetWorkItems streams open).",
            value=hub.remote.connected,
        )

        stats = hub.store.commit_stats
        seconds = HistogramMetricFamily(
            PREFIX + "store_commit_seconds",
            "How long the store's write transactions took (sqlite: a group commit; "
            "PostgreSQL: a commit's transaction).",
        )
        seconds.add_metric([], *_buckets(stats.seconds))
        yield seconds
        writes = HistogramMetricFamily(
            PREFIX + "store_commit_writes",
            "Writes per store transaction (sqlite's group commit size; 1 on PostgreSQL).",
        )
        writes.add_metric([], *_buckets(stats.writes))
        yield writes

        readiness = hub.signals.health.readiness
        yield GaugeMetricFamily(
            PREFIX + "ready",
            "1 while the hub is ready (as /readyz and the gRPC health service say), else 0.",
            value=1 if readiness.ready else 0,
        )
        yield GaugeMetricFamily(
            PREFIX + "store_fault",
            "1 while the store cannot write, else 0.",
            value=0 if readiness.store_fault is None else 1,
        )


def hub_registry(hub: HubView) -> CollectorRegistry:
    """A registry of its own for `hub`'s metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    return registry
