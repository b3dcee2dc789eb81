"""The entity state machine: an entity's queue in, a batch to run and a commit out.

A durable entity (`@name@key`) has a serialized state, at most one lock (held by the critical
section of an orchestration) and a queue of messages: operations (signals and calls), lock
requests and unlocks. One step of an entity is:

1. `plan_entity_batch` walks the queue in order. Lock requests and unlocks are handled here
   (a lock granted or its request forwarded, a lock released), without a worker. Operations
   that may run now (the entity is not locked, or the call comes from the orchestration
   holding the lock) form the batch, in queue order; the others stay queued (deferred) until
   the lock is released.
2. A worker runs the batch and answers an EntityBatchResult, one result per operation.
3. `apply_entity_result` turns it into an `EntityStepResult`: the new state, each call's result
   routed to the calling orchestration, and the signals and orchestrations the batch started.

Locks are granted in the order of the lock set, which the SDKs sort: an orchestration's request
visits the entities one after the other, each one locks and forwards it, and the last one tells
the orchestration. A global order means no two critical sections can wait for each other.

Everything here is pure: time and new ids come in as arguments.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from dt_trio._core import _events as ev
from dt_trio._core._state import (
    InboxMessage,
    NewInstance,
    OutboundMessage,
    Status,
    new_instance,
)
from dt_trio._proto import orchestrator_service_pb2 as pb

ENTITY_ID_PREFIX = "@"


def is_entity_id(instance_id: str) -> bool:
    """Entity ids are `@name@key`; orchestration ids never start with '@'."""
    return instance_id.startswith(ENTITY_ID_PREFIX)


def entity_name(instance_id: str) -> str:
    """The (lower-case) entity name of a valid entity id."""
    return instance_id[1:].partition("@")[0]


def entity_id_prefix(value: str | None) -> str | None:
    """An entity id prefix as the SDKs' queries and operators give it ('@name@key...',
    '@name...' or a bare name start), as ids store it: the name in lower case."""
    if not value:
        return None
    if not value.startswith(ENTITY_ID_PREFIX):
        value = ENTITY_ID_PREFIX + value
    name, sep, key = value[1:].partition("@")
    return f"@{name.lower()}{sep}{key}"


def check_entity_id(instance_id: str, field: str = "instanceId") -> str:
    """`instance_id` normalised as the SDKs write it (name in lower case), or ValueError with a
    message that names the problem."""
    if not is_entity_id(instance_id):
        raise ValueError(f"{field} '{instance_id[:200]}' is not an entity id ('@name@key')")
    name, sep, key = instance_id[1:].partition("@")
    if not sep or not name:
        raise ValueError(
            f"{field} '{instance_id[:200]}' is not an entity id: it needs a name and a key, "
            "as in '@counter@my-key'"
        )
    return f"@{name.lower()}@{key}"


@dataclass(frozen=True)
class EntityState:
    """The stored row of one entity. `lock_owner` is the orchestration whose critical section
    `locked_by` holds the lock; `backlog` (filled by reads) counts its queued messages."""

    instance_id: str
    last_modified_at: datetime
    state: str | None = None
    locked_by: str | None = None
    lock_owner: str | None = None
    backlog: int = 0


@dataclass(frozen=True)
class EntityBatch:
    """What one look at an entity's queue decided.

    `entity` carries the lock as it is after the queue was walked; `operations` are the queue
    messages to run, in order; `consumed` the lock messages handled; `deferred` the messages that
    wait for the lock; `messages` the lock requests forwarded and the grants.
    """

    entity: EntityState
    operations: list[InboxMessage]
    consumed: tuple[int, ...]
    deferred: tuple[int, ...]
    messages: list[OutboundMessage] = field(default_factory=list)


@dataclass(frozen=True)
class EntityStepResult:
    """Everything one entity step commits, in one transaction.

    `consumed` messages are deleted; `deferred` ones stay queued but are not looked at again
    until the entity's lock changes; the entity row becomes `entity` (it is deleted when it has
    no state, no lock and nothing queued); the outbox is enqueued.
    """

    entity: EntityState
    consumed: tuple[int, ...]
    deferred: tuple[int, ...]
    messages: list[OutboundMessage] = field(default_factory=list)
    new_instances: list[NewInstance] = field(default_factory=list)


class InvalidEntityResult(ValueError):
    """A worker's EntityBatchResult that does not answer the batch it was given."""


