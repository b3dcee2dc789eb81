"""Values the store and engine tests build by hand: the time, an instance and its start."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from dt_trio._core import InstanceState, Status
from dt_trio._core import _events as ev
from dt_trio._proto import orchestrator_service_pb2 as pb


def now() -> datetime:
    return datetime.now(UTC)


def new_state(instance_id: str = "i1", **fields: Any) -> InstanceState:
    """A pending instance of 'orch' created now (execution 'e0', input '"x"', a tag), with
    `fields` changed."""
    t = now()
    state = InstanceState(
        instance_id=instance_id,
        name="orch",
        execution_id="e0",
        status=Status.PENDING,
        created_at=t,
        last_updated_at=t,
        input='"x"',
        tags={"team": "a"},
    )
    return dataclasses.replace(state, **fields)


def started(state: InstanceState) -> pb.HistoryEvent:
    """The ExecutionStarted event of `state`, as of now."""
    return ev.execution_started(
        now(),
        name=state.name,
        instance_id=state.instance_id,
        execution_id=state.execution_id,
        input=state.input,
    )
