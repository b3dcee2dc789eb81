"""What one store transaction does, as a value: a `Commit`, and what it leased: `Applied`.

The engine decides what to write: the core turns a step's result into writes, and the
dispatcher adds the leases to take beside them. A store applies a `Commit` in one transaction,
all of it or nothing, and answers with what it leased. A store knows nothing of steps run
ahead, work sent early, pacing or hand-overs: the same `Commit` means the same to sqlite and to
PostgreSQL, and a test can build one by hand.

A `Commit` is:

- `guards`: conditions checked first, in order. The first that fails decides: if the commit
  has an `otherwise`, that commit is applied instead (`Applied.alternative`); if not, the
  guard's error is raised and nothing is written.
- `writes`: applied in order.
- `take`: leases taken after the writes, in the same transaction (a hand-over: the work starts
  at once, without a lease transaction of its own).

Words: a *lease* is a processor's claim on a work item (an instance's next step, an activity,
an entity's next batch): who holds it (`owner`, one per hub process) and which grant it is
(`epoch`, a fencing token the store increases at every lease of the row). A *lock* is only ever
an entity's critical section. An *attempt* is one try at a work item; failed attempts count
towards the poison cap.

Everything here is pure data: no trio, sqlite or gRPC.
"""

from __future__ import annotations

import enum
from datetime import datetime

from dt_trio._core._entities import EntityState, EntityStepResult, is_entity_id
from dt_trio._core._state import (
    InboxMessage,
    InstanceState,
    OutboundMessage,
    Status,
    StepResult,
    value,
)
from dt_trio._proto import orchestrator_service_pb2 as pb


class WorkKind(enum.StrEnum):
    """The three kinds of work a hub leases and hands to workers. (A str enum: it keys the
    executor's queues and counters, and str's hash is a C call where Enum's is Python's.)"""

    ORCHESTRATION = "orchestration"
    ACTIVITY = "activity"
    ENTITY = "entity"


@value
class Lease:
    """One grant of a work item to a hub process: `owner` names the process, `epoch` the
    grant. A write guarded by a lease is refused unless the row is still leased to `owner` at
    `epoch`: a stale holder (its lease expired and another took the work) changes nothing.

    A store grants epochs from 1 up. Epoch 0 is never granted: it marks a work item built
    before the commit that will lease it (work sent to a worker early, a step run ahead); the
    commit's `Applied` carries the item as leased."""

    owner: str
    epoch: int


# -- work items: what a lease hands a processor ---------------------------------------------


@value
class OrchestrationWorkItem:
    """A leased instance: its row, committed history and visible inbox. `attempt` is 1 plus
    the failed attempts at its next step."""

    state: InstanceState
    history: list[pb.HistoryEvent]
    inbox: list[InboxMessage]
    lease: Lease
    attempt: int = 1


@value
class ActivityWorkItem:
    """A leased activity: its TaskScheduled event (eventId = task id) and the execution that
    scheduled it. `attempt` is 1 plus the failed attempts at it."""

    id: int
    instance_id: str
    execution_id: str
    scheduled: pb.HistoryEvent
    lease: Lease
    attempt: int = 1


@value
class EntityWorkItem:
    """A leased entity: its row and its whole visible queue (deferred messages included: they
    keep their place in the order). `attempt` as for orchestrations."""

    entity: EntityState
    inbox: list[InboxMessage]
    lease: Lease
    attempt: int = 1


# -- guards ----------------------------------------------------------------------------------


@value
class Holds:
    """The work item `key` of `kind` (an instance id, an activity id, an entity id) is leased
    with `lease`. Fails with LockLost."""

    kind: WorkKind
    key: str | int
    lease: Lease


@value
class AsFound:
    """The instance runs `execution_id`, nobody leases it, it was last updated at
    `last_updated_at` and its inbox is empty: as a step run ahead of its lease found it.
    Fails with LockLost (a commit with this guard normally has an `otherwise`)."""

    instance_id: str
    execution_id: str
    last_updated_at: datetime


@value
class Creatable:
    """No instance has the id, or its status is in `replaceable`. Fails with InstanceExists."""

    instance_id: str
    replaceable: frozenset[Status]


