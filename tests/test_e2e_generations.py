"""Older and newer protocol generations beside each other.

The Go SDK's worker (durabletask-go's `client` package), the Python SDK before 0.2 and the
JavaScript SDK's 0.1 alphas answer work items without a completion token: an orchestration
step names only its instance, an activity its instance and task id. Their work is matched the
way durabletask-go's own sidecar matches it, among the items handed out and not yet answered.
Newer SDKs (.NET, Java) split a large orchestrator answer into chunks (`isPartial`,
`chunkIndex`), and may answer `requiresHistory` when they expected to stream the history.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from _harness import Sidecar, sdk_client, wait_until
from durabletask import client, task, worker
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs

# -- a worker of the Go SDK's generation ----------------------------------------------------


class GoStyle(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Puts the SDK worker's messages on the wire as durabletask-go's worker writes them: an
    empty GetWorkItemsRequest, and answers with no completion token (an orchestration step
    names only its instance; an activity its instance and task id), nothing else."""

    def __init__(self) -> None:
        self.answered: list[str] = []  # "orchestration" / "activity", one per answer sent
        self.refused: list[str] = []

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.method.endswith("/GetWorkItems"):
            request = pb.GetWorkItemsRequest()
        return continuation(details, request)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.method.endswith("/CompleteOrchestratorTask"):
            step = pb.OrchestratorResponse(instanceId=request.instanceId)
            step.actions.extend(request.actions)
            if request.HasField("customStatus"):
                step.customStatus.CopyFrom(request.customStatus)
            request, kind = step, "orchestration"
        elif details.method.endswith("/CompleteActivityTask"):
            result = pb.ActivityResponse(instanceId=request.instanceId, taskId=request.taskId)
            if request.HasField("failureDetails"):
                result.failureDetails.CopyFrom(request.failureDetails)
            else:
                result.result.CopyFrom(request.result)
            request, kind = result, "activity"
        else:
            return continuation(details, request)
        outcome = continuation(details, request)
        (self.refused if outcome.exception() is not None else self.answered).append(kind)
        return outcome


def double(ctx: task.ActivityContext, n: int) -> int:
    return 2 * n


def shout(ctx: task.ActivityContext, word: str) -> str:
    return word.upper()


def chain(ctx: task.OrchestrationContext, n: int) -> Any:
    n = yield ctx.call_activity(double, input=n)
    return (yield ctx.call_activity(double, input=n))


def napper(ctx: task.OrchestrationContext, _: Any) -> Any:
    yield ctx.create_timer(ctx.current_utc_datetime + timedelta(seconds=0.2))
    return "rested"


def listener(ctx: task.OrchestrationContext, _: Any) -> Any:
    ctx.set_custom_status("listening")
    return (yield ctx.wait_for_external_event("go"))


def parent(ctx: task.OrchestrationContext, n: int) -> Any:
    return (yield ctx.call_sub_orchestrator(chain, input=n)) + 1


def chorus(ctx: task.OrchestrationContext, words: list[str]) -> Any:
    return (yield task.when_all([ctx.call_activity(shout, input=w) for w in words]))


@contextlib.contextmanager
def started(w: worker.TaskHubGrpcWorker) -> Iterator[worker.TaskHubGrpcWorker]:
    w.start()
    try:
        yield w
    finally:
        w.stop()


def test_a_worker_that_answers_without_tokens_runs_every_pattern_beside_an_sdk_worker(
    sidecar: Sidecar,
) -> None:
    go = GoStyle()
    old = worker.TaskHubGrpcWorker(host_address=sidecar.address, interceptors=[go])
    for orchestrator in (chain, napper, listener, parent, chorus):
        old.add_orchestrator(orchestrator)
    old.add_activity(double)
    old.add_activity(shout)
    new = worker.TaskHubGrpcWorker(host_address=sidecar.address)
    new.add_activity(shout)
    new.use_work_item_filters()  # it takes `shout` activities only
    with started(old), started(new):
        c = sdk_client(sidecar.address)
        ids = {
            "chain": c.schedule_new_orchestration(chain, input=3),
            "napper": c.schedule_new_orchestration(napper),
            "listener": c.schedule_new_orchestration(listener),
            "parent": c.schedule_new_orchestration(parent, input=5),
            "chorus": c.schedule_new_orchestration(chorus, input=["a", "b", "c", "d"]),
        }
        waiting = c.wait_for_orchestration_start(ids["listener"], timeout=30)
        assert waiting is not None
        wait_until(
            lambda: (
                (s := c.get_orchestration_state(ids["listener"])) is not None
                and s.serialized_custom_status == '"listening"'
            ),
            what="the listener to wait for its event",
        )
        c.raise_orchestration_event(ids["listener"], "go", data="heard")
        outputs = {}
        for name, instance_id in ids.items():
            state = c.wait_for_orchestration_completion(instance_id, timeout=30)
            assert state is not None, name
            assert state.runtime_status == client.OrchestrationStatus.COMPLETED, (
                name,
                state.failure_details,
            )
            outputs[name] = state.serialized_output
    assert outputs == {
        "chain": "12",
        "napper": '"rested"',
        "listener": '"heard"',
        "parent": "21",
        "chorus": '["A", "B", "C", "D"]',
    }
    assert go.refused == []
    # Every step ran on the token-less worker (the other takes no orchestrations).
    assert go.answered.count("orchestration") >= 12
    assert go.answered.count("activity") >= 4  # `double` runs only there
    assert "refused" not in sidecar.log_text()