def plan_entity_batch(
    entity: EntityState, inbox: Sequence[InboxMessage], now: datetime
) -> EntityBatch:
    """Walk the queue in order: handle lock messages, collect the operations that may run."""
    locked_by, owner = entity.locked_by, entity.lock_owner
    queue = collections.deque(inbox)
    deferred: list[InboxMessage] = []
    operations: list[InboxMessage] = []
    consumed: list[int] = []
    messages: list[OutboundMessage] = []
    while queue:
        message = queue.popleft()
        event = message.event
        kind = event.WhichOneof("eventType")
        if kind in ("entityOperationSignaled", "entityOperationCalled"):
            caller = _caller(event)
            if locked_by is None or (caller is not None and caller == owner):
                operations.append(message)
            else:
                deferred.append(message)
        elif kind == "entityLockRequested":
            request = event.entityLockRequested
            if locked_by is None:
                locked_by = request.criticalSectionId
                owner = ev.opt_str(request, "parentInstanceId")
                messages.append(_pass_lock_on(request, now))
                consumed.append(message.id)
            elif locked_by == request.criticalSectionId:
                consumed.append(message.id)  # a duplicate of the request that holds the lock
            else:
                deferred.append(message)
        elif kind == "entityUnlockSent":
            section = event.entityUnlockSent.criticalSectionId
            consumed.append(message.id)
            if locked_by == section:
                locked_by = owner = None
                # What waited for the lock goes first, in its original order.
                queue.extendleft(reversed(deferred))
                deferred = []
            else:
                # The section ended before its request got here: the request is void.
                void = [m for m in deferred if _requests_lock_for(m.event, section)]
                deferred = [m for m in deferred if m not in void]
                consumed += [m.id for m in void]
        else:
            consumed.append(message.id)  # nothing an entity can act on; dropped
    return EntityBatch(
        entity=dataclasses.replace(entity, locked_by=locked_by, lock_owner=owner),
        operations=operations,
        consumed=tuple(consumed),
        deferred=tuple(m.id for m in deferred),
        messages=messages,
    )


def _caller(event: pb.HistoryEvent) -> str | None:
    if event.HasField("entityOperationCalled"):
        return ev.opt_str(event.entityOperationCalled, "parentInstanceId")
    return None  # a signal names no sender: it waits while the entity is locked


def _requests_lock_for(event: pb.HistoryEvent, section: str) -> bool:
    return (
        event.HasField("entityLockRequested")
        and event.entityLockRequested.criticalSectionId == section
    )


def _pass_lock_on(request: pb.EntityLockRequestedEvent, now: datetime) -> OutboundMessage:
    """The lock is ours: forward the request to the next entity of the set, or, if this was the
    last one, tell the orchestration that its critical section may begin."""
    position = request.position + 1
    if position < len(request.lockSet):
        forwarded = ev.new_event(now)
        forwarded.entityLockRequested.CopyFrom(request)
        forwarded.entityLockRequested.position = position
        return OutboundMessage(request.lockSet[position], forwarded)
    granted = ev.new_event(now)
    granted.entityLockGranted.criticalSectionId = request.criticalSectionId
    return OutboundMessage(request.parentInstanceId.value, granted)


def settle_entity(batch: EntityBatch) -> EntityStepResult:
    """Settle a batch that has no operation to run (only lock messages, or only waiting): its
    result without a worker, as `Settle` commits an orchestration step without one."""
    if batch.operations:
        raise ValueError("a batch with operations needs a worker's result")
    return EntityStepResult(batch.entity, batch.consumed, batch.deferred, batch.messages)


