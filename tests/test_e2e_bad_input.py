"""Bad input over gRPC: every call gets a clear status, the sidecar keeps serving, state holds."""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from _harness import Sidecar, running_sidecar, sdk_client, sdk_worker, wait_until
from durabletask import client, entities, history, task
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs


def waits(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("go"))


def hello(ctx: task.OrchestrationContext, name: str) -> Any:
    return f"hello {name}"


def echo(ctx: task.ActivityContext, value: str) -> str:
    return value


def passes_on(ctx: task.OrchestrationContext, value: str) -> Any:
    return (yield ctx.call_activity(echo, input=value))


def hoard(ctx: entities.EntityContext, size: int) -> None:
    ctx.set_state("x" * size)


# More than a worker receives (gRPC's default limit, 4 MiB), less than the sidecar accepts.
TOO_LARGE_FOR_A_WORKER = "x" * (5 * 1024 * 1024)
# What dt-trio answers in place of a payload too large for an answer.
LEFT_OUT = re.compile(r"^\[dt-trio left out \d+ bytes here:")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sidecar, Any]]:
    tmp: pathlib.Path = tmp_path_factory.mktemp("bad")
    with (
        running_sidecar(tmp) as sidecar,
        sdk_worker(sidecar.address, [waits, hello, passes_on], [echo], [hoard]),
    ):
        with grpc.insecure_channel(sidecar.address) as channel:
            yield sidecar, stubs.TaskHubSidecarServiceStub(channel)


@pytest.fixture
def stub(hub: tuple[Sidecar, Any]) -> Any:
    return hub[1]


@pytest.fixture
def c(hub: tuple[Sidecar, Any]) -> client.TaskHubGrpcClient:
    return sdk_client(hub[0].address)


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@pytest.fixture(autouse=True)
def still_serving(hub: tuple[Sidecar, Any]) -> Iterator[None]:
    """After each bad call, a real orchestration still completes."""
    yield
    c = sdk_client(hub[0].address)
    instance_id = c.schedule_new_orchestration(hello, input="after")
    state = c.wait_for_orchestration_completion(instance_id, timeout=20)
    assert state is not None and json.loads(state.serialized_output) == "hello after"


def test_get_of_an_unknown_instance_does_not_exist(c: client.TaskHubGrpcClient, stub: Any) -> None:
    assert c.get_orchestration_state("nobody-home") is None
    assert stub.GetInstance(pb.GetInstanceRequest(instanceId="nobody-home")).exists is False


@pytest.mark.parametrize(
    "rpc,request_",
    [
        ("RaiseEvent", pb.RaiseEventRequest(instanceId="ghost", name="x")),
        ("TerminateInstance", pb.TerminateRequest(instanceId="ghost")),
        ("SuspendInstance", pb.SuspendRequest(instanceId="ghost")),
        ("ResumeInstance", pb.ResumeRequest(instanceId="ghost")),
        ("RestartInstance", pb.RestartInstanceRequest(instanceId="ghost")),
        ("RewindInstance", pb.RewindInstanceRequest(instanceId="ghost")),
    ],
)
def test_operations_on_an_unknown_instance_are_not_found(
    stub: Any, rpc: str, request_: Any
) -> None:
    code, details = status_of(lambda: getattr(stub, rpc)(request_))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "'ghost'" in details


