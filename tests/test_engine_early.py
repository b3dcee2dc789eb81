"""Work sent to a worker beside the commit that leases it: an orchestration's first step
beside its creation, activities beside the step that schedules them. The worker's answer
counts only once that commit is made; if it fails, the answer is dropped and nothing is lost."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from _harness import (
    StoreClass,
    cache_problems,
    commit_instance,
    commit_name,
    fan_out_answer,
    run_beside,
    running_processors,
    store_args,
)
from _values import now

from dt_trio._core import InstanceState, Status
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._core._commit import (
    Applied,
    Commit,
    Lease,
    OrchestrationWorkItem,
    WorkKind,
    WriteStep,
)
from dt_trio._engine import (
    HubClient,
    RemoteExecutor,
    Signals,
)
from dt_trio._engine._dispatch import EARLY_FIRST
from dt_trio._engine._executor import Route
from dt_trio._engine._pacing import Parking
from dt_trio._errors import StoreUnavailable
from dt_trio._proto import orchestrator_service_pb2 as pb


class GatedStore(StoreClass):
    """A store whose commits the tests hold back (`gates`: "create" or "result" -> event that
    lets such a commit through) or disturb (`fail_first_step`, `event_before_result`)."""

    def __init__(self) -> None:
        self.signals = Signals()
        super().__init__(*store_args(), listener=self.signals)
        self.gates: dict[str, trio.Event] = {}
        self.fail_first_step = False
        self.event_before_result = False
        self.failed_steps = 0
        # what a test worker took from its stream, and what it had taken at each commit
        self.taken: list[str] = []
        self.at_commit: list[tuple[str, list[str]]] = []

    async def apply(self, commit: Commit) -> Applied:
        name = (commit_name(commit, Applied()) or "").partition("+")[0]
        if name:
            self.at_commit.append((name, list(self.taken)))
        if name in self.gates:
            with trio.fail_after(5):  # the work must reach the worker before the commit
                await self.gates[name].wait()
        if name == "result" and self.event_before_result:
            # an event that reaches the instance just before the result, in the same
            # transaction (so that no lease of the event alone can come between them)
            late = ev.event_raised(commit.now, "late", None)
            send = ops.send_event(commit_instance(commit), late, commit.now)
            commit = dataclasses.replace(
                commit, writes=(*send.writes, *commit.writes), guards=(*send.guards, *commit.guards)
            )
        if name == "step" and self.fail_first_step and not self.failed_steps:
            [step] = [w for w in commit.writes if isinstance(w, WriteStep)]
            if step.result.activities:
                self.failed_steps += 1
                raise StoreUnavailable("disk full (a test)")
        return await super().apply(commit)


@pytest.fixture
async def hub() -> AsyncIterator[tuple[GatedStore, RemoteExecutor, HubClient]]:
    store = GatedStore()
    executor = RemoteExecutor()
    async with running_processors(store, executor) as client:
        yield store, executor, client


def answer(request: pb.OrchestratorRequest) -> pb.OrchestratorResponse:
    """An orchestrator that calls activity 'act' once and returns its result (as an SDK
    would: on replay, only the actions that are new)."""
    response = pb.OrchestratorResponse(instanceId=request.instanceId)
    events = [*request.pastEvents, *request.newEvents]
    done = [e.taskCompleted.result.value for e in events if e.HasField("taskCompleted")]
    if done:
        action = response.actions.add(id=1)
        action.completeOrchestration.orchestrationStatus = pb.ORCHESTRATION_STATUS_COMPLETED
        action.completeOrchestration.result.value = done[0]
    elif not any(e.HasField("taskScheduled") for e in events):
        response.actions.add(id=0).scheduleTask.name = "act"
    return response


async def run_one(
    store: GatedStore, executor: RemoteExecutor, client: HubClient
) -> tuple[InstanceState, list[str]]:
    """Start an orchestration of one activity and play its worker; opens the gates as the
    work reaches the worker. Returns the final state and the work the worker ran."""
    runs: list[str] = []

    async def worker(_: trio.Nursery) -> None:
        async for item in executor.stream(pb.GetWorkItemsRequest()):
            pending = executor.lookup(item.completionToken)
            if item.HasField("orchestratorRequest"):
                request = item.orchestratorRequest
                runs.append("orchestrator")
                store.gates.get("create", trio.Event()).set()
                if any(e.HasField("taskCompleted") for e in request.newEvents):
                    store.gates.get("result", trio.Event()).set()
                await executor.complete(pending, answer(request))
            elif item.HasField("activityRequest"):
                runs.append("activity")
                response = pb.ActivityResponse(
                    instanceId=item.activityRequest.orchestrationInstance.instanceId,
                    taskId=item.activityRequest.taskId,
                )
                response.result.value = f'"run {runs.count("activity")}"'
                await executor.complete(pending, response)

    state = await run_beside(client, "orch", worker)
    assert state.status == Status.COMPLETED
    history = await store.get_history(state.instance_id)
    assert sum(e.HasField("taskScheduled") for e in history) == 1
    assert sum(e.HasField("taskCompleted") for e in history) == 1
    assert await cache_problems(store) == []
    return state, runs


@pytest.mark.contract
async def test_a_first_step_and_a_parked_step_reach_the_worker_before_their_commits(
    hub: tuple[GatedStore, RemoteExecutor, HubClient],
) -> None:
    """Contract: a step is sent to its worker beside the commit that leases it, not after it."""
    store, executor, client = hub
    # Neither the creation nor the delivery of the result commits until the worker has the
    # step that follows it: each step must start beside its commit.
    store.gates = {"create": trio.Event(), "result": trio.Event()}
    state, runs = await run_one(store, executor, client)
    assert state.output == '"run 1"'
    assert runs == ["orchestrator", "activity", "orchestrator"]


async def test_an_activity_sent_beside_a_failed_commit_runs_again_with_the_retried_step(
    hub: tuple[GatedStore, RemoteExecutor, HubClient],
) -> None:
    store, executor, client = hub
    store.fail_first_step = True
    state, runs = await run_one(store, executor, client)
    # The first step's activity ran, but that step's commit failed: its answer was dropped,
    # the step ran again and so did the activity, whose second answer is the one delivered.
    assert store.failed_steps == 1
    assert runs.count("activity") == 2
    assert state.output == '"run 2"'


async def test_a_step_started_early_on_what_was_not_leased_is_dropped(
    hub: tuple[GatedStore, RemoteExecutor, HubClient],
) -> None:
    store, executor, client = hub
    # The instance's inbox holds an event besides the result when the result is delivered:
    # the step started beside the delivery ran on the result alone, less than the delivery
    # leases, so its answer is dropped and the leased step (the event and the result) runs.
    store.event_before_result = True
    state, runs = await run_one(store, executor, client)
    assert state.output == '"run 1"'
    assert runs == ["orchestrator", "activity", "orchestrator", "orchestrator"]
    history = await store.get_history(state.instance_id)
    # two steps committed of the three run: the first, and the one on the event and result
    assert sum(e.HasField("orchestratorStarted") for e in history) == 2
    last_step = history[[ev.kind(e) for e in history].index("orchestratorStarted", 1) :]
    assert [ev.kind(e) for e in last_step][:3] == [
        "orchestratorStarted",
        "eventRaised",
        "taskCompleted",
    ]


async def _worker_answering_all(
    store: GatedStore, executor: RemoteExecutor, nursery: trio.Nursery
) -> None:
    # As an SDK worker: the stream is read on while completions are sent beside it.
    async for item in executor.stream(pb.GetWorkItemsRequest()):
        store.taken.append(str(item.WhichOneof("request")))
        pending = executor.lookup(item.completionToken)
        if item.HasField("orchestratorRequest"):
            response: Any = answer(item.orchestratorRequest)
        else:
            response = pb.ActivityResponse(
                instanceId=item.activityRequest.orchestrationInstance.instanceId,
                taskId=item.activityRequest.taskId,
            )
            response.result.value = '"done"'
        nursery.start_soon(executor.complete, pending, response)


@pytest.mark.contract
async def test_a_commit_beside_early_work_queues_at_once(
    hub: tuple[GatedStore, RemoteExecutor, HubClient],
) -> None:
    """The commit does not wait for the work to be on its way (a client's StartInstance is
    answered that much sooner): the store's writer runs the commit in its own thread while
    the event loop sends the work.

    Contract: a commit beside early work queues at once (the exact work the worker held at
    each commit)."""
    store, executor, client = hub
    worker = functools.partial(_worker_answering_all, store, executor)
    state = await run_beside(client, "orch", worker)
    assert state.output == '"done"'
    step, act = "orchestratorRequest", "activityRequest"
    assert store.at_commit == [
        ("create", []),
        ("step", [step]),
        ("result", [step, act]),
        ("step", [step, act, step]),
    ]


async def test_work_no_waiting_stream_takes_is_on_its_way_at_once() -> None:
    """A commit never waits on a stalled worker, nor when no worker is connected."""
    executor = RemoteExecutor()
    route = Route(WorkKind.ACTIVITY, "act")

    def work() -> pb.WorkItem:
        return pb.WorkItem(activityRequest=pb.ActivityRequest(name="act"))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            queued = trio.Event()
            nursery.start_soon(executor.execute, work(), route, queued)
            await trio.testing.wait_all_tasks_blocked()
            assert queued.is_set()  # no worker: it waits in the queue, nobody waits for it

            stream = executor.stream(pb.GetWorkItemsRequest())
            await stream.__anext__()  # a worker takes the queued item, then reads no more
            behind = trio.Event()
            nursery.start_soon(executor.execute, work(), route, behind)
            await trio.testing.wait_all_tasks_blocked()
            assert behind.is_set()  # its stream is not waiting for work: not waited for

            async def read_two() -> None:
                await stream.__anext__()  # the item behind
                await stream.__anext__()  # waits for the next one

            taken = trio.Event()
            nursery.start_soon(read_two)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(executor.execute, work(), route, taken)
            await trio.testing.wait_all_tasks_blocked()
            assert taken.is_set()  # taken by the waiting stream
            nursery.cancel_scope.cancel()
        await stream.aclose()


def test_parked_instances_are_bounded_in_number_and_in_history_events() -> None:
    def parked(instance_id: str, events: int) -> OrchestrationWorkItem:
        t = now()
        state = InstanceState(instance_id, "orch", "e", Status.RUNNING, t, t)
        return OrchestrationWorkItem(state, [pb.HistoryEvent()] * events, [], Lease("me", 0))

    parking = Parking(max_items=3, max_events=10)
    for name in "abcd":
        parking.put(parked(name, 1))
    assert len(parking) == 3 and parking.pop("a") is None  # the oldest went first
    parking.put(parked("e", 8))  # 11 events: b goes (c, d, e: 10)
    assert parking.pop("b") is None and len(parking) == 3
    parking.put(parked("huge", 11))  # more than all of it: not parked, nothing evicted
    assert parking.pop("huge") is None and len(parking) == 3
    item = parking.pop("e")
    assert item is not None and len(item.history) == 8
    parking.put(parked("f", 9))  # c and d (1 each) + 9 = 11: c goes
    assert parking.pop("c") is None and parking.pop("d") is not None


@pytest.mark.contract
async def test_results_arriving_together_start_one_step_not_one_per_result(
    hub: tuple[GatedStore, RemoteExecutor, HubClient],
) -> None:
    """Contract: no step is run on a worker only to be dropped: every step run is committed."""
    store, executor, client = hub
    fan = 20
    steps_run = 0

    def fan_in(request: pb.OrchestratorRequest) -> pb.OrchestratorResponse:
        response = pb.OrchestratorResponse(instanceId=request.instanceId)
        events = [*request.pastEvents, *request.newEvents]
        if sum(e.HasField("taskCompleted") for e in events) == fan:
            done = response.actions.add(id=fan).completeOrchestration
            done.orchestrationStatus = pb.ORCHESTRATION_STATUS_COMPLETED
        elif not any(e.HasField("taskScheduled") for e in events):
            for i in range(fan):
                response.actions.add(id=i).scheduleTask.name = "act"
        return response

    async def worker(nursery: trio.Nursery) -> None:
        # As an SDK worker with a thread pool: every activity is answered at once, so their
        # results reach the sidecar together while the instance is parked.
        nonlocal steps_run
        async for item in executor.stream(pb.GetWorkItemsRequest()):
            pending = executor.lookup(item.completionToken)
            if item.HasField("orchestratorRequest"):
                steps_run += 1
                response: Any = fan_in(item.orchestratorRequest)
            else:
                response = pb.ActivityResponse(
                    instanceId=item.activityRequest.orchestrationInstance.instanceId,
                    taskId=item.activityRequest.taskId,
                )
            nursery.start_soon(executor.complete, pending, response)

    state = await run_beside(client, "orch", worker)
    assert state.status == Status.COMPLETED
    history = await store.get_history(state.instance_id)
    assert sum(e.HasField("taskCompleted") for e in history) == fan
    # Every step the worker ran was committed: none was started beside one result's delivery
    # only for another result's delivery to lease the instance first (its answer dropped,
    # a whole replay of the history wasted on the worker).
    assert steps_run == sum(e.HasField("orchestratorStarted") for e in history)


@pytest.mark.contract
async def test_a_fan_outs_first_activities_reach_the_worker_before_the_rest_are_started(
    hub: tuple[GatedStore, RemoteExecutor, HubClient],
) -> None:
    """A step that schedules many activities sends the first few on their own: the worker
    gets its first activity before the rest have even been handed to the executor (building
    them all first kept the worker waiting 20 ms for 256).

    Contract: the first EARLY_FIRST activities of a fan-out go out before the rest are built."""
    store, executor, client = hub
    fan = EARLY_FIRST * 3
    started_at_first: list[int] = []  # activities the executor held when the first went out

    async def worker(nursery: trio.Nursery) -> None:
        async for item in executor.stream(pb.GetWorkItemsRequest()):
            pending = executor.lookup(item.completionToken)
            if item.HasField("orchestratorRequest"):
                response: Any = fan_out_answer(item.orchestratorRequest, fan)
            else:
                if not started_at_first:
                    kinds = [p.route.kind for p in executor._pending.values()]
                    started_at_first.append(kinds.count(WorkKind.ACTIVITY))
                request = item.activityRequest
                response = pb.ActivityResponse(
                    instanceId=request.orchestrationInstance.instanceId, taskId=request.taskId
                )
            nursery.start_soon(executor.complete, pending, response)

    state = await run_beside(client, "fan", worker)
    assert state.status == Status.COMPLETED
    assert started_at_first == [EARLY_FIRST]
    history = await store.get_history(state.instance_id)
    assert sum(e.HasField("taskCompleted") for e in history) == fan
    assert await cache_problems(store) == []
