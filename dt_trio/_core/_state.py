"""Values that describe an orchestration instance and the result of one step.

These are what the core computes and what a store persists; they carry protobuf history events
but no I/O handles.
"""

from __future__ import annotations

import enum
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from dt_trio._core import _events as ev
from dt_trio._proto import orchestrator_service_pb2 as pb


class Status(enum.IntEnum):
    """Runtime status, numbered as the protocol's OrchestrationStatus."""

    RUNNING = 0
    COMPLETED = 1
    CONTINUED_AS_NEW = 2
    FAILED = 3
    CANCELED = 4
    TERMINATED = 5
    PENDING = 6
    SUSPENDED = 7

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def label(self) -> str:
        return self.name.lower()


_TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.TERMINATED, Status.CANCELED})

V = TypeVar("V")


def evolve(value: V, **changes: Any) -> V:
    """A copy of a frozen dataclass value of this package with `changes`: what
    dataclasses.replace does, at a sixth of its cost (it runs several times per step; these
    values have no __post_init__ to run again)."""
    new = object.__new__(type(value))
    fields = new.__dict__
    fields.update(value.__dict__)
    assert changes.keys() <= fields.keys(), f"no such field: {changes.keys() - fields.keys()}"
    fields.update(changes)
    return new


@typing.dataclass_transform(frozen_default=True)
def value(cls: type[V]) -> type[V]:
    """A dataclass for a value built on the hot path (each commit's guards, writes and answer,
    work items, messages): immutable to the type checker, which treats it as frozen, and
    hashable by its fields, but without frozen's guard at run time. That guard sets every
    field through object.__setattr__ and made these values cost four times as much to build:
    on the local API's hello cities it was 5% of all the work the hub did."""
    return dataclass(unsafe_hash=True)(cls)


@dataclass(frozen=True)
class InstanceState:
    """The stored summary of one orchestration instance (one row of the instances table)."""

    instance_id: str
    name: str
    execution_id: str
    status: Status
    created_at: datetime
    last_updated_at: datetime
    version: str | None = None
    input: str | None = None
    output: str | None = None
    custom_status: str | None = None
    failure: pb.TaskFailureDetails | None = None
    completed_at: datetime | None = None
    scheduled_start_at: datetime | None = None
    parent_instance_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    # The SDK's span of this execution, handed back on every step so its traces connect.
    trace_context: pb.OrchestrationTraceContext | None = None


def new_instance(
    now: datetime,
    name: str,
    instance_id: str,
    execution_id: str,
    *,
    input: str | None,
    version: str | None = None,
    tags: Mapping[str, str] | None = None,
    start_at: datetime | None = None,
    parent: pb.ParentInstanceInfo | None = None,
    trace: pb.TraceContext | None = None,
) -> tuple[InstanceState, pb.HistoryEvent]:
    """A new instance, PENDING until its first step, and the ExecutionStarted event that
    starts it (at `start_at`, if given; a sub-orchestration's `parent`; the caller's span as
    its `trace`): a client's start, an entity's, a parent's."""
    state = InstanceState(
        instance_id=instance_id,
        name=name,
        execution_id=execution_id,
        status=Status.PENDING,
        created_at=now,
        last_updated_at=now,
        version=version,
        input=input,
        scheduled_start_at=start_at,
        parent_instance_id=parent.orchestrationInstance.instanceId if parent else None,
        tags=dict(tags or {}),
    )
    started = ev.execution_started(
        now,
        name=name,
        instance_id=instance_id,
        execution_id=execution_id,
        input=input,
        version=version,
        tags=tags,
        scheduled_start=start_at,
        parent=parent,
        parent_trace_context=trace,
    )
    return state, started


@value
class InboxMessage:
    """An event waiting in an instance's inbox; `id` orders messages and names them on commit."""

    id: int
    event: pb.HistoryEvent


@value
class OutboundMessage:
    """An event to deliver to an instance's inbox, visible from `visible_at` (None: at once).

    A message to an orchestration that does not exist, or (when `execution_id` is given) no
    longer runs that execution, is dropped by the store. A message to an entity (`@name@key`)
    goes to the entity's queue, creating the entity if needed.
    """

    target_instance_id: str
    event: pb.HistoryEvent
    visible_at: datetime | None = None
    execution_id: str | None = None


@value
class NewInstance:
    """An instance to create with its ExecutionStarted event (a sub-orchestration, or an
    orchestration an entity starts).

    If an instance with that id exists and is not terminal (or exists at all, when
    `replace_finished` is false), the store delivers `on_conflict` instead (or nothing): for a
    new sub-orchestration the parent learns that it could not start; for a rewind the existing
    child is told to rewind.
    """

    state: InstanceState
    started: pb.HistoryEvent
    on_conflict: OutboundMessage | None
    replace_finished: bool = True


@value
class ActivityTask:
    """An activity to run: its TaskScheduled event (eventId = task id) and its orchestration."""

    instance_id: str
    execution_id: str
    scheduled: pb.HistoryEvent


@dataclass(frozen=True)
class StepResult:
    """Everything one orchestration step commits, in one transaction.

    `consumed` inbox messages are deleted; `history` is appended (after deleting the old history
    when `reset_history`, for continue-as-new); the instance row becomes `state`; the outbox
    (`activities`, `messages`, `new_instances`) is enqueued. On continue-as-new the messages to
    the instance itself (its new start and carried-over events) are queued ahead of the events
    that arrived while the step ran.
    """

    state: InstanceState
    consumed: tuple[int, ...]
    history: list[pb.HistoryEvent]
    reset_history: bool = False
    activities: list[ActivityTask] = field(default_factory=list)
    messages: list[OutboundMessage] = field(default_factory=list)
    new_instances: list[NewInstance] = field(default_factory=list)
