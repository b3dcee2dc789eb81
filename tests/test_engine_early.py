"""Work sent to a worker beside the commit that leases it: an orchestration's first step
beside its creation, activities beside the step that schedules them. The worker's answer
counts only once that commit is made; if it fails, the answer is dropped and nothing is lost."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from dt_trio._core import Status, StepResult
from dt_trio._engine import (
    ActivityProcessor,
    HubClient,
    OrchestrationProcessor,
    RemoteExecutor,
    Signals,
)
from dt_trio._engine._processors import link
from dt_trio._errors import StoreUnavailable
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store import ActivityWorkItem, SqliteBackend


class GatedStore(SqliteBackend):
    """Holds back commits until told, and fails the first commit that schedules activities."""

    def __init__(self) -> None:
        self.signals = Signals()
        super().__init__("", listener=self.signals)
        self.open_gate = trio.Event()
        self.failed_steps = 0

    async def create_instance(self, *args: object, **kw: object) -> object:
        with trio.fail_after(5):  # the first step must reach the worker before this
            await self.open_gate.wait()
        return await super().create_instance(*args, **kw)  # type: ignore[arg-type]

    async def commit_step(
        self, owner: str, result: StepResult, lease_activities: int = 0
    ) -> list[ActivityWorkItem]:
        if result.activities and not self.failed_steps:
            self.failed_steps += 1
            raise StoreUnavailable("disk full (a test)")
        return await super().commit_step(owner, result, lease_activities)


@pytest.fixture
async def hub() -> AsyncIterator[tuple[GatedStore, RemoteExecutor, HubClient]]:
    store = GatedStore()
    await store.open()
    executor = RemoteExecutor()
    orchestrations = OrchestrationProcessor(store, executor, store.signals, owner="me")
    activities = ActivityProcessor(store, executor, store.signals, owner="me")
    link(orchestrations, activities)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(orchestrations.run)
            await nursery.start(activities.run)
            yield store, executor, HubClient(store, store.signals, orchestrations)
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


def answer(request: pb.OrchestratorRequest) -> pb.OrchestratorResponse:
    """An orchestrator that calls activity 'act' once and returns its result."""
    response = pb.OrchestratorResponse(instanceId=request.instanceId)
    events = [*request.pastEvents, *request.newEvents]
    done = [e.taskCompleted.result.value for e in events if e.HasField("taskCompleted")]
    action = response.actions.add(id=1 if done else 0)
    if done:
        action.completeOrchestration.orchestrationStatus = pb.ORCHESTRATION_STATUS_COMPLETED
        action.completeOrchestration.result.value = done[0]
    else:
        action.scheduleTask.name = "act"
    return response


async def test_work_reaches_the_worker_before_its_commit_and_counts_only_after_it(
    hub: tuple[GatedStore, RemoteExecutor, HubClient],
) -> None:
    store, executor, client = hub
    runs: list[str] = []

    async def worker() -> None:
        async for item in executor.stream(pb.GetWorkItemsRequest()):
            pending = executor.lookup(item.completionToken)
            if item.HasField("orchestratorRequest"):
                runs.append("orchestrator")
                store.open_gate.set()  # the instance is created only now
                await executor.complete(pending, answer(item.orchestratorRequest))
            elif item.HasField("activityRequest"):
                runs.append("activity")
                response = pb.ActivityResponse(
                    instanceId=item.activityRequest.orchestrationInstance.instanceId,
                    taskId=item.activityRequest.taskId,
                )
                response.result.value = f'"run {runs.count("activity")}"'
                await executor.complete(pending, response)

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            instance_id = await client.start("orch")
            state = await client.wait(instance_id, lambda s: s.status.is_terminal)
            nursery.cancel_scope.cancel()
    assert state is not None and state.status == Status.COMPLETED
    # The first step's activity ran, but that step's commit failed: its answer was dropped,
    # the step ran again and so did the activity, whose second answer is the one delivered.
    assert store.failed_steps == 1
    assert runs.count("activity") == 2
    assert state.output == '"run 2"'
    history = await store.get_history(instance_id)
    assert sum(e.HasField("taskScheduled") for e in history) == 1
    assert sum(e.HasField("taskCompleted") for e in history) == 1
    await store.verify_cache()