# -- raw streams answered by hand -------------------------------------------------------------


class RawWorker:
    """A GetWorkItems stream read by a thread; the test answers its items by hand."""

    def __init__(self, address: str, request: pb.GetWorkItemsRequest) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = stubs.TaskHubSidecarServiceStub(self.channel)
        self.stream = self.stub.GetWorkItems(request)
        self.items: queue.Queue[Any] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for item in self.stream:
                if not item.HasField("healthPing"):
                    self.items.put(item)
        except grpc.RpcError:
            pass

    def next(self, timeout: float = 20.0) -> Any:
        return self.items.get(timeout=timeout)

    def close(self) -> None:
        self.stream.cancel()
        self.reader.join(10)
        self.channel.close()


@contextlib.contextmanager
def raw_worker(address: str, **filters: str) -> Iterator[RawWorker]:
    request = pb.GetWorkItemsRequest()
    if "orchestration" in filters:
        request.workItemFilters.orchestrations.add(name=filters["orchestration"])
    if "activity" in filters:
        request.workItemFilters.activities.add(name=filters["activity"])
    if "limit" in filters:
        request.maxConcurrentActivityWorkItems = int(filters["limit"])
    raw = RawWorker(address, request)
    try:
        yield raw
    finally:
        raw.close()


def stepper(ctx: task.OrchestrationContext, x: int) -> Any:
    return (yield ctx.call_activity("slow_step", input=x))


def activity_answer(item: Any, result: str, token: bool) -> Any:
    request = item.activityRequest
    answer = pb.ActivityResponse(
        instanceId=request.orchestrationInstance.instanceId, taskId=request.taskId
    )
    if token:
        answer.completionToken = item.completionToken
    answer.result.value = result
    return answer


def refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_a_stale_tokenless_answer_for_redelivered_work_changes_nothing(
    sidecar: Sidecar,
) -> None:
    orchestrations = worker.TaskHubGrpcWorker(host_address=sidecar.address)
    orchestrations.add_orchestrator(stepper)
    orchestrations.use_work_item_filters()
    c = sdk_client(sidecar.address)
    with (
        started(orchestrations),
        raw_worker(sidecar.address, activity="slow_step", limit="1") as modern,
    ):
        # A worker that answers with tokens holds one activity (its limit)...
        first = c.schedule_new_orchestration(stepper, input=0)
        held = modern.next()
        # ...so the next activity goes to a token-less worker, whose stream then ends.
        with raw_worker(sidecar.address, activity="slow_step") as old:
            second = c.schedule_new_orchestration(stepper, input=1)
            lost = old.next()
            assert lost.activityRequest.orchestrationInstance.instanceId == second
            stub = old.stub
            modern.stub.CompleteActivityTask(activity_answer(held, '"modern 0"', token=True))
            old.stream.cancel()
            # Given back at once: the worker that answers with tokens now holds it.
            again = modern.next()
            assert again.activityRequest.orchestrationInstance.instanceId == second
            assert again.activityRequest.taskId == lost.activityRequest.taskId
            # The dead stream's worker answers late, without a token: nothing waits for it.
            error = refused(
                lambda: stub.CompleteActivityTask(
                    activity_answer(lost, '"from the dead"', token=False)
                )
            )
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert f"'{second}'" in (error.details() or "")
        modern.stub.CompleteActivityTask(activity_answer(again, '"modern 1"', token=True))
        done = c.wait_for_orchestration_completion(second, timeout=30)
        assert done is not None and done.serialized_output == '"modern 1"'
        # Once settled, the same late answer still changes nothing.
        with grpc.insecure_channel(sidecar.address) as channel:
            late = stubs.TaskHubSidecarServiceStub(channel)
            error = refused(
                lambda: late.CompleteActivityTask(
                    activity_answer(lost, '"from the dead"', token=False)
                )
            )
            assert error.code() == grpc.StatusCode.NOT_FOUND
        assert c.get_orchestration_state(second).serialized_output == '"modern 1"'
        assert c.wait_for_orchestration_completion(first, timeout=30) is not None


# -- chunked answers and requiresHistory ----------------------------------------------------


def plus_one(ctx: task.ActivityContext, n: int) -> int:
    return n + 1


def step_answer(item: Any, *actions: Any, **fields: Any) -> Any:
    answer = pb.OrchestratorResponse(
        instanceId=item.orchestratorRequest.instanceId, completionToken=item.completionToken
    )
    answer.actions.extend(actions)
    for name, value in fields.items():
        if name in ("customStatus", "chunkIndex"):
            getattr(answer, name).value = value
        else:
            setattr(answer, name, value)
    return answer


