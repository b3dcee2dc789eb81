"""End to end: durable entities of the official Python SDK on a dt-trio sidecar.

One sidecar and one SDK worker serve the module; every test uses entity keys and instance ids
of its own.
"""

from __future__ import annotations

import pathlib
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from _harness import Sidecar, running_sidecar, sdk_client, sdk_worker, wait_until
from durabletask import client, entities, task
from durabletask.internal import orchestrator_service_pb2 as sdk_pb
from durabletask.internal import orchestrator_service_pb2_grpc as sdk_grpc

OrchestrationStatus = client.OrchestrationStatus
EntityInstanceId = entities.EntityInstanceId


# -- entities ------------------------------------------------------------------------------------


def counter(ctx: entities.EntityContext, value: Any) -> Any:
    current = ctx.get_state(int, 0)
    if ctx.operation == "add":
        ctx.set_state(current + value)
    elif ctx.operation == "set":
        ctx.set_state(value)
    elif ctx.operation == "get":
        return current
    elif ctx.operation == "fail_after_add":
        ctx.set_state(current + 1000)
        raise ValueError("the counter refuses")
    elif ctx.operation == "delete":
        ctx.set_state(None)
    elif ctx.operation == "forward":
        # `value` names another counter: pass one on to it
        ctx.signal_entity(EntityInstanceId("counter", value), "add", 1)
    elif ctx.operation == "start_greeter":
        ctx.schedule_new_orchestration("greeter", input=value, instance_id=value)
    return None


class Account(entities.DurableEntity):
    def deposit(self, amount: int) -> int:
        balance = self.get_state(int, 0) + amount
        self.set_state(balance)
        return balance

    def balance(self, _: Any = None) -> int:
        return self.get_state(int, 0)


# -- orchestrators -------------------------------------------------------------------------------


def greeter(ctx: task.OrchestrationContext, name: str) -> Any:
    return f"hello {name}"


def call_counter(ctx: task.OrchestrationContext, key: str) -> Any:
    target = EntityInstanceId("counter", key)
    yield ctx.call_entity(target, "add", 5)
    return (yield ctx.call_entity(target, "get"))


def bank(ctx: task.OrchestrationContext, key: str) -> Any:
    account = EntityInstanceId("Account", key)
    first = yield ctx.call_entity(account, "deposit", 10)
    second = yield ctx.call_entity(account, "deposit", 32)
    return [first, second, (yield ctx.call_entity(account, "balance"))]


def catch_failure(ctx: task.OrchestrationContext, key: str) -> Any:
    target = EntityInstanceId("counter", key)
    try:
        yield ctx.call_entity(target, "fail_after_add")
    except task.TaskFailedError as exc:
        return {"caught": str(exc), "state": (yield ctx.call_entity(target, "get"))}
    return "not caught"


def let_it_fail(ctx: task.OrchestrationContext, key: str) -> Any:
    yield ctx.call_entity(EntityInstanceId("counter", key), "fail_after_add")


def increment_under_lock(ctx: task.OrchestrationContext, key: str) -> Any:
    """Read, wait for a go-ahead, write back: a lost update unless the lock keeps others out."""
    target = EntityInstanceId("counter", key)
    with (yield ctx.lock_entities([target])):
        value = yield ctx.call_entity(target, "get")
        yield ctx.wait_for_external_event("go")
        yield ctx.call_entity(target, "set", value + 1)
    return value


def hold_lock(ctx: task.OrchestrationContext, key: str) -> Any:
    target = EntityInstanceId("counter", key)
    with (yield ctx.lock_entities([target])):
        yield ctx.wait_for_external_event("never")


def transfer(ctx: task.OrchestrationContext, keys: list[str]) -> Any:
    a, b = (EntityInstanceId("counter", k) for k in keys)
    with (yield ctx.lock_entities([a, b])):
        yield ctx.call_entity(a, "add", -1)
        yield ctx.call_entity(b, "add", 1)
    return "moved"


