"""Fan-in coalescing: while an orchestration still waits for activities, its next step waits
for more results, at most as long as its last step kept the worker busy."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from _harness import (
    StoreClass,
    cache_problems,
    fan_out_answer,
    run_beside,
    running_processors,
    store_args,
)

from dt_trio._core import Status
from dt_trio._engine import HubClient, RemoteExecutor, Signals
from dt_trio._engine._pacing import Pacing
from dt_trio._proto import orchestrator_service_pb2 as pb

FAN = 10
SLOW_STEP = 0.5


def test_a_step_waits_at_most_as_long_as_the_last_one_took() -> None:
    pacing = Pacing(max_hold=1.0, min_step=0.002)
    assert pacing.hold_until("a", 10.0) is None  # never stepped here
    pacing.stepped("a", answered=10.0, took=0.3)
    assert pacing.hold_until("a", 10.1) == pytest.approx(10.3)
    assert pacing.hold_until("a", 10.3) is None
    pacing.stepped("a", answered=20.0, took=5.0)  # capped
    assert pacing.hold_until("a", 20.5) == pytest.approx(21.0)
    pacing.stepped("a", answered=30.0, took=0.001)  # too cheap to be worth a wait
    assert pacing.hold_until("a", 30.0) is None
    pacing.stepped("b", answered=40.0, took=0.3)
    pacing.forget("b")
    assert pacing.hold_until("b", 40.0) is None


def test_what_is_remembered_is_bounded() -> None:
    pacing = Pacing(max_items=3)
    for i in range(5):
        pacing.stepped(str(i), answered=1.0, took=0.5)
    assert [pacing.hold_until(str(i), 1.0) is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_a_watch_counts_results_from_its_start_and_is_done_once_the_missing_are_in() -> None:
    pacing = Pacing()
    pacing.delivered("a")  # not watched: nothing counts it
    with pacing.watch("a") as watch:
        pacing.delivered("a")  # counted before the step knows how many it waits for
        pacing.delivered("other")
        watch.expect(2)
        assert not watch.done.is_set()  # one result still missing
        pacing.delivered("a")
        assert watch.done.is_set()
    with pacing.watch("a") as watch:
        watch.expect(0)
        assert watch.done.is_set()


@contextlib.asynccontextmanager
async def open_hub(
    pacing: Pacing,
) -> AsyncIterator[tuple[StoreClass, RemoteExecutor, HubClient]]:
    store = StoreClass(*store_args(), listener=Signals())
    executor = RemoteExecutor()
    async with running_processors(store, executor, pacing=pacing) as client:
        yield store, executor, client


@pytest.fixture(params=["paced", "unpaced"])
async def hub(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[StoreClass, RemoteExecutor, HubClient, str]]:
    async with open_hub(Pacing(max_hold=0.0 if request.param == "unpaced" else 1.0)) as hub:
        yield (*hub, request.param)


def new_results(request: pb.OrchestratorRequest) -> int:
    """How many activity results a step is the first to see."""
    return sum(e.HasField("taskCompleted") for e in request.newEvents)


def result_of(request: pb.ActivityRequest) -> pb.ActivityResponse:
    instance_id = request.orchestrationInstance.instanceId
    return pb.ActivityResponse(instanceId=instance_id, taskId=request.taskId)


async def test_results_that_arrive_while_a_step_would_replay_are_taken_together(
    hub: tuple[StoreClass, RemoteExecutor, HubClient, str],
) -> None:
    store, executor, client, mode = hub
    steps: list[int] = []  # results new to each step
    first_result_answered = trio.Event()
    held: list[tuple[object, pb.ActivityResponse]] = []

    async def slowly_answer_the_rest(_: trio.Nursery) -> None:
        await first_result_answered.wait()
        for pending, response in held:
            await trio.sleep(0.01)
            await executor.complete(pending, response)

    async def worker(_: trio.Nursery) -> None:
        async for item in executor.stream(pb.GetWorkItemsRequest()):
            pending = executor.lookup(item.completionToken)
            if item.HasField("orchestratorRequest"):
                request = item.orchestratorRequest
                steps.append(new_results(request))
                if steps[-1] == 1 and len(steps) == 2:
                    # The step with the first result keeps the worker busy (a long replay).
                    await trio.sleep(SLOW_STEP)
                    first_result_answered.set()
                await executor.complete(pending, fan_out_answer(request, FAN))
            else:
                request = item.activityRequest
                response = result_of(request)
                if request.taskId == 0:
                    await executor.complete(pending, response)
                else:
                    held.append((pending, response))

    state = await run_beside(client, "fan", worker, slowly_answer_the_rest)
    assert state.status == Status.COMPLETED
    history = await store.get_history(state.instance_id)
    assert sum(e.HasField("taskCompleted") for e in history) == FAN
    assert steps[:2] == [0, 1]
    if mode == "paced":
        # the other nine results, which arrived one by one, in one step
        assert steps[2:] == [FAN - 1]
    else:
        assert len(steps) > 3, steps
    assert await cache_problems(store) == []


class LongHolds(Pacing):
    """Every step may hold a minute: a hold that misses a result is seen to wait."""

    def __init__(self) -> None:
        super().__init__(max_hold=60.0)

    def stepped(self, instance_id: str, answered: float, took: float) -> None:
        super().stepped(instance_id, answered, 60.0)


@pytest.mark.sqlite_only  # (holds sqlite's writer so that the commits are grouped)
async def test_results_committed_with_the_lease_that_starts_a_hold_are_not_missed() -> None:
    """All the results of a fan-out are committed in one transaction, the first of them
    leasing the instance for its next step, which holds for the rest: they are all in
    already, so the step goes out at once (not a minute later, when its hold runs out)."""
    async with open_hub(LongHolds()) as (store, executor, client):
        steps: list[int] = []  # results new to each step
        results: list[tuple[Any, pb.ActivityResponse]] = []
        gate = threading.Event()

        async def worker(nursery: trio.Nursery) -> None:
            async for item in executor.stream(pb.GetWorkItemsRequest()):
                pending = executor.lookup(item.completionToken)
                if item.HasField("orchestratorRequest"):
                    request = item.orchestratorRequest
                    steps.append(new_results(request))
                    await executor.complete(pending, fan_out_answer(request, FAN))
                    continue
                results.append((pending, result_of(item.activityRequest)))
                if len(results) == FAN:
                    # The store's writer is held while every result is delivered, so that
                    # their commits wait, then run together.
                    nursery.start_soon(store._db.write, lambda _: gate.wait(10))
                    await trio.testing.wait_all_tasks_blocked()
                    for answered, response in results:
                        executor.deliver(answered, response)
                    await trio.testing.wait_all_tasks_blocked()
                    gate.set()

        state = await run_beside(client, "fan", worker)
    assert state.status == Status.COMPLETED
    assert steps == [0, FAN]
