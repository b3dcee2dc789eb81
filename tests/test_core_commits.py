"""What the engine's operations commit, and what a commit wakes: pure functions, no store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dt_trio._core import (
    ActivityTask,
    EntityState,
    EntityStepResult,
    InboxMessage,
    InstanceState,
    NewInstance,
    OutboundMessage,
    Status,
    StepResult,
)
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._core._commit import (
    ActivityWorkItem,
    Applied,
    AsFound,
    Attempts,
    Commit,
    Creatable,
    CreateInstance,
    DeleteActivity,
    DropPending,
    EntityWorkItem,
    Exists,
    Holds,
    InStatus,
    Lease,
    OrchestrationWorkItem,
    Release,
    Reopen,
    Send,
    TakeActivities,
    TakeInstance,
    Unchanged,
    Wakeups,
    WorkKind,
    WriteEntityStep,
    WriteStep,
    wakeups,
)
from dt_trio._proto import orchestrator_service_pb2 as pb

pytestmark = pytest.mark.store_independent

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
LEASE = Lease("me", 7)
STATE = InstanceState("i1", "orch", "e1", Status.RUNNING, NOW, NOW)
STARTED = ev.execution_started(NOW, name="orch", instance_id="i1", execution_id="e1", input=None)


def scheduled(task_id: int) -> pb.HistoryEvent:
    event = ev.new_event(NOW, task_id)
    event.taskScheduled.name = "act"
    return event


def step_result(**kw: object) -> StepResult:
    values: dict[str, object] = dict(state=STATE, consumed=(1,), history=[])
    values.update(kw)
    return StepResult(**values)  # type: ignore[arg-type]


def activity_item() -> ActivityWorkItem:
    return ActivityWorkItem(5, "i1", "e1", scheduled(0), LEASE)


def test_a_start_is_guarded_by_the_id_and_may_take_the_instance() -> None:
    commit = ops.start(STATE, STARTED, NOW, NOW, take="me")
    assert commit.guards == (Creatable("i1", ops.FINISHED),)
    assert commit.writes == (CreateInstance(STATE, STARTED, NOW),)
    assert commit.take == (TakeInstance("me", "i1"),)
    plain = ops.start(STATE, STARTED, LATER, NOW, replaceable=[Status.FAILED])
    assert plain.guards == (Creatable("i1", frozenset({Status.FAILED})),)
    assert plain.take == () and plain.writes == (CreateInstance(STATE, STARTED, LATER),)


def test_a_start_with_its_first_step_run_ahead_writes_the_step_instead_of_the_message() -> None:
    first = step_result(activities=[ActivityTask("i1", "e1", scheduled(0))])
    commit = ops.start(STATE, STARTED, NOW, NOW, ahead=ops.Ahead(first, NOW, "me", 1))
    assert commit.writes == (CreateInstance(STATE, None, NOW), WriteStep(first))
    assert commit.take == (TakeActivities("me", 1),)
    assert commit.otherwise is None  # an id taken fails the start: nothing else to do


def test_client_messages_are_guarded_by_what_they_need() -> None:
    raised = ev.event_raised(NOW, "e", None)
    assert ops.send_event("i1", raised, NOW) == Commit(
        NOW, (Send((OutboundMessage("i1", raised),)),), (Exists("i1"),)
    )
    signal = ev.event_raised(NOW, "op", None)
    assert ops.signal_entity("@c@k", signal, LATER, NOW).writes == (
        Send((OutboundMessage("@c@k", signal, LATER),)),
    )
    commit = ops.rewind("i1", raised, NOW)
    assert commit.guards == (
        InStatus("i1", Status.FAILED, "only a failed instance can be rewound"),
    )
    assert commit.writes == (Reopen("i1"), Send((OutboundMessage("i1", raised),)))


def test_a_step_is_guarded_by_its_lease_and_takes_its_activities_for_the_same_owner() -> None:
    result = step_result()
    commit = ops.step(LEASE, result, NOW, take_activities=3)
    assert commit.guards == (Holds(WorkKind.ORCHESTRATION, "i1", LEASE),)
    assert commit.writes == (WriteStep(result),)
    assert commit.take == (TakeActivities("me", 3),)
    assert ops.step(LEASE, result, NOW).take == ()


def test_a_forced_termination_writes_nothing_if_the_instance_moved_on() -> None:
    result = step_result()
    commit = ops.terminate_forced(result, NOW, LATER)
    assert commit.guards == (Unchanged("i1", NOW),)
    assert commit.writes == (DropPending("i1"), WriteStep(result))
    assert commit.otherwise == Commit(LATER, ())


def test_releases_say_what_happens_to_the_attempts_and_the_messages() -> None:
    item = OrchestrationWorkItem(STATE, [], [InboxMessage(1, STARTED)], LEASE)
    assert ops.release(item, NOW, Attempts.RESET, [1], LATER).writes == (
        Release(WorkKind.ORCHESTRATION, "i1", LEASE, Attempts.RESET, (1,), LATER),
    )
    assert ops.release_activity(activity_item(), NOW, Attempts.COUNT, LATER).writes == (
        Release(WorkKind.ACTIVITY, 5, LEASE, Attempts.COUNT, (), LATER),
    )
    entity = EntityWorkItem(EntityState("@c@k", NOW), [], LEASE)
    assert ops.release(entity, NOW, Attempts.KEEP).writes == (
        Release(WorkKind.ENTITY, "@c@k", LEASE, Attempts.KEEP, (), None),
    )
    result = EntityStepResult(entity.entity, (), ())
    assert ops.entity_step(entity, result, NOW) == Commit(
        NOW, (WriteEntityStep(result),), (Holds(WorkKind.ENTITY, "@c@k", LEASE),)
    )


def test_an_activity_result_is_delivered_to_its_execution_or_committed_with_its_step() -> None:
    item, done = activity_item(), ev.task_completed(NOW, 0, '"a"')
    plain = ops.deliver_result(item, done, NOW, take="me")
    holds = Holds(WorkKind.ACTIVITY, 5, LEASE)
    assert plain.guards == (holds,)
    assert plain.writes == (
        DeleteActivity(5),
        Send((OutboundMessage("i1", done, None, "e1"),)),
    )
    assert plain.take == (TakeInstance("me", "i1"),)
    second = step_result(history=[done])
    ahead = ops.deliver_result(item, done, NOW, take="me", ahead=ops.Ahead(second, NOW, "me"))
    assert ahead.guards == (holds, AsFound("i1", "e1", NOW))
    assert ahead.writes == (DeleteActivity(5), WriteStep(second))
    assert ahead.take == ()  # no activities to take
    assert ahead.otherwise == plain  # the instance moved on: the ordinary way


def test_a_step_wakes_for_its_outbox_and_what_waits_and_names_what_changed() -> None:
    child = InstanceState("child", "orch", "c1", Status.PENDING, NOW, NOW)
    result = step_result(
        activities=[ActivityTask("i1", "e1", scheduled(n)) for n in range(2)],
        messages=[OutboundMessage("@c@k", STARTED)],
        new_instances=[NewInstance(child, STARTED, None)],
    )
    commit = ops.step(LEASE, result, NOW, take_activities=2)
    handed = tuple(activity_item() for _ in range(2))
    woken = wakeups(commit, Applied(activities=handed))
    assert woken == Wakeups(
        orchestrations=True,  # the child's start
        activities=False,  # both handed over
        entities=True,
        instances=(("i1", STATE), ("child", None)),
    )
    quiet = wakeups(ops.step(LEASE, step_result(), NOW), Applied())
    assert quiet == Wakeups(instances=(("i1", STATE),))
    assert wakeups(ops.step(LEASE, step_result(), NOW), Applied(waiting=True)).orchestrations


@pytest.mark.contract
def test_work_a_commit_took_wakes_nobody() -> None:
    """Contract: work a commit handed over wakes no processor (no lease round for it)."""
    taken = OrchestrationWorkItem(STATE, [], [], LEASE)
    start = ops.start(STATE, STARTED, NOW, NOW, take="me")
    assert not wakeups(start, Applied(orchestrations=(taken,))).orchestrations
    assert wakeups(start, Applied()).orchestrations  # the instance was not taken
    delivery = ops.deliver_result(activity_item(), ev.task_completed(NOW, 0, None), NOW, "me")
    assert wakeups(delivery, Applied(orchestrations=(taken,))) == Wakeups()
    assert wakeups(delivery, Applied()) == Wakeups(orchestrations=True)


def test_a_commit_that_took_its_otherwise_wakes_as_the_otherwise() -> None:
    done = ev.task_completed(NOW, 0, None)
    ahead = ops.Ahead(step_result(history=[done]), NOW, "me")
    commit = ops.deliver_result(activity_item(), done, NOW, ahead=ahead)
    assert wakeups(commit, Applied()).instances == (("i1", STATE),)  # the step was written
    assert wakeups(commit, Applied(alternative=True)) == Wakeups(orchestrations=True)
    forced = ops.terminate_forced(step_result(), NOW, NOW)
    assert wakeups(forced, Applied(alternative=True)) == Wakeups()


def test_releases_wake_their_own_kind() -> None:
    item = OrchestrationWorkItem(STATE, [], [], LEASE)
    entity = EntityWorkItem(EntityState("@c@k", NOW), [], LEASE)
    assert wakeups(ops.release(item, NOW, Attempts.KEEP), Applied()) == Wakeups(orchestrations=True)
    assert wakeups(ops.release_activity(activity_item(), NOW, Attempts.KEEP), Applied()) == (
        Wakeups(activities=True)
    )
    assert wakeups(ops.release(entity, NOW, Attempts.KEEP), Applied()) == Wakeups(entities=True)
    rewound = wakeups(ops.rewind("i1", STARTED, NOW), Applied())
    assert rewound == Wakeups(orchestrations=True, instances=(("i1", None),))