def entity_request(batch: EntityBatch) -> pb.EntityRequest:
    """The batch as the current protocol's work item (entityRequestV2): operations as history
    events. Every SDK that has entities reads this form, and answers with one result per
    operation; the store, not the worker, remembers where each call's answer goes."""
    request = pb.EntityRequest(instanceId=batch.entity.instance_id)
    ev.set_str(request.entityState, batch.entity.state)
    request.operationRequests.extend(m.event for m in batch.operations)
    return request


def _operation(
    event: pb.HistoryEvent,
) -> pb.EntityOperationSignaledEvent | pb.EntityOperationCalledEvent:
    if event.HasField("entityOperationCalled"):
        return event.entityOperationCalled
    return event.entityOperationSignaled


def apply_entity_result(
    batch: EntityBatch,
    result: pb.EntityBatchResult,
    now: datetime,
    new_id: Callable[[], str],
) -> EntityStepResult:
    """The worker ran the batch: new state, results to the callers, the batch's own messages.

    Raises InvalidEntityResult when the result does not answer every operation (a worker that
    failed the batch as a whole sets failureDetails and returns fewer results): the batch is
    then run again later, from the state before it.
    """
    if result.HasField("failureDetails"):
        details = result.failureDetails
        raise InvalidEntityResult(
            f"the worker failed the whole batch: {details.errorType}: {details.errorMessage}"
        )
    if len(result.results) != len(batch.operations):
        raise InvalidEntityResult(
            f"the batch had {len(batch.operations)} operation(s) but the result answers "
            f"{len(result.results)}"
        )
    messages = list(batch.messages)
    for message, outcome in zip(batch.operations, result.results, strict=True):
        kind = outcome.WhichOneof("resultType")
        if kind is None:
            raise InvalidEntityResult(
                f"the result of operation '{_operation(message.event).requestId}' is neither "
                "success nor failure"
            )
        if kind == "success":
            reply = _reply(message.event, now, output=ev.opt_str(outcome.success, "result"))
        else:
            reply = _reply(message.event, now, failure=outcome.failure.failureDetails)
        if reply is not None:
            messages.append(reply)
    new_instances: list[NewInstance] = []
    for action in result.actions:
        kind = action.WhichOneof("operationActionType")
        if kind == "sendSignal":
            messages.append(_signal(action.sendSignal, now, new_id))
        elif kind == "startNewOrchestration":
            new_instances.append(_new_orchestration(action.startNewOrchestration, now, new_id))
        else:
            raise InvalidEntityResult(f"action {action.id} is {kind or 'empty'}")
    entity = dataclasses.replace(
        batch.entity,
        state=ev.opt_str(result, "entityState"),
        last_modified_at=now,
    )
    consumed = batch.consumed + tuple(m.id for m in batch.operations)
    return EntityStepResult(entity, consumed, batch.deferred, messages, new_instances)


def fail_entity_batch(batch: EntityBatch, now: datetime, reason: str) -> EntityStepResult:
    """Give up on a batch no worker could run: each caller gets a failure, signals are dropped,
    the state stays as it was."""
    failure = ev.failure("EntityBatchAbandonedError", reason)
    replies = [_reply(m.event, now, failure=failure) for m in batch.operations]
    consumed = batch.consumed + tuple(m.id for m in batch.operations)
    return EntityStepResult(
        batch.entity,
        consumed,
        batch.deferred,
        batch.messages + [r for r in replies if r is not None],
    )


def _reply(
    event: pb.HistoryEvent,
    now: datetime,
    output: str | None = None,
    failure: pb.TaskFailureDetails | None = None,
) -> OutboundMessage | None:
    """The answer a call owes its orchestration (None for a signal)."""
    if not event.HasField("entityOperationCalled"):
        return None
    call = event.entityOperationCalled
    reply = ev.new_event(now)
    if failure is not None:
        reply.entityOperationFailed.requestId = call.requestId
        reply.entityOperationFailed.failureDetails.CopyFrom(failure)
    else:
        reply.entityOperationCompleted.requestId = call.requestId
        ev.set_str(reply.entityOperationCompleted.output, output)
    return OutboundMessage(
        call.parentInstanceId.value,
        reply,
        execution_id=ev.opt_str(call, "parentExecutionId"),
    )


