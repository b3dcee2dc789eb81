"""Rows of the PostgreSQL store as the core's values, and back."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb

from dt_trio._core import EntityState
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


def _as_read(value: Any) -> Any:
    return value  # psycopg reads times and JSON as Python values already


# The InstanceState of a row whose first columns are INSTANCE_COLUMNS.
to_state = functools.partial(_rows.state_of, time=_as_read, tags=_as_read)


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
