"""Queries, listing and bulk purges through the official SDK (and raw stubs where it has none)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from _harness import Sidecar, running_sidecar, sdk_client, sdk_worker
from durabletask import client, task
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs

Status = client.OrchestrationStatus


def quick(ctx: task.OrchestrationContext, n: int) -> Any:
    return n


def waits(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("go"))


def parent(ctx: task.OrchestrationContext, n: int) -> Any:
    return (yield ctx.call_sub_orchestrator(quick, input=n))


@pytest.fixture
def hub(tmp_path: pathlib.Path) -> Iterator[tuple[Sidecar, client.TaskHubGrpcClient, Any]]:
    with running_sidecar(tmp_path) as sidecar, sdk_worker(sidecar.address, [quick, waits, parent]):
        with grpc.insecure_channel(sidecar.address) as channel:
            yield sidecar, sdk_client(sidecar.address), stubs.TaskHubSidecarServiceStub(channel)


def finish(c: client.TaskHubGrpcClient, orchestrator: Any, instance_id: str, n: int = 0) -> None:
    c.schedule_new_orchestration(orchestrator, input=n, instance_id=instance_id)
    state = c.wait_for_orchestration_completion(instance_id, timeout=20)
    assert state is not None and state.runtime_status == Status.COMPLETED


def start(c: client.TaskHubGrpcClient, instance_id: str) -> None:
    c.schedule_new_orchestration(waits, instance_id=instance_id)
    c.wait_for_orchestration_start(instance_id, timeout=20)


def test_query_filters_by_status_prefix_and_created_time(hub: Any) -> None:
    _, c, _ = hub
    for i in range(3):
        finish(c, quick, f"done-{i}", i)
    start(c, "busy-0")
    midway = datetime.now(UTC)
    finish(c, quick, "done-late")

    def ids(**kw: Any) -> set[str]:
        return {
            s.instance_id for s in c.get_all_orchestration_states(client.OrchestrationQuery(**kw))
        }

    assert ids(runtime_status=[Status.COMPLETED]) == {"done-0", "done-1", "done-2", "done-late"}
    assert ids(runtime_status=[Status.RUNNING]) == {"busy-0"}
    assert ids(instance_id_prefix="done-") == {"done-0", "done-1", "done-2", "done-late"}
    assert ids(instance_id_prefix="busy") == {"busy-0"}
    assert ids(created_time_from=midway) == {"done-late"}
    assert ids(created_time_to=midway) == {"done-0", "done-1", "done-2", "busy-0"}


def test_query_returns_payloads_only_when_asked(hub: Any) -> None:
    _, c, _ = hub
    finish(c, quick, "payload-1", 42)
    (bare,) = c.get_all_orchestration_states(
        client.OrchestrationQuery(instance_id_prefix="payload")
    )
    assert bare.serialized_input is None and bare.serialized_output is None
    (full,) = c.get_all_orchestration_states(
        client.OrchestrationQuery(instance_id_prefix="payload", fetch_inputs_and_outputs=True)
    )
    assert full.serialized_input == "42" and full.serialized_output == "42"


def test_query_pages_are_stable_while_instances_are_added(hub: Any) -> None:
    _, c, stub = hub
    for i in range(7):
        finish(c, quick, f"page-{i}")
    seen: list[str] = []
    token: str | None = None
    while True:
        query = pb.InstanceQuery(maxInstanceCount=3, instanceIdPrefix=None)
        query.instanceIdPrefix.value = "page-"
        if token:
            query.continuationToken.value = token
        response = stub.QueryInstances(pb.QueryInstancesRequest(query=query))
        seen += [s.instanceId for s in response.orchestrationState]
        assert len(response.orchestrationState) <= 3
        if not response.HasField("continuationToken"):
            break
        token = response.continuationToken.value
        finish(c, quick, f"page-new-{len(seen)}")  # inserts between pages must not upset paging
    originals = [f"page-{i}" for i in range(7)]
    assert [i for i in seen if i in originals] == originals  # each once, in creation order
    assert len(seen) == len(set(seen))


def test_sdk_query_follows_continuation_tokens_past_the_page_limit(hub: Any) -> None:
    _, c, _ = hub
    for i in range(5):
        finish(c, quick, f"many-{i}")
    states = c.get_all_orchestration_states(
        client.OrchestrationQuery(instance_id_prefix="many-", max_instance_count=2)
    )
    assert sorted(s.instance_id for s in states) == [f"many-{i}" for i in range(5)]


def test_a_bogus_continuation_token_is_invalid_argument(hub: Any) -> None:
    _, _, stub = hub
    query = pb.InstanceQuery()
    query.continuationToken.value = "not-a-token"
    with pytest.raises(grpc.RpcError) as info:
        stub.QueryInstances(pb.QueryInstancesRequest(query=query))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "continuation token" in info.value.details()


def test_list_instance_ids_pages_finished_instances_by_completion_time(hub: Any) -> None:
    _, c, _ = hub
    for i in range(5):
        finish(c, quick, f"list-{i}")
    start(c, "list-running")
    collected: list[str] = []
    token = None
    while True:
        page = c.list_instance_ids(page_size=2, continuation_token=token)
        assert len(page.items) <= 2
        collected += page.items
        token = page.continuation_token
        if not token:
            break
    assert collected == [f"list-{i}" for i in range(5)]
    window = c.list_instance_ids(
        runtime_status=[Status.COMPLETED],
        completed_time_from=datetime.now(UTC) - timedelta(minutes=5),
    )
    assert set(window.items) == {f"list-{i}" for i in range(5)}
    assert c.list_instance_ids(runtime_status=[Status.FAILED]).items == []


def test_purge_by_filter_keeps_running_instances_and_follows_children(hub: Any) -> None:
    _, c, _ = hub
    finish(c, parent, "fam-1", 3)
    finish(c, quick, "solo-1")
    start(c, "alive-1")
    result = c.purge_orchestrations_by(runtime_status=[Status.COMPLETED], recursive=True)
    # fam-1, its child and solo-1; the running instance stays
    assert result.deleted_instance_count == 3
    assert c.get_orchestration_state("fam-1") is None
    assert c.get_orchestration_state("solo-1") is None
    assert c.get_orchestration_state("alive-1") is not None
    assert c.get_all_orchestration_states() != []


def test_purge_by_created_time_window(hub: Any) -> None:
    _, c, _ = hub
    finish(c, quick, "old-1")
    cut = datetime.now(UTC)
    finish(c, quick, "new-1")
    assert c.purge_orchestrations_by(created_time_to=cut).deleted_instance_count == 1
    assert c.get_orchestration_state("old-1") is None
    assert c.get_orchestration_state("new-1") is not None


def test_purge_by_instance_batch(hub: Any) -> None:
    _, c, stub = hub
    for i in range(3):
        finish(c, quick, f"batch-{i}")
    request = pb.PurgeInstancesRequest(
        instanceBatch=pb.InstanceBatch(instanceIds=["batch-0", "batch-2"])
    )
    response = stub.PurgeInstances(request)
    assert response.deletedInstanceCount == 2 and response.isComplete.value is True
    assert c.get_orchestration_state("batch-1") is not None


def test_delete_task_hub_empties_the_store_and_recreate_does_too(hub: Any) -> None:
    _, c, stub = hub
    finish(c, quick, "gone-1")
    stub.DeleteTaskHub(pb.DeleteTaskHubRequest())
    assert c.get_orchestration_state("gone-1") is None
    finish(c, quick, "gone-2")
    stub.CreateTaskHub(pb.CreateTaskHubRequest(recreateIfExists=False))
    assert c.get_orchestration_state("gone-2") is not None
    stub.CreateTaskHub(pb.CreateTaskHubRequest(recreateIfExists=True))
    assert c.get_orchestration_state("gone-2") is None
    finish(c, quick, "after-1")  # the hub still works
