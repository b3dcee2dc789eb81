"""Steps run ahead of their commit: an orchestration that runs in this process takes its
step on a creation or an activity result before that is committed, and the step is committed
in the same transaction. If the instance changed meanwhile, the store drops the step and the
ordinary way (a message in the inbox, a lease, a step) takes over; nothing is lost."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
from _harness import StoreClass, commit_instance, commit_name, running_processors, store_args

import dt_trio
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._core._commit import Applied, Commit
from dt_trio._engine import (
    HubClient,
    RemoteExecutor,
    RoutingExecutor,
    Signals,
)
from dt_trio._local import LocalExecutor

registry = dt_trio.Registry()


@registry.activity
async def hello(ctx: dt_trio.ActivityContext, city: str) -> str:
    return f"Hello, {city}!"


@registry.orchestrator
def cities(ctx: dt_trio.OrchestrationContext, _: Any) -> Any:
    out = []
    for city in ("Tokyo", "Seattle", "London"):
        out.append((yield ctx.call_activity(hello, input=city)))
    late = ctx.wait_for_external_event("late")
    return [out, late.is_complete]


class CountingStore(StoreClass):
    """Counts the commits of each kind; with `event_before_result`, an event reaches the
    instance just before each activity result's commit."""

    def __init__(self) -> None:
        self.signals = Signals()
        super().__init__(*store_args(), listener=self.signals)
        self.commits: list[str] = []
        self.event_before_result = False

    async def apply(self, commit: Commit) -> Applied:
        if self.event_before_result and "result" in str(commit_name(commit, Applied())):
            # (as of the commit's time: it is there before the commit)
            late = ev.event_raised(commit.now, "late", None)
            await super().apply(ops.send_event(commit_instance(commit), late, commit.now))
        applied = await super().apply(commit)
        name = commit_name(commit, applied)
        if name is not None:
            self.commits.append(name)
        return applied


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
async def hub() -> AsyncIterator[tuple[CountingStore, HubClient]]:
    store = CountingStore()
    executor = RoutingExecutor(LocalExecutor(registry), RemoteExecutor())
    async with running_processors(store, executor) as client:
        yield store, client


async def run_cities(client: HubClient) -> tuple[str, str | None]:
    instance_id = await client.start("cities")
    with trio.fail_after(10):
        state = await client.wait(instance_id, lambda s: s.status.is_terminal)
    assert state is not None
    return instance_id, state.output


async def test_each_step_is_committed_with_what_started_it(
    hub: tuple[CountingStore, HubClient],
) -> None:
    store, client = hub
    instance_id, output = await run_cities(client)
    assert output == '[["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"], false]'
    assert store.commits == ["create+step", "result+step", "result+step", "result+step"]
    history = [ev.kind(e) for e in await store.get_history(instance_id)]
    assert history == [
        "orchestratorStarted",
        "executionStarted",
        "taskScheduled",
        *["orchestratorStarted", "taskCompleted", "taskScheduled"] * 2,
        "orchestratorStarted",
        "taskCompleted",
        "orchestratorCompleted",
        "executionCompleted",
    ]


async def test_a_step_ahead_of_a_change_is_dropped_and_taken_the_ordinary_way(
    hub: tuple[CountingStore, HubClient],
) -> None:
    store, client = hub
    store.event_before_result = True
    instance_id, output = await run_cities(client)
    # Each result met an event its step had not seen: it went through the inbox instead, and
    # the step that ran on it saw the event too.
    assert output == '[["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"], true]'
    assert "result+step" not in store.commits
    assert store.commits.count("result") == 3
    history = await store.get_history(instance_id)
    assert sum(e.HasField("eventRaised") for e in history) == 3
    assert sum(e.HasField("taskCompleted") for e in history) == 3
