"""The local executor: orchestrators and activities of this process, run in the hub itself.

Orchestrators replay synchronously in the processor's task (pure CPU, no I/O). `async def`
activities run in the processor's task too, inside the hub's nursery, and are cancelled with
it; plain-function activities run in worker threads, so they may block.
"""

from __future__ import annotations

import copy
import inspect
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import trio

from dt_trio._core import _events as ev
from dt_trio._core import entity_name
from dt_trio._core._commit import WorkKind
from dt_trio._engine._executor import Check, OrchestrationStep, Route
from dt_trio._local._registry import Registry
from dt_trio._local._replay import (
    ReplayCache,
    decode,
    encode,
    failure_details,
    run_step,
)
from dt_trio._proto import orchestrator_service_pb2 as pb


@dataclass(frozen=True)
class ActivityContext:
    """What an activity knows about its call."""

    orchestration_id: str
    task_id: int


class EntityContext:
    """What an entity operation sees: its id, the operation, the state; what it may do."""

    def __init__(self, entity_id: str, operation: str, state: Any) -> None:
        self.entity_id = entity_id
        self.name = entity_name(entity_id)
        self.key = entity_id[len(self.name) + 2 :]
        self.operation = operation
        self._state = state
        self._actions: list[pb.OperationAction] = []

    def get_state(self, default: Any = None) -> Any:
        """The entity's state (a JSON value), or `default` when it has none."""
        return copy.deepcopy(self._state) if self._state is not None else default

    def set_state(self, state: Any) -> None:
        """Replace the state; None deletes the entity once nothing else holds it."""
        self._state = state

    def signal_entity(self, entity_id: str, operation: str, input: Any = None) -> None:
        """Send an operation to another entity once this operation succeeds."""
        action = pb.OperationAction(id=len(self._actions))
        action.sendSignal.instanceId = entity_id
        action.sendSignal.name = operation
        ev.set_str(action.sendSignal.input, encode(input))
        self._actions.append(action)

    def schedule_new_orchestration(
        self, name: str, input: Any = None, *, instance_id: str | None = None
    ) -> str:
        """Start an orchestration once this operation succeeds; returns its instance id."""
        action = pb.OperationAction(id=len(self._actions))
        start = action.startNewOrchestration
        start.name = name
        start.instanceId = instance_id or uuid.uuid4().hex
        ev.set_str(start.input, encode(input))
        self._actions.append(action)
        return start.instanceId


@dataclass(frozen=True)
class LocalAnswer:
    """An answer computed in this process (nobody waits for `finish`)."""

    response: object
    checked: object = None