def schedule(action_id: int, n: int) -> Any:
    action = pb.OrchestratorAction(id=action_id)
    action.scheduleTask.name = "plus_one"
    action.scheduleTask.input.value = str(n)
    return action


def complete(action_id: int, output: str) -> Any:
    action = pb.OrchestratorAction(id=action_id)
    action.completeOrchestration.orchestrationStatus = pb.ORCHESTRATION_STATUS_COMPLETED
    action.completeOrchestration.result.value = output
    return action


def results_of(item: Any) -> list[int]:
    request = item.orchestratorRequest
    events = [*request.pastEvents, *request.newEvents]
    return [int(e.taskCompleted.result.value) for e in events if e.HasField("taskCompleted")]


@contextlib.contextmanager
def chunky_hub(sidecar: Sidecar) -> Iterator[tuple[RawWorker, client.TaskHubGrpcClient]]:
    """A raw stream that runs orchestration 'chunky' by hand, an SDK worker for `plus_one`."""
    activities = worker.TaskHubGrpcWorker(host_address=sidecar.address)
    activities.add_activity(plus_one)
    activities.use_work_item_filters()
    with started(activities), raw_worker(sidecar.address, orchestration="chunky") as raw:
        yield raw, sdk_client(sidecar.address)


def test_an_answer_sent_in_chunks_counts_once_whole(sidecar: Sidecar) -> None:
    with chunky_hub(sidecar) as (raw, c):
        instance_id = c.schedule_new_orchestration("chunky")
        first = raw.next()
        # .NET and Java split an answer too large for one message into chunks; each chunk is
        # answered at once, and a chunk sent again (a retry) counts once.
        raw.stub.CompleteOrchestratorTask(
            step_answer(
                first, schedule(0, 1), isPartial=True, chunkIndex=0, customStatus='"chunks"'
            )
        )
        second_chunk = step_answer(first, schedule(1, 2), isPartial=True, chunkIndex=1)
        raw.stub.CompleteOrchestratorTask(second_chunk)
        raw.stub.CompleteOrchestratorTask(second_chunk)
        # (Had a chunk been taken for the whole answer, the next would be refused here.)
        raw.stub.CompleteOrchestratorTask(step_answer(first, schedule(2, 3), chunkIndex=2))
        wait_until(
            lambda: c.get_orchestration_state(instance_id).serialized_custom_status == '"chunks"',
            what="the first chunk's custom status",
        )
        while True:
            step = raw.next()
            results = results_of(step)
            done = [complete(3, str(sum(results)))] if len(results) == 3 else []
            raw.stub.CompleteOrchestratorTask(step_answer(step, *done))
            if done:
                break
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.serialized_output == "9"  # 2 + 3 + 4


def test_a_chunk_out_of_order_is_refused_logged_and_its_step_handed_out_again(
    sidecar: Sidecar,
) -> None:
    with chunky_hub(sidecar) as (raw, c):
        instance_id = c.schedule_new_orchestration("chunky", instance_id="out-of-order\n1")
        first = raw.next()
        raw.stub.CompleteOrchestratorTask(
            step_answer(first, schedule(0, 1), isPartial=True, chunkIndex=0)
        )
        error = refused(
            lambda: raw.stub.CompleteOrchestratorTask(
                step_answer(first, schedule(1, 2), chunkIndex=2)
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "chunk 2" in (error.details() or "") and "chunk 1" in (error.details() or "")
        again = raw.next()
        assert again.orchestratorRequest.instanceId == instance_id
        events = [*again.orchestratorRequest.pastEvents, *again.orchestratorRequest.newEvents]
        assert any(e.HasField("executionStarted") for e in events)
        raw.stub.CompleteOrchestratorTask(step_answer(again, complete(0, '"whole"')))
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.serialized_output == '"whole"'
    refusals = [line for line in sidecar.log_text().splitlines() if "refused" in line]
    assert len(refusals) == 1, refusals
    assert "'out-of-order\\n1'" in refusals[0] and "chunk 2" in refusals[0]


def test_an_answer_that_asks_for_the_history_gets_the_step_again_with_it(
    sidecar: Sidecar,
) -> None:
    with chunky_hub(sidecar) as (raw, c):
        instance_id = c.schedule_new_orchestration("chunky", input="7")
        first = raw.next()
        raw.stub.CompleteOrchestratorTask(step_answer(first, requiresHistory=True))
        again = raw.next()
        assert again.orchestratorRequest.instanceId == instance_id
        events = [*again.orchestratorRequest.pastEvents, *again.orchestratorRequest.newEvents]
        assert any(e.HasField("executionStarted") for e in events)
        raw.stub.CompleteOrchestratorTask(step_answer(again, complete(0, '"with history"')))
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.serialized_output == '"with history"'
