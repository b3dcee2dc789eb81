"""What the dashboard draws of a history (table rows, timeline), with plain functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dt_trio._core import Status
from dt_trio._core import _events as ev
from dt_trio._dashboard import _history as hist
from dt_trio._proto import orchestrator_service_pb2 as pb

pytestmark = pytest.mark.store_independent

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def scheduled(seconds: float, task_id: int, name: str) -> pb.HistoryEvent:
    event = ev.new_event(at(seconds), task_id)
    event.taskScheduled.name = name
    return event


def timer(seconds: float, timer_id: int, fire_in: float) -> pb.HistoryEvent:
    event = ev.new_event(at(seconds), timer_id)
    ev.set_time(event.timerCreated.fireAt, at(seconds + fire_in))
    return event


HISTORY = [
    ev.orchestrator_started(at(0)),
    ev.execution_started(at(0), name="orders", instance_id="i", execution_id="e", input="1"),
    scheduled(0.1, 0, "charge"),
    scheduled(0.1, 1, "ship"),
    timer(0.1, 2, 5),
    ev.orchestrator_started(at(1)),
    ev.task_completed(at(1), 1, '"shipped"'),
    ev.task_failed(at(1.5), 0, ev.failure("CardDeclined", "no funds")),
    ev.event_raised(at(2), "approval", '"yes"'),
]


def test_rows_name_each_event_and_mark_failed_and_pending_ones() -> None:
    rows = hist.rows(HISTORY)
    assert [r.kind for r in rows] == [
        "OrchestratorStarted",
        "ExecutionStarted",
        "TaskScheduled",
        "TaskScheduled",
        "TimerCreated",
        "OrchestratorStarted",
        "TaskCompleted",
        "TaskFailed",
        "EventRaised",
    ]
    assert [r.name for r in rows][6:9] == ["ship", "charge", "approval"]
    assert rows[7].details == "CardDeclined: no funds"
    assert [r.index for r in rows if r.failed] == [7]
    assert [r.index for r in rows if r.pending] == [4]  # the timer has not fired
    assert rows[8].elapsed == 2.0
    assert [r.index for r in hist.rows(HISTORY, start=7)] == [7, 8]


def test_a_failed_execution_is_a_failed_row() -> None:
    done = ev.execution_completed(at(3), Status.FAILED, None, ev.failure("Boom", "it broke"))
    [row] = hist.rows([*HISTORY, done], start=len(HISTORY))
    assert row.failed and row.name == "FAILED" and row.details == "Boom: it broke"


def test_the_timeline_has_a_bar_per_scheduled_task_ended_by_its_own_result() -> None:
    line = hist.timeline(HISTORY)
    assert [(b.kind, b.label, b.end, b.failed) for b in line.bars] == [
        (hist.BarKind.ACTIVITY, "charge", at(1.5), True),
        (hist.BarKind.ACTIVITY, "ship", at(1), False),
        (hist.BarKind.TIMER, "TimerCreated", None, False),
    ]
    assert [(m.label, m.at) for m in line.marks] == [
        ("ExecutionStarted orders", at(0)),
        ("EventRaised approval", at(2)),
    ]


def test_the_layout_spans_the_history_and_draws_running_bars_to_now() -> None:
    geometry = hist.layout(hist.timeline(HISTORY), now=at(4))
    xs = {bar.label: (x, width) for x, _, width, bar in geometry.bars}
    assert xs["charge"][0] < xs["ship"][0] + 1  # both start at 0.1 s
    assert xs["TimerCreated"][0] + xs["TimerCreated"][1] == geometry.width - 10  # to now
    assert geometry.span_seconds == 4.0 and geometry.hidden_bars == 0
    many = hist.Timeline([hist.Bar(hist.BarKind.ACTIVITY, "a", at(0), at(1), False)] * 500, [])
    assert hist.layout(many, at(1)).hidden_bars == 500 - hist.TIMELINE_MAX_BARS
