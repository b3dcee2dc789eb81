"""The orchestration processor keeps serving when one work item goes wrong."""

from __future__ import annotations

from datetime import UTC, datetime

import trio
from _harness import StoreClass, store_args

from dt_trio._core import InstanceState, Status, StepResult
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._core._commit import Applied, Commit, WriteStep
from dt_trio._engine import Dispatcher, OrchestrationProcessor, RemoteExecutor, Signals
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


async def a_worker(executor: RemoteExecutor) -> None:
    """A connected worker stream that takes everything (and never answers)."""
    async for _ in executor.stream(pb.GetWorkItemsRequest()):
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
