"""The replay engine alone: history in, actions out, with plain functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dt_trio import OrchestrationContext, when_any
from dt_trio._core import _events as ev
from dt_trio._local import run_orchestrator
from dt_trio._local._replay import ReplayCache
from dt_trio._proto import orchestrator_service_pb2 as pb

pytestmark = pytest.mark.store_independent

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


# -- kept between steps ---------------------------------------------------------------------


def counted(calls: list[str]) -> Any:
    """two_steps that notes each time its body runs a line."""

    def orchestrator(ctx: OrchestrationContext, n: int) -> Any:
        calls.append("start")
        a = yield ctx.call_activity("add_one", input=n)
        calls.append(f"got {a}")
        b = yield ctx.call_activity("add_one", input=a)
        return [a, b]

    return orchestrator


def steps_of_two_calls() -> list[pb.OrchestratorRequest]:
    """The requests of two_steps' three steps, each history as the store keeps it."""
    first = request([], start("1"))
    past = [*start("1"), scheduled(0, "add_one")]
    second_new = [ev.orchestrator_started(NOW), ev.task_completed(NOW, 0, "2")]
    second = request(past, second_new)
    past = [*past, *second_new, scheduled(1, "add_one")]
    third = request(past, [ev.orchestrator_started(NOW), ev.task_completed(NOW, 1, "3")])
    return [first, second, third]


def test_a_kept_orchestrator_resumes_where_it_stopped_with_the_same_answers() -> None:
    cache = ReplayCache()
    replayed: list[str] = []
    kept: list[str] = []
    plain_fn, kept_fn = counted(replayed), counted(kept)
    for step in steps_of_two_calls():
        assert run_orchestrator(kept_fn, step, cache) == run_orchestrator(plain_fn, step)
    assert replayed == ["start", "start", "got 2", "start", "got 2"]
    assert kept == ["start", "got 2"]
    assert len(cache) == 0  # a finished orchestration is not kept


def test_a_history_other_than_the_kept_one_is_replayed_from_the_start() -> None:
    cache = ReplayCache()
    calls: list[str] = []
    fn = counted(calls)
    first, second, _ = steps_of_two_calls()
    run_orchestrator(fn, first, cache)
    run_orchestrator(fn, second, cache)
    assert len(cache) == 1
    # The second step's commit failed: it runs again on the same past, with more news.
    again = request(
        list(second.pastEvents),
        [
            ev.orchestrator_started(NOW),
            ev.task_completed(NOW, 0, "2"),
            ev.event_raised(NOW, "x", None),
        ],
    )
    calls.clear()
    run_orchestrator(fn, again, cache)
    assert calls == ["start", "got 2"]
    # Another execution of the instance starts afresh.
    calls.clear()
    fresh = request([], start("5"))
    fresh.executionId.value = "x2"
    run_orchestrator(fn, fresh, cache)
    assert calls == ["start"]
    # So does other code registered under the orchestrator's name meanwhile.
    first, second, _ = steps_of_two_calls()
    run_orchestrator(fn, first, cache)
    calls.clear()
    other: list[str] = []
    run_orchestrator(counted(other), second, cache)
    assert (calls, other) == ([], ["start", "got 2"])


def test_the_cache_keeps_the_most_recently_run_orchestrators() -> None:
    cache = ReplayCache(capacity=2)
    fn = counted([])
    for instance in ("a", "b", "c"):
        step = request([], start("1"))
        step.instanceId = instance
        run_orchestrator(fn, step, cache)
    assert sorted(cache.instances()) == ["b", "c"]