def signal_later(ctx: task.OrchestrationContext, key: str) -> Any:
    ctx.signal_entity(
        EntityInstanceId("counter", key),
        "add",
        input=7,
        signal_time=ctx.current_utc_datetime + timedelta(seconds=1.5),
    )
    return "signalled"


ORCHESTRATORS: list[Callable[..., Any]] = [
    greeter,
    call_counter,
    bank,
    catch_failure,
    let_it_fail,
    increment_under_lock,
    hold_lock,
    transfer,
    signal_later,
]


@pytest.fixture(scope="module")
def hub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Sidecar, client.TaskHubGrpcClient]]:
    tmp: pathlib.Path = tmp_path_factory.mktemp("entities")
    with (
        running_sidecar(tmp) as sidecar,
        sdk_worker(sidecar.address, ORCHESTRATORS, entities=[counter, Account]),
    ):
        yield sidecar, sdk_client(sidecar.address)


@pytest.fixture
def c(hub: tuple[Sidecar, client.TaskHubGrpcClient]) -> client.TaskHubGrpcClient:
    return hub[1]


def key() -> str:
    return uuid.uuid4().hex[:12]


def run(c: client.TaskHubGrpcClient, orchestrator: Any, input: Any = None) -> Any:
    instance_id = c.schedule_new_orchestration(orchestrator, input=input)
    state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None
    return state


def state_of(c: client.TaskHubGrpcClient, entity: EntityInstanceId) -> Any:
    metadata = c.get_entity(entity, include_state=True)
    return None if metadata is None else metadata.get_state(int)


def settled(c: client.TaskHubGrpcClient, entity: EntityInstanceId, expected: Any) -> None:
    wait_until(lambda: state_of(c, entity) == expected, timeout=15, what=f"{entity} == {expected}")


# -- signals and reads ---------------------------------------------------------------------------


def test_signals_from_the_client_update_the_state_in_order(c: client.TaskHubGrpcClient) -> None:
    entity = EntityInstanceId("counter", key())
    c.signal_entity(entity, "set", 100)
    for n in range(1, 6):
        c.signal_entity(entity, "add", n)
    settled(c, entity, 115)
    metadata = c.get_entity(entity, include_state=False)
    assert metadata is not None
    assert metadata.id == entity
    assert metadata.backlog_queue_size == 0
    assert metadata.get_locked_by() is None
    assert metadata.last_modified <= datetime.now(UTC)
    assert not metadata.includes_state


def test_an_unknown_entity_does_not_exist(c: client.TaskHubGrpcClient) -> None:
    assert c.get_entity(EntityInstanceId("counter", key())) is None


def test_an_entity_whose_state_is_deleted_no_longer_exists(c: client.TaskHubGrpcClient) -> None:
    entity = EntityInstanceId("counter", key())
    c.signal_entity(entity, "add", 1)
    settled(c, entity, 1)
    c.signal_entity(entity, "delete")
    wait_until(lambda: c.get_entity(entity) is None, what="the entity to be deleted")


def test_a_delayed_signal_waits_for_its_time(c: client.TaskHubGrpcClient) -> None:
    entity = EntityInstanceId("counter", key())
    sent = time.monotonic()
    c.signal_entity(entity, "add", 3, signal_time=datetime.now(UTC) + timedelta(seconds=1.5))
    c.signal_entity(entity, "add", 1)
    settled(c, entity, 1)
    settled(c, entity, 4)
    assert time.monotonic() - sent >= 1.4


def test_a_delayed_signal_from_an_orchestration_waits_for_its_time(
    c: client.TaskHubGrpcClient,
) -> None:
    k = key()
    sent = time.monotonic()
    assert run(c, signal_later, k).runtime_status == OrchestrationStatus.COMPLETED
    assert state_of(c, EntityInstanceId("counter", k)) is None
    settled(c, EntityInstanceId("counter", k), 7)
    assert time.monotonic() - sent >= 1.4


