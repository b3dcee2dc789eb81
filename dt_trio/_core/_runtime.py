"""The orchestration state machine: history and inbox in, a dispatch or a commit out.

One step of an orchestration is:

1. `plan_step` looks at the instance, its history and the visible inbox and decides: run the
   orchestrator (`Dispatch`), settle without running it (`Settle`, e.g. events for an instance
   that already finished), or wait (`Postpone`, e.g. events for an instance whose scheduled start
   has not come yet).
2. The orchestrator (an SDK worker, or local code) answers an OrchestratorResponse.
3. `apply_response` turns the response into a `StepResult`: history to append, the new instance
   row and the outbox. The store commits it atomically.

Everything here is pure: time and new ids come in as arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from dt_trio._core import _events as ev
from dt_trio._core._entities import check_entity_id, held_locks, is_entity_id, release_locks
from dt_trio._core._state import (
    ActivityTask,
    InboxMessage,
    InstanceState,
    NewInstance,
    OutboundMessage,
    Status,
    StepResult,
    evolve,
    new_instance,
    value,
)
from dt_trio._proto import orchestrator_service_pb2 as pb


@value
class Dispatch:
    """Run the orchestrator with `past_events` + `new_events`; `consumed` names the inbox
    messages this step takes (delivered or dropped)."""

    past_events: Sequence[pb.HistoryEvent]
    new_events: list[pb.HistoryEvent]
    consumed: tuple[int, ...]


@value
class Settle:
    """Commit `result` without running the orchestrator: the step is settled (dt-trio's one
    meaning of the word, for entities too: `settle_entity`)."""

    result: StepResult


@value
class Postpone:
    """Leave the messages in the inbox, invisible until `until`."""

    message_ids: tuple[int, ...]
    until: datetime


Plan = Dispatch | Settle | Postpone

# A step leased this many times without committing fails its orchestration.
MAX_STEP_ATTEMPTS = 10
# How long events wait when they reach an instance that has not started and has no known start.
NOT_STARTED_RETRY_SECONDS = 1.0


def poisoned(state: InstanceState, attempt: int) -> bool:
    """Whether the step of `state` leased for the `attempt`-th time is poison (see
    `plan_step`): the orchestration fails instead of running it."""
    return attempt > MAX_STEP_ATTEMPTS and not state.status.is_terminal


def plan_step(
    state: InstanceState,
    history: Sequence[pb.HistoryEvent],
    inbox: Sequence[InboxMessage],
    now: datetime,
    attempt: int = 1,
) -> Plan:
    """Decide what to do with the visible inbox of one instance.

    `attempt` counts the leases since the last committed step; past MAX_STEP_ATTEMPTS the step
    is poison (its worker crashes on it, or it never commits) and the orchestration fails.
    """
    ids = tuple(m.id for m in inbox)
    if poisoned(state, attempt):
        return Settle(_fail_poisoned(state, history, ids, now, attempt - 1))
    rewind = next((m.event for m in inbox if m.event.HasField("executionRewound")), None)
    if rewind is not None:
        outcome = _final_status(history)
        if outcome == Status.FAILED:
            # The SDK rewrites a failed history when it sees exactly these two new events.
            return Dispatch(history, [ev.orchestrator_started(now), rewind], ids)
        if outcome is not None:
            # A finished child asked to rewind has nothing to redo: its parent, rewound and
            # waiting for it, gets its result again.
            return Settle(_renotify_parent(state, history, ids, now))
    if state.status.is_terminal:
        # Nothing reaches a finished execution; the events are consumed and dropped. A lock
        # granted after the end is handed straight back, or its entities would stay locked.
        granted = {
            m.event.entityLockGranted.criticalSectionId
            for m in inbox
            if m.event.HasField("entityLockGranted")
        }
        requested = [e for e in history if e.HasField("entityLockRequested")]
        locks = [
            (r.entityLockRequested.criticalSectionId, entity)
            for r in requested
            if r.entityLockRequested.criticalSectionId in granted
            for entity in r.entityLockRequested.lockSet
        ]
        messages = release_locks(state.instance_id, locks, now)
        return Settle(StepResult(state=state, consumed=ids, history=[], messages=messages))

    started = any(e.HasField("executionStarted") for e in history)
    suspended = state.status == Status.SUSPENDED
    delivered: list[pb.HistoryEvent] = []
    woken = False
    for message in inbox:
        kind = message.event.WhichOneof("eventType")
        if kind == "orchestratorStarted":
            woken = True  # a wake-up carries nothing, but asks for a step
        elif kind == "executionRewound":
            continue  # a rewind of a running instance is moot
        elif kind == "executionStarted":
            if started:
                continue  # a duplicate start is dropped
            started = True
            delivered.insert(0, message.event)  # the start always leads the new events
        elif kind in ("executionSuspended", "executionResumed"):
            # Only a change is delivered, as the status stands when the event is consumed
            # (it may have changed since it was sent): the SDKs fail on a resume of an
            # instance that is not suspended, and spin on a suspend of a suspended one.
            if suspended != (kind == "executionResumed"):
                continue
            suspended = not suspended
            delivered.append(message.event)
        else:
            delivered.append(message.event)

    if not started:
        terminate = next((e for e in delivered if e.HasField("executionTerminated")), None)
        if terminate is not None:
            return Settle(_terminate_unstarted(state, terminate, ids, now))
        until = state.scheduled_start_at
        if until is None or until <= now:
            until = now + timedelta(seconds=NOT_STARTED_RETRY_SECONDS)
        return Postpone(ids, until)

    if not delivered and not woken:
        return Settle(StepResult(state=state, consumed=ids, history=[]))  # all dropped
    new_events = [ev.orchestrator_started(now), *delivered]
    return Dispatch(past_events=history, new_events=new_events, consumed=ids)


def _fail_poisoned(
    state: InstanceState,
    history: Sequence[pb.HistoryEvent],
    ids: tuple[int, ...],
    now: datetime,
    tries: int,
) -> StepResult:
    failure = ev.failure(
        "OrchestrationStepAbandonedError",
        f"a step of '{state.instance_id}' was handed out {tries} times and never completed "
        "(its worker crashed or gave it back each time)",
    )
    return finish_without_worker(state, history, ids, now, Status.FAILED, None, failure)


def _final_status(history: Sequence[pb.HistoryEvent]) -> Status | None:
    """How the execution in `history` ended, or None while it runs."""
    for event in reversed(history):
        if event.HasField("executionCompleted"):
            return Status(event.executionCompleted.orchestrationStatus)
    return None


def _renotify_parent(
    state: InstanceState, history: Sequence[pb.HistoryEvent], ids: tuple[int, ...], now: datetime
) -> StepResult:
    message = parent_notification(state, history, now)
    return StepResult(state=state, consumed=ids, history=[], messages=[message] if message else [])


def parent_notification(
    state: InstanceState, history: Sequence[pb.HistoryEvent], now: datetime
) -> OutboundMessage | None:
    """The result a finished sub-orchestration owes its parent (None for a top-level one)."""
    started = next((e.executionStarted for e in history if e.HasField("executionStarted")), None)
    if started is None or not started.HasField("parentInstance"):
        return None
    parent = started.parentInstance
    task_id = parent.taskScheduledId
    if state.status == Status.COMPLETED:
        event = ev.sub_orchestration_completed(now, task_id, state.output)
    else:
        failure = state.failure or ev.failure(
            "OrchestrationTerminatedError"
            if state.status == Status.TERMINATED
            else "OrchestrationFailedError",
            f"sub-orchestration '{state.instance_id}' ended as {state.status.label}"
            + (f": {state.output}" if state.output else ""),
        )
        event = ev.sub_orchestration_failed(now, task_id, failure)
    return OutboundMessage(parent.orchestrationInstance.instanceId, event)


def terminate_now(
    state: InstanceState, history: Sequence[pb.HistoryEvent], reason: str | None, now: datetime
) -> StepResult:
    """Terminate without running the orchestrator (SkipGracefulOrchestrationTerminations)."""
    terminated = ev.execution_terminated(now, reason, False)
    return finish_without_worker(
        state, history, (), now, Status.TERMINATED, reason, None, [terminated]
    )


def _terminate_unstarted(
    state: InstanceState, terminate: pb.HistoryEvent, ids: tuple[int, ...], now: datetime
) -> StepResult:
    output = ev.opt_str(terminate.executionTerminated, "input")
    return finish_without_worker(state, [], ids, now, Status.TERMINATED, output, None, [terminate])


def finish_without_worker(
    state: InstanceState,
    history: Sequence[pb.HistoryEvent],
    consumed: tuple[int, ...],
    now: datetime,
    status: Status,
    output: str | None,
    failure: pb.TaskFailureDetails | None,
    events: Sequence[pb.HistoryEvent] = (),
) -> StepResult:
    """End the execution in the store alone: its final events, its row, its parent told, its
    entity locks released."""
    finished = dataclasses.replace(
        state,
        status=status,
        output=output,
        failure=failure,
        completed_at=now,
        last_updated_at=now,
    )
    message = parent_notification(finished, history, now)
    return StepResult(
        state=finished,
        consumed=consumed,
        history=[
            ev.orchestrator_started(now),
            *events,
            ev.execution_completed(now, status, output, failure),
        ],
        messages=([message] if message else [])
        + release_locks(state.instance_id, held_locks(history), now),
    )


def fail_undeliverable(
    state: InstanceState, dispatch: Dispatch, now: datetime, failure: pb.TaskFailureDetails
) -> StepResult:
    """End the execution because its step can reach no worker (too large for one, say): the
    events it would have been shown are recorded, then the failure."""
    new = [e for e in dispatch.new_events if not e.HasField("orchestratorStarted")]
    return finish_without_worker(
        state,
        [*dispatch.past_events, *new],
        dispatch.consumed,
        now,
        Status.FAILED,
        None,
        failure,
        new,
    )


def apply_response(
    state: InstanceState,
    dispatch: Dispatch,
    response: pb.OrchestratorResponse,
    now: datetime,
    new_id: Callable[[], str],
) -> StepResult:
    """Turn the orchestrator's actions into history, a new instance row and an outbox.

    `new_id` makes fresh execution ids (for sub-orchestrations and continue-as-new).
    """
    builder = _StepBuilder(state, dispatch, now, new_id)
    # One new row for what every step changes (a dataclass copy per field costs more than the
    # rest of a small step's bookkeeping).
    builder.state = evolve(
        state,
        last_updated_at=now,
        status=builder.status_after_new_events(),
        custom_status=ev.opt_str(response, "customStatus"),
        trace_context=response.orchestrationTraceContext
        if response.HasField("orchestrationTraceContext")
        else state.trace_context,
    )
    for action in response.actions:
        builder.apply_action(action)
        if builder.finished:
            break  # nothing after the completing action counts
    return builder.result()


class _StepBuilder:
    def __init__(
        self, state: InstanceState, dispatch: Dispatch, now: datetime, new_id: Callable[[], str]
    ) -> None:
        self.state = state
        self.dispatch = dispatch
        self.now = now
        self.new_id = new_id
        self.history: list[pb.HistoryEvent] = list(dispatch.new_events)
        self.completion: list[pb.HistoryEvent] = []
        self.activities: list[ActivityTask] = []
        self.messages: list[OutboundMessage] = []
        self.new_instances: list[NewInstance] = []
        self.reset_history = False
        self.finished = False
        self.rewound = False
        # Entity messages sent by this step, kept even when continue-as-new drops the history.
        self.entity_events: list[pb.HistoryEvent] = []
        all_events = [*dispatch.past_events, *dispatch.new_events]
        self.started = next(
            e.executionStarted for e in all_events if e.HasField("executionStarted")
        )
        self.all_events = all_events

    # -- inputs ------------------------------------------------------------------------------

    def status_after_new_events(self) -> Status:
        status = self.state.status
        if status == Status.PENDING:
            status = Status.RUNNING
        for event in self.dispatch.new_events:
            if event.HasField("executionSuspended"):
                status = Status.SUSPENDED
            elif event.HasField("executionResumed") and status == Status.SUSPENDED:
                status = Status.RUNNING
        return status

    # -- actions -----------------------------------------------------------------------------

    def apply_action(self, action: pb.OrchestratorAction) -> None:
        kind = action.WhichOneof("orchestratorActionType")
        handler = getattr(self, f"_on_{kind}", None) if kind else None
        if handler is None:
            label = kind or "an empty action"
            self._complete(
                Status.FAILED,
                None,
                ev.failure(
                    "NotSupportedError",
                    f"the orchestrator sent {label} (action id {action.id}), "
                    "which this version of dt-trio does not support",
                ),
            )
            return
        try:
            handler(action)
        except InvalidAction as exc:
            # A malformed action fails the orchestration for good: retrying replays the same code
            # and would only send the same action again.
            self._complete(
                Status.FAILED,
                None,
                ev.failure("InvalidActionError", f"{kind} (action id {action.id}): {exc}"),
            )

    def _on_scheduleTask(self, action: pb.OrchestratorAction) -> None:
        task = action.scheduleTask
        event = ev.new_event(self.now, action.id)
        _copy_call(task, event.taskScheduled)
        event.taskScheduled.SetInParent()
        self.history.append(event)
        self.activities.append(ActivityTask(self.state.instance_id, self.state.execution_id, event))

    def _on_createTimer(self, action: pb.OrchestratorAction) -> None:
        fire_at = _valid_time(action.createTimer.fireAt, "fireAt")
        event = ev.new_event(self.now, action.id)
        event.timerCreated.fireAt.CopyFrom(action.createTimer.fireAt)
        self.history.append(event)
        self.messages.append(
            OutboundMessage(
                self.state.instance_id, ev.timer_fired(self.now, action.id, fire_at), fire_at
            )
        )

    def _on_createSubOrchestration(self, action: pb.OrchestratorAction) -> None:
        create = action.createSubOrchestration
        # A deterministic id when the SDK leaves it empty, so a replayed step names the same child.
        child_id = create.instanceId or f"{self.state.instance_id}:{action.id:04x}"
        if is_entity_id(child_id):
            raise InvalidAction(
                f"instanceId '{child_id[:200]}' starts with '@', which is reserved for entities"
            )
        event = ev.new_event(self.now, action.id)
        created = event.subOrchestrationInstanceCreated
        created.instanceId = child_id
        _copy_call(create, created)
        self.history.append(event)
        conflict = ev.sub_orchestration_failed(
            self.now,
            action.id,
            ev.failure(
                "OrchestrationAlreadyExistsError",
                f"cannot start sub-orchestration '{create.name}': an instance with id "
                f"'{child_id}' already exists and is not finished",
            ),
        )
        self._start_child(
            action.id, created, OutboundMessage(self.state.instance_id, conflict), True
        )

    def _start_child(
        self,
        task_id: int,
        created: pb.SubOrchestrationInstanceCreatedEvent,
        on_conflict: OutboundMessage,
        replace_finished: bool,
    ) -> None:
        parent = pb.ParentInstanceInfo(taskScheduledId=task_id)
        parent.name.value = self.state.name
        ev.set_str(parent.version, self.state.version)
        parent.orchestrationInstance.instanceId = self.state.instance_id
        parent.orchestrationInstance.executionId.value = self.state.execution_id
        child, started = new_instance(
            self.now,
            created.name,
            created.instanceId,
            self.new_id(),
            input=ev.opt_str(created, "input"),
            version=ev.opt_str(created, "version"),
            tags=created.tags,
            parent=parent,
            trace=created.parentTraceContext if created.HasField("parentTraceContext") else None,
        )
        self.new_instances.append(NewInstance(child, started, on_conflict, replace_finished))

    def _on_rewindOrchestration(self, action: pb.OrchestratorAction) -> None:
        """The SDK's rewrite of a failed history: failed steps removed, to be run again."""
        self.rewound = True
        self._run_again(list(action.rewindOrchestration.newHistory))
        rewound = next(
            (e for e in reversed(self.dispatch.new_events) if e.HasField("executionRewound")),
            None,
        )
        reason = ev.opt_str(rewound.executionRewound, "reason") if rewound else None
        created: dict[int, pb.SubOrchestrationInstanceCreatedEvent] = {}
        for event in self.history:
            if event.HasField("subOrchestrationInstanceCreated"):
                created[event.eventId] = event.subOrchestrationInstanceCreated
        for child_id in running_children(self.history):
            task_id, child = next((t, c) for t, c in created.items() if c.instanceId == child_id)
            rewind_child = ev.new_event(self.now)
            ev.set_str(rewind_child.executionRewound.reason, reason)
            rewind_child.executionRewound.SetInParent()
            # A child that still exists is rewound (or re-reports its result); a purged one is
            # started again from its creation event.
            self._start_child(task_id, child, OutboundMessage(child_id, rewind_child), False)
        # Wake the instance so that the rewritten history is replayed at once.
        self.messages.append(
            OutboundMessage(self.state.instance_id, ev.orchestrator_started(self.now))
        )

    def _on_sendEvent(self, action: pb.OrchestratorAction) -> None:
        send = action.sendEvent
        event = ev.new_event(self.now, action.id)
        event.eventSent.instanceId = send.instance.instanceId
        event.eventSent.name = send.name
        if send.HasField("data"):
            event.eventSent.input.CopyFrom(send.data)
        self.history.append(event)
        if send.instance.instanceId:
            raised = ev.event_raised(self.now, send.name, ev.opt_str(send, "data"))
            self.messages.append(OutboundMessage(send.instance.instanceId, raised))

    def _on_sendEntityMessage(self, action: pb.OrchestratorAction) -> None:
        send = action.sendEntityMessage
        kind = send.WhichOneof("EntityMessageType")
        if kind is None:
            raise InvalidAction("sendEntityMessage carries no message")
        message = ev.new_event(self.now)
        payload = getattr(message, kind)
        payload.CopyFrom(getattr(send, kind))
        visible_at = None
        if kind == "entityOperationSignaled":
            target = payload.targetInstanceId.value
            if payload.HasField("scheduledTime"):
                visible_at = _valid_time(payload.scheduledTime, "scheduledTime")
        elif kind == "entityOperationCalled":
            target = payload.targetInstanceId.value
            # The entity answers this execution; a later one (continue-as-new) never asked.
            payload.parentInstanceId.value = self.state.instance_id
            payload.parentExecutionId.value = self.state.execution_id
        elif kind == "entityLockRequested":
            if not payload.lockSet:
                raise InvalidAction("entityLockRequested has an empty lockSet")
            if not 0 <= payload.position < len(payload.lockSet):
                raise InvalidAction(
                    f"position {payload.position} is outside the lockSet of "
                    f"{len(payload.lockSet)} entities"
                )
            for entity in payload.lockSet:
                _entity_target(entity)
            payload.parentInstanceId.value = self.state.instance_id
            target = payload.lockSet[payload.position]
        else:
            target = payload.targetInstanceId.value
        target = _entity_target(target)
        event = ev.new_event(self.now, action.id)
        getattr(event, kind).CopyFrom(getattr(send, kind))
        self.history.append(event)
        self.entity_events.append(event)
        self.messages.append(OutboundMessage(target, message, visible_at))

    def _on_terminateOrchestration(self, action: pb.OrchestratorAction) -> None:
        terminate = action.terminateOrchestration
        if not terminate.instanceId:
            return
        event = ev.execution_terminated(
            self.now, ev.opt_str(terminate, "reason"), terminate.recurse
        )
        self.messages.append(OutboundMessage(terminate.instanceId, event))

    def _on_completeOrchestration(self, action: pb.OrchestratorAction) -> None:
        complete = action.completeOrchestration
        status = Status(complete.orchestrationStatus)
        result = ev.opt_str(complete, "result")
        if status == Status.CONTINUED_AS_NEW:
            self._continue_as_new(complete, result)
            return
        failure = complete.failureDetails if complete.HasField("failureDetails") else None
        if not status.is_terminal:
            status = Status.FAILED
            failure = ev.failure(
                "InvalidActionError",
                f"the orchestrator completed with status {complete.orchestrationStatus}, "
                "which is not a final status",
            )
        self._complete(status, result, failure)

    # -- completion --------------------------------------------------------------------------

    def _complete(
        self, status: Status, result: str | None, failure: pb.TaskFailureDetails | None
    ) -> None:
        self.finished = True
        self.state = evolve(
            self.state,
            status=status,
            output=result,
            failure=failure,
            completed_at=self.now,
        )
        self.completion = [
            ev.orchestrator_completed(self.now),
            ev.execution_completed(self.now, status, result, failure),
        ]
        self._notify_parent()
        if status == Status.TERMINATED:
            self._terminate_children()

    def _notify_parent(self) -> None:
        message = parent_notification(self.state, self.all_events, self.now)
        if message is not None:
            self.messages.append(message)

    def _terminate_children(self) -> None:
        terminate = next(
            (e.executionTerminated for e in self.all_events if e.HasField("executionTerminated")),
            None,
        )
        if terminate is None or not terminate.recurse:
            return
        reason = ev.opt_str(terminate, "input")
        for child_id in running_children(self.all_events):
            self.messages.append(
                OutboundMessage(child_id, ev.execution_terminated(self.now, reason, True))
            )

    def _run_again(self, history: list[pb.HistoryEvent], **changes: Any) -> None:
        """End this step with the instance running again from `history` (rewound, or continued
        as new with `changes`): no output or failure, and a span of its own (the last run's was
        emitted when it ended)."""
        self.finished = True
        self.reset_history = True
        self.history = history
        self.completion = []
        self.state = dataclasses.replace(
            self.state,
            status=Status.RUNNING,
            output=None,
            failure=None,
            completed_at=None,
            trace_context=None,
            **changes,
        )

    def _continue_as_new(
        self, complete: pb.CompleteOrchestrationAction, result: str | None
    ) -> None:
        execution_id = self.new_id()
        version = ev.opt_str(complete, "newVersion") or self.state.version
        self._run_again([], execution_id=execution_id, input=result, version=version)
        started = ev.execution_started(
            self.now,
            name=self.state.name,
            instance_id=self.state.instance_id,
            execution_id=execution_id,
            input=result,
            version=version,
            tags=self.started.tags,
            parent=self.started.parentInstance if self.started.HasField("parentInstance") else None,
            parent_trace_context=self.started.parentTraceContext
            if self.started.HasField("parentTraceContext")
            else None,
        )
        # The new execution starts from its inbox: the start, then the carried-over events.
        # Activity results and timers of the old execution are dropped by the store because
        # they name the old execution id.
        self.activities = []
        self.messages = [m for m in self.messages if m.target_instance_id != self.state.instance_id]
        own = [OutboundMessage(self.state.instance_id, started)]
        own += [OutboundMessage(self.state.instance_id, e) for e in complete.carryoverEvents]
        self.messages = own + self.messages

    def result(self) -> StepResult:
        messages = self.messages
        if self.finished and not self.rewound:
            # An execution that ends (or continues as new) holding entity locks releases them:
            # the SDKs send the unlocks themselves, this covers the code paths that do not.
            held = held_locks([*self.all_events, *self.entity_events])
            messages = messages + release_locks(self.state.instance_id, held, self.now)
        return StepResult(
            state=self.state,
            consumed=self.dispatch.consumed,
            history=self.history + self.completion,
            reset_history=self.reset_history,
            activities=self.activities,
            messages=messages,
            new_instances=self.new_instances,
        )


