"""The sans-IO entity core and the orchestration's entity messages, tested with plain functions."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from dt_trio import _core as core
from dt_trio._core import EntityState, InboxMessage, InstanceState, Status
from dt_trio._core import _events as ev
from dt_trio._proto import orchestrator_service_pb2 as pb

pytestmark = pytest.mark.store_independent

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
COUNTER = "@counter@c1"


def ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"id-{next(counter)}"


def entity(**kw: object) -> EntityState:
    values: dict[str, object] = dict(instance_id=COUNTER, last_modified_at=NOW, state="5")
    values.update(kw)
    return EntityState(**values)  # type: ignore[arg-type]


def queue(*events: pb.HistoryEvent) -> list[InboxMessage]:
    return [InboxMessage(i + 1, e) for i, e in enumerate(events)]


def signal(op: str = "add", request_id: str = "s1") -> pb.HistoryEvent:
    return core.signal_event(NOW, COUNTER, op, "1", request_id)


def call(caller: str = "orch1", request_id: str = "c1", execution: str = "x1") -> pb.HistoryEvent:
    event = ev.new_event(NOW)
    called = event.entityOperationCalled
    called.requestId = request_id
    called.operation = "get"
    called.parentInstanceId.value = caller
    called.parentExecutionId.value = execution
    called.targetInstanceId.value = COUNTER
    return event


def lock(section: str, owner: str, lock_set: list[str], position: int = 0) -> pb.HistoryEvent:
    event = ev.new_event(NOW)
    request = event.entityLockRequested
    request.criticalSectionId = section
    request.parentInstanceId.value = owner
    request.lockSet.extend(lock_set)
    request.position = position
    return event


def unlock(section: str, owner: str, target: str = COUNTER) -> pb.HistoryEvent:
    event = ev.new_event(NOW)
    event.entityUnlockSent.criticalSectionId = section
    event.entityUnlockSent.parentInstanceId.value = owner
    event.entityUnlockSent.targetInstanceId.value = target
    return event


def success(result: str | None) -> pb.OperationResult:
    outcome = pb.OperationResult()
    outcome.success.SetInParent()
    if result is not None:
        outcome.success.result.value = result
    return outcome


def failure(message: str) -> pb.OperationResult:
    outcome = pb.OperationResult()
    outcome.failure.failureDetails.CopyFrom(ev.failure("ValueError", message))
    return outcome


# -- ids ----------------------------------------------------------------------------------------


def test_entity_ids_are_normalised_and_checked() -> None:
    assert core.check_entity_id("@Counter@Key") == "@counter@Key"
    assert core.entity_name("@counter@a@b") == "counter"
    for bad in ("counter", "@counter", "@@key", ""):
        with pytest.raises(ValueError, match="entity id"):
            core.check_entity_id(bad)


# -- planning a batch ---------------------------------------------------------------------------


def test_an_unlocked_entity_runs_signals_and_calls_in_queue_order() -> None:
    batch = core.plan_entity_batch(entity(), queue(signal(), call(), signal("reset")), NOW)
    assert [m.id for m in batch.operations] == [1, 2, 3]
    assert batch.consumed == () and batch.deferred == () and batch.messages == []


def test_a_lock_request_for_one_entity_locks_it_and_grants_the_section() -> None:
    batch = core.plan_entity_batch(entity(), queue(lock("cs1", "orch1", [COUNTER])), NOW)
    assert (batch.entity.locked_by, batch.entity.lock_owner) == ("cs1", "orch1")
    assert batch.consumed == (1,)
    [granted] = batch.messages
    assert granted.target_instance_id == "orch1"
    assert granted.event.entityLockGranted.criticalSectionId == "cs1"


def test_a_lock_request_is_forwarded_along_the_lock_set() -> None:
    lock_set = [COUNTER, "@counter@c2", "@other@z"]
    batch = core.plan_entity_batch(entity(), queue(lock("cs1", "orch1", lock_set)), NOW)
    [forward] = batch.messages
    assert forward.target_instance_id == "@counter@c2"
    assert forward.event.entityLockRequested.position == 1
    assert list(forward.event.entityLockRequested.lockSet) == lock_set


def test_a_locked_entity_runs_only_the_lock_holders_calls() -> None:
    locked = entity(locked_by="cs1", lock_owner="orch1")
    messages = queue(
        signal(), call("orch2", "c2"), call("orch1", "c1"), lock("cs9", "o9", [COUNTER])
    )
    batch = core.plan_entity_batch(locked, messages, NOW)
    assert [m.id for m in batch.operations] == [3]
    assert batch.deferred == (1, 2, 4)
    assert batch.entity.locked_by == "cs1"


def test_an_unlock_releases_the_lock_and_the_waiting_messages_run_in_order() -> None:
    locked = entity(locked_by="cs1", lock_owner="orch1")
    messages = queue(signal("a"), call("orch2", "c2"), unlock("cs1", "orch1"), signal("b"))
    batch = core.plan_entity_batch(locked, messages, NOW)
    assert [m.id for m in batch.operations] == [1, 2, 4]
    assert batch.consumed == (3,)
    assert batch.entity.locked_by is None and batch.entity.lock_owner is None


def test_a_waiting_lock_request_takes_the_lock_once_it_is_released() -> None:
    locked = entity(locked_by="cs1", lock_owner="orch1")
    messages = queue(lock("cs2", "orch2", [COUNTER]), signal(), unlock("cs1", "orch1"))
    batch = core.plan_entity_batch(locked, messages, NOW)
    assert (batch.entity.locked_by, batch.entity.lock_owner) == ("cs2", "orch2")
    assert batch.operations == []  # the signal came after the new lock: it waits again
    assert batch.deferred == (2,)
    assert [m.target_instance_id for m in batch.messages] == ["orch2"]


def test_an_unlock_of_a_section_still_waiting_voids_its_request() -> None:
    locked = entity(locked_by="cs1", lock_owner="orch1")
    messages = queue(lock("cs2", "orch2", [COUNTER]), unlock("cs2", "orch2"))
    batch = core.plan_entity_batch(locked, messages, NOW)
    assert batch.consumed == (2, 1)
    assert batch.deferred == ()
    assert batch.entity.locked_by == "cs1"


def test_the_work_item_carries_the_state_and_the_operations_as_events() -> None:
    batch = core.plan_entity_batch(entity(), queue(signal(), call()), NOW)
    v2 = core.entity_request(batch)
    assert v2.instanceId == COUNTER and v2.entityState.value == "5"
    assert [ev.kind(e) for e in v2.operationRequests] == [
        "entityOperationSignaled",
        "entityOperationCalled",
    ]


# -- applying a result --------------------------------------------------------------------------


def test_a_result_updates_the_state_and_answers_each_caller() -> None:
    batch = core.plan_entity_batch(entity(), queue(signal(), call(), call("o2", "c2", "x2")), NOW)
    result = pb.EntityBatchResult(results=[success(None), success("6"), failure("boom")])
    result.entityState.value = "6"
    later = NOW + timedelta(seconds=1)
    step = core.apply_entity_result(batch, result, later, ids())
    assert step.entity.state == "6" and step.entity.last_modified_at == later
    assert step.consumed == (1, 2, 3)
    completed, failed = step.messages
    assert (completed.target_instance_id, completed.execution_id) == ("orch1", "x1")
    assert completed.event.entityOperationCompleted.requestId == "c1"
    assert completed.event.entityOperationCompleted.output.value == "6"
    assert failed.target_instance_id == "o2"
    assert failed.event.entityOperationFailed.failureDetails.errorMessage == "boom"


def test_a_result_without_state_clears_it() -> None:
    batch = core.plan_entity_batch(entity(), queue(signal("delete")), NOW)
    step = core.apply_entity_result(
        batch, pb.EntityBatchResult(results=[success(None)]), NOW, ids()
    )
    assert step.entity.state is None


def test_signals_and_orchestrations_started_by_operations_are_queued() -> None:
    batch = core.plan_entity_batch(entity(), queue(signal()), NOW)
    result = pb.EntityBatchResult(results=[success(None)])
    send = result.actions.add(id=0).sendSignal
    send.instanceId = "@Other@k"
    send.name = "ping"
    send.scheduledTime.FromDatetime(NOW + timedelta(minutes=5))
    start = result.actions.add(id=1).startNewOrchestration
    start.name = "followUp"
    start.input.value = '"x"'
    step = core.apply_entity_result(batch, result, NOW, ids())
    [ping] = step.messages
    assert ping.target_instance_id == "@other@k"
    assert ping.visible_at == NOW + timedelta(minutes=5)
    assert ping.event.entityOperationSignaled.operation == "ping"
    assert ping.event.entityOperationSignaled.requestId == "id-1"
    [new] = step.new_instances
    assert (new.state.name, new.state.instance_id, new.state.input) == ("followUp", "id-2", '"x"')
    assert new.started.executionStarted.name == "followUp"
    assert new.on_conflict is None


@pytest.mark.parametrize(
    "result",
    [
        pb.EntityBatchResult(results=[]),
        pb.EntityBatchResult(results=[success(None), success(None)]),
        pb.EntityBatchResult(
            results=[success(None)], failureDetails=ev.failure("Crash", "no entity")
        ),
        pb.EntityBatchResult(results=[pb.OperationResult()]),
    ],
)
def test_a_result_that_does_not_answer_the_batch_is_refused(
    result: pb.EntityBatchResult,
) -> None:
    batch = core.plan_entity_batch(entity(), queue(call()), NOW)
    with pytest.raises(core.InvalidEntityResult):
        core.apply_entity_result(batch, result, NOW, ids())


def test_a_signal_to_something_that_is_not_an_entity_is_refused() -> None:
    batch = core.plan_entity_batch(entity(), queue(signal()), NOW)
    result = pb.EntityBatchResult(results=[success(None)])
    result.actions.add(id=0).sendSignal.instanceId = "an-orchestration"
    with pytest.raises(core.InvalidEntityResult, match="not an entity id"):
        core.apply_entity_result(batch, result, NOW, ids())


def test_an_abandoned_batch_fails_its_calls_and_keeps_the_state() -> None:
    batch = core.plan_entity_batch(entity(), queue(signal(), call()), NOW)
    step = core.fail_entity_batch(batch, NOW, "handed out 10 times")
    assert step.entity.state == "5"
    assert step.consumed == (1, 2)
    [reply] = step.messages
    details = reply.event.entityOperationFailed.failureDetails
    assert (details.errorType, details.errorMessage) == (
        "EntityBatchAbandonedError",
        "handed out 10 times",
    )


# -- the orchestration side ---------------------------------------------------------------------


def orchestration(status: Status = Status.RUNNING) -> InstanceState:
    return InstanceState(
        instance_id="orch1",
        name="orch",
        execution_id="x1",
        status=status,
        created_at=NOW,
        last_updated_at=NOW,
    )


def first_step() -> core.Dispatch:
    started = ev.execution_started(
        NOW, name="orch", instance_id="orch1", execution_id="x1", input=None
    )
    plan = core.plan_step(orchestration(Status.PENDING), [], [InboxMessage(1, started)], NOW)
    assert isinstance(plan, core.Dispatch)
    return plan


def entity_action(action_id: int, **message: pb.HistoryEvent) -> pb.OrchestratorAction:
    action = pb.OrchestratorAction(id=action_id)
    [(kind, event)] = message.items()
    getattr(action.sendEntityMessage, kind).CopyFrom(getattr(event, kind))
    return action


def complete_action() -> pb.OrchestratorAction:
    action = pb.OrchestratorAction(id=99)
    action.completeOrchestration.orchestrationStatus = pb.ORCHESTRATION_STATUS_COMPLETED
    return action


def test_entity_messages_of_an_orchestration_are_recorded_and_sent() -> None:
    request = lock("cs1", "ignored", [COUNTER, "@counter@c2"])
    request.entityLockRequested.ClearField("parentInstanceId")
    actions = [
        entity_action(0, entityOperationSignaled=signal()),
        entity_action(1, entityOperationCalled=call("whoever")),
        entity_action(2, entityLockRequested=request),
    ]
    response = pb.OrchestratorResponse(instanceId="orch1", actions=actions)
    step = core.apply_response(orchestration(), first_step(), response, NOW, ids())
    recorded = [e for e in step.history if e.eventId in (0, 1, 2)]
    assert [ev.kind(e) for e in recorded] == [
        "entityOperationSignaled",
        "entityOperationCalled",
        "entityLockRequested",
    ]
    to_signal, to_call, to_lock = step.messages
    assert to_signal.target_instance_id == COUNTER
    called = to_call.event.entityOperationCalled
    assert (called.parentInstanceId.value, called.parentExecutionId.value) == ("orch1", "x1")
    assert to_lock.target_instance_id == COUNTER
    assert to_lock.event.entityLockRequested.parentInstanceId.value == "orch1"


def test_a_delayed_signal_from_an_orchestration_becomes_visible_at_its_time() -> None:
    delayed = signal()
    delayed.entityOperationSignaled.scheduledTime.FromDatetime(NOW + timedelta(hours=1))
    response = pb.OrchestratorResponse(
        instanceId="orch1", actions=[entity_action(0, entityOperationSignaled=delayed)]
    )
    step = core.apply_response(orchestration(), first_step(), response, NOW, ids())
    assert step.messages[0].visible_at == NOW + timedelta(hours=1)


def test_an_entity_message_to_a_non_entity_fails_the_orchestration() -> None:
    bad = signal()
    bad.entityOperationSignaled.targetInstanceId.value = "plain-orchestration"
    response = pb.OrchestratorResponse(
        instanceId="orch1", actions=[entity_action(0, entityOperationSignaled=bad)]
    )
    step = core.apply_response(orchestration(), first_step(), response, NOW, ids())
    assert step.state.status == Status.FAILED
    assert step.state.failure is not None
    assert "not an entity id" in step.state.failure.errorMessage
    assert step.messages == []


def test_an_orchestration_that_ends_holding_locks_releases_them() -> None:
    request = lock("cs1", "orch1", [COUNTER, "@counter@c2"])
    response = pb.OrchestratorResponse(
        instanceId="orch1",
        actions=[
            entity_action(0, entityLockRequested=request),
            entity_action(1, entityUnlockSent=unlock("cs1", "orch1", COUNTER)),
            complete_action(),
        ],
    )
    step = core.apply_response(orchestration(), first_step(), response, NOW, ids())
    released = [m for m in step.messages if m.event.HasField("entityUnlockSent")]
    # The SDK unlocked c1 itself; the sidecar releases c2.
    assert [m.target_instance_id for m in released] == [COUNTER, "@counter@c2"]


def test_terminating_without_the_orchestrator_releases_its_locks() -> None:
    history = [
        ev.execution_started(NOW, name="orch", instance_id="orch1", execution_id="x1", input=None),
        lock("cs1", "orch1", [COUNTER]),
    ]
    step = core.terminate_now(orchestration(), history, "stop", NOW)
    [released] = step.messages
    assert released.target_instance_id == COUNTER
    assert released.event.entityUnlockSent.criticalSectionId == "cs1"


def test_a_lock_granted_to_a_finished_orchestration_is_handed_back() -> None:
    history = [
        ev.execution_started(NOW, name="orch", instance_id="orch1", execution_id="x1", input=None),
        lock("cs1", "orch1", [COUNTER, "@counter@c2"]),
    ]
    granted = ev.new_event(NOW)
    granted.entityLockGranted.criticalSectionId = "cs1"
    plan = core.plan_step(orchestration(Status.FAILED), history, [InboxMessage(7, granted)], NOW)
    assert isinstance(plan, core.Settle)
    assert plan.result.consumed == (7,)
    assert [m.target_instance_id for m in plan.result.messages] == [COUNTER, "@counter@c2"]