class LocalExecutor:
    """Runs the work items whose names are in `registry`."""

    def __init__(self, registry: Registry, thread_limit: int = 16) -> None:
        self._registry = registry
        self._threads = trio.CapacityLimiter(thread_limit)
        # Orchestrators wait suspended between steps instead of replaying from the start.
        self._replays = ReplayCache()

    def runs_here(self, route: Route) -> bool:
        return self.accepts(route)

    def accepts(self, route: Route) -> bool:
        # Entity names are matched without case, as entity ids carry them in lower case.
        name = route.name.lower() if route.kind is WorkKind.ENTITY else route.name
        return name in self._names(route.kind)

    def has_workers(self, kind: WorkKind) -> bool:
        if kind is WorkKind.ORCHESTRATION:  # (asked before every lease and hand-over)
            return bool(self._registry.orchestrators)
        if kind is WorkKind.ACTIVITY:
            return bool(self._registry.activities)
        return bool(self._registry.entities)

    async def workers_changed(self) -> None:
        await trio.sleep_forever()  # the registry is what it is

    def _names(self, kind: WorkKind) -> dict[str, Any]:
        if kind is WorkKind.ORCHESTRATION:
            return self._registry.orchestrators
        if kind is WorkKind.ACTIVITY:
            return self._registry.activities
        return self._registry.entities

    async def execute(
        self,
        work_item: pb.WorkItem,
        route: Route,
        on_its_way: trio.Event | None = None,
        check: Check | None = None,
    ) -> LocalAnswer:
        if on_its_way is not None:
            on_its_way.set()  # it runs here and now
        assert route.kind is not WorkKind.ORCHESTRATION, "steps come through execute_step"
        response: object
        if route.kind is WorkKind.ENTITY:
            fn = self._registry.entities[route.name.lower()]
            response = await self._entity_batch(fn, work_item.entityRequestV2)
        else:
            request = work_item.activityRequest
            response = await self._activity(self._registry.activities[route.name], request)
        return _answer(response, check)

    async def execute_step(
        self,
        step: OrchestrationStep,
        route: Route,
        on_its_way: trio.Event | None = None,
        check: Check | None = None,
    ) -> LocalAnswer:
        """Orchestrators replay synchronously (pure CPU), from the events as they are."""
        if on_its_way is not None:
            on_its_way.set()
        fn = self._registry.orchestrators[route.name]
        response = run_step(fn, step, self._replays)
        # A cancellation point without a turn of the loop: the commit that follows is one.
        await trio.lowlevel.checkpoint_if_cancelled()
        return _answer(response, check)

    async def _entity_batch(self, fn: Any, request: pb.EntityRequest) -> pb.EntityBatchResult:
        """Run the batch's operations in order; each one that fails leaves the state and the
        messages as they were before it."""
        result = pb.EntityBatchResult()
        state = decode(ev.opt_str(request, "entityState"))
        for event in request.operationRequests:
            op = (
                event.entityOperationCalled
                if event.HasField("entityOperationCalled")
                else event.entityOperationSignaled
            )
            ctx = EntityContext(request.instanceId, op.operation, copy.deepcopy(state))
            outcome = result.results.add()
            started = datetime.now(UTC)
            try:
                value = decode(ev.opt_str(op, "input"))
                if inspect.iscoroutinefunction(fn):
                    returned = await fn(ctx, value)
                else:
                    returned = fn(ctx, value)  # entity operations are short: no thread
                ev.set_str(outcome.success.result, encode(returned))
                ev.set_time(outcome.success.startTimeUtc, started)
                ev.set_time(outcome.success.endTimeUtc, datetime.now(UTC))
                state = ctx._state
                for action in ctx._actions:
                    action.id = len(result.actions)
                    result.actions.append(action)
            except Exception as exc:
                outcome.failure.failureDetails.CopyFrom(failure_details(exc))
                ev.set_time(outcome.failure.startTimeUtc, started)
                ev.set_time(outcome.failure.endTimeUtc, datetime.now(UTC))
        ev.set_str(result.entityState, encode(state))
        return result

    async def _activity(self, fn: Any, request: pb.ActivityRequest) -> pb.ActivityResponse:
        response = pb.ActivityResponse(
            instanceId=request.orchestrationInstance.instanceId, taskId=request.taskId
        )
        ctx = ActivityContext(request.orchestrationInstance.instanceId, request.taskId)
        try:
            value = decode(ev.opt_str(request, "input"))
            if inspect.iscoroutinefunction(fn):
                result = await fn(ctx, value)
            else:
                # A blocking activity never stalls the hub; on shutdown the hub stops waiting
                # for it and the activity runs again after a restart (at-least-once).
                result = await trio.to_thread.run_sync(
                    fn, ctx, value, limiter=self._threads, abandon_on_cancel=True
                )
            ev.set_str(response.result, encode(result))
        except Exception as exc:
            response.failureDetails.CopyFrom(failure_details(exc))
        return response

    def finish(self, answer: object, error: BaseException | None = None) -> None:
        """Nothing waits on a local answer's commit."""


def _answer(response: object, check: Check | None) -> LocalAnswer:
    """The answer, checked as a remote one is (a refusal here is a bug: it propagates)."""
    return LocalAnswer(response, check(response) if check is not None else None)
