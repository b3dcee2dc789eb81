"""The Prometheus collector of one hub: its tally and state, read at scrape time.

Each hub gets a registry of its own (several hubs may run in one process, as tests run them);
nothing is registered in prometheus-client's global default registry. The metric names and
what each counts are in docs/observability.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

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


_Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily


def _family(
    kind: type[_Family],
    name: str,
    help: str,
    labels: list[str],
    samples: Iterable[tuple[Any, ...]],
) -> _Family:
    """A metric family of `kind` named PREFIX + `name`, with a sample for each of `samples`:
    its labels' values, then its value (a histogram's: its buckets and sum)."""
    family = kind(PREFIX + name, help, labels=labels)
    for sample in samples:
        family.add_metric(*sample)
    return family


def _age(now: float, oldest: float | None) -> float:
    return 0.0 if oldest is None else max(0.0, now - oldest)


class HubCollector:
    """Builds the metric families of one hub from what it counted and holds now."""

    def __init__(self, hub: HubView) -> None:
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self._hub
        tally = hub.signals.tally
        yield _family(
            CounterMetricFamily,
            "orchestrations_started",
            "Orchestration instances created by this hub's commits (starts, sub-orchestrations, "
            "orchestrations started by entities).",
            ["name"],
            (([name], count) for name, count in sorted(tally.started.items())),
        )
        yield _family(
            CounterMetricFamily,
            "orchestrations_ended",
            "Orchestration executions that ended in this hub's commits, by final status.",
            ["name", "status"],
            (([name, status.label], n) for (name, status), n in sorted(tally.ended.items())),
        )
        yield _family(
            CounterMetricFamily,
            "activities",
            "Activity results committed, by outcome.",
            ["name", "outcome"],
            (
                ([name, "failed" if failed else "completed"], count)
                for (name, failed), count in sorted(tally.activities.items())
            ),
        )
        yield _family(
            HistogramMetricFamily,
            "activity_duration_seconds",
            "How long activities ran: from being handed to a worker (or waiting for one) to "
            "its answer.",
            ["name"],
            (([name], *_buckets(h)) for name, h in sorted(tally.activity_seconds.items())),
        )

        now = time.monotonic()
        waiting = {kind: hub.remote.waiting(kind) for kind in WorkKind}
        lanes = {
            WorkKind.ORCHESTRATION: hub.dispatch.orchestrations.in_flight,
            WorkKind.ACTIVITY: hub.dispatch.activities.in_flight,
            WorkKind.ENTITY: hub.dispatch.entities.in_flight,
        }
        per_kind: tuple[tuple[type[_Family], str, str, Callable[[WorkKind], float]], ...] = (
            (
                GaugeMetricFamily,
                "work_items_waiting",
                "Work items this hub holds that wait for an SDK worker to take them.",
                lambda kind: waiting[kind][0],
            ),
            (
                GaugeMetricFamily,
                "oldest_work_item_age_seconds",
                "How long the oldest of the work items waiting for a worker has waited (0: "
                "none waits).",
                lambda kind: _age(now, waiting[kind][1]),
            ),
            (
                GaugeMetricFamily,
                "leases_held",
                "Work items this hub holds: leased, running or being committed.",
                lanes.__getitem__,
            ),
            (
                CounterMetricFamily,
                "redeliveries",
                "Work items leased again after a failed attempt (given back by a worker, left "
                "by a worker's stream that ended, answered wrongly, or not committed).",
                tally.redeliveries.__getitem__,
            ),
            (
                CounterMetricFamily,
                "poison_failures",
                "Work items failed because they were tried too often without success.",
                tally.poisoned.__getitem__,
            ),
        )
        for family_type, name, help, value in per_kind:
            yield _family(
                family_type, name, help, ["kind"], (([k.value], value(k)) for k in WorkKind)
            )

        yield GaugeMetricFamily(
            PREFIX + "workers_connected",
            "SDK workers connected (GetWorkItems streams open).",
            value=hub.remote.connected,
        )

        stats = hub.store.commit_stats
        yield _family(
            HistogramMetricFamily,
            "store_commit_seconds",
            "How long the store's write transactions took (sqlite: a group commit; "
            "PostgreSQL: a commit's transaction).",
            [],
            [([], *_buckets(stats.seconds))],
        )
        yield _family(
            HistogramMetricFamily,
            "store_commit_writes",
            "Writes per store transaction (sqlite's group commit size; 1 on PostgreSQL).",
            [],
            [([], *_buckets(stats.writes))],
        )

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
