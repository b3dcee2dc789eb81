"""Constructors and accessors for history events (plain protobuf, no I/O)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from dt_trio._proto import orchestrator_service_pb2 as pb

HistoryEvent = pb.HistoryEvent


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def utc(dt: datetime) -> datetime:
    """Return `dt` as an aware UTC datetime (naive values are taken as UTC)."""
    if dt.tzinfo is UTC:
        return dt
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def to_datetime(ts: object) -> datetime:
    """A protobuf Timestamp as an aware UTC datetime (to the microsecond)."""
    seconds: int = ts.seconds  # type: ignore[attr-defined]
    nanos: int = ts.nanos  # type: ignore[attr-defined]
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def checked_time(ts: Any, field: str) -> datetime:
    """A Timestamp a peer sent, as `to_datetime` reads it; ValueError naming `field` if it is
    no time (nanos out of range, seconds beyond the years 1..9999)."""
    if not 0 <= ts.nanos < 1_000_000_000:
        raise ValueError(f"{field} has nanos={ts.nanos}, outside 0..999999999")
    try:
        return to_datetime(ts)
    except (ValueError, OverflowError, OSError) as exc:
        raise ValueError(f"{field} is not a valid timestamp ({exc})") from None


def optional_time(
    parent: Any, field: str, error: Callable[[str], Exception] = ValueError
) -> datetime | None:
    """`parent`'s Timestamp `field` as `checked_time` reads it, None where it is not set;
    `error` (with `checked_time`'s message) where it is no time."""
    if not parent.HasField(field):
        return None
    try:
        return checked_time(getattr(parent, field), field)
    except ValueError as exc:
        raise error(str(exc)) from None


def set_time(ts: object, dt: datetime) -> None:
    """Fill a protobuf Timestamp with `dt` (naive values are taken as UTC). Integer arithmetic
    on the datetime: Timestamp.FromDatetime goes through a time tuple and costs several
    times as much, on every event of every step."""
    seconds, micros = divmod((utc(dt) - _EPOCH) // _MICROSECOND, 1_000_000)
    ts.seconds = seconds  # type: ignore[attr-defined]
    ts.nanos = micros * 1000  # type: ignore[attr-defined]


def new_event(now: datetime, event_id: int = -1) -> pb.HistoryEvent:
    """An empty history event stamped `now`; the caller sets its oneof payload."""
    event = pb.HistoryEvent(eventId=event_id)
    set_time(event.timestamp, now)
    return event


def set_str(wrapper: object, value: str | None) -> None:
    """Fill a google.protobuf.StringValue sub-message, leaving it unset for None."""
    if value is not None:
        wrapper.value = value  # type: ignore[attr-defined]


def opt_str(parent: object, field: str) -> str | None:
    """Read a StringValue field: None when unset."""
    if parent.HasField(field):  # type: ignore[attr-defined]
        return getattr(parent, field).value  # type: ignore[no-any-return]
    return None


def orchestrator_started(now: datetime) -> pb.HistoryEvent:
    event = new_event(now)
    event.orchestratorStarted.SetInParent()
    return event


def orchestrator_completed(now: datetime) -> pb.HistoryEvent:
    event = new_event(now)
    event.orchestratorCompleted.SetInParent()
    return event


def execution_started(
    now: datetime,
    *,
    name: str,
    instance_id: str,
    execution_id: str,
    input: str | None,
    version: str | None = None,
    tags: Mapping[str, str] | None = None,
    scheduled_start: datetime | None = None,
    parent: pb.ParentInstanceInfo | None = None,
    parent_trace_context: pb.TraceContext | None = None,
) -> pb.HistoryEvent:
    event = new_event(now)
    started = event.executionStarted
    started.name = name
    started.orchestrationInstance.instanceId = instance_id
    started.orchestrationInstance.executionId.value = execution_id
    set_str(started.input, input)
    set_str(started.version, version)
    if tags:
        started.tags.update(tags)
    if scheduled_start is not None:
        set_time(started.scheduledStartTimestamp, scheduled_start)
    if parent is not None:
        started.parentInstance.CopyFrom(parent)
    if parent_trace_context is not None and parent_trace_context.ByteSize():
        started.parentTraceContext.CopyFrom(parent_trace_context)
    return event


def execution_completed(
    now: datetime,
    status: int,
    result: str | None,
    failure: pb.TaskFailureDetails | None,
) -> pb.HistoryEvent:
    event = new_event(now)
    completed = event.executionCompleted
    completed.orchestrationStatus = status  # type: ignore[assignment]
    set_str(completed.result, result)
    if failure is not None:
        completed.failureDetails.CopyFrom(failure)
    return event


def execution_terminated(now: datetime, reason: str | None, recurse: bool) -> pb.HistoryEvent:
    event = new_event(now)
    set_str(event.executionTerminated.input, reason)
    event.executionTerminated.recurse = recurse
    event.executionTerminated.SetInParent()
    return event


def execution_suspended(now: datetime, reason: str | None) -> pb.HistoryEvent:
    event = new_event(now)
    event.executionSuspended.SetInParent()
    set_str(event.executionSuspended.input, reason)
    return event


def execution_resumed(now: datetime, reason: str | None) -> pb.HistoryEvent:
    event = new_event(now)
    event.executionResumed.SetInParent()
    set_str(event.executionResumed.input, reason)
    return event


def event_raised(now: datetime, name: str, input: str | None) -> pb.HistoryEvent:
    event = new_event(now)
    event.eventRaised.name = name
    set_str(event.eventRaised.input, input)
    return event


def task_completed(now: datetime, task_id: int, result: str | None) -> pb.HistoryEvent:
    event = new_event(now)
    event.taskCompleted.taskScheduledId = task_id
    set_str(event.taskCompleted.result, result)
    return event


def task_failed(now: datetime, task_id: int, failure: pb.TaskFailureDetails) -> pb.HistoryEvent:
    event = new_event(now)
    event.taskFailed.taskScheduledId = task_id
    event.taskFailed.failureDetails.CopyFrom(failure)
    return event


def timer_fired(now: datetime, timer_id: int, fire_at: datetime) -> pb.HistoryEvent:
    event = new_event(now)
    event.timerFired.timerId = timer_id
    set_time(event.timerFired.fireAt, fire_at)
    return event


def sub_orchestration_completed(now: datetime, task_id: int, result: str | None) -> pb.HistoryEvent:
    event = new_event(now)
    event.subOrchestrationInstanceCompleted.taskScheduledId = task_id
    set_str(event.subOrchestrationInstanceCompleted.result, result)
    return event


def sub_orchestration_failed(
    now: datetime, task_id: int, failure: pb.TaskFailureDetails
) -> pb.HistoryEvent:
    event = new_event(now)
    event.subOrchestrationInstanceFailed.taskScheduledId = task_id
    event.subOrchestrationInstanceFailed.failureDetails.CopyFrom(failure)
    return event


def failure(error_type: str, message: str, *, non_retriable: bool = True) -> pb.TaskFailureDetails:
    """Failure details for a failure decided by the engine rather than user code."""
    return pb.TaskFailureDetails(
        errorType=error_type, errorMessage=message, isNonRetriable=non_retriable
    )


def kind(event: pb.HistoryEvent) -> str:
    """The name of the event's payload ('executionStarted', 'taskCompleted', ...)."""
    return event.WhichOneof("eventType") or ""
