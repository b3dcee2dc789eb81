"""What the two stores' rows have in common: an instance row's columns, in order, and the
values of an InstanceState for them (each store writes times and tags its own way); page keys'
times as integer microseconds; history events as their protobuf bytes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from dt_trio._core import InstanceState
from dt_trio._proto import orchestrator_service_pb2 as pb

# The columns of an InstanceState, in the order of `state_values` (and of each store's reader).
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
