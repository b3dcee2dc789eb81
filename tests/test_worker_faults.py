"""Worker faults: a worker that dies holding work, and answers that come too late.

A worker process is SIGKILLed while it holds an activity or an orchestration step; the sidecar
notices the stream end at once and gives the item to another worker (dt-trio has no lease
timeout to wait for: a work item belongs to a stream for exactly as long as the stream lives).
A completion sent with the token of an item that was redelivered is refused and changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from _harness import Sidecar, sdk_client, sdk_worker, wait_until
from durabletask import client, task, worker
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs

# The same orchestrator and activity names as the doomed worker below registers.


def slow_step(ctx: task.ActivityContext, x: int) -> str:
    return f"done {x} by the survivor"


def stepper(ctx: task.OrchestrationContext, x: int) -> Any:
    return (yield ctx.call_activity(slow_step, input=x))


DOOMED = textwrap.dedent(
    """
    import pathlib, sys, time
    from durabletask import task, worker

    address, marker, hang_in = sys.argv[1:4]

    def slow_step(ctx, x):
        if hang_in == "activity":
            pathlib.Path(marker).write_text("holding the activity")
            time.sleep(600)
        return "done by the doomed worker"

    def stepper(ctx, x):
        if hang_in == "orchestrator":
            pathlib.Path(marker).write_text("holding the step")
            time.sleep(600)
        return (yield ctx.call_activity(slow_step, input=x))

    w = worker.TaskHubGrpcWorker(host_address=address)
    w.add_orchestrator(stepper)
    w.add_activity(slow_step)
    w.start()
    time.sleep(600)
    """
)


@pytest.mark.parametrize("hang_in", ["activity", "orchestrator"])
def test_work_held_by_a_killed_worker_goes_to_another_at_once(
    sidecar: Sidecar, tmp_path: pathlib.Path, hang_in: str
) -> None:
    marker = tmp_path / "holding"
    doomed = subprocess.Popen(
        [sys.executable, "-c", DOOMED, sidecar.address, str(marker), hang_in],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        c = sdk_client(sidecar.address)
        wait_until(lambda: "worker stream 1 connected" in sidecar.log_text(), what="the worker")
        instance_id = c.schedule_new_orchestration(stepper, input=7)
        wait_until(marker.exists, timeout=20, what=f"the doomed worker to hold the {hang_in}")
        with sdk_worker(sidecar.address, [stepper], [slow_step]):
            os.kill(doomed.pid, signal.SIGKILL)
            state = c.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state is not None
        assert state.runtime_status == client.OrchestrationStatus.COMPLETED
        assert state.serialized_output == '"done 7 by the survivor"'
        assert "1 work item(s) it held will be redelivered" in sidecar.log_text()
    finally:
        doomed.kill()
        doomed.wait(10)


@contextlib.contextmanager
def raw_worker(address: str, takes: str) -> Iterator[tuple[Any, Any]]:
    """A raw worker's stream that takes only the activities, or only the orchestrator steps
    (`takes`), which the test answers by hand, beside an SDK worker that takes the rest:
    yields (stub, stream)."""
    with grpc.insecure_channel(address) as channel:
        stub = stubs.TaskHubSidecarServiceStub(channel)
        raw = pb.GetWorkItemsRequest()
        rest = worker.TaskHubGrpcWorker(host_address=address)
        if takes == "activities":
            raw.workItemFilters.activities.add(name="slow_step")
            rest.add_orchestrator(stepper)
        else:
            raw.workItemFilters.orchestrations.add(name="stepper")
            rest.add_activity(slow_step)
        stream = stub.GetWorkItems(raw)
        rest.use_work_item_filters()
        rest.start()
        try:
            yield stub, stream
        finally:
            stream.cancel()
            rest.stop()


def items_of(stream: Any, kind: str) -> Iterator[Any]:
    return (item for item in stream if item.HasField(kind))


def test_a_late_completion_for_redelivered_work_is_refused_and_changes_nothing(
    sidecar: Sidecar,
) -> None:
    c = sdk_client(sidecar.address)
    with raw_worker(sidecar.address, "activities") as (stub, stream):
        instance_id = c.schedule_new_orchestration(stepper, input=1)
        token = next(items_of(stream, "activityRequest")).completionToken
        stream.cancel()  # the raw worker "dies" holding the activity
        with sdk_worker(sidecar.address, [stepper], [slow_step]):
            state = c.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state is not None and state.serialized_output == '"done 1 by the survivor"'
        late = pb.ActivityResponse(instanceId=instance_id, taskId=0, completionToken=token)
        late.result.value = '"from the dead"'
        with pytest.raises(grpc.RpcError) as info:
            stub.CompleteActivityTask(late)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "redelivered" in (info.value.details() or "")
    after = c.get_orchestration_state(instance_id)
    assert after is not None and after.serialized_output == '"done 1 by the survivor"'


def assert_refusal_logged(sidecar: Sidecar, instance_id: str, reason: str) -> None:
    """The refusal is logged once, with the instance and the reason (never silent)."""
    lines = [line for line in sidecar.log_text().splitlines() if "is refused" in line]
    assert len(lines) == 1, lines
    assert f"'{instance_id}'" in lines[0] and reason in lines[0], lines[0]


def test_an_activity_result_naming_another_task_is_refused_and_the_activity_runs_again(
    sidecar: Sidecar,
) -> None:
    c = sdk_client(sidecar.address)
    with raw_worker(sidecar.address, "activities") as (stub, stream):
        instance_id = c.schedule_new_orchestration(stepper, input=2)
        items = items_of(stream, "activityRequest")
        first = next(items)
        task_id = first.activityRequest.taskId
        wrong = pb.ActivityResponse(
            instanceId=instance_id, taskId=task_id + 5, completionToken=first.completionToken
        )
        wrong.result.value = '"for another task"'
        with pytest.raises(grpc.RpcError) as info:
            stub.CompleteActivityTask(wrong)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details() or ""
        assert f"task {task_id + 5}" in details and f"task {task_id}" in details
        assert_refusal_logged(sidecar, instance_id, f"task {task_id + 5}")
        # Nothing is lost: the activity is handed out again, and its right answer counts.
        again = next(items)
        assert again.activityRequest.taskId == task_id
        right = pb.ActivityResponse(
            instanceId=instance_id, taskId=task_id, completionToken=again.completionToken
        )
        right.result.value = '"done 2 by hand"'
        stub.CompleteActivityTask(right)
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.serialized_output == '"done 2 by hand"'


def test_an_orchestrator_answer_naming_another_instance_is_refused_and_the_step_runs_again(
    sidecar: Sidecar,
) -> None:
    c = sdk_client(sidecar.address)
    with raw_worker(sidecar.address, "orchestrations") as (stub, stream):
        instance_id = c.schedule_new_orchestration(stepper, input=3)
        steps = items_of(stream, "orchestratorRequest")
        first = next(steps)
        wrong = pb.OrchestratorResponse(
            instanceId="someone-else", completionToken=first.completionToken
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.CompleteOrchestratorTask(wrong)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details() or ""
        assert "'someone-else'" in details and f"'{instance_id}'" in details
        assert_refusal_logged(sidecar, instance_id, "'someone-else'")
        # Nothing is lost: the step is handed out again, and its right answer counts.
        again = next(steps)
        assert again.orchestratorRequest.instanceId == instance_id
        right = pb.OrchestratorResponse(
            instanceId=instance_id, completionToken=again.completionToken
        )
        done = right.actions.add(id=0).completeOrchestration
        done.orchestrationStatus = pb.ORCHESTRATION_STATUS_COMPLETED
        done.result.value = '"done 3 by hand"'
        stub.CompleteOrchestratorTask(right)
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.serialized_output == '"done 3 by hand"'
