"""What the two stores' rows have in common: an instance row's columns, in order, the values
of an InstanceState for them and the InstanceState of a row (each store writes and reads times
and tags its own way); page keys' times as integer microseconds; history events as their
protobuf bytes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from dt_trio._core import InstanceState, Status
from dt_trio._proto import orchestrator_service_pb2 as pb

# The columns of an InstanceState, in the order of `state_values` and `state_of`.
INSTANCE_COLUMNS = (
    "instance_id, name, version, execution_id, status, input, output, custom_status, failure, "
    "created_at, last_updated_at, completed_at, scheduled_start_at, parent_instance_id, tags, "
    "trace_context"
)
INSTANCE_FIELDS = 16

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def us(dt: datetime) -> int:
    """Microseconds since the epoch (naive times are UTC). Exact integer arithmetic: a time
    read back compares equal to the one written."""
    return ((dt if dt.tzinfo else dt.replace(tzinfo=UTC)) - _EPOCH) // _MICROSECOND


def from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def event(blob: bytes) -> pb.HistoryEvent:
    return pb.HistoryEvent.FromString(blob)


def state_values(
    state: InstanceState,
    *,
    time: Callable[[datetime], object],
    tags: Callable[[dict[str, str]], object],
) -> tuple[object, ...]:
    """The values of INSTANCE_COLUMNS for `state`, in order, its times written by `time` and
    its tags (if any) by `tags`."""
    return (
        state.instance_id,
        state.name,
        state.version,
        state.execution_id,
        int(state.status),
        state.input,
        state.output,
        state.custom_status,
        state.failure.SerializeToString() if state.failure is not None else None,
        time(state.created_at),
        time(state.last_updated_at),
        time(state.completed_at) if state.completed_at else None,
        time(state.scheduled_start_at) if state.scheduled_start_at else None,
        state.parent_instance_id,
        tags(dict(state.tags)) if state.tags else None,
        state.trace_context.SerializeToString() if state.trace_context is not None else None,
    )


def state_of(
    row: Sequence[Any],
    *,
    time: Callable[[Any], Any],
    tags: Callable[[Any], dict[str, str]],
) -> InstanceState:
    """The InstanceState of a row whose first columns are INSTANCE_COLUMNS, its times read by
    `time` and its tags (if any) by `tags`: what `state_values` wrote."""
    return InstanceState(
        instance_id=row[0],
        name=row[1],
        version=row[2],
        execution_id=row[3],
        status=Status(row[4]),
        input=row[5],
        output=row[6],
        custom_status=row[7],
        failure=pb.TaskFailureDetails.FromString(row[8]) if row[8] else None,
        created_at=time(row[9]),
        last_updated_at=time(row[10]),
        completed_at=time(row[11]) if row[11] is not None else None,
        scheduled_start_at=time(row[12]) if row[12] is not None else None,
        parent_instance_id=row[13],
        tags=tags(row[14]) if row[14] else {},
        trace_context=pb.OrchestrationTraceContext.FromString(row[15]) if row[15] else None,
    )
