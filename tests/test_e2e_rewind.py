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