class InvalidAction(ValueError):
    """An orchestrator action that cannot be carried out as sent."""


def _copy_call(
    action: pb.ScheduleTaskAction | pb.CreateSubOrchestrationAction,
    event: pb.TaskScheduledEvent | pb.SubOrchestrationInstanceCreatedEvent,
) -> None:
    """What a call of an activity or an orchestrator names (name, version, input, tags, the
    caller's span), from the action into the event that records it."""
    event.name = action.name
    for field in ("version", "input", "parentTraceContext"):
        if action.HasField(field):
            getattr(event, field).CopyFrom(getattr(action, field))
    event.tags.update(action.tags)


def _valid_time(ts: Any, field: str) -> datetime:
    try:
        return ev.checked_time(ts, field)
    except ValueError as exc:
        raise InvalidAction(str(exc)) from None


def _entity_target(instance_id: str) -> str:
    try:
        return check_entity_id(instance_id, "the target")
    except ValueError as exc:
        raise InvalidAction(str(exc)) from None


def running_children(events: Sequence[pb.HistoryEvent]) -> list[str]:
    """Ids of sub-orchestrations created in `events` whose result has not arrived."""
    created: dict[int, str] = {}
    for event in events:
        if event.HasField("subOrchestrationInstanceCreated"):
            created[event.eventId] = event.subOrchestrationInstanceCreated.instanceId
        elif event.HasField("subOrchestrationInstanceCompleted"):
            created.pop(event.subOrchestrationInstanceCompleted.taskScheduledId, None)
        elif event.HasField("subOrchestrationInstanceFailed"):
            created.pop(event.subOrchestrationInstanceFailed.taskScheduledId, None)
    return list(created.values())


def running_activities(events: Iterable[pb.HistoryEvent]) -> int:
    """How many activities scheduled in `events` have no result in them."""
    running: set[int] = set()
    for event in events:
        kind = event.WhichOneof("eventType")
        if kind == "taskScheduled":
            running.add(event.eventId)
        elif kind == "taskCompleted":
            running.discard(event.taskCompleted.taskScheduledId)
        elif kind == "taskFailed":
            running.discard(event.taskFailed.taskScheduledId)
    return len(running)


def activity_result(response: pb.ActivityResponse, now: datetime) -> pb.HistoryEvent:
    """The event an activity's response delivers to its orchestration."""
    if response.HasField("failureDetails"):
        return ev.task_failed(now, response.taskId, response.failureDetails)
    return ev.task_completed(now, response.taskId, ev.opt_str(response, "result"))