def test_an_entity_signals_another_entity(c: client.TaskHubGrpcClient) -> None:
    source, target = key(), key()
    c.signal_entity(EntityInstanceId("counter", source), "forward", target)
    settled(c, EntityInstanceId("counter", target), 1)


def test_an_entity_starts_an_orchestration(c: client.TaskHubGrpcClient) -> None:
    instance_id = f"greet-{key()}"
    c.signal_entity(EntityInstanceId("counter", key()), "start_greeter", instance_id)
    wait_until(lambda: c.get_orchestration_state(instance_id) is not None, what="the start")
    state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.serialized_output == f'"hello {instance_id}"'


# -- calls from orchestrations -------------------------------------------------------------------


def test_an_orchestration_calls_an_entity_and_gets_its_result(
    c: client.TaskHubGrpcClient,
) -> None:
    k = key()
    state = run(c, call_counter, k)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.serialized_output == "5"
    assert state_of(c, EntityInstanceId("counter", k)) == 5


def test_a_class_based_entity_answers_its_methods(c: client.TaskHubGrpcClient) -> None:
    k = key()
    state = run(c, bank, k)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.serialized_output == "[10, 42, 42]"
    assert state_of(c, EntityInstanceId("account", k)) == 42


def test_a_failed_operation_rolls_back_and_reaches_the_caller(
    c: client.TaskHubGrpcClient,
) -> None:
    k = key()
    c.signal_entity(EntityInstanceId("counter", k), "add", 2)
    state = run(c, catch_failure, k)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    output = state.serialized_output
    assert "the counter refuses" in output
    assert '"state": 2' in output  # the +1000 of the failed operation was rolled back


def test_an_uncaught_operation_failure_fails_the_orchestration(
    c: client.TaskHubGrpcClient,
) -> None:
    state = run(c, let_it_fail, key())
    assert state.runtime_status == OrchestrationStatus.FAILED
    assert state.failure_details is not None
    assert "the counter refuses" in state.failure_details.message


# -- locks ---------------------------------------------------------------------------------------


def test_a_lock_keeps_other_operations_out_of_the_critical_section(
    c: client.TaskHubGrpcClient, stub: Any
) -> None:
    k = key()
    entity = EntityInstanceId("counter", k)
    instance_id = c.schedule_new_orchestration(increment_under_lock, input=k)
    wait_until(lambda: _transient_lock(stub, k) == instance_id, what="the lock to be taken")
    assert c.get_entity(entity) is None  # locked but stateless: transient, not existing
    c.signal_entity(entity, "add", 10)  # must wait for the critical section to end
    wait_until(lambda: _backlog(stub, k) == 1, what="the signal to queue behind the lock")
    c.raise_orchestration_event(instance_id, "go")
    state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
    settled(c, entity, 11)  # set(0 + 1) in the section, then the +10: no lost update


def _row(stub: Any, k: str) -> Any:
    """The entity's metadata, transient or not, as the sidecar sends it. (The SDK's
    EntityMetadata.get_locked_by() expects an entity id; lockedBy names the orchestration that
    holds the lock, as in the .NET SDK.)"""
    query = sdk_pb.EntityQuery(includeTransient=True)
    query.instanceIdStartsWith.value = f"@counter@{k}"
    found = stub.QueryEntities(sdk_pb.QueryEntitiesRequest(query=query)).entities
    return found[0] if found else None


def _transient_lock(stub: Any, k: str) -> Any:
    row = _row(stub, k)
    return None if row is None or not row.HasField("lockedBy") else row.lockedBy.value


def _backlog(stub: Any, k: str) -> Any:
    row = _row(stub, k)
    return None if row is None else row.backlogQueueSize


