"""Rows of the PostgreSQL store as the core's values, and back."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.types.json import Jsonb

from dt_trio._core import EntityState, InstanceState, Status
from dt_trio._proto import orchestrator_service_pb2 as pb

# The columns of an InstanceState, in the order of `state_values` and `to_state`.
INSTANCE_COLUMNS = (
    "instance_id, name, version, execution_id, status, input, output, custom_status, failure, "
    "created_at, last_updated_at, completed_at, scheduled_start_at, parent_instance_id, tags, "
    "trace_context"
)
INSTANCE_FIELDS = 16
# An entity's columns, its backlog counted (from `entities e`), in the order of `to_entity`.
ENTITY_COLUMNS = (
    "e.instance_id, e.state, e.last_modified_at, e.locked_by, e.lock_owner, "
    "(SELECT count(*) FROM entity_inbox m WHERE m.instance_id = e.instance_id)"
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def us(dt: datetime) -> int:
    """Microseconds since the epoch (a page key's time, as the sqlite store has it)."""
    return ((dt if dt.tzinfo else dt.replace(tzinfo=UTC)) - _EPOCH) // _MICROSECOND


def from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def utc(dt: datetime) -> datetime:
    """A time to write: naive times are UTC, as everywhere in dt-trio."""
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def state_values(state: InstanceState) -> tuple[object, ...]:
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
        utc(state.created_at),
        utc(state.last_updated_at),
        utc(state.completed_at) if state.completed_at else None,
        utc(state.scheduled_start_at) if state.scheduled_start_at else None,
        state.parent_instance_id,
        Jsonb(dict(state.tags)) if state.tags else None,
        state.trace_context.SerializeToString() if state.trace_context is not None else None,
    )


def to_state(row: Sequence[Any]) -> InstanceState:
    """An InstanceState from a row whose first columns are INSTANCE_COLUMNS."""
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
        created_at=row[9],
        last_updated_at=row[10],
        completed_at=row[11],
        scheduled_start_at=row[12],
        parent_instance_id=row[13],
        tags=row[14] or {},
        trace_context=pb.OrchestrationTraceContext.FromString(row[15]) if row[15] else None,
    )


def to_entity(row: Sequence[Any]) -> EntityState:
    """An EntityState from a row whose first columns are ENTITY_COLUMNS."""
    return EntityState(
        instance_id=row[0],
        state=row[1],
        last_modified_at=row[2],
        locked_by=row[3],
        lock_owner=row[4],
        backlog=row[5],
    )


def event(blob: bytes) -> pb.HistoryEvent:
    return pb.HistoryEvent.FromString(blob)
