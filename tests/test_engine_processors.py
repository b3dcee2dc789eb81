"""The orchestration processor keeps serving when one work item goes wrong."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import trio
import trio.testing
from _harness import StoreClass, store_args

from dt_trio import _core as core
from dt_trio._core import InstanceState, Status, StepResult
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._core._commit import Applied, Commit, WriteStep
from dt_trio._engine import (
    ActivityProcessor,
    Dispatcher,
    EntityProcessor,
    HubClient,
    OrchestrationProcessor,
    RemoteExecutor,
    Signals,
)
from dt_trio._engine._executor import UNCLAIMED_SECONDS
from dt_trio._proto import orchestrator_service_pb2 as pb


def now() -> datetime:
    return datetime.now(UTC)


class PurgingStore(StoreClass):
    """Purges the instance 'doomed' between its lease and its commit, as a client may."""

    async def apply(self, commit: Commit) -> Applied:
        steps = [w.result for w in commit.writes if isinstance(w, WriteStep)]
        if steps and steps[0].state.instance_id == "doomed":
            assert await self.purge("doomed", recursive=False) == 1
        return await super().apply(commit)


async def a_worker(executor: RemoteExecutor, request: pb.GetWorkItemsRequest | None = None) -> None:
    """A connected worker stream (taking everything, unless `request` says otherwise) that
    never answers."""
    async for _ in executor.stream(request or pb.GetWorkItemsRequest()):
        pass


async def finished_with_a_stray_event(store: StoreClass, instance_id: str) -> None:
    t = now()
    state = InstanceState(
        instance_id=instance_id,
        name="orch",
        execution_id="e",
        status=Status.COMPLETED,
        created_at=t,
        last_updated_at=t,
    )
    started = ev.execution_started(
        t, name="orch", instance_id=instance_id, execution_id="e", input=None
    )
    await store.apply(ops.start(state, started, t, t))
    await store.apply(ops.send_event(instance_id, ev.event_raised(t, "late", None), t))


async def test_an_instance_purged_mid_step_does_not_stop_the_processor() -> None:
    signals = Signals()
    store = PurgingStore(*store_args(), listener=signals)
    await store.open()
    try:
        await finished_with_a_stray_event(store, "doomed")
        await finished_with_a_stray_event(store, "survivor")
        survivor_settled = signals.instance_event("survivor")
        executor = RemoteExecutor()
        processor = OrchestrationProcessor(Dispatcher(store, executor, "me"), signals)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a_worker, executor)  # work is leased while a worker can take it
            await nursery.start(processor.run)
            with trio.fail_after(5):
                await survivor_settled.wait()  # the processor lived on after 'doomed'
            nursery.cancel_scope.cancel()
        assert await store.get_instance("doomed") is None
        survivor = await store.get_instance("survivor")
        assert survivor is not None and survivor.status == Status.COMPLETED
    finally:
        await store.close()


async def test_an_activity_nobody_answers_fails_its_task_after_the_attempt_cap() -> None:
    from dt_trio._core import ActivityTask
    from dt_trio._engine import ActivityProcessor
    from dt_trio._proto import orchestrator_service_pb2 as pb

    signals = Signals()
    store = StoreClass(*store_args(), listener=signals)
    await store.open()
    executor = RemoteExecutor()
    try:
        t = now()
        state = InstanceState(
            instance_id="poisoned",
            name="orch",
            execution_id="e",
            status=Status.RUNNING,
            created_at=t,
            last_updated_at=t,
        )
        started = ev.execution_started(
            t, name="orch", instance_id="poisoned", execution_id="e", input=None
        )
        await store.apply(ops.start(state, started, t, t))
        (leased,) = await store.lease_orchestrations("me", now(), 1)
        scheduled = ev.new_event(t, 1)
        scheduled.taskScheduled.name = "crashy"
        step = StepResult(
            state=leased.state,
            consumed=tuple(m.id for m in leased.inbox),
            history=[m.event for m in leased.inbox],
            activities=[ActivityTask("poisoned", "e", scheduled)],
        )
        await store.apply(ops.step(leased.lease, step, now()))
        dispatch = Dispatcher(store, executor, "me")
        processor = ActivityProcessor(dispatch, signals, max_attempts=3)
        handed_out = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(processor.run)
            worker = executor.stream(pb.GetWorkItemsRequest())
            with trio.fail_after(10):
                async for item in worker:
                    if item.HasField("activityRequest"):
                        handed_out += 1
                        executor.lookup(item.completionToken).abandon(0.0)  # a crashing worker
                        if handed_out == 3:
                            break
                while True:  # the fourth lease fails the task instead of handing it out
                    (failed,) = await store.lease_orchestrations("me", now(), 1) or [None]
                    if failed is not None:
                        break
                    await signals.orchestration_work.wait()
                    signals.orchestration_work.clear()
                await worker.aclose()
            nursery.cancel_scope.cancel()
        (message,) = failed.inbox
        assert message.event.taskFailed.taskScheduledId == 1
        failure = message.event.taskFailed.failureDetails
        assert failure.errorType == "ActivityAbandonedError"
        assert "handed to workers 3 times" in failure.errorMessage
        assert handed_out == 3
    finally:
        await store.close()


def test_work_given_back_again_and_again_waits_longer_each_time() -> None:
    import itertools

    from dt_trio._engine._processors import _backoff

    delays = [_backoff(attempt) for attempt in range(1, 12)]
    assert delays[0] == 0.0  # the first redelivery is immediate: a dead worker holds nothing
    assert all(a < b for a, b in itertools.pairwise(delays))
    assert delays[-1] == 30.0  # capped


class CountingLeases(StoreClass):
    """Counts the lease transactions of each kind."""

    def __init__(self, signals: Signals, *place: str) -> None:
        super().__init__(*(place or store_args()), listener=signals)
        self.leases: list[str] = []
        self._leased_orchestrations = 0
        self._orchestrations_leased = trio.Event()

    async def lease_orchestrations(self, *args: Any) -> Any:
        self.leases.append("orchestrations")
        leased = await super().lease_orchestrations(*args)
        self._leased_orchestrations += len(leased)
        self._orchestrations_leased.set()
        return leased

    async def leased(self, count: int) -> None:
        """Until `count` orchestration work items have been leased in all."""
        while self._leased_orchestrations < count:
            self._orchestrations_leased = trio.Event()
            await self._orchestrations_leased.wait()

    async def lease_activities(self, *args: Any) -> Any:
        self.leases.append("activities")
        return await super().lease_activities(*args)

    async def lease_entities(self, *args: Any) -> Any:
        self.leases.append("entities")
        return await super().lease_entities(*args)


@contextlib.asynccontextmanager
async def running_hub(
    store: StoreClass, executor: RemoteExecutor, signals: Signals
) -> AsyncIterator[HubClient]:
    """The three processors on `store`, for the body; yields a client that starts instances."""
    await store.open()
    dispatch = Dispatcher(store, executor, "me")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for processor in (
                OrchestrationProcessor(dispatch, signals),
                ActivityProcessor(dispatch, signals),
                EntityProcessor(dispatch, signals),
            ):
                await nursery.start(processor.run)
            yield HubClient(store, signals, dispatch)
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


async def test_a_hub_without_workers_leases_nothing_however_long_it_idles(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Work waits in the store, where another process's workers could take it, until a
    worker that takes its kind connects here; meanwhile nothing is leased, not even by the
    processors' idle poll."""
    signals = Signals()
    store = CountingLeases(signals)
    executor = RemoteExecutor()
    async with running_hub(store, executor, signals) as client:
        await client.start("orch")
        await client.signal_entity("@counter@k", "add", None)
        for _ in range(3):
            mock_clock.jump(3600)
            await trio.testing.wait_all_tasks_blocked()
        assert store.leases == []
        only_orchestrations = pb.GetWorkItemsRequest()
        only_orchestrations.workItemFilters.orchestrations.add(name="orch")
        stream = executor.stream(only_orchestrations)
        with trio.fail_after(5):
            item = await stream.__anext__()  # leased now, and sent
        assert item.orchestratorRequest.newEvents[1].executionStarted.name == "orch"
        # entities: this worker takes none (orchestrations: leased once, or again for nothing
        # when PostgreSQL's fallback poll, on the jumping clock, wakes the processor)
        assert set(store.leases) == {"orchestrations"}
        await stream.aclose()


async def test_work_no_connected_worker_takes_is_given_back_with_its_attempts_kept(
    mock_clock: trio.testing.MockClock, tmp_path: pathlib.Path
) -> None:
    """A step leased while a worker is connected that does not take it (its filters name
    other orchestrators) goes back after a while, untried: however often, it is not
    poison."""
    signals = Signals()
    store = CountingLeases(signals, *store_args(tmp_path))  # (opened again below)
    executor = RemoteExecutor()
    other = pb.GetWorkItemsRequest()
    other.workItemFilters.orchestrations.add(name="other")
    async with running_hub(store, executor, signals) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a_worker, executor, other)
            instance_id = await client.start("orch")
            for leases in range(1, core.MAX_STEP_ATTEMPTS + 3):
                with trio.fail_after(5):
                    await store.leased(leases)  # leased, and (once all wait) queued
                await trio.testing.wait_all_tasks_blocked()
                mock_clock.jump(UNCLAIMED_SECONDS)  # nobody took it: it goes back
            nursery.cancel_scope.cancel()
    await store.open()
    try:
        [item] = await store.lease_orchestrations("me", now(), 1)
        assert item.state.instance_id == instance_id and item.attempt == 1
    finally:
        await store.close()