@value
class Exists:
    """The instance exists. Fails with InstanceNotFound."""

    instance_id: str


@value
class InStatus:
    """The instance exists and is in `status`. Fails with InstanceNotFound, or with
    FailedPrecondition saying `why` ("only a failed instance can be rewound")."""

    instance_id: str
    status: Status
    why: str


@value
class Unchanged:
    """The instance is not finished and was last updated at `last_updated_at`. Fails with
    FailedPrecondition (a commit with this guard normally has an `otherwise`)."""

    instance_id: str
    last_updated_at: datetime


Guard = Holds | AsFound | Creatable | Exists | InStatus | Unchanged


# -- writes ----------------------------------------------------------------------------------


@value
class CreateInstance:
    """Insert the instance row `state`; an instance with that id (its guard allowed it) is
    deleted first, with its history, inbox and activities. With `started`, its ExecutionStarted
    message goes into its inbox, visible at `visible_at`; without it, a `WriteStep` of the
    same commit starts it."""

    state: InstanceState
    started: pb.HistoryEvent | None
    visible_at: datetime


@value
class Send:
    """Deliver messages (see `OutboundMessage`): to an orchestration's inbox (dropped when the
    instance, or the execution the message names, is gone: counted in `Applied.dropped`), or to
    an entity's queue (the entity comes into being with its first message). A message without
    `visible_at` is visible at the commit's `now`."""

    messages: tuple[OutboundMessage, ...]


@value
class WriteStep:
    """Write one orchestration step (see `StepResult`): the history appended (on
    `reset_history`, the old history and activities deleted first), the consumed messages
    deleted, the instance row replaced by `result.state` with its lease cleared and its attempts
    counted from zero, the activities added (visible at `now`), the new instances created (or
    their `on_conflict` message sent), the messages sent. On `reset_history` (continue-as-new)
    the messages to the instance itself go into its inbox ahead of those that arrived while the
    step ran."""

    result: StepResult


@value
class DropPending:
    """Delete the instance's inbox and activities (a termination that does not wait for the
    orchestrator)."""

    instance_id: str


@value
class DeleteActivity:
    """Delete the activity (its result is delivered by a `Send`, or is in a `WriteStep`'s
    history)."""

    activity_id: int


@value
class WriteEntityStep:
    """Write one entity step (see `EntityStepResult`): consumed messages deleted, deferred
    ones marked, the row replaced by `result.entity` with its lease cleared and its attempts
    counted from zero (and deleted when it has no state, no lock and nothing queued), the new
    instances created, the messages sent."""

    result: EntityStepResult


@value
class Reopen:
    """A failed instance runs again (a rewind): status RUNNING, no output, failure or
    completion time, last updated at the commit's `now`."""

    instance_id: str


class Attempts(enum.StrEnum):
    """What a release does to the item's count of failed attempts."""

    KEEP = "keep"  # given back untried (the hub is stopping, a lease nobody ran)
    COUNT = "count"  # the attempt failed: one more towards the poison cap
    RESET = "reset"  # waiting was the decision (a postponed step): counting starts again


@value
class Release:
    """Give a lease back. If the item is no longer leased with `lease`, nothing changes (what
    you no longer hold is not yours to release). Otherwise the lease is cleared, `attempts`
    applied, and: for an orchestration or an entity, the `message_ids` become visible at
    `until` (None: they stay visible as they are); for an activity, the activity becomes
    visible at `until` (None: at once)."""

    kind: WorkKind
    key: str | int
    lease: Lease
    attempts: Attempts = Attempts.KEEP
    message_ids: tuple[int, ...] = ()
    until: datetime | None = None


Write = (
    CreateInstance
    | Send
    | WriteStep
    | DropPending
    | DeleteActivity
    | WriteEntityStep
    | Reopen
    | Release
)


# -- leases taken beside the writes -----------------------------------------------------------


@value
class TakeActivities:
    """Lease the first `count` activities that the commit's `WriteStep` adds to `owner`, as
    they are written; they come back in `Applied.activities`, in the step's order."""

    owner: str
    count: int


@value
class TakeInstance:
    """After the writes, lease the instance to `owner` if nobody leases it and it has a visible
    message; it comes back in `Applied.orchestrations`."""

    owner: str
    instance_id: str


