"""The replay engine alone: history in, actions out, with plain functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from dt_trio import OrchestrationContext, when_any
from dt_trio._core import _events as ev
from dt_trio._local import run_orchestrator
from dt_trio._proto import orchestrator_service_pb2 as pb

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def request(past: list[pb.HistoryEvent], new: list[pb.HistoryEvent]) -> pb.OrchestratorRequest:
    req = pb.OrchestratorRequest(instanceId="i1", pastEvents=past, newEvents=new)
    req.executionId.value = "x1"
    return req


def start(input: str | None = None) -> list[pb.HistoryEvent]:
    return [
        ev.orchestrator_started(NOW),
        ev.execution_started(NOW, name="o", instance_id="i1", execution_id="x1", input=input),
    ]


def scheduled(task_id: int, name: str) -> pb.HistoryEvent:
    event = ev.new_event(NOW, task_id)
    event.taskScheduled.name = name
    return event


def two_steps(ctx: OrchestrationContext, n: int) -> Any:
    a = yield ctx.call_activity("add_one", input=n)
    b = yield ctx.call_activity("add_one", input=a)
    return [a, b]


def test_the_first_step_schedules_the_first_call() -> None:
    response = run_orchestrator(two_steps, request([], start("1")))
    [action] = response.actions
    assert action.id == 0 and action.scheduleTask.name == "add_one"
    assert action.scheduleTask.input.value == "1"


def test_a_result_resumes_the_code_and_the_last_one_completes_it() -> None:
    past = [*start("1"), scheduled(0, "add_one")]
    second = run_orchestrator(
        two_steps, request(past, [ev.orchestrator_started(NOW), ev.task_completed(NOW, 0, "2")])
    )
    [action] = second.actions
    assert action.id == 1 and action.scheduleTask.input.value == "2"
    past += [ev.task_completed(NOW, 0, "2"), scheduled(1, "add_one")]
    done = run_orchestrator(two_steps, request(past, [ev.task_completed(NOW, 1, "3")]))
    [complete] = done.actions
    assert complete.completeOrchestration.orchestrationStatus == pb.ORCHESTRATION_STATUS_COMPLETED
    assert complete.completeOrchestration.result.value == "[2, 3]"


def test_a_different_call_on_replay_is_a_non_determinism_failure() -> None:
    past = [*start("1"), scheduled(0, "subtract_one")]
    response = run_orchestrator(two_steps, request(past, [ev.task_completed(NOW, 0, "0")]))
    [complete] = response.actions
    details = complete.completeOrchestration.failureDetails
    assert complete.completeOrchestration.orchestrationStatus == pb.ORCHESTRATION_STATUS_FAILED
    assert details.errorType.endswith("NonDeterminismError")
    assert "activity 'subtract_one'" in details.errorMessage
    assert "'add_one'" in details.errorMessage


def test_events_wait_while_suspended_and_time_is_the_steps_own() -> None:
    def race(ctx: OrchestrationContext, _: Any) -> Any:
        event = ctx.wait_for_external_event("go")
        timer = ctx.create_timer(timedelta(hours=1))
        winner = yield when_any([event, timer])
        return [winner is event, ctx.current_utc_datetime.isoformat()]

    later = NOW + timedelta(minutes=5)
    suspended = ev.execution_suspended(later, None)
    raised = ev.event_raised(later, "GO", '"yes"')
    held = run_orchestrator(race, request(start(), [suspended, raised]))
    assert [a.WhichOneof("orchestratorActionType") for a in held.actions] == ["createTimer"]
    assert held.actions[0].createTimer.fireAt.ToDatetime(tzinfo=UTC) == NOW + timedelta(hours=1)
    resumed = run_orchestrator(
        race,
        request(
            start(),
            [ev.orchestrator_started(later), suspended, raised, ev.execution_resumed(later, None)],
        ),
    )
    complete = resumed.actions[-1].completeOrchestration
    assert complete.result.value == f'[true, "{later.isoformat()}"]'
