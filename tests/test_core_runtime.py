"""The sans-IO orchestration core, tested with plain functions (no event loop, no store)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from dt_trio import _core as core
from dt_trio._core import InboxMessage, InstanceState, Status
from dt_trio._core import _events as ev
from dt_trio._proto import orchestrator_service_pb2 as pb

pytestmark = pytest.mark.store_independent

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"exec-{next(counter)}"


def state(status: Status = Status.PENDING, **kw: object) -> InstanceState:
    values: dict[str, object] = dict(
        instance_id="i1",
        name="orch",
        execution_id="e0",
        status=status,
        created_at=NOW,
        last_updated_at=NOW,
    )
    values.update(kw)
    return InstanceState(**values)  # type: ignore[arg-type]


def started(
    instance_id: str = "i1", parent: pb.ParentInstanceInfo | None = None
) -> pb.HistoryEvent:
    return ev.execution_started(
        NOW, name="orch", instance_id=instance_id, execution_id="e0", input='"in"', parent=parent
    )


def inbox(*events: pb.HistoryEvent) -> list[InboxMessage]:
    return [InboxMessage(i + 1, e) for i, e in enumerate(events)]


def first_step() -> core.Dispatch:
    plan = core.plan_step(state(), [], inbox(started()), NOW)
    assert isinstance(plan, core.Dispatch)
    return plan


def respond(*actions: pb.OrchestratorAction, custom: str | None = None) -> pb.OrchestratorResponse:
    response = pb.OrchestratorResponse(instanceId="i1", actions=actions)
    if custom is not None:
        response.customStatus.value = custom
    return response


def complete(
    status: Status, result: str | None = None, action_id: int = 9
) -> pb.OrchestratorAction:
    action = pb.OrchestratorAction(id=action_id)
    action.completeOrchestration.orchestrationStatus = int(status)  # type: ignore[assignment]
    if result is not None:
        action.completeOrchestration.result.value = result
    return action


# -- planning ---------------------------------------------------------------------------------


def test_first_step_dispatches_orchestrator_started_then_execution_started() -> None:
    raised = ev.event_raised(NOW, "go", None)
    plan = core.plan_step(state(), [], inbox(raised, started()), NOW)
    assert isinstance(plan, core.Dispatch)
    assert [ev.kind(e) for e in plan.new_events] == [
        "orchestratorStarted",
        "executionStarted",
        "eventRaised",
    ]
    assert plan.consumed == (1, 2)


def test_duplicate_execution_started_is_dropped_but_consumed() -> None:
    history = [ev.orchestrator_started(NOW), started()]
    plan = core.plan_step(state(Status.RUNNING), history, inbox(started()), NOW)
    assert isinstance(plan, core.Settle)  # nothing left for the orchestrator
    assert plan.result.consumed == (1,) and plan.result.history == []
    assert plan.result.state == state(Status.RUNNING)
    raised = ev.event_raised(NOW, "go", None)
    plan = core.plan_step(state(Status.RUNNING), history, inbox(started(), raised), NOW)
    assert isinstance(plan, core.Dispatch)
    assert [ev.kind(e) for e in plan.new_events] == ["orchestratorStarted", "eventRaised"]
    assert plan.consumed == (1, 2)


def test_a_wake_up_alone_still_runs_the_orchestrator() -> None:
    history = [ev.orchestrator_started(NOW), started()]
    plan = core.plan_step(state(Status.RUNNING), history, inbox(ev.orchestrator_started(NOW)), NOW)
    assert isinstance(plan, core.Dispatch)
    assert [ev.kind(e) for e in plan.new_events] == ["orchestratorStarted"]


def test_events_for_a_finished_instance_are_consumed_and_dropped() -> None:
    plan = core.plan_step(
        state(Status.COMPLETED), [started()], inbox(ev.event_raised(NOW, "x", None)), NOW
    )
    assert isinstance(plan, core.Settle)
    assert plan.result.consumed == (1,)
    assert plan.result.history == []
    assert plan.result.state.status == Status.COMPLETED


def test_events_before_a_scheduled_start_wait_for_it() -> None:
    start = NOW + timedelta(hours=1)
    plan = core.plan_step(
        state(scheduled_start_at=start), [], inbox(ev.event_raised(NOW, "x", None)), NOW
    )
    assert plan == core.Postpone((1,), start)


def test_terminating_an_instance_that_has_not_started_finishes_it_without_a_worker() -> None:
    terminate = ev.execution_terminated(NOW, '"stop"', False)
    plan = core.plan_step(state(), [], inbox(terminate), NOW)
    assert isinstance(plan, core.Settle)
    result = plan.result
    assert result.state.status == Status.TERMINATED
    assert result.state.output == '"stop"'
    assert result.state.completed_at == NOW
    assert ev.kind(result.history[-1]) == "executionCompleted"


# -- applying actions -------------------------------------------------------------------------


def test_schedule_task_records_the_event_and_enqueues_the_activity() -> None:
    action = pb.OrchestratorAction(id=1)
    action.scheduleTask.name = "hello"
    action.scheduleTask.input.value = '"Tokyo"'
    action.scheduleTask.tags["k"] = "v"
    result = core.apply_response(state(), first_step(), respond(action), NOW, ids())
    assert result.state.status == Status.RUNNING
    scheduled = result.history[-1]
    assert scheduled.eventId == 1
    assert scheduled.taskScheduled.name == "hello"
    assert scheduled.taskScheduled.input.value == '"Tokyo"'
    assert [a.scheduled for a in result.activities] == [scheduled]
    assert result.activities[0].execution_id == "e0"
    assert dict(result.activities[0].scheduled.taskScheduled.tags) == {"k": "v"}


def test_create_timer_sends_timer_fired_to_itself_at_fire_time() -> None:
    fire_at = NOW + timedelta(seconds=30)
    action = pb.OrchestratorAction(id=2)
    action.createTimer.fireAt.FromDatetime(fire_at)
    result = core.apply_response(state(), first_step(), respond(action), NOW, ids())
    assert result.history[-1].timerCreated.fireAt.ToDatetime(tzinfo=UTC) == fire_at
    (message,) = result.messages
    assert message.target_instance_id == "i1"
    assert message.visible_at == fire_at
    assert message.event.timerFired.timerId == 2


def test_completion_appends_execution_completed_last_and_sets_output() -> None:
    result = core.apply_response(
        state(),
        first_step(),
        respond(complete(Status.COMPLETED, '"done"'), custom='"cs"'),
        NOW,
        ids(),
    )
    assert result.state.status == Status.COMPLETED
    assert result.state.output == '"done"'
    assert result.state.custom_status == '"cs"'
    assert result.state.completed_at == NOW
    assert [ev.kind(e) for e in result.history[-2:]] == [
        "orchestratorCompleted",
        "executionCompleted",
    ]


def test_actions_after_the_completing_action_are_ignored() -> None:
    late = pb.OrchestratorAction(id=3)
    late.scheduleTask.name = "late"
    result = core.apply_response(
        state(), first_step(), respond(complete(Status.COMPLETED), late), NOW, ids()
    )
    assert result.activities == []


def test_a_sub_orchestration_reports_its_result_to_the_parent() -> None:
    parent = pb.ParentInstanceInfo(taskScheduledId=7)
    parent.orchestrationInstance.instanceId = "parent"
    plan = core.plan_step(state(), [], inbox(started(parent=parent)), NOW)
    assert isinstance(plan, core.Dispatch)
    done = core.apply_response(state(), plan, respond(complete(Status.COMPLETED, "42")), NOW, ids())
    (message,) = done.messages
    assert message.target_instance_id == "parent"
    assert message.event.subOrchestrationInstanceCompleted.taskScheduledId == 7
    assert message.event.subOrchestrationInstanceCompleted.result.value == "42"

    failed_action = complete(Status.FAILED)
    failed_action.completeOrchestration.failureDetails.errorType = "ValueError"
    failed = core.apply_response(state(), plan, respond(failed_action), NOW, ids())
    assert failed.messages[0].event.subOrchestrationInstanceFailed.failureDetails.errorType == (
        "ValueError"
    )


def test_create_sub_orchestration_creates_the_child_with_parent_info() -> None:
    action = pb.OrchestratorAction(id=4)
    action.createSubOrchestration.name = "child"
    action.createSubOrchestration.input.value = "1"
    result = core.apply_response(
        state(status=Status.RUNNING), first_step(), respond(action), NOW, ids()
    )
    (new,) = result.new_instances
    assert new.state.instance_id == "i1:0004"  # deterministic when the SDK gives no id
    assert new.state.parent_instance_id == "i1"
    assert new.state.status == Status.PENDING
    parent = new.started.executionStarted.parentInstance
    assert parent.taskScheduledId == 4
    assert parent.orchestrationInstance.instanceId == "i1"
    assert result.history[-1].subOrchestrationInstanceCreated.instanceId == "i1:0004"
    assert new.on_conflict is not None
    conflict = new.on_conflict.event.subOrchestrationInstanceFailed
    assert conflict.taskScheduledId == 4


def test_send_event_records_it_and_raises_it_in_the_target() -> None:
    action = pb.OrchestratorAction(id=5)
    action.sendEvent.instance.instanceId = "other"
    action.sendEvent.name = "ping"
    action.sendEvent.data.value = "1"
    result = core.apply_response(state(), first_step(), respond(action), NOW, ids())
    assert result.history[-1].eventSent.instanceId == "other"
    (message,) = result.messages
    assert message.target_instance_id == "other"
    assert message.event.eventRaised.name == "ping"
    assert message.event.eventRaised.input.value == "1"


def test_continue_as_new_restarts_from_the_inbox_with_carried_over_events() -> None:
    action = complete(Status.CONTINUED_AS_NEW, '"next"')
    carried = ev.event_raised(NOW, "kept", None)
    action.completeOrchestration.carryoverEvents.append(carried)
    result = core.apply_response(state(Status.RUNNING), first_step(), respond(action), NOW, ids())
    assert result.reset_history is True
    assert result.history == []
    assert result.state.status == Status.RUNNING
    assert result.state.execution_id == "exec-1"
    assert result.state.input == '"next"'
    kinds = [ev.kind(m.event) for m in result.messages]
    assert kinds == ["executionStarted", "eventRaised"]
    assert result.messages[0].event.executionStarted.input.value == '"next"'
    assert result.messages[0].event.executionStarted.orchestrationInstance.executionId.value == (
        "exec-1"
    )


def test_recursive_termination_terminates_running_children() -> None:
    history = [ev.orchestrator_started(NOW), started()]
    for task_id, child in ((1, "c1"), (2, "c2")):
        created = ev.new_event(NOW, task_id)
        created.subOrchestrationInstanceCreated.instanceId = child
        history.append(created)
    history.append(ev.sub_orchestration_completed(NOW, 1, None))
    plan = core.plan_step(
        state(Status.RUNNING), history, inbox(ev.execution_terminated(NOW, '"bye"', True)), NOW
    )
    assert isinstance(plan, core.Dispatch)
    result = core.apply_response(
        state(Status.RUNNING), plan, respond(complete(Status.TERMINATED, '"bye"')), NOW, ids()
    )
    assert result.state.status == Status.TERMINATED
    (message,) = result.messages
    assert message.target_instance_id == "c2"
    assert message.event.executionTerminated.recurse is True


def test_suspend_and_resume_change_the_status() -> None:
    history = [ev.orchestrator_started(NOW), started()]
    suspend = core.plan_step(
        state(Status.RUNNING), history, inbox(ev.execution_suspended(NOW, None)), NOW
    )
    assert isinstance(suspend, core.Dispatch)
    suspended = core.apply_response(state(Status.RUNNING), suspend, respond(), NOW, ids())
    assert suspended.state.status == Status.SUSPENDED
    resume = core.plan_step(suspended.state, history, inbox(ev.execution_resumed(NOW, None)), NOW)
    assert isinstance(resume, core.Dispatch)
    resumed = core.apply_response(suspended.state, resume, respond(), NOW, ids())
    assert resumed.state.status == Status.RUNNING


@pytest.mark.parametrize(
    "status,events,delivered",
    [
        (Status.RUNNING, "R", ""),  # nothing left for the orchestrator
        (Status.RUNNING, "RS", "S"),
        (Status.RUNNING, "SS", "S"),
        (Status.SUSPENDED, "S", ""),
        (Status.SUSPENDED, "SR", "R"),
        (Status.SUSPENDED, "RRSSR", "RSR"),
        (Status.RUNNING, "SRRS", "SRS"),
    ],
)
def test_only_suspends_and_resumes_that_change_the_status_are_delivered(
    status: Status, events: str, delivered: str
) -> None:
    """As the status stands when they are consumed, in order: the SDKs fail on a resume of a
    running orchestration and spin on a suspend of a suspended one."""
    make = {"S": ev.execution_suspended, "R": ev.execution_resumed}
    history = [ev.orchestrator_started(NOW), started()]
    plan = core.plan_step(state(status), history, inbox(*(make[e](NOW, None) for e in events)), NOW)
    consumed = tuple(range(1, len(events) + 1))
    if not delivered:
        assert isinstance(plan, core.Settle)
        assert plan.result.consumed == consumed and plan.result.history == []
        assert plan.result.state.status == status
        return
    assert isinstance(plan, core.Dispatch) and plan.consumed == consumed
    kinds = [ev.kind(e) for e in plan.new_events[1:]]
    assert kinds == [{"S": "executionSuspended", "R": "executionResumed"}[e] for e in delivered]
    after = core.apply_response(state(status), plan, respond(), NOW, ids())
    assert after.state.status == (Status.SUSPENDED if delivered[-1] == "S" else Status.RUNNING)


def test_an_action_without_a_payload_fails_the_orchestration_with_a_reason() -> None:
    action = pb.OrchestratorAction(id=6)
    result = core.apply_response(state(), first_step(), respond(action), NOW, ids())
    assert result.state.status == Status.FAILED
    assert result.state.failure is not None
    assert result.state.failure.errorType == "NotSupportedError"
    assert "an empty action (action id 6)" in result.state.failure.errorMessage


def test_activity_result_distinguishes_success_and_failure() -> None:
    ok = pb.ActivityResponse(instanceId="i1", taskId=3)
    ok.result.value = "1"
    assert core.activity_result(ok, NOW).taskCompleted.result.value == "1"
    bad = pb.ActivityResponse(instanceId="i1", taskId=3)
    bad.failureDetails.errorType = "ValueError"
    event = core.activity_result(bad, NOW)
    assert event.taskFailed.taskScheduledId == 3
    assert event.taskFailed.failureDetails.errorType == "ValueError"


def test_a_timer_with_an_invalid_fire_time_fails_the_orchestration() -> None:
    action = pb.OrchestratorAction(id=7)
    action.createTimer.fireAt.seconds = 10**13  # far beyond year 9999
    result = core.apply_response(state(), first_step(), respond(action), NOW, ids())
    assert result.state.status == Status.FAILED
    assert result.state.failure is not None
    assert "fireAt is not a valid timestamp" in result.state.failure.errorMessage
    assert result.messages == []


def test_terminate_action_sends_the_target_a_termination() -> None:
    action = pb.OrchestratorAction(id=8)
    action.terminateOrchestration.instanceId = "victim"
    action.terminateOrchestration.reason.value = '"enough"'
    action.terminateOrchestration.recurse = True
    result = core.apply_response(state(), first_step(), respond(action), NOW, ids())
    (message,) = result.messages
    assert message.target_instance_id == "victim"
    assert message.event.executionTerminated.input.value == '"enough"'
    assert message.event.executionTerminated.recurse is True
    assert result.state.status == Status.RUNNING


def test_the_sdk_trace_context_is_kept_for_the_next_step_and_reset_on_continue_as_new() -> None:
    response = respond()
    response.orchestrationTraceContext.spanID.value = "span-1"
    kept = core.apply_response(state(), first_step(), response, NOW, ids())
    assert kept.state.trace_context is not None
    assert kept.state.trace_context.spanID.value == "span-1"
    quiet = core.apply_response(kept.state, first_step(), respond(), NOW, ids())
    assert quiet.state.trace_context == kept.state.trace_context
    renewed = core.apply_response(
        kept.state, first_step(), respond(complete(Status.CONTINUED_AS_NEW)), NOW, ids()
    )
    assert renewed.state.trace_context is None


def failed_history() -> list[pb.HistoryEvent]:
    return [
        ev.orchestrator_started(NOW),
        started(),
        ev.execution_completed(NOW, Status.FAILED, None, ev.failure("E", "m")),
    ]


def rewound(reason: str = "try again") -> pb.HistoryEvent:
    event = ev.new_event(NOW)
    event.executionRewound.reason.value = reason
    return event


def test_a_rewind_of_a_failed_history_dispatches_exactly_the_two_events_the_sdk_expects() -> None:
    stray = ev.event_raised(NOW, "late", None)
    plan = core.plan_step(state(Status.RUNNING), failed_history(), inbox(stray, rewound()), NOW)
    assert isinstance(plan, core.Dispatch)
    assert [ev.kind(e) for e in plan.new_events] == ["orchestratorStarted", "executionRewound"]
    assert plan.consumed == (1, 2)


def test_applying_the_rewritten_history_restarts_failed_children_and_wakes_the_instance() -> None:
    history = failed_history()[:2]
    created = ev.new_event(NOW, 3)
    created.subOrchestrationInstanceCreated.instanceId = "kid"
    created.subOrchestrationInstanceCreated.name = "child"
    history.append(created)
    action = pb.OrchestratorAction(id=-1)
    action.rewindOrchestration.newHistory.extend([*history, rewound()])
    plan = core.plan_step(state(Status.RUNNING), failed_history(), inbox(rewound()), NOW)
    assert isinstance(plan, core.Dispatch)
    result = core.apply_response(state(Status.RUNNING), plan, respond(action), NOW, ids())
    assert result.reset_history and result.state.status == Status.RUNNING
    assert [ev.kind(e) for e in result.history][-1] == "executionRewound"
    (child,) = result.new_instances
    assert child.state.instance_id == "kid" and child.replace_finished is False
    assert child.on_conflict is not None and child.on_conflict.target_instance_id == "kid"
    assert child.on_conflict.event.executionRewound.reason.value == "try again"
    assert [ev.kind(m.event) for m in result.messages] == ["orchestratorStarted"]


def test_a_rewind_starts_a_new_sdk_span_so_the_failed_run_keeps_its_own() -> None:
    # The SDK emitted the failed run's orchestration span (its id, its start) when it failed;
    # the rewound run gets an id and a start of its own instead of emitting that id again.
    kept = pb.OrchestrationTraceContext()
    kept.spanID.value = "failed-run"
    before = state(Status.RUNNING, trace_context=kept)
    action = pb.OrchestratorAction(id=-1)
    action.rewindOrchestration.newHistory.extend([*failed_history()[:2], rewound()])
    plan = core.plan_step(before, failed_history(), inbox(rewound()), NOW)
    assert isinstance(plan, core.Dispatch)
    response = respond(action)
    response.orchestrationTraceContext.spanID.value = "failed-run"  # the SDK hands it back
    result = core.apply_response(before, plan, response, NOW, ids())
    assert result.state.status == Status.RUNNING and result.state.trace_context is None


def test_a_completed_child_asked_to_rewind_reports_its_result_again() -> None:
    parent = pb.ParentInstanceInfo(taskScheduledId=5)
    parent.orchestrationInstance.instanceId = "dad"
    history = [
        ev.orchestrator_started(NOW),
        started(parent=parent),
        ev.execution_completed(NOW, Status.COMPLETED, "7", None),
    ]
    done = state(Status.COMPLETED, output="7")
    plan = core.plan_step(done, history, inbox(rewound()), NOW)
    assert isinstance(plan, core.Settle)
    (message,) = plan.result.messages
    assert message.target_instance_id == "dad"
    assert message.event.subOrchestrationInstanceCompleted.result.value == "7"


def test_a_step_handed_out_too_often_fails_the_orchestration_and_tells_the_parent() -> None:
    parent = pb.ParentInstanceInfo(taskScheduledId=2)
    parent.orchestrationInstance.instanceId = "dad"
    history = [ev.orchestrator_started(NOW), started(parent=parent)]
    raised = inbox(ev.event_raised(NOW, "x", None))
    fine = core.plan_step(state(Status.RUNNING), history, raised, NOW, core.MAX_STEP_ATTEMPTS)
    assert isinstance(fine, core.Dispatch)
    poisoned = core.plan_step(
        state(Status.RUNNING), history, raised, NOW, core.MAX_STEP_ATTEMPTS + 1
    )
    assert isinstance(poisoned, core.Settle)
    result = poisoned.result
    assert result.state.status == Status.FAILED
    assert result.state.failure is not None
    assert result.state.failure.errorType == "OrchestrationStepAbandonedError"
    assert result.consumed == (1,)
    (message,) = result.messages
    assert message.target_instance_id == "dad" and message.event.HasField(
        "subOrchestrationInstanceFailed"
    )


def test_running_activities_are_those_scheduled_without_a_result() -> None:
    def scheduled(task_id: int) -> pb.HistoryEvent:
        event = ev.new_event(NOW, task_id)
        event.taskScheduled.name = "act"
        return event

    failure = ev.failure("Boom", "it failed")
    events = [scheduled(i) for i in range(4)]
    assert core.running_activities(events) == 4
    events += [ev.task_completed(NOW, 0, '"a"'), ev.task_failed(NOW, 2, failure)]
    assert core.running_activities(events) == 2
    # a result for a task that was never scheduled does not count below zero
    assert core.running_activities([ev.task_completed(NOW, 9, None)]) == 0


def test_evolve_copies_a_value_with_changes_and_refuses_unknown_fields() -> None:
    from dt_trio._core import evolve

    state = InstanceState(
        instance_id="i1",
        name="o",
        execution_id="e1",
        status=Status.RUNNING,
        created_at=NOW,
        last_updated_at=NOW,
        tags={"a": "b"},
    )
    later = NOW + timedelta(seconds=1)
    moved = evolve(state, status=Status.COMPLETED, last_updated_at=later)
    assert moved == dataclasses.replace(state, status=Status.COMPLETED, last_updated_at=later)
    assert state.status == Status.RUNNING  # the original is untouched
    with pytest.raises(AssertionError, match="no such field"):
        evolve(state, stauts=Status.FAILED)