Take = TakeActivities | TakeInstance


@value
class Commit:
    """One transaction (see the module's docstring). `now` is the time of the commit: the
    visibility of what it sends without a time of its own, and the times it stamps."""

    now: datetime
    writes: tuple[Write, ...]
    guards: tuple[Guard, ...] = ()
    take: tuple[Take, ...] = ()
    otherwise: Commit | None = None


@value
class Applied:
    """What a commit did beyond its writes.

    `alternative`: a guard failed and the commit's `otherwise` was applied (what follows is
    that commit's). `orchestrations`, `activities`: the work its takes leased. `waiting`: the
    instance of its `WriteStep` has messages in its inbox after it (they arrived while the step
    ran, or are timers), so the orchestration processor has work there. `dropped`: messages not
    delivered because their instance or execution is gone.
    """

    alternative: bool = False
    orchestrations: tuple[OrchestrationWorkItem, ...] = ()
    activities: tuple[ActivityWorkItem, ...] = ()
    waiting: bool = False
    dropped: int = 0


# -- wake-ups ---------------------------------------------------------------------------------


@value
class Wakeups:
    """What a commit tells the hub (see `dt_trio._store.StoreListener`): which processors have
    new work, and which instances changed (with the state the commit wrote, when it wrote
    one; None: read the store). Work a commit leased to this process (`Applied`) wakes
    nobody: it starts without a lease of its own."""

    orchestrations: bool = False
    activities: bool = False
    entities: bool = False
    instances: tuple[tuple[str, InstanceState | None], ...] = ()


def wakeups(commit: Commit, applied: Applied) -> Wakeups:
    """The wake-ups of `commit` once applied as `applied` says: the same for every store, so
    that sqlite and PostgreSQL wake the same processors for the same commit."""
    if applied.alternative:
        assert commit.otherwise is not None, "only a commit with an otherwise has one"
        return wakeups(commit.otherwise, _evolve_applied(applied))
    taken = (
        {item.state.instance_id for item in applied.orchestrations}
        if applied.orchestrations
        else ()
    )
    orchestrations = activities = entities = False
    instances: dict[str, InstanceState | None] = {}
    # The messages sent: to orchestrations (those the commit took need no wake-up: they run
    # here already) or to entities.
    sent: list[OutboundMessage] = []

    for write in commit.writes:
        # (`type() is`: these are final classes, and this runs for every commit)
        if type(write) is WriteStep:
            result = write.result
            instances[result.state.instance_id] = result.state
            for new in result.new_instances:
                instances.setdefault(new.state.instance_id, None)
            # `waiting`: messages its lease hid from the processor until now (they arrived
            # during the step, or are timers). Without them and without an outbox, waking
            # the processor would only cost it a lease that finds nothing.
            orchestrations |= applied.waiting or bool(result.new_instances)
            sent += result.messages
            activities |= len(result.activities) > len(applied.activities)
        elif type(write) is Send:
            sent += write.messages
        elif type(write) is CreateInstance:
            instances[write.state.instance_id] = write.state
            if write.started is not None and write.state.instance_id not in taken:
                orchestrations = True
        elif type(write) is Release:
            if write.kind is WorkKind.ORCHESTRATION:
                orchestrations = True
            elif write.kind is WorkKind.ACTIVITY:
                activities = True
            else:
                entities = True
        elif type(write) is WriteEntityStep:
            entities = True  # messages that arrived during the step
            for new in write.result.new_instances:
                instances.setdefault(new.state.instance_id, None)
            orchestrations |= bool(write.result.new_instances)
            sent += write.result.messages
        elif type(write) is Reopen:
            instances[write.instance_id] = None
        # DeleteActivity, DropPending: the writes beside them say what changed
    for message in sent:
        if is_entity_id(message.target_instance_id):
            entities = True
        elif message.target_instance_id not in taken:
            orchestrations = True
    return Wakeups(orchestrations, activities, entities, tuple(instances.items()))


def _evolve_applied(applied: Applied) -> Applied:
    """`applied` as the `otherwise` commit's own answer."""
    return Applied(
        False, applied.orchestrations, applied.activities, applied.waiting, applied.dropped
    )