def _signal(send: pb.SendSignalAction, now: datetime, new_id: Callable[[], str]) -> OutboundMessage:
    try:
        target = check_entity_id(send.instanceId, "sendSignal.instanceId")
    except ValueError as exc:
        raise InvalidEntityResult(str(exc)) from None
    at = ev.optional_time(send, "scheduledTime", InvalidEntityResult)
    return OutboundMessage(
        target,
        signal_event(
            now,
            target,
            send.name,
            ev.opt_str(send, "input"),
            new_id(),
            at,
        ),
        visible_at=at,
    )


def signal_event(
    now: datetime,
    target: str,
    operation: str,
    input: str | None,
    request_id: str,
    scheduled: datetime | None = None,
) -> pb.HistoryEvent:
    """The queue message of a one-way operation on `target`."""
    event = ev.new_event(now)
    signaled = event.entityOperationSignaled
    signaled.requestId = request_id
    signaled.operation = operation
    signaled.targetInstanceId.value = target
    ev.set_str(signaled.input, input)
    if scheduled is not None:
        ev.set_time(signaled.scheduledTime, scheduled)
    return event


def _new_orchestration(
    start: pb.StartNewOrchestrationAction, now: datetime, new_id: Callable[[], str]
) -> NewInstance:
    instance_id = start.instanceId or new_id()
    if is_entity_id(instance_id) or not start.name:
        raise InvalidEntityResult(
            f"startNewOrchestration needs an orchestrator name and an instance id that does "
            f"not start with '@' (got name '{start.name}', id '{instance_id[:200]}')"
        )
    state, started = new_instance(
        now,
        start.name,
        instance_id,
        new_id(),
        input=ev.opt_str(start, "input"),
        version=ev.opt_str(start, "version"),
        start_at=ev.optional_time(start, "scheduledTime", InvalidEntityResult),
        trace=start.parentTraceContext if start.HasField("parentTraceContext") else None,
    )
    # An entity that starts an orchestration whose id is taken gets no answer: the start is
    # dropped, as a client's start of a running id would be refused.
    return NewInstance(state, started, on_conflict=None)


# -- the orchestration's side -------------------------------------------------------------------


def held_locks(events: Iterable[pb.HistoryEvent]) -> list[tuple[str, str]]:
    """(critical section, entity id) of every lock an execution requested and did not release."""
    sections: dict[str, list[str]] = {}
    for event in events:
        if event.HasField("entityLockRequested"):
            request = event.entityLockRequested
            sections[request.criticalSectionId] = list(request.lockSet)
        elif event.HasField("entityUnlockSent"):
            unlock = event.entityUnlockSent
            entities = sections.get(unlock.criticalSectionId, [])
            target = unlock.targetInstanceId.value
            if target in entities:
                entities.remove(target)
    return [(section, entity) for section, entities in sections.items() for entity in entities]


def lock_is_orphaned(
    entity_id: str,
    section: str,
    owner: str,
    owner_status: int | None,
    history: Callable[[str], Iterable[pb.HistoryEvent]],
) -> bool:
    """Whether the entity's lock, critical section `section` of orchestration `owner` (whose
    status is `owner_status`, None if it is gone), is orphaned: the orchestration is gone or
    finished, or its current execution does not hold the lock (it continued as new while the
    lock request was still on its way, say). `history` reads an instance's history."""
    if owner_status is None or Status(owner_status).is_terminal:
        return True
    return (section, entity_id) not in held_locks(history(owner))


def release_locks(
    instance_id: str, locks: Iterable[tuple[str, str]], now: datetime
) -> list[OutboundMessage]:
    """Unlock messages for `locks`, sent by `instance_id`."""
    messages = []
    for section, entity in locks:
        event = ev.new_event(now)
        unlock = event.entityUnlockSent
        unlock.criticalSectionId = section
        unlock.parentInstanceId.value = instance_id
        unlock.targetInstanceId.value = entity
        messages.append(OutboundMessage(entity, event))
    return messages
