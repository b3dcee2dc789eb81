"""What each operation of the engine commits: the table of docs/store.md, as functions.

Each function returns the `Commit` of one operation (a client's start or event, a step, an
activity's result, a lease given back); the engine applies it with `Backend.apply`. Which
leases a commit takes beside its writes (`take`, `Ahead`) is the dispatcher's decision; what
they mean is the same everywhere.

Everything here is pure: time comes in as an argument.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

from dt_trio._core._commit import (
    ActivityWorkItem,
    AsFound,
    Attempts,
    Commit,
    Creatable,
    CreateInstance,
    DeleteActivity,
    DropPending,
    EntityWorkItem,
    Exists,
    Holds,
    InStatus,
    Lease,
    OrchestrationWorkItem,
    Release,
    Reopen,
    Send,
    TakeActivities,
    TakeInstance,
    Unchanged,
    WorkKind,
    WriteEntityStep,
    WriteStep,
)
from dt_trio._core._entities import EntityStepResult
from dt_trio._core._state import InstanceState, OutboundMessage, Status, StepResult, value
from dt_trio._proto import orchestrator_service_pb2 as pb

FINISHED = frozenset(s for s in Status if s.is_terminal)


@value
class Ahead:
    """A step run before the commit that would lease its instance for it (the instance's
    creation, an activity's result), to be committed in that commit instead: its `result`,
    when the instance it ran on was last updated (`found_update`), and how many of its
    activities to lease to `owner` beside it (a hand-over)."""

    result: StepResult
    found_update: datetime
    owner: str
    activities: int = 0


def start(
    state: InstanceState,
    started: pb.HistoryEvent,
    visible_at: datetime,
    now: datetime,
    replaceable: Collection[Status] | None = None,
    take: str | None = None,
    ahead: Ahead | None = None,
) -> Commit:
    """Create an instance with its ExecutionStarted message, visible at `visible_at`.

    An existing instance is replaced if its status is in `replaceable` (default: finished);
    otherwise the commit fails with InstanceExists. With `take`, the instance is leased to
    that owner if it can start now. With `ahead` (its first step, run on `started`), the
    instance is created with that step committed instead: no message, no lease."""
    guard = Creatable(
        state.instance_id, FINISHED if replaceable is None else frozenset(replaceable)
    )
    if ahead is not None:
        return Commit(
            now,
            (CreateInstance(state, None, now), WriteStep(ahead.result)),
            (guard,),
            (TakeActivities(ahead.owner, ahead.activities),) if ahead.activities else (),
        )
    return Commit(
        now,
        (CreateInstance(state, started, visible_at),),
        (guard,),
        (TakeInstance(take, state.instance_id),) if take is not None else (),
    )


def send_event(instance_id: str, event: pb.HistoryEvent, now: datetime) -> Commit:
    """Put an event (raised, suspend, resume, terminate) into an existing instance's inbox;
    InstanceNotFound if there is no such instance."""
    return Commit(now, (Send((OutboundMessage(instance_id, event),)),), (Exists(instance_id),))


def signal_entity(
    entity_id: str, event: pb.HistoryEvent, visible_at: datetime, now: datetime
) -> Commit:
    """Queue an operation for an entity (which comes into being with it)."""
    return Commit(now, (Send((OutboundMessage(entity_id, event, visible_at),)),))


def rewind(instance_id: str, rewound: pb.HistoryEvent, now: datetime) -> Commit:
    """Run a failed instance again: its ExecutionRewound event goes into its inbox."""
    return Commit(
        now,
        (Reopen(instance_id), Send((OutboundMessage(instance_id, rewound),))),
        (InStatus(instance_id, Status.FAILED, "only a failed instance can be rewound"),),
    )


def step(lease: Lease, result: StepResult, now: datetime, take_activities: int = 0) -> Commit:
    """Commit a step of an instance leased with `lease`; up to `take_activities` of the
    activities it schedules are leased to the same owner in the same commit."""
    return Commit(
        now,
        (WriteStep(result),),
        (Holds(WorkKind.ORCHESTRATION, result.state.instance_id, lease),),
        (TakeActivities(lease.owner, take_activities),) if take_activities else (),
    )


def terminate_forced(result: StepResult, found_update: datetime, now: datetime) -> Commit:
    """Commit `result` (a termination that does not wait for the orchestrator) over whatever
    the instance is doing, if it is not finished and was not updated since `found_update`:
    its pending messages and activities are dropped and a step in flight loses its lease.
    Otherwise nothing is written (`Applied.alternative`)."""
    instance_id = result.state.instance_id
    return Commit(
        now,
        (DropPending(instance_id), WriteStep(result)),
        (Unchanged(instance_id, found_update),),
        otherwise=Commit(now, ()),
    )


def release(
    item: OrchestrationWorkItem | EntityWorkItem,
    now: datetime,
    attempts: Attempts,
    message_ids: Sequence[int] = (),
    until: datetime | None = None,
) -> Commit:
    """Give an instance's or an entity's lease back; its `message_ids` become visible at
    `until`."""
    if isinstance(item, OrchestrationWorkItem):
        kind, key = WorkKind.ORCHESTRATION, item.state.instance_id
    else:
        kind, key = WorkKind.ENTITY, item.entity.instance_id
    return Commit(now, (Release(kind, key, item.lease, attempts, tuple(message_ids), until),))


def deliver_result(
    item: ActivityWorkItem,
    result: pb.HistoryEvent,
    now: datetime,
    take: str | None = None,
    ahead: Ahead | None = None,
) -> Commit:
    """Delete the activity and deliver its `result` to the execution that scheduled it (the
    result is dropped if that execution is over). With `take`, the instance is leased to that
    owner too if nobody leases it. With `ahead` (the instance's step on the result alone),
    that step is committed with the result in its history if the instance is as the step
    found it; otherwise the result is delivered as without it."""
    holds = Holds(WorkKind.ACTIVITY, item.id, item.lease)
    plain = Commit(
        now,
        (
            DeleteActivity(item.id),
            Send((OutboundMessage(item.instance_id, result, None, item.execution_id),)),
        ),
        (holds,),
        (TakeInstance(take, item.instance_id),) if take is not None else (),
    )
    if ahead is None:
        return plain
    return Commit(
        now,
        (DeleteActivity(item.id), WriteStep(ahead.result)),
        (holds, AsFound(item.instance_id, item.execution_id, ahead.found_update)),
        (TakeActivities(ahead.owner, ahead.activities),) if ahead.activities else (),
        plain,
    )


def release_activity(
    item: ActivityWorkItem, now: datetime, attempts: Attempts, until: datetime | None = None
) -> Commit:
    """Give an activity's lease back; it is handed out again from `until` (None: at once)."""
    return Commit(now, (Release(WorkKind.ACTIVITY, item.id, item.lease, attempts, (), until),))


def entity_step(item: EntityWorkItem, result: EntityStepResult, now: datetime) -> Commit:
    """Commit a step of an entity leased as `item`."""
    holds = Holds(WorkKind.ENTITY, item.entity.instance_id, item.lease)
    return Commit(now, (WriteEntityStep(result),), (holds,))
