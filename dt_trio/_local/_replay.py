"""The replay engine for orchestrators written in Python: history in, actions out.

An orchestrator is a generator function `(ctx, input) -> Generator[Task, Any, result]`. Each
step replays it from the start against the instance's history: every durable call it makes
(`ctx.call_activity`, `ctx.create_timer`, ...) gets the next action id and is matched with the
history event of that id, results are sent back into the generator in history order, and the
calls that history has not seen yet become the step's new actions. Nothing here does I/O; it is
tested with plain functions, like the orchestration core it feeds.
"""

from __future__ import annotations

import functools
import json
import traceback
from collections import OrderedDict
from collections.abc import Callable, Collection, Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from dt_trio._core import _events as ev
from dt_trio._local._tasks import (
    CompletableTask,
    NonDeterminismError,
    RetryPolicy,
    Task,
    TaskFailedError,
)
from dt_trio._proto import orchestrator_service_pb2 as pb

Orchestrator = Callable[["OrchestrationContext", Any], Any]


def encode(value: Any) -> str | None:
    """Payloads are JSON, as the official SDKs write them, so both can read each other's."""
    return None if value is None else json.dumps(value)


def decode(text: str | None) -> Any:
    return None if text is None or text == "" else json.loads(text)


def failure_details(exc: BaseException) -> pb.TaskFailureDetails:
    if isinstance(exc, TaskFailedError):
        details = ev.failure(exc.error_type, exc.message, non_retriable=False)
    else:
        kind = type(exc)
        details = ev.failure(
            f"{kind.__module__}.{kind.__qualname__}", str(exc), non_retriable=False
        )
    details.stackTrace.value = "".join(traceback.format_exception(exc))
    return details


def failed(details: pb.TaskFailureDetails) -> TaskFailedError:
    return TaskFailedError(
        details.errorType, details.errorMessage, ev.opt_str(details, "stackTrace")
    )


def name_of(fn: Callable[..., Any] | str) -> str:
    """The registered name of an orchestrator or activity: its __name__ unless given as text."""
    return fn if isinstance(fn, str) else getattr(fn, "__dt_name__", fn.__name__)


