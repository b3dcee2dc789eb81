"""Rows of the PostgreSQL store as the core's values, and back."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb

from dt_trio._core import EntityState, InstanceState, Status
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store import _rows
from dt_trio._store._rows import INSTANCE_COLUMNS, INSTANCE_FIELDS, event, from_us, us

__all__ = [
    "ENTITY_COLUMNS",
    "INSTANCE_COLUMNS",
    "INSTANCE_FIELDS",
    "event",
    "from_us",
    "state_values",
    "to_entity",
    "to_state",
    "us",
    "utc",
]

# An entity's columns, its backlog counted (from `entities e`), in the order of `to_entity`.
ENTITY_COLUMNS = (
    "e.instance_id, e.state, e.last_modified_at, e.locked_by, e.lock_owner, "
    "(SELECT count(*) FROM entity_inbox m WHERE m.instance_id = e.instance_id)"
)


def utc(dt: datetime) -> datetime:
    """A time to write: naive times are UTC, as everywhere in dt-trio."""
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


# (a partial: no call more than the shared function's, on every step's commit)
state_values = functools.partial(_rows.state_values, time=utc, tags=Jsonb)


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
