"""RewindInstance through the official SDK: a failed orchestration runs again from its failure."""

from __future__ import annotations

import json
import pathlib
import threading
from typing import Any

import grpc
import pytest
from _harness import running_sidecar, sdk_client, sdk_worker
from durabletask import client, task

Status = client.OrchestrationStatus


def test_rewind_reruns_only_the_failed_steps_including_a_child(tmp_path: pathlib.Path) -> None:
    runs: dict[str, int] = {}
    lock = threading.Lock()
    broken = threading.Event()
    broken.set()

    def step(ctx: task.ActivityContext, name: str) -> str:
        with lock:
            runs[name] = runs.get(name, 0) + 1
        if name == "fragile" and broken.is_set():
            raise RuntimeError("not yet")
        return name

    def child(ctx: task.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(step, input="fragile"))

    def parent(ctx: task.OrchestrationContext, _: Any) -> Any:
        first = yield ctx.call_activity(step, input="solid")
        second = yield ctx.call_sub_orchestrator(child, instance_id=f"{ctx.instance_id}-kid")
        return [first, second]

    with running_sidecar(tmp_path) as sidecar, sdk_worker(sidecar.address, [parent, child], [step]):
        c = sdk_client(sidecar.address)
        instance_id = c.schedule_new_orchestration(parent)
        failed = c.wait_for_orchestration_completion(instance_id, timeout=30)
        assert failed is not None and failed.runtime_status == Status.FAILED
        broken.clear()
        c.rewind_orchestration(instance_id, reason="fixed the activity")
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state is not None and state.runtime_status == Status.COMPLETED
        assert json.loads(state.serialized_output) == ["solid", "fragile"]
        assert runs == {"solid": 1, "fragile": 2}  # the successful step was not run again
        kid = c.get_orchestration_state(f"{instance_id}-kid")
        assert kid is not None and kid.runtime_status == Status.COMPLETED


def test_only_a_failed_instance_can_be_rewound(tmp_path: pathlib.Path) -> None:
    def waits(ctx: task.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.wait_for_external_event("go"))

    with running_sidecar(tmp_path) as sidecar, sdk_worker(sidecar.address, [waits]):
        c = sdk_client(sidecar.address)
        instance_id = c.schedule_new_orchestration(waits)
        c.wait_for_orchestration_start(instance_id, timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            c.rewind_orchestration(instance_id)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "only a failed instance can be rewound" in info.value.details()
        state = c.get_orchestration_state(instance_id)
        assert state is not None and state.runtime_status == Status.RUNNING


def test_skip_graceful_termination_ends_instances_without_the_orchestrator(
    tmp_path: pathlib.Path,
) -> None:
    from durabletask.internal import orchestrator_service_pb2 as pb
    from durabletask.internal import orchestrator_service_pb2_grpc as stubs

    def waits(ctx: task.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.wait_for_external_event("go"))

    def parent(ctx: task.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_sub_orchestrator(waits, instance_id=f"{ctx.instance_id}-kid"))

    with running_sidecar(tmp_path) as sidecar, sdk_worker(sidecar.address, [waits, parent]):
        c = sdk_client(sidecar.address)
        top = c.schedule_new_orchestration(parent)
        kid = f"{top}-kid"
        c.wait_for_orchestration_start(kid, timeout=10)
        finished = c.schedule_new_orchestration(waits)
        c.wait_for_orchestration_start(finished, timeout=10)
        c.terminate_orchestration(finished)
        c.wait_for_orchestration_completion(finished, timeout=10)
        request = pb.SkipGracefulOrchestrationTerminationsRequest()
        request.instanceBatch.instanceIds.extend([kid, finished, "no-such-instance"])
        request.reason.value = '"forced"'
        with grpc.insecure_channel(sidecar.address) as channel:
            response = stubs.TaskHubSidecarServiceStub(
                channel
            ).SkipGracefulOrchestrationTerminations(request)
        assert list(response.unterminatedInstanceIds) == [finished, "no-such-instance"]
        state = c.get_orchestration_state(kid)
        assert state is not None and state.runtime_status == Status.TERMINATED
        assert state.serialized_output == '"forced"'
        # the parent hears of its child's end like any other
        parent_state = c.wait_for_orchestration_completion(top, timeout=10)
        assert parent_state is not None and parent_state.runtime_status == Status.FAILED