class _Retrying(CompletableTask[Any]):
    """A call retried under a RetryPolicy: a failure schedules a timer, then the call again."""

    def __init__(
        self,
        ctx: OrchestrationContext,
        policy: RetryPolicy,
        schedule: Callable[[CompletableTask[Any]], None],
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.policy = policy
        self.attempt = 1
        self.schedule = schedule

    def fail(self, error: BaseException) -> None:
        handle = self.policy.handle
        retryable = isinstance(error, TaskFailedError) and (handle is None or handle(error))
        if self.attempt >= self.policy.max_number_of_attempts or not retryable:
            super().fail(error)
            return
        timer = self.ctx.create_timer(self.policy.delay(self.attempt))
        self.attempt += 1
        timer._on_done(lambda _: self.schedule(self))


class CriticalSection:
    """Held entity locks; leaving the ``with`` block (or `release()`) unlocks them."""

    def __init__(self, ctx: OrchestrationContext, request: pb.EntityLockRequestedEvent) -> None:
        self._ctx = ctx
        self._request = request
        self.entity_ids = list(request.lockSet)
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        for entity_id in self.entity_ids:
            action = self._ctx._new_action()
            unlock = action.sendEntityMessage.entityUnlockSent
            unlock.criticalSectionId = self._request.criticalSectionId
            unlock.parentInstanceId.value = self._ctx.instance_id
            unlock.targetInstanceId.value = entity_id

    def __enter__(self) -> CriticalSection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class OrchestrationContext:
    """What an orchestrator may do. Everything it does goes through here, so that a replay
    does exactly the same; see the determinism rules in the README."""

    def __init__(self, instance_id: str, execution_id: str) -> None:
        self.instance_id = instance_id
        self.execution_id = execution_id
        self.current_utc_datetime = datetime(1970, 1, 1, tzinfo=UTC)
        self.is_replaying = True
        self._next_id = 0
        self._actions: dict[int, pb.OrchestratorAction] = {}
        self._tasks: dict[int, CompletableTask[Any]] = {}
        self._waiting: dict[str, list[CompletableTask[Any]]] = {}
        self._arrived: dict[str, list[Any]] = {}
        self._replies: dict[str, CompletableTask[Any]] = {}
        self._locks: dict[str, tuple[CompletableTask[CriticalSection], CriticalSection]] = {}
        self._custom_status: str | None = None
        self._completion: pb.OrchestratorAction | None = None
        self._continued: tuple[Any, bool] | None = None

    # -- durable calls -------------------------------------------------------------------------

    def call_activity(
        self,
        activity: Callable[..., Any] | str,
        *,
        input: Any = None,
        retry_policy: RetryPolicy | None = None,
    ) -> Task[Any]:
        """Run an activity; the task's result is its return value."""
        name = name_of(activity)

        def schedule(task: CompletableTask[Any]) -> None:
            action = self._new_action()
            action.scheduleTask.name = name
            ev.set_str(action.scheduleTask.input, encode(input))
            self._tasks[action.id] = task

        return self._start(schedule, retry_policy)

    def call_sub_orchestrator(
        self,
        orchestrator: Orchestrator | str,
        *,
        input: Any = None,
        instance_id: str | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> Task[Any]:
        """Run another orchestration as a child; the task's result is its output."""
        name = name_of(orchestrator)

        def schedule(task: CompletableTask[Any]) -> None:
            action = self._new_action()
            create = action.createSubOrchestration
            create.name = name
            create.instanceId = instance_id or f"{self.instance_id}:{action.id:04x}"
            ev.set_str(create.input, encode(input))
            self._tasks[action.id] = task

        return self._start(schedule, retry_policy)

    def create_timer(self, fire_at: datetime | timedelta) -> Task[None]:
        """A durable timer: completes at `fire_at` (or after that long), even across restarts."""
        if isinstance(fire_at, timedelta):
            fire_at = self.current_utc_datetime + fire_at
        action = self._new_action()
        ev.set_time(action.createTimer.fireAt, fire_at)
        task: CompletableTask[None] = CompletableTask()
        self._tasks[action.id] = task
        return task

    def wait_for_external_event(self, name: str) -> Task[Any]:
        """Completes with the data of the next event `name` (case-insensitive) raised to the
        instance; events that arrived earlier are kept for it."""
        key = name.lower()
        task: CompletableTask[Any] = CompletableTask()
        arrived = self._arrived.get(key)
        if arrived:
            task.complete(arrived.pop(0))
        else:
            self._waiting.setdefault(key, []).append(task)
        return task

    def send_event(self, instance_id: str, name: str, data: Any = None) -> None:
        """Raise event `name` on another instance (fire and forget)."""
        action = self._new_action()
        action.sendEvent.instance.instanceId = instance_id
        action.sendEvent.name = name
        ev.set_str(action.sendEvent.data, encode(data))

    def signal_entity(
        self,
        entity_id: str,
        operation: str,
        input: Any = None,
        *,
        signal_time: datetime | None = None,
    ) -> None:
        """Send an operation to an entity (`@name@key`, see `dt_trio.entity_id`) without
        waiting for it; at `signal_time`, if given."""
        action = self._new_action()
        signaled = action.sendEntityMessage.entityOperationSignaled
        signaled.requestId = self._request_id(action.id)
        signaled.operation = operation
        signaled.targetInstanceId.value = entity_id
        ev.set_str(signaled.input, encode(input))
        if signal_time is not None:
            ev.set_time(signaled.scheduledTime, signal_time)

    def call_entity(self, entity_id: str, operation: str, input: Any = None) -> Task[Any]:
        """Run an operation on an entity; the task's result is what the operation returns."""
        action = self._new_action()
        called = action.sendEntityMessage.entityOperationCalled
        called.requestId = self._request_id(action.id)
        called.operation = operation
        called.targetInstanceId.value = entity_id
        called.parentInstanceId.value = self.instance_id
        ev.set_str(called.input, encode(input))
        task: CompletableTask[Any] = CompletableTask()
        self._replies[called.requestId] = task
        return task

    def lock_entities(self, entity_ids: Collection[str]) -> Task[CriticalSection]:
        """Lock entities for a critical section: the task completes once all are locked, with
        a context manager that releases them (``with (yield ctx.lock_entities([...])):``).
        While locked, only this orchestration's calls reach them. Locks are taken in one global
        order, so critical sections never deadlock; they are released at the latest when the
        orchestration ends."""
        lock_set = sorted(set(entity_ids))
        if not lock_set:
            raise ValueError("lock_entities needs at least one entity id")
        action = self._new_action()
        request = action.sendEntityMessage.entityLockRequested
        request.criticalSectionId = self._request_id(action.id)
        request.lockSet.extend(lock_set)
        request.parentInstanceId.value = self.instance_id
        task: CompletableTask[CriticalSection] = CompletableTask()
        self._locks[request.criticalSectionId] = (task, CriticalSection(self, request))
        return task

    def _request_id(self, action_id: int) -> str:
        # Deterministic, so a replay names the same request; unique per execution.
        return f"{self.instance_id}:{self.execution_id}:{action_id}"

    def set_custom_status(self, status: Any) -> None:
        """A JSON value clients can read while the orchestration runs."""
        self._custom_status = encode(status)

    def continue_as_new(self, input: Any, *, save_events: bool = False) -> None:
        """End this execution and start the orchestration again with `input` and a fresh
        history (keeping events that arrived but were not waited for, if `save_events`)."""
        self._continued = (input, save_events)

    # -- the engine ------------------------------------------------------------------------

    def _new_action(self) -> pb.OrchestratorAction:
        action = pb.OrchestratorAction(id=self._next_id)
        self._next_id += 1
        self._actions[action.id] = action
        return action

    def _start(
        self, schedule: Callable[[CompletableTask[Any]], None], policy: RetryPolicy | None
    ) -> Task[Any]:
        task: CompletableTask[Any] = (
            _Retrying(self, policy, schedule) if policy is not None else CompletableTask()
        )
        schedule(task)
        return task

    def _confirm(self, event: pb.HistoryEvent, kind: str, describe: str) -> None:
        """History says action `eventId` was `kind`: the replayed code must say the same."""
        action = self._actions.pop(event.eventId, None)
        made = action.WhichOneof("orchestratorActionType") if action is not None else None
        if made != kind:
            did = f"made {made} as call {event.eventId}" if made else "made no such call"
            raise NonDeterminismError(
                f"the history has {describe} as call {event.eventId}, but the code replayed "
                f"{did}: orchestrator code must make the same durable calls in the same order "
                "on every replay"
            )
        assert action is not None
        name = {
            "scheduleTask": lambda a: a.scheduleTask.name,
            "createSubOrchestration": lambda a: a.createSubOrchestration.name,
        }.get(kind)
        if name is not None and name(action) != _event_name(event):
            raise NonDeterminismError(
                f"the history has {describe} as call {event.eventId}, but the code replayed a "
                f"call of '{name(action)}': orchestrator code must make the same durable calls "
                "in the same order on every replay"
            )

    def _resolve(
        self, task_id: int, result: Any = None, error: BaseException | None = None
    ) -> None:
        task = self._tasks.pop(task_id, None)
        if task is None:
            return  # an answer for a call this code does not wait on (a retried timer, say)
        if error is not None:
            task.fail(error)
        else:
            task.complete(result)

    def _reply(
        self, request_id: str, result: Any = None, error: BaseException | None = None
    ) -> None:
        task = self._replies.pop(request_id, None)
        if task is None:
            return  # an answer to an earlier execution's call
        if error is not None:
            task.fail(error)
        else:
            task.complete(result)

    def _granted(self, section_id: str) -> None:
        entry = self._locks.pop(section_id, None)
        if entry is not None:
            task, section = entry
            task.complete(section)

    def _raised(self, name: str, data: Any) -> None:
        key = name.lower()
        waiting = self._waiting.get(key)
        if waiting:
            waiting.pop(0).complete(data)
        else:
            self._arrived.setdefault(key, []).append(data)


_ENTITY_MESSAGES = frozenset(
    {"entityOperationSignaled", "entityOperationCalled", "entityLockRequested", "entityUnlockSent"}
)


def _event_name(event: pb.HistoryEvent) -> str:
    if event.HasField("taskScheduled"):
        return event.taskScheduled.name
    return event.subOrchestrationInstanceCreated.name


class _Run:
    """One orchestrator run over the history of one execution, step after step: each `run`
    applies the events of a step's request that it has not seen yet."""

    def __init__(self, fn: Orchestrator, instance_id: str, execution_id: str) -> None:
        self.fn = fn
        self.ctx = OrchestrationContext(instance_id, execution_id)
        self.generator: Generator[Task[Any], Any, Any] | None = None
        self.awaiting: Task[Any] | None = None
        self.suspended = False
        self.held: list[pb.HistoryEvent] = []
        self.seen = 0  # how many events of the history it has applied
        self.last_seen: pb.HistoryEvent | None = None  # a copy of the last of them

    def continues(self, fn: Orchestrator, step: Step) -> bool:
        """Whether the step's past starts with exactly the events this run has seen (the
        previous step's, committed): then only the rest needs applying."""
        past = step.past_events
        return (
            fn is self.fn
            and self.ctx._completion is None
            and step.execution_id == self.ctx.execution_id
            and 0 < self.seen <= len(past)
            and past[self.seen - 1] == self.last_seen
        )

    def run(self, step: Step) -> pb.OrchestratorResponse:
        past, new = step.past_events, step.new_events
        try:
            for replaying, events in ((True, past[self.seen :]), (False, new)):
                self.ctx.is_replaying = replaying
                for event in events:
                    if self.ctx._completion is not None:
                        break
                    self._apply(event)
        except NonDeterminismError as exc:
            self._finish(pb.ORCHESTRATION_STATUS_FAILED, failure=failure_details(exc))
        self.seen = len(past) + len(new)
        if self.seen:
            # A copy: a reference would keep the whole history alive.
            self.last_seen = pb.HistoryEvent()
            self.last_seen.CopyFrom(new[-1] if new else past[-1])
        return self._response(step.instance_id)

    def _apply(self, event: pb.HistoryEvent) -> None:
        kind = event.WhichOneof("eventType")
        if self.suspended and kind not in ("executionResumed", "executionTerminated"):
            self.held.append(event)  # delivered when the instance resumes
            return
        ctx = self.ctx
        if kind == "orchestratorStarted":
            ctx.current_utc_datetime = ev.to_datetime(event.timestamp)
        elif kind == "executionStarted":
            self._begin(decode(ev.opt_str(event.executionStarted, "input")))
        elif kind == "taskScheduled":
            ctx._confirm(event, "scheduleTask", f"activity '{event.taskScheduled.name}'")
        elif kind == "taskCompleted":
            done = event.taskCompleted
            ctx._resolve(done.taskScheduledId, decode(ev.opt_str(done, "result")))
        elif kind == "taskFailed":
            ctx._resolve(
                event.taskFailed.taskScheduledId, error=failed(event.taskFailed.failureDetails)
            )
        elif kind == "timerCreated":
            ctx._confirm(event, "createTimer", "a timer")
        elif kind == "timerFired":
            ctx._resolve(event.timerFired.timerId)
        elif kind == "subOrchestrationInstanceCreated":
            name = event.subOrchestrationInstanceCreated.name
            ctx._confirm(event, "createSubOrchestration", f"sub-orchestration '{name}'")
        elif kind == "subOrchestrationInstanceCompleted":
            done_sub = event.subOrchestrationInstanceCompleted
            ctx._resolve(done_sub.taskScheduledId, decode(ev.opt_str(done_sub, "result")))
        elif kind == "subOrchestrationInstanceFailed":
            failed_sub = event.subOrchestrationInstanceFailed
            ctx._resolve(failed_sub.taskScheduledId, error=failed(failed_sub.failureDetails))
        elif kind == "eventSent":
            ctx._confirm(event, "sendEvent", f"an event sent to '{event.eventSent.instanceId}'")
        elif kind in _ENTITY_MESSAGES:
            ctx._confirm(event, "sendEntityMessage", f"an entity message ({kind})")
        elif kind == "entityOperationCompleted":
            done_op = event.entityOperationCompleted
            ctx._reply(done_op.requestId, decode(ev.opt_str(done_op, "output")))
        elif kind == "entityOperationFailed":
            failed_op = event.entityOperationFailed
            ctx._reply(failed_op.requestId, error=failed(failed_op.failureDetails))
        elif kind == "entityLockGranted":
            ctx._granted(event.entityLockGranted.criticalSectionId)
        elif kind == "eventRaised":
            ctx._raised(event.eventRaised.name, decode(ev.opt_str(event.eventRaised, "input")))
        elif kind == "executionSuspended":
            self.suspended = True
        elif kind == "executionResumed":
            self.suspended = False
            held, self.held = self.held, []
            for waiting in held:
                self._apply(waiting)
        elif kind == "executionTerminated":
            output = ev.opt_str(event.executionTerminated, "input")
            self._finish(pb.ORCHESTRATION_STATUS_TERMINATED, result=output)
            return
        self._drive()

    def _begin(self, input: Any) -> None:
        try:
            outcome = self.fn(self.ctx, input)
        except Exception as exc:
            self._finish(pb.ORCHESTRATION_STATUS_FAILED, failure=failure_details(exc))
            return
        if isinstance(outcome, Generator):
            self.generator = outcome
            self._step(functools.partial(next, outcome))
        else:
            self._returned(outcome)

    def _drive(self) -> None:
        """Resume the generator for as long as the task it waits on is complete."""
        while (
            self.generator is not None
            and self.ctx._completion is None
            and self.awaiting is not None
            and self.awaiting.is_complete
        ):
            task, generator = self.awaiting, self.generator
            self.awaiting = None
            if task._error is not None:
                self._step(functools.partial(generator.throw, task._error))
            else:
                self._step(functools.partial(generator.send, task._result))

    def _step(self, resume: Callable[[], Any]) -> None:
        try:
            yielded = resume()
        except StopIteration as stop:
            self._returned(stop.value)
            return
        except NonDeterminismError:
            raise
        except Exception as exc:
            self._finish(pb.ORCHESTRATION_STATUS_FAILED, failure=failure_details(exc))
            return
        if not isinstance(yielded, Task):
            error = TypeError(
                f"an orchestrator must yield durable tasks (ctx.call_activity(...), "
                f"ctx.create_timer(...), when_all(...), ...), not {type(yielded).__name__}"
            )
            self._finish(pb.ORCHESTRATION_STATUS_FAILED, failure=failure_details(error))
            return
        self.awaiting = yielded

    def _returned(self, value: Any) -> None:
        if self.ctx._continued is not None:
            new_input, save_events = self.ctx._continued
            action = self._finish(
                pb.ORCHESTRATION_STATUS_CONTINUED_AS_NEW, result=encode(new_input)
            )
            if save_events:
                for name, values in self.ctx._arrived.items():
                    for data in values:
                        action.completeOrchestration.carryoverEvents.append(
                            ev.event_raised(self.ctx.current_utc_datetime, name, encode(data))
                        )
            return
        try:
            result = encode(value)
        except (TypeError, ValueError) as exc:
            self._finish(pb.ORCHESTRATION_STATUS_FAILED, failure=failure_details(exc))
            return
        self._finish(pb.ORCHESTRATION_STATUS_COMPLETED, result=result)

    def _finish(
        self,
        status: int,
        result: str | None = None,
        failure: pb.TaskFailureDetails | None = None,
    ) -> pb.OrchestratorAction:
        action = pb.OrchestratorAction(id=self.ctx._next_id)
        complete = action.completeOrchestration
        complete.orchestrationStatus = status  # type: ignore[assignment]
        ev.set_str(complete.result, result)
        if failure is not None:
            complete.failureDetails.CopyFrom(failure)
        self.ctx._completion = action
        return action

    def _response(self, instance_id: str) -> pb.OrchestratorResponse:
        response = pb.OrchestratorResponse(instanceId=instance_id)
        ev.set_str(response.customStatus, self.ctx._custom_status)
        completion = self.ctx._completion
        if completion is None or completion.completeOrchestration.orchestrationStatus in (
            pb.ORCHESTRATION_STATUS_COMPLETED,
            pb.ORCHESTRATION_STATUS_CONTINUED_AS_NEW,
        ):
            # New calls made before a normal end still happen (a last event sent, say).
            response.actions.extend(self.ctx._actions[i] for i in sorted(self.ctx._actions))
        if completion is not None:
            response.actions.append(completion)
        return response


class ReplayCache:
    """Orchestrators kept suspended between their steps, the most recently run first (what
    DTFx calls extended sessions): the next step of a kept one applies only the events it has
    not seen, instead of replaying its code from the start. Only a history that continues the
    kept one exactly is applied this way; any other (a step run again after its commit failed,
    another execution) is replayed from the start."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._runs: OrderedDict[str, _Run] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    def instances(self) -> list[str]:
        return list(self._runs)

    def take(self, fn: Orchestrator, step: Step) -> _Run | None:
        run = self._runs.pop(step.instance_id, None)
        return run if run is not None and run.continues(fn, step) else None

    def keep(self, instance_id: str, run: _Run) -> None:
        if run.ctx._completion is not None:
            return  # finished: it has no next step
        self._runs[instance_id] = run
        if len(self._runs) > self._capacity:
            self._runs.popitem(last=False)


class Step(Protocol):
    """What a step gives an orchestrator (an OrchestrationStep of the engine, or the protocol's
    request through `run_orchestrator`)."""

    @property
    def instance_id(self) -> str: ...
    @property
    def execution_id(self) -> str: ...
    @property
    def past_events(self) -> Sequence[pb.HistoryEvent]: ...
    @property
    def new_events(self) -> Sequence[pb.HistoryEvent]: ...


@dataclass(frozen=True)
class _RequestStep:
    instance_id: str
    execution_id: str
    past_events: Sequence[pb.HistoryEvent]
    new_events: Sequence[pb.HistoryEvent]


def run_step(
    fn: Orchestrator, step: Step, cache: ReplayCache | None = None
) -> pb.OrchestratorResponse:
    """Run `fn` over the step's history and new events; the actions of this step. With a
    cache, an orchestrator kept from its previous step resumes where it stopped."""
    run = cache.take(fn, step) if cache is not None else None
    if run is None:
        run = _Run(fn, step.instance_id, step.execution_id)
    response = run.run(step)
    if cache is not None:
        cache.keep(step.instance_id, run)
    return response


def run_orchestrator(
    fn: Orchestrator, request: pb.OrchestratorRequest, cache: ReplayCache | None = None
) -> pb.OrchestratorResponse:
    """`run_step` on the protocol's form of a step."""
    step = _RequestStep(
        request.instanceId,
        ev.opt_str(request, "executionId") or "",
        request.pastEvents,
        request.newEvents,
    )
    return run_step(fn, step, cache)