def test_critical_sections_over_the_same_entities_do_not_deadlock(
    c: client.TaskHubGrpcClient,
) -> None:
    a, b = key(), key()
    c.signal_entity(EntityInstanceId("counter", a), "set", 10)
    c.signal_entity(EntityInstanceId("counter", b), "set", 10)
    ids = [
        c.schedule_new_orchestration(transfer, input=[a, b] if n % 2 else [b, a]) for n in range(6)
    ]
    for instance_id in ids:
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
    # Three transfers each way: the sum is kept and every operation ran exactly once.
    assert state_of(c, EntityInstanceId("counter", a)) == 10
    assert state_of(c, EntityInstanceId("counter", b)) == 10


def test_terminating_an_orchestration_releases_its_locks(
    c: client.TaskHubGrpcClient, stub: Any
) -> None:
    k = key()
    instance_id = c.schedule_new_orchestration(hold_lock, input=k)
    wait_until(lambda: _transient_lock(stub, k) == instance_id, what="the lock to be taken")
    c.signal_entity(EntityInstanceId("counter", k), "add", 1)
    c.terminate_orchestration(instance_id)
    state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.runtime_status == OrchestrationStatus.TERMINATED
    settled(c, EntityInstanceId("counter", k), 1)
    assert _transient_lock(stub, k) is None


# -- queries and cleaning ------------------------------------------------------------------------


def test_query_entities_filters_by_prefix_and_pages(c: client.TaskHubGrpcClient) -> None:
    prefix = key()
    for n in range(5):
        c.signal_entity(EntityInstanceId("counter", f"{prefix}-{n}"), "set", n)
    for n in range(5):
        settled(c, EntityInstanceId("counter", f"{prefix}-{n}"), n)
    query = client.EntityQuery(
        instance_id_starts_with=f"@counter@{prefix}", include_state=True, page_size=2
    )
    found = c.get_all_entities(query)
    assert [str(m.id) for m in found] == [f"@counter@{prefix}-{n}" for n in range(5)]
    assert [m.get_state(int) for m in found] == list(range(5))
    bare = c.get_all_entities(
        client.EntityQuery(instance_id_starts_with="Counter@" + prefix, include_state=False)
    )
    assert len(bare) == 5 and not any(m.includes_state for m in bare)
    later = client.EntityQuery(
        instance_id_starts_with=f"@counter@{prefix}",
        last_modified_from=datetime.now(UTC) + timedelta(hours=1),
    )
    assert c.get_all_entities(later) == []


def test_clean_entity_storage_reports_what_it_did(c: client.TaskHubGrpcClient) -> None:
    result = c.clean_entity_storage()
    assert result.empty_entities_removed == 0
    assert result.orphaned_locks_released == 0


# -- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def stub(hub: tuple[Sidecar, client.TaskHubGrpcClient]) -> Iterator[Any]:
    with grpc.insecure_channel(hub[0].address) as channel:
        yield sdk_grpc.TaskHubSidecarServiceStub(channel)


@pytest.mark.parametrize(
    ("rpc", "request_", "words"),
    [
        ("SignalEntity", sdk_pb.SignalEntityRequest(instanceId="counter", name="add"), "entity id"),
        ("SignalEntity", sdk_pb.SignalEntityRequest(instanceId="@counter@k"), "name"),
        (
            "SignalEntity",
            sdk_pb.SignalEntityRequest(instanceId="@@k", name="add"),
            "name and a key",
        ),
        ("GetEntity", sdk_pb.GetEntityRequest(instanceId=""), "instanceId"),
        ("StartInstance", sdk_pb.CreateInstanceRequest(instanceId="@a@b", name="o"), "reserved"),
        (
            "QueryEntities",
            sdk_pb.QueryEntitiesRequest(
                query=sdk_pb.EntityQuery(continuationToken={"value": "bogus"})
            ),
            "continuation token",
        ),
    ],
)
def test_bad_entity_requests_are_refused_by_name(
    stub: Any, rpc: str, request_: Any, words: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, rpc)(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()


def test_an_unknown_entity_completion_token_is_not_found(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.CompleteEntityTask(sdk_pb.EntityBatchResult(completionToken="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.AbandonTaskEntityWorkItem(sdk_pb.AbandonEntityTaskRequest(completionToken="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