def test_starting_an_id_that_is_still_running_is_already_exists(
    c: client.TaskHubGrpcClient, stub: Any
) -> None:
    c.schedule_new_orchestration(waits, instance_id="busy-1", input="first")
    c.wait_for_orchestration_start("busy-1", timeout=10)
    code, details = status_of(
        lambda: c.schedule_new_orchestration(waits, instance_id="busy-1", input="second")
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert "'busy-1'" in details and "running" in details
    state = c.get_orchestration_state("busy-1")
    assert state is not None and json.loads(state.serialized_input) == "first"
    c.terminate_orchestration("busy-1")


@pytest.mark.parametrize(
    "request_,fragment",
    [
        (pb.CreateInstanceRequest(name=""), "name"),
        (pb.GetInstanceRequest(instanceId=""), "instanceId"),
        (pb.RaiseEventRequest(instanceId="x", name=""), "event name"),
    ],
)
def test_empty_required_fields_are_invalid_argument(
    stub: Any, request_: Any, fragment: str
) -> None:
    rpc = {
        pb.CreateInstanceRequest: stub.StartInstance,
        pb.GetInstanceRequest: stub.GetInstance,
        pb.RaiseEventRequest: stub.RaiseEvent,
    }[type(request_)]
    code, details = status_of(lambda: rpc(request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in details


@pytest.mark.parametrize("seconds,nanos", [(10**13, 0), (-(10**13), 0), (0, 2_000_000_000)])
def test_malformed_scheduled_start_is_invalid_argument_and_creates_nothing(
    stub: Any, c: client.TaskHubGrpcClient, seconds: int, nanos: int
) -> None:
    request = pb.CreateInstanceRequest(instanceId=f"badtime-{seconds}-{nanos}", name="hello")
    request.scheduledStartTimestamp.seconds = seconds
    request.scheduledStartTimestamp.nanos = nanos
    code, details = status_of(lambda: stub.StartInstance(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "scheduledStartTimestamp" in details
    assert c.get_orchestration_state(request.instanceId) is None


@pytest.mark.parametrize(
    "rpc,request_",
    [
        ("CompleteActivityTask", pb.ActivityResponse(instanceId="x", completionToken="bogus")),
        ("CompleteOrchestratorTask", pb.OrchestratorResponse(instanceId="x", completionToken="b")),
        ("AbandonTaskActivityWorkItem", pb.AbandonActivityTaskRequest(completionToken="bogus")),
        (
            "AbandonTaskOrchestratorWorkItem",
            pb.AbandonOrchestrationTaskRequest(completionToken="bogus"),
        ),
    ],
)
def test_unknown_completion_tokens_are_not_found(stub: Any, rpc: str, request_: Any) -> None:
    code, details = status_of(lambda: getattr(stub, rpc)(request_))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "completion token" in details


def test_an_answer_without_a_token_that_names_no_waiting_work_is_not_found(stub: Any) -> None:
    # Matched by what it names, as durabletask-go's worker answers (tests/test_e2e_generations.py)
    answer = pb.ActivityResponse(instanceId="nobody", taskId=3)
    code, details = status_of(lambda: stub.CompleteActivityTask(answer))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "activity 3 of instance 'nobody'" in details


@pytest.mark.parametrize(
    ("rpc", "request_"),
    [
        ("AbandonTaskActivityWorkItem", pb.AbandonActivityTaskRequest()),
        ("CompleteEntityTask", pb.EntityBatchResult()),  # it names no entity
    ],
)
def test_a_request_that_only_a_token_can_match_needs_one(
    stub: Any, rpc: str, request_: Any
) -> None:
    code, details = status_of(lambda: getattr(stub, rpc)(request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "completionToken is empty" in details


def test_restarting_a_running_instance_is_failed_precondition(
    c: client.TaskHubGrpcClient, stub: Any
) -> None:
    c.schedule_new_orchestration(waits, instance_id="restart-busy")
    c.wait_for_orchestration_start("restart-busy", timeout=10)
    code, details = status_of(
        lambda: stub.RestartInstance(pb.RestartInstanceRequest(instanceId="restart-busy"))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "running" in details
    c.terminate_orchestration("restart-busy")


def test_a_terminated_instance_ignores_later_events(c: client.TaskHubGrpcClient) -> None:
    instance_id = c.schedule_new_orchestration(waits)
    c.wait_for_orchestration_start(instance_id, timeout=10)
    c.terminate_orchestration(instance_id, output="done")
    c.wait_for_orchestration_completion(instance_id, timeout=10)
    c.raise_orchestration_event(instance_id, "go", data="too late")
    c.suspend_orchestration(instance_id)
    state = c.get_orchestration_state(instance_id)
    assert state is not None
    assert state.runtime_status == client.OrchestrationStatus.TERMINATED
    assert json.loads(state.serialized_output) == "done"


def test_an_id_reuse_policy_decides_which_statuses_may_be_replaced(
    c: client.TaskHubGrpcClient,
) -> None:
    only_failed = pb.OrchestrationIdReusePolicy(replaceableStatus=[pb.ORCHESTRATION_STATUS_FAILED])
    instance_id = c.schedule_new_orchestration(hello, input="one", instance_id="reuse-1")
    c.wait_for_orchestration_completion(instance_id, timeout=20)
    code, details = status_of(
        lambda: c.schedule_new_orchestration(
            hello, input="two", instance_id="reuse-1", reuse_id_policy=only_failed
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and "completed" in details
    running_ok = pb.OrchestrationIdReusePolicy(
        replaceableStatus=[pb.ORCHESTRATION_STATUS_RUNNING, pb.ORCHESTRATION_STATUS_COMPLETED]
    )
    c.schedule_new_orchestration(waits, instance_id="reuse-2")
    c.wait_for_orchestration_start("reuse-2", timeout=10)
    c.schedule_new_orchestration(
        hello, input="new", instance_id="reuse-2", reuse_id_policy=running_ok
    )
    state = c.wait_for_orchestration_completion("reuse-2", timeout=20)
    assert state is not None and json.loads(state.serialized_output) == "hello new"


@pytest.mark.parametrize("orchestrator", [hello, passes_on], ids=["orchestration", "activity"])
def test_a_work_item_too_large_for_a_worker_fails_and_the_worker_serves_on(
    hub: tuple[Sidecar, Any], c: client.TaskHubGrpcClient, orchestrator: Any
) -> None:
    # Sent, it would end the worker's stream (and every item it holds) again and again.
    instance_id = c.schedule_new_orchestration(orchestrator, input=TOO_LARGE_FOR_A_WORKER)
    done = c.wait_for_orchestration_completion(instance_id, fetch_payloads=False, timeout=30)
    assert done is not None and done.runtime_status == client.OrchestrationStatus.FAILED
    # The failure comes with the payloads, the input among them: read by a client that
    # takes messages over gRPC's default 4 MiB.
    options = [("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(hub[0].address, options=options) as channel:
        state = client.TaskHubGrpcClient(channel=channel).get_orchestration_state(instance_id)
    assert state is not None and state.failure_details is not None
    assert state.failure_details.error_type == "WorkItemTooLargeError"
    assert "bytes a worker receives" in state.failure_details.message


def test_an_answer_never_exceeds_what_a_client_receives(c: client.TaskHubGrpcClient) -> None:
    """The user learns why an orchestration with an oversized input failed: the answers carry
    the failure, with the input replaced by a marker, instead of failing in the client
    (RESOURCE_EXHAUSTED: over the SDK's 4 MiB limit)."""
    instance_id = c.schedule_new_orchestration(hello, input=TOO_LARGE_FOR_A_WORKER)
    state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.runtime_status == client.OrchestrationStatus.FAILED
    assert state.failure_details is not None
    assert state.failure_details.error_type == "WorkItemTooLargeError"
    assert LEFT_OUT.match(state.serialized_input), state.serialized_input[:100]
    again = c.get_orchestration_state(instance_id)
    assert again is not None and LEFT_OUT.match(again.serialized_input)
    events = c.get_orchestration_history(instance_id)
    started = [e for e in events if isinstance(e, history.ExecutionStartedEvent)]
    assert len(started) == 1 and LEFT_OUT.match(started[0].input)


def test_query_pages_end_before_what_a_client_receives(c: client.TaskHubGrpcClient) -> None:
    """Three instances of 1.5 MB inputs make a 4.5 MB page: it is cut short and continued."""
    ids = [
        c.schedule_new_orchestration(waits, input="y" * 1_500_000, instance_id=f"big-page-{i}")
        for i in range(3)
    ]
    query = client.OrchestrationQuery(instance_id_prefix="big-page-", fetch_inputs_and_outputs=True)
    states = c.get_all_orchestration_states(query)
    assert [s.instance_id for s in states] == ids
    assert all(json.loads(s.serialized_input) == "y" * 1_500_000 for s in states)
    for instance_id in ids:
        c.terminate_orchestration(instance_id)


def test_an_entity_state_too_large_for_an_answer_is_left_out(c: client.TaskHubGrpcClient) -> None:
    entity = entities.EntityInstanceId("hoard", "big")
    c.signal_entity(entity, "fill", 5 * 1024 * 1024)
    wait_until(lambda: c.get_entity(entity, include_state=False) is not None, what="the state")
    metadata = c.get_entity(entity)
    assert metadata is not None and LEFT_OUT.match(metadata.get_state())
    found = c.get_all_entities(client.EntityQuery(instance_id_starts_with="@hoard@"))
    assert [e.id for e in found] == [entity] and LEFT_OUT.match(found[0].get_state())
